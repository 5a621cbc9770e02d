"""Worker-side half of the connector: moves blocks between vLLM's paged KV and the store.

Runs in every vLLM worker process (role WORKER). It owns the view of vLLM's KV cache
(:class:`tierstore.io.copy.PagedKV` over the per-layer tensors of ``register_kv_caches``, any
``KVCacheLayout``, MLA included) and one :class:`CopyEngine` between that cache and the store's
DRAM slab (the embedded store's, or the daemon's shared-memory slab mapped by the client).

Per step (vLLM calls, in this order)::

    start_load_kv   for each LoadSpec: prepare_load(keys) -> exact ready prefix (pinned slots)
                    one batched scatter slab -> KV blocks, wait, complete_load
                    blocks past the ready prefix (missing, corrupt, I/O error) -> load errors
    (forward)
    wait_for_save   for each SaveSpec: prepare_store(keys) -> slots for the absent blocks
                    one batched gather KV blocks -> slab, wait, complete_store(ok)
    get_block_ids_with_load_errors -> vLLM recomputes those blocks (or fails the request,
                    kv_load_failure_policy) instead of decoding from bad KV

Loads and saves are synchronous here: a load completes before the forward that reads it; a save
publishes only after its copy completed (RACE-16), of blocks whose tokens were all computed by
the forward that just ran (the scheduler sends only those). Never one copy per block: one job
per request per direction.

Threading: vLLM's worker thread only.
"""

from __future__ import annotations

import logging
from typing import Any

from tierstore.errors import TierStoreError
from tierstore.io.copy import CopyEngine, PagedKV, slab_tensor
from tierstore.types import BlockStatus

from tierstore_plugins.vllm.backend import Geometry, acquire_client, release_client, slab_of
from tierstore_plugins.vllm.metadata import LoadSpec, PluginSettings, SaveSpec, TierStoreMetadata

