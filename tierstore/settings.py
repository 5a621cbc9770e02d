"""Daemon settings: a TOML file, then ``TIERSTORE_*`` environment overrides, then flags.

Precedence, lowest first: built-in defaults < TOML file (``--config`` or ``$TIERSTORE_CONFIG``) <
environment < command-line flags (``--data-dir``, ``--socket``). File layout: every key is
optional; the values shown are an example, the built-in default follows ``#``::

    [daemon]
    data_dir = "/var/lib/tierstore"        # env TIERSTORE_DATA_DIR or TIERSTORE_DAEMON_DATA_DIR
    socket = "/run/tierstore/ts.sock"      # env TIERSTORE_SOCKET or TIERSTORE_DAEMON_SOCKET
    pid_file = ""                          # "" = none; `daemon start --detach` uses <data_dir>/daemon.pid
    max_frame_bytes = 16777216             # frames above this are refused before reading the body
    drain_timeout_s = 10.0                 # SIGTERM: wait this long for in-flight jobs
    log_level = "info"

    [store]                                # used when the data dir is created; store.json wins after
    slot_bytes = "2MiB"                    # largest block payload
    exclusive = true

    [dram]
    capacity = "8GiB"                      # default 512 blocks (1 GiB of 2 MiB slots); bytes ("8GiB")
                                           # or blocks ("4096blocks"); or capacity_blocks = 4096
    policy = "prefix-lhd"                  # tierstore.policy.DEFAULT_EVICTION

    [nvme]                                 # default: no NVMe tier (omit the section or capacity 0)
    path = ""                              # "" = <data_dir>/nvme; relative = under the data dir
    capacity = "512GiB"                    # bytes or blocks, as for dram
    policy = "prefix-lhd"                  # tierstore.policy.DEFAULT_EVICTION
    admission = "all"
    write_through = true                   # NVMe keeps a clean copy of every DRAM block,
                                           # written behind the caller; false is refused
    write_queue = "1GiB"                   # bytes waiting for their NVMe copy, at most (and at
                                           # most half of DRAM); over it, stores are SKIPPED
    direct_io = "auto"
    compression = "none"
    file_slots = 64

    [metrics]
    enabled = false                        # Prometheus exporter (prometheus-client)
    host = "127.0.0.1"                     # loopback by default; anything else is logged as a warning
    port = 9464

    [peers]                                # other nodes' daemons (tierstore/daemon/peers.py)
    enabled = false                        # off by default: no listener, no outgoing connection
    node = ""                              # this node's name; "" = the host name
    host = "127.0.0.1"                     # peer listener address (loopback by default)
    port = 7470                            # 0 = any free port (only useful with etcd)
    advertise_host = ""                    # what etcd tells other nodes; "" = host
    peers = ["b=10.0.0.2:7470"]            # static list, "name=host:port" or "host:port"
    etcd = ["10.0.0.9:2379"]               # etcd endpoints (first is used); replaces the list
    etcd_prefix = "/tierstore/members/"
    lease_ttl_s = 5                        # etcd lease: a dead node vanishes after this
    transports = ["tcp"]                   # offered, best first after filtering (tcp, rdma)
    require_rdma = false                   # refuse peers the pair cannot reach over rdma
    streams = 2                            # TCP data connections per peer
    timeout_s = 5.0                        # longest wait on a silent peer
    connect_timeout_s = 2.0
    retry_s = 2.0                          # a peer that failed is not dialed again for this long
    verify_checksums = true                # xxh3-64 of every received block

List values from the environment are comma separated
(``TIERSTORE_PEERS_PEERS="a=169.254.1.1:7470,b=169.254.1.2:7470"``).

Environment overrides are ``TIERSTORE_<SECTION>_<KEY>`` (``TIERSTORE_DRAM_CAPACITY=16GiB``,
``TIERSTORE_METRICS_ENABLED=1``, ``TIERSTORE_NVME_WRITE_THROUGH=true``); values are parsed by the
type of the key. ``TIERSTORE_SECRET`` / ``TIERSTORE_SECRET_FILE`` are the cluster secret's
(tierstore/keys.py), not settings. Capacities in tokens are refused here: the daemon serves many
block sizes, so give bytes or blocks.

Pure functions; no threads, no I/O besides reading the file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from tierstore.config import DramConfig, NvmeConfig, StoreConfig
from tierstore.errors import ConfigError
from tierstore.policy import DEFAULT_EVICTION
from tierstore.units import parse_bytes, parse_capacity

CONFIG_ENV = "TIERSTORE_CONFIG"
ENV_PREFIX = "TIERSTORE_"
DEFAULT_SLOT_BYTES = 2 << 20
DEFAULT_DRAM_BLOCKS = 512

_SCHEMA: dict[str, dict[str, type]] = {
    "daemon": {"data_dir": str, "socket": str, "pid_file": str, "max_frame_bytes": int,
               "drain_timeout_s": float, "log_level": str},
    "store": {"slot_bytes": str, "exclusive": bool},
    "dram": {"capacity": str, "capacity_blocks": int, "policy": str},
    "nvme": {"path": str, "capacity": str, "capacity_blocks": int, "policy": str, "admission": str,
             "write_through": bool, "write_queue": str, "direct_io": str, "compression": str,
             "file_slots": int},
    "metrics": {"enabled": bool, "host": str, "port": int},
    "peers": {"enabled": bool, "node": str, "host": str, "port": int, "advertise_host": str,
              "peers": list, "etcd": list, "etcd_prefix": str, "lease_ttl_s": int,
              "transports": list, "require_rdma": bool, "streams": int, "timeout_s": float,
              "connect_timeout_s": float, "retry_s": float, "verify_checksums": bool},
}
_ALIASES = {"TIERSTORE_DATA_DIR": ("daemon", "data_dir"), "TIERSTORE_SOCKET": ("daemon", "socket")}


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464


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


def _peers_settings(p: dict) -> PeersSettings:
    d = PeersSettings()
    entries = tuple(PeerEntry.parse(e) for e in p.get("peers", ()))
    names = [e.name for e in entries]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"[peers] peers: duplicate name(s) {', '.join(sorted(dup))}")
    etcd = tuple(parse_address(e, "[peers] etcd endpoint") for e in p.get("etcd", ()))
    transports = tuple(str(t).strip().lower() for t in p.get("transports", d.transports))
    bad = [t for t in transports if t not in _TRANSPORTS]
    if bad or not transports:
        raise ConfigError(f"[peers] transports: unknown {bad or 'empty list'}; "
                          f"choose from {', '.join(_TRANSPORTS)}")
    s = PeersSettings(
        enabled=p.get("enabled", d.enabled), node=p.get("node", d.node).strip(),
        host=p.get("host", d.host), port=p.get("port", d.port),
        advertise_host=p.get("advertise_host", d.advertise_host), peers=entries, etcd=etcd,
        etcd_prefix=p.get("etcd_prefix", d.etcd_prefix), lease_ttl_s=p.get("lease_ttl_s", d.lease_ttl_s),
        transports=transports, require_rdma=p.get("require_rdma", d.require_rdma),
        streams=p.get("streams", d.streams), timeout_s=p.get("timeout_s", d.timeout_s),
        connect_timeout_s=p.get("connect_timeout_s", d.connect_timeout_s),
        retry_s=p.get("retry_s", d.retry_s), verify_checksums=p.get("verify_checksums", d.verify_checksums))
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
    """Everything ``tierstore daemon`` needs. ``store`` is used only to create a data dir."""

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

    def with_flags(self, data_dir: str | None = None, socket: str | None = None) -> "DaemonSettings":
        return replace(self, data_dir=data_dir or self.data_dir, socket=socket or self.socket)

    def resolved_socket(self) -> str:
        """The socket path: as configured, else ``<data_dir>/ts.sock``."""
        if self.socket:
            return self.socket
        if not self.data_dir:
            raise ConfigError("no socket: pass --socket or --data-dir (or set TIERSTORE_SOCKET)")
        return str(Path(self.data_dir) / "ts.sock")


def _coerce(section: str, key: str, value: Any, source: str) -> Any:
    kind = _SCHEMA[section].get(key)
    if kind is None:
        raise ConfigError(f"{source}: unknown setting [{section}] {key}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{source}: [{section}] {key} must be true or false, got {value!r}")
    if kind is str:
        return value if isinstance(value, str) else str(value)
    if kind is list:
        if isinstance(value, str):   # environment: comma separated
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{source}: [{section}] {key} must be a list of strings, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: [{section}] {key} must be {kind.__name__}, got {value!r}") from None


def load_raw(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None
             ) -> dict[str, dict[str, Any]]:
    """Merged sections: file (``path`` or ``$TIERSTORE_CONFIG``), then environment overrides."""
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    raw: dict[str, dict[str, Any]] = {}
    if path:
        p = Path(path)
        try:
            doc = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        for section, values in doc.items():
            if section not in _SCHEMA or not isinstance(values, dict):
                raise ConfigError(f"{p}: unknown section [{section}]")
            raw[section] = {k: _coerce(section, k, v, str(p)) for k, v in values.items()}
    for name, value in env.items():
        if name in _ALIASES:
            section, key = _ALIASES[name]
        elif name.startswith(ENV_PREFIX):
            rest = name[len(ENV_PREFIX):].lower()
            section, _, key = rest.partition("_")
            if section not in _SCHEMA or key not in _SCHEMA[section]:
                continue   # TIERSTORE_SECRET etc. belong to others
        else:
            continue
        raw.setdefault(section, {})[key] = _coerce(section, key, value, f"${name}")
    return raw


def _blocks(section: str, values: dict, slot_bytes: int, default: int) -> int:
    if "capacity_blocks" in values:
        return values["capacity_blocks"]
    if "capacity" not in values:
        return default
    cap = parse_capacity(values["capacity"])
    if cap.tokens is not None:
        raise ConfigError(f"[{section}] capacity {values['capacity']!r}: give bytes (e.g. 8GiB) "
                          "or blocks (e.g. 4096blocks), not tokens")
    return cap.to_blocks(1, slot_bytes)


def load_settings(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                  *, data_dir: str | None = None, socket: str | None = None) -> DaemonSettings:
    """Settings from file + environment + flags. Raises ConfigError with a one-line message."""
    raw = load_raw(path, env)
    d = raw.get("daemon", {})
    st = raw.get("store", {})
    slot_bytes = parse_bytes(st.get("slot_bytes", DEFAULT_SLOT_BYTES))
    dr = raw.get("dram", {})
    dram = DramConfig(capacity_blocks=_blocks("dram", dr, slot_bytes, DEFAULT_DRAM_BLOCKS),
                      policy=dr.get("policy", DEFAULT_EVICTION))
    nvme = None
    nv = raw.get("nvme")
    if nv:
        n_blocks = _blocks("nvme", nv, slot_bytes, 4096)
        if n_blocks > 0:
            nvme = NvmeConfig(path=nv.get("path", ""), capacity_blocks=n_blocks,
                              policy=nv.get("policy", DEFAULT_EVICTION), admission=nv.get("admission", "all"),
                              write_through=nv.get("write_through", True),
                              write_queue_bytes=parse_bytes(nv.get("write_queue", "1GiB")),
                              direct_io=nv.get("direct_io", "auto"),
                              compression=nv.get("compression", "none"),
                              file_slots=nv.get("file_slots", 64))
    store = StoreConfig(slot_bytes=slot_bytes, dram=dram, nvme=nvme,
                        exclusive=st.get("exclusive", True))
    m = raw.get("metrics", {})
    metrics = MetricsSettings(enabled=m.get("enabled", False), host=m.get("host", "127.0.0.1"),
                              port=m.get("port", 9464))
    if not 0 <= metrics.port <= 65535:
        raise ConfigError(f"[metrics] port {metrics.port} out of range")
    s = DaemonSettings(data_dir=d.get("data_dir") or None, socket=d.get("socket") or None,
                       pid_file=d.get("pid_file") or None,
                       max_frame_bytes=d.get("max_frame_bytes", 16 << 20),
                       drain_timeout_s=d.get("drain_timeout_s", 10.0),
                       log_level=d.get("log_level", "info"), store=store, metrics=metrics,
                       peers=_peers_settings(raw.get("peers", {})))
    if s.max_frame_bytes < 4096:
        raise ConfigError("[daemon] max_frame_bytes must be at least 4096")
    return s.with_flags(data_dir, socket)
