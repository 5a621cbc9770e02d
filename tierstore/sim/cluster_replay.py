"""Cluster replay: N simulated nodes behind a router that knows only their KV events.

``tierstore replay TRACE --nodes N --route round-robin,prefix-aware`` (issue 15 acceptance): what
KV-aware routing buys over blind routing, beside one pooled cache of the same total size (the
Mooncake paper's "global cache" view). No typer here; ``tierstore_admin.replay`` prints.

Each node is its own real :class:`~tierstore.store.Store` (payload none: one DRAM tier of
``capacity`` blocks, index + policy, no bytes) with an :class:`~tierstore.events.EventLog`
attached. A block is stored with engine metadata derived from the trace (hash = its ``hash_id``,
parent = the previous id, block size 512 tokens), as vLLM's connector passes ``block_hashes``.
After each request the node's log goes through the same path a daemon's does: the
:class:`~tierstore.kv_events.Translator`, one ``KVEventBatch`` payload (msgpack), decoded again
by the router into its per-node :class:`~tierstore.kv_events.KVEventIndex`. The router never
looks into a store::

    request(hash_ids) --route--> node k: lookup, load the hit prefix, store the rest
                                   node k's events --KVEventBatch--> router index of node k

Routes:

- ``round-robin``: request i goes to node i mod N.
- ``prefix-aware``: to the node whose index holds the longest prefix of the request's hash ids,
  among the nodes whose load stays within a bound: a node that has been sent more than
  max(``LOAD_SLACK``, (``LOAD_BOUND`` - 1) x mean) requests above the least loaded one is passed
  over (the absolute and relative balance thresholds of SGLang's cache-aware router, with
  request counts for load since a trace replay has no queues).
  Without the bound every request that shares the trace's first block (a system prompt) goes
  to one node. Ties (a cold request above all) go to the node sent the fewest requests, then
  round-robin.

The pooled reference is the same code with one node of N x ``capacity``. Per route the result
reports ``block_hit_ratio`` and ``token_hit_ratio`` (definitions of tierstore/sim/replay.py) over
the whole cluster, the requests each node got (``load_imbalance`` = max / mean), and
``router_exact``: whether, at the end, each router index equals its node's residency
(``media_of_blocks(store.blocks())``).

Single-threaded: the nodes run one after the other in the caller's thread.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Sequence

from tierstore.config import DramConfig, StoreConfig
from tierstore.errors import ConfigError
from tierstore.events import EventLog, engine_block
from tierstore.keys import Keyer
from tierstore.kv_events import KVEventIndex, Translator, decode_batch, encode_batch, media_of_blocks
from tierstore.sim.replay import BLOCK_TOKENS, ReplayOptions, TraceRequest, load_requests, plan

ROUTES = ("round-robin", "prefix-aware")
LOAD_BOUND = 1.25
LOAD_SLACK = 16
"""prefix-aware: a node sent more than max(LOAD_SLACK, (LOAD_BOUND - 1) x mean) requests above
the least loaded node is passed over."""
_SECRET = b"tierstore-cluster-replay-secret!"   # one cluster: every node agrees on keys


class _Node:
    def __init__(self, capacity_blocks: int, block_bytes: int, policy: str) -> None:
        from tierstore.store import Store

        self.store = Store.open(StoreConfig(slot_bytes=block_bytes, dram=DramConfig(
            capacity_blocks=capacity_blocks, policy=policy, payload=False)))
        self.log = EventLog()
        self.store.attach_events(self.log)
        self.translator = Translator()
        self.requests = 0
        self.hit_blocks = 0
        self.referenced = 0

    def events(self) -> bytes | None:
        """This node's events since the last call, as one KVEventBatch payload (or None)."""
        ev = self.translator.feed(self.log.drain())
        return encode_batch(ev) if ev else None


class Router:
    """Routes by what the nodes' events said (module docstring)."""

    def __init__(self, nodes: int, route: str) -> None:
        if route not in ROUTES:
            raise ConfigError(f"unknown route {route!r}; known: {', '.join(ROUTES)}")
        self.route = route
        self.indexes = [KVEventIndex() for _ in range(nodes)]
        self.sent = [0] * nodes
        self._next = 0
        self.batches = self.events = 0

    def receive(self, node: int, payload: bytes) -> None:
        events = decode_batch(payload)[1]
        self.indexes[node].apply(events)
        self.batches += 1
        self.events += len(events)

    def pick(self, hash_ids: Sequence[int]) -> int:
        n = len(self.indexes)
        rr = self._next
        self._next = (self._next + 1) % n
        if self.route == "round-robin":
            k = rr
        else:
            low = min(self.sent)
            limit = low + max(LOAD_SLACK, (LOAD_BOUND - 1) * sum(self.sent) / n)
            best = None
            for j in range(n):
                i = (rr + j) % n
                if self.sent[i] > limit:
                    continue   # over the load bound (never all: the least loaded stays)
                cand = (self.indexes[i].longest_prefix(hash_ids), -self.sent[i], -j)
                if best is None or cand > best:
                    best, k = cand, i
        self.sent[k] += 1
        return k


