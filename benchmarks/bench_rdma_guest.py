"""RDMA READ (Soft-RoCE) against TCP for the same transfer, in the same guest (issue 8).

Node A (its own process, tools/softroce/guest/nodes.py) holds ``--blocks`` blocks and offers
both transports; node B pulls the whole chain ``--reps`` times over each, into a fresh store
every time, and the median fetch time per transport is reported with ``ratio`` = RDMA
throughput / TCP throughput. rxe is the kernel's software RoCE (under qemu TCG, too): the point
of the number is that the one-sided path works end to end with no per-block round trip through
the peer's process, not its speed; real NICs are another matter.

Runs inside the Soft-RoCE guest (it needs an RDMA device):

    python tools/softroce/softroce.py run --mode bench          # from the host
    python3 benchmarks/bench_rdma_guest.py [--device rxe0] [--blocks 1000] [--slot-bytes 65536]
        [--reps 3] [--json PATH]                                 # inside the guest
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "softroce", "guest"))
sys.path.insert(0, ROOT)
import nodes  # noqa: E402


def run_one(device: str, a, transport: str, n: int, slot: int) -> float:
    store, b = nodes.client(device, n, slot, transports=(transport,), timeout_s=30.0)
    try:
        keys = nodes.keys_for(n)
        t0 = time.perf_counter()
        got = b.fetch(a.address, keys, nodes.NS)
        dt = time.perf_counter() - t0
        if got != n:
            raise SystemExit(f"{transport}: fetched {got} of {n} blocks")
        (st,) = b.stats()
        if st["transport"] != transport:
            raise SystemExit(f"asked for {transport}, the session used {st['transport']}")
        sample = [0, n // 2, n - 1]
        data = store.get([keys[i] for i in sample])
        if data != [nodes.block(keys[i], i, slot) for i in sample]:
            raise SystemExit(f"{transport}: bytes differ")
        return dt
    finally:
        b.close()
        store.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=os.environ.get("TIERSTORE_RDMA_DEVICE", "rxe0"))
    ap.add_argument("--blocks", type=int, default=1000)
    ap.add_argument("--slot-bytes", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    n, slot = a.blocks, a.slot_bytes
    node_a = nodes.NodeA(a.device, n, slot, transports=("rdma", "tcp"), timeout_s=30.0)
    res: dict = {"device": a.device, "blocks": n, "slot_bytes": slot, "reps": a.reps,
                 "host": platform.node(), "kernel": platform.release(), "runs_s": {}}
    try:
        for t in ("rdma", "tcp"):
            run_one(a.device, node_a, t, min(n, 50), slot)   # warm-up: connect, page faults
        for _ in range(a.reps):
            for t in ("rdma", "tcp"):
                res["runs_s"].setdefault(t, []).append(run_one(a.device, node_a, t, n, slot))
    finally:
        node_a.stop()
    total = n * slot
    print(f"{n} blocks x {slot} B = {total / 2**20:.1f} MiB, median of {a.reps}, "
          f"device {a.device} (kernel {res['kernel']})")
    print(f"{'transport':10} {'median_s':>9} {'MiB/s':>9} {'blocks/s':>9}")
    for t in ("rdma", "tcp"):
        med = statistics.median(res["runs_s"][t])
        res[t] = {"median_s": round(med, 4), "mib_s": round(total / med / 2**20, 1),
                  "blocks_s": round(n / med)}
        print(f"{t:10} {med:9.3f} {res[t]['mib_s']:9.1f} {res[t]['blocks_s']:9d}")
    res["ratio_rdma_over_tcp"] = round(res["rdma"]["mib_s"] / res["tcp"]["mib_s"], 3)
    print(f"ratio rdma/tcp throughput: {res['ratio_rdma_over_tcp']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
