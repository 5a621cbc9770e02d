"""Daemon settings: built-in defaults, then a TOML file, then ``TIERSTORE_*`` environment
variables, then flags.

Precedence, lowest first: default < file (``--config`` or ``$TIERSTORE_CONFIG``) < environment
(``TIERSTORE_<SECTION>_<KEY>``) < command-line flags (``--data-dir``, ``--socket``, ``--pid-file``,
``--log-level``). :data:`KEYS` is the one list of keys: type, default, unit, environment name and
meaning of each; ``tierstore config show`` prints every key's effective value and where it came
from, and docs/operations.md carries the table :func:`markdown_table` generates (a test checks
that the two agree). An example file::

    [daemon]
    data_dir = "/var/lib/tierstore"
    socket = "/run/tierstore/ts.sock"      # default <data_dir>/ts.sock
    log_level = "info"

    [store]                                # fixed when the data dir is created (see below)
    slot_bytes = "2MiB"

    [dram]
    capacity = "64GiB"                     # or "32768blocks"; default 512 blocks
    policy = "prefix-lhd"

    [nvme]                                 # no NVMe tier unless capacity is set
    capacity = "2TiB"
    write_queue = "1GiB"

    [metrics]
    enabled = true

    [peers]
    enabled = true
    peers = ["b=10.0.0.2:7470"]

    [events]                               # KV events for routers (vLLM's format, ZMQ)
    enabled = true
    endpoint = "tcp://127.0.0.1:5557"

    [retention]                            # session pins requests ask for (tierstore/retention.py)
    max_ttl_s = 3600
    tenants = ["tenant-a-salt=2048", "=512"]

**One type rule** for the file and the environment: text (an environment variable, or a TOML
string) is read by the key's type; a TOML value of another type must be that type already.
Booleans: ``true``/``false`` (text also ``1``/``0``); integers: whole numbers; floats: numbers;
lists: TOML arrays of strings, or comma-separated text; capacities and sizes: the grammar of
:mod:`tierstore.units` (a capacity names its unit: bytes or blocks here, never tokens, since the
daemon serves many block sizes); choices: one of the listed words. So ``enabled = "yes"`` and
``TIERSTORE_METRICS_ENABLED=yes`` are refused alike.

**Unknown names are errors** with a did-you-mean: a section or key in the file, and any
``TIERSTORE_*`` environment variable that is neither a key nor one of :data:`OTHER_ENV` (the
cluster secret, the config path, test tooling). Keys that cannot apply (``[nvme]`` keys without an
NVMe tier, ``[peers]`` keys with peers off, ``[metrics]`` keys with metrics off) are warnings,
returned in ``DaemonSettings.warnings``.

**A data dir keeps its store config** (``store.json``, written when it is created).
:func:`reconcile_store` compares it with the keys set explicitly (file, env, flag): the DRAM
capacity, policies, admission, the write queue, direct I/O and compression, and growing the NVMe
tier are applied (and written back); the slot size, the NVMe path, ``file_slots``, shrinking or
removing the NVMe tier are refused with a message that says what to do. Keys left at their
default never override ``store.json``.

Pure functions; no threads, no I/O besides reading the file.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from tierstore.config import COMPRESSION, DIRECT_IO_MODES, DramConfig, NvmeConfig, StoreConfig
from tierstore.errors import ConfigError
from tierstore.policy import ADMISSION, DEFAULT_EVICTION, EVICTION
from tierstore.retention import RetentionConfig, parse_tenant_caps
from tierstore.units import format_bytes, parse_bytes, parse_capacity

CONFIG_ENV = "TIERSTORE_CONFIG"
ENV_PREFIX = "TIERSTORE_"
DEFAULT_SLOT_BYTES = 2 << 20
DEFAULT_DRAM_BLOCKS = 512
SLOT_ALIGN = 4096          # slots are page aligned (tiers/dram.py), records 4 KiB-padded (nvme.py)
MIN_SLOT_BYTES = 512       # one disk sector: anything smaller is not a KV block
LOG_LEVELS = ("debug", "info", "warning", "error")

OTHER_ENV = {
    CONFIG_ENV: "the settings file (same as --config)",
    "TIERSTORE_SECRET": "the cluster secret itself (tierstore/keys.py)",
    "TIERSTORE_SECRET_FILE": "a file holding the cluster secret (tierstore/keys.py)",
    "TIERSTORE_RDMA_DEVICE": "the verbs device of the RDMA tests",
}
"""``TIERSTORE_*`` variables that are not settings keys but belong to tierstore."""
OTHER_ENV_PREFIXES = ("TIERSTORE_SOFTROCE", "TIERSTORE_VLLM")
"""Prefixes of the test tooling's variables (.ci/, tools/softroce/), ignored here."""

SOURCES = ("default", "file", "env", "flag")


