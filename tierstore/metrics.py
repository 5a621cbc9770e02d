"""Metric names and the Prometheus exporter of the daemon (prometheus-client).

Two sources feed one registry (a private ``CollectorRegistry``, never the global one):

- a collector that reads ``Store.stats()`` at scrape time (gauges for capacity and use, counters
  derived from the store's own counters: nothing is double-counted, nothing is updated on the hot
  path), and
- histograms and counters the server updates per request (latency per message type, lookup hits
  per tier, protocol errors, connections).

Names (all prefixed ``tierstore_``; the store counters each one reads are named in
tierstore/counter_names.py, the one table of counter names)::

    tier_capacity_bytes{tier}          gauge    configured capacity
    tier_used_bytes{tier}              gauge    bytes of used slots
    tier_blocks{tier}                  gauge    resident blocks
    blocks                             gauge    blocks in the index (all tiers)
    pins / pinned_blocks               gauge    pin references / blocks with at least one pin
    pending_jobs{kind}                 gauge    unfinished store / load jobs
    connections                        gauge    open client connections
    lookup_hit_blocks_total{tier}      counter  blocks a lookup found, by nearest tier
    lookup_miss_blocks_total           counter  blocks a lookup did not find (everything after the first miss)
    load_hit_blocks_total{tier}        counter  blocks loaded, by the tier they were served from
    bytes_moved_total{path}            counter  client_to_dram, dram_to_client, dram_to_nvme, nvme_to_dram
    evictions_total{tier}              counter
    checksum_failures_total            counter  NVMe records that failed verification on read
    stores_aborted_total               counter  store jobs aborted (client died, ok=False, shutdown)
    tier_degraded{tier}                gauge    1 while the tier's recent I/O fails or it owes
                                                metadata it could not commit (tiers/health.py)
    tier_io_failures_total{tier,op,error} counter  failed I/Os: op write|fsync|meta|read|zero|grow,
                                                error eio|enospc|einval|meta|oserror|compress|...
    nvme_metadata_errors_total         counter  LMDB commits that failed (full/failing filesystem)
    nvme_copies_skipped_total          counter  blocks left without an NVMe copy (write failed
                                                after its retry, or no NVMe slot)
    store_skipped_blocks_total{reason} counter  blocks a store answered SKIPPED: no_slot
                                                (every victim pinned), write_queue (write-behind full)
    write_behind_unwritten_bytes       gauge    bytes in DRAM still waiting for their NVMe copy
    write_behind_failed_blocks_total   counter  queued blocks whose NVMe write was given up
    request_seconds{op}                histogram  daemon-side handling time per message type
    request_errors_total{op}           counter  requests answered with an error
    protocol_errors_total              counter  malformed frames
    tokens_total{outcome,tier}         counter  engine tokens (MET-38), reported by the vLLM
                                                connector: outcome promised (vLLM accepted the
                                                load) = delivered + failed (I/O error, corrupt,
                                                copy) + dropped (no room to stage); declined
                                                (offered, vLLM took none); tier where the block was
    lookup_tokens_total                counter  prompt tokens engines looked up
    token_hit_ratio                    gauge    sum(tokens delivered) / lookup_tokens since start

  per peer (when [peers] is enabled; read from the daemon's peer state at scrape time)::

    peer_up{peer,address,transport}            gauge    1 while a session is up, else 0
    peer_rpc_seconds{peer,transport}           gauge    running mean of control RPC latency
    peer_bytes_read_total{peer,transport}      counter  bytes pulled from the peer (XFER-15:
    peer_blocks_read_total{peer,transport}     counter    the transport label is the one in use)
    peer_lookups_total{peer,transport}         counter  batched lookup RPCs sent
    peer_failures_total{peer,transport}        counter  failed RPCs, connects and fetches

The exporter listens on ``127.0.0.1:9464`` by default when enabled (settings ``[metrics]``); it
runs prometheus-client's own HTTP server thread (owner: this module's :class:`DaemonMetrics`).
Thread-safe: prometheus-client metrics are; the collector takes the store's lock via ``stats()``.
"""

