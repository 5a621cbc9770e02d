"""PeerClient: find blocks on peers and pull them into the local store.

One fetch (the cross-node P/D and prefix-reuse path)::

    lookup(keys, lease=True) on the peer   ── one RPC: hit prefix pinned there, slots + sizes
    prepare_store(hit keys) locally         ── local DRAM slots reserved, invisible to lookups
    transport.read_blocks(remote, local)    ── bytes land straight in the reserved slots
    poll / wait until the job is terminal
        DONE      -> complete_store(ok=True, checksums)  (now, and only now, visible: RACE-16)
        FAILED    -> complete_store(ok=[per key])        the blocks that arrived whole before
                                                         the first one that did not are
                                                         published, the rest freed (item 2)
        CANCELLED -> complete_store(ok=False)            (an abort: every slot freed)
    release(lease) on the peer              ── its pins go

A local slot is freed only in a terminal job state, when no byte can land in it any more; an
aborted fetch whose job does not reach a terminal state within ``lease_s + grace_s`` gets its
data link torn down (which ends every write into our memory) before its slots are freed
(case XFER-12). A late completion for a fetch that was already settled is ignored.

Aborted fetches are settled by the reaper (issue 13 item 1): ``abort`` queues a fetch that is
not terminal yet and wakes the reaper thread, which settles it as soon as its job ends (the job's
finish hook wakes it) or, at the latest, tears its link down once ``lease_s + grace_s`` have
passed since the abort — without any later fetch on this node. ``reap()`` may still be called
by hand (``start_fetch`` does); settling is idempotent.

Threading: public methods may be called from any thread; per-peer handles and the queue of
aborted fetches are guarded by ``self._lock``; each :class:`Fetch` settles once (its own lock).
The one thread of its own, ``peer-reaper``, is owned by the :class:`PeerClient`: started on the
first abort that has to wait, it ends when nothing is queued and is stopped by ``close``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from tierstore.errors import TierStoreError, TransferFailed
from tierstore.transfer.transport import JobState, Link, ReadJob, Slab, Transport, TransportUnavailable
from tierstore.transfer.session import ControlSession, PeerSettings
from tierstore.types import BlockStatus


def make_transports(slab: Slab, settings: PeerSettings, rdma_factory: Any = None
                    ) -> dict[str, Transport]:
    """The transports this node can use now, by name, in the order of ``settings.transports``."""
    out: dict[str, Transport] = {}
    for name in settings.transports:
        if name == "tcp":
            from tierstore.transfer.tcp import TcpTransport
            out[name] = TcpTransport(slab, settings.timeout_s, settings.streams,
                                     settings.verify_checksums)
        elif name == "loopback":
            from tierstore.transfer.loopback import LoopbackTransport
            out[name] = LoopbackTransport(slab, settings.timeout_s, settings.verify_checksums)
        elif name == "rdma" and rdma_factory is not None:
            t = rdma_factory(slab, settings)
            if t is not None:
                out[name] = t
    return out


@dataclass
class _Peer:
    session: ControlSession
    link: Link
    transport: Transport


class Fetch:
    """One pull of a key chain's hit prefix from one peer (see the module docstring)."""

    def __init__(self, client: "PeerClient", peer: _Peer, keys: Sequence[bytes], lease: dict,
                 local_job: Any, read_idx: list[int], job: ReadJob) -> None:
        self.client, self.peer, self.keys = client, peer, list(keys)
        self.lease, self.local_job, self.read_idx, self.job = lease, local_job, read_idx, job
        self.hit_blocks = lease["hit"]
        self.aborted_s: float | None = None
        self.settled: BlockStatus | None = None   # OK or FAILED once settled
        self.kept = 0                  # blocks published by a fetch that did not end DONE
        self.queued = False            # in the client's queue of aborted fetches
        self.hooked = False            # the job's finish wakes the client's reaper
        self._lock = threading.Lock()

    @property
    def state(self) -> JobState:
        return self.job.state

    def poll(self) -> JobState:
        return self.peer.transport.poll(self.job)

    def abort(self) -> None:
        """Cancel the transfer; local slots are freed once no byte can land in them."""
        if self.aborted_s is None:
            self.aborted_s = time.monotonic()
        self.peer.transport.cancel(self.job)

    def finish(self, timeout_s: float | None = None) -> int:
        """Wait for the job, publish or discard, release the peer's lease. Returns the number of
        leading keys resident locally from this fetch. Raises the job's error (the blocks that
        arrived whole before the failure are kept: :attr:`kept`)."""
        st = self.job.wait(self.client.settings.timeout_s * 2 if timeout_s is None else timeout_s)
        if not st.terminal:
            self.abort()
            st = self.job.wait(self.client.settings.timeout_s)
        if not st.terminal:
            self.client.abort(self)   # the reaper frees the slots after lease + grace
            return 0
        n = self.settle()
        if st is JobState.FAILED:
            raise self.job.error   # type: ignore[misc]
        if st is JobState.CANCELLED:
            raise TransferFailed(f"fetch from {self.peer.session.label} was cancelled")
        return n

    def _answers(self) -> list[bool]:
        """Per key of the local job: publish it? Every block read when DONE; when FAILED, the
        blocks that arrived whole (``blocks_ok``) before the first one that did not; none of
        a cancelled (aborted) fetch: its slots go back to the free pool (XFER-12). Never a
        block after the first key that was neither read whole nor already present (the chain
        is only useful as a prefix, and a key after a SKIPPED one was never read)."""
        oks = [False] * len(self.local_job.keys)
        if self.job.state not in (JobState.DONE, JobState.FAILED):
            return oks
        done = self.job.state is JobState.DONE
        read = {i: j for j, i in enumerate(self.read_idx)}
        for i, st in enumerate(self.local_job.status):
            if st is BlockStatus.OK:
                j = read.get(i)
                if j is None or not (done or self.job.blocks_ok[j]):
                    break
                oks[i] = True
            elif st is not BlockStatus.PRESENT:
                break
        return oks

    def settle(self, force: bool = False) -> int:
        """Publish what arrived whole and free the rest of the local slots, once. ``force``:
        the job is not terminal but its link was torn down (no write can land any more).
        Returns the number of leading keys now resident from this fetch (0 if settled
        already)."""
        with self._lock:
            if self.settled is not None:
                return 0   # late completion: ignored (no double free)
            st = self.job.state
            if not st.terminal and not force:
                return 0
            ok = st is JobState.DONE
            store = self.client.store
            oks = self._answers()
            sums = [0] * len(self.local_job.keys)
            for i in self.read_idx:
                if oks[i] and i < len(self.lease["checksums"]):
                    sums[i] = self.lease["checksums"][i]
            status = store.complete_store(self.local_job.job_id, ok=oks, checksums=sums)
            lead = 0
            for x in status:   # what the store kept (a closed store keeps nothing)
                if x not in (BlockStatus.OK, BlockStatus.PRESENT):
                    break
                lead += 1
            kept = [j for j, i in enumerate(self.read_idx) if oks[i]
                    and status[i] is BlockStatus.OK]
            self.kept = 0 if ok else len(kept)
            self.settled = BlockStatus.OK if ok else BlockStatus.FAILED
            c = self.client
            s = self.peer.session.stats
            s.read_jobs += 1
            s.read_done(len(kept), sum(self.job.sizes[j] for j in kept))
            if not ok:
                s.read_failures += 1
                if self.job.error is not None:
                    s.error(self.job.error)
                c.counters["fetch_blocks_kept"] += self.kept
            c.counters["fetch_ok" if ok else "fetch_failed"] += 1
        try:
            if not self.peer.session.closed:
                self.peer.session.release(self.lease["lease"])
        except TierStoreError:
            pass   # the peer releases everything of a dead session itself
        return lead


