"""TCP transport: batched reads that land with ``recv_into`` straight in local slab slots.

Client side of one peer (a :class:`TcpLink`)::

    read_blocks(link, remote, local, sizes)
        split into <= streams contiguous parts, balanced by bytes
        part k -> stream k's worker thread:
            READ {slots, sizes} ─────────▶  server checks bounds + lease, replies {n}
                                ◀───────── raw bytes of block 0, block 1, ... (no framing)
            for each block: recv_into(local slot view[:size]) until whole
                            (optional xxh3-64 check) -> job.block_done(i)
            part_done()

No intermediate buffer: the kernel copies from the socket into the slot's memory. Stream state
after an error or a cancel is unknown, so that connection is closed and a fresh one (newly
authenticated, bound to the same session) is opened for the next part.

Timeouts and failures: every socket wait is bounded by ``timeout_s``; a peer that closes or dies
mid-stream raises in ``recv_into`` at once (EOF/RST) or after ``timeout_s`` (silence). The first
failing part shuts the connections of the job's later parts so the job ends promptly; earlier
parts run on (each bounded by ``timeout_s``), since the blocks before the failure are kept by the
client (issue 13 item 2). ``cancel`` shuts
the job's sockets; the job becomes CANCELLED only after every worker has left ``recv_into`` (so no
byte can land in a local slot afterwards).

Threads: one worker per stream, owned by the :class:`TcpLink` (stopped by ``close``).
"""

from __future__ import annotations

import queue
import socket
import threading
from typing import Sequence

import xxhash

from tierstore.errors import ChecksumFailed, TransferFailed
from tierstore.transfer.transport import JobState, Link, ReadJob, Slab, Transport
from tierstore.transfer.peer_frames import PeerMsg, pack_u32
from tierstore.transfer.session import Conn, ControlSession, open_data_conn


def split_parts(sizes: Sequence[int], parts: int) -> list[range]:
    """Contiguous index ranges, about equal in bytes, at most ``parts`` of them."""
    n = len(sizes)
    parts = max(1, min(parts, n))
    total = sum(sizes) or n
    out, start, acc = [], 0, 0
    for i, s in enumerate(sizes):
        acc += s or 1
        if len(out) < parts - 1 and acc * parts >= total * (len(out) + 1) and i + 1 < n:
            out.append(range(start, i + 1))
            start = i + 1
    out.append(range(start, n))
    return [r for r in out if len(r)]


class _Stream:
    def __init__(self) -> None:
        self.conn: Conn | None = None
        self.job: ReadJob | None = None
        self.q: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.first = 0   # index of the first block of the part it is reading