# ------------------------------------------------------------------------------ the keys
@dataclass(frozen=True)
class Key:
    """One settings key. ``kind``: bool, int, float, str, list, capacity, size, choice, policy,
    admission. ``default`` is the built-in value as written in a file (None: unset)."""

    section: str
    name: str
    kind: str
    default: Any
    unit: str = ""
    help: str = ""
    choices: tuple[str, ...] = ()
    env_aliases: tuple[str, ...] = ()

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        """The environment variable that sets this key (the first one when there are two)."""
        return self.env_aliases[0] if self.env_aliases else \
            f"{ENV_PREFIX}{self.section.upper()}_{self.name.upper()}"

    @property
    def env_names(self) -> tuple[str, ...]:
        canonical = f"{ENV_PREFIX}{self.section.upper()}_{self.name.upper()}"
        return tuple(dict.fromkeys((*self.env_aliases, canonical)))

    @property
    def type_name(self) -> str:
        if self.kind == "choice":
            return "/".join(self.choices)
        if self.kind == "policy":
            return "eviction policy"
        if self.kind == "admission":
            return "/".join(ADMISSION)
        if self.kind == "list":
            return "list of strings"
        return {"str": "string", "bool": "boolean", "int": "integer", "float": "number"}.get(
            self.kind, self.kind)


def _k(section, name, kind, default, unit="", help="", **kw) -> Key:
    return Key(section, name, kind, default, unit, help, **kw)


