"""NVMe tier vs raw O_DIRECT sequential I/O, side by side, same bytes, same filesystem.

    python3 benchmarks/bench_nvme.py [--dir /tmp/tierstore-bench] [--blocks 256] [--batch 32]

For each round (fresh files each time, raw and tier alternating):

- write: raw = O_DIRECT ``pwrite`` of N 2 MiB blocks, sequential, into a new file, one ``fsync``
  at the end; tier = ``alloc()`` N slots (includes slab ``posix_fallocate``) + ``write_batch`` in
  batches of ``--batch`` (one fdatasync + one LMDB commit per batch), from an aligned mmap buffer
  laid out like the DRAM slab;
- cold read: ``sync; echo 3 > /proc/sys/vm/drop_caches`` before each (skipped with a note when not
  root); raw = O_DIRECT ``pread`` of the same bytes, sequential; tier = ``read_batch`` in batches of
  ``--batch`` into aligned destination slots, with header and xxh3 checksum verification.

Prints GiB/s (median of ``--rounds``) and the tier/raw ratio (acceptance: >= 0.9).
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tierstore.tiers.base import DiskRead, DiskWrite  # noqa: E402
from tierstore.tiers.nvme import NvmeTier  # noqa: E402

BLOCK = 2 << 20
GiB = 1 << 30


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def slab(n: int) -> memoryview:
    mm = mmap.mmap(-1, n * BLOCK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mv = memoryview(mm)
    seed = os.urandom(BLOCK)
    for i in range(n):
        mv[i * BLOCK:(i + 1) * BLOCK] = seed
        mv[i * BLOCK:i * BLOCK + 8] = i.to_bytes(8, "little")
    return mv


def raw_write(path: Path, src: memoryview, n: int) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for i in range(n):
            os.pwrite(fd, src[i * BLOCK:(i + 1) * BLOCK], i * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def raw_read(path: Path, dst: memoryview, n: int) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for i in range(n):
            os.preadv(fd, [dst[i * BLOCK:(i + 1) * BLOCK]], i * BLOCK)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def key(i: int) -> bytes:
    return i.to_bytes(32, "little")


def tier_write(tier: NvmeTier, src: memoryview, n: int, batch: int) -> tuple[float, list[int]]:
    t = time.perf_counter()
    slots = [tier.alloc() for _ in range(n)]
    for b in range(0, n, batch):
        items = [DiskWrite(slots[i], key(i), bytes(16), src[i * BLOCK:(i + 1) * BLOCK])
                 for i in range(b, min(n, b + batch))]
        res = tier.write_batch(items)
        assert all(r.ok for r in res), res
    return time.perf_counter() - t, slots


def tier_read(tier: NvmeTier, slots: list[int], dst: memoryview, n: int, batch: int) -> float:
    t = time.perf_counter()
    for b in range(0, n, batch):
        items = [DiskRead(slots[i], key(i), dst[i * BLOCK:(i + 1) * BLOCK], BLOCK, 0)
                 for i in range(b, min(n, b + batch))]
        res = tier.read_batch(items)
        assert all(r.ok for r in res), res
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/tierstore-bench")
    ap.add_argument("--blocks", type=int, default=256, help="2 MiB blocks per run")
    ap.add_argument("--batch", type=int, default=32, help="blocks per write_batch/read_batch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--io-threads", type=int, default=8)
    args = ap.parse_args()
    n, root = args.blocks, Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    src, dst = slab(n), slab(n)
    gib = n * BLOCK / GiB
    rw, tw, rr, tr = [], [], [], []
    dropped = True
    for _ in range(args.rounds):
        raw_path, tier_dir = root / "raw.dat", root / "tier"
        shutil.rmtree(tier_dir, ignore_errors=True)
        rw.append(raw_write(raw_path, src, n))
        tier = NvmeTier(tier_dir, n, BLOCK, file_slots=64, io_threads=args.io_threads)
        tier.recover()
        dt, slots = tier_write(tier, src, n, args.batch)
        tw.append(dt)
        dropped &= drop_caches()
        rr.append(raw_read(raw_path, dst, n))
        assert bytes(dst[:BLOCK]) == bytes(src[:BLOCK])
        dropped &= drop_caches()
        tr.append(tier_read(tier, slots, dst, n, args.batch))
        assert bytes(dst[(n - 1) * BLOCK:]) == bytes(src[(n - 1) * BLOCK:])
        direct = tier.direct
        tier.close()
        raw_path.unlink()
        shutil.rmtree(tier_dir, ignore_errors=True)

    def rate(ts: list[float]) -> float:
        return gib / statistics.median(ts)

    print(f"NVMe tier vs raw O_DIRECT, {n} x 2 MiB = {gib:.2f} GiB, batch {args.batch}, "
          f"{args.rounds} rounds (median), dir {root}, tier direct_io={direct}")
    if not dropped:
        print("note: could not drop the page cache (not root?): reads are not cold")
    print(f"{'op':<12}{'raw GiB/s':>12}{'tier GiB/s':>12}{'ratio':>8}")
    for name, a, b in (("write", rw, tw), ("cold read", rr, tr)):
        print(f"{name:<12}{rate(a):>12.2f}{rate(b):>12.2f}{rate(b) / rate(a):>8.2f}")


if __name__ == "__main__":
    main()