def _serve(node: _Node, keyer: Keyer, ns, block_bytes: int, r: TraceRequest) -> int:
    """One request on one node (the replay's prefix semantics); returns its hit blocks."""
    s = node.store
    ids = r.hash_ids
    keys = keyer.chain_from_block_ids(ids)
    n = s.lookup(keys, ns).num_blocks if keys else 0
    if n:
        job = s.prepare_load(keys[:n])
        s.complete_load(job.job_id)
        n = job.num_ready
    if n < len(keys):
        eng = [engine_block(ids[i], ids[i - 1] if i else None, None, BLOCK_TOKENS)
               for i in range(n, len(ids))]
        job = s.prepare_store(keys[n:], ns, block_bytes, parent=keys[n - 1] if n else None,
                              engine=eng)
        s.complete_store(job.job_id, True)
    node.requests += 1
    node.hit_blocks += n
    node.referenced += len(keys)
    return n


def _run(reqs: list[TraceRequest], nodes: int, capacity_blocks: int, block_bytes: int, ns,
         policy: str, route: str, progress: Callable[[int], None] | None) -> dict:
    t0 = time.perf_counter()
    cluster = [_Node(capacity_blocks, block_bytes, policy) for _ in range(nodes)]
    router = Router(nodes, route)
    keyer = Keyer(ns, _SECRET)
    hit_blocks = referenced = hit_tokens = input_tokens = 0
    try:
        for i, r in enumerate(reqs):
            k = router.pick(r.hash_ids)
            n = _serve(cluster[k], keyer, ns, block_bytes, r)
            payload = cluster[k].events()
            if payload is not None:
                router.receive(k, payload)
            hit_blocks += n
            referenced += len(r.hash_ids)
            hit_tokens += min(n * BLOCK_TOKENS, r.input_length)
            input_tokens += r.input_length
            if progress is not None:
                progress(1)
        exact = all(router.indexes[j].blocks == media_of_blocks(c.store.blocks())
                    for j, c in enumerate(cluster))
    finally:
        for c in cluster:
            c.store.close()
    per = [c.requests for c in cluster]
    mean = sum(per) / len(per) if per else 0
    return {
        "route": route if nodes > 1 else "pooled",
        "nodes": nodes,
        "capacity_blocks_per_node": capacity_blocks,
        "block_hit_ratio": round(hit_blocks / referenced, 6) if referenced else 0.0,
        "token_hit_ratio": round(hit_tokens / input_tokens, 6) if input_tokens else 0.0,
        "hit_blocks": hit_blocks,
        "referenced_blocks": referenced,
        "requests_per_node": per,
        "node_block_hit_ratio": [round(c.hit_blocks / c.referenced, 6) if c.referenced else 0.0
                                 for c in cluster],
        "load_imbalance": round(max(per) / mean, 4) if mean else None,
        "load_bound": LOAD_BOUND if route == "prefix-aware" and nodes > 1 else None,
        "event_batches": router.batches,
        "events": router.events,
        "router_exact": exact,
        "wall_s": round(time.perf_counter() - t0, 3),
    }


def cluster_replay(opts: ReplayOptions, nodes: int, routes: Sequence[str],
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Replay ``opts``' trace on ``nodes`` simulated nodes of ``opts.capacity`` each (payload
    none), once per route, and once on one pooled cache of ``nodes`` x capacity. Raises
    ConfigError for bad options."""
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {nodes}")
    routes = list(dict.fromkeys(r.strip().lower() for r in routes if r.strip()))
    if not routes:
        raise ConfigError("--route needs at least one of " + ", ".join(ROUTES))
    for r in routes:
        if r not in ROUTES:
            raise ConfigError(f"unknown route {r!r}; known: {', '.join(ROUTES)}")
    if opts.socket is not None or opts.data_dir is not None or opts.payload == "bytes" \
            or opts.dram_capacity is not None or opts.nvme_capacity is not None:
        raise ConfigError("--nodes simulates nodes with payload none: give --capacity (per "
                          "node), not --socket, --data-dir, --payload bytes or tier capacities")
    opts = replace(opts, payload="none", capacity=opts.capacity or "3M", baseline=None)
    p = plan(opts)
    reqs, source = load_requests(opts)
    total = len(reqs) * (len(routes) + 1)
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if progress is not None and (done[0] % 200 == 0 or done[0] == total):
            progress(done[0], total)

    t0 = time.perf_counter()
    results = [_run(reqs, nodes, p.dram_blocks, p.block_bytes, p.namespace, opts.policy, r, tick)
               for r in routes]
    pooled = _run(reqs, 1, p.dram_blocks * nodes, p.block_bytes, p.namespace, opts.policy,
                  "round-robin", tick)
    return {
        "trace": source,
        "requests": len(reqs),
        "nodes": nodes,
        "capacity": opts.capacity,
        "capacity_blocks_per_node": p.dram_blocks,
        "pooled_capacity_blocks": p.dram_blocks * nodes,
        "block_tokens": BLOCK_TOKENS,
        "policy": opts.policy,
        "payload": "none",
        "routes": results,
        "pooled": pooled,
        "wall_s": round(time.perf_counter() - t0, 3),
    }


__all__ = ["ROUTES", "Router", "cluster_replay"]