KEYS: tuple[Key, ...] = (
    _k("daemon", "data_dir", "str", None, "path", "the data dir (store.json, secret, lock, nvme/)",
       env_aliases=("TIERSTORE_DATA_DIR",)),
    _k("daemon", "socket", "str", None, "path", "the Unix socket; unset: <data_dir>/ts.sock",
       env_aliases=("TIERSTORE_SOCKET",)),
    _k("daemon", "pid_file", "str", None, "path",
       "write the pid here; `daemon start --detach` defaults to <data_dir>/daemon.pid"),
    _k("daemon", "max_frame_bytes", "size", 16 << 20, "bytes",
       "larger request frames are refused before they are read (at least 4096)"),
    _k("daemon", "drain_timeout_s", "float", 10.0, "s",
       "on stop: how long in-flight jobs may finish"),
    _k("daemon", "log_level", "choice", "info", "", "log detail", choices=LOG_LEVELS),
    _k("store", "slot_bytes", "size", DEFAULT_SLOT_BYTES, "bytes",
       "slot size of every tier: the largest block, at least 512 (a slot takes a multiple of "
       "4 KiB); fixed per data dir"),
    _k("store", "exclusive", "bool", True, "",
       "between an HBM tier and DRAM a block lives in one tier (the daemon has no HBM tier)"),
    _k("dram", "capacity", "capacity", f"{DEFAULT_DRAM_BLOCKS}blocks", "bytes or blocks",
       "the DRAM slab (shared memory), allocated at start; bytes count whole slots"),
    _k("dram", "capacity_blocks", "int", None, "blocks", "the same in blocks (not with capacity)"),
    _k("dram", "policy", "policy", DEFAULT_EVICTION, "", "DRAM eviction policy"),
    _k("nvme", "capacity", "capacity", 0, "bytes or blocks", "the NVMe tier; 0: no NVMe tier"),
    _k("nvme", "capacity_blocks", "int", None, "blocks", "the same in blocks (not with capacity)"),
    _k("nvme", "path", "str", "", "path", "slab files + LMDB; empty: <data_dir>/nvme; relative: "
       "under the data dir; fixed per data dir"),
    _k("nvme", "policy", "policy", DEFAULT_EVICTION, "", "NVMe eviction policy"),
    _k("nvme", "admission", "admission", "all", "", "which blocks get an NVMe copy"),
    _k("nvme", "write_through", "bool", True, "",
       "NVMe keeps a clean copy of every DRAM block, written behind the caller; false is refused"),
    _k("nvme", "write_queue", "size", 1 << 30, "bytes",
       "bytes waiting for their NVMe copy, at most (and at most half of DRAM); over it a store "
       "is SKIPPED"),
    _k("nvme", "direct_io", "choice", "auto", "", "O_DIRECT: auto (where the filesystem allows), "
       "on, off", choices=DIRECT_IO_MODES),
    _k("nvme", "compression", "choice", "none", "", "zstd per record (records say how they "
       "were stored)", choices=COMPRESSION),
    _k("nvme", "file_slots", "int", 64, "blocks", "records per slab file; fixed per data dir"),
    _k("metrics", "enabled", "bool", False, "", "serve Prometheus metrics"),
    _k("metrics", "host", "str", "127.0.0.1", "", "metrics address (another host is logged "
       "as a warning)"),
    _k("metrics", "port", "int", 9464, "", "metrics port (0: any free port)"),
    _k("peers", "enabled", "bool", False, "", "join other nodes' daemons (no listener, no "
       "connection when off)"),
    _k("peers", "node", "str", "", "", "this node's name; empty: the host name"),
    _k("peers", "host", "str", "127.0.0.1", "", "peer listener address"),
    _k("peers", "port", "int", 7470, "", "peer listener port (0: any free port, etcd only)"),
    _k("peers", "advertise_host", "str", "", "", "the address etcd gives others; empty: host"),
    _k("peers", "peers", "list", [], "", "static peers, \"name=host:port\" or \"host:port\""),
    _k("peers", "etcd", "list", [], "", "etcd endpoints host:port (first used); replaces the list"),
    _k("peers", "etcd_prefix", "str", "/tierstore/members/", "", "etcd key prefix"),
    _k("peers", "lease_ttl_s", "int", 5, "s", "etcd lease: a dead node vanishes after this"),
    _k("peers", "transports", "list", ["tcp"], "", "offered, best first: tcp, rdma"),
    _k("peers", "require_rdma", "bool", False, "", "refuse peers the pair cannot reach over rdma"),
    _k("peers", "streams", "int", 2, "", "TCP data connections per peer"),
    _k("peers", "timeout_s", "float", 5.0, "s", "longest wait on a silent peer"),
    _k("peers", "connect_timeout_s", "float", 2.0, "s", "connect timeout"),
    _k("peers", "retry_s", "float", 2.0, "s", "a failed peer is not dialled again for this long"),
    _k("peers", "verify_checksums", "bool", True, "", "xxh3-64 of every received block"),
    _k("events", "enabled", "bool", False, "", "publish KV events (vLLM's format) for routers; "
       "needs pyzmq"),
    _k("events", "endpoint", "str", "tcp://127.0.0.1:5557", "", "ZMQ PUB address bound by the "
       "daemon (another host is logged as a warning)"),
    _k("events", "replay_endpoint", "str", "tcp://127.0.0.1:5558", "", "ZMQ ROUTER address for "
       "late subscribers; empty: none"),
    _k("events", "buffer", "int", 10000, "batches", "batches kept for replay"),
    _k("events", "max_pending", "int", 1 << 20, "events", "residency changes waiting to be "
       "published, at most; beyond, the publisher resynchronises (a full snapshot)"),
    _k("events", "interval_s", "float", 0.05, "s", "how often waiting changes are published "
       "as one batch"),
    _k("events", "heartbeat_s", "float", 1.0, "s", "an idle publisher repeats its last sequence "
       "number this often (empty batch), so a gap shows"),
    _k("events", "topic", "str", "", "", "ZMQ topic of every message"),
    _k("events", "hwm", "int", 100000, "messages", "ZMQ high-water mark of the PUB socket"),
    _k("retention", "max_ttl_s", "float", 3600.0, "s", "longest TTL a retention hint (session "
       "pin from a request) gets; longer ones are clamped"),
    _k("retention", "tenant_blocks", "int", None, "blocks", "cap of hinted pins of a tenant "
       "(cache salt) without an entry in tenants; unset: a tenth of the DRAM tier"),
    _k("retention", "total_blocks", "int", None, "blocks", "cap of hinted pins of all tenants "
       "together; unset: half the DRAM tier; more than DRAM is refused"),
    _k("retention", "tenants", "list", [], "", "per-tenant caps, \"<cache salt>=<blocks>\" "
       "(\"=N\": requests without a salt); a cap above total_blocks is refused, caps adding up "
       "to more are a warning"),
)
KEY_BY_NAME: dict[str, Key] = {k.dotted: k for k in KEYS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(k.section for k in KEYS))
_ENV_KEYS: dict[str, Key] = {e: k for k in KEYS for e in k.env_names}
FLAGS = {"data_dir": "daemon.data_dir", "socket": "daemon.socket", "pid_file": "daemon.pid_file",
         "log_level": "daemon.log_level"}


def _did_you_mean(word: str, options) -> str:
    m = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {m[0]}?)" if m else ""


# ------------------------------------------------------------------------------ one type rule
_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_TRUE, _FALSE = ("true", "1"), ("false", "0")