class TcpLink(Link):
    def __init__(self, transport: "TcpTransport", session: ControlSession, streams: int) -> None:
        self.transport = transport
        self.session = session
        self.peer = session.label
        self.streams = [_Stream() for _ in range(max(1, streams))]
        self._closed = False
        self._lock = threading.Lock()
        for k, st in enumerate(self.streams):
            st.thread = threading.Thread(target=self._worker, args=(st,), daemon=True,
                                         name=f"tcp-read-{self.peer}-{k}")
            st.thread.start()

    def submit(self, job: ReadJob, parts: list[range], checksums) -> None:
        job.on_cancel.append(lambda: self._shutdown_job(job))
        for st, part in zip(self.streams, parts):
            st.q.put((job, part, checksums))

    def _shutdown_job(self, job: ReadJob, after: int = -1) -> None:
        """Shut the job's connections that read parts starting after block ``after`` (all of
        them by default)."""
        with self._lock:
            conns = [st.conn for st in self.streams
                     if st.job is job and st.conn is not None and st.first > after]
        for c in conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _worker(self, st: _Stream) -> None:
        while True:
            item = st.q.get()
            if item is None:
                return
            job, part, checksums = item
            with self._lock:
                st.job, st.first = job, part.start
            err: BaseException | None = None
            try:
                if job.cancel_requested:
                    raise TransferFailed("cancelled")
                self._run_part(st, job, part, checksums)
            except BaseException as e:   # recorded on the job; the worker lives on
                err = e
                job.record_error(e)      # the cause, before the other streams see closed sockets
                self._drop(st)
                if not job.cancel_requested:
                    # the parts after this one end now (their blocks follow the one that
                    # failed); the parts before it may finish: their blocks are kept (item 2)
                    self._shutdown_job(job, after=part.start)
            finally:
                with self._lock:
                    st.job = None
                job.part_done(err)

    def _drop(self, st: _Stream) -> None:
        if st.conn is not None:
            try:
                st.conn.close()
            except OSError:
                pass
            st.conn = None

    def _run_part(self, st: _Stream, job: ReadJob, part: range, checksums) -> None:
        if self._closed:
            raise TransferFailed(f"link to {self.peer} is closed")
        if st.conn is None:
            try:
                conn = open_data_conn(self.session, "tcp")
            except (OSError, ConnectionError) as e:
                raise TransferFailed(f"peer {self.peer}: cannot open data stream: {e}") from None
            with self._lock:
                st.conn = conn
            if job.cancel_requested:
                raise TransferFailed("cancelled")
        conn = st.conn
        sock = conn.sock
        sock.settimeout(self.transport.timeout_s)
        remote = [job.remote_slots[i] for i in part]
        sizes = [job.sizes[i] for i in part]
        try:
            r = conn.request(PeerMsg.READ, {"slots": pack_u32(remote), "sizes": pack_u32(sizes)})
            if r.get("n") != len(part):
                raise TransferFailed("READ reply announces a different block count")
            local = self.transport.local
            verify = checksums is not None
            for i in part:
                n = job.sizes[i]
                view = local.view(job.local_slots[i], n)
                got = 0
                while got < n:
                    k = sock.recv_into(view[got:], n - got)
                    if k == 0:
                        raise TransferFailed(f"peer {self.peer} closed the stream after "
                                             f"{got} of {n} bytes of a block")
                    got += k
                if verify and checksums[i] and xxhash.xxh3_64_intdigest(view) != checksums[i]:
                    raise ChecksumFailed(f"block from remote slot {job.remote_slots[i]} of "
                                         f"{self.peer} fails its checksum")
                job.block_done(i, n)
        except socket.timeout:
            raise TransferFailed(f"peer {self.peer} silent for {self.transport.timeout_s} s") \
                from None
        except (OSError, ConnectionError) as e:
            raise TransferFailed(f"peer {self.peer}: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        self._closed = True
        for st in self.streams:
            st.q.put(None)
        with self._lock:
            for st in self.streams:
                if st.conn is not None:
                    try:
                        st.conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        for st in self.streams:
            if st.thread is not None:
                st.thread.join(timeout=self.transport.timeout_s)
            self._drop(st)


class TcpTransport(Transport):
    """``streams`` data connections per peer (2 fit this 2-core box)."""

    name = "tcp"

    def __init__(self, local: Slab, timeout_s: float = 5.0, streams: int = 2,
                 verify_checksums: bool = False) -> None:
        super().__init__(local, timeout_s)
        self.streams = streams
        self.verify_checksums = verify_checksums

    def connect(self, session: ControlSession) -> TcpLink:
        return TcpLink(self, session, self.streams)

    def read_blocks(self, link: TcpLink, remote_slots, local_slots, sizes,
                    checksums=None) -> ReadJob:
        self.check_local(local_slots, sizes)
        parts = split_parts(list(sizes), len(link.streams))
        job = ReadJob(link.peer, remote_slots, local_slots, sizes, num_parts=len(parts))
        if parts:
            link.submit(job, parts, list(checksums) if (checksums is not None and
                                                         self.verify_checksums) else None)
        return job


__all__ = ["JobState", "TcpLink", "TcpTransport", "split_parts"]
