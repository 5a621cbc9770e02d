"""Daemon settings: a TOML file, then ``TIERSTORE_*`` environment overrides, then flags.

Precedence, lowest first: built-in defaults < TOML file (``--config`` or ``$TIERSTORE_CONFIG``) <
environment < command-line flags (``--data-dir``, ``--socket``). File layout (every key optional)::

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
    capacity = "8GiB"                      # bytes ("8GiB") or blocks ("4096blocks"); or capacity_blocks
    policy = "lru"

    [nvme]                                 # omit the section (or capacity 0) for no NVMe tier
    path = ""                              # "" = <data_dir>/nvme
    capacity = "512GiB"
    policy = "lru"
    admission = "all"
    write_through = false
    direct_io = "auto"
    compression = "none"
    file_slots = 64

    [metrics]
    enabled = false                        # Prometheus exporter (prometheus-client)
    host = "127.0.0.1"                     # loopback by default; anything else is logged as a warning
    port = 9464

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
             "write_through": bool, "direct_io": str, "compression": str, "file_slots": int},
    "metrics": {"enabled": bool, "host": str, "port": int},
}
_ALIASES = {"TIERSTORE_DATA_DIR": ("daemon", "data_dir"), "TIERSTORE_SOCKET": ("daemon", "socket")}


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464


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
                      policy=dr.get("policy", "lru"))
    nvme = None
    nv = raw.get("nvme")
    if nv:
        n_blocks = _blocks("nvme", nv, slot_bytes, 4096)
        if n_blocks > 0:
            nvme = NvmeConfig(path=nv.get("path", ""), capacity_blocks=n_blocks,
                              policy=nv.get("policy", "lru"), admission=nv.get("admission", "all"),
                              write_through=nv.get("write_through", False),
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
                       log_level=d.get("log_level", "info"), store=store, metrics=metrics)
    if s.max_frame_bytes < 4096:
        raise ConfigError("[daemon] max_frame_bytes must be at least 4096")
    return s.with_flags(data_dir, socket)
