"""Fixtures for the transfer tests (helpers live in transfer_support.py).

Real verbs: with ``TIERSTORE_RDMA_DEVICE=<name>`` (e.g. ``rxe0`` in the Soft-RoCE guest,
tools/softroce/) every test that builds nodes through ``pair_factory`` gets RDMA devices opened
on that real device (tierstore/transfer/verbs.py, pyverbs) where it would get fake ones; the
``rdma`` cases of the contract suite then run against the kernel's verbs. The contract's
"stall the peer" step (``fakeverbs.FABRIC.pause()``) becomes :class:`_Gate`: while paused,
posted READs are held before they reach the real QP (a stalled link); ``to_error`` and
``resume`` hand them to the real QP, which executes or flushes them. Completions, flushes,
access checks and retry-exceeded all come from the device.
"""

import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from transfer_support import TRANSPORTS, Pair  # noqa: E402

RDMA_DEVICE = os.environ.get("TIERSTORE_RDMA_DEVICE", "")


def _ids(t):
    return f"rdma-{RDMA_DEVICE}" if t == "rdma" and RDMA_DEVICE else t


@pytest.fixture(params=TRANSPORTS, ids=_ids)
def transport(request):
    return request.param


@pytest.fixture
def pair_factory():
    made = []

    def make(*a, **kw):
        p = Pair(*a, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


class _GatedQP:
    """A real QP behind the gate (everything but posting and to_error passes through)."""

    def __init__(self, gate: "_Gate", qp) -> None:
        self._gate, self._qp, self.held = gate, qp, []

    def __getattr__(self, k):
        return getattr(self._qp, k)

    def post_reads(self, wrs) -> None:
        wrs = list(wrs)
        with self._gate.lock:
            if self._gate.paused:
                self.held.extend(wrs)
                return
        self._qp.post_reads(wrs)

    def release(self) -> None:
        with self._gate.lock:
            held, self.held = self.held, []
        if held:
            try:
                self._qp.post_reads(held)
            except Exception:
                pass   # QP already closed: its link accounted for the WRs when it closed

    def to_error(self) -> None:
        self._qp.to_error()
        self.release()   # posted to a QP in ERR: the device flushes them (WR_FLUSH_ERR)


class _GatedDevice:
    def __init__(self, gate: "_Gate", dev) -> None:
        self._gate, self._dev = gate, dev

    def __getattr__(self, k):
        return getattr(self._dev, k)

    def create_qp(self, cq, max_send_wr):
        qp = _GatedQP(self._gate, self._dev.create_qp(cq, max_send_wr))
        self._gate.qps.append(qp)
        return qp


class _Gate:
    """Stands in for ``fakeverbs.FABRIC`` (pause/resume) and makes the real devices."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.paused = False
        self.qps: list[_GatedQP] = []
        self.devices: list = []

    def device(self, *_a, **_kw):
        from tierstore.transfer.verbs import open_device

        dev = open_device(self.name)
        self.devices.append(dev)
        return _GatedDevice(self, dev)

    def pause(self) -> None:
        with self.lock:
            self.paused = True

    def resume(self) -> None:
        with self.lock:
            self.paused = False
        for qp in list(self.qps):
            qp.release()

    def close(self) -> None:
        for d in self.devices:
            try:
                d.close()
            except Exception:
                pass


@pytest.fixture(autouse=True)
def _real_verbs(request, monkeypatch):
    """With TIERSTORE_RDMA_DEVICE set: node pairs get the real device (see the docstring)."""
    if not RDMA_DEVICE or "pair_factory" not in request.fixturenames:
        yield
        return
    from tierstore.transfer import fakeverbs

    gate = _Gate(RDMA_DEVICE)
    monkeypatch.setattr(fakeverbs, "FakeDevice", gate.device)
    monkeypatch.setattr(fakeverbs, "FABRIC", gate)
    yield
    gate.close()
