"""Lookup from tokens of one long prompt (issue 12, item 5), side by side in one run.

A 131,072-token prompt, block size 16 (8,192 blocks), whose whole prefix an embedded store holds
(DRAM, payload-less slots: only the index matters here). Timed, in rounds that rotate the order
of the cases so they share the machine's noise:

    hash      Keyer.chain(tokens)                          tierstore's own keys (today's code)
    hash      Keyer.chain(tokens), before (--baseline-rev)  the same keys from keys.py at that rev
    hash      Keyer.chain_from_engine_hashes(vLLM hashes)  keys over vLLM's sha256 block hashes
    hash      per-block floor                              8,192 x (copy, 2 updates, digest) of
                                                           ready-made bytes: what hashlib costs
    first     chain(tokens) + Client.lookup(keys)          a scheduler's first lookup of a request
    first     engine keys + Client.lookup(keys)            the same from vLLM's block hashes
    repeated  Client.lookup(kept keys)                     the keys kept with the request
    repeated  the same with index/prefix.py at --baseline-rev
    repeated  Client.lookup(kept keys, pin=True) + unpin   what a pinning scheduler pays today
    peer      LMCache 0.5.6 engine.lookup(tokens tensor)   16-token chunks (as tierstore) and its
                                                           default 256-token chunks; it hashes the
                                                           tokens inside every lookup
    engine    vLLM's own block hashing (sha256 of pickle)  paid by the engine when the request
                                                           arrives, with or without tierstore

The vLLM block hashes are rebuilt with hashlib and pickle exactly as vLLM 0.33 computes them for a
request without extra keys (shared/docs/VLLM.md §3; checked against its test vector), once,
untimed, except in the "engine" row.

Usage (LMCache rows need lmcache importable; its own venv, ../shared/tools/peer_bench/README.md):

    python benchmarks/bench_lookup.py [--tokens 131072] [--rounds 20] [--per 5]
    PYTHONPATH=. /tmp/lmc_venv/bin/python benchmarks/bench_lookup.py   # with the LMCache rows

Prints a table (p50/p90/p99 in ms) and the ratios; progress goes to stderr. Results go to
docs/benchmarks.md by hand with the date, machine and load average.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import random
import statistics
import subprocess
import sys
import time
import types
from typing import Callable

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from tierstore.client import Client  # noqa: E402
from tierstore.config import DramConfig, StoreConfig  # noqa: E402
from tierstore.keys import KEY_BYTES, Keyer, Namespace  # noqa: E402

VOCAB = 128_000


def vllm_block_hashes(tokens: list[int], block_size: int) -> list[bytes]:
    """vLLM's default (``sha256``) block hashes of a request without extra keys: sha256 of the
    pickled ``(parent, tuple(block_tokens), None)``, chained from ``NONE_HASH``."""
    prev = hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=pickle.HIGHEST_PROTOCOL)).digest()
    out = []
    for i in range(0, len(tokens) // block_size * block_size, block_size):
        prev = hashlib.sha256(pickle.dumps((prev, tuple(tokens[i:i + block_size]), None),
                                           protocol=pickle.HIGHEST_PROTOCOL)).digest()
        out.append(prev)
    return out


def module_at(rev: str, path: str, name: str) -> types.ModuleType | None:
    """``path`` of this repository as it was at ``rev``, imported as module ``name`` (None when
    git or the revision is not there)."""
    try:
        src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{path}"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType(name)
    sys.modules[name] = mod            # dataclasses look their module up while the class is made
    exec(compile(src, f"{rev}:{path}", "exec"), mod.__dict__)
    return mod


def lmcache_instances(tokens: list[int], chunk_sizes: list[int], peer_dir: str):
    """One LMCache engine per chunk size, each holding every chunk of ``tokens`` (tiny KV: 1 layer,
    1 head, head_dim 8), through the peer_bench adapter. Returns [(chunk_tokens, adapter,
    tokens tensor)], or [] with a note on stderr when LMCache cannot be imported."""
    try:
        import torch
        import lmcache  # noqa: F401
    except ImportError as e:
        print(f"LMCache rows skipped ({e}); run this script with LMCache's venv python",
              file=sys.stderr)
        return []
    sys.path.insert(0, peer_dir)
    from adapters import KVLayout, LMCacheAdapter, TierConfig
    out = []
    t = torch.tensor(tokens, dtype=torch.long)
    for ct in chunk_sizes:
        n = len(tokens) // ct
        layout = KVLayout(1, 1, 8, ct, torch.float16)
        src = torch.randn(2, 1, n * ct, 8).to(torch.float16)
        chunks = [src[:, :, i * ct:(i + 1) * ct] for i in range(n)]
        mem = 4 * n * layout.chunk_bytes + (64 << 20)
        a = LMCacheAdapter(layout, TierConfig(mem), f"bench-lookup-{ct}")
        t0 = time.perf_counter()
        a.engine.store(t[:n * ct], chunks=chunks)
        print(f"LMCache ({ct}-token chunks) stored {n} chunks in {time.perf_counter() - t0:.2f} s",
              file=sys.stderr, flush=True)
        assert a.engine.lookup(t) == n * ct, a.engine.lookup(t)
        out.append((ct, a, t))
    return out


def per_block_floor(keyer: Keyer, tails: list[bytes]) -> Callable[[], None]:
    """The least a Python loop over hashlib's BLAKE2b can cost for a 144-byte block message:
    one state copy, two updates (32-byte parent, 112-byte rest), one digest, nothing else."""
    proto = keyer._child
    prev = b"\0" * KEY_BYTES

    def run() -> None:
        copy = proto.copy
        for t in tails:
            h = copy()
            h.update(prev)
            h.update(t)
            h.digest()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131_072)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per", type=int, default=5, help="calls of each case per round")
    ap.add_argument("--baseline-rev", default="c543681",
                    help="git revision for the 'before' rows (keys.py, index/prefix.py); '' = none")
    ap.add_argument("--peer-bench", default=os.path.join(ROOT, "..", "shared", "tools", "peer_bench"))
    ap.add_argument("--lmcache-chunks", default="16,256", help="LMCache chunk sizes; '' = no LMCache")
    ap.add_argument("--json", help="write every sample and the summary here")
    a = ap.parse_args()

    bs = a.block_size
    n = a.tokens // bs
    rng = random.Random(0)
    tokens = [rng.randrange(VOCAB) for _ in range(n * bs)]
    load0 = os.getloadavg()
    print(f"# bench_lookup {time.strftime('%Y-%m-%d %H:%M')}  {a.tokens:,} tokens = {n:,} blocks of "
          f"{bs}  python {platform.python_version()}  cpus {os.cpu_count()}  loadavg {load0[0]:.2f}",
          flush=True)

    ns = Namespace("bench-lookup", bs)
    client = Client.embedded(config=StoreConfig(
        slot_bytes=4096, dram=DramConfig(capacity_blocks=2 * n, payload=False)), secret=b"b" * 32)
    keyer = client.keyer(ns)
    keys = keyer.chain(tokens)
    ehashes = vllm_block_hashes(tokens, bs)
    ekeys = keyer.chain_from_engine_hashes(ehashes, "sha256")
    for ks in (keys, ekeys):
        for i in range(0, n, 1024):
            job = client.prepare_store(ks[i:i + 1024], ns, 4096)
            client.complete_store(job.job_id)
    assert client.lookup(keys, ns).num_blocks == n and client.lookup(ekeys, ns).num_blocks == n

    cases: dict[str, Callable[[], object]] = {}
    cases["hash: chain(tokens)"] = lambda: keyer.chain(tokens)
    old_keys = module_at(a.baseline_rev, "tierstore/keys.py", "bench_keys_before") if a.baseline_rev else None
    if old_keys is not None:
        old_keyer = old_keys.Keyer(old_keys.Namespace("bench-lookup", bs), b"b" * 32)
        assert old_keyer.chain(tokens) == keys, "keys changed since the baseline revision"
        cases[f"hash: chain(tokens), before ({a.baseline_rev})"] = lambda: old_keyer.chain(tokens)
    cases["hash: engine keys (vLLM sha256 hashes)"] = lambda: keyer.chain_from_engine_hashes(ehashes, "sha256")
    head, x = b"\x03tok" + (bs * 4).to_bytes(4, "little"), b"\x01x" + bytes(4)
    raw = b"".join(t.to_bytes(4, "little") for t in tokens)
    cases["hash: per-block floor (copy+2 updates+digest)"] = per_block_floor(
        keyer, [head + raw[o:o + bs * 4] + x for o in range(0, n * bs * 4, bs * 4)])
    cases["first lookup: chain(tokens) + lookup"] = lambda: client.lookup(keyer.chain(tokens), ns)
    cases["first lookup: engine keys + lookup"] = lambda: client.lookup(
        keyer.chain_from_engine_hashes(ehashes, "sha256"), ns)
    cases["repeated lookup: lookup(kept keys)"] = lambda: client.lookup(keys, ns)
    cases["repeated lookup: lookup(kept keys, pin=True) + unpin"] = lambda: client.unpin(
        client.lookup(keys, ns, pin=True).keys)
    old_prefix = module_at(a.baseline_rev, "tierstore/index/prefix.py", "bench_prefix_before") \
        if a.baseline_rev else None
    if old_prefix is not None:
        import tierstore.store as store_mod
        new_lpt = store_mod.longest_prefix_tiers

        def lookup_before():
            store_mod.longest_prefix_tiers = old_prefix.longest_prefix_tiers
            try:
                return client.lookup(keys, ns)
            finally:
                store_mod.longest_prefix_tiers = new_lpt
        assert lookup_before().num_blocks == n
        cases[f"repeated lookup: lookup(kept keys), prefix.py before ({a.baseline_rev})"] = lookup_before
    chunk_sizes = [int(c) for c in a.lmcache_chunks.split(",") if c]
    lmcs = lmcache_instances(tokens, chunk_sizes, a.peer_bench) if chunk_sizes else []
    for ct, adapter, t in lmcs:
        cases[f"LMCache lookup(tokens), {ct}-token chunks"] = (lambda e, t: lambda: e.lookup(t))(adapter.engine, t)
    cases["engine: vLLM's own block hashing (reference)"] = lambda: vllm_block_hashes(tokens, bs)

    times: dict[str, list[float]] = {c: [] for c in cases}
    for f in cases.values():   # warm-up, untimed
        f()
    names = list(cases)
    t_start = time.perf_counter()
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            f = cases[name]
            for _ in range(a.per):
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{a.rounds}  {time.perf_counter() - t_start:.1f} s  "
              f"loadavg {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()

    def pct(name: str, q: float) -> float:
        s = sorted(times[name])
        return s[min(len(s) - 1, int(len(s) * q))] * 1e3

    p50 = {c: statistics.median(times[c]) * 1e3 for c in cases}
    print(f"\n{a.rounds} rounds x {a.per} calls per case; loadavg {load0[0]:.2f} at start, "
          f"{load1[0]:.2f} at end (1-min), {load1[1]:.2f} (5-min)")
    print(f"{'case':<66}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'us/block':>10}")
    for c in names:
        blocks = n
        if c.startswith("LMCache"):
            blocks = a.tokens // int(c.split(", ")[1].split("-")[0])
        print(f"{c:<66}{p50[c]:9.3f}{pct(c, 0.9):9.3f}{pct(c, 0.99):9.3f}{p50[c] / blocks * 1e3:10.3f}")

    def ratio(num: str, den: str) -> None:
        if num in p50 and den in p50:
            print(f"  {num}  /  {den}  =  {p50[num] / p50[den]:.2f}x")
    print("\nratios of p50:")
    before = f"hash: chain(tokens), before ({a.baseline_rev})"
    ratio(before, "hash: chain(tokens)")
    ratio("hash: chain(tokens)", "hash: engine keys (vLLM sha256 hashes)")
    ratio("hash: chain(tokens)", "hash: per-block floor (copy+2 updates+digest)")
    ratio(f"repeated lookup: lookup(kept keys), prefix.py before ({a.baseline_rev})",
          "repeated lookup: lookup(kept keys)")
    for ct in chunk_sizes:
        lm = f"LMCache lookup(tokens), {ct}-token chunks"
        for ts in ("first lookup: chain(tokens) + lookup", "first lookup: engine keys + lookup",
                   "repeated lookup: lookup(kept keys)"):
            ratio(lm, ts)
    print("\nacceptance (issue 12): first lookup from tokens p50 <= 5 ms: "
          f"chain {p50['first lookup: chain(tokens) + lookup']:.2f} ms, "
          f"engine keys {p50['first lookup: engine keys + lookup']:.2f} ms; "
          f"repeated lookup <= 1 ms: {p50['repeated lookup: lookup(kept keys)']:.2f} ms")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "tokens": a.tokens, "block_size": bs,
                       "loadavg_start": load0, "loadavg_end": load1, "p50_ms": p50,
                       "samples_s": times}, fh, indent=1)
    for _, adapter, _ in lmcs:
        adapter.close()
    client.close()


if __name__ == "__main__":
    main()
