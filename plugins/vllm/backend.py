"""Opening the store for the connector, and the identity of what vLLM stores in it.

What it owns:

- one client per process and backend (``socket`` or ``data_dir``), shared by the scheduler-side
  and worker-side connector instances of that process and reference counted (an embedded data
  dir is locked by the process that opens it, so two instances must not open it twice); plus
  unshared side connections to the daemon (``open_side_client``) for long calls;
- the :class:`Namespace` of a vLLM configuration (DESIGN §1: model id + revision, KV dtype,
  layout fingerprint, TP size/rank, PP rank, block size; a fingerprint of the weights when no
  revision names them, issue 13 item 8; the draft model of a speculative configuration whose
  KV is stored too, case SPEC-30) and the request's :class:`ExtraKeys` (cache_salt, LoRA name,
  path and weights, multimodal digests, prompt-embeddings digests);
- the keys of a request's full prompt blocks (:func:`request_keys`) and of a P/D partial tail
  block (:func:`tail_keys`), the latter addressed by request identity, never by prefix.

Weights fingerprint (:func:`weights_fingerprint`): vLLM's ``revision`` is None for a local
model directory, so new weights at the same path would otherwise reuse the old KV. The
fingerprint covers, for every ``*.safetensors`` file of the directory, its name, size, JSON
header (tensor names, dtypes, shapes, offsets) and the first 4 KiB of every tensor's data; for
other weight files (``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``) the name, size and first and
last 64 KiB (a torch zip ends in its central directory, which holds every record's CRC); and the
bytes of ``config.json``. It reads a few MiB even for a large model, never the weights, and is
the same on every node that holds a copy of the same files (no mtimes). For a hub model id
without a revision, the commit of the snapshot in the local Hugging Face cache stands for it.

Only ``tierstore.client`` and value modules are imported (plugins/ sits above the client).
Threading: the registry is guarded by a lock; everything else is pure.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

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
            try:   # retention hints' caps (issue 15 item 5): refused when DRAM cannot hold them
                client.store.configure_retention(settings.retention_config())
            except BaseException:
                client.close()
                raise
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


_reporters: dict[tuple[str, str], list[Callable[[], dict]]] = {}


def add_reporter(settings: PluginSettings, report: Callable[[], dict]) -> None:
    """A worker half in this process registers how to hand over its finished, unreported save
    copies (``{store job: per-key ok}``) at shutdown: an in-process engine (``LLM`` with
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) stops stepping when its last request finished, so the
    scheduler half collects them itself (see ``SchedulerSide.shutdown``)."""
    with _lock:
        _reporters.setdefault(_backend_id(settings), []).append(report)


def remove_reporter(settings: PluginSettings, report: Callable[[], dict]) -> None:
    with _lock:
        lst = _reporters.get(_backend_id(settings), [])
        if report in lst:
            lst.remove(report)


def collect_reports(settings: PluginSettings) -> dict:
    """Every registered worker half's unreported save results for this backend (this process)."""
    with _lock:
        reporters = list(_reporters.get(_backend_id(settings), []))
    out: dict = {}
    for report in reporters:
        try:
            out.update(report())
        except Exception:   # pragma: no cover - best effort at shutdown
            logger.exception("collecting a worker's save reports failed")
    return out


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
class GroupGeo:
    """One KV-cache group of a hybrid model, as the namespace and the scheduler see it:
    ``kind`` ``"full"`` or ``"sliding_window"``; ``window_blocks`` blocks before a resume point
    hold the window (0: full); ``identity`` goes into the namespace's ``kv_group``."""

    kind: str
    window_blocks: int
    num_layers: int
    num_kv_heads: int
    head_size: int
    use_mla: bool
    identity: str
    layer_names: tuple[str, ...] = ()

    @property
    def sliding(self) -> bool:
        return self.kind == "sliding_window"


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
    weights: str = ""
    speculative: str = ""
    key_source: str = ""     # "" = Keyer.chain over token ids; else "vllm-<algo>:<seed id>"
    kv_layout: str = TAIL_LAYOUT   # + "+cpu-<isa>" where vLLM's CPU attention packs the cache
    groups: tuple[GroupGeo, ...] = ()   # a hybrid model's KV-cache groups (() for one group)

    @property
    def engine_hash_algo(self) -> str | None:
        """vLLM's block-hash algorithm the keys are derived from (None: token ids)."""
        return self.key_source.split(":")[0].removeprefix("vllm-") if self.key_source else None

    @property
    def num_ranks(self) -> int:
        return self.tp_size * self.pp_size

    def namespace(self, rank_index: int) -> Namespace:
        pp_rank, tp_rank = divmod(rank_index, self.tp_size)
        return Namespace(model=self.model, revision=self.revision, block_size=self.block_size,
                         kv_dtype=self.kv_dtype, kv_layout=self.kv_layout,
                         num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                         head_size=self.head_size, use_mla=self.use_mla, tp_size=self.tp_size,
                         tp_rank=tp_rank, pp_rank=pp_rank, weights=self.weights,
                         speculative=self.speculative, key_source=self.key_source)

    def rank_index(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    # A *lane* is one (KV-cache group, rank) pair: lane = group * num_ranks + rank_index. Every
    # lane has its own namespace and key chain; a one-group model has one lane per rank, with
    # exactly the namespaces (and keys) of before.
    @property
    def hybrid(self) -> bool:
        return bool(self.groups)

    @property
    def num_groups(self) -> int:
        return max(1, len(self.groups))

    @property
    def num_lanes(self) -> int:
        return self.num_ranks * self.num_groups

    def lane(self, group: int, rank_index: int) -> int:
        return group * self.num_ranks + rank_index

    def lane_namespace(self, lane: int) -> Namespace:
        """The namespace of ``lane``: the rank's, with the group's layers, heads and identity
        (``kv_group``) for a hybrid model."""
        g, r = divmod(lane, self.num_ranks)
        ns = self.namespace(r)
        if not self.groups:
            return ns
        import dataclasses

        grp = self.groups[g]
        return dataclasses.replace(ns, num_layers=grp.num_layers, num_kv_heads=grp.num_kv_heads,
                                   head_size=grp.head_size, use_mla=grp.use_mla,
                                   kv_group=grp.identity)

    @property
    def max_block_bytes(self) -> int:
        """The largest block of any lane (the embedded store's slot size)."""
        return max(self.lane_namespace(i).block_bytes for i in range(self.num_lanes))


# ---------------------------------------------------------------------------- weights identity
_TENSOR_SAMPLE_BYTES = 4096
_FILE_SAMPLE_BYTES = 64 << 10
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf")
_fingerprints: dict[str, str] = {}
_fp_lock = threading.Lock()


def _field(h, name: str, value: bytes) -> None:
    h.update(struct.pack("<B", len(name)) + name.encode() + struct.pack("<Q", len(value)) + value)


def _safetensors_sample(h, path: Path) -> None:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            _field(h, "short", raw)
            return
        (n,) = struct.unpack("<Q", raw)
        header = f.read(min(n, 100 << 20))
        _field(h, "header", header)
        try:
            tensors = json.loads(header)
        except ValueError:
            return
        base = 8 + n
        for name in sorted(k for k in tensors if k != "__metadata__"):
            offs = (tensors[name] or {}).get("data_offsets") or [0, 0]
            begin, end = int(offs[0]), int(offs[1])
            f.seek(base + begin)
            _field(h, "t", f.read(max(0, min(end - begin, _TENSOR_SAMPLE_BYTES))))


def weights_fingerprint(path: str | os.PathLike, *, cached: bool = True) -> str:
    """A 32-hex-digit fingerprint of the model files in local directory ``path`` (module
    docstring), or ``""`` when ``path`` is not a local directory. Computed once per process and
    path unless ``cached`` is False."""
    p = Path(path)
    if not p.is_dir():
        return ""
    key = str(p.resolve())
    if cached:
        with _fp_lock:
            if key in _fingerprints:
                return _fingerprints[key]
    h = hashlib.blake2b(digest_size=16, person=b"tierstore.wfp1")
    for f in sorted(p.iterdir()):
        if not f.is_file():
            continue
        name = f.name
        if name.endswith(".safetensors"):
            _field(h, "file", name.encode() + struct.pack("<Q", f.stat().st_size))
            _safetensors_sample(h, f)
        elif name.endswith(_OTHER_WEIGHTS):
            size = f.stat().st_size
            _field(h, "file", name.encode() + struct.pack("<Q", size))
            with open(f, "rb") as fh:
                _field(h, "head", fh.read(_FILE_SAMPLE_BYTES))
                fh.seek(max(0, size - _FILE_SAMPLE_BYTES))
                _field(h, "tail", fh.read(_FILE_SAMPLE_BYTES))
        elif name in ("config.json", "adapter_config.json") or name.endswith(".index.json"):
            _field(h, "json", name.encode() + b"\0" + f.read_bytes())
    fp = h.hexdigest()
    if cached:
        with _fp_lock:
            _fingerprints[key] = fp
    return fp


def _hub_commit(model: str, revision: str | None) -> str:
    """The snapshot commit of a hub model id in the local Hugging Face cache, or ""."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:
        return ""
    if not isinstance(found, str):
        return ""
    parts = Path(found).parts
    return parts[-2] if len(parts) >= 2 and parts[-3] == "snapshots" else ""


def model_identity(model_config, *, fingerprint: bool = True) -> tuple[str, str, str]:
    """``(model, revision, weights)`` of a vLLM ``ModelConfig``: ``weights`` is the fingerprint
    of a local directory, or ``hf:<commit>`` of a cached hub snapshot, and only when no
    revision names the weights already (issue 13 item 8); "" otherwise."""
    if model_config is None:
        return "", "", ""
    model = str(getattr(model_config, "model", "") or "")
    revision = str(getattr(model_config, "revision", None) or "")
    if revision or not fingerprint or not model:
        return model, revision, ""
    fp = weights_fingerprint(model)
    if not fp:
        commit = _hub_commit(model, None)
        fp = f"hf:{commit}" if commit else ""
    return model, revision, fp


def geometry_from_vllm(vllm_config, kv_cache_config, settings: PluginSettings,
                       shape=None) -> Geometry:
    """Read the namespace fields from vLLM's config: the per-layer KV shape from ``shape`` (the
    :class:`~tierstore_plugins.vllm.support.KVShape` that ``support.check_engine`` returned)
    when given, else from the KV-cache spec or the model config."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    use_mla = bool(getattr(mc, "use_mla", False))
    num_draft_layers, speculative = 0, ""
    if shape is not None and shape.layer_names:
        block_size, heads, head_size, dtype = (shape.block_size, shape.num_kv_heads,
                                               shape.head_size, shape.dtype)
        use_mla = use_mla or shape.use_mla
    else:
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        if len(groups) > 1:
            raise ConfigError("TierStoreConnector supports one KV-cache group (no hybrid models)")
        if groups:
            spec = groups[0].kv_cache_spec
            block_size, heads, head_size, dtype = (spec.block_size, spec.num_kv_heads,
                                                   spec.head_size, spec.dtype)
        else:
            block_size = cc.block_size
            heads = 1 if use_mla else mc.get_num_kv_heads(pc)
            head_size, dtype = mc.get_head_size(), mc.dtype
    if shape is not None:
        num_draft_layers, speculative = shape.num_draft_layers, shape.speculative
    num_layers = int(getattr(mc.hf_text_config, "num_hidden_layers", 0) or 0) + num_draft_layers
    model, revision, weights = model_identity(
        mc, fingerprint=bool(settings.weights_fingerprint) and not settings.revision)
    if settings.weights_version:
        weights = (f"fp={weights};" if weights else "") + f"version={settings.weights_version}"
    elif weights:
        weights = f"fp={weights}"
    groups: tuple[GroupGeo, ...] = ()
    if shape is not None and shape.groups:
        if int(pc.pipeline_parallel_size) > 1:
            raise ConfigError("TierStoreConnector: a hybrid KV cache (several KV-cache groups) "
                              "with pipeline parallelism is not supported; use PP = 1")
        groups = tuple(GroupGeo(kind=g.kind, window_blocks=g.window_blocks,
                                num_layers=len(g.layer_names), num_kv_heads=int(g.num_kv_heads),
                                head_size=int(g.head_size), use_mla=bool(g.use_mla),
                                identity=g.identity(), layer_names=tuple(g.layer_names))
                       for g in shape.groups)
    return Geometry(model=settings.model_id or model,
                    revision=settings.revision or revision,
                    kv_dtype=_dtype_name(dtype, getattr(cc, "cache_dtype", None)),
                    num_layers=num_layers, num_kv_heads=int(heads), head_size=int(head_size),
                    use_mla=use_mla, block_size=int(block_size),
                    tp_size=int(pc.tensor_parallel_size), pp_size=int(pc.pipeline_parallel_size),
                    weights=weights, speculative=speculative,
                    key_source=key_source(vllm_config, kv_cache_config, settings,
                                          int(block_size), bool(speculative)),
                    kv_layout=kv_layout(getattr(mc, "dtype", dtype), int(block_size),
                                        int(head_size), getattr(cc, "cache_dtype", None)),
                    groups=groups)


