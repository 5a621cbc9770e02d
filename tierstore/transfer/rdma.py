"""RDMA transport: one-sided RDMA READ from the peer's registered DRAM slab.

    server (PeerServer.rdma = RdmaServer)          client (RdmaTransport / RdmaLink)
    slab registered REMOTE_READ in chunks           slab registered LOCAL_WRITE in chunks
              ◀──── RDMA_CONNECT {qpn, psn, gid, lid, mtu} (control session)
    new RC QP, connected to the client's ──────────▶ {qpn, psn, gid, lid, mtu,
                                                      mrs [[addr, len, rkey]]}
                                                     client QP -> RTS
                                                     read_blocks: one READ WR per block,
                                                     posted in chained batches of <= max_send_wr
                                                     outstanding; poller thread polls the CQ

Registration is chunked like the CUDA registration (tiers/pinning.py ``plan_chunks``): chunks
of whole slots, <= ``max_chunk_bytes`` each, so no block spans two memory regions; all or nothing.

Validity and quiescence: block ``i`` is ok only after its WR completed with success (and its
checksum matched when verification is on). Any error completion puts the QP in ERR, which
flushes every outstanding WR; the job ends (FAILED / CANCELLED) only when all of its WRs are
accounted for, so after a terminal state the NIC writes nothing more into its local slots. A
peer that stops answering: no completion within ``timeout_s`` -> the QP is moved to ERR
(flush) and the job fails. ``cancel`` drops the job's unposted WRs and, when some are in flight,
moves the QP to ERR (other jobs on that link fail too; the link reconnects on the next read).

Bounds: the MRs bound what a peer can touch (the whole serving slab, read only); per-lease
bounds are enforced by the TCP path and by the leases' pins, not by the NIC (type-2 memory
windows per lease would add that; not done).

Threads: one poller thread per :class:`RdmaLink`, owned by it (stopped by ``close``).
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import time
from collections import deque
from typing import Any, Sequence

import xxhash

from tierstore.errors import ChecksumFailed, TransferFailed
from tierstore.tiers.pinning import plan_chunks
from tierstore.transfer.transport import Link, ReadJob, Slab, Transport
from tierstore.transfer.peer_frames import PeerMsg
from tierstore.transfer.verbs import (ACCESS_LOCAL_WRITE, ACCESS_REMOTE_READ, MTU_1024,
                                      WC_NAMES, WC_SUCCESS, VerbsUnavailable)

MAX_CHUNK_BYTES = 1 << 36   # 64 GiB, like the CUDA registration


def buffer_address(mv: memoryview) -> int:
    c = ctypes.c_char.from_buffer(mv)
    try:
        return ctypes.addressof(c)
    finally:
        del c


class Registration:
    """A slab registered as one or more memory regions (slot-aligned chunks)."""

    def __init__(self, device: Any, slab: Slab, access: int,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.slab = slab
        self.base = buffer_address(slab.buffer)
        size = slab.num_slots * slab.slot_bytes
        self.chunks = plan_chunks(size, slab.slot_bytes, max_chunk_bytes) if size else []
        self.per_chunk = self.chunks[0][1] if self.chunks else 1
        self.mrs: list = []
        try:
            for off, n in self.chunks:
                self.mrs.append(device.reg_mr(self.base + off, n, access))
        except Exception as e:
            self.close()
            raise VerbsUnavailable(f"registering the slab failed at chunk {len(self.mrs)}: {e}") \
                from None

    def locate(self, slot: int) -> tuple[int, Any]:
        """(address, memory region) of ``slot``."""
        off = slot * self.slab.slot_bytes
        return self.base + off, self.mrs[off // self.per_chunk]

    def describe(self) -> list[list[int]]:
        return [[mr.addr, mr.length, mr.rkey] for mr in self.mrs]

    def close(self) -> None:
        for mr in self.mrs:
            try:
                mr.close()
            except Exception:
                pass
        self.mrs = []


class RdmaServer:
    """Server side: the slab as read-only remote memory, one RC QP per rdma session."""

    def __init__(self, device: Any, slab: Slab, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.device = device
        self.reg = Registration(device, slab, ACCESS_LOCAL_WRITE | ACCESS_REMOTE_READ,
                                max_chunk_bytes)
        self.cq = device.create_cq(16)
        self.qps: dict[bytes, Any] = {}
        self._lock = threading.Lock()

    def accept(self, sid: bytes, body: dict) -> dict:
        from tierstore.errors import ProtocolError
        try:
            remote = {"qpn": int(body["qpn"]), "psn": int(body["psn"]),
                      "gid": bytes(body["gid"]), "lid": int(body.get("lid", 0)),
                      "mtu": int(body.get("mtu", MTU_1024))}
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("bad RDMA_CONNECT body") from None
        qp = self.device.create_qp(self.cq, 16)
        qp.connect(remote)
        with self._lock:
            old = self.qps.pop(sid, None)
            self.qps[sid] = qp
        if old is not None:
            old.close()
        s = self.reg.slab
        return {"qpn": qp.qpn, "psn": qp.psn, "gid": self.device.gid, "lid": self.device.lid,
                "mtu": getattr(self.device, "mtu", MTU_1024),
                "mrs": self.reg.describe(), "slot_bytes": s.slot_bytes, "num_slots": s.num_slots,
                "base": self.reg.base, "per_chunk": self.reg.per_chunk}

    def drop(self, sid: bytes) -> None:
        with self._lock:
            qp = self.qps.pop(sid, None)
        if qp is not None:
            qp.to_error()
            qp.close()

    def close(self) -> None:
        for sid in list(self.qps):
            self.drop(sid)
        self.reg.close()


class _JobTrack:
    def __init__(self, job: ReadJob, checksums) -> None:
        self.job = job
        self.left = job.num_blocks
        self.error: BaseException | None = None
        self.checksums = checksums


class RdmaLink(Link):
    """Client side of one peer: an RC QP, a CQ and the poller thread that drives them."""

    def __init__(self, transport: "RdmaTransport", session: Any) -> None:
        self.transport = transport
        self.session = session
        self.peer = session.label
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: deque = deque()      # (wr_id, wr tuple)
        self._inflight: dict[int, tuple[_JobTrack, int]] = {}
        self._meta: dict[int, tuple[_JobTrack, int]] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._last_progress = time.monotonic()
        self.qp = None
        self._connect()
        self._thread = threading.Thread(target=self._poll_loop, daemon=True,
                                        name=f"rdma-poll-{self.peer}")
        self._thread.start()

    @property
    def quiescent(self) -> bool:
        return not self._inflight

    def _connect(self) -> None:
        dev = self.transport.device
        self.cq = dev.create_cq(self.transport.max_send_wr * 2)
        qp = dev.create_qp(self.cq, self.transport.max_send_wr)
        r = self.session.rpc(PeerMsg.RDMA_CONNECT,
                             {"qpn": qp.qpn, "psn": qp.psn, "gid": dev.gid, "lid": dev.lid,
                              "mtu": getattr(dev, "mtu", MTU_1024)})
        qp.connect({"qpn": r["qpn"], "psn": r["psn"], "gid": r["gid"], "lid": r.get("lid", 0),
                    "mtu": r.get("mtu", MTU_1024)})
        self.remote_mrs = [(int(a), int(n), int(k)) for a, n, k in r["mrs"]]
        self.remote_slot_bytes = int(r["slot_bytes"])
        self.remote_num_slots = int(r["num_slots"])
        self.remote_base = int(r["base"])
        self.remote_per_chunk = int(r["per_chunk"]) or 1
        self.qp = qp
        self.broken = False

    def remote_addr(self, slot: int) -> tuple[int, int]:
        off = slot * self.remote_slot_bytes
        addr, _, rkey = self.remote_mrs[off // self.remote_per_chunk]
        return self.remote_base + off, rkey

    def submit(self, job: ReadJob, checksums) -> None:
        tr = self.transport
        track = _JobTrack(job, checksums)
        with self._lock:
            if self._closed:
                raise TransferFailed(f"link to {self.peer} is closed")
            if self.broken and not self._inflight:
                self.qp.close()
                self._connect()
            for i, (rs, ls, n) in enumerate(zip(job.remote_slots, job.local_slots, job.sizes)):
                if not 0 <= rs < self.remote_num_slots or n > self.remote_slot_bytes:
                    raise TransferFailed(f"remote slot {rs} outside the peer's slab")
                laddr, lmr = tr.reg.locate(ls)
                raddr, rkey = self.remote_addr(rs)
                wid = next(self._ids)
                self._meta[wid] = (track, i)
                self._pending.append((wid, (wid, laddr, n, lmr.lkey, raddr, rkey)))
            job.on_cancel.append(lambda: self._cancel(track))
        self._wake.set()

    def _cancel(self, track: _JobTrack) -> None:
        with self._lock:
            keep = deque()
            dropped = 0
            for wid, wr in self._pending:
                if self._meta[wid][0] is track:
                    del self._meta[wid]
                    dropped += 1
                else:
                    keep.append((wid, wr))
            self._pending = keep
            track.left -= dropped
            if any(t is track for t, _ in self._inflight.values()):
                self.qp.to_error()   # flush: their completions come back as WR_FLUSH_ERR
                self.broken = True
            elif track.left == 0:
                track.job.part_done(None)
        self._wake.set()

    def _fail_all_pending(self, err: BaseException) -> None:
        while self._pending:
            wid, _ = self._pending.popleft()
            track, _ = self._meta.pop(wid)
            track.error = track.error or err
            track.left -= 1
            if track.left == 0:
                track.job.part_done(track.error)

    def _poll_loop(self) -> None:
        tr = self.transport
        while not self._closed:
            with self._lock:
                if self.broken and self._pending:
                    if self._inflight:
                        pass   # wait for the flush first
                    else:
                        try:
                            self.qp.close()
                            self._connect()
                        except Exception as e:
                            self._fail_all_pending(TransferFailed(f"rdma reconnect failed: {e}"))
                room = tr.max_send_wr - len(self._inflight)
                batch = []
                while self._pending and room > 0 and not self.broken:
                    wid, wr = self._pending.popleft()
                    self._inflight[wid] = self._meta.pop(wid)
                    batch.append(wr)
                    room -= 1
                if batch:
                    try:
                        self.qp.post_reads(batch)
                        if len(self._inflight) == len(batch):
                            self._last_progress = time.monotonic()
                    except Exception as e:
                        # WRs that reached the QP stay in flight: the QP goes to ERR, they are
                        # flushed, and their completions account for them (no byte lands in a
                        # slot after its job ended). The rest never reached the device.
                        posted = getattr(e, "posted", 0)
                        self.broken = True
                        for wr in batch[posted:]:
                            track, _ = self._inflight.pop(wr[0])
                            track.error = track.error or TransferFailed(f"post failed: {e}")
                            track.left -= 1
                            if track.left == 0:
                                track.job.part_done(track.error)
                        for wr in batch[:posted]:
                            track, _ = self._inflight[wr[0]]
                            track.error = track.error or TransferFailed(f"post failed: {e}")
                        if posted:
                            self.qp.to_error()
                busy = bool(self._inflight)
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            comps = self.cq.poll(64)
            if not comps:
                if time.monotonic() - self._last_progress > tr.timeout_s:
                    with self._lock:
                        self.qp.to_error()
                        self.broken = True
                        for t, _ in self._inflight.values():
                            t.error = t.error or TransferFailed(
                                f"peer {self.peer}: no RDMA completion in {tr.timeout_s} s")
                    self._last_progress = time.monotonic()
                time.sleep(0.0002)
                continue
            self._last_progress = time.monotonic()
            self._complete(comps)

    def _complete(self, comps: Sequence[tuple[int, int]]) -> None:
        tr = self.transport
        with self._lock:
            for wid, status in comps:
                ent = self._inflight.pop(wid, None)
                if ent is None:
                    continue   # a completion nobody waits for (late): ignored
                track, i = ent
                job = track.job
                if status == WC_SUCCESS and track.error is None:
                    c = track.checksums[i] if track.checksums else 0
                    n = job.sizes[i]
                    if c and xxhash.xxh3_64_intdigest(tr.local.view(job.local_slots[i], n)) != c:
                        track.error = ChecksumFailed(
                            f"block from remote slot {job.remote_slots[i]} fails its checksum")
                    else:
                        job.block_done(i, n)
                elif status != WC_SUCCESS:
                    self.broken = True
                    track.error = track.error or TransferFailed(
                        f"peer {self.peer}: RDMA READ {WC_NAMES.get(status, status)}")
                track.left -= 1
                if track.left == 0:
                    track.job.part_done(track.error)
            if self.broken:
                self._fail_all_pending(TransferFailed(f"peer {self.peer}: queue pair in error"))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.qp is not None:
                self.qp.to_error()
        self._wake.set()
        self._thread.join(timeout=2.0)
        # drain flushed completions so every job reaches a terminal state
        deadline = time.monotonic() + self.transport.timeout_s
        while self._inflight and time.monotonic() < deadline:
            comps = self.cq.poll(64)
            if comps:
                self._complete(comps)
            else:
                time.sleep(0.001)
        with self._lock:
            self._fail_all_pending(TransferFailed(f"link to {self.peer} closed"))
        if self.qp is not None:
            self.qp.close()


class RdmaTransport(Transport):
    name = "rdma"

    def __init__(self, local: Slab, device: Any, timeout_s: float = 5.0, max_send_wr: int = 128,
                 verify_checksums: bool = False, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        super().__init__(local, timeout_s)
        self.device = device
        self.max_send_wr = max_send_wr
        self.verify_checksums = verify_checksums
        self.reg = Registration(device, local, ACCESS_LOCAL_WRITE, max_chunk_bytes)

    def connect(self, session: Any) -> RdmaLink:
        return RdmaLink(self, session)

    def read_blocks(self, link: RdmaLink, remote_slots, local_slots, sizes,
                    checksums=None) -> ReadJob:
        self.check_local(local_slots, sizes)
        job = ReadJob(link.peer, remote_slots, local_slots, sizes,
                      num_parts=1 if len(sizes) else 0)
        if len(sizes):
            try:
                link.submit(job, list(checksums) if (checksums is not None and
                                                     self.verify_checksums) else None)
            except TransferFailed as e:
                job.part_done(e)
        return job

    def close(self) -> None:
        self.reg.close()


def factory(device: Any, **kw):
    """``rdma_factory`` for :class:`PeerClient`: ``factory(dev)(slab, settings)``."""
    def make(slab: Slab, settings) -> RdmaTransport:
        return RdmaTransport(slab, device, settings.timeout_s,
                             verify_checksums=settings.verify_checksums, **kw)
    return make