from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tierstore import counter_names as cn
from tierstore.types import Tier

log = logging.getLogger(__name__)

PREFIX = "tierstore_"
LATENCY_BUCKETS_S = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                     50e-3, 100e-3, 250e-3, 1.0, 5.0)
_BYTES_MOVED = {cn.BYTES_WRITTEN_OF[Tier.DRAM]: "client_to_dram", cn.LOAD_BYTES: "dram_to_client",
                cn.NVME_BYTES_WRITTEN: "dram_to_nvme", cn.NVME_BYTES_READ: "nvme_to_dram"}


class _StoreCollector:
    def __init__(self, stats: Callable[[], dict]) -> None:
        self._stats = stats

    def describe(self):
        return []   # do not call stats() at registration time

    def collect(self):
        try:
            s = self._stats()
        except Exception:   # a closed store during shutdown: export nothing, never fail a scrape
            return
        c = s.get("counters", {})
        cap = GaugeMetricFamily(PREFIX + "tier_capacity_bytes", "Configured capacity", labels=["tier"])
        used = GaugeMetricFamily(PREFIX + "tier_used_bytes", "Bytes of used slots", labels=["tier"])
        blocks = GaugeMetricFamily(PREFIX + "tier_blocks", "Resident blocks", labels=["tier"])
        evict = CounterMetricFamily(PREFIX + "evictions", "Blocks evicted", labels=["tier"])
        loads = CounterMetricFamily(PREFIX + "load_hit_blocks", "Blocks loaded by source tier",
                                    labels=["tier"])
        for t in s.get("tiers", []):
            name = t["tier"]
            cap.add_metric([name], t.get("capacity_bytes", 0))
            used.add_metric([name], t.get("used_bytes", 0))
            blocks.add_metric([name], t.get("blocks", 0))
            evict.add_metric([name], c.get(cn.EVICTIONS.format(tier=name), 0))
            loads.add_metric([name], c.get(cn.LOAD_HITS.format(tier=name), 0))
        yield from (cap, used, blocks, evict, loads)
        yield GaugeMetricFamily(PREFIX + "blocks", "Blocks in the index", value=s.get("blocks", 0))
        yield GaugeMetricFamily(PREFIX + "pins", "Pin references", value=s.get("pins", 0))
        yield GaugeMetricFamily(PREFIX + "pinned_blocks", "Blocks with a pin",
                                value=s.get("pinned_blocks", 0))
        pend = GaugeMetricFamily(PREFIX + "pending_jobs", "Unfinished jobs", labels=["kind"])
        pend.add_metric(["store"], s.get("pending_stores", 0))
        pend.add_metric(["load"], s.get("pending_loads", 0))
        yield pend
        yield CounterMetricFamily(PREFIX + "lookup_miss_blocks", "Blocks a lookup did not find",
                                  value=c.get(cn.LOOKUP_MISS_BLOCKS, 0))
        moved = CounterMetricFamily(PREFIX + "bytes_moved", "Bytes moved by path", labels=["path"])
        for counter, path in _BYTES_MOVED.items():
            moved.add_metric([path], c.get(counter, 0))
        yield moved
        yield CounterMetricFamily(PREFIX + "checksum_failures", "Records failing verification",
                                  value=c.get(cn.CHECKSUM_FAILURES, 0))
        yield CounterMetricFamily(PREFIX + "stores_aborted", "Store jobs aborted",
                                  value=c.get(cn.STORES_ABORTED, 0))
        yield from _failure_families(s, c)
        yield from _token_families(s, c)
        yield from _retention_families(s)