def coerce(key: Key, value: Any, source: str) -> Any:
    """``value`` (a TOML value, or the text of an environment variable) as ``key``'s type.
    Text is read by the key's type; another TOML type must be the key's type already. Raises
    ConfigError naming ``source`` and the key."""
    what = f"{source}: [{key.section}] {key.name}"
    text = value.strip() if isinstance(value, str) else None
    k = key.kind
    if k == "bool":
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    if k == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None and _INT_RE.match(text):
            return int(text)
        raise ConfigError(f"{what} must be a whole number, got {value!r}")
    if k == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
        elif text is not None:
            try:
                v = float(text)
            except ValueError:
                raise ConfigError(f"{what} must be a number, got {value!r}") from None
        else:
            raise ConfigError(f"{what} must be a number, got {value!r}")
        if not math.isfinite(v):
            raise ConfigError(f"{what} must be a finite number, got {value!r}")
        return v
    if k == "list":
        if text is not None:
            return [v.strip() for v in text.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return [v.strip() for v in value]
        raise ConfigError(f"{what} must be a list of strings, got {value!r}")
    if k in ("capacity", "size"):
        if isinstance(value, bool) or not (text is not None or isinstance(value, int)):
            raise ConfigError(f"{what} must be a {k} such as "
                              f"{'64GiB or 4096blocks' if k == 'capacity' else '2MiB'}, got {value!r}")
        try:
            parsed = parse_capacity(value) if k == "capacity" else parse_bytes(value)
        except ConfigError as e:
            raise ConfigError(f"{what}: {e}") from None
        if k == "capacity" and parsed.tokens is not None:
            raise ConfigError(f"{what}: {value!r} counts tokens; the daemon serves many block "
                              "sizes, so give bytes (e.g. 64GiB) or blocks (e.g. 4096blocks)")
        return value if text is None else text
    if text is None:
        raise ConfigError(f"{what} must be a string, got {value!r}")
    if k == "choice":
        if text.lower() not in key.choices:
            raise ConfigError(f"{what}: {value!r} is not one of {', '.join(key.choices)}"
                              + _did_you_mean(text.lower(), key.choices))
        return text.lower()
    if k in ("policy", "admission"):
        registry = EVICTION if k == "policy" else ADMISSION
        if ":" in text:   # module:Class: load it now, so that a typo fails before anything starts
            from tierstore.policy import _load
            _load(text)
            return text
        if text.lower() not in registry:
            raise ConfigError(f"{what}: unknown {'eviction' if k == 'policy' else 'admission'} "
                              f"policy {value!r}{_did_you_mean(text.lower(), registry)}; known: "
                              f"{', '.join(sorted(registry))} (or module:Class)")
        return text.lower()
    return value if isinstance(value, str) else text


# ------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class Loaded:
    """Every key's effective value and where it came from (``tierstore config show``)."""

    values: dict[str, Any]     # dotted name -> value (coerced; the default when not set)
    sources: dict[str, str]    # dotted name -> "default" | "file" | "env" | "flag"
    origins: dict[str, str]    # dotted name -> the file path, variable name or flag
    config_file: str | None

    def given(self, dotted: str) -> bool:
        return self.sources[dotted] != "default"


def load_values(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                flags: Mapping[str, Any] | None = None) -> Loaded:
    """Defaults, then the file (``path`` or ``$TIERSTORE_CONFIG``), then the environment, then
    ``flags`` (``data_dir``, ``socket``, ``pid_file``, ``log_level``; None = not given). Every
    unknown name is a ConfigError with a did-you-mean."""
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    values = {k.dotted: k.default for k in KEYS}
    sources = {k.dotted: "default" for k in KEYS}
    origins = {k.dotted: "built-in" for k in KEYS}
    if path:
        p = Path(path)
        try:
            doc = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {getattr(e, 'strerror', None) or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        for section, body in doc.items():
            if section not in SECTIONS or not isinstance(body, dict):
                raise ConfigError(f"{p}: unknown section [{section}]"
                                  + _did_you_mean(section, SECTIONS)
                                  + f"; sections: {', '.join(SECTIONS)}")
            for name, v in body.items():
                key = KEY_BY_NAME.get(f"{section}.{name}")
                if key is None:
                    names = [k.name for k in KEYS if k.section == section]
                    raise ConfigError(f"{p}: unknown setting [{section}] {name}"
                                      + _did_you_mean(name, names))
                values[key.dotted] = coerce(key, v, str(p))
                sources[key.dotted], origins[key.dotted] = "file", str(p)
    seen: dict[str, str] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in OTHER_ENV or name.startswith(OTHER_ENV_PREFIXES):
            continue
        key = _ENV_KEYS.get(name)
        if key is None:
            known = list(_ENV_KEYS) + list(OTHER_ENV)
            raise ConfigError(f"unknown environment variable {name}" + _did_you_mean(name, known)
                              + " (every TIERSTORE_* variable must name a setting: "
                              "`tierstore config show` lists them)")
        v = coerce(key, env[name], f"${name}")
        if key.dotted in seen and values[key.dotted] != v:
            raise ConfigError(f"${name} and ${seen[key.dotted]} both set [{key.section}] "
                              f"{key.name}, to different values; unset one")
        seen[key.dotted] = name
        values[key.dotted] = v
        sources[key.dotted], origins[key.dotted] = "env", f"${name}"
    for flag, v in (flags or {}).items():
        if v is None:
            continue
        key = KEY_BY_NAME[FLAGS[flag]]
        values[key.dotted] = coerce(key, v, f"--{flag.replace('_', '-')}")
        sources[key.dotted], origins[key.dotted] = "flag", f"--{flag.replace('_', '-')}"
    return Loaded(values, sources, origins, str(path) if path else None)


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class EventsSettings:
    """``[events]``: the KV event publisher (tierstore/daemon/publisher.py)."""

    enabled: bool = False
    endpoint: str = "tcp://127.0.0.1:5557"
    replay_endpoint: str = "tcp://127.0.0.1:5558"
    buffer: int = 10000
    max_pending: int = 1 << 20
    interval_s: float = 0.05
    heartbeat_s: float = 1.0
    topic: str = ""
    hwm: int = 100000


def _events_settings(v: Mapping[str, Any], warnings: list[str]) -> EventsSettings:
    e = EventsSettings(**{k.name: v[k.dotted] for k in KEYS if k.section == "events"})
    for name in ("endpoint", "replay_endpoint"):
        ep = getattr(e, name)
        if not ep:
            if name == "endpoint":
                raise ConfigError("[events] endpoint must not be empty")
            continue
        if not ep.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(f"[events] {name} {ep!r}: expected tcp://host:port or ipc://path")
        if e.enabled and ep.startswith("tcp://") and \
                ep[6:].rpartition(":")[0].strip("[]") not in ("127.0.0.1", "localhost", "::1"):
            warnings.append(f"[events] {name} {ep} is not loopback: other hosts can subscribe "
                            "to this node's block hashes")
    if e.buffer < 1 or e.max_pending < 16 or e.hwm < 0:
        raise ConfigError("[events] buffer must be >= 1, max_pending >= 16, hwm >= 0")
    if e.interval_s <= 0 or e.heartbeat_s <= 0:
        raise ConfigError("[events] interval_s and heartbeat_s must be positive")
    return e


@dataclass(frozen=True)
class PeerEntry:
    """One static peer: ``name=host:port`` (or ``host:port``, named by its address)."""

    name: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "PeerEntry":
        raw = str(text).strip()
        name, sep, addr = raw.partition("=")
        if not sep:
            name, addr = "", raw
        host, port = parse_address(addr, f"[peers] peers entry {raw!r}")
        return cls(name.strip() or f"{host}:{port}", host, port)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ConfigError otherwise."""
    t = str(text).strip()
    host, sep, port = t.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"{what}: expected host:port, got {text!r}")
    return host, int(port)


@dataclass(frozen=True)
class PeersSettings:
    """``[peers]``: whether and how this daemon joins other nodes (see the module docstring)."""

    enabled: bool = False
    node: str = ""
    host: str = "127.0.0.1"
    port: int = 7470
    advertise_host: str = ""
    peers: tuple[PeerEntry, ...] = ()
    etcd: tuple[tuple[str, int], ...] = ()
    etcd_prefix: str = "/tierstore/members/"
    lease_ttl_s: int = 5
    transports: tuple[str, ...] = ("tcp",)
    require_rdma: bool = False
    streams: int = 2
    timeout_s: float = 5.0
    connect_timeout_s: float = 2.0
    retry_s: float = 2.0
    verify_checksums: bool = True

    def node_name(self) -> str:
        import socket as _socket

        return self.node or _socket.gethostname()


_TRANSPORTS = ("tcp", "rdma", "loopback")


def _peers_settings(v: Mapping[str, Any]) -> PeersSettings:
    p = {k.name: v[k.dotted] for k in KEYS if k.section == "peers"}
    entries = tuple(PeerEntry.parse(e) for e in p["peers"])
    names = [e.name for e in entries]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"[peers] peers: duplicate name(s) {', '.join(sorted(dup))}")
    etcd = tuple(parse_address(e, "[peers] etcd endpoint") for e in p["etcd"])
    transports = tuple(str(t).strip().lower() for t in p["transports"])
    bad = [t for t in transports if t not in _TRANSPORTS]
    if bad or not transports:
        raise ConfigError(f"[peers] transports: unknown {bad or 'empty list'}; "
                          f"choose from {', '.join(_TRANSPORTS)}")
    s = PeersSettings(
        enabled=p["enabled"], node=p["node"].strip(), host=p["host"], port=p["port"],
        advertise_host=p["advertise_host"], peers=entries, etcd=etcd,
        etcd_prefix=p["etcd_prefix"], lease_ttl_s=p["lease_ttl_s"], transports=transports,
        require_rdma=p["require_rdma"], streams=p["streams"], timeout_s=p["timeout_s"],
        connect_timeout_s=p["connect_timeout_s"], retry_s=p["retry_s"],
        verify_checksums=p["verify_checksums"])
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"[peers] port {s.port} out of range")
    if s.port == 0 and s.enabled and not s.etcd:
        raise ConfigError("[peers] port 0 (any free port) needs etcd membership: static peers "
                          "could not find this node")
    if s.lease_ttl_s < 1:
        raise ConfigError("[peers] lease_ttl_s must be at least 1")
    if s.streams < 1 or s.timeout_s <= 0 or s.connect_timeout_s <= 0 or s.retry_s < 0:
        raise ConfigError("[peers] streams must be >= 1 and timeouts > 0")
    if s.require_rdma and "rdma" not in s.transports:
        raise ConfigError("[peers] require_rdma is set but transports does not offer rdma")
    if s.node and ("/" in s.node or any(c.isspace() for c in s.node)):
        raise ConfigError(f"[peers] node {s.node!r} must not contain '/' or spaces")
    return s


@dataclass(frozen=True)
class DaemonSettings:
    """Everything ``tierstore daemon`` needs. ``store`` is used to create a data dir, and its
    explicitly set keys (``given``) are reconciled with an existing one (:func:`reconcile_store`).
    """

    data_dir: str | None = None
    socket: str | None = None
    pid_file: str | None = None
    max_frame_bytes: int = 16 << 20
    drain_timeout_s: float = 10.0
    log_level: str = "info"
    store: StoreConfig = field(default_factory=lambda: StoreConfig(
        slot_bytes=DEFAULT_SLOT_BYTES, dram=DramConfig(capacity_blocks=DEFAULT_DRAM_BLOCKS)))
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    peers: PeersSettings = field(default_factory=PeersSettings)
    events: EventsSettings = field(default_factory=EventsSettings)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    given: frozenset[str] = frozenset()      # dotted names set by a file, env or flag
    warnings: tuple[str, ...] = ()           # keys that cannot apply, one line each

    def with_flags(self, data_dir: str | None = None, socket: str | None = None) -> "DaemonSettings":
        given = set(self.given) | ({"daemon.data_dir"} if data_dir else set()) \
            | ({"daemon.socket"} if socket else set())
        return replace(self, data_dir=data_dir or self.data_dir, socket=socket or self.socket,
                       given=frozenset(given))

    def resolved_socket(self) -> str:
        """The socket path: as configured, else ``<data_dir>/ts.sock``."""
        if self.socket:
            return self.socket
        if not self.data_dir:
            raise ConfigError("no socket: pass --socket or --data-dir (or set TIERSTORE_SOCKET)")
        return str(Path(self.data_dir) / "ts.sock")


def _blocks(v: Mapping[str, Any], given: frozenset[str], section: str, slot_bytes: int,
            default: int) -> int:
    cap, blocks = v[f"{section}.capacity"], v[f"{section}.capacity_blocks"]
    if blocks is not None:
        if f"{section}.capacity" in given:
            raise ConfigError(f"[{section}] capacity and capacity_blocks are both set; keep one "
                              f"(capacity = \"{blocks}blocks\" says the same as capacity_blocks)")
        if blocks < 0:
            raise ConfigError(f"[{section}] capacity_blocks must not be negative")
        return blocks
    if cap is None:
        return default
    return parse_capacity(cap).to_blocks(1, slot_bytes)


def settings_from(loaded: Loaded) -> DaemonSettings:
    """Build and validate :class:`DaemonSettings` from loaded values. Raises ConfigError."""
    v = loaded.values
    given = frozenset(d for d in v if loaded.given(d))
    slot_bytes = parse_bytes(v["store.slot_bytes"])
    if slot_bytes < MIN_SLOT_BYTES:
        raise ConfigError(f"[store] slot_bytes {v['store.slot_bytes']!r} is smaller than a disk "
                          f"sector: a slot holds a whole KV block, at least {MIN_SLOT_BYTES} bytes "
                          "(e.g. \"2MiB\")")
    warnings: list[str] = []
    stride = -(-slot_bytes // SLOT_ALIGN) * SLOT_ALIGN   # what a slot takes in DRAM (tiers/dram.py)
    if stride != slot_bytes:
        warnings.append(f"[store] slot_bytes {v['store.slot_bytes']!r}: blocks up to "
                        f"{slot_bytes:,} bytes, but every slot takes {format_bytes(stride)} of "
                        f"DRAM (slots are {SLOT_ALIGN}-byte aligned); a multiple of {SLOT_ALIGN} "
                        "wastes nothing")
    dram_blocks = _blocks(v, given, "dram", stride, DEFAULT_DRAM_BLOCKS)
    if dram_blocks < 1:
        raise ConfigError(f"[dram] capacity {v['dram.capacity']!r} holds no block of "
                          f"{format_bytes(slot_bytes)}; the daemon needs a DRAM tier")
    dram = DramConfig(capacity_blocks=dram_blocks, policy=v["dram.policy"])
    nvme = None
    n_blocks = _blocks(v, given, "nvme", stride, 0)
    nv_given = sorted(d for d in given if d.startswith("nvme.")
                      and d not in ("nvme.capacity", "nvme.capacity_blocks"))
    if n_blocks > 0:
        if not v["nvme.write_through"]:
            raise ConfigError(
                "[nvme] write_through = false is no longer supported: NVMe keeps a clean copy of "
                "every DRAM block, written behind the caller; remove the key (or set it true)")
        queue = parse_bytes(v["nvme.write_queue"])
        if queue <= 0:
            raise ConfigError("[nvme] write_queue must be positive")
        if v["nvme.file_slots"] < 1:
            raise ConfigError("[nvme] file_slots must be at least 1")
        nvme = NvmeConfig(path=v["nvme.path"], capacity_blocks=n_blocks, policy=v["nvme.policy"],
                          admission=v["nvme.admission"], write_through=True,
                          write_queue_bytes=queue, direct_io=v["nvme.direct_io"],
                          compression=v["nvme.compression"], file_slots=v["nvme.file_slots"])
    elif nv_given:
        warnings.append(f"[nvme] {', '.join(d.split('.')[1] for d in nv_given)} set but there is "
                        "no NVMe tier (set [nvme] capacity to have one)")
    if "store.exclusive" in given:
        warnings.append("[store] exclusive applies between an HBM tier and DRAM; the daemon has "
                        "no HBM tier")
    store = StoreConfig(slot_bytes=slot_bytes, dram=dram, nvme=nvme, exclusive=v["store.exclusive"])
    metrics = MetricsSettings(enabled=v["metrics.enabled"], host=v["metrics.host"],
                              port=v["metrics.port"])
    if not 0 <= metrics.port <= 65535:
        raise ConfigError(f"[metrics] port {metrics.port} out of range")
    events = _events_settings(v, warnings)
    for section, on in (("metrics", metrics.enabled), ("peers", v["peers.enabled"]),
                        ("events", events.enabled)):
        off = sorted(d.split(".")[1] for d in given if d.startswith(section + ".")
                     and d != f"{section}.enabled")
        if off and not on:
            warnings.append(f"[{section}] {', '.join(off)} set but {section} are off "
                            f"(set [{section}] enabled = true)")
    retention = RetentionConfig(max_ttl_s=v["retention.max_ttl_s"],
                                tenant_blocks=v["retention.tenant_blocks"],
                                total_blocks=v["retention.total_blocks"],
                                tenants=parse_tenant_caps(v["retention.tenants"]))
    # checked against the DRAM tier when the daemon opens its store (store.json may size it)
    max_frame = parse_bytes(v["daemon.max_frame_bytes"])
    if max_frame < 4096:
        raise ConfigError("[daemon] max_frame_bytes must be at least 4096")
    if v["daemon.drain_timeout_s"] < 0:
        raise ConfigError("[daemon] drain_timeout_s must not be negative")
    return DaemonSettings(data_dir=v["daemon.data_dir"] or None, socket=v["daemon.socket"] or None,
                          pid_file=v["daemon.pid_file"] or None, max_frame_bytes=max_frame,
                          drain_timeout_s=v["daemon.drain_timeout_s"],
                          log_level=v["daemon.log_level"], store=store, metrics=metrics,
                          peers=_peers_settings(v), events=events, retention=retention,
                          given=given,
                          warnings=tuple(warnings))


def load_settings(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                  *, data_dir: str | None = None, socket: str | None = None,
                  pid_file: str | None = None, log_level: str | None = None) -> DaemonSettings:
    """Settings from file + environment + flags. Raises ConfigError with a one-line message."""
    return settings_from(load_values(path, env, dict(data_dir=data_dir, socket=socket,
                                                     pid_file=pid_file, log_level=log_level)))


# ------------------------------------------------------------------------------ data dirs
_APPLIED = ("dram.capacity", "dram.capacity_blocks", "dram.policy", "nvme.policy",
            "nvme.admission", "nvme.write_queue", "nvme.direct_io", "nvme.compression",
            "store.exclusive")


def reconcile_store(stored: StoreConfig, s: DaemonSettings, data_dir: str | os.PathLike = "the data dir"
                    ) -> tuple[StoreConfig, list[str]]:
    """The store config to open an existing data dir with: ``stored`` (its store.json) with the
    keys ``s`` sets explicitly applied where that is safe. Returns ``(config, changes)``, one
    line per applied change. Raises ConfigError (saying what to do) for a change a data dir
    cannot take: the slot size, the NVMe path or file_slots, shrinking or removing NVMe."""
    want, g = s.store, s.given
    where = f"data dir {data_dir}"
    changes: list[str] = []
    cfg = stored

    def refuse(what: str, have: str, asked: str, how: str) -> None:
        raise ConfigError(f"{where} was created with {what} = {have}; {asked} cannot apply to it: "
                          f"{how}, or start with a new --data-dir")

    if "store.slot_bytes" in g and want.slot_bytes != stored.slot_bytes:
        refuse("[store] slot_bytes", format_bytes(stored.slot_bytes), format_bytes(want.slot_bytes),
               "remove slot_bytes from your settings (or set it back)")
    if "store.exclusive" in g and want.exclusive != stored.exclusive:
        cfg = replace(cfg, exclusive=want.exclusive)
        changes.append(f"[store] exclusive {stored.exclusive} -> {want.exclusive}")
    dram = cfg.dram
    if g & {"dram.capacity", "dram.capacity_blocks"} and want.dram.capacity_blocks != dram.capacity_blocks:
        changes.append(f"[dram] capacity {dram.capacity_blocks} -> {want.dram.capacity_blocks} blocks")
        dram = replace(dram, capacity_blocks=want.dram.capacity_blocks)
    if "dram.policy" in g and want.dram.policy != dram.policy:
        changes.append(f"[dram] policy {dram.policy} -> {want.dram.policy}")
        dram = replace(dram, policy=want.dram.policy)
    cfg = replace(cfg, dram=dram)
    nv_given = {d for d in g if d.startswith("nvme.")}
    cap_given = bool(nv_given & {"nvme.capacity", "nvme.capacity_blocks"})
    old = stored.nvme

    def place(p: str) -> Path:   # a store.json path: relative to the data dir
        return Path(p) if Path(p).is_absolute() else Path(data_dir) / (p or "nvme")

    if old is None:
        if want.nvme is not None and cap_given:
            changes.append(f"[nvme] added: {want.nvme.capacity_blocks} blocks")
            cfg = replace(cfg, nvme=replace(want.nvme, path=want.nvme.path or "nvme"))
        return cfg, changes
    if cap_given and want.nvme is None:
        refuse("an NVMe tier", f"{old.capacity_blocks} blocks", "[nvme] capacity 0",
               "remove the NVMe capacity from your settings")
    if want.nvme is None:
        return cfg, changes
    new = old
    if cap_given and want.nvme.capacity_blocks != old.capacity_blocks:
        if want.nvme.capacity_blocks < old.capacity_blocks:
            refuse("[nvme] capacity", f"{old.capacity_blocks} blocks",
                   f"shrinking it to {want.nvme.capacity_blocks} blocks",
                   f"set it to {old.capacity_blocks}blocks or more")
        changes.append(f"[nvme] capacity {old.capacity_blocks} -> {want.nvme.capacity_blocks} blocks")
        new = replace(new, capacity_blocks=want.nvme.capacity_blocks)
    if "nvme.path" in g and place(want.nvme.path) != place(old.path):
        refuse("[nvme] path", repr(old.path), repr(want.nvme.path),
               "remove path from your settings (or set it back)")
    if "nvme.file_slots" in g and want.nvme.file_slots != old.file_slots:
        refuse("[nvme] file_slots", str(old.file_slots), str(want.nvme.file_slots),
               "remove file_slots from your settings (or set it back)")
    for dotted, attr in (("nvme.policy", "policy"), ("nvme.admission", "admission"),
                         ("nvme.write_queue", "write_queue_bytes"), ("nvme.direct_io", "direct_io"),
                         ("nvme.compression", "compression")):
        if dotted in g and getattr(want.nvme, attr) != getattr(old, attr):
            changes.append(f"[nvme] {dotted.split('.')[1]} {getattr(old, attr)} -> "
                           f"{getattr(want.nvme, attr)}")
            new = replace(new, **{attr: getattr(want.nvme, attr)})
    return replace(cfg, nvme=new), changes


# ------------------------------------------------------------------------------ documentation
def _fmt_default(k: Key) -> str:
    d = k.default
    if d is None or d == "" or d == []:
        return "unset" if k.kind != "list" else "[]"
    if k.kind == "size" and isinstance(d, int):
        return _bytes_text(d)
    if isinstance(d, bool):
        return "true" if d else "false"
    if isinstance(d, list):
        return "[" + ", ".join(f'"{x}"' for x in d) + "]"
    return str(d)


def bytes_text(n: int) -> str:
    """``2097152`` -> ``2MiB`` (whole binary units), else the number."""
    return _bytes_text(n)


def _bytes_text(n: int) -> str:
    for unit, mult in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def markdown_table() -> str:
    """Every key as a Markdown table (docs/operations.md holds this text; a test compares)."""
    rows = ["| key | type | default | unit | environment | meaning |",
            "|---|---|---|---|---|---|"]
    for k in KEYS:
        env = " or ".join(f"`{e}`" for e in k.env_names)
        rows.append(f"| `[{k.section}] {k.name}` | {k.type_name} | `{_fmt_default(k)}` | "
                    f"{k.unit or '-'} | {env} | {k.help} |")
    return "\n".join(rows)


def describe(loaded: Loaded) -> list[dict]:
    """One row per key for ``tierstore config show``: section, key, value, source, origin, type,
    unit, env, default."""
    out = []
    for k in KEYS:
        v = loaded.values[k.dotted]
        out.append({"section": k.section, "key": k.name, "value": v,
                    "source": loaded.sources[k.dotted], "origin": loaded.origins[k.dotted],
                    "type": k.type_name, "kind": k.kind, "unit": k.unit, "env": k.env,
                    "default": _fmt_default(k)})
    return out


__all__ = ["DaemonSettings", "EventsSettings", "KEYS", "Key", "Loaded", "MetricsSettings", "OTHER_ENV",
           "PeerEntry", "PeersSettings", "coerce", "describe", "load_settings", "load_values",
           "markdown_table", "parse_address", "reconcile_store", "settings_from"]

