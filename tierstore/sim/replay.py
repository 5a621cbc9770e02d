"""Trace replay: drive the real store with a Mooncake-format trace as a prefill node would.

The main job (issue 2 item 9, issue 14 item 9). No typer, no rich here: ``tierstore_admin.replay``
parses flags and prints; this module reads the trace, builds the store through
:class:`tierstore.client.Client`, replays and returns one plain dict.

Trace format (JSONL, one request per line; blank lines are skipped)::

    {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2, ...]}

``hash_ids[i]`` names the i-th 512-token block of the prompt given its prefix; the replay turns the
ids into chain keys (:meth:`Keyer.chain_from_block_ids`). A malformed line raises
:class:`ConfigError` naming the file, the line and the column; a trace without a request is an
error too.

Per request (prefix semantics: every block of a request is inserted or touched after it)::

    keys = chain(hash_ids) ──▶ lookup(keys) = hit prefix of n blocks
      n > 0      : prepare_load(keys[:n]) ──▶ read + verify each block ──▶ complete_load
      n < len    : prepare_store(keys[n:]) ──▶ fill each OK slot ──▶ complete_store

Payload modes (``payload`` None picks: ``none`` when only ``capacity`` sizes the cache, else
``bytes``):

- ``bytes`` (the default): a real DRAM slab of ``dram_capacity`` blocks (default 256K tokens)
  over a real NVMe tier of ``nvme_capacity`` blocks (default 1M tokens; 0 = none) in
  ``data_dir`` or a temporary directory. NVMe keeps a clean copy of every DRAM block, written
  behind; a replay store waits for room in that queue (up to a minute) instead of skipping, and
  the replay ends with a flush, so the NVMe bytes are all written. Each stored block is filled
  with its 32-byte key repeated up to ``block_bytes``; every loaded block is compared with that
  pattern (``verify_failures`` must stay 0).
- ``none``: one DRAM :class:`NullTier` of ``capacity`` blocks: index + policy only, no bytes
  (sweeps). Byte counters are then *nominal* (the model's block size times the blocks moved).

``baseline`` (default ``lru`` from the CLI): the same trace, the same tiers and capacities, with
that eviction policy on every tier, reported beside the main result (``result["baseline"]``).
With payload bytes the two replays run at the same time, each with its own store: a byte replay
mostly waits on the disk (fdatasync of the NVMe copies), so side by side they take little longer
than one alone (both results then say ``side_by_side``); with payload none they run one after the
other.

Definitions used in the result:

- ``block_hit_ratio`` = blocks loaded from the cache / blocks referenced (sum of ``len(hash_ids)``).
- ``token_hit_ratio`` = hit tokens / sum of ``input_length``, where a request's hit tokens are
  ``min(hit_blocks * 512, input_length)``.
- ``hits``: blocks loaded per tier they came from (every tier of the store, NVMe included).
- ``tiers.<tier>``: ``read_bytes`` = bytes read out of the tier, ``written_bytes`` = bytes written
  into it (DRAM: loads and NVMe copies read it, stores and promotions write it); every tier the
  store has, also through a daemon.
- ``policies``: the eviction policy of each tier as the store reports it (a daemon's own);
  ``policy`` is the DRAM one. ``write_behind``: the NVMe write queue after the final flush.
- ``warnings``: one line per condition that makes the numbers mean less (e.g. a request longer
  than the DRAM tier: every block of a request is staged in DRAM at once).
- ``load_ms`` / ``store_ms``: per-request wall time of prepare + copy (+ verify) + complete, over
  the requests that loaded (stored) at least one block. ``wall_s`` excludes the final flush
  (``flush_s``).

Threads: one replay owns its client for its whole run; a baseline run in bytes mode has its own
thread, store and client (:func:`replay`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from tierstore import counter_names as cn
from tierstore.config import DramConfig, NvmeConfig, StoreConfig
from tierstore.errors import ConfigError
from tierstore.keys import Namespace
from tierstore.policy import DEFAULT_EVICTION
from tierstore.types import BlockStatus
from tierstore.units import format_bytes, parse_bytes, parse_capacity

if TYPE_CHECKING:  # pragma: no cover
    from tierstore.client import Client

BLOCK_TOKENS = 512
"""Tokens per block in Mooncake traces (``hash_ids`` are ids of 512-token blocks)."""

DEFAULT_CAPACITY = "3M"
DEFAULT_BYTES_BLOCK = "64KiB"
DEFAULT_DRAM_CAPACITY = "256K"     # payload bytes: 500 blocks of 512 tokens
DEFAULT_NVME_CAPACITY = "1M"       # payload bytes: 1,953 blocks; the pool the policies compete for
DEFAULT_BASELINE = "lru"
DEFAULT_GENERATED_REQUESTS = 2000
PAYLOADS = ("none", "bytes")
_MEM_FRACTION = 0.8      # refuse a DRAM slab above this share of MemAvailable


# ---------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelPreset:
    """KV geometry of one model (one TP rank of 1, bf16 KV)."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    use_mla: bool = False
    kv_dtype: str = "bfloat16"

    def namespace(self, block_tokens: int = BLOCK_TOKENS) -> Namespace:
        return Namespace(model=self.name, block_size=block_tokens, kv_dtype=self.kv_dtype,
                         num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                         head_size=self.head_size, use_mla=self.use_mla)

    @property
    def bytes_per_token(self) -> int:
        return self.namespace().bytes_per_token


