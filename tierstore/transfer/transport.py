"""The transport interface: how bytes of whole blocks move from a peer's slab into ours.

A peer pair talks over two channels (DESIGN §7)::

    control channel (one TCP connection per peer session, transfer/session.py + peer_frames.py)
        HELLO/AUTH  ->  LOOKUP (batched, optionally leasing = pinning on the server)  ->  RELEASE
    data channel (per transport)
        tcp:      several TCP connections; READ frame, then raw block bytes  -> recv_into our slots
        rdma:     one RC queue pair; one-sided RDMA READ of the leased remote slots
        loopback: in-process memcpy from the serving slab (tests)

A transport is asked for one thing::

    link = transport.connect(session)                       # data channel to that peer
    job  = transport.read_blocks(link, remote_slots, local_slots, sizes)
    transport.poll(job) -> JobState      transport.cancel(job)      job.wait(timeout_s)

Job contract (every implementation; tests/core/transfer/test_contract.py checks it):

- ``RUNNING`` until every block landed (``DONE``), one part failed (``FAILED``, ``job.error`` is
  a :class:`TransferFailed`), or a cancel finished (``CANCELLED``).
- ``CANCELLING`` means a cancel was asked and bytes may still land in the local slots; only the
  terminal states (DONE, FAILED, CANCELLED) promise that no more bytes will be written into the
  job's local slots. Callers free or reuse local slots only in a terminal state (case XFER-12).
- ``job.blocks_ok[i]`` is set only after block ``i`` arrived whole (and, with verification, its
  checksum matched); a block is written once, so an ok block never changes afterwards. Nothing
  here publishes a block: the caller publishes (``complete_store``) in a terminal state only —
  every block after ``DONE``, after ``FAILED`` the blocks that arrived whole before the first
  one that did not (issue 13 item 2), none after a cancel — so no partial block becomes valid
  (cases XFER-15, RACE-16).
- ``job.add_on_finish(fn)``: ``fn`` runs once the job is terminal (the client's reaper wakes on
  it, so an aborted fetch's slots come back as soon as nothing can land in them).
- A peer that goes away ends the job with ``FAILED`` within the transport's ``timeout_s``.

Also here: :class:`Slab` (a bounds-checked view of fixed-size slots over one buffer, the thing both
ends read from and write into) and the transfer-specific errors.

Threading: :class:`ReadJob` is thread-safe (its own lock + condition); transports name their
threads in their own docstrings.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

from tierstore.errors import ProtocolError, RejectedError, TransferFailed

# Negotiation order: best first (session.py picks the first one both ends offer).
TRANSPORT_PREFERENCE = ("rdma", "tcp", "loopback")


class TransportUnavailable(TransferFailed):
    """A transport that was required (``require_rdma``, a forced transport) cannot be used with
    this peer; raised at connect time, never silently downgraded (case XFER-15)."""


class AuthFailed(RejectedError):
    """The peer could not prove it holds the cluster secret (or we could not)."""


class OutOfRange(RejectedError):
    """A read asked for a slot outside the serving slab or not leased to this session."""


ERROR_CLASSES: dict[str, type[Exception]] = {
    c.__name__: c for c in (TransportUnavailable, AuthFailed, OutOfRange)}


@dataclass
class Slab:
    """Fixed-size slots over one writable buffer: slot ``i`` is bytes
    ``[i * slot_bytes, (i + 1) * slot_bytes)``. Every access is bounds-checked."""

    buffer: memoryview
    slot_bytes: int
    num_slots: int

    def __post_init__(self) -> None:
        if self.buffer.nbytes < self.slot_bytes * self.num_slots:
            raise ValueError("buffer is smaller than num_slots * slot_bytes")

    def check(self, slot: int, size: int | None = None) -> None:
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.num_slots:
            raise OutOfRange(f"slot {slot!r} outside slab of {self.num_slots} slots")
        if size is not None and (not isinstance(size, int) or not 0 <= size <= self.slot_bytes):
            raise OutOfRange(f"size {size!r} outside slot of {self.slot_bytes} bytes")

    def view(self, slot: int, size: int | None = None) -> memoryview:
        self.check(slot, size)
        off = slot * self.slot_bytes
        return self.buffer[off: off + (self.slot_bytes if size is None else size)]

    @classmethod
    def of_store(cls, store: Any) -> "Slab":
        """The DRAM slab of a :class:`tierstore.store.Store` (its tier must hold bytes)."""
        from tierstore.types import Tier

        tier = store.tiers[Tier.DRAM]
        return cls(tier.buffer, tier.slot_bytes, tier.num_slots)

    @classmethod
    def anonymous(cls, num_slots: int, slot_bytes: int) -> "Slab":
        import mmap

        mm = mmap.mmap(-1, max(num_slots * slot_bytes, 1))
        return cls(memoryview(mm), slot_bytes, num_slots)


class JobState(enum.Enum):
    RUNNING = "running"
    CANCELLING = "cancelling"   # asked to stop; bytes may still land
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


_job_ids = itertools.count(1)


class ReadJob:
    """One batched read from one peer. Transports split it into ``num_parts`` parts (one per
    connection or work-request batch) and report each part once with :meth:`part_done`."""

    def __init__(self, peer: str, remote_slots: Sequence[int], local_slots: Sequence[int],
                 sizes: Sequence[int], num_parts: int = 1) -> None:
        if not (len(remote_slots) == len(local_slots) == len(sizes)):
            raise ValueError("remote_slots, local_slots and sizes differ in length")
        self.job_id = next(_job_ids)
        self.peer = peer
        self.remote_slots = list(remote_slots)
        self.local_slots = list(local_slots)
        self.sizes = list(sizes)
        self.blocks_ok = bytearray(len(self.sizes))
        self.bytes_moved = 0
        self.state = JobState.RUNNING
        self.error: BaseException | None = None
        self.started_s = time.monotonic()
        self.finished_s: float | None = None
        self._parts_left = num_parts
        self._cancel_requested = False
        self._cond = threading.Condition()
        self.on_cancel: list = []   # callables run (outside the lock) when cancel is asked
        self._on_finish: list = []  # callables run once the job is terminal (add_on_finish)
        if num_parts == 0:
            self.state, self.finished_s = JobState.DONE, self.started_s

    @property
    def num_blocks(self) -> int:
        return len(self.sizes)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    @property
    def elapsed_s(self) -> float:
        return (self.finished_s or time.monotonic()) - self.started_s

    def block_done(self, i: int, nbytes: int) -> None:
        with self._cond:
            self.blocks_ok[i] = 1
            self.bytes_moved += nbytes

    def record_error(self, error: BaseException) -> None:
        """Keep the first error as the job's cause. A part that fails calls this before it
        tears down the other parts, so their secondary errors (a closed stream) never mask it."""
        with self._cond:
            if self.error is None and not self._cancel_requested:
                self.error = error if isinstance(error, TransferFailed) else \
                    TransferFailed(f"{type(error).__name__}: {error}")

    def part_done(self, error: BaseException | None = None) -> None:
        """A part stopped writing into local slots (successfully or not)."""
        if error is not None:
            self.record_error(error)
        with self._cond:
            self._parts_left -= 1
            finished = self._parts_left == 0
            if finished:
                if self._cancel_requested:
                    self._finish(JobState.CANCELLED)
                elif self.error is not None:
                    self._finish(JobState.FAILED)
                else:
                    self._finish(JobState.DONE)
                hooks, self._on_finish = self._on_finish, []
        if finished:
            for fn in hooks:
                try:
                    fn()
                except Exception:   # a finish hook must not break the transport's thread
                    pass

    def add_on_finish(self, fn) -> None:
        """Call ``fn()`` once the job is terminal (at once if it is already). ``fn`` runs on
        the transport's thread, possibly under the transport's own locks: it must be quick and
        must not call back into the transport (setting an Event is the intended use)."""
        with self._cond:
            if not self.state.terminal:
                self._on_finish.append(fn)
                return
        fn()

    def _finish(self, state: JobState) -> None:
        self.state = state
        self.finished_s = time.monotonic()
        self._cond.notify_all()

    def request_cancel(self) -> bool:
        """Mark the job cancelling; True if this call changed anything."""
        with self._cond:
            if self.state.terminal or self._cancel_requested:
                return False
            self._cancel_requested = True
            self.state = JobState.CANCELLING
        for fn in list(self.on_cancel):
            try:
                fn()
            except Exception:   # a cancel hook must not break the caller
                pass
        return True

    def wait(self, timeout_s: float | None = None) -> JobState:
        """Block until terminal or ``timeout_s``; returns the state then."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not self.state.terminal:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return self.state

    def result(self, timeout_s: float | None = None) -> "ReadJob":
        """Wait, then raise the job's error (or TransferFailed on timeout / cancel)."""
        st = self.wait(timeout_s)
        if st is JobState.DONE:
            return self
        if st is JobState.FAILED:
            raise self.error   # type: ignore[misc]
        if st is JobState.CANCELLED:
            raise TransferFailed(f"read job {self.job_id} from {self.peer} was cancelled")
        raise TransferFailed(f"read job {self.job_id} from {self.peer} still {st.value} "
                             f"after {timeout_s} s")

    def __repr__(self) -> str:
        return (f"ReadJob(id={self.job_id}, peer={self.peer!r}, blocks={self.num_blocks}, "
                f"state={self.state.value})")


