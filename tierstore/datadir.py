"""The data directory: its lock, its ``store.json`` and opening the Store that lives in it.

Owned here, and nowhere else: who holds a data dir (an ``flock`` on ``<data_dir>/lock``), which
StoreConfig a directory was created with (``store.json``, written only once the store opened with
it), how a relative NVMe path resolves (against the data dir, never the working directory) and
where the cluster secret of a data dir comes from. Both the embedded client
(:meth:`tierstore.client.Client.embedded`) and the daemon (:mod:`tierstore.daemon.server`) open a
data dir through :func:`open_data_dir`; neither imports the other for it.

Layout::

    <data_dir>/store.json    the StoreConfig the directory was created with (reopened as is)
    <data_dir>/secret        cluster secret, 32 random bytes, mode 0600, unless configured
    <data_dir>/lock          flock held by the process that owns the directory
    <data_dir>/nvme/         NVMe tier: slab files + LMDB metadata (tiers/nvme.py)

Sits above :mod:`tierstore.store` and below the client and the daemon.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Callable

from tierstore.config import DramConfig, HbmConfig, NvmeConfig, StoreConfig
from tierstore.errors import ConfigError
from tierstore.keys import load_secret
from tierstore.store import Store

STORE_FILE = "store.json"
log = logging.getLogger(__name__)

Reconcile = Callable[[StoreConfig], "tuple[StoreConfig, list[str]]"]


class DataDirBusy(ConfigError):
    """Another process owns the data directory."""


def lock_dir(path: Path) -> int:
    """Create ``path`` if missing and take its lock (non-blocking); returns the lock's fd.
    Raises DataDirBusy naming the owner's pid when another process holds it."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = os.pread(fd, 32, 0).decode().strip() or "?"
        finally:
            os.close(fd)
        raise DataDirBusy(f"data dir {path} is in use by pid {owner} "
                          "(a running daemon? use --socket to go through it)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def relative_to(path: str, data_dir: Path) -> str:
    """``path`` as stored in store.json: relative to the data dir when inside it (or given
    relative), absolute otherwise."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.relative_to(data_dir))
    except ValueError:
        return str(p)


def config_to_json(cfg: StoreConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["dram"].pop("shm_name", None)   # a per-run choice of the daemon, never persisted
    return d


def config_from_json(d: dict) -> StoreConfig:
    try:
        dram = DramConfig(**d.get("dram", {}))
        nv = dict(d["nvme"]) if d.get("nvme") else None
        if nv is not None and nv.get("write_through") is False:
            # created before write-behind: exclusive tiers are gone; the data reads the same
            log.info("store.json: nvme write_through=false is upgraded to write-behind "
                     "(NVMe keeps a clean copy of every DRAM block)")
            nv["write_through"] = True
        nvme = NvmeConfig(**nv) if nv is not None else None
        hbm = HbmConfig(**d["hbm"]) if d.get("hbm") else None
        return StoreConfig(slot_bytes=int(d["slot_bytes"]), dram=dram, nvme=nvme,
                           exclusive=bool(d.get("exclusive", True)), hbm=hbm)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"invalid store config: {e}") from None


@dataclasses.dataclass
class DataDir:
    """An open data dir: its Store, its cluster secret and the lock that makes it ours.
    ``close`` closes the store (its DRAM slab, a daemon's /dev/shm object, goes too), then
    drops the lock. ``path`` is None for a store opened from a config alone."""

    store: Store
    secret: bytes
    path: Path | None = None
    lock_fd: int | None = None

    def close(self) -> None:
        self.store.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def open_data_dir(data_dir: str | os.PathLike | None = None, config: StoreConfig | None = None,
                  *, secret: bytes | str | None = None, create: bool = True,
                  shm_name: str | None = None, reconcile: Reconcile | None = None) -> DataDir:
    """Open (or create) the store of a data dir in this process.

    With ``data_dir``: the directory's ``store.json`` wins over ``config`` when it exists
    (a directory is reopened as it was created), unless ``reconcile`` (given the stored
    config, returns the config to use and one line per change, or raises ConfigError) changes
    it; otherwise ``config`` is used. ``store.json`` is written only once the store opened
    with that config, so a config the store refuses never reaches the disk. The
    NVMe path defaults to ``<data_dir>/nvme``; a relative NVMe path is stored and resolved
    relative to the data dir (never to the working directory), so a data dir opens the same
    from anywhere and a copied data dir never shares its original's NVMe tier. Raises
    DataDirBusy if another process holds the directory, ConfigError if it does not exist and
    ``create`` is false. ``shm_name`` (the daemon) puts the DRAM slab in POSIX shared memory
    under that name for this run only; it is never written to ``store.json``. Without
    ``data_dir`` the store is opened from ``config`` alone (nothing persists).
    """
    if data_dir is None:
        if config is None:
            raise ConfigError("need a data dir or a config")
        return DataDir(Store.open(config), load_secret(secret))
    d = Path(data_dir).absolute()
    if not create and not (d / STORE_FILE).is_file():
        raise ConfigError(f"{d} is not a tierstore data dir (no {STORE_FILE})")
    fd = lock_dir(d)
    try:
        f = d / STORE_FILE
        write = True
        if f.is_file():
            try:
                config = config_from_json(json.loads(f.read_text()))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{f} is not valid JSON: {e}") from None
            write = False
            if reconcile is not None:
                new, changes = reconcile(config)
                if changes:
                    log.info("data dir %s: applied %s", d, "; ".join(changes))
                write, config = new != config, new
        else:
            if config is None:
                raise ConfigError(f"{d} has no {STORE_FILE} and no config was given")
            if config.nvme is not None:
                config = dataclasses.replace(config, nvme=dataclasses.replace(
                    config.nvme, path=relative_to(config.nvme.path or "nvme", d)))
        persisted = config
        if config.nvme is not None and not Path(config.nvme.path).is_absolute():
            config = dataclasses.replace(config, nvme=dataclasses.replace(
                config.nvme, path=str(d / config.nvme.path)))
        if shm_name is not None:
            config = dataclasses.replace(
                config, dram=dataclasses.replace(config.dram, shm_name=shm_name))
        store = Store.open(config)
        try:
            if write:
                tmp = f.with_suffix(".tmp")
                tmp.write_text(json.dumps(config_to_json(persisted), indent=2))
                os.replace(tmp, f)
            return DataDir(store, load_secret(secret, data_dir=d), d, fd)
        except BaseException:
            store.close()   # its DRAM slab (a daemon's /dev/shm object) goes too
            raise
    except BaseException:
        os.close(fd)
        raise


__all__ = ["DataDir", "DataDirBusy", "STORE_FILE", "config_from_json", "config_to_json",
           "lock_dir", "open_data_dir", "relative_to"]
