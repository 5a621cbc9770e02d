"""A fake verbs layer with the semantics rdma.py relies on (tests; no RDMA device here).

Same interface as transfer/verbs.py. What it keeps of real verbs:

- memory regions over real process memory (addresses), each with an ``lkey`` and an ``rkey``
  and access flags; a READ checks the remote MR (valid rkey, REMOTE_READ, whole range inside)
  -> else ``WC_REM_ACCESS_ERR``, and the local MR (valid lkey, LOCAL_WRITE, inside) -> else
  ``WC_LOC_PROT_ERR``; a deregistered MR is invalid at once.
- RC queue pairs with a state machine: RESET -> (connect) INIT -> RTR -> RTS; posting before RTS
  raises; a completion error moves the QP to ERR, and every WR still queued then completes with
  ``WC_WR_FLUSH_ERR`` (so a failed or cancelled batch is *quiescent* once all its completions
  are polled); ``to_error`` does the same on request; at most ``max_send_wr`` outstanding.
- one-sided and asynchronous: posted READs execute (memmove from the remote memory) only when
  some CQ is polled (``progress_per_poll`` WRs per poll), so bytes land *after* the post, like
  a NIC's DMA; a remote QP that is gone or in ERR gives ``WC_RETRY_EXC_ERR``.

Failure injection for tests: ``fabric.fail_after(n, status)`` fails the n-th next READ;
``fabric.pause()`` stops progress (in-flight WRs stay in flight until ``resume``).

One process-wide :data:`FABRIC` (devices find each other by GID); guarded by one lock, no threads.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
from collections import deque

from tierstore.transfer.verbs import (ACCESS_LOCAL_WRITE, ACCESS_REMOTE_READ, QPS_ERR, QPS_RESET,
                                      QPS_RTS, WC_LOC_PROT_ERR, WC_REM_ACCESS_ERR,
                                      WC_RETRY_EXC_ERR, WC_SUCCESS, WC_WR_FLUSH_ERR)


class FakeVerbsError(RuntimeError):
    """What a failing verbs call raises (post on a QP not in RTS, too many WRs...)."""


class Fabric:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.devices: dict[bytes, "FakeDevice"] = {}
        self.qps: dict[tuple[bytes, int], "FakeQP"] = {}
        self._keys = itertools.count(0x1000)
        self._qpns = itertools.count(0x100)
        self.progress_per_poll = 1 << 30
        self._fail_after: tuple[int, int] | None = None
        self.paused = False
        self.reads_done = 0

    def fail_after(self, n: int, status: int = WC_RETRY_EXC_ERR) -> None:
        with self.lock:
            self._fail_after = (n, status)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def _injected(self) -> int | None:
        if self._fail_after is None:
            return None
        n, st = self._fail_after
        if n <= 0:
            self._fail_after = None
            return st
        self._fail_after = (n - 1, st)
        return None


FABRIC = Fabric()


class FakeMR:
    def __init__(self, dev: "FakeDevice", addr: int, length: int, access: int) -> None:
        if length <= 0 or addr <= 0:
            raise FakeVerbsError("reg_mr: bad address or length")
        self.dev, self.addr, self.length, self.access = dev, addr, length, access
        self.lkey = next(dev.fabric._keys)
        self.rkey = next(dev.fabric._keys)
        self.valid = True

    def covers(self, addr: int, n: int) -> bool:
        return self.valid and self.addr <= addr and addr + n <= self.addr + self.length

    def close(self) -> None:
        with self.dev.fabric.lock:
            self.valid = False
            self.dev.mrs.pop(self.lkey, None)
            self.dev.rkeys.pop(self.rkey, None)


class FakeCQ:
    def __init__(self, dev: "FakeDevice", depth: int) -> None:
        self.dev, self.depth = dev, depth
        self.done: deque = deque()
        self.qps: list[FakeQP] = []

    def poll(self, n: int = 64) -> list[tuple[int, int]]:
        f = self.dev.fabric
        with f.lock:
            if not f.paused:
                budget = f.progress_per_poll
                for qp in list(self.qps):
                    budget -= qp._progress(budget)
            out = []
            while self.done and len(out) < n:
                out.append(self.done.popleft())
            return out

    def close(self) -> None:
        pass


class FakeQP:
    def __init__(self, dev: "FakeDevice", cq: FakeCQ, max_send_wr: int) -> None:
        self.dev, self.cq, self.max_send_wr = dev, cq, max_send_wr
        self.qpn = next(dev.fabric._qpns)
        self.psn = int.from_bytes(os.urandom(3), "big")
        self.state = QPS_RESET
        self.sq: deque = deque()
        self.remote: tuple[bytes, int] | None = None
        cq.qps.append(self)
        dev.fabric.qps[(dev.gid, self.qpn)] = self

    def connect(self, remote: dict) -> None:
        with self.dev.fabric.lock:
            if self.state != QPS_RESET:
                raise FakeVerbsError(f"connect: QP {self.qpn} is not in RESET")
            self.remote = (bytes(remote["gid"]), int(remote["qpn"]))
            self.state = QPS_RTS   # INIT -> RTR -> RTS

    def post_reads(self, wrs) -> None:
        with self.dev.fabric.lock:
            wrs = list(wrs)
            if self.state not in (QPS_RTS, QPS_ERR):
                raise FakeVerbsError(f"post_send: QP {self.qpn} not ready (state {self.state})")
            if len(self.sq) + len(wrs) > self.max_send_wr:
                raise FakeVerbsError("post_send: send queue full (ENOMEM)")
            self.sq.extend(wrs)
            if self.state == QPS_ERR:
                self._flush()

    def _flush(self) -> None:
        while self.sq:
            self.cq.done.append((self.sq.popleft()[0], WC_WR_FLUSH_ERR))

    def to_error(self) -> None:
        with self.dev.fabric.lock:
            self.state = QPS_ERR
            self._flush()

    def _progress(self, budget: int) -> int:
        done = 0
        f = self.dev.fabric
        while self.sq and done < budget and self.state == QPS_RTS:
            wr_id, laddr, n, lkey, raddr, rkey = self.sq.popleft()
            st = self._execute(laddr, n, lkey, raddr, rkey)
            self.cq.done.append((wr_id, st))
            done += 1
            if st != WC_SUCCESS:
                self.state = QPS_ERR
                self._flush()
            else:
                f.reads_done += 1
        return done

    def _execute(self, laddr: int, n: int, lkey: int, raddr: int, rkey: int) -> int:
        f = self.dev.fabric
        inj = f._injected()
        if inj is not None:
            return inj
        peer = f.qps.get(self.remote) if self.remote else None
        if peer is None or peer.state != QPS_RTS:
            return WC_RETRY_EXC_ERR
        rmr = peer.dev.rkeys.get(rkey)
        if rmr is None or not rmr.access & ACCESS_REMOTE_READ or not rmr.covers(raddr, n):
            return WC_REM_ACCESS_ERR
        lmr = self.dev.mrs.get(lkey)
        if lmr is None or not lmr.access & ACCESS_LOCAL_WRITE or not lmr.covers(laddr, n):
            return WC_LOC_PROT_ERR
        ctypes.memmove(laddr, raddr, n)
        return WC_SUCCESS

    def close(self) -> None:
        with self.dev.fabric.lock:
            self.to_error()
            self.dev.fabric.qps.pop((self.dev.gid, self.qpn), None)
            if self in self.cq.qps:
                self.cq.qps.remove(self)


class FakeDevice:
    """A fake RDMA device on ``fabric`` (default: the process-wide one)."""

    def __init__(self, name: str = "fake0", fabric: Fabric | None = None) -> None:
        self.fabric = fabric or FABRIC
        self.name = name
        self.gid = os.urandom(16)
        self.lid = 0
        self.mrs: dict[int, FakeMR] = {}
        self.rkeys: dict[int, FakeMR] = {}
        self.max_mr_bytes = 1 << 62
        with self.fabric.lock:
            self.fabric.devices[self.gid] = self

    def reg_mr(self, addr: int, length: int, access: int) -> FakeMR:
        if length > self.max_mr_bytes:
            raise FakeVerbsError(f"reg_mr: {length} bytes exceeds the device limit")
        with self.fabric.lock:
            mr = FakeMR(self, addr, length, access)
            self.mrs[mr.lkey] = mr
            self.rkeys[mr.rkey] = mr
            return mr

    def create_cq(self, depth: int) -> FakeCQ:
        return FakeCQ(self, depth)

    def create_qp(self, cq: FakeCQ, max_send_wr: int) -> FakeQP:
        with self.fabric.lock:
            return FakeQP(self, cq, max_send_wr)

    def close(self) -> None:
        with self.fabric.lock:
            self.fabric.devices.pop(self.gid, None)