def kv_layout(dtype, block_size: int, head_size: int, cache_dtype: str | None) -> str:
    """The namespace's ``kv_layout``: ``"HNC"`` (per layer ``[num_blocks, H, N, K|V]``), plus
    ``"+cpu-<isa>"`` on vLLM's CPU platform, whose attention writes the cache in a packing of
    the kernel it picked (``cpu_attn._get_attn_isa``: ``amx``, ``vec``, ``vec16``, ``neon``,
    ...; ``cpu_attn_reshape_and_cache`` takes the ISA). Blocks written by the AMX kernel read
    back through the vec kernel give wrong attention with no error (found by issue 13's P/D
    runs with AMX turned off), so engines whose kernels differ never share a namespace.
    Anything that cannot be asked (no vLLM, a GPU platform) is plain ``"HNC"``."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return TAIL_LAYOUT
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(dtype, block_size, head_size, cache_dtype)
    except Exception:   # noqa: BLE001 - another vLLM or none: nothing known to pack the cache
        return TAIL_LAYOUT
    return f"{TAIL_LAYOUT}+cpu-{isa}" if isa else TAIL_LAYOUT


def key_source(vllm_config, kv_cache_config, settings: PluginSettings, block_size: int,
               speculative: bool) -> str:
    """How block keys are derived (issue 12 item 5): ``""`` for tierstore's keyed chain over
    token ids, or ``"vllm-<algo>:<seed id>"`` for a keyed hash of vLLM's own block hashes
    (``Keyer.chain_from_engine_hashes``; 2-3x cheaper per block, computed by vLLM anyway).

    vLLM's hashes qualify when they are collision resistant and the same in every process:
    ``sha256`` / ``sha256_cbor`` (their chain root is fixed unless ``PYTHONHASHSEED`` is set,
    whose digest joins the namespace so engines with other seeds never meet), one hash per
    block of ``block_size`` tokens, and no lookahead tokens (speculative decoding). ``keys =
    "auto"`` takes them when they qualify; ``"engine"`` refuses to start when they do not;
    ``"tokens"`` never takes them."""
    if settings.keys == "tokens":
        return ""
    algo = str(getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "") or "")
    hbs = getattr(kv_cache_config, "hash_block_size", None) or block_size
    why = None
    if algo not in ("sha256", "sha256_cbor"):
        why = f"vLLM's prefix-caching hash {algo or 'unknown'!r} is not sha256/sha256_cbor"
    elif int(hbs) != block_size:
        why = f"vLLM hashes blocks of {hbs} tokens, not {block_size}"
    elif speculative:
        why = "speculative decoding adds lookahead tokens to vLLM's block hashes"
    elif not _engine_root_is_fixed():
        why = "this vLLM may seed its block hashes per process (no DEFAULT_NONE_HASH_SEED)"
    if why is not None:
        if settings.keys == "engine":
            raise ConfigError(f"TierStoreConnector keys='engine': {why}; use keys='tokens'")
        return ""
    seed = os.environ.get("PYTHONHASHSEED")
    seed_id = "default" if seed is None else hashlib.blake2b(
        seed.encode(), digest_size=4).hexdigest()
    return f"vllm-{algo}:{seed_id}"


def _engine_root_is_fixed() -> bool:
    """True where vLLM derives its hash chain's root from a fixed seed for sha256 algorithms
    (``kv_cache_utils.DEFAULT_NONE_HASH_SEED``, vLLM >= 0.32); older releases drew a random
    root per process, so their hashes never match across a restart."""
    try:
        from vllm.v1.core import kv_cache_utils
    except Exception:   # noqa: BLE001 - no vLLM (the stand-in engine of the unit tests)
        return False
    return isinstance(getattr(kv_cache_utils, "DEFAULT_NONE_HASH_SEED", None), str)


# ---------------------------------------------------------------------------- request identity
def _embeds_mask(request, n: int) -> list[bool] | None:
    """Per prompt position: True where the model reads the token id, False where it reads the
    prompt-embeddings row (vLLM's rules: no token ids = all embeddings; token ids and
    embeddings without a mask = all token ids); None for a request without embeddings."""
    if getattr(request, "prompt_embeds", None) is None:
        return None
    tokens = getattr(request, "prompt_token_ids", None)
    if tokens is None:
        return [False] * n
    mask = getattr(request, "prompt_is_token_ids", None)
    return [True] * n if mask is None else [bool(m) for m in mask]


def prompt_tokens(request) -> list[int]:
    """The prompt's token ids as the model reads them: positions that read a prompt-embeddings
    row hold 0 (their identity is in the ``"emb"`` digest), as in vLLM's own ``Request``."""
    tokens = getattr(request, "prompt_token_ids", None)
    n = int(getattr(request, "num_prompt_tokens", None) or len(tokens or ()))
    mask = _embeds_mask(request, n)
    if mask is None:
        return list(tokens or [])
    if tokens is None:
        return [0] * n
    return [t if m else 0 for t, m in zip(tokens, mask)]