MODELS: dict[str, ModelPreset] = {
    # 2 (K,V) x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB/token
    "llama3-8b": ModelPreset("llama3-8b", 32, 8, 128),
    # 2 x 80 x 8 x 128 x 2 = 320 KiB/token
    "llama3-70b": ModelPreset("llama3-70b", 80, 8, 128),
    # 2 x 28 x 4 x 128 x 2 = 56 KiB/token
    "qwen2-7b": ModelPreset("qwen2-7b", 28, 4, 128),
    # MLA: one latent of kv_lora_rank 512 + rope 64 per layer: 61 x 576 x 2 = 68.6 KiB/token
    "deepseek-v3": ModelPreset("deepseek-v3", 61, 1, 576, use_mla=True),
}
DEFAULT_MODEL = "llama3-8b"


def get_model(name: str) -> ModelPreset:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


# ---------------------------------------------------------------------------------- trace
@dataclass(frozen=True)
class TraceRequest:
    timestamp: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


class _Where:
    """Where a trace record came from (``file:line``) and, with its text, where a field sits."""

    def __init__(self, label: str, line: str | None = None) -> None:
        self.label, self.line = label, line

    def at(self, field: str | None = None) -> str:
        if field is not None and self.line is not None:
            i = self.line.find(f'"{field}"')
            if i >= 0:
                return f"{self.label}: column {i + 1}"
        return self.label

    def __str__(self) -> str:
        return self.label


def _int(v, name: str, where) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{_at(where, name)}: {name!r} must be a non-negative integer, got {v!r}")
    return v


def _at(where, field: str | None = None) -> str:
    return where.at(field) if isinstance(where, _Where) else str(where)


