"""NVMe tier vs raw O_DIRECT, side by side in one run (and, optionally, vs another checkout's tier).

    sudo python3 benchmarks/bench_nvme.py [--dir /tmp/tierstore-bench] [--blocks 512] [--batch 32]
        [--rounds 3] [--io-threads 8] [--compare-src /path/to/old/checkout]

Cases, each writing ``--blocks`` 2 MiB blocks and reading them back cold (``sync; echo 3 >
/proc/sys/vm/drop_caches`` before every read; needs root, else a note says the reads were warm):

==================  ==============================================================================
raw                 the peer_bench baseline: O_DIRECT ``pwrite`` of the bare blocks into one fresh
                    file, QD1, one ``fsync``; cold ``preadv`` QD1. Every ratio is to this row.
raw_slab            the tier's I/O pattern without the tier (bench_disk_paths.py): header page +
                    payload per ``pwritev`` into fresh ``posix_fallocate``d slab files,
                    ``--io-threads`` in flight, one ``fdatasync`` per touched file per batch;
                    reads at the same depth
tier fresh          a new tier in an empty directory: ``alloc()`` (grows the slab files) +
                    ``write_batch`` in batches of ``--batch`` (checksum, header, one fdatasync per
                    touched file + one LMDB commit per batch); cold ``read_batch`` of all blocks
                    (header and checksum verified)
tier prepared       as ``tier fresh``, but ``prepare()`` ran first (untimed, its time is printed):
                    the slots hold written zeros, so the writes are overwrites. Only for a tier
                    that has ``prepare`` (skipped for an older ``--compare-src``)
tier reused         the slab files of an earlier round, entries deleted: overwrites of earlier
                    records (the steady state of a full tier)
==================  ==============================================================================

Tier cases run in a child process each (``--worker``), so ``--compare-src DIR`` can time another
checkout's tier (``git archive <rev> tierstore | tar -x -C DIR``) beside this one, as ``old ...``
rows. The order of the cases rotates by one every round, starting from a random rotation
(``--seed`` repeats one), so no case (raw included) always runs first. Every read lands in a
buffer zeroed just before it (never one that already holds the source's bytes) and is compared
with the source, byte for byte (untimed). GB/s = 1e9 B/s of payload; each ratio is the
median over rounds of case / raw in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_disk_paths as paths  # noqa: E402

BLOCK = 2 << 20


def key(i: int) -> bytes:
    return i.to_bytes(32, "little")


def source(n: int):
    src = paths.anon(n * BLOCK)
    paths.fill(src, n)
    dst = paths.anon(n * BLOCK)
    zero(dst)               # pre-fault with zeros: dst never holds the source's bytes before a read
    return src, dst


def zero(dst) -> None:
    """Zero ``dst`` before a read, so the byte check afterwards can only pass if the read wrote
    every byte (a read that wrote nothing leaves zeros, which random source bytes never are)."""
    np.frombuffer(dst, np.uint8)[:] = 0


# ---------------------------------------------------------------------------- worker (child)
def worker(args) -> None:
    """One tier case in this process; prints one JSON line."""
    sys.path.insert(0, str(Path(args.src).resolve()))
    from tierstore.tiers.slot_tier import DiskRead, DiskWrite
    from tierstore.tiers.nvme import NvmeTier

    n, d = args.blocks, Path(args.dir)
    src, dst = source(n)
    out = {"prepare_s": None}

    def open_tier():
        t = NvmeTier(d, n, BLOCK, file_slots=64, io_threads=args.io_threads, direct_io="on")
        t.recover()
        return t

    def write_all(t):
        slots = [t.alloc() for _ in range(n)]
        for b in range(0, n, args.batch):
            items = [DiskWrite(slots[i], key(i), bytes(16), src[i * BLOCK:(i + 1) * BLOCK])
                     for i in range(b, min(n, b + args.batch))]
            res = t.write_batch(items)
            if not all(r.ok for r in res):
                raise SystemExit(f"write_batch failed: {res}")
        return slots

    if args.worker == "reused":
        if not d.exists():          # first round: lay the files down once, untimed
            t = open_tier()
            write_all(t)
            t.close()
        t = open_tier()
        t.delete_batch([e.slot for e in t.entries()])
    else:
        shutil.rmtree(d, ignore_errors=True)
        t = open_tier()
        if args.worker == "prepared":
            t0 = time.perf_counter()
            while t.prepare():
                pass
            out["prepare_s"] = time.perf_counter() - t0
    os.sync()
    t0 = time.perf_counter()
    slots = write_all(t)
    out["write_s"] = time.perf_counter() - t0
    zero(dst)
    out["dropped"] = paths.drop_caches()
    t0 = time.perf_counter()
    for b in range(0, n, args.batch):
        items = [DiskRead(slots[i], key(i), dst[i * BLOCK:(i + 1) * BLOCK], BLOCK, 0)
                 for i in range(b, min(n, b + args.batch))]
        res = t.read_batch(items)
        if not all(r.ok for r in res):
            raise SystemExit(f"read_batch failed: {res}")
    out["read_s"] = time.perf_counter() - t0
    paths.check(dst, src, f"tier {args.worker}")
    out["direct"] = t.direct
    t.close()
    if args.worker != "reused":
        shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(out))


# ---------------------------------------------------------------------------- driver
def run_worker(args, mode: str, src_dir: str, d: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--src", src_dir, "--dir", str(d),
           "--blocks", str(args.blocks), "--batch", str(args.batch),
           "--io-threads", str(args.io_threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"worker {mode} ({src_dir}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/tierstore-bench")
    ap.add_argument("--blocks", type=int, default=512, help="2 MiB blocks per case")
    ap.add_argument("--batch", type=int, default=32, help="blocks per write_batch/read_batch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--io-threads", type=int, default=8)
    ap.add_argument("--compare-src", help="another checkout (holding tierstore/) to time beside")
    ap.add_argument("--cases", default="raw,raw_slab,tier fresh,tier prepared,tier reused")
    ap.add_argument("--seed", type=int, default=None,
                    help="first round's rotation of the case order (default: random, printed)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--src", default=str(HERE.parent), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    n, root = args.blocks, Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    src, dst = source(n)
    gb = n * BLOCK / 1e9
    wanted = args.cases.split(",")
    cases = ["raw"] + [c for c in wanted if c != "raw" and not c.startswith("tier")]
    srcs = [("", str(HERE.parent))] + ([("old ", args.compare_src)] if args.compare_src else [])
    for label, s in srcs:
        has_prepare = "def prepare(" in (Path(s) / "tierstore/tiers/nvme.py").read_text()
        cases += [label + c for c in wanted if c.startswith("tier")
                  and (c != "tier prepared" or has_prepare)]
    src_of = {label + c: s for label, s in srcs for c in wanted}
    w: dict[str, list[float]] = {}
    r: dict[str, list[float]] = {}
    prep: dict[str, list[float]] = {}
    loads, dropped, direct = [], True, None
    pool = paths.ThreadPoolExecutor(args.io_threads)
    seed = random.randrange(len(cases)) if args.seed is None else args.seed
    t_start = time.time()
    try:
        for rnd in range(args.rounds):
            loads.append(os.getloadavg()[0])
            k = (seed + rnd) % len(cases)   # raw is not always first: the start moves per run
            for c in cases[k:] + cases[:k]:
                if c == "raw":
                    d = root / "raw"
                    paths.clear(d)
                    w.setdefault(c, []).append(paths.raw_write(d / "raw.dat", src, n))
                    zero(dst)
                    dropped &= paths.drop_caches()
                    r.setdefault(c, []).append(paths.raw_read(d / "raw.dat", dst, n))
                    paths.check(dst, src, "raw")
                    shutil.rmtree(d)
                elif c == "raw_slab":
                    d = root / "raw_slab"
                    paths.clear(d)
                    wa = argparse.Namespace(batch=args.batch, file_records=64)
                    qd = args.io_threads
                    dt, _ = paths.write_case(d, src, n, wa, "fallocate", qd, "batch", pool)
                    w.setdefault(c, []).append(dt)
                    zero(dst)
                    dropped &= paths.drop_caches()
                    r.setdefault(c, []).append(paths.read_case(d, dst, n, wa, "fallocate", qd,
                                                               pool))
                    paths.check(dst, src, "raw_slab")
                    shutil.rmtree(d)
                else:
                    mode = c.split()[-1]
                    d = root / c.replace(" ", "_")
                    os.sync()
                    out = run_worker(args, mode, src_of[c], d)
                    w.setdefault(c, []).append(out["write_s"])
                    r.setdefault(c, []).append(out["read_s"])
                    if out["prepare_s"] is not None:
                        prep.setdefault(c, []).append(out["prepare_s"])
                    dropped &= out["dropped"]
                    direct = out["direct"]
            print(f"round {rnd + 1}/{args.rounds} done ({', '.join(cases[k:] + cases[:k])}), "
                  f"{time.time() - t_start:.0f} s, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    finally:
        pool.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    print(f"# NVMe tier vs raw O_DIRECT: {n} x 2 MiB = {gb:.2f} GB per case, batch {args.batch}, "
          f"io_threads {args.io_threads}, {args.rounds} rounds (order rotated from --seed {seed}), "
          f"dir {root}, "
          f"tier direct_io={direct}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}; load average at round starts: "
          + " ".join(f"{x:.2f}" for x in loads)
          + ("" if dropped else "; NOTE: page cache NOT dropped (not root?): reads are warm"))
    print("# GB/s = 1e9 B/s, median (min-max) over rounds; ratio = median of case/raw per round")
    print(f"{'case':<22}{'write GB/s':>22}{'ratio':>7}{'cold read GB/s':>22}{'ratio':>7}"
          f"{'prepare s':>11}")
    for c in cases:
        cells = []
        for ts, base in ((w[c], w["raw"]), (r[c], r["raw"])):
            rates = [gb / t for t in ts]
            cell = f"{statistics.median(rates):.2f} ({min(rates):.2f}-{max(rates):.2f})"
            ratio = "-" if c == "raw" else \
                f"{statistics.median(b / t for t, b in zip(ts, base)):.2f}"
            cells.append(f"{cell:>22}{ratio:>7}")
        p = f"{statistics.median(prep[c]):.2f}" if c in prep else ""
        print(f"{c:<22}{cells[0]}{cells[1]}{p:>11}")


if __name__ == "__main__":
    main()
