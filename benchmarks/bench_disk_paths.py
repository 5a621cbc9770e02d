"""How should the NVMe tier lay out and grow its files? Raw O_DIRECT strategies, side by side.

    sudo python3 benchmarks/bench_disk_paths.py [--dir /tmp/tierstore-disk-paths] [--records 512]
        [--reps 3] [--qd 1,4] [--sync batch,record] [--batch 32] [--file-records 64]

Every case writes ``--records`` records shaped like the tier's (one 4 KiB header page + a 2 MiB
payload, pwritev from page-aligned buffers, O_DIRECT, offsets 4 KiB-aligned) into files laid out
like the tier's slabs (``--file-records`` records per file), ``--batch`` records per batch; the I/Os
of a batch run on ``qd`` threads (qd 1 = on the calling thread). File strategies:

=========  ===================================================================================
fallocate  fresh files, each ``posix_fallocate``d whole when first touched (the tier before this
           change): the writes land in unwritten extents
sparse     fresh files, ``ftruncate``d to full size when first touched (holes, no reservation)
append     fresh empty files grown by the writes themselves (each record extends the file)
reused     files already written once (untimed, before the first repetition): plain overwrites
perfile    one new file per record (``O_CREAT``), as LMCache ``use_odirect`` does; no header
=========  ===================================================================================

Sync modes: ``batch`` = one ``fdatasync`` per touched file after each batch (per file for
perfile), ``record`` = one ``fdatasync`` after every record, ``end`` = one ``syncfs`` after the
last record (LMCache + ``os.sync()``, the peer_bench "c+sync" row). A fresh file is
also made durable in its directory (one ``fsync`` of the directory per batch that created one).
The timed region includes creating and growing the files, not deleting them.

Cold reads (``sync; echo 3 > /proc/sys/vm/drop_caches`` first, needs root) read the records back
at each qd from the files the strategy's last write case left, header page + payload per
``preadv``, into a zeroed destination; every byte is then checked (untimed).

Baseline rows are the peer_bench ones: ``raw_write`` = O_DIRECT ``pwrite`` of the bare 2 MiB
payloads into one fresh file, QD1, one ``fsync`` at the end; ``raw_read`` = cold QD1 ``preadv``
of it. Ratios are per repetition (case / baseline of the same repetition), median over reps.
The order of the strategies (baseline included) and of the cases inside a strategy rotates by
one every repetition. Files are deleted at the end (also on error).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PAYLOAD = 2 << 20
HDR = 4096
REC = HDR + PAYLOAD
STRATEGIES = ("fallocate", "sparse", "append", "reused", "perfile")


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def anon(nbytes: int) -> memoryview:
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return memoryview(mm)


def fill(src: memoryview, n: int) -> None:
    """Incompressible payloads, distinct per record (pre-faulted)."""
    rng = np.random.default_rng(0)
    a = np.frombuffer(src, dtype=np.uint64)
    a[:] = rng.integers(0, 2**63, size=a.size, dtype=np.uint64)


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Case:
    """One write strategy over fresh (or reused) files in ``d``."""

    def __init__(self, d: Path, n: int, file_records: int, strategy: str) -> None:
        self.d, self.n, self.fr, self.strategy = d, n, file_records, strategy
        self.fds: dict[int, int] = {}
        self.prep_s = 0.0

    def path(self, f: int) -> Path:
        return self.d / (f"rec-{f:05d}.dat" if self.strategy == "perfile" else f"slab-{f:05d}.dat")

    def locate(self, i: int) -> tuple[int, int]:
        if self.strategy == "perfile":
            return i, 0
        f, j = divmod(i, self.fr)
        return f, j * REC

    def file_bytes(self, f: int) -> int:
        return min(self.fr, self.n - f * self.fr) * REC

    def open_for(self, i: int) -> bool:
        """Make record ``i``'s file exist and be grown as the strategy says; True if created."""
        f, _ = self.locate(i)
        if f in self.fds:
            return False
        t = time.perf_counter()
        flags = os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC
        created = self.strategy != "reused"
        fd = os.open(self.path(f), flags | (os.O_CREAT | os.O_TRUNC if created else 0), 0o644)
        if self.strategy == "fallocate":
            os.posix_fallocate(fd, 0, self.file_bytes(f))
        elif self.strategy == "sparse":
            os.ftruncate(fd, self.file_bytes(f))
        self.fds[f] = fd
        self.prep_s += time.perf_counter() - t
        return created

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def runs(idx: list[int], c: "Case", coalesce: int) -> list[list[int]]:
    """``idx`` cut into runs of at most ``coalesce`` adjacent records of one file."""
    out: list[list[int]] = []
    for i in idx:
        if out and len(out[-1]) < coalesce and out[-1][-1] + 1 == i \
                and c.locate(i)[0] == c.locate(out[-1][0])[0] and c.strategy != "perfile":
            out[-1].append(i)
        else:
            out.append([i])
    return out


