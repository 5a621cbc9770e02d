"""Block keys: a namespace digest plus a keyed chain hash over full blocks (DESIGN §2).

Formula (BLAKE2b, RFC 7693, keyed mode, 32-byte digest, personalisation ``b"tierstore.key.v1"``)::

    key_0 = BLAKE2b(key=secret)( F("ns", ns_digest) F("parent", b"") F(tag, payload_0) F("x", extra_0) )
    key_i = BLAKE2b(key=secret)( F("ns", ns_digest) F("parent", key_{i-1}) F(tag, payload_i) F("x", extra_i) )

where ``F(name, value) = u8(len(name)) name u32le(len(value)) value`` — every field enters tagged
and length-prefixed, so ("ab", "c") and ("a", "bc") differ and a LoRA name can never equal a salt.

- ``payload_i`` is the block's token ids as little-endian uint32 (tag ``"tok"``), or, in trace
  replay, the trace's block id as little-endian uint64 (tag ``"bid"``).
- ``extra_i`` is the concatenation of tagged request-level extras (``"salt"``, ``"lora"``, or
  the LoRA fields ``"lora.name"``, ``"lora.path"``, ``"lora.weights"``) and the block's own
  digests: multimodal items (``"mm"``) and prompt embeddings (``"emb"``). An empty salt is
  identical to no salt.
- ``ns_digest`` is BLAKE2b-16 of the tagged :class:`Namespace` fields: everything that makes two
  blocks incompatible (model, revision, KV dtype, layout, geometry, TP/PP placement, and when
  set the weights fingerprint and the speculative configuration).

Keys are identical across processes, nodes and restarts (no ``hash()``, no per-process seed); an
outsider without the cluster secret cannot forge a colliding key. Partial blocks are never keyed:
``chain`` ignores a trailing partial block.

A second, separate key space, :meth:`Keyer.chain_from_engine_hashes`, keys blocks by a serving
engine's own chained block hashes (vLLM's sha256 ``request.block_hashes``)::

    engine_key = BLAKE2b(key=secret, 32 bytes, person "tierstore.eky.v1")(
                     F("ns", ns_digest) F("algo", name) )          once per Keyer and name
    key_i      = BLAKE2s(key=engine_key, 32 bytes, person "ts.eh.v1")( hash_i )

one BLAKE2s compression per block (the hash is 32 bytes). Its contract, and when it may be used,
is in that method's docstring.

Cost: ``chain`` is two BLAKE2b compressions per 16-token block plus a state copy, two updates and
a digest; ``chain_from_engine_hashes`` one (cheaper) BLAKE2s compression, a copy, an update and a
digest (numbers in docs/benchmarks.md, "Keys and lookup from tokens"). ``Keyer`` keeps no
mutable state and may be shared between threads.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import struct
import sys
from array import array
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tierstore.errors import ConfigError
from tierstore.types import BlockKey

KEY_BYTES = 32
SECRET_BYTES = 32
_PERSON = b"tierstore.key.v1"
SECRET_ENV = "TIERSTORE_SECRET"
SECRET_FILE_ENV = "TIERSTORE_SECRET_FILE"
_PARENT_HEAD = b"\x06parent" + KEY_BYTES.to_bytes(4, "little")   # F("parent", key) less the key
_ENGINE_KEY_PERSON = b"tierstore.eky.v1"
_ENGINE_PERSON = b"ts.eh.v1"
_ENGINE_HASH_BYTES = 32
ENGINE_HASH_ALGOS = frozenset({"sha256", "sha256_cbor"})
"""Engine block-hash functions :meth:`Keyer.chain_from_engine_hashes` accepts (vLLM's names)."""

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1, "uint8": 1,
}


def _field(name: bytes, value: bytes) -> bytes:
    return bytes((len(name),)) + name + struct.pack("<I", len(value)) + value


