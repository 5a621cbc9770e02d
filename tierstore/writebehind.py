"""Write-behind to NVMe: the store's flusher (DESIGN §8, "durability is a background flush").

What it owns: the queue of DRAM blocks whose NVMe copy is still to be written, the budget of
unwritten bytes, and the one thread that writes them. ``Store.complete_store`` hands every newly
stored DRAM block to :meth:`WriteBehind.accept` and returns at once: the block is in DRAM and
indexed, its NVMe copy follows. :meth:`WriteBehind.flush` waits until every block accepted
before the call has its copy written (record, ``fdatasync``, LMDB commit) or its write failed::

    prepare_store ──reserve(bytes)──▶ budget (≤ max_queue_bytes)      full: the block is SKIPPED
    complete_store ──accept──▶ queue (pinned in DRAM) ──thread──▶ write_batch ──▶ NVMe
                                                      └── done: unpinned, budget released ──┘

- **Bound and admission.** ``prepare_store`` reserves each new DRAM block's bytes in the budget;
  when the unwritten bytes (queued, being written, and reserved by prepared stores) would pass
  ``max_queue_bytes``, the store answers SKIPPED for that block (counter
  ``store_skipped_write_queue``) instead of making the caller wait for the disk. A queued block is
  pinned by :data:`FLUSH_OWNER`: never a victim, never dropped before its copy is on NVMe.
- **Clean copies.** With NVMe present every DRAM block is clean (NVMe holds it) or queued, so
  evicting from DRAM never writes: victims are dropped (moves.py). (Blocks that NVMe's admission
  policy refused, or whose write failed, have no copy and are dropped too: counted.)
- **What survives ``kill -9``**: blocks whose write was committed (``flush()`` returned True, or
  the thread got to them); at most ``max_queue_bytes`` are in flight at any time. A clean
  ``Store.close`` drains the queue first.
- **Failures.** A write that fails (EIO, EINVAL, ENOSPC after one retry with an NVMe victim
  evicted, ``meta``: the LMDB commit) leaves the block in DRAM without an NVMe copy and counts
  it (``nvme_write_<error>``, ``nvme_store_skipped``, the tier's health: tiers/health.py); the
  next ``flush`` of the owner that stored it returns False, also when the write failed before
  that call (failed acceptance numbers are kept per owner until its flush reports them, and
  dropped when the owner goes: ``forget_owner``).

Threading: one thread, ``tierstore-flush``, started by the first :meth:`accept` and stopped by
:meth:`stop` (``Store.close``). Every method but the thread's loop is called with the store's
lock held; the thread takes the store lock to pick a batch and to commit it, and releases it
for the I/O (the NVMe tier is called under the store's ``_nvme_lock``, as every NVMe call).
The store object is shared state: this class reads and changes ``res``, ``pins``, ``counters``
and calls the store's mover in tierstore/moves.py (``mover.flush_batch``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Iterable, Protocol

from tierstore import counter_names as cn
from tierstore.errors import PinError
from tierstore.types import BlockKey, Tier

log = logging.getLogger(__name__)

FLUSH_OWNER = "move:flush"
"""Internal pin owner of queued blocks (no client owner has this form: the daemon names owners
``conn:``/``session:``/``job:``)."""


class FlushHost(Protocol):
    """What the flusher reads of its store (:class:`tierstore.store.Store` is the one host): the
    store's lock (every call but the thread's loop runs under it), its residency index ``res``,
    its pin books ``pins``, its ``counters`` and ``tiers``, and its ``mover``
    (:class:`tierstore.moves.TierMover`, whose ``flush_batch(keys) -> int`` writes a batch to
    NVMe and returns the blocks written). Declared here so that this module sits below the store
    instead of importing it."""

    _lock: Any
    res: Any
    pins: Any
    counters: Any
    tiers: Any
    mover: Any


class _Failed:
    """Acceptance numbers of one owner's failed writes not yet reported by its flush. At most
    ``cap`` are kept one by one; beyond, they fold into a range ``[lo, hi]`` that is reported
    conservatively (a flush may hear of a failure in its range that was not its own, never miss
    one), so an owner that never flushes costs bounded memory while its writes keep failing."""

    def __init__(self, cap: int = 1024) -> None:
        self.cap = cap
        self.seqs: list[int] = []
        self.lo = self.hi = 0            # the folded range; lo == 0: none

    def add(self, seq: int) -> None:
        if len(self.seqs) < self.cap:
            self.seqs.append(seq)
            return
        first = min(min(self.seqs), seq)
        self.lo = first if not self.lo else min(self.lo, first)
        self.hi = max(self.hi, seq, max(self.seqs))
        self.seqs = []

    def report(self, target: int) -> bool:
        """Whether a failure numbered <= ``target`` is pending; forgets those."""
        bad = any(q <= target for q in self.seqs)
        self.seqs = [q for q in self.seqs if q > target]
        if self.lo and self.lo <= target:
            bad = True
            if self.hi <= target:
                self.lo = self.hi = 0
            else:
                self.lo = target + 1
        return bad

    @property
    def empty(self) -> bool:
        return not self.seqs and not self.lo


class WriteBehind:
    """The flusher of one :class:`~tierstore.store.Store` (see the module docstring).

    ``max_queue_bytes``: unwritten bytes at most (at least one block always fits).
    ``batch_blocks`` / ``batch_bytes``: the largest single ``write_batch`` (several I/Os in
    flight inside it, see tiers/nvme.py). The flusher takes what is queued up to that, so a
    trickle goes out in small batches and a backlog in large ones: each batch ends with the pool
    drained, one ``fdatasync`` per touched file and one LMDB commit (two fsyncs): measured on a
    1 GiB backlog of 2 MiB blocks, those two took 3-17 % of the write time in batches of 32 and
    3-8 % in batches of 128, which wrote 1.16-1.59 GB/s against 1.04-1.72 (docs/benchmarks.md,
    "peer_bench acceptance").
    """

    def __init__(self, store: FlushHost, *, max_queue_bytes: int, batch_blocks: int = 128,
                 batch_bytes: int = 256 << 20) -> None:
        self._s = store
        self.max_queue_bytes = max(1, int(max_queue_bytes))
        self.batch_blocks = max(1, int(batch_blocks))
        self.batch_bytes = max(1, int(batch_bytes))
        self._queue: deque[tuple[BlockKey, int]] = deque()   # (key, bytes): pinned, waiting
        self._inflight: dict[BlockKey, int] = {}              # being written now (still pinned)
        self._seq: dict[BlockKey, int] = {}                   # pending key -> acceptance number
        self._owner: dict[BlockKey, str] = {}                 # pending key -> who stored it
        self._fails: dict[str, _Failed] = {}     # owner -> acceptance numbers of failed writes
        self._budget_bytes = 0        # queued + in flight + reserved by prepared stores
        self._accepted = 0
        self._failed = 0              # writes given up (the block stays in DRAM, uncopied)
        self._cv = threading.Condition(store._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---------------------------------------------------------------- called under the store lock
    def reserve(self, nbytes: int, force: bool = False) -> bool:
        """Budget for one block that a prepared store will hand over: False when the unwritten
        bytes would pass the bound (the block is then SKIPPED). One block always fits when
        nothing waits, so a block larger than the bound is never refused for ever. ``force``:
        a bulk writer that waited for the queue to drain takes its whole job even past the
        bound (DRAM's size still bounds it)."""
        if not force and self._budget_bytes and self._budget_bytes + nbytes > self.max_queue_bytes:
            return False
        self._budget_bytes += nbytes
        return True

    def wait_room(self, nbytes: int, timeout_s: float) -> bool:
        """Wait (the store lock released) until ``nbytes`` (capped at the bound) fit in the
        budget, or ``timeout_s`` seconds passed; True when they fit."""
        nbytes = min(nbytes, self.max_queue_bytes)
        deadline = time.monotonic() + timeout_s
        while self._budget_bytes and self._budget_bytes + nbytes > self.max_queue_bytes:
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping:
                return False
            self._cv.wait(left)
        return True

    def release(self, nbytes: int) -> None:
        """Give back a reservation whose block will not be accepted (aborted, not admitted)."""
        self._budget_bytes = max(0, self._budget_bytes - nbytes)
        self._cv.notify_all()

    def accept(self, keys: Iterable[BlockKey], *, reserved: bool = False,
               owner: str | None = None) -> int:
        """Queue DRAM-resident blocks whose NVMe copy is to be written; returns how many were
        queued. ``reserved``: their bytes were reserved by :meth:`reserve` (a store); otherwise
        (blocks moved down from HBM) they are added to the budget on top. ``owner``: who stored
        them (its :meth:`flush` hears of their failed writes). A key already pending, not in
        DRAM, or already on NVMe is not queued (its reservation is released)."""
        s = self._s
        n = 0
        for k in keys:
            h = s.res.get(k)
            size = s.res.size[h] if h >= 0 else 0
            if (k in self._seq or h < 0 or s.res.slot(h, Tier.DRAM) < 0
                    or s.res.slot(h, Tier.NVME) >= 0):
                if reserved:
                    self.release(size)
                continue
            if not reserved:
                self._budget_bytes += size
            self._accepted += 1
            self._seq[k] = self._accepted
            if owner is not None:
                self._owner[k] = owner
            s.pins.pin(FLUSH_OWNER, k)
            self._queue.append((k, size))
            n += 1
        if n:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="tierstore-flush",
                                                daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return n

    def pending(self, key: BlockKey) -> bool:
        return key in self._seq

    def stats(self) -> dict:
        return {"queued_blocks": len(self._queue) + len(self._inflight),
                "unwritten_bytes": self._budget_bytes, "max_queue_bytes": self.max_queue_bytes,
                "accepted_blocks": self._accepted, "failed_blocks": self._failed}

    def flush(self, timeout_s: float | None = None, owner: str | None = None) -> bool:
        """Wait until every block accepted before this call is written or its write failed.
        True when every block ``owner`` stored before this call and not yet reported by an
        earlier flush of its own was written (``owner`` None: of everybody, failures since this
        call); False when one of them failed (also when it failed before this call: a block
        is never acknowledged durable without its copy, issue 13 item 11), or ``timeout_s``
        (seconds) ran out first. Releases the store lock while it waits (a condition on it)."""
        target = self._accepted
        failed_before = self._failed
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._seq and min(self._seq.values()) <= target:
            if self._thread is None or not self._thread.is_alive():
                if self._stopping:
                    return False
                self._thread = threading.Thread(target=self._run, name="tierstore-flush",
                                                daemon=True)
                self._thread.start()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._cv.wait(left if left is not None else 1.0)
        if owner is None:
            return self._failed == failed_before
        mine = self._fails.get(owner)
        if mine is None:
            return True
        bad = mine.report(target)
        if mine.empty:
            del self._fails[owner]
        return not bad

    def forget_owner(self, owner: str) -> None:
        """``owner`` went away: nobody will ask about its failed writes any more."""
        self._fails.pop(owner, None)

    def stop(self) -> None:
        """Drain the queue, then end the thread. Called with the store lock held (Store.close);
        the lock is released while the thread finishes."""
        self._stopping = True
        self._cv.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            depth = 0
            while True:   # release the (re-entrant) store lock fully while the thread drains
                try:
                    self._s._lock.release()
                except RuntimeError:
                    break
                depth += 1
            try:
                t.join()
            finally:
                for _ in range(depth):
                    self._s._lock.acquire()
        self._thread = None

    # ---------------------------------------------------------------- the thread
    def _next_batch(self) -> list[BlockKey]:
        batch: list[BlockKey] = []
        nbytes = 0
        while self._queue and len(batch) < self.batch_blocks:
            k, size = self._queue[0]
            if batch and nbytes + size > self.batch_bytes:
                break
            self._queue.popleft()
            batch.append(k)
            self._inflight[k] = size
            nbytes += size
        return batch

    def _done(self, batch: list[BlockKey]) -> None:
        s = self._s
        for k in batch:
            size = self._inflight.pop(k, 0)
            self._budget_bytes = max(0, self._budget_bytes - size)
            try:
                s.pins.unpin(FLUSH_OWNER, k)
            except PinError:   # the block was dropped for good meanwhile (pins forgotten)
                pass
            seq = self._seq.pop(k, None)
            owner = self._owner.pop(k, None)
            h = s.res.get(k)
            if h < 0 or s.res.slot(h, Tier.NVME) < 0:
                self._failed += 1
                if owner is not None and seq is not None:
                    self._fails.setdefault(owner, _Failed()).add(seq)
        self._cv.notify_all()

    def _run(self) -> None:
        s = self._s
        while True:
            with s._lock:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:
                    return   # stopping, and nothing left
                batch = self._next_batch()
                try:
                    written = s.mover.flush_batch(batch)
                    s.counters[cn.NVME_FLUSHED_BLOCKS] += written
                    s.counters[cn.NVME_FLUSH_BATCHES] += 1
                except Exception as e:   # never let the thread die: the blocks stay in DRAM
                    log.exception("write-behind: a batch of %d blocks failed", len(batch))
                    s.counters[cn.NVME_FLUSH_ERRORS] += 1
                    health = s.tiers[Tier.NVME].health
                    if health is not None:   # a failing tier shows, whatever raised
                        health.fail("write", "internal", f"{type(e).__name__}: {e}")
                finally:
                    self._done(batch)
