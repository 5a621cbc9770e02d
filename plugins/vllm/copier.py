"""The worker side's copies, never waited for on the engine's step (DESIGN §8).

:class:`Copier` wraps one :class:`tierstore.io.copy.CopyEngine` (vLLM's paged KV <-> the store's
DRAM slab). On CUDA the engine's own streams make every copy asynchronous: ``start`` submits,
``poll`` queries an event, and a copy the next forward depends on (a synchronous load) makes the
compute stream wait on the device, never the host. On the CPU device a copy is a memcpy on the
calling thread, so here the copier runs copies on a thread of its own and ``start`` returns at
once; a copy the forward depends on runs on the calling thread instead (it must be in place
before the forward starts). The same ``start`` / ``poll`` / ``wait`` contract either way::

    worker thread: start(kind, ...) -> ticket      poll(ticket) -> done?   (TransferFailed: failed)
    copy thread (CPU only): CopyEngine.submit_* -> done[ticket]

Threading: the copier's thread ``tierstore-copy`` (CPU device only) is started by the first
asynchronous copy and stopped by :meth:`close`; the CopyEngine, a single-threaded object, is only
ever called under ``_lock``. Owner: one ``WorkerSide``.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Sequence

from tierstore.errors import JobError, TierStoreError, TransferFailed
from tierstore.io.copy import CopyEngine


class Copier:
    """Asynchronous copies over one CopyEngine (see the module docstring)."""

    def __init__(self, engine: CopyEngine) -> None:
        self.engine = engine
        self.threaded = not engine.cuda
        self._lock = threading.Lock()
        self._cv = threading.Condition()
        self._done: dict[int, BaseException | None] = {}
        self._pending: set[int] = set()
        self._tickets = itertools.count(1)
        self._q: queue.Queue | None = None
        self._thread: threading.Thread | None = None

    def start(self, kind: str, slots: Sequence[int], block_ids: Sequence[int], *,
              now: bool = False) -> int:
        """Start copying slab ``slots`` into KV ``block_ids`` (``kind="onload"``) or KV blocks
        into slots (``"offload"``); returns a ticket for :meth:`poll`. ``now``: the next forward
        reads these blocks (a synchronous load): it waits for them on the device (CUDA), or the
        copy runs on this thread (CPU). Raises TransferFailed when a copy cannot start."""
        if not self.threaded:
            cj = self._submit(kind, slots, block_ids)
            if now:
                self.engine.wait_stream(cj)
            return cj
        t = next(self._tickets)
        if now:
            err = self._run(kind, slots, block_ids)
            if err is not None:
                raise err
            with self._cv:
                self._done[t] = None
            return t
        if self._thread is None:
            self._q = queue.Queue()
            self._thread = threading.Thread(target=self._loop, name="tierstore-copy",
                                            daemon=True)
            self._thread.start()
        with self._cv:
            self._pending.add(t)
        self._q.put((t, kind, list(slots), list(block_ids)))
        return t

    def poll(self, ticket: int) -> bool:
        """True once the copy is done (the ticket is then retired); raises TransferFailed
        (retiring it) when it failed."""
        if not self.threaded:
            return self.engine.poll(ticket)
        with self._cv:
            if ticket not in self._done:
                if ticket not in self._pending:
                    raise JobError(f"unknown copy {ticket}")
                return False
            err = self._done.pop(ticket)
        if err is not None:
            raise err
        return True

    def wait(self, ticket: int) -> None:
        """Block until the copy is done (preemptions, sleep, shutdown; not the step's path)."""
        if not self.threaded:
            self.engine.wait(ticket)
            return
        with self._cv:
            self._cv.wait_for(lambda: ticket in self._done)
        self.poll(ticket)

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None
        self.engine.close()

    # ---------------------------------------------------------------- internals
    def _submit(self, kind: str, slots, block_ids) -> int:
        with self._lock:
            if kind == "onload":
                return self.engine.submit_onload(slots, block_ids)
            return self.engine.submit_offload(block_ids, slots)

    def _run(self, kind: str, slots, block_ids) -> BaseException | None:
        """A whole copy on the CPU device (the engine runs it synchronously)."""
        try:
            with self._lock:
                if kind == "onload":
                    jid = self.engine.submit_onload(slots, block_ids)
                else:
                    jid = self.engine.submit_offload(block_ids, slots)
                self.engine.poll(jid)
            return None
        except TierStoreError as e:
            return e
        except Exception as e:   # a torch error on a bad view: the copy failed, not the engine
            return TransferFailed(f"{kind} failed: {e}")

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            t, kind, slots, block_ids = item
            err = self._run(kind, slots, block_ids)
            with self._cv:
                self._pending.discard(t)
                self._done[t] = err
                self._cv.notify_all()