logger = logging.getLogger("tierstore.vllm")


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
        self.engine: CopyEngine | None = None
        self._slab_src: Any = None
        self._suspended = False     # between unregister_kv_caches and restore_kv_caches (sleep)
        self._load_errors: set[int] = set()
        self.counters = {"loaded_blocks": 0, "load_error_blocks": 0, "saved_blocks": 0,
                         "present_blocks": 0, "skipped_blocks": 0, "load_jobs": 0,
                         "save_jobs": 0}

    # ---------------------------------------------------------------- setup
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.kv = PagedKV.from_layer_views(_unique_layers(kv_caches))
        self.client = acquire_client(self.settings, self.kv.block_bytes)
        self._ensure_engine()
        logger.info("tierstore: registered %d KV layers, %d blocks of %d bytes",
                    self.kv.shape[0], self.kv.num_blocks, self.kv.block_bytes)

    def unregister_kv_caches(self) -> None:
        """vLLM >= 0.33 sleep mode: the KV cache's memory is about to be released (vLLM has
        drained transfers; ours are synchronous anyway). Close the copy engine, which holds
        streams and index buffers bound to that memory; keep the layer views, because vLLM
        keeps using the same tensors after wake-up (the allocator maps the same addresses
        again). Until :meth:`restore_kv_caches` no copy touches the KV cache. Idempotent."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
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

    def _ensure_engine(self) -> CopyEngine:
        buf, num_slots, slot_bytes = slab_of(self.client)
        if self.engine is None or buf is not self._slab_src:   # first use, or daemon restarted
            if self.engine is not None:
                self.engine.close()
            self._pin_slab(buf, slot_bytes)
            slab = slab_tensor(buf, num_slots, slot_bytes)
            self.engine = CopyEngine(self.kv, slab, chunk_blocks=32,
                                     max_job_blocks=min(self.kv.num_blocks, 8192), max_inflight=2)
            self._slab_src = buf
        return self.engine

    # ---------------------------------------------------------------- loads
    def start_load_kv(self, meta: TierStoreMetadata | None) -> None:
        if meta is None or self.client is None:
            return
        for spec in meta.loads:
            if self._suspended:     # never happens with vLLM's sleep protocol; fail safe
                self._load_errors.update(spec.block_ids)
                if spec.tail_block_id is not None:
                    self._load_errors.add(spec.tail_block_id)
                continue
            self._load(spec)

    def _rank_blocks(self, spec: LoadSpec | SaveSpec) -> tuple[list[bytes], list[int]]:
        """This rank's keys of ``spec`` and the vLLM block ids they go with, the partial tail
        block (a P/D hand-off's) last when there is one."""
        keys = list(spec.keys[self.rank])
        block_ids = list(spec.block_ids)
        if spec.tail_keys is not None and spec.tail_block_id is not None:
            keys.append(spec.tail_keys[self.rank])
            block_ids.append(spec.tail_block_id)
        return keys, block_ids

    def _load(self, spec: LoadSpec) -> None:
        keys, block_ids = self._rank_blocks(spec)
        if not keys:
            return
        n_ok = 0
        try:
            job = self.client.prepare_load(keys)
        except TierStoreError:
            logger.warning("tierstore: prepare_load failed for %s", spec.req_id, exc_info=True)
            job = None
        if job is not None:
            n = job.num_ready
            ok = True
            try:
                if n:
                    eng = self._ensure_engine()
                    eng.wait(eng.submit_onload(job.slots[:n], block_ids[:n]))
                n_ok = n
            except TierStoreError:
                ok = False
                logger.warning("tierstore: load copy failed for %s", spec.req_id, exc_info=True)
            finally:
                try:
                    self.client.complete_load(job.job_id, ok=ok)
                except TierStoreError:
                    logger.warning("tierstore: complete_load failed", exc_info=True)
            bad = [s for s in job.status[n:] if s is not BlockStatus.OK]
            if bad:
                logger.warning("tierstore: request %s: %d of %d blocks not loadable (%s); vLLM "
                               "recomputes them", spec.req_id, len(keys) - n, len(keys),
                               bad[0].value)
        self.counters["load_jobs"] += 1
        self.counters["loaded_blocks"] += n_ok
        failed = block_ids[n_ok:]
        self.counters["load_error_blocks"] += len(failed)
        self._load_errors.update(failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    # ---------------------------------------------------------------- saves
    def wait_for_save(self, meta: TierStoreMetadata | None) -> None:
        if meta is None or self.client is None or self._suspended:
            return
        for spec in meta.saves:
            self._save(spec)

    def _save(self, spec: SaveSpec) -> None:
        keys, block_ids = self._rank_blocks(spec)
        if not keys:
            return
        try:
            job = self.client.prepare_store(keys, self.namespace, self.kv.block_bytes,
                                            spec.parents[self.rank])
        except TierStoreError:
            logger.warning("tierstore: prepare_store failed for %s", spec.req_id, exc_info=True)
            return
        idx = [i for i, s in enumerate(job.status) if s is BlockStatus.OK]
        ok = True
        try:
            if idx:
                eng = self._ensure_engine()
                eng.wait(eng.submit_offload([block_ids[i] for i in idx], [job.slots[i] for i in idx]))
        except TierStoreError:
            ok = False
            logger.warning("tierstore: save copy failed for %s", spec.req_id, exc_info=True)
        finally:
            try:
                self.client.complete_store(job.job_id, ok=ok)
            except TierStoreError:
                logger.warning("tierstore: complete_store failed", exc_info=True)
        self.counters["save_jobs"] += 1
        if ok:
            self.counters["saved_blocks"] += len(idx)
        self.counters["present_blocks"] += sum(s is BlockStatus.PRESENT for s in job.status)
        self.counters["skipped_blocks"] += sum(s is BlockStatus.SKIPPED for s in job.status)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.client is not None:
            self.client = None
            release_client(self.settings)
