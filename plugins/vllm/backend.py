"""Opening the store for the connector, and the identity of what vLLM stores in it.

What it owns:

- one client per process and backend (``socket`` or ``data_dir``), shared by the scheduler-side
  and worker-side connector instances of that process and reference counted (an embedded data
  dir is locked by the process that opens it, so two instances must not open it twice); plus
  unshared side connections to the daemon (``open_side_client``) for long calls;
- the :class:`Namespace` of a vLLM configuration (DESIGN §1: model id + revision, KV dtype,
  layout fingerprint, TP size/rank, PP rank, block size) and the request's :class:`ExtraKeys`
  (cache_salt, LoRA, multimodal digests);
- the key of a P/D partial tail block, addressed by request identity, never by prefix.

Only ``tierstore.client`` and value modules are imported (plugins/ sits above the client).
Threading: the registry is guarded by a lock; everything else is pure.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from tierstore.client import Client, open_client
from tierstore.config import DramConfig, NvmeConfig, StoreConfig
from tierstore.errors import ConfigError
from tierstore.keys import ExtraKeys, Keyer, Namespace, load_secret
from tierstore.types import BlockKey

from tierstore_plugins.vllm.metadata import PluginSettings

logger = logging.getLogger("tierstore.vllm")

TAIL_LAYOUT = "HNC"
"""Namespace layout: tierstore's block byte format (tierstore/io/copy.py) is the C-order of
vLLM's logical ``[H, N, C]`` page per layer, whatever the physical ``KVCacheLayout``; so blocks
are exchangeable between engines with different physical layouts of the same model."""

_DTYPES = {"float8_e4m3fn": "fp8_e4m3", "float8_e5m2": "fp8_e5m2", "fp8": "fp8_e4m3"}


# ---------------------------------------------------------------------------- client registry
@dataclass
class _Entry:
    client: Any
    refs: int


_lock = threading.Lock()
_clients: dict[tuple[str, str], _Entry] = {}


def _backend_id(s: PluginSettings) -> tuple[str, str]:
    return ("socket", str(s.socket)) if s.socket else ("dir", str(s.data_dir))


def acquire_client(settings: PluginSettings, block_bytes: int):
    """The process's client for ``settings``' backend, opened on first use.

    An embedded data dir is created with slots of ``block_bytes`` (an existing one keeps its
    own config; a block larger than its slots is refused by the store at the first save).
    """
    bid = _backend_id(settings)
    with _lock:
        e = _clients.get(bid)
        if e is not None:
            e.refs += 1
            return e.client
        secret = load_secret(path=settings.secret_file) if settings.secret_file else None
        if settings.socket:
            client = open_client(socket=settings.socket, secret=secret)
        else:
            dram_blocks = max(1, int(settings.dram_bytes) // block_bytes)
            nvme_blocks = int(settings.nvme_bytes) // block_bytes
            nvme = (NvmeConfig(path="", capacity_blocks=nvme_blocks,
                               write_through=bool(settings.nvme_write_through))
                    if nvme_blocks > 0 else None)
            cfg = StoreConfig(slot_bytes=block_bytes, dram=DramConfig(capacity_blocks=dram_blocks),
                              nvme=nvme)
            client = Client.embedded(settings.data_dir, cfg, secret=secret, create=True)
        _clients[bid] = _Entry(client, 1)
        return client


def release_client(settings: PluginSettings) -> None:
    bid = _backend_id(settings)
    with _lock:
        e = _clients.get(bid)
        if e is None:
            return
        e.refs -= 1
        if e.refs <= 0:
            del _clients[bid]
            try:
                e.client.close()
            except Exception:  # pragma: no cover - best effort at shutdown
                logger.exception("closing the tierstore client failed")


def open_side_client(settings: PluginSettings):
    """A daemon connection of its own (not shared, not reference counted), for a caller that
    must not hold up the process's shared client: the scheduler's peer fetcher, whose
    ``fetch_remote`` calls last as long as the transfer. The caller closes it."""
    if not settings.socket:
        raise ConfigError("a side connection needs the daemon ('socket')")
    secret = load_secret(path=settings.secret_file) if settings.secret_file else None
    return open_client(socket=settings.socket, secret=secret)


def slab_of(client) -> tuple[memoryview, int, int]:
    """``(buffer, num_slots, slot_bytes)`` of the client's DRAM slab (slot ``i`` lives at
    ``[i * slot_bytes, (i + 1) * slot_bytes)``), for one batched copy per request."""
    return client.slab()


# ---------------------------------------------------------------------------- identity
def _dtype_name(dtype: Any, cache_dtype: str | None) -> str:
    if cache_dtype and cache_dtype != "auto":
        return _DTYPES.get(cache_dtype, cache_dtype)
    name = str(dtype).removeprefix("torch.")
    return _DTYPES.get(name, name)


@dataclass(frozen=True)
class Geometry:
    """What the scheduler knows about the KV of every rank (all ranks share it but the rank)."""

    model: str
    revision: str
    kv_dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    use_mla: bool
    block_size: int
    tp_size: int
    pp_size: int

    @property
    def num_ranks(self) -> int:
        return self.tp_size * self.pp_size

    def namespace(self, rank_index: int) -> Namespace:
        pp_rank, tp_rank = divmod(rank_index, self.tp_size)
        return Namespace(model=self.model, revision=self.revision, block_size=self.block_size,
                         kv_dtype=self.kv_dtype, kv_layout=TAIL_LAYOUT,
                         num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                         head_size=self.head_size, use_mla=self.use_mla, tp_size=self.tp_size,
                         tp_rank=tp_rank, pp_rank=pp_rank)

    def rank_index(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank


def geometry_from_vllm(vllm_config, kv_cache_config, settings: PluginSettings) -> Geometry:
    """Read the namespace fields from vLLM's config (the KV-cache spec when there is one)."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    if len(groups) > 1:
        raise ConfigError("TierStoreConnector supports one KV-cache group (no hybrid models)")
    use_mla = bool(getattr(mc, "use_mla", False))
    if groups:
        spec = groups[0].kv_cache_spec
        block_size, heads, head_size, dtype = (spec.block_size, spec.num_kv_heads,
                                               spec.head_size, spec.dtype)
    else:
        block_size = cc.block_size
        heads = 1 if use_mla else mc.get_num_kv_heads(pc)
        head_size, dtype = mc.get_head_size(), mc.dtype
    num_layers = int(getattr(mc.hf_text_config, "num_hidden_layers", 0) or 0)
    return Geometry(model=settings.model_id or str(mc.model),
                    revision=settings.revision or str(mc.revision or ""),
                    kv_dtype=_dtype_name(dtype, getattr(cc, "cache_dtype", None)),
                    num_layers=num_layers, num_kv_heads=int(heads), head_size=int(head_size),
                    use_mla=use_mla, block_size=int(block_size),
                    tp_size=int(pc.tensor_parallel_size), pp_size=int(pc.pipeline_parallel_size))


