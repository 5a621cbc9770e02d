"""Offload / onload throughput of the batched copy engine beside a raw pinned copy (issue 5).

For each shape and KV layout: offload (paged KV on the device -> DRAM slab slots) and onload
(slots -> paged KV) of ``--blocks`` random blocks, timed from submit to completion, next to a raw
copy of the same number of bytes between one contiguous device tensor and the same pinned slab,
measured in the same run (``ratio`` = engine / raw; the acceptance bar is >= 0.95 on an H200).
Every timed configuration is followed by byte checks on random data with poisoned outputs (the
destination is filled with a sentinel first; every destination byte and every untouched byte is
checked) and by a device-allocation count across the timed loop (CUDA only).

Shapes (CUDA defaults): Llama-3-8B (32 layers, 8 KV heads, head 128, block 16, bf16: 2 MiB per
block) and DeepSeek-style MLA (61 layers, 576 elements, block 64, bf16: 4.3 MiB per block), 512
blocks each. On the CPU device the shapes shrink (same table) so the script is smoke-tested in CI.

Imports only torch and tierstore modules without lmdb/zstandard/xxhash (the GPU machine has none).

    python3 benchmarks/bench_copy.py [--device auto|cpu|cuda] [--blocks N] [--iters N]
        [--pool-blocks N] [--chunks 64,512] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from tierstore.io.copy import CopyEngine, KVLayout, PagedKV, slab_tensor  # noqa: E402
from tierstore.tiers.dram import DramTier  # noqa: E402
from tierstore.tiers.pinning import HostPinning, default_registrar, pin_buffer  # noqa: E402

SENTINEL = 0xA5
GB = 1e9

# name, layers, kv heads, block tokens, entry bytes (C * 2 for bf16), per device
SHAPES = {
    "cuda": [("llama3-8b", 32, 8, 16, 2 * 256), ("mla-61L", 61, 1, 64, 2 * 576)],
    "cpu": [("llama-tiny", 8, 2, 16, 2 * 128), ("mla-tiny", 8, 1, 16, 2 * 576)],
}
LAYOUTS = {"llama3-8b": ["LBHNC", "BLHNC"], "mla-61L": ["LBHNC", "BLHNC"],
           "llama-tiny": ["LBHNC", "LBNHC", "BLHNC"], "mla-tiny": ["LBHNC", "BLHNC"]}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_s(fn, dev, iters: int) -> float:
    fn()
    sync(dev)
    ts = []
    for _ in range(iters):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def allocs(dev: torch.device) -> int:
    return torch.cuda.memory_stats(dev)["allocation.all.allocated"] if dev.type == "cuda" else 0


def bench_shape(dev, name, L, H, N, Cb, order, args, rows):
    pool = args.pool_blocks
    n = args.blocks
    lay = KVLayout(L, pool, H, N, Cb, order)
    g = torch.Generator(device=dev).manual_seed(0)
    buf = torch.randint(0, 256, (lay.nbytes,), dtype=torch.uint8, device=dev, generator=g)
    kv = PagedKV.from_buffer(buf, lay)
    bb = kv.block_bytes
    num_slots = n + n // 4
    dram = DramTier(num_slots, bb)
    pinning = HostPinning(default_registrar() if dev.type == "cuda" else None)
    t0 = time.perf_counter()
    pin = pin_buffer(pinning, dram.buffer, dram.capacity_bytes, dram.slot_bytes)
    pin_s = time.perf_counter() - t0
    if dev.type == "cuda" and not pin.pinned:
        print(f"# WARNING: slab not pinned: {pin.error}", file=sys.stderr)
    slab = slab_tensor(dram.buffer, dram.num_slots, dram.slot_bytes)
    nbytes = n * bb

    # raw pinned copy of the same bytes, same slab, same run
    raw_dev = torch.empty(n, dram.slot_bytes, dtype=torch.uint8, device=dev)
    raw_host = slab[:n]
    d2h = median_s(lambda: raw_host.copy_(raw_dev, non_blocking=True), dev, args.iters)
    h2d = median_s(lambda: raw_dev.copy_(raw_host, non_blocking=True), dev, args.iters)
    raw_dev = None  # free before the engine allocates staging

    rng = random.Random(1)
    ids = rng.sample(range(pool), n)
    logical = kv.logical().view(torch.uint8) if kv.wdtype != torch.uint8 else kv.logical()
    idx = torch.tensor(ids, device=dev)
    expected = logical.index_select(1, idx).transpose(0, 1).reshape(n, bb)   # reference, not timed

    for slots_kind in ("consecutive", "scattered"):
        slots = list(range(n)) if slots_kind == "consecutive" else rng.sample(range(num_slots), n)
        for chunk in args.chunks:
            eng = CopyEngine(kv, slab, chunk_blocks=chunk, max_job_blocks=n)

            def offload():
                eng.wait(eng.submit_offload(ids, slots))

            def onload():
                eng.wait(eng.submit_onload(slots, ids))

            a0 = allocs(dev)
            t_off = median_s(offload, dev, args.iters)
            t_on = median_s(onload, dev, args.iters)
            a1 = allocs(dev)
            # byte checks with poisoned outputs
            slab.fill_(SENTINEL)
            offload()
            got = slab[slots].to(dev)
            ok_off = bool(torch.equal(got[:, :bb], expected))
            rest = sorted(set(range(num_slots)) - set(slots))
            ok_off &= bool((slab[rest] == SENTINEL).all()) if rest else True
            logical.fill_(SENTINEL)
            onload()
            got_kv = logical.index_select(1, idx).transpose(0, 1).reshape(n, bb)
            ok_on = bool(torch.equal(got_kv, expected))
            mask = torch.ones(pool, dtype=torch.bool, device=dev)
            mask[idx] = False
            ok_on &= bool((logical[:, mask] == SENTINEL).all())
            # restore the source for the next configuration
            logical.index_copy_(1, idx, expected.view(n, *logical.shape[:1], *logical.shape[2:])
                                .transpose(0, 1))
            copies = eng.stats["copies"]
            eng.close()
            for direction, t, raw in (("offload", t_off, d2h), ("onload", t_on, h2d)):
                rows.append({
                    "shape": name, "layout": order, "slots": slots_kind, "chunk": chunk,
                    "dir": direction, "blocks": n, "block_bytes": bb, "MiB": nbytes / 2**20,
                    "GBps": nbytes / t / GB, "raw_GBps": nbytes / raw / GB, "ratio": raw / t,
                    "bytes_ok": ok_off if direction == "offload" else ok_on,
                    "hot_allocs": a1 - a0, "copies_total": copies, "pin_s": pin_s,
                    "pinned": pin.pinned})
                print_row(rows[-1])
    del slab, expected, logical, kv, buf
    pinning.unpin()
    dram.close()


HEADER = (f"{'shape':<11} {'layout':<6} {'slots':<11} {'chunk':>5} {'dir':<7} {'MiB':>7} "
          f"{'GB/s':>7} {'raw GB/s':>8} {'ratio':>6} {'bytes':>5} {'allocs':>6}")


def print_row(r: dict) -> None:
    print(f"{r['shape']:<11} {r['layout']:<6} {r['slots']:<11} {r['chunk']:>5} {r['dir']:<7} "
          f"{r['MiB']:>7.0f} {r['GBps']:>7.2f} {r['raw_GBps']:>8.2f} {r['ratio']:>6.2f} "
          f"{'ok' if r['bytes_ok'] else 'BAD':>5} {r['hot_allocs']:>6}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--blocks", type=int, default=None, help="blocks per job (cuda 512, cpu 128)")
    ap.add_argument("--pool-blocks", type=int, default=None, help="paged KV blocks (default 2x)")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--chunks", default=None, help="staging chunk sizes in blocks, comma list")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
    args.blocks = args.blocks or (512 if kind == "cuda" else 128)
    args.pool_blocks = args.pool_blocks or 2 * args.blocks
    chunks = args.chunks or f"{64 if kind == 'cuda' else 16},{args.blocks}"
    args.chunks = sorted({int(c) for c in chunks.split(",")})
    gpu = torch.cuda.get_device_name(dev) if kind == "cuda" else platform.processor() or "cpu"
    print(f"# bench_copy {time.strftime('%Y-%m-%d %H:%M:%S')}  device={dev} ({gpu})  "
          f"torch={torch.__version__} cuda={torch.version.cuda}  blocks={args.blocks} "
          f"pool={args.pool_blocks} iters={args.iters}")
    print(HEADER)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for name, L, H, N, Cb in SHAPES[kind]:
        for order in LAYOUTS[name]:
            bench_shape(dev, name, L, H, N, Cb, order, args, rows)
    print(f"# {time.perf_counter() - t0:.1f} s; slab pin time per shape: "
          + ", ".join(sorted({f"{r['shape']}={r['pin_s']:.2f}s" for r in rows})))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(dev), "gpu": gpu, "torch": torch.__version__, "rows": rows},
                      f, indent=1)
    bad = [r for r in rows if not r["bytes_ok"] or r["hot_allocs"]]
    if bad:
        print(f"# FAILED: {len(bad)} rows with wrong bytes or hot-path allocations", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
