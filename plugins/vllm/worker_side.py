"""Worker-side half of the connector: copies blocks between vLLM's paged KV and the store's slab.

Runs in every vLLM worker process (role WORKER). It owns the view of vLLM's KV cache
(:class:`tierstore.io.copy.PagedKV` over the per-layer tensors of ``register_kv_caches``, any
``KVCacheLayout``, MLA included) and one :class:`CopyEngine` between that cache and the store's
DRAM slab (the embedded store's, or the daemon's shared-memory slab mapped by the client). It
never calls the store for a load or a save: the scheduler side prepared the jobs and sent the
slots (metadata.py); this side copies, then reports what it copied.

Per step (vLLM calls, in this order)::

    handle_preemptions   save copies still reading blocks of preempted requests finish first
    bind (metadata)      requests whose blocks wait for their saves (``release``)
    start_load_kv        each LoadSpec: one batched copy slab -> blocks (submitted; a synchronous
                         load makes the forward wait for it on the device, the host does not);
                         blocks past ``n_ok`` (not staged: missing, corrupt, I/O error) and
                         blocks whose copy fails -> load errors
    (forward)
    wait_for_save        each SaveSpec: one batched copy blocks -> slab, submitted, not waited
                         for; blocks at or after a position whose load failed in this step are
                         never copied (the failed-load rule: not computed on valid KV)
    get_finished         poll copies: finished_recving (async loads copied), finished_sending
                         (released requests whose saves are all copied)
    get_block_ids_with_load_errors -> vLLM recomputes those blocks (or fails the request)
    build_connector_worker_meta    copied load jobs, per-key save results -> the scheduler
                                   releases pins and publishes blocks

Copies go through :class:`~tierstore_plugins.vllm.copier.Copier`: on CUDA the copy engine's
own streams (tierstore/io/copy.py), on the CPU device a copy thread of its own. The host never
waits for a copy on the step, except for a synchronous load on the CPU device (the forward reads
it next), in ``handle_preemptions`` (a preempted request's blocks are about to be reused) and at
shutdown.

Hybrid models (several KV-cache groups, vLLM's hybrid KV cache manager; issue 15 item 4):
each group has its own block table, its own :class:`PagedKV` over its own layers and its own
copy engine; a spec carries per group the block ids and, per lane (group x rank), the slots.
A hybrid load is always asynchronous and all or nothing: when any group's blocks could not be
staged (``LoadSpec.failed_at``) or any group's copy fails, nothing more is copied and the
request is reported in ``failed_recving`` (:meth:`get_transfer_results`), because vLLM refuses
per-block load errors (``invalid_block_ids``) for more than one group and recomputes such a
request itself. Saves of a sliding-window group's blocks run ``now`` (CUDA: the next forward's
stream waits for them; CPU: on this thread): vLLM frees a block once it falls out of the window
and may hand it to another request in the next step, so the copy must be done before then.

Threading: vLLM's worker thread only.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tierstore.errors import ConfigError, TierStoreError
from tierstore.io.copy import CopyEngine, PagedKV, slab_tensor

from tierstore_plugins.vllm.backend import (Geometry, acquire_client, add_reporter,
                                            release_client, remove_reporter, slab_of)
from tierstore_plugins.vllm.copier import Copier
from tierstore_plugins.vllm.metadata import (LoadSpec, PluginSettings, SaveSpec, TierStoreMetadata,
                                             TierStoreWorkerMeta)

logger = logging.getLogger("tierstore.vllm")


@dataclass
class _Copy:
    """One copy-engine job in flight: what to report when it is done."""

    kind: str                        # "load" | "save"
    req_id: str
    jobs: list[int]                  # this rank's store jobs
    is_async: bool = False           # load: report finished_recving
    n: int = 0                       # load: blocks copied
    oks: list[bool] = field(default_factory=list)   # save: per-key answer
    copied: list[int] = field(default_factory=list)  # save: keys this copy writes
    block_ids: list[int] | None = None
    t0: float = 0.0                  # perf_counter when it was submitted
    hybrid: bool = False             # a hybrid load: a failure goes to failed_recving
    block_bytes: int = 0             # bytes of one block of this copy's group (0: the rank's)
    pos: int = 0                     # hybrid load: request block index of its first block


def _unique_layers(kv_caches: dict[str, Any]) -> list[Any]:
    """Per-layer tensors in layer order, layers that share one tensor counted once."""
    seen: set[tuple[int, int]] = set()
    views = []
    for t in kv_caches.values():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen:
            continue
        seen.add(ident)
        views.append(t)
    offs = [v.storage_offset() for v in views]
    if offs != sorted(offs):
        views.sort(key=lambda v: v.storage_offset())
    return views


class WorkerSide:
    def __init__(self, settings: PluginSettings, geometry: Geometry, *, tp_rank: int,
                 pp_rank: int) -> None:
        self.settings = settings
        self.geo = geometry
        self.rank = geometry.rank_index(tp_rank, pp_rank)
        self.namespace = geometry.namespace(self.rank)
        self.client = None
        self.kv: PagedKV | None = None
        self.engine: Copier | None = None   # asynchronous copies over one CopyEngine
        self._slab_src: Any = None
        self._suspended = False     # between unregister_kv_caches and restore_kv_caches (sleep)
        self._load_errors: set[int] = set()
        self._failed_loads: list[int] = []   # load jobs whose copy failed (reported with loads)
        self._copies: dict[Any, _Copy] = {}           # copy job (group > 0: (g, job)) -> why
        self.kvs: list[PagedKV] = []                  # per KV-cache group (hybrid; else [kv])
        self._engines: dict[int, Copier] = {}         # groups > 0 (hybrid): their copy engines
        self._load_pending: Counter[str] = Counter()  # hybrid: load copies in flight per request
        self._recv_failed: set[str] = set()           # hybrid: loads that failed (failed_recving)
        self._failed_at: dict[str, int] = {}          # hybrid: request block index of a failure
        self.last_failure: tuple[str, int] | None = None   # hybrid: (request, block) reported
        self._req_pending: Counter[str] = Counter()   # save copies in flight per request
        self._release_wanted: set[str] = set()        # requests whose blocks wait for saves
        self._recv_done: set[str] = set()             # async loads copied (finished_recving)
        self._done_saves: dict[int, list[bool]] = {}  # store job -> per-key copied
        self._done_loads: list[int] = []              # store load jobs copied
        self._failed_from: dict[str, int] = {}        # this step: first failed load position
        self.counters = {"loaded_blocks": 0, "load_error_blocks": 0, "saved_blocks": 0,
                         "load_jobs": 0, "save_jobs": 0, "saves_cut_by_failed_load": 0}
        # vLLM's metrics (kv connector stats): per direction, bytes copied and seconds from a
        # copy's submit until this side saw it done (polled once per step); load error blocks
        self.xfer = {"load_bytes": 0, "load_seconds": 0.0, "load_copies": 0, "save_bytes": 0,
                     "save_seconds": 0.0, "save_copies": 0, "load_error_blocks": 0}
        self._xfer_in_stats: dict[str, float] = {}

    # ---------------------------------------------------------------- setup
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if self.geo.hybrid:
            self._register_groups(kv_caches)
            return
        self.kv = PagedKV.from_layer_views(_unique_layers(kv_caches))
        self.kvs = [self.kv]
        expected = self.namespace.block_bytes
        if self.kv.block_bytes != expected:
            raise ConfigError(
                f"TierStoreConnector: the registered KV cache holds {self.kv.block_bytes} bytes "
                f"per block, the scheduler's model geometry {expected} (layers, heads, head "
                "size, dtype, block size of the key namespace); the connector refuses to start "
                "rather than store blocks it would key wrongly")
        self.client = acquire_client(self.settings, self.kv.block_bytes)
        add_reporter(self.settings, self.final_report)
        self._ensure_engine()
        logger.info("tierstore: registered %d KV layers, %d blocks of %d bytes",
                    self.kv.shape[0], self.kv.num_blocks, self.kv.block_bytes)

    def _register_groups(self, kv_caches: dict[str, Any]) -> None:
        """Hybrid: one PagedKV per KV-cache group over that group's layers (layers of
        different groups may share one tensor: vLLM gives each group its own block ids in it)."""
        self.kvs = []
        for g, grp in enumerate(self.geo.groups):
            missing = [n for n in grp.layer_names if n not in kv_caches]
            if missing:
                raise ConfigError(f"TierStoreConnector: vLLM registered no KV cache for layers "
                                  f"{missing[:4]} of KV-cache group {g}")
            kv = PagedKV.from_layer_views(_unique_layers({n: kv_caches[n]
                                                          for n in grp.layer_names}))
            expected = self.geo.lane_namespace(self.geo.lane(g, self.rank)).block_bytes
            if kv.block_bytes != expected:
                raise ConfigError(
                    f"TierStoreConnector: KV-cache group {g} holds {kv.block_bytes} bytes per "
                    f"block, the scheduler's geometry {expected}; the connector refuses to start "
                    "rather than store blocks it would key wrongly")
            self.kvs.append(kv)
        self.kv = self.kvs[0]
        self.client = acquire_client(self.settings, max(kv.block_bytes for kv in self.kvs))
        add_reporter(self.settings, self.final_report)
        self._ensure_engine()
        logger.info("tierstore: registered %d KV-cache groups (%s), %d blocks",
                    len(self.kvs), ", ".join(f"{kv.shape[0]} layers of {kv.block_bytes} B"
                                             for kv in self.kvs), self.kv.num_blocks)

    def unregister_kv_caches(self) -> None:
        """vLLM >= 0.33 sleep mode: the KV cache's memory is about to be released (vLLM has
        drained transfers; ours are synchronous anyway). Close the copy engine, which holds
        streams and index buffers bound to that memory; keep the layer views, because vLLM
        keeps using the same tensors after wake-up (the allocator maps the same addresses
        again). Until :meth:`restore_kv_caches` no copy touches the KV cache. Idempotent."""
        if self.engine is not None:
            self._drain()
            self._close_engines()
            self._slab_src = None
        self._suspended = self.kv is not None

    def restore_kv_caches(self) -> None:
        """After wake-up: copies may run again; the copy engine is rebuilt on first use. The
        contents were discarded by the sleep, which only matters to vLLM (tierstore's blocks
        live in the store). Idempotent."""
        self._suspended = False

    def _pin_slab(self, buf, slot_bytes: int) -> None:
        """With the KV cache on a GPU, register the DRAM slab mapping with CUDA once (pageable
        copies run at 7-13 GB/s against 55 GB/s pinned on an H200). A failed registration is
        rolled back by tiers/pinning.py and leaves the copies correct, only slower."""
        if self.kv.device.type != "cuda":
            return
        from tierstore.tiers.pinning import HostPinning, default_registrar, pin_buffer

        if getattr(self, "_pinning", None) is not None:
            self._pinning.unpin()
        self._pinning = HostPinning(default_registrar())
        r = pin_buffer(self._pinning, buf, len(buf), slot_bytes)
        if not r.pinned:
            logger.warning("tierstore: DRAM slab not pinned (%s); copies run unpinned", r.error)

    def _ensure_engine(self, group: int = 0) -> Copier:
        """The copy engine of KV-cache group ``group`` (0 for a one-group model)."""
        buf, num_slots, slot_bytes = slab_of(self.client)
        if self.engine is None or buf is not self._slab_src:   # first use, or daemon restarted
            if self.engine is not None:
                self._drain()
                self._close_engines()
            self._pin_slab(buf, slot_bytes)
            self._slab_src = buf
            # every group's engine now, where this one is built (register_kv_caches: outside
            # vLLM's inference mode; an engine built inside it holds inference tensors that its
            # copy thread may not update)
            self.engine = self._new_engine(self.kv)
            self._engines = {g: self._new_engine(kv) for g, kv in enumerate(self.kvs) if g}
        return self.engine if group == 0 else self._engines[group]

    def _new_engine(self, kv: PagedKV) -> Copier:
        """A copy engine over ``kv`` and the slab, built outside inference mode whoever calls
        (a rebuild after wake-up runs inside vLLM's forward): tensors made in inference mode
        cannot be updated by the CPU copy thread, which runs outside it."""
        import torch

        buf, num_slots, slot_bytes = slab_of(self.client)
        with torch.inference_mode(False):
            slab = slab_tensor(buf, num_slots, slot_bytes)
            return Copier(CopyEngine(kv, slab, chunk_blocks=32,
                                     max_job_blocks=min(kv.num_blocks, 8192), max_inflight=16))

    def _close_engines(self) -> None:
        for eng in [self.engine, *self._engines.values()]:
            if eng is not None:
                eng.close()
        self.engine = None
        self._engines = {}

    def _engine_of(self, key) -> Copier:
        """The engine that ran copy ``key`` (an int: group 0's; ``(g, job)``: group g's)."""
        return self.engine if isinstance(key, int) else self._engines[key[0]]

    @staticmethod
    def _job_of(key) -> int:
        return key if isinstance(key, int) else key[1]

    def _start(self, group: int, kind: str, slots, block_ids, *, now: bool = False):
        """Start a copy on group ``group``'s engine; returns its key in ``_copies``."""
        cj = self._ensure_engine(group).start(kind, slots, block_ids, now=now)
        return cj if group == 0 else (group, cj)

    # ---------------------------------------------------------------- the step
    def handle_preemptions(self, meta: TierStoreMetadata | None) -> None:
        """vLLM reuses a preempted request's blocks from this step on: finish the save copies
        that still read them (a host wait, only for those requests; rare)."""
        if meta is None or not meta.preempted or self.engine is None:
            return
        gone = set(meta.preempted)
        for cj, c in list(self._copies.items()):
            if c.req_id in gone:
                try:
                    self._engine_of(cj).wait(self._job_of(cj))
                    self._copy_done(cj, ok=True)
                except TierStoreError:
                    self._copy_done(cj, ok=False)

    def bind(self, meta: TierStoreMetadata | None) -> None:
        """The step's metadata arrived: remember which requests wait for their saves."""
        if meta is not None and meta.release:
            self._release_wanted.update(meta.release)

    def start_load_kv(self, meta: TierStoreMetadata | None) -> None:
        self._failed_from = {}
        if meta is None or self.client is None:
            return
        for spec in meta.loads:
            self._load(spec)

    def _my_jobs(self, job_ids: list[int]) -> list[int]:
        """This rank's store jobs among a spec's (ranks first, then the tail's per rank)."""
        R = self.geo.num_ranks
        return [job_ids[i] for i in (self.rank, R + self.rank) if i < len(job_ids)]

    def _load(self, spec: LoadSpec) -> None:
        if spec.cancelled:          # the request went away while its load was staged
            self._recv_done.add(spec.req_id)
            return
        if spec.groups is not None:
            self._load_hybrid(spec)
            return
        ids = list(spec.block_ids[:spec.n_ok])
        slots = list(spec.slots[self.rank][:spec.n_ok])
        errors = list(spec.block_ids[spec.n_ok:])
        if spec.tail_block_id is not None:
            if spec.tail_ok and spec.n_ok == len(spec.block_ids):
                ids.append(spec.tail_block_id)
                slots.append(spec.tail_slots[self.rank])
            else:
                errors.append(spec.tail_block_id)
        cj = None
        if ids and self._suspended:   # never happens with vLLM's sleep protocol; fail safe
            errors, ids = spec.block_ids + ([spec.tail_block_id] if spec.tail_block_id is not
                                            None else []), []
        if ids:
            try:
                # a synchronous load feeds this step's forward: in place before it (CUDA: the
                # forward's stream waits on the device; CPU: copied now); async: in background
                t0 = time.perf_counter()
                cj = self._ensure_engine().start("onload", slots, ids, now=not spec.is_async)
            except TierStoreError:
                logger.warning("tierstore: load copy failed for %s", spec.req_id, exc_info=True)
                errors = list(spec.block_ids) + ([spec.tail_block_id] if spec.tail_block_id
                                                 is not None else [])
                ids, cj = [], None
        if errors:
            self._load_errors.update(errors)
            self.counters["load_error_blocks"] += len(errors)
            self.xfer["load_error_blocks"] += len(errors)
            n_good = min(len(ids), len(spec.block_ids))
            prev = self._failed_from.get(spec.req_id)
            pos = spec.first + n_good
            self._failed_from[spec.req_id] = pos if prev is None else min(prev, pos)
        self.counters["load_jobs"] += 1
        if cj is None:
            mine = self._my_jobs(spec.job_ids)
            if spec.n_ok and not ids:   # staged blocks that were not copied (a copy error)
                self._failed_loads.extend(mine)
            self._done_loads.extend(mine)
            if spec.is_async:
                self._recv_done.add(spec.req_id)
            return
        self._copies[cj] = _Copy("load", spec.req_id, self._my_jobs(spec.job_ids),
                                 is_async=spec.is_async, n=len(ids), block_ids=ids, t0=t0)

    def _load_hybrid(self, spec: LoadSpec) -> None:
        """A hybrid load (module docstring): per group, one copy of its blocks from its lane's
        slots; all or nothing, reported in finished_recving (and failed_recving on failure)."""
        mine = [spec.job_ids[self.geo.lane(g, self.rank)] for g in range(len(spec.groups))]
        self.counters["load_jobs"] += 1
        if spec.failed_at is not None or self._suspended:
            self._fail_hybrid(spec.req_id, spec.failed_at if spec.failed_at is not None
                              else spec.first, sum(len(ids) for ids in spec.groups))
            self._failed_loads.extend(mine)
            self._done_loads.extend(mine)
            self._recv_done.add(spec.req_id)
            return
        t0 = time.perf_counter()
        for g, ids in enumerate(spec.groups):
            lane = self.geo.lane(g, self.rank)
            slots = list(spec.slots[lane])
            if not ids:
                self._done_loads.append(mine[g])
                continue
            try:
                cj = self._start(g, "onload", slots, list(ids))
            except TierStoreError:
                logger.warning("tierstore: load copy failed for %s (group %d)", spec.req_id, g,
                               exc_info=True)
                self._fail_hybrid(spec.req_id, spec.group_first[g], len(ids))
                self._failed_loads.append(mine[g])
                self._done_loads.append(mine[g])
                continue
            self._copies[cj] = _Copy("load", spec.req_id, [mine[g]], is_async=True, n=len(ids),
                                     block_ids=list(ids), t0=t0, hybrid=True,
                                     block_bytes=self.kvs[g].block_bytes,
                                     pos=spec.group_first[g])
            self._load_pending[spec.req_id] += 1
        if not self._load_pending.get(spec.req_id):
            self._recv_done.add(spec.req_id)

    def _fail_hybrid(self, req_id: str, pos: int, n_blocks: int) -> None:
        """A hybrid load failed from request block ``pos``: the range from there is invalid in
        every group; vLLM is told through failed_recving (no per-block ids: see the module
        docstring)."""
        prev = self._failed_at.get(req_id)
        self._failed_at[req_id] = pos if prev is None else min(prev, pos)
        self._recv_failed.add(req_id)
        self.counters["load_error_blocks"] += n_blocks
        self.xfer["load_error_blocks"] += n_blocks

    def stats_delta(self) -> dict[str, float]:
        """:attr:`xfer` since the last call (vLLM's kv connector stats, per interval)."""
        out = {k: v - self._xfer_in_stats.get(k, 0) for k, v in self.xfer.items()
               if v != self._xfer_in_stats.get(k, 0)}
        self._xfer_in_stats = dict(self.xfer)
        return out

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def wait_for_save(self, meta: TierStoreMetadata | None) -> None:
        if meta is None or self.client is None:
            return
        for spec in meta.saves:
            self._save(spec)

    def _save(self, spec: SaveSpec) -> None:
        if spec.groups is not None:
            for g in range(len(spec.groups)):
                self._save_group(spec, g)
            return
        block_ids = list(spec.block_ids)
        if spec.tail_block_id is not None:
            block_ids.append(spec.tail_block_id)
        rank_slots = spec.slots[self.rank]
        job = spec.job_ids[self.rank]
        oks = [True] * len(rank_slots)
        for i in range(len(block_ids), len(rank_slots)):
            oks[i] = rank_slots[i] is None   # a key without a vLLM block: nothing to copy
        self._start_save(spec, job, oks, block_ids, rank_slots,
                         range(spec.first, spec.first + len(rank_slots)))

    def _save_group(self, spec: SaveSpec, g: int) -> None:
        """Hybrid: save group ``g``'s blocks of ``spec`` into its lane's slots (a sliding-window
        group's copy runs ``now``: module docstring)."""
        lane = self.geo.lane(g, self.rank)
        ids, pos, rank_slots = spec.groups[g], spec.group_pos[g], spec.slots[lane]
        job = spec.job_ids[lane]
        self._start_save(spec, job, [True] * len(rank_slots), ids, rank_slots, pos, group=g,
                         now=self.geo.groups[g].sliding, block_bytes=self.kvs[g].block_bytes)

    def _start_save(self, spec: SaveSpec, job: int, oks: list[bool], block_ids, slots, positions,
                    *, group: int = 0, now: bool = False, block_bytes: int = 0) -> None:
        """Start save job ``job`` of ``spec``: copy vLLM block ``block_ids[i]`` into store slot
        ``slots[i]`` (request block position ``positions[i]``) on ``group``'s engine, for every
        ``i`` with a slot (None: present already, or skipped by the store). ``oks[i]`` turns
        False for a block at or after this step's failed load (computed on top of it: never
        saved from this step), while suspended, or when the copy cannot start; the job is done
        at once when nothing is copied."""
        cut = self._failed_from.get(spec.req_id)
        pairs = []
        for i, (b, sl) in enumerate(zip(block_ids, slots)):
            if sl is None:
                continue
            if self._suspended or (cut is not None and positions[i] >= cut):
                oks[i] = False
                continue
            pairs.append((i, b, sl))
        if cut is not None and any(not ok for ok in oks):
            self.counters["saves_cut_by_failed_load"] += 1
        self.counters["save_jobs"] += 1
        if not pairs:
            self._done_saves[job] = oks
            return
        try:
            t0 = time.perf_counter()
            cj = self._start(group, "offload", [sl for _, _, sl in pairs], [b for _, b, _ in pairs],
                             now=now)
        except TierStoreError:
            logger.warning("tierstore: save copy failed for %s (group %d)", spec.req_id, group,
                           exc_info=True)
            for i, _, _ in pairs:
                oks[i] = False
            self._done_saves[job] = oks
            return
        self._copies[cj] = _Copy("save", spec.req_id, [job], oks=oks,
                                 copied=[i for i, _, _ in pairs], t0=t0, block_bytes=block_bytes)
        self._req_pending[spec.req_id] += 1

    # ---------------------------------------------------------------- completions
    def _copy_done(self, cj: int, ok: bool) -> None:
        c = self._copies.pop(cj)
        if ok:
            n = c.n if c.kind == "load" else len(c.copied)
            self.xfer[f"{c.kind}_bytes"] += n * (c.block_bytes or self.namespace.block_bytes)
            self.xfer[f"{c.kind}_seconds"] += time.perf_counter() - c.t0
            self.xfer[f"{c.kind}_copies"] += 1
        if c.kind == "load":
            self._done_loads.extend(c.jobs)
            if not ok:
                self._failed_loads.extend(c.jobs)
            if ok:
                self.counters["loaded_blocks"] += c.n
            if c.hybrid:
                if not ok:   # any wait or poll that failed: the whole load, vLLM recomputes
                    self._fail_hybrid(c.req_id, c.pos, c.n)
                self._load_pending[c.req_id] -= 1
                if self._load_pending[c.req_id] > 0:
                    return
                del self._load_pending[c.req_id]
            if c.is_async:
                self._recv_done.add(c.req_id)
            return
        if not ok:
            for i in c.copied:
                c.oks[i] = False
        else:
            self.counters["saved_blocks"] += len(c.copied)
        self._done_saves[c.jobs[0]] = c.oks
        self._req_pending[c.req_id] -= 1
        if self._req_pending[c.req_id] <= 0:
            del self._req_pending[c.req_id]

    def _poll(self) -> None:
        if self.engine is None:
            return
        for cj in list(self._copies):
            try:
                if self._engine_of(cj).poll(self._job_of(cj)):
                    self._copy_done(cj, ok=True)
            except TierStoreError:   # an asynchronous device error surfaced
                logger.warning("tierstore: a copy failed", exc_info=True)
                c = self._copies[cj]
                if c.kind == "load" and not c.hybrid:   # hybrid: _copy_done fails the load
                    self._load_errors.update(c.block_ids or ())
                    self.xfer["load_error_blocks"] += len(c.block_ids or ())
                self._copy_done(cj, ok=False)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._poll()
        sending = {r for r in self._release_wanted if not self._req_pending.get(r)}
        self._release_wanted -= sending
        recving, self._recv_done = self._recv_done, set()
        return sending or None, recving or None

    def take_failed_recving(self, recving: set[str] | None) -> set[str]:
        """Hybrid loads that failed, among the requests reported received now (vLLM wants a
        failed receive in both sets); the rest stay until their copies are done."""
        failed = self._recv_failed & set(recving or ())
        self._recv_failed -= failed
        for req_id in failed:
            self.last_failure = (req_id, self._failed_at.pop(req_id, -1))
        return failed

    def build_connector_worker_meta(self) -> TierStoreWorkerMeta | None:
        if not self._done_saves and not self._done_loads:
            return None
        wm = TierStoreWorkerMeta(saves=self._done_saves, loads=self._done_loads,
                                 load_failed=self._failed_loads)
        self._done_saves, self._done_loads, self._failed_loads = {}, [], []
        return wm

    def _drain(self) -> None:
        """Wait for every copy in flight (sleep, shutdown, a new slab)."""
        if self.engine is None:
            return
        for cj in list(self._copies):
            try:
                self._engine_of(cj).wait(self._job_of(cj))
                self._copy_done(cj, ok=True)
            except TierStoreError:
                self._copy_done(cj, ok=False)

    def final_report(self) -> dict[int, list[bool]]:
        """Shutdown of an engine that stopped stepping: wait for the copies in flight and hand
        over every save result not reported yet (the scheduler half in this process publishes
        them). Idempotent."""
        self._drain()
        out, self._done_saves = self._done_saves, {}
        return out

    def shutdown(self) -> None:
        remove_reporter(self.settings, self.final_report)
        if self.engine is not None:
            self._drain()
            self._close_engines()
        if self._done_saves and self.client is not None:
            # nobody steps the engine any more and the scheduler half may be gone: publish what
            # was copied (through the daemon, only this connection's jobs can be; the scheduler
            # half, if it shuts down later, finds these jobs gone)
            for job, oks in self._done_saves.items():
                try:
                    self.client.complete_store(job, ok=oks)
                except TierStoreError:   # not ours, or completed by the scheduler half already
                    pass
            self._done_saves = {}
        if self.client is not None:
            self.client = None
            release_client(self.settings)
