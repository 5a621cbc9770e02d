"""Host copy kernel vs torch ``copy_``, side by side in one run (tierstore/io/hostcopy.py).

The copy a store makes on the host: ``n`` KV blocks ``[2, L, T, HD]`` sliced from an engine
buffer ``[2, L, N*T, HD]`` (fp16) into ``n`` consecutive slots of a pre-faulted slab (store), and
back (load). Each case runs both copies alternately, ``--reps`` times; the table gives the GB/s
medians (10^9 B/s) and their ratio. Parts: how many blocks one call copies (the connector copies
a job at a time; the peer_bench adapter 128 blocks).

    python benchmarks/bench_hostcopy.py [--blocks 512] [--parts 512,128,16,4,1] [--reps 7]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tierstore.io import hostcopy  # noqa: E402
from tierstore.io.hostcopy import host_copy_  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024, help="KV heads x head size")
    ap.add_argument("--parts", default="512,128,16,4,1")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args(argv)
    if not hostcopy.available():
        print("the host copy kernel is not built (see README, Packaging): nothing to compare")
        return 1
    N, L, T, HD = a.blocks, a.layers, a.block_tokens, a.hidden
    eng = torch.randn(2, L, N * T, HD).to(torch.float16)
    back = torch.zeros_like(eng)
    block = 2 * L * T * HD * 2
    mm = mmap.mmap(-1, block * N)
    slab = torch.frombuffer(mm, dtype=torch.uint8)
    slab.fill_(0)    # pre-fault, outside the timing
    slots = slab.view(torch.float16).view(N, 2, L, T, HD)
    src = torch.as_strided(eng, (N, 2, L, T, HD), (T * HD, *eng.stride()))
    dst = torch.as_strided(back, (N, 2, L, T, HD), (T * HD, *back.stride()))
    total = block * N
    la = os.getloadavg()
    print(f"bench_hostcopy  {time.strftime('%Y-%m-%d %H:%M')}  {N} blocks x {block / 2**20:.2f} MiB"
          f" = {total / 2**30:.2f} GiB, torch threads {torch.get_num_threads()}, "
          f"load {la[0]:.1f} {la[1]:.1f}")
    print(f"{'part (blocks)':>14} {'store torch':>12} {'store host':>11} {'ratio':>6}"
          f" {'load torch':>11} {'load host':>10} {'ratio':>6}")

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return total / (time.perf_counter() - t0) / 1e9

    for part in [int(x) for x in a.parts.split(",")]:
        cuts = range(0, N, part)
        cases = {
            "store torch": lambda: [slots[c:c + part].copy_(src[c:c + part]) for c in cuts],
            "store host": lambda: [host_copy_(slots[c:c + part], src[c:c + part]) for c in cuts],
            "load torch": lambda: [dst[c:c + part].copy_(slots[c:c + part]) for c in cuts],
            "load host": lambda: [host_copy_(dst[c:c + part], slots[c:c + part]) for c in cuts],
        }
        got = {k: [] for k in cases}
        for r in range(a.reps):
            order = list(cases)[r % 2::] + list(cases)[:r % 2]   # alternate who goes first
            for k in order:
                got[k].append(timed(cases[k]))
        if not torch.equal(back, eng):
            print("FAILED: the loaded bytes differ from the engine buffer")
            return 1
        m = {k: statistics.median(v) for k, v in got.items()}
        print(f"{part:>14} {m['store torch']:>12.2f} {m['store host']:>11.2f} "
              f"{m['store host'] / m['store torch']:>6.2f} {m['load torch']:>11.2f} "
              f"{m['load host']:>10.2f} {m['load host'] / m['load torch']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