class PeerClient:
    """Pulls blocks from peers into ``store`` (a :class:`tierstore.store.Store`)."""

    def __init__(self, store: Any, secret: bytes, *, node: str = "client",
                 settings: PeerSettings | None = None, rdma_factory: Any = None,
                 lease_s: float = 2.0, grace_s: float = 1.0) -> None:
        self.store = store
        self.secret = secret
        self.node = node
        self.settings = settings or PeerSettings()
        self.slab = Slab.of_store(store)
        self.transports = make_transports(self.slab, self.settings, rdma_factory)
        self.lease_s, self.grace_s = lease_s, grace_s
        self.counters: dict[str, int] = {}
        from collections import Counter
        self.counters = Counter()
        self._peers: dict[tuple[str, int], _Peer] = {}
        self._aborted: list[Fetch] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._reaper: threading.Thread | None = None
        self._closing = False

    @property
    def offered(self) -> list[str]:
        return list(self.transports)

    def _peer(self, address: tuple[str, int]) -> _Peer:
        address = (address[0], int(address[1]))
        with self._lock:
            p = self._peers.get(address)
            if p is not None and not p.session.closed:
                return p
            offered = self.offered
            if "loopback" in offered:
                from tierstore.transfer import loopback
                if not loopback.available_for(address):
                    offered = [t for t in offered if t != "loopback"]
            if self.settings.require_rdma and "rdma" not in offered:
                raise TransportUnavailable(
                    f"require_rdma is set on {self.node}, but this node has no usable rdma "
                    f"transport (offers {offered}); refusing to fall back")
            sess = ControlSession(address, self.secret, self.node, self.settings, offered)
            try:
                tr = self.transports[sess.transport]
                link = tr.connect(sess)
            except BaseException:
                sess.close()
                raise
            if p is not None:
                p.link.close()
            p = _Peer(sess, link, tr)
            self._peers[address] = p
            return p

    def session(self, address: tuple[str, int]) -> ControlSession:
        return self._peer(address).session

    def lookup(self, address: tuple[str, int], keys: Sequence[bytes], namespace: Any) -> int:
        """Hit blocks of ``keys`` on the peer (one RPC, nothing pinned)."""
        return self._peer(address).session.lookup(keys, namespace)["hit"]

    def start_fetch(self, address: tuple[str, int], keys: Sequence[bytes], namespace: Any,
                    *, owner: str = "peer-fetch") -> Fetch | None:
        """Lease the peer's hit prefix, reserve local slots, start the read. None when the peer
        has nothing (or every block is already here)."""
        self.reap()
        p = self._peer(address)
        lease = p.session.lookup(keys, namespace, lease=True)
        hit = lease["hit"]
        sizes = lease["sizes"]
        if hit and sizes:   # one size per job: stop at the first block of another size
            k = next((i for i, n in enumerate(sizes) if n != sizes[0]), hit)
            hit = k
        if hit == 0:
            p.session.release(lease["lease"])
            return None
        lj = self.store.prepare_store(list(keys[:hit]), namespace, sizes[0], owner=owner)
        idx = []
        for i, st in enumerate(lj.status):
            if st is BlockStatus.OK:
                idx.append(i)
            elif st is BlockStatus.SKIPPED:
                break
        tr = p.transport
        sl = lease["checksums"] if lease["checksums"] else None
        job = tr.read_blocks(p.link, [lease["slots"][i] for i in idx],
                             [lj.slots[i] for i in idx], [sizes[i] for i in idx],
                             [sl[i] for i in idx] if sl else None)
        lease = dict(lease, hit=hit)
        return Fetch(self, p, keys, lease, lj, idx, job)

    def fetch(self, address: tuple[str, int], keys: Sequence[bytes], namespace: Any) -> int:
        """Pull the peer's hit prefix of ``keys``; returns how many blocks of ``keys`` are
        resident locally afterwards from this fetch. Raises TransferFailed on failure (and
        then nothing was published)."""
        f = self.start_fetch(address, keys, namespace)
        return 0 if f is None else f.finish()

    def abort(self, f: Fetch) -> None:
        """Cancel ``f``; its slots come back once no byte can land in them: at once when the
        job is terminal, else from the reaper thread (when the job ends, or after
        ``lease_s + grace_s`` with its link torn down). Idempotent."""
        f.abort()
        if f.job.state.terminal:
            f.settle()
            return
        self._queue([f])

    def _queue(self, fetches: Sequence[Fetch], wake: bool = True) -> None:
        """Put aborted fetches in the reaper's queue and make sure the reaper runs."""
        start = None
        hook = []
        with self._lock:
            for f in fetches:
                if not f.queued and f.settled is None:
                    f.queued = True
                    self._aborted.append(f)
                    if not f.hooked:
                        f.hooked = True
                        hook.append(f)
            if self._aborted and self._reaper is None and not self._closing:
                start = self._reaper = threading.Thread(target=self._reap_loop,
                                                        name="peer-reaper", daemon=True)
        for f in hook:
            f.job.add_on_finish(self._wake.set)
        if start is not None:
            start.start()
        elif wake:
            self._wake.set()

    def reap(self) -> int:
        """Free the slots of aborted fetches that became terminal, or whose lease + grace ran
        out (their link is torn down first). Returns how many were settled."""
        now = time.monotonic()
        done = 0
        with self._lock:
            pending, self._aborted = self._aborted, []
        keep = []
        for f in pending:
            f.queued = False
            if f.job.state.terminal:
                f.settle()
                done += 1
            elif now - (f.aborted_s or now) >= self.lease_s + self.grace_s:
                f.peer.link.close()            # ends every write into our slots
                f.peer.session.close()
                if f.job.state.terminal or getattr(f.peer.link, "quiescent", True):
                    f.settle(force=True)
                    done += 1
                else:
                    keep.append(f)
            else:
                keep.append(f)
        if keep:
            self._queue(keep, wake=False)
        return done

    def _reap_loop(self) -> None:
        """The ``peer-reaper`` thread: reap, then sleep until the next fetch's lease + grace
        runs out or a queued job ends; exit when nothing is queued."""
        while True:
            self._wake.clear()
            self.reap()
            with self._lock:
                if not self._aborted or self._closing:
                    self._reaper = None
                    return
                due = min((f.aborted_s or 0.0) for f in self._aborted) + self.lease_s + \
                    self.grace_s
            self._wake.wait(min(max(due - time.monotonic(), 0.05), 1.0))

    def pending_aborts(self) -> int:
        """Aborted fetches whose slots are still reserved."""
        with self._lock:
            return len(self._aborted)

    def ping(self, address: tuple[str, int]) -> float:
        return self._peer(address).session.ping()

    def stats(self) -> list[dict]:
        with self._lock:
            return [p.session.stats.as_dict() for p in self._peers.values()]

    def close(self) -> None:
        with self._lock:
            self._closing = True
            peers, self._peers = list(self._peers.values()), {}
            reaper = self._reaper
        self._wake.set()
        if reaper is not None:
            reaper.join(self.settings.timeout_s)
        for p in peers:
            p.link.close()
            p.session.close()
        with self._lock:   # every link is down: nothing lands in their slots any more
            pending, self._aborted = self._aborted, []
        for f in pending:
            if f.job.state.terminal or getattr(f.peer.link, "quiescent", True):
                f.settle(force=True)
        for t in self.transports.values():
            t.close()