def embeds_digest(request, start: int, end: int, mask: list[bool] | None = None) -> bytes:
    """Digest of prompt positions ``[start, end)`` of a request with prompt embeddings (case
    KEY-29): the token/embeddings mask of those positions, the embeddings' dtype and width, and
    the rows of the positions that read an embedding. 32 bytes of BLAKE2b; every part tagged
    and length-prefixed."""
    import torch

    emb = request.prompt_embeds
    if mask is None:
        mask = _embeds_mask(request, int(emb.shape[0]))
    m = mask[start:end]
    h = hashlib.blake2b(digest_size=32, person=b"tierstore.emb1")
    _field(h, "dtype", str(emb.dtype).encode())
    _field(h, "width", struct.pack("<Q", int(emb.shape[1])))
    _field(h, "mask", bytes(int(x) for x in m))
    rows = [start + i for i, is_tok in enumerate(m) if not is_tok]
    if rows:
        sel = emb[rows[0]:rows[-1] + 1] if rows == list(range(rows[0], rows[-1] + 1)) else emb[rows]
        data = sel.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    else:
        data = b""
    _field(h, "rows", data)
    return h.digest()


def lora_identity(lora) -> tuple[str | None, str | None, str | None]:
    """``(name, path, weights fingerprint)`` of a vLLM ``LoRARequest`` (issue 13 item 6). The
    engine-local ``lora_int_id`` is left out: the same adapter may carry other ids in other
    engines."""
    if lora is None:
        return None, None, None
    name = str(getattr(lora, "lora_name", "") or "")
    path = str(getattr(lora, "lora_path", None) or getattr(lora, "lora_local_path", None) or "")
    return name, path, (weights_fingerprint(path) if path else "") or None


