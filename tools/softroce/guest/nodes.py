"""Two nodes on one real RDMA device, in separate processes (guest side; also the benchmark's).

    python3 nodes.py serve '{"device": "rxe0", "n": 1000, "slot": 65536, ...}'

``serve`` runs node A: a Store holding ``n`` blocks of :func:`block` bytes, a PeerServer on
127.0.0.1 offering ``transports`` with its slab registered on ``device`` (RdmaServer). It prints
one JSON line ``{"port": P}`` when ready and serves until stdin closes or it is killed.
:class:`NodeA` starts that process from the test (node B) side; :func:`client` builds node B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tierstore.config import DramConfig, StoreConfig
from tierstore.keys import Keyer, Namespace
from tierstore.store import Store
from tierstore.transfer import PeerClient, PeerServer, PeerSettings, Slab

NS = Namespace(model="softroce", block_size=16)
SECRET = b"r" * 32


def keys_for(n: int, seed: int = 0) -> list[bytes]:
    return Keyer(NS, SECRET).chain(list(range(seed, seed + 16 * n)))


def block(key: bytes, i: int, slot: int) -> bytes:
    """Block ``i``'s bytes: its index and key, repeated (every block differs, every slot full)."""
    unit = i.to_bytes(4, "little") + key
    return (unit * (slot // len(unit) + 1))[:slot]


def make_store(n: int, slot: int) -> Store:
    return Store.open(StoreConfig(slot_bytes=slot, dram=DramConfig(capacity_blocks=n + 16)))


def serve(args: dict) -> None:
    from tierstore.transfer.rdma import RdmaServer
    from tierstore.transfer.verbs import open_device

    n, slot = args["n"], args["slot"]
    store = make_store(n, slot)
    keys = keys_for(n)
    for lo in range(0, n, 100):
        ks = keys[lo:lo + 100]
        store.put(ks, NS, [block(k, lo + j, slot) for j, k in enumerate(ks)])
    transports = tuple(args.get("transports", ("rdma",)))
    rdma = RdmaServer(open_device(args["device"]), Slab.of_store(store)) \
        if "rdma" in transports else None
    st = PeerSettings(transports=transports, timeout_s=args.get("timeout_s", 5.0))
    srv = PeerServer(store, SECRET, node="A", settings=st, rdma=rdma)
    srv.start()
    print(json.dumps({"port": srv.address[1], "pid": os.getpid()}), flush=True)
    sys.stdin.read()
    srv.stop()
    store.close()


class NodeA:
    """Node A in its own process (so that 'goes away' can be a SIGKILL)."""

    def __init__(self, device: str, n: int, slot: int, transports=("rdma",),
                 timeout_s: float = 5.0) -> None:
        args = dict(device=device, n=n, slot=slot, transports=list(transports),
                    timeout_s=timeout_s)
        self.proc = subprocess.Popen([sys.executable, __file__, "serve", json.dumps(args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node A did not start (rc {self.proc.wait()})")
        self.port = json.loads(line)["port"]
        self.address = ("127.0.0.1", self.port)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def client(device: str, n: int, slot: int, transports=("rdma",), timeout_s: float = 5.0):
    """(store, PeerClient) of node B; rdma on ``device`` when offered."""
    from tierstore.transfer.rdma import factory
    from tierstore.transfer.verbs import open_device

    store = make_store(n, slot)
    st = PeerSettings(transports=tuple(transports), timeout_s=timeout_s,
                      require_rdma="rdma" in transports)
    fac = factory(open_device(device)) if "rdma" in transports else None
    return store, PeerClient(store, SECRET, node="B", settings=st, rdma_factory=fac,
                             lease_s=1.0, grace_s=0.5)


def wait_for_blocks(job, at_least: int, timeout_s: float = 60.0) -> int:
    """Spin until ``job`` has ``at_least`` blocks done (or is terminal); returns the count."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        done = sum(job.blocks_ok)
        if done >= at_least or job.state.terminal:
            return done
        time.sleep(0.0005)
    return sum(job.blocks_ok)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(json.loads(sys.argv[2]))
