"""Core store benchmarks, measured side by side in one run (issue 2 acceptance).

1. DRAM tier put+get of 2 MiB blocks through the two-phase API (prepare_store, copy into the
   slot, complete_store; prepare_load, copy out of the slot into a preallocated buffer,
   complete_load) against a plain memcpy of the same bytes (slab-sized buffer in, then out).
2. Prefix lookup of an 8,192-block chain (p50, p99 in ms).
3. Index memory per resident block at 1 M blocks (residency map; the LRU policy reported apart).
4. Lookup latency of one thread while another loads NVMe-only chains (promotion + demotion I/O),
   beside the same lookups on an idle store: what a scheduler's lookup waits behind a cold load
   (the store releases its lock during NVMe reads and writes, tierstore/moves.py).

Usage: python benchmarks/bench_store.py [--blocks 256] [--batch 32] [--rounds 5]
Prints a table; results go to docs/benchmarks.md by hand with the date and machine.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tierstore.config import DramConfig, NvmeConfig, StoreConfig  # noqa: E402
from tierstore.index.residency import Residency  # noqa: E402
from tierstore.keys import Keyer, Namespace  # noqa: E402
from tierstore.policy.lru import LRU  # noqa: E402
from tierstore.store import Store  # noqa: E402
from tierstore.tiers.dram import DramTier  # noqa: E402
from tierstore.types import Tier  # noqa: E402

MiB = 1 << 20


def bench_dram(num_blocks: int, batch: int, rounds: int) -> tuple[float, float]:
    """Returns (store GB/s, memcpy GB/s) for put+get of num_blocks 2 MiB blocks."""
    bs = 2 * MiB
    ns = Namespace("bench", 16, num_layers=32, num_kv_heads=8, head_size=128)
    store = Store.open(StoreConfig(slot_bytes=bs, dram=DramConfig(capacity_blocks=num_blocks)))
    keyer = Keyer(ns, b"b" * 32)
    src = DramTier(batch, bs)           # producer buffers (like paged KV staging)
    dst = DramTier(batch, bs)
    for i in range(batch):
        src.view(i)[:] = os.urandom(16) * (bs // 16)
    plain = DramTier(num_blocks, bs)    # the memcpy baseline's own slab
    t_store, t_copy = [], []

    def baseline(chains) -> float:
        t0 = time.perf_counter()
        for c, _ in enumerate(chains):
            for j in range(batch):
                plain.view(c * batch + j)[:] = src.view(j)
            for j in range(batch):
                dst.view(j)[:] = plain.view(c * batch + j)
        return time.perf_counter() - t0

    def through_store(chains) -> float:
        t0 = time.perf_counter()
        for keys in chains:
            job = store.prepare_store(keys, ns, bs)
            for j, s in enumerate(job.slots):
                store.slot_view(s)[:] = src.view(j)
            store.complete_store(job.job_id)
            lj = store.prepare_load(keys)
            for j, s in enumerate(lj.slots):
                dst.view(j)[:] = store.slot_view(s)
            store.complete_load(lj.job_id)
        return time.perf_counter() - t0

    for r in range(rounds + 1):
        chains = [keyer.chain(list(range((r * num_blocks + i) * 16, (r * num_blocks + i + batch) * 16)))
                  for i in range(0, num_blocks, batch)]
        # alternate which side goes first, so neither always runs on the other's warm caches
        if r % 2:
            tc, ts = baseline(chains), through_store(chains)
        else:
            ts, tc = through_store(chains), baseline(chains)
        assert bytes(dst.view(batch - 1)[:64]) == bytes(src.view(batch - 1)[:64])
        if r:   # round 0 warms both slabs (first use of every slot), untimed
            t_copy.append(tc)
            t_store.append(ts)
    moved = 2 * num_blocks * bs
    store.close()
    return moved / statistics.median(t_store) / 1e9, moved / statistics.median(t_copy) / 1e9


def bench_lookup(chain_blocks: int = 8192, reps: int = 200) -> tuple[float, float]:
    ns = Namespace("bench", 16)
    store = Store.open(StoreConfig(slot_bytes=4096, dram=DramConfig(capacity_blocks=chain_blocks, payload=False)))
    keys = Keyer(ns, b"b" * 32).chain(list(range(chain_blocks * 16)))
    for i in range(0, chain_blocks, 1024):
        job = store.prepare_store(keys[i:i + 1024], ns, 4096)
        store.complete_store(job.job_id)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = store.lookup(keys, ns)
        times.append(time.perf_counter() - t0)
    assert r.num_blocks == chain_blocks
    times.sort()
    return times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3


def bench_index_memory(n: int = 1_000_000) -> tuple[float, float]:
    keys = [os.urandom(32) for _ in range(n)]      # keys exist before the index (caller-owned)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    res = Residency()
    for i, k in enumerate(keys):
        h = res.add(k, 0, 2 * MiB, 0)
        res.set_slot(h, Tier.DRAM, i)
    idx = tracemalloc.get_traced_memory()[0] - base
    pol = LRU(n)
    for k in keys:
        pol.insert(k, 2 * MiB)
    total = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    # the key bytes objects are shared with the caller; count them once as index memory
    key_bytes = sys.getsizeof(keys[0])
    return (idx / n + key_bytes), (total - idx) / n


def bench_lookup_during_promotion(reps: int = 400, loaders: int = 1
                                  ) -> tuple[tuple[float, float], tuple[float, float], float]:
    """((idle p50, p99), (busy p50, p99)) in ms of an 8-block lookup, and the loads' median ms.

    Store: 64 DRAM slots + 2,048 NVMe slots of 512 KiB (data dir under the working directory,
    removed after); 48 chains of 32 blocks stored, so most live on NVMe only. ``loaders`` threads
    load random chains back to back (each load promotes up to 32 blocks and demotes as many)."""
    sb = 512 * 1024
    d = tempfile.mkdtemp(prefix="bench-contention-", dir=".")
    store = Store.open(StoreConfig(slot_bytes=sb, dram=DramConfig(capacity_blocks=64),
                                   nvme=NvmeConfig(path=d, capacity_blocks=2048)))
    try:
        ns = Namespace("bench", 16)
        keyer = Keyer(ns, b"b" * 32)
        payload = os.urandom(sb)
        chains = [keyer.chain_from_block_ids([c * 1000 + i for i in range(32)]) for c in range(48)]
        for keys in chains:
            job = store.prepare_store(keys, ns, sb)
            for s in job.slots:
                if s is not None:
                    store.slot_view(s)[:sb] = payload
            store.complete_store(job.job_id)
        probe = chains[0][:8]

        def lookups() -> tuple[float, float]:
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                store.lookup(probe, ns)
                ts.append(time.perf_counter() - t0)
                time.sleep(0.002)
            ts.sort()
            return ts[len(ts) // 2] * 1e3, ts[int(len(ts) * 0.99)] * 1e3

        idle = lookups()
        stop = threading.Event()
        load_ms: list[float] = []

        def loader(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                t0 = time.perf_counter()
                job = store.prepare_load(rng.choice(chains[1:]))
                store.complete_load(job.job_id)
                load_ms.append((time.perf_counter() - t0) * 1e3)

        threads = [threading.Thread(target=loader, args=(i,), daemon=True) for i in range(loaders)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        busy = lookups()
        stop.set()
        for t in threads:
            t.join()
        return idle, busy, statistics.median(load_ms)
    finally:
        store.close()
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=256, help="2 MiB blocks per round (default 256 = 512 MiB)")
    ap.add_argument("--batch", type=int, default=32, help="blocks per request")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--index-blocks", type=int, default=1_000_000)
    a = ap.parse_args()
    print(f"# tierstore core benchmarks  python {sys.version.split()[0]}  cpus {os.cpu_count()}", flush=True)
    s, c = bench_dram(a.blocks, a.batch, a.rounds)
    print(f"| DRAM put+get, 2 MiB blocks, batch {a.batch} | store {s:.2f} GB/s | memcpy {c:.2f} GB/s | ratio {s / c:.3f} |", flush=True)
    p50, p99 = bench_lookup()
    print(f"| prefix lookup, 8,192-block chain | p50 {p50:.3f} ms | p99 {p99:.3f} ms | goal p50 < 1 ms |", flush=True)
    idx, pol = bench_index_memory(a.index_blocks)
    print(f"| index memory per resident block at {a.index_blocks:,} blocks | {idx:.0f} B | LRU policy +{pol:.0f} B | goal <= 200 B |", flush=True)
    for loaders in (1, 2):
        (i50, i99), (b50, b99), load = bench_lookup_during_promotion(loaders=loaders)
        print(f"| 8-block lookup while {loaders} thread(s) load from NVMe ({load:.1f} ms per 32-block "
              f"load) | p50 {b50:.2f} ms, p99 {b99:.2f} ms | idle p50 {i50:.3f} ms, p99 {i99:.3f} ms "
              f"| busy/idle p99 {b99 / i99:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
