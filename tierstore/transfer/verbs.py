"""The verbs seam: the ONLY module that imports pyverbs (lazily, inside functions).

rdma.py talks to a small device interface; two implementations keep the same semantics:
:class:`PyverbsDevice` here (Debian's ``python3-pyverbs``, rdma-core 44) and
:class:`tierstore.transfer.fakeverbs.FakeDevice` (tests; this machine has no RDMA device).

Interface (duck-typed)::

    dev.name, dev.gid -> 16 bytes, dev.lid -> int, dev.mtu -> ibv_mtu (optional; 1024)
    dev.reg_mr(addr, length, access) -> mr (.addr .length .lkey .rkey .close())
    dev.create_cq(depth) -> cq (.poll(n) -> [(wr_id, status)], .close())
    dev.create_qp(cq, max_send_wr) -> qp (.qpn, .state, .connect(remote: dict),
        .post_reads([(wr_id, laddr, length, lkey, raddr, rkey), ...]) -- one chained post, every
        WR signaled; a failure part-way raises PostFailed(posted=k): the first k are on the QP;
        .to_error() -- outstanding WRs complete with WC_WR_FLUSH_ERR; .close())
    dev.close()

Constants follow ``ibv_*`` values. :func:`probe` answers "is RDMA usable here, and if not, why"
without raising: no pyverbs, no device list (this kernel has no InfiniBand: ENOSYS), or no device.

Import: ``PYTHONPATH=/usr/lib/python3/dist-packages`` or a .pth file pointing there (MACHINE.md
§1c); :func:`import_pyverbs` also tries that directory itself when the plain import fails.
"""

from __future__ import annotations

import os
import sys

from tierstore.transfer.transport import TransportUnavailable

ACCESS_LOCAL_WRITE = 1
ACCESS_REMOTE_WRITE = 2
ACCESS_REMOTE_READ = 4

WC_SUCCESS = 0
WC_LOC_LEN_ERR = 1
WC_LOC_PROT_ERR = 4
WC_WR_FLUSH_ERR = 5
WC_REM_ACCESS_ERR = 10
WC_RETRY_EXC_ERR = 12

MTU_1024 = 3   # enum ibv_mtu

QPS_RESET, QPS_INIT, QPS_RTR, QPS_RTS, QPS_SQD, QPS_SQE, QPS_ERR = range(7)

WC_NAMES = {0: "success", 1: "local length error", 4: "local protection error",
            5: "flushed", 10: "remote access error", 12: "retry exceeded (peer gone)"}

DEBIAN_DIST = "/usr/lib/python3/dist-packages"


class VerbsUnavailable(TransportUnavailable):
    """No usable RDMA here (no pyverbs, no device support in the kernel, no device)."""


class PostFailed(RuntimeError):
    """``post_reads`` failed part-way: the first ``posted`` WRs of the list reached the QP (they
    will complete or be flushed), the rest did not."""

    def __init__(self, msg: str, posted: int) -> None:
        super().__init__(msg)
        self.posted = posted


def import_pyverbs():
    try:
        import pyverbs  # noqa: F401
    except ImportError:
        if os.path.isdir(os.path.join(DEBIAN_DIST, "pyverbs")) and DEBIAN_DIST not in sys.path:
            sys.path.append(DEBIAN_DIST)
        try:
            import pyverbs  # noqa: F401
        except ImportError as e:
            raise VerbsUnavailable(f"pyverbs is not installed ({e}); apt-get install "
                                   f"python3-pyverbs") from None
    import pyverbs.device
    return pyverbs


def list_devices() -> list[str]:
    """Names of the RDMA devices; raises VerbsUnavailable with the reason when there are none
    to list (no pyverbs, or the kernel has no RDMA support)."""
    import_pyverbs()
    from pyverbs.device import get_device_list
    from pyverbs.pyverbs_error import PyverbsError

    try:
        devs = get_device_list()
    except PyverbsError as e:
        raise VerbsUnavailable(f"RDMA unavailable: {e} (no RDMA support in this kernel?)") \
            from None
    return [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in devs]


def probe() -> tuple[bool, str]:
    """(usable, reason) — never raises."""
    try:
        names = list_devices()
    except VerbsUnavailable as e:
        return False, str(e)
    except Exception as e:   # a broken install must not take the node down
        return False, f"RDMA unavailable: {type(e).__name__}: {e}"
    if not names:
        return False, "RDMA unavailable: no RDMA device"
    return True, f"devices: {', '.join(names)}"


def open_device(name: str | None = None, *, port: int = 1, gid_index: int = 1) -> "PyverbsDevice":
    names = list_devices()
    if not names:
        raise VerbsUnavailable("RDMA unavailable: no RDMA device")
    return PyverbsDevice(name or names[0], port=port, gid_index=gid_index)


# ----------------------------------------------------------------------------- real verbs
class _MR:
    def __init__(self, mr, addr: int, length: int) -> None:
        self._mr, self.addr, self.length = mr, addr, length
        self.lkey, self.rkey = mr.lkey, mr.rkey

    def close(self) -> None:
        self._mr.close()


class _CQ:
    def __init__(self, cq) -> None:
        self._cq = cq

    def poll(self, n: int = 64) -> list[tuple[int, int]]:
        npolled, wcs = self._cq.poll(n)
        return [(wc.wr_id, wc.status) for wc in wcs[:npolled]]

    def close(self) -> None:
        self._cq.close()


