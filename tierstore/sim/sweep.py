"""Policy x capacity sweep of the trace replay, with the offline optimum and the infinite cache.

``tierstore replay --policy a,b --capacity 1M,3M`` calls :func:`sweep`; this module reads the
trace once, runs one real store replay (:func:`tierstore.sim.replay.replay_requests`, payload none)
per policy and capacity, and adds two reference rows computed here without a store::

    belady    offline optimum (Belady's MIN): on a miss, evict the block whose next use lies
              farthest in the future
    infinite  a cache that never evicts: the upper bound of any policy at any capacity

Reference semantics (the same prefix semantics as the replay and the reference simulator,
``shared/tools/trace_sim.py``):

- A request's hit is the number of its leading blocks that are cached *before* the request.
- Then its blocks are processed in order: each one is inserted (or, if cached, its next use is
  updated), and while the cache holds more than ``capacity_blocks`` blocks the one whose next
  use is farthest (never = +inf) is dropped, which may be a block of the same request.
- Blocks are named by their trace ``hash_ids`` (in Mooncake traces an id already stands for its
  whole prefix, so this equals the store's chain keys).

``block_hit_ratio`` and ``token_hit_ratio`` are defined as in :mod:`tierstore.sim.replay`. The
result of :func:`sweep` is one plain dict::

    {"trace", "requests", "referenced_blocks", "input_tokens", "payload": "none", "model",
     "block_tokens", "block_bytes", "capacities": [{"capacity", "capacity_blocks"}, ...],
     "policies": [...], "wall_s",
     "results":    [{"policy", "capacity", "capacity_blocks", "block_hit_ratio",
                     "token_hit_ratio", "wall_s"}, ...],            # one per policy x capacity
     "references": [{"policy": "belady" | "infinite", "capacity", "capacity_blocks",
                     "block_hit_ratio", "token_hit_ratio", "wall_s"}, ...]}

Single-threaded: the cells run one after the other in the caller's thread.
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict, deque
from dataclasses import replace
from typing import Callable, Sequence

from tierstore.errors import ConfigError
from tierstore.sim.replay import (BLOCK_TOKENS, ReplayOptions, TraceRequest, get_model,
                              load_requests, plan, replay_requests)
from tierstore.units import parse_capacity

REFERENCES = ("belady", "infinite")


def _ratios(hit_blocks: int, referenced: int, hit_tokens: int, input_tokens: int) -> dict:
    return {"block_hit_ratio": round(hit_blocks / referenced, 6) if referenced else 0.0,
            "token_hit_ratio": round(hit_tokens / input_tokens, 6) if input_tokens else 0.0}


def belady(reqs: Sequence[TraceRequest], capacity_blocks: int) -> dict:
    """Hit ratios of the offline optimum at ``capacity_blocks`` (module docstring semantics).

    O(B log B) for B block references: a max-heap of (next use, block) with lazy deletion.
    """
    uses: dict[int, deque] = defaultdict(deque)   # block -> positions of its future uses
    pos = 0
    for r in reqs:
        for b in r.hash_ids:
            uses[b].append(pos)
            pos += 1
    never = float("inf")
    cached: dict[int, float] = {}                  # block -> its next use (the live heap entry)
    heap: list[tuple[float, int]] = []             # (-next use, block); stale entries skipped
    hit_blocks = referenced = hit_tokens = input_tokens = 0
    for r in reqs:
        ids = r.hash_ids
        n = 0
        for b in ids:
            if b not in cached:
                break
            n += 1
        hit_blocks += n
        referenced += len(ids)
        input_tokens += r.input_length
        hit_tokens += min(n * BLOCK_TOKENS, r.input_length)
        for b in ids:
            q = uses[b]
            q.popleft()
            nxt = q[0] if q else never
            cached[b] = nxt
            heapq.heappush(heap, (-nxt, b))
            while len(cached) > capacity_blocks:
                neg, y = heapq.heappop(heap)
                if cached.get(y) == -neg:
                    del cached[y]
    return _ratios(hit_blocks, referenced, hit_tokens, input_tokens)


def infinite(reqs: Sequence[TraceRequest]) -> dict:
    """Hit ratios of a cache that never evicts (prefix semantics)."""
    seen: set[int] = set()
    hit_blocks = referenced = hit_tokens = input_tokens = 0
    for r in reqs:
        n = 0
        for b in r.hash_ids:
            if b not in seen:
                break
            n += 1
        hit_blocks += n
        referenced += len(r.hash_ids)
        input_tokens += r.input_length
        hit_tokens += min(n * BLOCK_TOKENS, r.input_length)
        seen.update(r.hash_ids)
    return _ratios(hit_blocks, referenced, hit_tokens, input_tokens)


def sweep(base: ReplayOptions, policies: Sequence[str], capacities: Sequence[str], *,
          references: bool = True,
          progress: Callable[[int, int], None] | None = None) -> dict:
    """Replay every policy at every capacity (payload none) and compute the reference rows.

    ``base`` gives the trace, model, limit and block size; its policy and capacity are replaced
    per cell. Everything is validated before the first replay: raises ConfigError for a bad
    policy or capacity, a payload other than none, or a daemon socket. ``progress(done, total)``
    counts requests across the whole sweep (each reference row counts as one pass of the trace).
    """
    policies = [p.strip() for p in policies if p.strip()]
    capacities = [c.strip() for c in capacities if c.strip()]
    if not policies or not capacities:
        raise ConfigError("a sweep needs at least one policy and one capacity")
    if base.socket is not None:
        raise ConfigError("a sweep runs in-process: a daemon has one policy and one capacity")
    if base.payload not in (None, "none"):
        raise ConfigError("a sweep replays with --payload none (index + policy only)")
    base = replace(base, payload="none")
    for c in capacities:
        parse_capacity(c)   # a bad capacity is reported by its own text
    plans = {(p, c): plan(replace(base, policy=p, capacity=c)) for p in policies for c in capacities}
    cap_blocks = {c: plans[(policies[0], c)].dram_blocks for c in capacities}
    block_bytes = plans[(policies[0], capacities[0])].block_bytes

    t_start = time.perf_counter()
    reqs, source = load_requests(base)
    n_req = len(reqs)
    passes = len(plans) + (len(capacities) + 1 if references else 0)
    total = max(1, passes * n_req)
    done_before = 0

    def cell_progress(done: int, _total: int) -> None:
        if progress is not None:
            progress(done_before + done, total)

    results = []
    for (p, c) in plans:
        r = replay_requests(replace(base, policy=p, capacity=c), reqs, source, cell_progress)
        results.append({"policy": p, "capacity": c, "capacity_blocks": cap_blocks[c],
                        "block_hit_ratio": r["block_hit_ratio"],
                        "token_hit_ratio": r["token_hit_ratio"], "wall_s": r["wall_s"]})
        done_before += n_req
        cell_progress(0, total)

    refs = []
    if references:
        t = time.perf_counter()
        inf = infinite(reqs)
        inf_s = time.perf_counter() - t
        done_before += n_req
        cell_progress(0, total)
        for c in capacities:
            t = time.perf_counter()
            refs.append({"policy": "belady", "capacity": c, "capacity_blocks": cap_blocks[c],
                         **belady(reqs, cap_blocks[c]),
                         "wall_s": round(time.perf_counter() - t, 4)})
            done_before += n_req
            cell_progress(0, total)
        refs += [{"policy": "infinite", "capacity": c, "capacity_blocks": cap_blocks[c], **inf,
                  "wall_s": round(inf_s, 4)} for c in capacities]
    return {
        "trace": source,
        "requests": n_req,
        "referenced_blocks": sum(len(r.hash_ids) for r in reqs),
        "input_tokens": sum(r.input_length for r in reqs),
        "payload": "none",
        "model": get_model(base.model).name,
        "block_tokens": BLOCK_TOKENS,
        "block_bytes": block_bytes,
        "capacities": [{"capacity": c, "capacity_blocks": cap_blocks[c]} for c in capacities],
        "policies": policies,
        "results": results,
        "references": refs,
        "wall_s": round(time.perf_counter() - t_start, 4),
    }


__all__ = ["REFERENCES", "belady", "infinite", "sweep"]
