"""Loopback transport: the data channel as an in-process memcpy (tests, single-process setups).

The control channel is the same authenticated TCP session as for every transport; only the
bytes move differently: ``read_blocks`` finds the serving :class:`PeerServer` in this process's
registry (by its address) and calls ``PeerServer.local_read``, which applies the same bounds and
lease checks as a TCP READ. The job completes before ``read_blocks`` returns (submit = done);
a peer that is gone (server stopped) or a refused slot fails the job.

Process-wide registry guarded by a lock; no threads.
"""

from __future__ import annotations

import threading
from typing import Any

import xxhash

from tierstore.errors import ChecksumFailed, TransferFailed
from tierstore.transfer.transport import Link, ReadJob, Slab, Transport

_servers: dict[tuple[str, int], Any] = {}
_lock = threading.Lock()


def register(server: Any) -> None:
    with _lock:
        _servers[tuple(server.address)] = server


def unregister(server: Any) -> None:
    with _lock:
        if _servers.get(tuple(server.address)) is server:
            del _servers[tuple(server.address)]


def available_for(address: tuple[str, int]) -> bool:
    with _lock:
        return tuple(address) in _servers


class LoopbackLink(Link):
    def __init__(self, session: Any) -> None:
        self.session = session
        self.peer = session.label
        self.address = tuple(session.address)

    def close(self) -> None:
        pass


class LoopbackTransport(Transport):
    name = "loopback"

    def __init__(self, local: Slab, timeout_s: float = 5.0, verify_checksums: bool = False) -> None:
        super().__init__(local, timeout_s)
        self.verify_checksums = verify_checksums

    def connect(self, session: Any) -> LoopbackLink:
        return LoopbackLink(session)

    def read_blocks(self, link: LoopbackLink, remote_slots, local_slots, sizes,
                    checksums=None) -> ReadJob:
        self.check_local(local_slots, sizes)
        job = ReadJob(link.peer, remote_slots, local_slots, sizes, num_parts=1)
        err = None
        try:
            with _lock:
                server = _servers.get(link.address)
            if server is None or link.session.closed:
                raise TransferFailed(f"loopback peer {link.peer} is gone")
            dst = [self.local.view(s, n) for s, n in zip(local_slots, sizes)]
            server.local_read(link.session.session_id, list(remote_slots), list(sizes), dst)
            for i, (d, n) in enumerate(zip(dst, sizes)):
                c = checksums[i] if (checksums is not None and self.verify_checksums) else 0
                if c and xxhash.xxh3_64_intdigest(d) != c:
                    raise ChecksumFailed(f"block from remote slot {remote_slots[i]} fails its checksum")
                job.block_done(i, n)
        except Exception as e:
            err = e
        job.part_done(err)
        return job