def parse_request(obj, where) -> TraceRequest:
    """Validate one decoded trace record. Raises ConfigError naming ``where`` (a label, or a
    :class:`_Where` that also knows the column of a bad field)."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{_at(where)}: expected a JSON object, got {type(obj).__name__}")
    for f in ("input_length", "hash_ids"):
        if f not in obj:
            raise ConfigError(f"{_at(where)}: missing field {f!r}")
    ts = obj.get("timestamp", 0)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise ConfigError(f"{_at(where, 'timestamp')}: 'timestamp' must be a number, got {ts!r}")
    ids = obj["hash_ids"]
    if not isinstance(ids, list):
        raise ConfigError(f"{_at(where, 'hash_ids')}: 'hash_ids' must be a list of integers")
    for x in ids:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ConfigError(f"{_at(where, 'hash_ids')}: 'hash_ids' must hold non-negative "
                              f"integers, got {x!r}")
    return TraceRequest(ts, _int(obj["input_length"], "input_length", where),
                        _int(obj.get("output_length", 0), "output_length", where), tuple(ids))


def read_trace(path: str | os.PathLike, limit: int | None = None) -> list[TraceRequest]:
    """Read up to ``limit`` requests of a Mooncake JSONL trace. Raises ConfigError (also for a
    trace that holds no request)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"trace {p} does not exist")
    if not p.is_file():
        raise ConfigError(f"trace {p} is not a regular file")
    out: list[TraceRequest] = []
    try:
        f = p.open("rb")
    except OSError as e:
        raise ConfigError(f"cannot read trace {p}: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]   # a UTF-8 byte-order mark some editors write
            label = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                col = len(raw[:e.start].decode("utf-8", errors="replace")) + 1
                raise ConfigError(f"{label}: column {col}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            line = line.rstrip("\r\n")   # a fault past the end is then on this line, not "line 2"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                # e.colno counts from the document's last newline; the line has none: e.pos + 1
                end = " at the end of the line" if e.pos >= len(line) else ""
                raise ConfigError(f"{label}: column {e.pos + 1}: not valid JSON ({e.msg}{end})") \
                    from None
            except RecursionError:
                raise ConfigError(f"{label}: JSON nested too deeply") from None
            out.append(parse_request(obj, _Where(label, line)))
    if not out:
        raise ConfigError(f"trace {p} holds no request" + (" (--limit 0)" if limit == 0 else ""))
    return out


def write_trace(path: str | os.PathLike, requests: Sequence[TraceRequest]) -> int:
    """Write ``requests`` as a Mooncake JSONL trace (the format :func:`read_trace` reads: one
    object per line with ``timestamp``, ``input_length``, ``output_length``, ``hash_ids``);
    returns the number of lines. Raises ConfigError when the file cannot be written."""
    try:
        with Path(path).open("w", encoding="utf-8") as f:
            for r in requests:
                f.write(json.dumps({"timestamp": r.timestamp, "input_length": r.input_length,
                                    "output_length": r.output_length,
                                    "hash_ids": list(r.hash_ids)}) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write trace {path}: {e.strerror or e}") from None
    return len(requests)


def generated_trace(num_requests: int) -> list[TraceRequest]:
    """The embedded default workload (``tierstore.sim.workload``, seed 0)."""
    try:
        from tierstore.sim.workload import generate_trace
    except ImportError as e:
        raise ConfigError(f"no TRACE given and the built-in workload generator is unavailable ({e})") from None
    return [parse_request(r, f"generated request {i}")
            for i, r in enumerate(generate_trace(num_requests=num_requests, seed=0))]


# ---------------------------------------------------------------------------------- options
@dataclass
class ReplayOptions:
    """What one replay does. Capacities are strings in the units grammar (tierstore.units)."""

    trace: str | None = None            # None: the embedded generated workload
    payload: str | None = None          # None: "none" when only capacity is given, else "bytes"
    capacity: str | None = None         # payload none: the whole cache (default 3M tokens)
    dram_capacity: str | None = None    # payload bytes (default: capacity, else 256K tokens)
    nvme_capacity: str | None = None    # payload bytes (default 1M tokens); 0 = no NVMe tier
    block_bytes: str | int | None = None  # none: model's block; bytes: 64KiB
    model: str = DEFAULT_MODEL
    policy: str = DEFAULT_EVICTION
    data_dir: str | None = None         # bytes: where the store (NVMe tier) lives; temp if None
    limit: int | None = None
    num_requests: int = DEFAULT_GENERATED_REQUESTS   # size of the generated default workload
    socket: str | None = None           # replay through the daemon on this socket (its tiers, its policy)
    baseline: str | None = None         # also replay with this policy on every tier, beside


@dataclass(frozen=True)
class _Plan:
    model: ModelPreset
    namespace: Namespace
    block_bytes: int
    dram_blocks: int
    nvme_blocks: int


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resolve(opts: ReplayOptions) -> ReplayOptions:
    """Fill in defaults that depend on other options (idempotent). Raises ConfigError.

    The payload is ``bytes`` unless only ``capacity`` sizes the cache (the one cache of payload
    ``none``). Through a daemon the payload is ``bytes``: a store through the daemon publishes
    whatever its slots hold, so replaying without writing bytes would publish blocks that later
    readers take for real KV. ``none`` is refused there.
    """
    from dataclasses import replace
    if opts.payload is None:
        none = opts.socket is None and opts.capacity is not None and \
            opts.dram_capacity is None and opts.nvme_capacity is None and opts.data_dir is None
        return replace(opts, payload="none" if none else "bytes")
    if opts.socket is not None and opts.payload == "none":
        raise ConfigError("--payload none cannot go through a daemon: it would publish blocks whose "
                          "bytes were never written; use --payload bytes (the default with --socket)")
    return opts


def plan(opts: ReplayOptions) -> _Plan:
    """Validate options and turn capacities into blocks. Raises ConfigError."""
    opts = resolve(opts)
    if opts.payload not in PAYLOADS:
        raise ConfigError(f"payload must be one of {', '.join(PAYLOADS)}, got {opts.payload!r}")
    if opts.limit is not None and opts.limit < 0:
        raise ConfigError(f"limit must not be negative, got {opts.limit}")
    model = get_model(opts.model)
    ns = model.namespace(BLOCK_TOKENS)
    from tierstore.policy import make_eviction   # validates the name before any allocation
    make_eviction(opts.policy, 1)
    if opts.block_bytes is not None:
        block_bytes = parse_bytes(opts.block_bytes)
    else:
        block_bytes = ns.block_bytes if opts.payload == "none" else parse_bytes(DEFAULT_BYTES_BLOCK)
    if block_bytes <= 0:
        raise ConfigError(f"block bytes must be positive, got {opts.block_bytes!r}")

    def blocks(text: str | None, default: str | None) -> int:
        t = text if text is not None else default
        return 0 if t is None else parse_capacity(t).to_blocks(BLOCK_TOKENS, block_bytes)

    if opts.socket is not None:
        given = [f for f, v in (("--capacity", opts.capacity), ("--dram-capacity", opts.dram_capacity),
                                ("--nvme-capacity", opts.nvme_capacity), ("--data-dir", opts.data_dir))
                 if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot apply to a running daemon: its tiers and "
                              "policy come from its own configuration")
        return _Plan(model, ns, block_bytes, 0, 0)

    if opts.payload == "none":
        if opts.dram_capacity is not None or opts.nvme_capacity is not None:
            raise ConfigError("payload none models one cache: use --capacity "
                              "(--dram-capacity/--nvme-capacity are for --payload bytes)")
        if opts.data_dir is not None:
            raise ConfigError("--data-dir applies to --payload bytes only (payload none keeps nothing)")
        return _Plan(model, ns, block_bytes, blocks(opts.capacity, DEFAULT_CAPACITY), 0)

    if opts.capacity is not None:
        raise ConfigError("--capacity sizes the one cache of --payload none; with --payload bytes "
                          "give --dram-capacity and --nvme-capacity (0: no NVMe tier)")
    dram = blocks(opts.dram_capacity, DEFAULT_DRAM_CAPACITY)
    nvme = blocks(opts.nvme_capacity, DEFAULT_NVME_CAPACITY)
    if dram <= 0:
        raise ConfigError("payload bytes needs a DRAM capacity of at least one block")
    slab = dram * (-(-block_bytes // 4096) * 4096)
    avail = _mem_available_bytes()
    if avail is not None and slab > _MEM_FRACTION * avail:
        raise ConfigError(f"a DRAM slab of {dram} blocks x {format_bytes(block_bytes)} = "
                          f"{format_bytes(slab)} does not fit this machine ({format_bytes(avail)} "
                          "available); use a smaller --block-bytes or --dram-capacity")
    return _Plan(model, ns, block_bytes, dram, nvme)


# ---------------------------------------------------------------------------------- replay
def _pattern(key: bytes, size: int) -> bytes:
    """Deterministic block content: the key repeated to ``size`` bytes."""
    return (key * (size // len(key) + 1))[:size]


def _percentile(sorted_ms: list[float], q: float) -> float | None:
    if not sorted_ms:
        return None
    i = max(0, math.ceil(q / 100 * len(sorted_ms)) - 1)
    return round(sorted_ms[i], 4)


def _dist(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"count": len(s), "p50": _percentile(s, 50), "p99": _percentile(s, 99),
            "mean": round(sum(s) / len(s), 4) if s else None}


def _open_client(opts: ReplayOptions, p: _Plan) -> tuple["Client", str | None]:
    """Open the store; returns the client and a temp dir to remove afterwards (or None)."""
    from tierstore.client import Client   # the store, imported when a replay runs
    if opts.socket is not None:
        from tierstore.client import open_client
        return open_client(socket=opts.socket), None
    bytes_mode = opts.payload == "bytes"
    dram = DramConfig(capacity_blocks=p.dram_blocks, policy=opts.policy, payload=bytes_mode)
    if not bytes_mode:
        return Client.embedded(None, StoreConfig(slot_bytes=p.block_bytes, dram=dram)), None
    tmp = None
    data_dir = opts.data_dir
    if data_dir is None and p.nvme_blocks > 0:
        tmp = data_dir = tempfile.mkdtemp(prefix="tierstore-replay-")
    nvme = None
    if p.nvme_blocks > 0:
        target = Path(data_dir)
        target.mkdir(parents=True, exist_ok=True)
        need = p.nvme_blocks * (p.block_bytes + 4096)
        free = shutil.disk_usage(target).free
        if not (target / "store.json").is_file() and need > free:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError(f"an NVMe tier of {p.nvme_blocks} blocks needs about {format_bytes(need)} "
                              f"but {target} has {format_bytes(free)} free")
        nvme = NvmeConfig(path="", capacity_blocks=p.nvme_blocks, policy=opts.policy)
    cfg = StoreConfig(slot_bytes=p.block_bytes, dram=dram, nvme=nvme)
    try:
        if data_dir is None:
            client = Client.embedded(None, cfg)
        else:
            client = Client.embedded(data_dir, cfg, create=True)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return client, tmp


def replay(opts: ReplayOptions, progress: Callable[[int, int], None] | None = None) -> dict:
    """Run one replay (and its baseline, if any) and return its result (see the module
    docstring for every field).

    Raises ConfigError for bad options or a malformed trace (before anything is allocated).
    ``progress(done, total)`` is called every ~0.5 % of the requests and at the end.
    """
    plan(opts)
    if opts.baseline is not None:
        from tierstore.policy import make_eviction
        make_eviction(opts.baseline, 1)
    reqs, source = load_requests(opts)
    return replay_requests(opts, reqs, source, progress)


def baseline_options(opts: ReplayOptions) -> ReplayOptions | None:
    """The options of ``opts``'s baseline run, or None when there is none: no baseline asked,
    the same policy, or a daemon (it has one policy). The baseline gets its own store (a
    temporary directory when the main run has ``data_dir``)."""
    from dataclasses import replace
    opts = resolve(opts)
    if opts.baseline is None or opts.socket is not None:
        return None
    if opts.baseline.strip().lower() == opts.policy.strip().lower():
        return None
    return replace(opts, policy=opts.baseline, baseline=None, data_dir=None)


class _Parts:
    """One ``progress(done, total)`` over several replays of the same trace (threads)."""

    def __init__(self, progress: Callable[[int, int], None], n: int, per: int) -> None:
        import threading
        self._progress, self._done, self._per = progress, [0] * n, per
        self._lock = threading.Lock()

    def part(self, i: int) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            with self._lock:
                self._done[i] = done
                self._progress(sum(self._done), self._per * len(self._done))
        return report


def replay_requests(opts: ReplayOptions, reqs: list[TraceRequest], source: str,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """:func:`replay` over requests already read (a sweep reads its trace once)."""
    opts = resolve(opts)
    base = baseline_options(opts)
    if base is None:
        return _replay_one(opts, reqs, source, progress)
    parts = _Parts(progress, 2, len(reqs)) if progress is not None else None
    side_by_side = opts.payload == "bytes"
    if side_by_side:   # mostly disk waits: two stores side by side take little more than one
        import threading
        from concurrent.futures import ThreadPoolExecutor
        stop = threading.Event()   # Ctrl-C, or the other replay failed: both end at once
        ex = ThreadPoolExecutor(2, thread_name_prefix="tierstore-replay")
        try:
            fut_main = ex.submit(_replay_one, opts, reqs, source, parts and parts.part(0), stop)
            fut_base = ex.submit(_replay_one, base, reqs, source, parts and parts.part(1), stop)
            main, other = fut_main.result(), fut_base.result()
        except BaseException:
            stop.set()
            raise
        finally:
            ex.shutdown(wait=True)
    else:
        main = _replay_one(opts, reqs, source, parts and parts.part(0))
        other = _replay_one(base, reqs, source, parts and parts.part(1))
    main["side_by_side"] = other["side_by_side"] = side_by_side
    main["baseline"] = other
    main["warnings"] = main["warnings"] + [f"baseline ({other['policy']}): {w}"
                                           for w in other["warnings"]]
    return main


def load_requests(opts: ReplayOptions) -> tuple[list[TraceRequest], str]:
    """The requests ``opts`` names (its trace file, else the generated workload) and a label for
    them. Raises ConfigError."""
    if opts.trace is not None:
        return read_trace(opts.trace, opts.limit), str(opts.trace)
    n = opts.num_requests if opts.limit is None else min(opts.num_requests, opts.limit)
    if n < 1:
        raise ConfigError("nothing to replay: the generated workload needs at least one request "
                          f"(--requests {opts.num_requests}, --limit {opts.limit})")
    return generated_trace(n), f"generated (tierstore.sim.workload, {n} requests, seed 0)"


class _Stopped(Exception):
    """The replay beside this one failed or was interrupted."""


def _replay_one(opts: ReplayOptions, reqs: list[TraceRequest], source: str,
                progress: Callable[[int, int], None] | None = None, stop=None) -> dict:
    """One replay with one policy on one store; ``stop`` (a threading.Event) ends it early."""
    p = plan(opts)
    requested = p.dram_blocks
    if opts.payload == "none" and opts.socket is None:
        # A cache larger than the trace's block references never evicts: same result, and an
        # absurd capacity (1000G tokens) allocates nothing absurd.
        from dataclasses import replace
        p = replace(p, dram_blocks=min(p.dram_blocks, sum(len(r.hash_ids) for r in reqs)))
    t_setup = time.perf_counter()
    client, tmp = _open_client(opts, p)
    try:
        setup_s = time.perf_counter() - t_setup
        slot_bytes = next(u["slot_bytes"] for u in client.usage() if u["tier"] == "dram")
        if opts.socket is not None and opts.block_bytes is None:
            from dataclasses import replace     # the daemon's slot size is the natural block
            p = replace(p, block_bytes=slot_bytes)
        if slot_bytes < p.block_bytes:
            where = f"the daemon's slots are {slot_bytes} bytes" if opts.socket is not None else \
                f"data dir {opts.data_dir} was created with blocks of {slot_bytes} bytes"
            raise ConfigError(f"{where}; replay with --block-bytes {slot_bytes} or less")
        result = _run(client, reqs, p, opts.payload == "bytes", progress, stop)
        result.update(_describe(client, opts, p, source, setup_s))
        if requested != p.dram_blocks:
            result["capacity_blocks"]["dram"] = requested
        result["warnings"] = _warnings(reqs, result)
        return result
    finally:
        client.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(client: "Client", reqs: list[TraceRequest], p: _Plan, verify: bool,
         progress: Callable[[int, int], None] | None, stop=None) -> dict:
    from tierstore.store import PUT_WAIT_S

    ns, size = p.namespace, p.block_bytes
    keyer = client.keyer(ns)
    before = dict(client.stats()["counters"])
    lookup, prepare_load, complete_load = client.lookup, client.prepare_load, client.complete_load
    prepare_store, complete_store, slot_view = client.prepare_store, client.complete_store, client.slot_view
    perf = time.perf_counter
    OK = BlockStatus.OK

    total = len(reqs)
    step = max(1, total // 200)
    referenced = hit_blocks = input_tokens = hit_tokens = 0
    stored = skipped = short_loads = checked = verify_failures = 0
    load_ms: list[float] = []
    store_ms: list[float] = []
    t0 = perf()
    for i, r in enumerate(reqs):
        keys = keyer.chain_from_block_ids(r.hash_ids)
        nk = len(keys)
        n = lookup(keys, ns).num_blocks if nk else 0
        if n:
            t = perf()
            job = prepare_load(keys[:n])
            ready = job.num_ready
            ok = True
            if verify:
                for j in range(ready):
                    sz = job.sizes[j]
                    checked += 1
                    # bytes(): comparing a memoryview with bytes goes element by element (30x slower)
                    if bytes(slot_view(job.slots[j])[:sz]) != _pattern(keys[j], sz):
                        verify_failures += 1
                        ok = False
            complete_load(job.job_id, ok)
            load_ms.append((perf() - t) * 1e3)
            if ready < n:
                short_loads += n - ready
                n = ready
            if not ok:   # wrong bytes are never a hit: recompute (store again) from here
                n = 0
        if n < nk:
            t = perf()
            job = prepare_store(keys[n:], ns, size, parent=keys[n - 1] if n else None,
                                wait_s=PUT_WAIT_S)
            if verify:
                for k, s, st in zip(job.keys, job.slots, job.status):
                    if st is OK:
                        slot_view(s)[:size] = _pattern(k, size)
            for st in complete_store(job.job_id, True):
                if st is OK:
                    stored += 1
                elif st is BlockStatus.SKIPPED:
                    skipped += 1
            store_ms.append((perf() - t) * 1e3)
        referenced += nk
        hit_blocks += n
        input_tokens += r.input_length
        hit_tokens += min(n * BLOCK_TOKENS, r.input_length)
        if (i + 1) % step == 0:
            if progress is not None:
                progress(i + 1, total)
            if stop is not None and stop.is_set():
                raise _Stopped()
    wall_s = perf() - t0
    if progress is not None:
        progress(total, total)
    t = perf()
    flushed = client.flush(None)   # no NVMe tier: True at once
    flush_s = perf() - t

    st = client.stats()
    after = st["counters"]
    c = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    g = c.get
    labels = [u["tier"] for u in st["tiers"]]
    tiers = {}
    for t in labels:
        if t == "dram":   # loads and the NVMe copies read DRAM; stores and promotions write it
            tiers[t] = {"read_bytes": g(cn.LOAD_BYTES, 0) + g(cn.NVME_BYTES_WRITTEN, 0),
                        "written_bytes": g(cn.BYTES_WRITTEN.format(tier=t), 0)
                        + g(cn.NVME_BYTES_READ, 0)}
        elif t == "nvme":
            tiers[t] = {"read_bytes": g(cn.NVME_BYTES_READ, 0),
                        "written_bytes": g(cn.NVME_BYTES_WRITTEN, 0)}
        else:   # no tier but dram and nvme counts bytes today: zeros
            tiers[t] = {"read_bytes": g(f"{t}_bytes_read", 0),
                        "written_bytes": g(cn.BYTES_WRITTEN.format(tier=t), 0)}
    return {
        "block_hit_ratio": round(hit_blocks / referenced, 6) if referenced else 0.0,
        "token_hit_ratio": round(hit_tokens / input_tokens, 6) if input_tokens else 0.0,
        "token_hit_definition": "sum(min(hit_blocks*512, input_length)) / sum(input_length)",
        "requests": total,
        "referenced_blocks": referenced,
        "hit_blocks": hit_blocks,
        "input_tokens": input_tokens,
        "hit_tokens": hit_tokens,
        "stored_blocks": stored,
        "skipped_blocks": skipped,
        "short_load_blocks": short_loads,
        "hits": {t: g(f"load_hits_{t}", 0) for t in labels},
        "tiers": tiers,
        "policies": dict(st.get("policies", {})),
        "write_behind": st.get("write_behind"),
        "flushed": bool(flushed),
        "flush_s": round(flush_s, 4),
        "verified_blocks": checked,
        "verify_failures": verify_failures,
        "load_ms": _dist(load_ms),
        "store_ms": _dist(store_ms),
        "wall_s": round(wall_s, 4),
        "throughput": {"requests_per_s": round(total / wall_s, 1) if wall_s else None,
                       "blocks_per_s": round(referenced / wall_s, 1) if wall_s else None},
        "counters": {k: v for k, v in sorted(c.items()) if v},
    }


def _warnings(reqs: list[TraceRequest], r: dict) -> list[str]:
    """Conditions under which the numbers mean less than they seem (one line each)."""
    out = []
    longest = max((len(q.hash_ids) for q in reqs), default=0)
    dram = r["capacity_blocks"]["dram"]
    if longest > dram:
        out.append(f"the longest request has {longest} blocks but DRAM holds {dram}: a request's "
                   "blocks are staged in DRAM, so its tail is skipped (--json: skipped_blocks)")
    if r["verify_failures"]:
        out.append(f"{r['verify_failures']} loaded blocks had wrong bytes")
    return out


def _describe(client: "Client", opts: ReplayOptions, p: _Plan, source: str, setup_s: float) -> dict:
    st = client.stats()
    caps = {u["tier"]: u["slots"] for u in st["tiers"]}
    return {
        "trace": source,
        "payload": opts.payload,
        "bytes_nominal": opts.payload == "none",
        "model": p.model.name,
        "bytes_per_token": p.model.bytes_per_token,
        "policy": st.get("policies", {}).get("dram") or opts.policy,
        "socket": opts.socket,
        "block_tokens": BLOCK_TOKENS,
        "block_bytes": p.block_bytes,
        "capacity_blocks": caps,
        "data_dir": str(client.data_dir) if getattr(client, "data_dir", None) and opts.data_dir else None,
        "setup_s": round(setup_s, 4),
    }


__all__ = ["BLOCK_TOKENS", "MODELS", "ModelPreset", "ReplayOptions", "TraceRequest",
           "baseline_options", "get_model",
           "load_requests", "parse_request", "plan", "read_trace", "replay", "replay_requests",
           "write_trace"]