def _token_families(s: dict, c: dict):
    """Engine token accounting (case MET-38), from the counters engines report with their
    ``complete_loads`` (``Store.account_tokens``): every ``tokens_<outcome>_<tier>`` counter is
    one series, so ``tierstore stats --json`` and this output hold the same numbers."""
    fam = CounterMetricFamily(PREFIX + "tokens", "Engine tokens by outcome (promised, delivered, "
                              "failed, dropped, declined) and tier", labels=["outcome", "tier"])
    for name, v in sorted(c.items()):
        if name.startswith(cn.TOKENS_PREFIX):
            outcome, _, tier = name[len(cn.TOKENS_PREFIX):].partition("_")
            if outcome in cn.TOKEN_OUTCOMES and tier:
                fam.add_metric([outcome, tier], v)
    yield fam
    yield CounterMetricFamily(PREFIX + "lookup_tokens", "Prompt tokens engines looked up past "
                              "their own prefix", value=c.get(cn.LOOKUP_TOKENS, 0))
    yield GaugeMetricFamily(PREFIX + "token_hit_ratio", "Delivered tokens / looked-up tokens "
                            "since start", value=s.get("token_hit_ratio", 0.0))


def _retention_families(s: dict):
    """Retention hints per tenant label (tierstore/retention.py; one series per tenant that
    sent a hint since the start, named by its label, never its cache salt)."""
    tenants = (s.get("retention") or {}).get("tenants", {})
    pinned = GaugeMetricFamily(PREFIX + "retention_pinned_blocks", "Blocks a tenant's hinted "
                               "sessions pin", labels=["tenant"])
    cap = GaugeMetricFamily(PREFIX + "retention_cap_blocks", "A tenant's cap on hinted pins",
                            labels=["tenant"])
    hints = CounterMetricFamily(PREFIX + "retention_hints", "Retention hints by outcome",
                                labels=["tenant", "outcome"])
    refused = CounterMetricFamily(PREFIX + "retention_refused_blocks", "Blocks a hint could not "
                                  "pin (over the tenant's cap or the total)", labels=["tenant"])
    for label, t in sorted(tenants.items()):
        pinned.add_metric([label], t.get("pinned_blocks", 0))
        cap.add_metric([label], t.get("cap", 0))
        hints.add_metric([label, "refused"], t.get("hints_refused", 0))
        hints.add_metric([label, "accepted"], t.get("hints", 0) - t.get("hints_refused", 0))
        refused.add_metric([label], t.get("blocks_refused", 0))
    yield from (pinned, cap, hints, refused)


def _failure_families(s: dict, c: dict):
    """What fails, as series (issue 13 item 10): tier health, I/O failures, skipped blocks."""
    degraded = GaugeMetricFamily(PREFIX + "tier_degraded",
                                 "1 while the tier's recent I/O fails or it owes metadata",
                                 labels=["tier"])
    fails = CounterMetricFamily(PREFIX + "tier_io_failures", "Failed tier I/Os by operation "
                                "and error", labels=["tier", "op", "error"])
    for tier, h in sorted((s.get("health") or {}).get("tiers", {}).items()):
        degraded.add_metric([tier], 0 if h.get("status") == "ok" else 1)
        for name, n in sorted(h.get("failures", {}).items()):
            op, _, err = name.partition("_")
            fails.add_metric([tier, op, err], n)
    yield degraded
    yield fails
    yield CounterMetricFamily(PREFIX + "nvme_metadata_errors", "LMDB commits that failed",
                              value=c.get(cn.NVME_META_ERRORS, 0))
    yield CounterMetricFamily(PREFIX + "nvme_copies_skipped", "Blocks left without an NVMe copy",
                              value=c.get(cn.NVME_STORE_SKIPPED, 0))
    skipped = CounterMetricFamily(PREFIX + "store_skipped_blocks", "Blocks a store answered "
                                  "SKIPPED, by reason", labels=["reason"])
    skipped.add_metric(["no_slot"], c.get(cn.STORE_SKIPPED, 0))
    skipped.add_metric(["write_queue"], c.get(cn.STORE_SKIPPED_WRITE_QUEUE, 0))
    yield skipped
    wb = s.get("write_behind") or {}
    yield GaugeMetricFamily(PREFIX + "write_behind_unwritten_bytes",
                            "Bytes in DRAM waiting for their NVMe copy",
                            value=wb.get("unwritten_bytes", 0))
    yield CounterMetricFamily(PREFIX + "write_behind_failed_blocks",
                              "Queued blocks whose NVMe write was given up",
                              value=wb.get("failed_blocks", 0))