def extras_of(request, block_size: int) -> ExtraKeys:
    """cache_salt, LoRA adapter and per-block multimodal digests of a vLLM ``Request``."""
    lora = getattr(request, "lora_request", None)
    lora_id = None
    if lora is not None:
        lora_id = f"{getattr(lora, 'lora_name', '')}|{getattr(lora, 'lora_path', '') or ''}"
    mm: dict[int, list[str]] = {}
    bs = block_size
    for f in getattr(request, "mm_features", None) or []:
        pos = getattr(f, "mm_position", None)
        ident = getattr(f, "identifier", None) or getattr(f, "mm_hash", None)
        if pos is None or ident is None:
            continue
        start, end = pos.offset, pos.offset + pos.length
        for b in range(start // bs, (end - 1) // bs + 1):
            mm.setdefault(b, []).append(f"{ident}@{start - b * bs}")
    return ExtraKeys(cache_salt=getattr(request, "cache_salt", None) or None, lora=lora_id,
                     mm=mm or None)


def tail_key(keyer: Keyer, transfer_id: str, parent: BlockKey | None,
             tokens: Sequence[int]) -> BlockKey:
    """Key of a P/D partial tail block: keyed BLAKE2b over (namespace, transfer id, the previous
    full block's key, the tail's token ids). Its own personalisation keeps it apart from every
    prefix key (DESIGN §2: a partial tail is addressed by request, never by prefix)."""
    h = hashlib.blake2b(digest_size=32, key=keyer.secret[:64], person=b"tierstore.tail1")
    tid = transfer_id.encode()
    h.update(keyer.namespace.digest())
    h.update(struct.pack("<I", len(tid)) + tid)
    h.update(struct.pack("<I", len(parent or b"")) + (parent or b""))
    h.update(struct.pack("<I", len(tokens)) + struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()
