"""Scheduler-side half of the connector: which blocks to load and save, and the pins between.

Runs in vLLM's EngineCore process (role SCHEDULER). It owns per-request bookkeeping only; bytes
move in the workers (worker_side.py), which get their work through :class:`TierStoreMetadata`.

Per request::

    get_num_new_matched_tokens --lookup(pin)--> store      longest hit beyond vLLM's own blocks
            | plan_load: full blocks only, >= 1 prompt token left, engine-held blocks skipped
    update_state_after_alloc   -> LoadSpec(block ids, keys)   (or unpin: nothing to load)
    build_connector_meta       -> loads + SaveSpecs for blocks that become final this step
    request_finished           -> unpin everything; P/D: kv_transfer_params with the identity

Keys are computed here from token ids (tierstore.keys, DESIGN §2), for every (TP, PP) rank: each
rank stores its own heads / layers under its own namespace. The hit of a request is the minimum
over ranks, so no rank is asked to load a block it does not have.

P/D: the producer saves the full prompt blocks under prefix keys and the partial last block under
a key derived from the request identity (``transfer_id``); ``request_finished`` returns that
identity in ``kv_transfer_params["tierstore"]``. The consumer gets those params back on its
request and loads the full blocks plus the tail, so it computes only the last prompt token.

P/D across nodes (``fetch_from_peers``): the producer's node serves its blocks to peers (nothing
changes there). On the consumer, a request whose blocks are not all on this node has them pulled
from the other nodes' daemons first, without blocking the scheduler::

    get_num_new_matched_tokens  probe: local lookup short of the prompt's full blocks (or tail)
        -> PeerFetcher.submit(fetch_remote per rank)        return None: vLLM asks again later
    get_num_new_matched_tokens  fetch still in flight       return None (until the deadline)
    get_num_new_matched_tokens  fetch done (or failed, or past peer_fetch_timeout_s)
        -> the usual pinning lookup on this node's daemon, then PeerFetcher.release (the side
           connection's pins)                                return (hit tokens, False)

A failed fetch (TransferFailed: a peer died mid-read and nobody else had the blocks) leaves
only whole verified blocks visible; the request loads what is local and vLLM computes the rest.

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

from tierstore.errors import PinError, TierStoreError
from tierstore.keys import Keyer
from tierstore.plan import plan_load
from tierstore.types import BlockKey

from tierstore_plugins.vllm.backend import Geometry, extras_of, open_side_client, tail_key
from tierstore_plugins.vllm.metadata import (PARAMS_KEY, PARAMS_VERSION, LoadSpec, PluginSettings,
                                             SaveSpec, TierStoreMetadata)

logger = logging.getLogger("tierstore.vllm")


@dataclass
class _Req:
    request: Any
    keys: list[list[BlockKey]]                 # per rank: keys of the prompt's full blocks
    pinned: list[list[BlockKey]] = field(default_factory=list)
    tail_pinned: list[BlockKey] = field(default_factory=list)
    saved_upto: int = 0                        # blocks [0, saved_upto) need no save
    tail_saved: bool = False
    transfer_id: str | None = None
    plan: tuple[int, int] = (0, 0)             # planned load, blocks [first, end)
    plan_tail: list[BlockKey] | None = None    # planned tail keys per rank (P/D consumer)
    pd: dict | None | bool = False             # P/D params once checked (False: not yet)
    fetch: str = ""                            # peer fetch: "" | "pending" | "done"
    fetch_deadline: float = 0.0


@dataclass
class FetchResult:
    """What one request's peer fetch did: ``blocks[i]`` blocks of job ``i``'s keys are local
    now (a prefix), ``fetched`` came from peers, ``errors`` name the peers that failed."""

    blocks: list[int]
    fetched: int
    errors: list[str]
    seconds: float


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
                            self._results[req_id] = FetchResult([0] * len(jobs), 0,
                                                                ["internal error"], 0.0)
                        self._dropped.discard(req_id)

    def _fetch(self, req_id: str, jobs) -> None:
        t0 = time.perf_counter()
        blocks, fetched, errors, pins = [], 0, [], []
        for keys, ns in jobs:
            try:
                if self._client is None:
                    self._client = self._connect()
                r = self._client.fetch_remote(keys, ns, pin=True, ttl_s=self.ttl_s, detail=True)
            except TierStoreError as e:   # TransferFailed: only whole verified blocks landed
                errors.append(f"{type(e).__name__}: {e}")
                blocks.append(0)
                continue
            n = int(r.get("n", 0))
            blocks.append(n)
            fetched += int(r.get("fetched", 0))
            errors.extend(r.get("errors") or [])
            if r.get("pinned"):
                pins.append(keys[:n])
        res = FetchResult(blocks, fetched, errors, time.perf_counter() - t0)
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
        self.namespaces = [geometry.namespace(r) for r in range(geometry.num_ranks)]
        self.keyers: list[Keyer] = [client.keyer(ns) for ns in self.namespaces]
        self.ns_digest = self.namespaces[0].digest().hex()
        self._reqs: dict[str, _Req] = {}
        self._loads: list[LoadSpec] = []
        self._kv_cache_manager = None
        self.counters = {"lookups": 0, "hit_tokens": 0, "loads": 0, "saves": 0,
                         "tails_saved": 0, "tails_loaded": 0, "pd_params_rejected": 0,
                         "peer_fetches": 0, "peer_fetched_blocks": 0, "peer_fetch_errors": 0,
                         "peer_fetch_timeouts": 0, "peer_fetch_s": 0.0}
        self.fetcher: PeerFetcher | None = None
        if settings.fetch_from_peers and self.loads_enabled:
            self.fetcher = PeerFetcher(lambda: open_side_client(settings),
                                       ttl_s=settings.pin_ttl_s)

    def bind_kv_cache_manager(self, manager) -> None:
        self._kv_cache_manager = manager

    # ---------------------------------------------------------------- keys and pins
    def _state(self, request) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is None:
            tokens = list(request.prompt_token_ids or [])
            extras = extras_of(request, self.bs)
            keys = [k.chain(tokens, extras) for k in self.keyers]
            st = _Req(request, keys)
            self._reqs[request.request_id] = st
        return st

    def _unpin(self, keys: list[BlockKey]) -> None:
        if not keys:
            return
        try:
            self.client.unpin(keys)
        except PinError:   # a lease expired in between: release the rest one by one
            for k in keys:
                try:
                    self.client.unpin([k])
                except PinError:
                    pass
        except TierStoreError:
            logger.warning("tierstore: unpin failed", exc_info=True)

    def _release(self, st: _Req) -> None:
        for keys in st.pinned:
            self._unpin(keys)
        self._unpin(st.tail_pinned)
        st.pinned, st.tail_pinned = [], []

    def _pd(self, st: _Req) -> dict | None:
        """``_pd_params`` once per request (get_num_new_matched_tokens may run many times)."""
        if st.pd is False:
            st.pd = self._pd_params(st.request)
        return st.pd or None

    def _pd_params(self, request) -> dict | None:
        """The producer's hand-off params on a consumer request, if valid for this engine."""
        params = (getattr(request, "kv_transfer_params", None) or {}).get(PARAMS_KEY)
        if not params:
            return None
        ok = (params.get("version") == PARAMS_VERSION and params.get("namespace") == self.ns_digest
              and params.get("block_size") == self.bs
              and params.get("num_prompt_tokens") == request.num_prompt_tokens)
        if not ok:
            # MAP-11: another block size or model is never copied block for block
            self.counters["pd_params_rejected"] += 1
            logger.warning("tierstore: ignoring kv_transfer_params of request %s: producer "
                           "namespace/block size/prompt differ from this engine's",
                           request.request_id)
            return None
        return params

    # ---------------------------------------------------------------- vLLM hooks
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        if not self.loads_enabled:
            return 0, False
        self._release(st)               # may be called again for the same request
        st.plan, st.plan_tail = (0, 0), None
        n_prompt = request.num_prompt_tokens
        n_full = len(st.keys[0])
        if n_full == 0:
            return 0, False
        tail_tokens = n_prompt - n_full * self.bs
        params = self._pd(st) if tail_tokens > 1 and self.settings.load_tail else None
        if params and params.get("tail_tokens") != tail_tokens:
            params = None
        if self.fetcher is not None and st.fetch != "done":
            if self._peer_fetch(st, params):
                return None, False      # blocks in flight from a peer: vLLM asks again later
        try:
            hit = n_full
            pinned: list[list[BlockKey]] = []
            for keys in st.keys:
                res = self.client.lookup(keys, self.namespaces[len(pinned)], pin=True,
                                         ttl_s=self.settings.pin_ttl_s)
                pinned.append(list(res.keys))
                hit = min(hit, res.num_blocks)
        except TierStoreError:
            logger.warning("tierstore: lookup failed; computing request %s", request.request_id,
                           exc_info=True)
            return 0, False
        finally:
            if self.fetcher is not None:
                self.fetcher.release(request.request_id)   # ours are pinned now (or missed)
        self.counters["lookups"] += 1
        plan = plan_load(n_prompt, hit, num_computed_tokens, self.bs)
        # keep pins on the planned blocks only
        st.pinned = [p[plan.first_block:plan.end_block] for p in pinned]
        for p in pinned:
            self._unpin(p[:plan.first_block] + p[plan.end_block:])
        if plan.num_blocks:
            st.saved_upto = max(st.saved_upto, plan.end_block)
        ext = plan.num_tokens
        if params and plan.end_block == n_full and num_computed_tokens <= n_full * self.bs:
            tkeys = self._tail_keys(st, params["transfer_id"])
            try:
                got: list[BlockKey] = []
                for r, k in enumerate(tkeys):
                    res = self.client.lookup([k], self.namespaces[r], pin=True,
                                             ttl_s=self.settings.pin_ttl_s)
                    got.extend(res.keys)
                st.tail_pinned = got
                if len(got) == len(tkeys):
                    st.plan_tail = tkeys
                    ext += tail_tokens - 1      # the last prompt token stays for vLLM
            except TierStoreError:
                logger.warning("tierstore: tail lookup failed", exc_info=True)
        st.plan = (plan.first_block, plan.end_block)
        self.counters["hit_tokens"] += ext
        return ext, False

    def _peer_fetch(self, st: _Req, params: dict | None) -> bool:
        """Advance the request's peer fetch; True while the scheduler should wait for it.

        First call: a local (non-pinning) lookup per rank; when this node already holds every
        full block (and the P/D tail, when wanted) nothing is fetched. Otherwise the blocks are
        fetched on the fetcher's thread until done, failed, or ``peer_fetch_timeout_s``."""
        req_id = st.request.request_id
        if st.fetch == "":
            n_full = len(st.keys[0])
            tkeys = self._tail_keys(st, params["transfer_id"]) if params else []
            try:
                short = any(self.client.lookup(keys, ns).num_blocks < n_full
                            for keys, ns in zip(st.keys, self.namespaces))
                short = short or any(self.client.lookup([k], ns).num_blocks < 1
                                     for k, ns in zip(tkeys, self.namespaces))
            except TierStoreError:
                logger.warning("tierstore: lookup failed before a peer fetch", exc_info=True)
                short = False
            if not short:
                st.fetch = "done"
                return False
            jobs = list(zip(st.keys, self.namespaces)) + [([k], ns) for k, ns in
                                                          zip(tkeys, self.namespaces)]
            self.fetcher.submit(req_id, jobs)
            st.fetch = "pending"
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
        else:
            self.counters["peer_fetched_blocks"] += res.fetched
            self.counters["peer_fetch_s"] += res.seconds
            if res.errors:
                self.counters["peer_fetch_errors"] += 1
                logger.warning("tierstore: peer fetch of request %s: %s", req_id,
                               "; ".join(res.errors)[:500])
        st.fetch = "done"
        return False

    def _tail_keys(self, st: _Req, transfer_id: str) -> list[BlockKey]:
        n_full = len(st.keys[0])
        tail = list(st.request.prompt_token_ids[n_full * self.bs:])
        return [tail_key(kr, transfer_id, st.keys[r][-1] if n_full else None, tail)
                for r, kr in enumerate(self.keyers)]

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens <= 0:
            self._release(st)
            return
        first, end = st.plan
        nblk = min(end - first, num_external_tokens // self.bs)
        block_ids = blocks.get_block_ids()[0]
        use_tail = (st.plan_tail is not None
                    and num_external_tokens > nblk * self.bs and nblk == end - first)
        spec = LoadSpec(request.request_id, list(block_ids[first:first + nblk]),
                        [k[first:first + nblk] for k in st.keys])
        if use_tail:
            spec.tail_block_id = block_ids[end]
            spec.tail_keys = st.plan_tail
            self.counters["tails_loaded"] += 1
        self._loads.append(spec)
        self.counters["loads"] += 1

    def _wants_tail(self, request) -> bool:
        if self.settings.save_tail is not None:
            return bool(self.settings.save_tail)
        if self.role == "kv_producer":
            return True
        params = getattr(request, "kv_transfer_params", None) or {}
        return bool(params.get("do_remote_decode"))

    def build_connector_meta(self, scheduler_output) -> TierStoreMetadata:
        meta = TierStoreMetadata(loads=self._loads)
        self._loads = []
        if not self.saves_enabled:
            return meta
        for req_id, n_sched in scheduler_output.num_scheduled_tokens.items():
            st = self._reqs.get(req_id)
            if st is None:
                continue
            req = st.request
            n_prompt = req.num_prompt_tokens
            done = min(req.num_computed_tokens + n_sched, n_prompt)   # final after this step
            final_blocks = min(done // self.bs, len(st.keys[0]))
            want_tail = (done >= n_prompt and not st.tail_saved and n_prompt % self.bs
                         and self._wants_tail(req))
            if final_blocks <= st.saved_upto and not want_tail:
                continue
            block_ids = self._block_ids(req_id)
            if block_ids is None:
                continue
            lo = st.saved_upto
            spec = SaveSpec(req_id, list(block_ids[lo:final_blocks]),
                            [k[lo:final_blocks] for k in st.keys],
                            [k[lo - 1] if lo else None for k in st.keys])
            st.saved_upto = max(lo, final_blocks)
            if want_tail:
                st.transfer_id = f"{self.engine_id}/{req_id}"
                spec.tail_block_id = block_ids[n_prompt // self.bs]
                spec.tail_keys = self._tail_keys(st, st.transfer_id)
                st.tail_saved = True
                self.counters["tails_saved"] += 1
            meta.saves.append(spec)
            self.counters["saves"] += 1
        return meta

    def _block_ids(self, req_id: str) -> list[int] | None:
        if self._kv_cache_manager is None:
            return None
        return list(self._kv_cache_manager.get_block_ids(req_id)[0])

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        self._release(st)
        if self.fetcher is not None and st.fetch:
            self.fetcher.release(request.request_id)
        if not self.saves_enabled or not (st.tail_saved or self.role == "kv_producer"):
            return False, None
        n_prompt = request.num_prompt_tokens
        transfer_id = st.transfer_id or f"{self.engine_id}/{request.request_id}"
        params = {"version": PARAMS_VERSION, "transfer_id": transfer_id,
                  "namespace": self.ns_digest, "block_size": self.bs,
                  "num_prompt_tokens": n_prompt,
                  "tail_tokens": (n_prompt % self.bs) if st.tail_saved else 0}
        return False, {PARAMS_KEY: params}

    def shutdown(self) -> None:
        for st in self._reqs.values():
            self._release(st)
            if self.fetcher is not None and st.fetch:
                self.fetcher.release(st.request.request_id)
        self._reqs.clear()
        if self.fetcher is not None:
            self.fetcher.close()
            self.fetcher = None