_OPTIONAL_NS_FIELDS = frozenset({"weights", "speculative", "key_source", "kv_group"})
"""Namespace fields added after blocks were stored: they enter the digest only when set, so a
namespace that leaves them empty digests exactly as before they existed."""


@dataclass(frozen=True)
class Namespace:
    """Everything that makes two blocks incompatible (DESIGN §1).

    ``block_size`` is in tokens. ``kv_layout`` uses vLLM's names (``NHD``/``HND`` or a
    ``KVCacheLayout`` such as ``LBHNC``). For MLA, ``num_kv_heads`` is 1 and ``head_size`` is
    ``kv_lora_rank + qk_rope_head_dim``.

    ``weights``: what changes with the model's weights when ``revision`` does not (a fingerprint
    of a local model directory, an operator's ``weights_version``). ``speculative``: the
    speculative-decoding configuration whose draft KV is stored in the same blocks (a draft
    model's identity and layer count). ``key_source``: how block keys are derived when not from
    token ids by :meth:`Keyer.chain` (``Keyer.chain_from_engine_hashes``: the engine's hash
    algorithm and seed), so engines keyed differently never meet in one namespace. ``kv_group``:
    the KV-cache group of a hybrid model (vLLM's hybrid KV cache manager keeps one block table
    per group; each group's block is its own object): its index, kind, sliding window and layer
    names, so a full-attention block never meets a sliding-window one. All four are left out of
    the digest when empty (a one-group model keys as before).
    """

    model: str
    block_size: int
    revision: str = ""
    kv_dtype: str = "bfloat16"
    kv_layout: str = "NHD"
    num_layers: int = 0
    num_kv_heads: int = 0
    head_size: int = 0
    use_mla: bool = False
    tp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    weights: str = ""
    speculative: str = ""
    key_source: str = ""
    kv_group: str = ""

    def __post_init__(self) -> None:
        for name in ("model", "revision", "kv_dtype", "kv_layout", "weights", "speculative",
                     "key_source", "kv_group"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"namespace {name} must be a string, got {getattr(self, name)!r}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_size", "tp_size", "tp_rank", "pp_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"namespace {name} must be a non-negative integer, got {v!r}")
        if not isinstance(self.use_mla, bool):
            raise ConfigError(f"namespace use_mla must be a boolean, got {self.use_mla!r}")
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if not 0 <= self.tp_rank < max(self.tp_size, 1):
            raise ConfigError(f"tp_rank {self.tp_rank} outside tp_size {self.tp_size}")

    def digest(self) -> bytes:
        """16-byte BLAKE2b digest of the tagged fields (stable across processes and releases);
        computed once per instance."""
        d = self.__dict__.get("_digest")
        if d is None:
            d = self._compute_digest()
            object.__setattr__(self, "_digest", d)
        return d

    def _compute_digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16, person=b"tierstore.ns.v1")
        for name, value in sorted(asdict(self).items()):
            if name in _OPTIONAL_NS_FIELDS and value == "":
                continue
            h.update(_field(name.encode(), str(value).encode()))
        return h.digest()

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token for this TP rank: 2 (K and V) x layers x heads x head_size x dtype
        size; MLA stores one latent vector per token (no separate V)."""
        dsize = _DTYPE_BYTES.get(self.kv_dtype.lower())
        if dsize is None:
            raise ConfigError(f"unknown kv_dtype {self.kv_dtype!r}")
        kv = 1 if self.use_mla else 2
        return kv * self.num_layers * self.num_kv_heads * self.head_size * dsize

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_token * self.block_size

    def describe(self) -> dict:
        """Plain dict for CLI output and LMDB (no secrets, no salts: those never enter here).
        An empty ``kv_group`` is left out, so a one-group namespace reads as before (and a
        daemon or data dir of the previous release still reads it)."""
        d = asdict(self)
        if not d["kv_group"]:
            del d["kv_group"]
        return d


@dataclass(frozen=True)
class ExtraKeys:
    """Per-request identity mixed into every block of the chain; every field enters tagged and
    length-prefixed (see the module docstring), so no field's bytes can pass for another's.

    Request level (every block):

    - ``cache_salt``: tenant isolation (vLLM's ``cache_salt``); ``""`` equals ``None``.
    - ``lora``: one opaque adapter identity string (tag ``"lora"``), for callers that have one.
    - ``lora_name``, ``lora_path``, ``lora_weights``: a LoRA adapter's name, path and weights
      fingerprint, each under its own tag (``"lora.name"``, ``"lora.path"``,
      ``"lora.weights"``); present as soon as ``lora_name`` or ``lora_path`` is not None (an
      empty path is still a field), ``lora_weights`` only when set. Issue 13 item 6: name
      ``"a|b"`` with path ``""`` and name ``"a"`` with path ``"b|"`` differ.

    Block level (only the blocks listed):

    - ``mm``: multimodal digests, ``{block_index: [digest, ...]}`` (tag ``"mm"`` each).
    - ``embeds``: prompt-embeddings digest of the block, ``{block_index: digest}`` (tag
      ``"emb"``): the embedding rows and the token/embeds mask of the block's positions
      (case KEY-29); the plugin computes it.

    A request with none of the new fields keys exactly as before they existed.
    """

    cache_salt: str | None = None
    lora: str | None = None
    mm: Mapping[int, Sequence[bytes | str]] | None = None
    lora_name: str | None = None
    lora_path: str | None = None
    lora_weights: str | None = None
    embeds: Mapping[int, bytes] | None = None

    def request_bytes(self) -> bytes:
        out = b""
        if self.cache_salt:
            out += _field(b"salt", self.cache_salt.encode())
        if self.lora:
            out += _field(b"lora", self.lora.encode())
        if self.lora_name is not None or self.lora_path is not None:
            out += _field(b"lora.name", (self.lora_name or "").encode())
            out += _field(b"lora.path", (self.lora_path or "").encode())
            if self.lora_weights:
                out += _field(b"lora.weights", self.lora_weights.encode())
        return out

    def block_bytes(self, index: int, base: bytes) -> bytes:
        out = base
        if self.mm and index in self.mm:
            for d in self.mm[index]:
                out += _field(b"mm", d if isinstance(d, bytes) else d.encode())
        if self.embeds and index in self.embeds:
            out += _field(b"emb", self.embeds[index])
        return out


NO_EXTRAS = ExtraKeys()


class Keyer:
    """Computes chain keys for one namespace under one cluster secret.

    Single-threaded objects are not required: ``Keyer`` holds no mutable state and may be shared.
    """

    def __init__(self, namespace: Namespace, secret: bytes) -> None:
        if len(secret) < 16:
            raise ConfigError("cluster secret must be at least 16 bytes")
        self.namespace = namespace
        self.secret = bytes(secret)
        self._ns_field = _field(b"ns", namespace.digest())
        self._proto = hashlib.blake2b(digest_size=KEY_BYTES, key=self.secret[:64], person=_PERSON)
        # the constant start of every non-first block: F("ns") and the header of F("parent", key)
        self._child = self._proto.copy()
        self._child.update(self._ns_field + _PARENT_HEAD)
        # chain_from_engine_hashes: per algo, a BLAKE2s prototype keyed for (secret, ns, algo)
        self._engine_protos = {}
        for algo in ENGINE_HASH_ALGOS:
            engine_key = hashlib.blake2b(self._ns_field + _field(b"algo", algo.encode()),
                                         digest_size=32, key=self.secret[:64],
                                         person=_ENGINE_KEY_PERSON).digest()
            self._engine_protos[algo] = hashlib.blake2s(digest_size=KEY_BYTES, key=engine_key,
                                                        person=_ENGINE_PERSON)

    @property
    def block_size(self) -> int:
        return self.namespace.block_size

    def _chain(self, raw: bytes, step: int, n: int, tag: bytes, extras: ExtraKeys,
               parent: BlockKey | None) -> list[BlockKey]:
        """Keys of ``n`` payloads of ``step`` bytes each, laid end to end in ``raw``.

        Byte-identical to hashing ``F("ns") F("parent") F(tag, payload_i) F("x", extra_i)`` field by
        field (tests/core/test_keys_golden.py), but arranged so that the loop does the least work
        per block: the prototype ``_child`` already holds ``F("ns")`` and the header of
        ``F("parent", <32 bytes>)``; ``tails[i]`` is ``F(tag, payload_i) F("x", extra_i)``, built for
        all blocks before the loop; so each block costs one state copy, two updates (the parent
        key, the tail) and one digest. The two BLAKE2b compressions of a 16-token block's 144
        bytes are most of what is left (benchmarks/bench_lookup.py).
        """
        if n <= 0:
            return []
        req = extras.request_bytes()
        head = bytes((len(tag),)) + tag + step.to_bytes(4, "little")
        x = _field(b"x", req)
        tails = [head + raw[o:o + step] + x for o in range(0, n * step, step)]
        for i in _blocks_with_own_extras(extras, n):
            tails[i] = head + raw[i * step:(i + 1) * step] + _field(b"x", extras.block_bytes(i, req))

        first = self._proto.copy()
        first.update(self._ns_field + _field(b"parent", parent or b"") + tails[0])
        prev = first.digest()
        keys = [prev]
        append, copy = keys.append, self._child.copy
        for tail in itertools.islice(tails, 1, None):
            h = copy()
            h.update(prev)
            h.update(tail)
            prev = h.digest()
            append(prev)
        return keys

    def chain(self, token_ids: Sequence[int], extras: ExtraKeys = NO_EXTRAS,
              parent: BlockKey | None = None) -> list[BlockKey]:
        """Keys of the full blocks of ``token_ids`` (a trailing partial block gets no key).

        Raises :class:`ConfigError` for token ids outside uint32 (in full blocks; the ids of a
        trailing partial block are not looked at).
        """
        bs = self.block_size
        n_full = len(token_ids) // bs
        if n_full == 0:
            return []
        try:
            arr = array("I", token_ids if len(token_ids) == n_full * bs else token_ids[: n_full * bs])
        except OverflowError:
            raise ConfigError("token ids must fit in uint32") from None
        if sys.byteorder == "big":
            arr.byteswap()
        return self._chain(arr.tobytes(), bs * 4, n_full, b"tok", extras, parent)

    def chain_from_block_ids(self, block_ids: Sequence[int], extras: ExtraKeys = NO_EXTRAS) -> list[BlockKey]:
        """Keys for a trace's block ids (Mooncake ``hash_ids``: block i's id already stands for
        its content given its prefix); one key per id (taken modulo 2**64)."""
        arr = array("Q", [b & 0xFFFFFFFFFFFFFFFF for b in block_ids])
        if sys.byteorder == "big":
            arr.byteswap()
        return self._chain(arr.tobytes(), 8, len(arr), b"bid", extras, None)

    def chain_from_engine_hashes(self, block_hashes: Sequence[bytes], algo: str) -> list[BlockKey]:
        """Keys from a serving engine's own chained block hashes (vLLM ``request.block_hashes``),
        one keyed BLAKE2s per block (formula in the module docstring): under half the cost of
        :meth:`chain` per block. The namespace and the cluster secret enter through the BLAKE2s
        key, derived once per ``Keyer`` and ``algo``.

        A key space apart from :meth:`chain`'s: a block stored under one is never found under
        the other, so every client of a store must use the same one.

        The engine hash must already chain over the prefix and carry the request's extras (vLLM's
        does: parent hash, token ids, multimodal, cache salt; LoRA by name and path only and
        prompt-embedding rows without their mask, so the vLLM connector keys requests with a
        LoRA adapter or prompt embeddings with :meth:`chain` instead), be stable
        across processes and be collision resistant against whoever writes prompts. ``algo``
        names it and must be one of :data:`ENGINE_HASH_ALGOS`: vLLM's ``sha256`` and
        ``sha256_cbor``, whose chain root is the same everywhere unless ``PYTHONHASHSEED`` is set
        (processes with different seeds then share nothing: misses, never wrong bytes). Not
        ``xxhash``: a random root per process and no collision resistance. Only the caller knows
        how the engine was configured; it must refuse to use this method otherwise.

        Raises :class:`ConfigError` for another ``algo`` or a hash that is not 32 bytes.
        """
        if algo not in ENGINE_HASH_ALGOS:
            raise ConfigError(f"engine hash {algo!r} cannot key a shared store; "
                              f"use one of {sorted(ENGINE_HASH_ALGOS)} or Keyer.chain")
        hashes = block_hashes if isinstance(block_hashes, list) else list(block_hashes)
        if not hashes:
            return []
        if set(map(len, hashes)) != {_ENGINE_HASH_BYTES}:
            raise ConfigError(f"engine block hashes must be {_ENGINE_HASH_BYTES} bytes each")
        keys: list[BlockKey] = []
        append, copy = keys.append, self._engine_protos[algo].copy
        for eh in hashes:
            h = copy()
            h.update(eh)
            append(h.digest())
        return keys


_EXTRA_FIELDS_KNOWN = {f.name for f in fields(ExtraKeys)} == {
    "cache_salt", "lora", "mm", "lora_name", "lora_path", "lora_weights", "embeds"}


def _blocks_with_own_extras(extras: ExtraKeys, n: int) -> Iterable[int]:
    """Indices ``i < n`` for which ``extras.block_bytes(i, base)`` may differ from ``base``.

    For :class:`ExtraKeys` as :meth:`ExtraKeys.block_bytes` defines it today, the blocks with
    multimodal or prompt-embeddings digests (the LoRA fields are request level). For a subclass,
    or once ``ExtraKeys`` gains a field this helper does not know, every block (exact, slower):
    extend this function with the new field.
    """
    if type(extras) is not ExtraKeys or not _EXTRA_FIELDS_KNOWN:
        return range(n)
    own = [m for m in (extras.mm, extras.embeds) if m]
    if not own:
        return ()
    if all(type(i) is int for m in own for i in m):
        return sorted({i for m in own for i in m if 0 <= i < n})
    return [i for i in range(n) if any(i in m for m in own)]   # 1.0 equals block 1 there


def load_secret(value: str | bytes | None = None, path: str | os.PathLike | None = None,
                data_dir: str | os.PathLike | None = None, generate: bool = True) -> bytes:
    """Resolve the cluster secret, in this order: explicit ``value``; ``$TIERSTORE_SECRET`` (hex or
    text); ``path`` or ``$TIERSTORE_SECRET_FILE``; ``<data_dir>/secret`` (created with 32 random
    bytes, mode 0600, when absent and ``generate``). With none of these and no data dir, a random
    per-process secret is returned when ``generate`` (nothing persists, so nothing must agree).

    Never a built-in constant (case KEY-04). Raises :class:`ConfigError` if a named file is
    missing or the secret is shorter than 16 bytes.
    """
    if value is None:
        value = os.environ.get(SECRET_ENV) or None
    if value is not None:
        raw = value if isinstance(value, bytes) else _decode_secret_text(value)
        return _check_secret(raw)
    path = path or os.environ.get(SECRET_FILE_ENV) or None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"secret file {p} does not exist")
        return _check_secret(_decode_secret_file(p.read_bytes()))
    if data_dir is not None:
        p = Path(data_dir) / "secret"
        if p.is_file():
            return _check_secret(p.read_bytes())
        if not generate:
            raise ConfigError(f"no cluster secret configured and {p} does not exist")
        p.parent.mkdir(parents=True, exist_ok=True)
        raw = secrets.token_bytes(SECRET_BYTES)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        return raw
    if not generate:
        raise ConfigError("no cluster secret configured")
    return secrets.token_bytes(SECRET_BYTES)


def secret_id(secret: bytes) -> str:
    """Public fingerprint of the cluster secret (keyed BLAKE2b of a constant, 8 bytes hex): two
    processes compare secrets without revealing them."""
    return hashlib.blake2b(b"tierstore secret id", key=secret[:64], digest_size=8,
                           person=b"tierstore.sid.v1").hexdigest()


def _decode_secret_file(raw: bytes) -> bytes:
    """A secret file holds hex, text, or raw bytes (as ``<data_dir>/secret`` does)."""
    try:
        return _decode_secret_text(raw.decode("ascii"))
    except UnicodeDecodeError:
        return raw


def _decode_secret_text(text: str) -> bytes:
    text = text.strip()
    try:
        if len(text) % 2 == 0 and len(text) >= 32:
            return bytes.fromhex(text)
    except ValueError:
        pass
    return text.encode()


def _check_secret(raw: bytes) -> bytes:
    if len(raw) < 16:
        raise ConfigError("cluster secret must be at least 16 bytes")
    return raw


# ------------------------------------------------------------------------------ hex prefixes
_HEX = frozenset("0123456789abcdef")


def resolve_prefixes(prefixes: Sequence[str], keys: Iterable[BlockKey], *,
                     unknown_ok: bool = False) -> list[BlockKey | None]:
    """Full keys for hex key prefixes (what :meth:`tierstore.store.Store.resolve` answers).

    ``prefixes``: hex strings of 1 or more digits (case and surrounding blanks ignored; an odd
    number of digits matches on the last half byte; the 64 digits of a whole key match that key
    alone). ``keys``: the keys to search, iterated once. Returns one key per prefix, in order:
    the one key that starts with it; with ``unknown_ok``, None for a prefix no key starts with.

    Raises ConfigError for a prefix that is not hex, and KeyPrefixError for the first prefix (in
    the order given) that more than one key starts with (``"key prefix '…' is ambiguous (N
    blocks)"``) or, without ``unknown_ok``, that none does (``"no resident block has key prefix
    '…'"``). Cost: one dict probe per key (keys are bucketed on the shortest prefix's whole
    bytes), plus a comparison per prefix sharing that bucket.
    """
    from tierstore.errors import KeyPrefixError

    parsed: list[tuple[str, bytes, int | None]] = []
    for p in prefixes:
        t = p.strip().lower() if isinstance(p, str) else None
        if not t or not set(t) <= _HEX:
            raise ConfigError(f"not a hex key: {p!r}")
        whole = len(t) // 2 * 2
        parsed.append((t, bytes.fromhex(t[:whole]), int(t[-1], 16) if len(t) % 2 else None))
    head = min((len(b) for _, b, _ in parsed), default=0)
    buckets: dict[bytes, list[int]] = {}
    for i, (_, b, _) in enumerate(parsed):
        buckets.setdefault(b[:head], []).append(i)
    count = [0] * len(parsed)
    found: list[BlockKey | None] = [None] * len(parsed)
    for k in (keys if parsed else ()):
        for i in buckets.get(k[:head], ()):
            _, b, nibble = parsed[i]
            if k.startswith(b) and (nibble is None or (len(k) > len(b) and k[len(b)] >> 4 == nibble)):
                count[i] += 1
                found[i] = k
    for (t, _, _), n in zip(parsed, count):
        if n > 1:
            raise KeyPrefixError(f"key prefix {t!r} is ambiguous ({n} blocks)")
        if n == 0 and not unknown_ok:
            raise KeyPrefixError(f"no resident block has key prefix {t!r}")
    return found
