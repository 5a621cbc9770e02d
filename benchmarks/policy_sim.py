"""Offline policy harness: replay a Mooncake-format trace against eviction policies, no store.

By default (``--order store``) every policy is driven with exactly the calls, in exactly the
order, that ``tierstore replay --payload none`` makes through the real Store (tierstore/store.py:
lookup, prepare_load, prepare_store/mover.make_room/mover.alloc in tierstore/moves.py,
complete_store), so its hit ratios equal the real replay's::

    for each request (hash_ids = 512-token prefix blocks, in order):
        n = number of leading blocks already resident            (lookup: no policy call)
        hit += n
        access(b) for b in h[:n]                                   (prepare_load)
        rest = h[n:]; need = #(rest not resident)                 (prepare_store)
        if need > free slots: evict (need - free) victims in ONE batch: victim(all); remove(v)
        per key of rest: resident -> PRESENT; else a slot (free, or _alloc evicts one more)
        per key of rest, in chain order: OK -> insert(b, size, prev); PRESENT -> access(b)
                                                                   (complete_store)
    block_hit_ratio = hit / total blocks

``--order interleaved`` keeps the reference simulator's per-block order (touch, or evict while
full then insert, block by block); LRU gives the same numbers both ways, other policies do not.

Reference rows: ``belady`` (offline optimum: evict the block whose next use is farthest; a block
is inserted first and the farthest is evicted afterwards, as in the reference simulator) and
``infinite`` (no eviction). Usage::

    python3 benchmarks/policy_sim.py [--trace PATH | --synthetic N] [--policies lru,s3fifo,...]
        [--capacity 1M,3M,10M,30M] [--seed 0] [--order store|interleaved] [--format table|json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tierstore.policy import EVICTION, make_eviction  # noqa: E402

BLOCK_TOKENS = 512  # Mooncake hash_ids are per 512-token block
BLOCK_BYTES = 1 << 20  # nominal block size; uniform, so byte-weighted policies see equal weights
DEFAULT_TRACE = "/work/shared/data/mooncake_conversation_trace.jsonl"


def load_trace(path: str) -> list[list]:
    with open(path) as f:
        return [json.loads(line)["hash_ids"] for line in f if line.strip()]


def parse_tokens(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def simulate(reqs: list[list], policy, capacity_blocks: int, order: str = "store") -> dict:
    """Replay ``reqs`` against ``policy``; return hit ratio, op count and seconds spent."""
    if order == "interleaved":
        return _simulate_interleaved(reqs, policy, capacity_blocks)
    if order != "store":
        raise ValueError(f"unknown order {order!r}")
    resident: set = set()
    everything = lambda _k: True  # noqa: E731 - nothing is pinned between requests
    access, insert, victim, remove = policy.access, policy.insert, policy.victim, policy.remove
    hit = total = ops = 0
    t0 = time.perf_counter()
    for h in reqs:
        nk = len(h)
        n = 0
        while n < nk and h[n] in resident:  # lookup: longest resident prefix
            n += 1
        hit += n
        total += nk
        for b in h[:n]:  # prepare_load: hit blocks touched in order
            access(b)
        ops += n
        if n == nk:
            continue
        rest = h[n:]
        # prepare_store: one eviction batch for the shortfall, before any new block is inserted
        need = sum(1 for b in rest if b not in resident)
        short = need - (capacity_blocks - len(resident))
        for _ in range(short):
            v = victim(everything)
            if v is None:
                break
            remove(v)
            resident.discard(v)
            ops += 2
        status = []  # True: OK (new slot), False: PRESENT, None: SKIPPED
        pending: set = set()
        for b in rest:
            if b in resident or b in pending:
                status.append(False)
                continue
            if len(resident) + len(pending) >= capacity_blocks:  # _alloc: evict one more
                v = victim(everything)
                ops += 1
                if v is None:
                    status.append(None)
                    continue
                remove(v)
                resident.discard(v)
                ops += 1
            pending.add(b)
            status.append(True)
        # complete_store: chain order, insert new blocks, touch already-present ones
        prev = h[n - 1] if n else None
        for b, st in zip(rest, status):
            if st:
                insert(b, BLOCK_BYTES, prev)
                resident.add(b)
                ops += 1
            elif st is False and b in resident:
                access(b)
                ops += 1
            prev = b
    dt = time.perf_counter() - t0
    return {"block_hit_ratio": hit / total, "ops": ops, "seconds": dt, "us_per_op": dt / max(ops, 1) * 1e6}


def _hit_prefix(h: list, held: set) -> int:
    """How many leading blocks of request ``h`` are in ``held`` (a prefix hit)."""
    k = 0
    for b in h:
        if b not in held:
            break
        k += 1
    return k


def _simulate_interleaved(reqs: list[list], policy, capacity_blocks: int) -> dict:
    """The reference simulator's order: per block, touch it or (evict while full; insert)."""
    resident: set = set()
    everything = lambda _k: True  # noqa: E731
    hit = total = ops = 0
    t0 = time.perf_counter()
    for h in reqs:
        hit += _hit_prefix(h, resident)
        total += len(h)
        parent = None
        for b in h:
            if b in resident:
                policy.access(b)
                ops += 1
            else:
                while len(resident) >= capacity_blocks:
                    v = policy.victim(everything)
                    policy.remove(v)
                    resident.discard(v)
                    ops += 2
                policy.insert(b, BLOCK_BYTES, parent)
                resident.add(b)
                ops += 1
            parent = b
    dt = time.perf_counter() - t0
    return {"block_hit_ratio": hit / total, "ops": ops, "seconds": dt, "us_per_op": dt / max(ops, 1) * 1e6}