class _QP:
    def __init__(self, dev: "PyverbsDevice", qp, max_send_wr: int) -> None:
        self.dev, self._qp, self.max_send_wr = dev, qp, max_send_wr
        self.qpn = qp.qp_num
        self.psn = int.from_bytes(os.urandom(3), "big")
        self.state = QPS_INIT

    def connect(self, remote: dict) -> None:
        import pyverbs.enums as e
        from pyverbs.addr import AHAttr, GID, GlobalRoute
        from pyverbs.qp import QPAttr

        attr = QPAttr(qp_state=e.IBV_QPS_INIT, cur_qp_state=e.IBV_QPS_RESET)
        attr.qp_access_flags = e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_LOCAL_WRITE
        attr.port_num = self.dev.port
        # the smaller of both ports' active MTUs (a peer that does not say: 1024)
        attr.path_mtu = max(1, min(self.dev.mtu, int(remote.get("mtu", MTU_1024))))
        attr.dest_qp_num = int(remote["qpn"])
        attr.rq_psn = int(remote["psn"])
        attr.sq_psn = self.psn
        attr.max_dest_rd_atomic = 16
        attr.max_rd_atomic = 16
        attr.min_rnr_timer = 12
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        gid = GID()
        gid.gid = _gid_text(bytes(remote["gid"]))
        gr = GlobalRoute(dgid=gid, sgid_index=self.dev.gid_index)
        attr.ah_attr = AHAttr(port_num=self.dev.port, is_global=1, gr=gr,
                              dlid=int(remote.get("lid", 0)))
        self._qp.to_rts(attr)   # RESET -> INIT -> RTR -> RTS
        self.state = QPS_RTS

    def post_reads(self, wrs) -> None:
        import pyverbs.enums as e
        from pyverbs.wr import SGE, SendWR

        # pyverbs links ``next_wr`` by a bare C pointer and keeps no reference to the next
        # SendWR: every WR of the chain must stay alive (``chain``) until post_send returns, or
        # the driver walks freed memory. SendWR also never frees its sg_list on its own
        # (rdma-core 44 names the hook ``__dealloc``), hence the explicit close().
        # ibv_post_send stops at the first WR it cannot take (``bad``): the ones before it are
        # posted. PostFailed says how many, so the caller waits for exactly those.
        from pyverbs.pyverbs_error import PyverbsError

        wrs = list(wrs)
        chain = []
        head = None
        bad = SendWR(wr_id=_NO_WR, opcode=e.IBV_WR_RDMA_READ, num_sge=1, sg=[SGE(0, 0, 0)])
        try:
            for wr_id, laddr, length, lkey, raddr, rkey in reversed(wrs):
                w = SendWR(wr_id=wr_id, opcode=e.IBV_WR_RDMA_READ, num_sge=1,
                           sg=[SGE(laddr, length, lkey)], send_flags=e.IBV_SEND_SIGNALED,
                           next_wr=head)
                w.set_wr_rdma(rkey, raddr)
                chain.append(w)
                head = w
            if head is not None:
                try:
                    self._qp.post_send(head, bad)
                except PyverbsError as ex:
                    ids = [w[0] for w in wrs]
                    posted = ids.index(bad.wr_id) if bad.wr_id in ids else 0
                    raise PostFailed(f"post_send: {ex}", posted) from None
        finally:
            for w in chain:
                w.close()
            if bad.wr_id == _NO_WR:   # else pyverbs copied a chain WR (its sg_list) into it
                bad.close()

    def to_error(self) -> None:
        import pyverbs.enums as e
        from pyverbs.qp import QPAttr

        self._qp.modify(QPAttr(qp_state=e.IBV_QPS_ERR), e.IBV_QP_STATE)
        self.state = QPS_ERR

    def close(self) -> None:
        self._qp.close()


_NO_WR = (1 << 64) - 1   # wr_id that no caller uses: "post_send named no bad WR"


def _gid_text(raw: bytes) -> str:
    h = raw.hex()
    return ":".join(h[i:i + 4] for i in range(0, 32, 4))


class PyverbsDevice:
    """One opened RDMA device + one protection domain (rdma-core 44 pyverbs)."""

    def __init__(self, name: str, *, port: int = 1, gid_index: int = 1) -> None:
        import_pyverbs()
        from pyverbs.device import Context
        from pyverbs.pd import PD

        self.name, self.port, self.gid_index = name, port, gid_index
        self._ctx = Context(name=name)
        self._pd = PD(self._ctx)
        g = self._ctx.query_gid(port_num=port, index=gid_index)
        self.gid = bytes.fromhex(str(g.gid).replace(":", ""))
        pa = self._ctx.query_port(port)
        self.lid = pa.lid
        self.mtu = int(pa.active_mtu)   # ibv_mtu enum: 1=256 ... 3=1024 ... 5=4096

    def reg_mr(self, addr: int, length: int, access: int) -> _MR:
        from pyverbs.mr import MR

        return _MR(MR(self._pd, length, access, address=addr), addr, length)

    def create_cq(self, depth: int) -> _CQ:
        from pyverbs.cq import CQ

        return _CQ(CQ(self._ctx, depth, None, None, 0))

    def create_qp(self, cq: _CQ, max_send_wr: int) -> _QP:
        import pyverbs.enums as e
        from pyverbs.qp import QP, QPCap, QPInitAttr

        cap = QPCap(max_send_wr=max_send_wr, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq._cq, rcq=cq._cq, cap=cap)
        return _QP(self, QP(self._pd, init), max_send_wr)

    def close(self) -> None:
        self._pd.close()
        self._ctx.close()