class Link(ABC):
    """A transport's data channel to one peer (made by :meth:`Transport.connect`)."""

    peer: str

    @abstractmethod
    def close(self) -> None: ...


class Transport(ABC):
    """One way of moving block bytes. Client side: ``connect`` + ``read_blocks``; server side:
    ``serve_info`` (what the client needs to reach our slab) and, for stream transports, the
    session server calls ``serve_read``.

    ``local`` is the slab reads land in (client side); ``timeout_s`` bounds every wait on a peer.
    """

    name: str = "?"

    def __init__(self, local: Slab, timeout_s: float = 5.0) -> None:
        self.local = local
        self.timeout_s = timeout_s

    @abstractmethod
    def connect(self, session: Any) -> Link:
        """Open the data channel to the peer of an authenticated ``session``."""

    @abstractmethod
    def read_blocks(self, link: Link, remote_slots: Sequence[int], local_slots: Sequence[int],
                    sizes: Sequence[int], checksums: Sequence[int] | None = None) -> ReadJob:
        """Start reading ``sizes[i]`` bytes of remote slot ``remote_slots[i]`` into local slot
        ``local_slots[i]``; returns at once. ``checksums`` (xxh3-64, 0 = unknown): verify each
        block before marking it ok; a mismatch fails the job with ChecksumFailed."""

    def poll(self, job: ReadJob) -> JobState:
        return job.state

    def cancel(self, job: ReadJob) -> None:
        job.request_cancel()

    def check_local(self, local_slots: Sequence[int], sizes: Sequence[int]) -> None:
        for s, n in zip(local_slots, sizes):
            self.local.check(s, n)

    def close(self) -> None:
        """Release the transport's resources (idempotent)."""


def raise_remote(body: dict) -> None:
    """Raise the exception an error reply names (tierstore.errors or this module's), by the
    codec's one rule (:func:`tierstore.protocol.codec.error_from_body`)."""
    from tierstore.protocol.codec import error_from_body

    raise error_from_body(body, ERROR_CLASSES)


__all__ = ["AuthFailed", "JobState", "Link", "OutOfRange", "ProtocolError", "ReadJob", "Slab",
           "TRANSPORT_PREFERENCE", "Transport", "TransportUnavailable", "raise_remote"]
