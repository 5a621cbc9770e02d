"""Client: the one API that admin/ and plugins/ use (DESIGN §3, §6).

``Client.embedded(...)`` runs a :class:`Store` in this process on a data directory (the
embedded default); the daemon backend (a Unix-socket client moving bytes through shared memory)
implements the same methods. Everything here is a thin forwarding layer: no policy, no I/O of its
own. Opening the data directory (its lock, ``store.json``, the secret) is
:mod:`tierstore.datadir`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from tierstore.config import StoreConfig
from tierstore.contract import StoreClient, check_pin_owner
from tierstore.datadir import (STORE_FILE, DataDirBusy, config_from_json,  # noqa: F401 (re-exported)
                               config_to_json, open_data_dir)
from tierstore.index.residency import request_owner, session_name, session_owner
from tierstore.keys import ExtraKeys, Keyer, Namespace, NO_EXTRAS
from tierstore.store import LOCAL, PUT_WAIT_S, Store
from tierstore.types import BlockKey, BlockStatus, LoadJob, LookupResult, StoreJob

class Client:
    """One API over an in-process Store (this class) or the daemon (``tierstore.daemon``): both
    implement :class:`tierstore.contract.StoreClient`."""

    def __init__(self, store: Store, *, secret: bytes, data_dir: Path | None = None,
                 lock_fd: int | None = None, owner: str = LOCAL) -> None:
        self.store = store
        self.secret = secret
        self.data_dir = data_dir
        self.owner = owner
        self._lock_fd = lock_fd

    # ---------------------------------------------------------------- opening
    @classmethod
    def embedded(cls, data_dir: str | os.PathLike | None = None, config: StoreConfig | None = None,
                 *, secret: bytes | str | None = None, create: bool = True,
                 shm_name: str | None = None,
                 reconcile: Callable[[StoreConfig], tuple[StoreConfig, list[str]]] | None = None
                 ) -> "Client":
        """Open (or create) a store in this process: :func:`tierstore.datadir.open_data_dir`
        with these arguments, whose docstring is the contract (``store.json`` against
        ``config``, ``reconcile``, the NVMe path, DataDirBusy / ConfigError, ``shm_name``).
        """
        dd = open_data_dir(data_dir, config, secret=secret, create=create, shm_name=shm_name,
                           reconcile=reconcile)
        return cls(dd.store, secret=dd.secret, data_dir=dd.path, lock_fd=dd.lock_fd)

    @classmethod
    def connect(cls, socket_path: str | os.PathLike, *, timeout_s: float = 5.0,
                secret: bytes | str | None = None):
        """A client of the daemon listening on ``socket_path`` (a
        :class:`tierstore.daemon.remote.RemoteClient`: the same methods, bytes through the
        daemon's shared-memory slab). Raises DaemonUnreachable when nothing answers."""
        from tierstore.daemon.remote import RemoteClient

        return RemoteClient.connect(socket_path, timeout_s=timeout_s, secret=secret)

    def close(self) -> None:
        self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- keys
    def keyer(self, namespace: Namespace) -> Keyer:
        return Keyer(namespace, self.secret)

    # ---------------------------------------------------------------- store API
    def _owner(self, request: str | None) -> str:
        return self.owner if request is None else request_owner(self.owner, request)

    def lookup(self, keys: Sequence[BlockKey], namespace: Namespace, *, pin: bool = False,
               ttl_s: float | None = None, request: str | None = None) -> LookupResult:
        """``request``: pin for that request alone (see :meth:`RemoteClient.lookup`)."""
        return self.store.lookup(keys, namespace, pin=pin, owner=self._owner(request), ttl_s=ttl_s)

    def prepare_store(self, keys, namespace, size_bytes, parent=None, wait_s: float = 0.0,
                      engine=None) -> StoreJob:
        """``engine``: per key engine metadata (``tierstore.events.engine_block``) or None."""
        return self.store.prepare_store(keys, namespace, size_bytes, owner=self.owner,
                                        parent=parent, wait_s=wait_s, engine=engine)

    def complete_store(self, job_id: int, ok: bool | Sequence[bool] = True) -> list[BlockStatus]:
        return self.store.complete_store(job_id, ok=ok)

    def prepare_stores(self, specs: Sequence[tuple]) -> list[StoreJob]:
        """Several ``(keys, namespace, size_bytes, parent[, engine])`` jobs in one call."""
        return self.store.prepare_stores(specs, owner=self.owner)

    def complete_stores(self, answers: Sequence[tuple]) -> list[list[BlockStatus]]:
        """Several ``(job_id, ok)`` answers (``ok``: bool or one per key) in one call."""
        return self.store.complete_stores(answers)

    def prepare_load(self, keys, wait: bool = True) -> LoadJob:
        return self.store.prepare_load(keys, owner=self.owner, wait=wait)

    def prepare_loads(self, chains: Sequence[Sequence[BlockKey]], wait: bool = False) -> list[LoadJob]:
        """Several chains in one call; by default never waits for the disk (see
        ``Store.prepare_load(wait=False)``)."""
        return self.store.prepare_loads(chains, owner=self.owner, wait=wait)

    def poll_loads(self, job_ids: Sequence[int]) -> dict[int, LoadJob]:
        return self.store.poll_loads(job_ids)

    def wait_load(self, job_id: int, timeout_s: float | None = None) -> LoadJob | None:
        return self.store.wait_load(job_id, timeout_s)

    def complete_load(self, job_id: int, ok: bool = True) -> None:
        self.store.complete_load(job_id, ok=ok)

    def complete_loads(self, job_ids: Sequence[int], ok: bool = True,
                       tokens: dict[str, int] | None = None) -> None:
        """``tokens``: the engine's token accounting since its last report
        (``Store.account_tokens``)."""
        self.store.complete_loads(job_ids, ok=ok, tokens=tokens)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every block stored so far has its NVMe copy (``Store.flush``)."""
        return self.store.flush(timeout_s, owner=self.owner)

    def slot_view(self, slot: int) -> memoryview:
        return self.store.slot_view(slot)

    def slab(self) -> tuple[memoryview, int, int]:
        """``(buffer, num_slots, slot_bytes)`` of the DRAM slab: slot ``i`` is
        ``buffer[i * slot_bytes:(i + 1) * slot_bytes]`` (for batched copies over many slots)."""
        from tierstore.types import Tier
        dram = self.store.tiers[Tier.DRAM]
        return dram.buffer, dram.num_slots, dram.slot_bytes

    def put(self, keys, namespace, blocks, parent=None, wait_s: float = PUT_WAIT_S) -> list[BlockStatus]:
        """``Store.put``: a copy that fails aborts the job (nothing published) and re-raises."""
        return self.store.put(keys, namespace, blocks, owner=self.owner, parent=parent,
                              wait_s=wait_s)

    def get(self, keys) -> list[bytes]:
        return self.store.get(keys, owner=self.owner)

    def pin(self, keys, ttl_s: float | None = None, session: str | None = None,
            request: str | None = None) -> int:
        """As :meth:`RemoteClient.pin`; a session's pins live as long as this process."""
        check_pin_owner(session, request)
        owner = self._owner(request) if session is None else session_owner(session, ttl_s)
        return self.store.pin(keys, owner=owner, ttl_s=ttl_s)

    def unpin(self, keys, session: str | None = None, request: str | None = None) -> int:
        """As :meth:`RemoteClient.unpin`: all or nothing."""
        check_pin_owner(session, request)
        if session is None:
            return self.store.unpin(keys, owner=self._owner(request))
        return self.store.unpin(keys, owner=session_name(session))

    def unpin_each(self, keys, session: str | None = None,
                   request: str | None = None) -> list[bool]:
        """``Store.unpin_each`` for the owner ``unpin`` would use: one bool per key."""
        check_pin_owner(session, request)
        owner = self._owner(request) if session is None else session_name(session)
        return self.store.unpin_each(keys, owner=owner)

    def retain(self, keys, *, session: str, tenant: str = "", ttl_s: float,
               priority: int = 0) -> dict:
        """A retention hint: ``Store.retain`` (tierstore/retention.py)."""
        return self.store.retain(keys, session=session, tenant=tenant, ttl_s=ttl_s,
                                 priority=priority)

    def release(self, request: str) -> int:
        """Release every pin ``request`` holds (as :meth:`RemoteClient.release`)."""
        return self.store.release_owner(request_owner(self.owner, request))["pins_released"]

    def evict(self, keys, tier=None, dry_run: bool = False) -> dict:
        """``Store.evict``; ``tier`` (a Tier or its name) drops only that tier's copies;
        ``dry_run`` changes nothing and adds ``outcomes``."""
        from tierstore.types import Tier
        return self.store.evict(keys, tier=Tier.parse(tier) if isinstance(tier, str) else tier,
                                dry_run=dry_run)

    def resolve(self, prefixes: Sequence[str], unknown_ok: bool = False) -> list[BlockKey | None]:
        """``Store.resolve``: hex key prefixes -> full keys."""
        return self.store.resolve(prefixes, unknown_ok=unknown_ok)

    def blocks(self, limit: int | None = None, tier=None) -> list[dict]:
        return self.store.blocks(limit=limit, tier=tier)

    def block(self, key: BlockKey) -> dict | None:
        return self.store.block(key)

    def stats(self) -> dict:
        return self.store.stats()

    def check(self, fix: bool = False) -> list[str]:
        return self.store.check(fix=fix)

    def usage(self) -> list[dict]:
        return self.store.stats()["tiers"]


def open_client(data_dir: str | os.PathLike | None = None, socket: str | os.PathLike | None = None,
                config: StoreConfig | None = None, *, create: bool = False,
                secret: bytes | str | None = None, timeout_s: float = 5.0) -> StoreClient:
    """The backend the caller asked for: the daemon when ``socket`` is given (DaemonUnreachable
    when it does not answer; never a silent fallback to the data dir), else the store embedded
    in this process on ``data_dir``. Both have the same methods."""
    if socket:
        return Client.connect(socket, timeout_s=timeout_s, secret=secret)
    return Client.embedded(data_dir, config, secret=secret, create=create)


__all__ = ["Client", "DataDirBusy", "ExtraKeys", "Namespace", "NO_EXTRAS", "StoreClient",
           "open_client"]
