"""Who the peers are: a static list (default) or etcd; and where a block's home is.

- :class:`StaticMembership`: the configured list, every member assumed live.
- :class:`EtcdMembership`: each node puts ``<prefix>/<node>`` = JSON ``{"node", "host", "port",
  "transports"}`` under an etcd lease of ``ttl_s`` and refreshes it every ``ttl_s / 3``; a node
  that dies stops refreshing and its key goes when the lease expires (liveness). Changes are
  seen by polling the prefix every ``poll_s`` (one range request; fine for tens of nodes) and
  reported to ``on_change(members)``.

Client library: ``etcd3gw`` (OpenStack's client for etcd's v3 grpc-gateway over HTTP/JSON; on
PyPI, maintained in 2026, pure Python over ``requests``, discovers the gateway path itself so it
works with etcd 3.4 from Debian's ``etcd-server``). The gRPC client ``etcd3`` (last release 2020)
breaks with current protobuf, and ``aetcd`` is asyncio + gRPC, heavier than this needs.
Imported lazily; without it only the static list works.

:func:`rendezvous_order` / :func:`home_node`: highest-random-weight hashing over live members
(BLAKE2b of node id + block key): a block's home moves only when its home node leaves.

Threads: :class:`EtcdMembership` owns one keeper thread (refresh + poll), stopped by ``stop``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence


@dataclass(frozen=True)
class Member:
    node: str
    host: str
    port: int
    transports: tuple[str, ...] = ("tcp",)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def to_json(self) -> str:
        return json.dumps({"node": self.node, "host": self.host, "port": self.port,
                           "transports": list(self.transports)})

    @classmethod
    def from_json(cls, raw: str | bytes) -> "Member":
        d = json.loads(raw)
        return cls(str(d["node"]), str(d["host"]), int(d["port"]),
                   tuple(d.get("transports", ("tcp",))))


def _weight(node: str, key: bytes) -> bytes:
    return hashlib.blake2b(node.encode() + b"\0" + key, digest_size=16).digest()


def rendezvous_order(key: bytes, members: Iterable[Member]) -> list[Member]:
    """Members ordered by their weight for ``key`` (first = home)."""
    return sorted(members, key=lambda m: _weight(m.node, key), reverse=True)


def home_node(key: bytes, members: Iterable[Member]) -> Member | None:
    order = rendezvous_order(key, members)
    return order[0] if order else None


class StaticMembership:
    def __init__(self, members: Sequence[Member], self_node: str | None = None) -> None:
        self._members = list(members)
        self.self_node = self_node

    def members(self) -> list[Member]:
        return list(self._members)

    def peers(self) -> list[Member]:
        return [m for m in self._members if m.node != self.self_node]

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class EtcdMembership:
    """Registers ``me`` in etcd under a lease and tracks the live members."""

    def __init__(self, host: str, port: int, me: Member | None = None, *,
                 prefix: str = "/tierstore/members/", ttl_s: int = 5, poll_s: float = 0.5,
                 on_change: Callable[[list[Member]], None] | None = None,
                 timeout_s: float = 2.0) -> None:
        try:
            from etcd3gw.client import Etcd3Client
        except ImportError as e:   # pragma: no cover - depends on the environment
            from tierstore.errors import ConfigError
            raise ConfigError(f"etcd membership needs the etcd3gw package ({e})") from None
        self.client = Etcd3Client(host=host, port=port, timeout=timeout_s)
        self.me, self.prefix, self.ttl_s, self.poll_s = me, prefix, ttl_s, poll_s
        self.on_change = on_change
        self.lease = None
        self._members: dict[str, Member] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    def start(self) -> None:
        if self.me is not None:
            self.lease = self.client.lease(self.ttl_s)
            self.client.put(self.prefix + self.me.node, self.me.to_json(), lease=self.lease)
        self.refresh()
        self._thread = threading.Thread(target=self._keep, daemon=True, name="etcd-membership")
        self._thread.start()

    def refresh(self) -> list[Member]:
        found: dict[str, Member] = {}
        for value, _meta in self.client.get_prefix(self.prefix):
            try:
                m = Member.from_json(value)
            except (ValueError, KeyError, TypeError):
                continue
            found[m.node] = m
        with self._lock:
            changed = found != self._members
            self._members = found
        if changed and self.on_change is not None:
            self.on_change(list(found.values()))
        return list(found.values())

    def _keep(self) -> None:
        last_refresh = 0.0
        import time
        while not self._stop.wait(self.poll_s):
            try:
                now = time.monotonic()
                if self.lease is not None and now - last_refresh >= self.ttl_s / 3:
                    self.lease.refresh()
                    last_refresh = now
                self.refresh()
            except Exception:   # etcd briefly away: keep trying; the lease TTL decides liveness
                self.errors += 1

    def members(self) -> list[Member]:
        with self._lock:
            return list(self._members.values())

    def peers(self) -> list[Member]:
        me = self.me.node if self.me else None
        return [m for m in self.members() if m.node != me]

    def stop(self, revoke: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 3)
        if revoke and self.lease is not None:
            try:
                self.lease.revoke()
            except Exception:
                pass