def _mm_spans(request):
    """``(identifier, start, end)`` token positions of each multimodal item that has both."""
    for f in getattr(request, "mm_features", None) or []:
        pos = getattr(f, "mm_position", None)
        ident = getattr(f, "identifier", None) or getattr(f, "mm_hash", None)
        if pos is not None and ident is not None:
            yield ident, pos.offset, pos.offset + pos.length


def extras_of(request, block_size: int) -> ExtraKeys:
    """cache_salt, LoRA adapter, per-block multimodal digests and per-block prompt-embeddings
    digests of a vLLM ``Request``; every field tagged (tierstore.keys.ExtraKeys)."""
    lora_name, lora_path, lora_weights = lora_identity(getattr(request, "lora_request", None))
    mm: dict[int, list[str]] = {}
    bs = block_size
    for ident, start, end in _mm_spans(request):
        for b in range(start // bs, (end - 1) // bs + 1):
            mm.setdefault(b, []).append(f"{ident}@{start - b * bs}")
    embeds = None
    if getattr(request, "prompt_embeds", None) is not None:
        n = int(request.prompt_embeds.shape[0])
        mask = _embeds_mask(request, n)
        embeds = {b: embeds_digest(request, b * bs, (b + 1) * bs, mask) for b in range(n // bs)}
    return ExtraKeys(cache_salt=getattr(request, "cache_salt", None) or None,
                     mm=mm or None, lora_name=lora_name, lora_path=lora_path,
                     lora_weights=lora_weights, embeds=embeds or None)


def request_keys(keyers: Sequence[Keyer], request, block_size: int,
                 engine_algo: str | None = None) -> list[list[BlockKey]]:
    """Keys of the request's full prompt blocks, one list per keyer (rank).

    With ``engine_algo`` (Geometry.engine_hash_algo), from vLLM's own ``request.block_hashes``
    (they chain over the prefix and carry multimodal identifiers and the cache salt); a request
    with fewer engine hashes than full prompt blocks keys only those. Requests with a LoRA
    adapter or prompt embeddings always key from token ids with tierstore's extras: vLLM hashes
    a LoRA by name and path only (not its weights, issue 13 item 6) and embedding rows without
    the token/embeddings mask (case KEY-29), so its hashes would let such requests meet. The two
    derivations are different hash domains (BLAKE2s over engine hashes, the BLAKE2b chain), so
    their keys never collide; each request always gets the same one."""
    if engine_algo and getattr(request, "lora_request", None) is None \
            and getattr(request, "prompt_embeds", None) is None:
        n_full = request.num_prompt_tokens // block_size
        hashes = [bytes(h) for h in list(getattr(request, "block_hashes", None) or [])[:n_full]]
        return [k.chain_from_engine_hashes(hashes, engine_algo) for k in keyers]
    tokens = prompt_tokens(request)
    extras = extras_of(request, block_size)
    return [k.chain(tokens, extras) for k in keyers]


def tail_keys(keyers: Sequence[Keyer], request, n_full: int, transfer_id: str,
              parents: Sequence[BlockKey | None]) -> list[BlockKey]:
    """Keys of the partial tail after ``n_full`` full blocks, one per keyer (rank); a request
    with prompt embeddings adds the tail's embeddings digest."""
    bs = keyers[0].block_size
    tail = prompt_tokens(request)[n_full * bs:]
    extra = b""
    if getattr(request, "prompt_embeds", None) is not None:
        extra = embeds_digest(request, n_full * bs, n_full * bs + len(tail))
    extra += _tail_identity(request, n_full, bs)
    return [tail_key(k, transfer_id, parents[r], tail, extra) for r, k in enumerate(keyers)]


def _tail_identity(request, n_full: int, bs: int) -> bytes:
    """What the tail's KV depends on beyond its token ids and the previous full block's key:
    the multimodal items that reach into the tail (identifier and offset, as the full blocks
    key them), and, for a prompt shorter than one block (no parent key), the cache salt and
    the LoRA identity. Tagged and length-prefixed; ``b""`` for a plain request, so its tail
    keys as before. Found by an adversarial review: two requests with the same token ids and
    another image in the unfinished last block shared the tail, and a replayed P/D ticket
    loaded the other image's KV."""
    fields: list[tuple[bytes, str]] = []
    lo = n_full * bs
    for ident, start, end in _mm_spans(request):   # as extras_of keys full blocks
        if end > lo:
            fields.append((b"mm", f"{ident}@{start - lo}"))
    if n_full == 0:
        name, path, weights = lora_identity(getattr(request, "lora_request", None))
        salt = getattr(request, "cache_salt", None) or None
        for tag, v in ((b"salt", salt), (b"lora.name", name), (b"lora.path", path),
                       (b"lora.weights", weights)):
            if v is not None:
                fields.append((tag, str(v)))
    if not fields:
        return b""
    h = hashlib.sha256()
    for tag, v in fields:
        b = v.encode("utf-8", "surrogatepass")
        h.update(struct.pack("<I", len(tag)) + tag + struct.pack("<I", len(b)) + b)
    return b"id" + h.digest()


def tail_key(keyer: Keyer, transfer_id: str, parent: BlockKey | None,
             tokens: Sequence[int], extra: bytes = b"") -> BlockKey:
    """Key of a P/D partial tail block: keyed BLAKE2b over (namespace, transfer id, the previous
    full block's key, the tail's token ids, and ``extra``: the tail's prompt-embeddings digest,
    left out when empty). Its own personalisation keeps it apart from every prefix key (DESIGN
    §2: a partial tail is addressed by request, never by prefix)."""
    h = hashlib.blake2b(digest_size=32, key=keyer.secret[:64], person=b"tierstore.tail1")
    tid = transfer_id.encode()
    h.update(keyer.namespace.digest())
    h.update(struct.pack("<I", len(tid)) + tid)
    h.update(struct.pack("<I", len(parent or b"")) + (parent or b""))
    h.update(struct.pack("<I", len(tokens)) + struct.pack(f"<{len(tokens)}I", *tokens))
    if extra:
        h.update(b"emb" + struct.pack("<I", len(extra)) + extra)
    return h.digest()


TICKET_FIELDS = ("version", "transfer_id", "namespace", "block_size", "num_prompt_tokens",
                 "tail_tokens")
"""The fields of tierstore's P/D hand-off params (``kv_transfer_params["tierstore"]``) that its
``mac`` covers; the params hold these and ``mac``, nothing else (no address: a consumer finds
peers only through its daemon's membership, case SEC-28)."""


def ticket_mac(secret: bytes, params: dict, tokens: Sequence[int]) -> str:
    """The MAC of a P/D hand-off ticket: hex HMAC-SHA256 under a key derived from the cluster
    secret (``HMAC(secret, "tierstore pd ticket v1")``: used for nothing else) over each of
    :data:`TICKET_FIELDS` (name and JSON value, length-prefixed) and the prompt's token ids
    (``<q`` each, count first). Only a producer holding the cluster secret can issue one, and
    it holds only for the prompt it was issued for (case SEC-28: a client forging or
    replaying params gets them rejected, and nothing is fetched on their account)."""
    key = hmac.new(secret, b"tierstore pd ticket v1", hashlib.sha256).digest()
    h = hmac.new(key, digestmod=hashlib.sha256)
    for name in TICKET_FIELDS:
        v = json.dumps(params.get(name), sort_keys=True).encode()
        h.update(struct.pack("<I", len(name)) + name.encode() + struct.pack("<I", len(v)) + v)
    h.update(struct.pack("<I", len(tokens)) + struct.pack(f"<{len(tokens)}q", *tokens))
    return h.hexdigest()


def ticket_problem(secret: bytes, params: Any, tokens: Sequence[int]) -> str:
    """Why ``params`` are not a genuine ticket for a prompt of ``tokens`` ("" when they are):
    not a map, fields beyond :data:`TICKET_FIELDS` and ``mac`` (an address, a peer, anything a
    client added), no mac, or a mac that does not verify (forged, altered, another prompt, or
    a producer with another cluster secret)."""
    if not isinstance(params, dict):
        return "the params are not a map"
    extra = sorted(str(k) for k in set(params) - set(TICKET_FIELDS) - {"mac"})
    if extra:
        return f"unexpected fields {extra[:5]} (tierstore takes no addresses from a request)"
    mac = params.get("mac")
    if not isinstance(mac, str):
        return (f"no mac (params version {params.get('version')!r}: a producer older than "
                "version 2, or params not made by a producer)")
    if len(mac) != 64 or not mac.isascii():   # compare_digest refuses non-ASCII str
        return "the mac is not 64 hex digits"
    try:
        want = ticket_mac(secret, params, tokens)
    except Exception as e:   # noqa: BLE001 - any value a client sent: never the engine's crash
        return f"cannot be checked: {type(e).__name__}: {e}"
    if not hmac.compare_digest(mac, want):
        return ("the mac does not verify (forged or altered params, params of another prompt, "
                "or a producer with another cluster secret)")
    return ""
