"""Helpers: two in-process nodes (Store + PeerServer / PeerClient) over each transport."""

from __future__ import annotations

import time


from tierstore.config import DramConfig, StoreConfig
from tierstore.keys import Keyer, Namespace
from tierstore.store import Store
from tierstore.transfer import PeerClient, PeerServer, PeerSettings, Slab
from tierstore.transfer.peer_server import ServeHooks

NS = Namespace(model="m", block_size=16)
SECRET = b"s" * 32
SLOT = 16384
TRANSPORTS = ["loopback", "tcp", "rdma"]


def make_store(blocks: int = 64, slot_bytes: int = SLOT) -> Store:
    return Store.open(StoreConfig(slot_bytes=slot_bytes, dram=DramConfig(capacity_blocks=blocks)))


def chain(n: int, seed: int = 0):
    return Keyer(NS, SECRET).chain(list(range(seed, seed + 16 * n)))


def payload(keys, size: int = SLOT):
    return [(k * (size // len(k) + 1))[:size] for k in keys]


class SlowHooks(ServeHooks):
    """Sleeps before every block; can close the stream after ``close_after`` blocks."""

    def __init__(self, delay_s: float = 0.0, close_after: int | None = None) -> None:
        self.delay_s, self.close_after, self.sent = delay_s, close_after, 0
        self.server = None

    def before_block(self, sess, index, slot):
        if self.close_after is not None and self.sent >= self.close_after:
            for s in list(sess.data_socks):
                import socket
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            raise OSError("closing mid-stream (test)")
        self.sent += 1
        if self.delay_s:
            time.sleep(self.delay_s)


class Pair:
    """Node A serves, node B pulls, over ``transport``."""

    def __init__(self, transport: str, *, timeout_s: float = 2.0, hooks=None,
                 blocks: int = 64, verify: bool = False, server_transports=None,
                 client_transports=None, require_a: bool = False, require_b: bool = False,
                 secret_b: bytes = SECRET) -> None:
        from tierstore.transfer.fakeverbs import FakeDevice
        from tierstore.transfer.rdma import RdmaServer, factory

        self.a, self.b = make_store(blocks), make_store(blocks)
        st_a = PeerSettings(transports=tuple(server_transports or (transport,)), timeout_s=timeout_s,
                            require_rdma=require_a, verify_checksums=verify)
        st_b = PeerSettings(transports=tuple(client_transports or (transport,)), timeout_s=timeout_s,
                            require_rdma=require_b, verify_checksums=verify)
        rdma_srv = None
        if "rdma" in st_a.transports:
            rdma_srv = RdmaServer(FakeDevice("a"), Slab.of_store(self.a))
        self.server = PeerServer(self.a, SECRET, node="A", settings=st_a, rdma=rdma_srv,
                                 hooks=hooks)
        self.server.start()
        self.client = PeerClient(self.b, secret_b, node="B", settings=st_b,
                                 rdma_factory=factory(FakeDevice("b")) if "rdma" in st_b.transports
                                 else None, lease_s=0.2, grace_s=0.1)
        self.addr = self.server.address

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self.a.close()
        self.b.close()