def write_case(d: Path, src: memoryview, n: int, args, strategy: str, qd: int, sync: str,
               pool: ThreadPoolExecutor, coalesce: int = 1) -> tuple[float, float]:
    """Timed writes of one case; returns (seconds, seconds spent creating/growing files)."""
    c = Case(d, n, args.file_records, strategy)
    hdrs = [anon(HDR) for _ in range(max(qd, 1) * coalesce)]
    for h in hdrs:
        h[:8] = b"TSNVhdr!"

    def one(run: list[int], k: int) -> int:
        f, off = c.locate(run[0])
        bufs = []
        for j, i in enumerate(run):
            if strategy != "perfile":
                bufs.append(hdrs[(k % qd) * coalesce + j])
            bufs.append(src[i * PAYLOAD:(i + 1) * PAYLOAD])
        want = sum(b.nbytes for b in bufs)
        if os.pwritev(c.fds[f], bufs, off) != want:
            raise OSError("short write")
        if sync == "record":
            os.fdatasync(c.fds[f])
        return f

    t0 = time.perf_counter()
    for b in range(0, n, args.batch):
        idx = list(range(b, min(n, b + args.batch)))
        new = False
        for i in idx:
            new |= c.open_for(i)
        rs = runs(idx, c, coalesce)
        if qd == 1:
            touched = [one(r, 0) for r in rs]
        else:
            touched = list(pool.map(lambda k: one(rs[k], k), range(len(rs))))
        if sync == "batch":
            for f in dict.fromkeys(touched):
                os.fdatasync(c.fds[f])
        if new and sync != "end":
            fsync_dir(d)
        if strategy == "perfile":
            for f in dict.fromkeys(touched):
                os.close(c.fds.pop(f))
    if sync == "end":
        fd = os.open(d, os.O_RDONLY)
        try:
            os.syncfs(fd) if hasattr(os, "syncfs") else os.sync()
        finally:
            os.close(fd)
    dt = time.perf_counter() - t0
    c.close()
    return dt, c.prep_s


