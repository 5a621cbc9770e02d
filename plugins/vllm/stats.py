"""tierstore's series in vLLM's own metrics (issue 15 item 2): the connector's kv connector stats
and the Prometheus metrics vLLM's ``/metrics`` shows for them.

vLLM collects, every engine step, ``get_kv_connector_stats()`` of the workers (summed over
ranks by ``aggregate``) and of the scheduler, sends the payload (``to_dict``) to the front end,
and hands it to :class:`TierStorePromMetrics` (built by the connector's ``build_prom_metrics``),
which adds it to counters labelled with vLLM's own per-engine labels (``model_name``,
``engine``): one series per engine instance. The payload holds deltas since the previous step,
so every series below is a counter:

================================================  ============================================
``vllm:tierstore_tokens_total{outcome,tier}``      scheduler: prompt tokens by outcome —
                                                   ``promised`` (vLLM accepted the load) =
                                                   ``delivered`` + ``failed`` (I/O error,
                                                   corrupt, owed by a failed peer fetch) +
                                                   ``dropped`` (the store had no room to stage
                                                   them); ``declined`` (offered, vLLM took
                                                   none, or the request went away first) — by
                                                   the tier the block was in (hbm, dram, nvme,
                                                   peer)
``vllm:tierstore_lookup_tokens_total``             scheduler: prompt tokens looked up past
                                                   vLLM's own prefix (delivered / this = hit
                                                   ratio)
``vllm:tierstore_bytes_total{direction}``          workers: bytes copied, ``load`` (store ->
                                                   KV cache) and ``save`` (KV cache -> store),
                                                   summed over ranks
``vllm:tierstore_transfer_seconds_total{direction}``  workers: seconds from a copy's submit
                                                   until the worker saw it done
``vllm:tierstore_copies_total{direction}``         workers: batched copies done
``vllm:tierstore_load_error_blocks_total``         workers: blocks reported to vLLM as load
                                                   errors (summed over ranks)
================================================  ============================================

Payload keys (flat, summed by ``aggregate``): ``tok:<outcome>.<tier>``, ``tok:lookup`` and the
worker's ``load_bytes``, ``load_seconds``, ``load_copies``, ``save_*``, ``load_error_blocks``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                   KVConnectorStats)

OUTCOMES = ("promised", "delivered", "failed", "dropped", "declined")
TIERS = ("dram", "nvme", "hbm", "peer")   # series created at start (zeros on dashboards)
DIRECTIONS = ("load", "save")


@dataclass
class TierStoreConnectorStats(KVConnectorStats):
    """Deltas since the previous step; ``data``: key -> number (see the module docstring)."""

    def reset(self) -> None:
        self.data = {}

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def aggregate(self, other: KVConnectorStats) -> "TierStoreConnectorStats":
        for k, v in (other.data or {}).items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for k, v in sorted(self.data.items()):
            out[k.replace("tok:", "tokens_")] = round(v, 6) if isinstance(v, float) else v
        return out


def make_stats(scheduler_delta: dict | None = None,
               worker_delta: dict | None = None) -> TierStoreConnectorStats | None:
    """The stats object of one side's deltas; None when nothing changed."""
    data: dict[str, Any] = {}
    for k, v in (scheduler_delta or {}).items():
        data[f"tok:{k}"] = v
    data.update(worker_delta or {})
    return TierStoreConnectorStats(data=data) if any(data.values()) else None


class TierStorePromMetrics(KVConnectorPromMetrics):
    """Counters in vLLM's registry, one series per engine (vLLM's ``per_engine_labelvalues``)."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        C = self._counter_cls
        self._tokens = C(name="vllm:tierstore_tokens_total",
                         documentation="tierstore: prompt tokens by outcome (promised = "
                         "delivered + failed + dropped; declined) and tier",
                         labelnames=labelnames + ["outcome", "tier"])
        self._lookup = C(name="vllm:tierstore_lookup_tokens_total",
                         documentation="tierstore: prompt tokens looked up past vLLM's prefix",
                         labelnames=labelnames)
        self._bytes = C(name="vllm:tierstore_bytes_total",
                        documentation="tierstore: bytes copied per direction (load, save)",
                        labelnames=labelnames + ["direction"])
        self._seconds = C(name="vllm:tierstore_transfer_seconds_total",
                          documentation="tierstore: copy seconds per direction (submit to done)",
                          labelnames=labelnames + ["direction"])
        self._copies = C(name="vllm:tierstore_copies_total",
                         documentation="tierstore: batched copies per direction",
                         labelnames=labelnames + ["direction"])
        self._errors = C(name="vllm:tierstore_load_error_blocks_total",
                         documentation="tierstore: blocks reported to vLLM as load errors",
                         labelnames=labelnames)
        self._children: dict[tuple, Any] = {}
        for idx in per_engine_labelvalues:   # every series exists from the start
            for o in OUTCOMES:
                for t in TIERS:
                    self._child(self._tokens, idx, o, t)
            for d in DIRECTIONS:
                for m in (self._bytes, self._seconds, self._copies):
                    self._child(m, idx, d)
            self._child(self._lookup, idx)
            self._child(self._errors, idx)

    def _child(self, metric, engine_idx: int, *extra: str):
        key = (id(metric), engine_idx) + extra
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(
                *(list(self.per_engine_labelvalues[engine_idx]) + list(extra)))
        return c

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for k, v in (transfer_stats_data or {}).items():
            if not v or v < 0:
                continue
            if k == "tok:lookup":
                self._child(self._lookup, engine_idx).inc(v)
            elif k.startswith("tok:"):
                outcome, _, tier = k[4:].partition(".")
                self._child(self._tokens, engine_idx, outcome, tier or "unknown").inc(v)
            elif k == "load_error_blocks":
                self._child(self._errors, engine_idx).inc(v)
            else:
                d, _, what = k.partition("_")
                m = {"bytes": self._bytes, "seconds": self._seconds,
                     "copies": self._copies}.get(what)
                if m is not None and d in DIRECTIONS:
                    self._child(m, engine_idx, d).inc(v)