class _PeerCollector:
    """Per-peer series from ``rows()`` (DaemonPeers.metric_rows: dicts, no I/O)."""

    def __init__(self, rows: Callable[[], list]) -> None:
        self._rows = rows

    def describe(self):
        return []

    def collect(self):
        try:
            rows = self._rows()
        except Exception:
            return
        up = GaugeMetricFamily(PREFIX + "peer_up", "Peer session up (1) or not (0)",
                               labels=["peer", "address", "transport"])
        rpc = GaugeMetricFamily(PREFIX + "peer_rpc_seconds", "Mean control RPC latency",
                                labels=["peer", "transport"])
        fams = {k: CounterMetricFamily(PREFIX + name, text, labels=["peer", "transport"])
                for k, name, text in (("bytes_read", "peer_bytes_read", "Bytes pulled from the peer"),
                                      ("blocks_read", "peer_blocks_read", "Blocks pulled from the peer"),
                                      ("lookups", "peer_lookups", "Batched lookup RPCs to the peer"),
                                      ("failures", "peer_failures", "Failed RPCs, connects, fetches"))}
        for r in rows:
            tr = r.get("transport") or "none"
            up.add_metric([r["name"], r["address"], tr], 1 if r.get("state") == "up" else 0)
            rpc.add_metric([r["name"], tr], r.get("avg_rpc_ms", 0.0) / 1e3)
            for k, fam in fams.items():
                fam.add_metric([r["name"], tr], r.get(k, 0))
        yield up
        yield rpc
        yield from fams.values()


class DaemonMetrics:
    """The daemon's metrics; ``start()`` opens the HTTP endpoint (optional)."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StoreCollector(stats))
        self.latency = Histogram(PREFIX + "request_seconds", "Daemon-side request handling time",
                                 ["op"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.errors = Counter(PREFIX + "request_errors", "Requests answered with an error", ["op"],
                              registry=self.registry)
        self.protocol_errors = Counter(PREFIX + "protocol_errors", "Malformed frames",
                                       registry=self.registry)
        self.lookup_hits = Counter(PREFIX + "lookup_hit_blocks", "Lookup hits by nearest tier",
                                   ["tier"], registry=self.registry)
        self.refused = Counter(PREFIX + "requests_refused", "Requests refused before reaching "
                               "the store (reason uid: a caller of another uid, SEC-26)",
                               ["reason"], registry=self.registry)
        self.connections = Gauge(PREFIX + "connections", "Open client connections",
                                 registry=self.registry)
        self._latency_children: dict[str, object] = {}
        self._hit_children: dict[int, object] = {}
        self._server = None
        self._thread = None
        self.address: tuple[str, int] | None = None

    def add_peer_source(self, rows: Callable[[], list]) -> None:
        """Export per-peer series read from ``rows()`` at scrape time (see the docstring)."""
        self.registry.register(_PeerCollector(rows))

    def observe(self, op: str, seconds: float, error: bool = False) -> None:
        child = self._latency_children.get(op)
        if child is None:
            child = self._latency_children[op] = self.latency.labels(op)
        child.observe(seconds)
        if error:
            self.errors.labels(op).inc()

    def count_lookup_hits(self, tiers: bytes, labels: Callable[[int], str]) -> None:
        """``tiers``: one byte per hit block (Tier values)."""
        for value in set(tiers):
            child = self._hit_children.get(value)
            if child is None:
                child = self._hit_children[value] = self.lookup_hits.labels(labels(value))
            child.inc(tiers.count(value))

    def start(self, host: str = "127.0.0.1", port: int = 9464) -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port`` (port 0 picks a free one); returns the address."""
        from prometheus_client import start_http_server

        if host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("metrics endpoint on non-loopback address %s: anyone who can reach it "
                        "sees block counts and traffic", host)
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.address = (host, self._server.server_port)
        return self.address

    def render(self) -> bytes:
        """The exposition text (tests, ``daemon status --metrics``)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