def read_case(d: Path, dst: memoryview, n: int, args, strategy: str, qd: int,
              pool: ThreadPoolExecutor, coalesce: int = 1) -> float:
    c = Case(d, n, args.file_records, strategy)
    fds = {}
    for i in range(n):
        f, _ = c.locate(i)
        if f not in fds:
            fds[f] = -1
    hdrs = [anon(HDR) for _ in range(qd * coalesce)]
    rs = runs(list(range(n)), c, coalesce)

    def one(run: list[int], k: int) -> None:
        f, off = c.locate(run[0])
        fd = fds[f]
        own = strategy == "perfile"
        if own:
            fd = os.open(c.path(f), os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        try:
            bufs = []
            for j, i in enumerate(run):
                if not own:
                    bufs.append(hdrs[(k % qd) * coalesce + j])
                bufs.append(dst[i * PAYLOAD:(i + 1) * PAYLOAD])
            if os.preadv(fd, bufs, off) != sum(b.nbytes for b in bufs):
                raise OSError("short read")
        finally:
            if own:
                os.close(fd)

    t0 = time.perf_counter()
    if strategy != "perfile":
        for f in fds:
            fds[f] = os.open(c.path(f), os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        if qd == 1:
            for r in rs:
                one(r, 0)
        else:
            list(pool.map(lambda k: one(rs[k], k), range(len(rs))))
    finally:
        for fd in fds.values():
            if fd >= 0:
                os.close(fd)
    return time.perf_counter() - t0


def raw_write(path: Path, src: memoryview, n: int) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for i in range(n):
            os.pwrite(fd, src[i * PAYLOAD:(i + 1) * PAYLOAD], i * PAYLOAD)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def raw_read(path: Path, dst: memoryview, n: int) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for i in range(n):
            os.preadv(fd, [dst[i * PAYLOAD:(i + 1) * PAYLOAD]], i * PAYLOAD)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def clear(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    os.sync()          # the freed blocks (and discards) settle before the next timed case


def check(dst: memoryview, src: memoryview, what: str) -> None:
    if not np.array_equal(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8)):
        raise SystemExit(f"{what}: bytes read back differ from the bytes written")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/tierstore-disk-paths")
    ap.add_argument("--records", type=int, default=512, help="2 MiB records per case (1 GiB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--qd", default="1,4")
    ap.add_argument("--sync", default="batch,record")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--file-records", type=int, default=64)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--coalesce", default="1",
                    help="records per pwritev/preadv (adjacent records of one file); perfile: 1")
    ap.add_argument("--json", help="also write every repetition's timings here")
    args = ap.parse_args()
    n = args.records
    qds = [int(x) for x in args.qd.split(",")]
    syncs = args.sync.split(",")
    coals = [int(x) for x in args.coalesce.split(",")]
    strategies = args.strategies.split(",")
    root = Path(args.dir)
    nbytes = n * PAYLOAD
    src, dst = anon(nbytes), anon(nbytes)
    fill(src, n)
    dst[:] = src          # pre-fault; zeroed before every read
    pool = ThreadPoolExecutor(max(qds))
    times: dict[str, list[float]] = {}
    prep: dict[str, list[float]] = {}
    loads = []
    dropped = True

    def rec(name: str, dt: float) -> None:
        times.setdefault(name, []).append(dt)

    def zero_dst() -> None:
        np.frombuffer(dst, np.uint8)[:] = 0

    def run_raw() -> None:
        nonlocal dropped
        d = root / "raw"
        clear(d)
        rec("raw_write", raw_write(d / "raw.dat", src, n))
        zero_dst()
        dropped &= drop_caches()
        rec("raw_read", raw_read(d / "raw.dat", dst, n))
        check(dst, src, "raw_read")
        shutil.rmtree(d)

    def run_strategy(s: str, rep: int) -> None:
        nonlocal dropped
        d = root / s
        cs = [1] if s == "perfile" else coals
        cases = [(qd, sy, co) for co in cs for sy in syncs for qd in qds]
        k = rep % len(cases)
        for qd, sy, co in cases[k:] + cases[:k]:
            if s != "reused":
                clear(d)
            else:
                os.sync()
            dt, p = write_case(d, src, n, args, s, qd, sy, pool, co)
            name = f"{s} w qd{qd} {sy}" + (f" c{co}" if co > 1 else "")
            rec(name, dt)
            prep.setdefault(name, []).append(p)
        rcases = [(qd, co) for co in cs for qd in qds]
        k = rep % len(rcases)
        for qd, co in rcases[k:] + rcases[:k]:
            zero_dst()
            dropped &= drop_caches()
            name = f"{s} r qd{qd}" + (f" c{co}" if co > 1 else "")
            rec(name, read_case(d, dst, n, args, s, qd, pool, co))
            check(dst, src, name)
        if s != "reused":
            shutil.rmtree(d)

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t_start = time.time()
    try:
        if "reused" in strategies:       # written once, untimed: every later write overwrites
            clear(root / "reused")
            write_case(root / "reused", src, n, args, "append", 4, "batch", pool)
            os.sync()
        groups = ["raw", *strategies]
        for rep in range(args.reps):
            loads.append(os.getloadavg()[0])
            k = rep % len(groups)
            for g in groups[k:] + groups[:k]:
                run_raw() if g == "raw" else run_strategy(g, rep)
            print(f"rep {rep + 1}/{args.reps} done, {time.time() - t_start:.0f} s, "
                  f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        pool.shutdown()

    gb = nbytes / 1e9
    print(f"# {n} records x (4 KiB header + 2 MiB), {nbytes / 2**30:.2f} GiB per case, "
          f"batch {args.batch}, {args.file_records} records per file, {args.reps} reps, dir {root}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}; load average at rep starts: "
          + " ".join(f"{x:.2f}" for x in loads) + f"; page cache dropped: {dropped}")
    print("# GB/s = 1e9 B/s of payload; ratio = median over reps of case/baseline in the same rep")
    print(f"{'case':<28}{'median':>8}{'min':>8}{'max':>8}{'ratio':>8}  baseline   {'grow s':>7}")
    for name, ts in times.items():
        rates = [gb / t for t in ts]
        base = "raw_read" if (" r " in name or name == "raw_read") else "raw_write"
        if name.startswith("raw"):
            ratio = "-"
        else:
            ratio = f"{statistics.median(gb / t / (gb / b) for t, b in zip(ts, times[base])):.2f}"
        p = prep.get(name)
        ps = f"{statistics.median(p):7.3f}" if p and max(p) > 0.0005 else ""
        print(f"{name:<28}{statistics.median(rates):8.2f}{min(rates):8.2f}{max(rates):8.2f}"
              f"{ratio:>8}  {'' if name.startswith('raw') else base:<10} {ps}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "loads": loads,
                                               "seconds": times, "grow_seconds": prep}, indent=1))


if __name__ == "__main__":
    main()