def _as_requests(reqs: list[list]):
    from tierstore.sim.replay import BLOCK_TOKENS, TraceRequest
    return [TraceRequest(0, len(h) * BLOCK_TOKENS, 0, tuple(h)) for h in reqs]


def belady(reqs: list[list], capacity_blocks: int) -> float:
    """Offline optimum: the one implementation in tierstore/sim/sweep.py (the replay's reference row)."""
    from tierstore.sim.sweep import belady as _belady
    return _belady(_as_requests(reqs), capacity_blocks)["block_hit_ratio"]


def infinite(reqs: list[list]) -> float:
    from tierstore.sim.sweep import infinite as _infinite
    return _infinite(_as_requests(reqs))["block_hit_ratio"]


def run(reqs, policies, capacities_tokens, refs=True, order="store") -> list[dict]:
    rows = []
    for name in policies:
        for tok in capacities_tokens:
            cap = tok // BLOCK_TOKENS
            r = simulate(reqs, make_eviction(name, cap), cap, order)
            rows.append({"policy": name, "capacity_tokens": tok, "capacity_blocks": cap, **r})
    if refs:
        inf = infinite(reqs)
        for tok in capacities_tokens:
            cap = tok // BLOCK_TOKENS
            rows.append({"policy": "belady", "capacity_tokens": tok, "capacity_blocks": cap,
                         "block_hit_ratio": belady(reqs, cap)})
            rows.append({"policy": "infinite", "capacity_tokens": tok, "capacity_blocks": cap,
                         "block_hit_ratio": inf})
    return rows


def _fmt_tokens(tok: int) -> str:
    return f"{tok / 1e6:g}M"


def table(rows: list[dict], capacities_tokens: list[int]) -> str:
    names = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["policy"], r["capacity_tokens"]): r for r in rows}
    head = "| policy | " + " | ".join(_fmt_tokens(t) for t in capacities_tokens) + " | µs/op |"
    out = [head, "|" + "---|" * (len(capacities_tokens) + 2)]
    for n in names:
        cells = [f"{by[(n, t)]['block_hit_ratio']:.4f}" for t in capacities_tokens]
        us = [by[(n, t)]["us_per_op"] for t in capacities_tokens if "us_per_op" in by[(n, t)]]
        out.append(f"| {n} | " + " | ".join(cells) + f" | {max(us):.2f} |" if us else f"| {n} | " + " | ".join(cells) + " | - |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--trace", default=None, help="Mooncake-format JSONL (default: the conversation trace)")
    src.add_argument("--synthetic", type=int, default=None, metavar="N",
                     help="use tierstore.sim.workload.generate_trace(N, seed) instead of a file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default=",".join(EVICTION))
    ap.add_argument("--capacity", default="1M,3M,10M,30M")
    ap.add_argument("--no-refs", action="store_true", help="skip the belady / infinite rows")
    ap.add_argument("--order", choices=["store", "interleaved"], default="store",
                    help="store: the real Store's call order (default); interleaved: per block")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    a = ap.parse_args(argv)
    if a.synthetic is not None:
        from tierstore.sim.workload import generate_trace
        reqs = [r["hash_ids"] for r in generate_trace(a.synthetic, seed=a.seed)]
    else:
        reqs = load_trace(a.trace or DEFAULT_TRACE)
    caps = [parse_tokens(c) for c in a.capacity.split(",")]
    rows = run(reqs, [p.strip() for p in a.policies.split(",")], caps, refs=not a.no_refs, order=a.order)
    if a.format == "json":
        print(json.dumps(rows, indent=1))
    else:
        print(f"{len(reqs)} requests, {sum(map(len, reqs))} block refs")
        print(table(rows, caps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
