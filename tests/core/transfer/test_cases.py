"""Field cases of shared/cases/public-bugs.md that the peer transfer layer owns."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from transfer_support import NS, SLOT, SECRET, SlowHooks, chain, payload  # noqa: E402

from tierstore.config import DramConfig, NvmeConfig, StoreConfig
from tierstore.errors import TransferFailed
from tierstore.store import Store
from tierstore.tiers.slot_tier import DiskResult
from tierstore.transfer import JobState, PeerClient, PeerServer, PeerSettings, TransportUnavailable
from tierstore.transfer.peer_server import ServeHooks
from tierstore.types import BlockStatus, Tier


def _used(store) -> int:
    return store.stats()["tiers"][0]["used_slots"]


class _HangingTransport:
    """A fake data channel whose reads never report (a peer P that died silently): the job
    stays in flight until its link is torn down."""

    name = "tcp"

    def __init__(self, real) -> None:
        self.real, self.jobs = real, []

    def __getattr__(self, k):
        return getattr(self.real, k)

    def read_blocks(self, link, remote_slots, local_slots, sizes, checksums=None):
        from tierstore.transfer.transport import ReadJob
        job = ReadJob("P", remote_slots, local_slots, sizes, num_parts=1)
        self.jobs.append(job)
        return job

    def cancel(self, job):
        job.request_cancel()   # no confirmation: bytes could still be in flight


def test_xfer12_aborted_fetch_slots_return_after_lease_grace_not_before(pair_factory):
    """XFER-12: decode reserves 8 blocks for R awaiting peer P (lease 0.2 s + grace 0.1 s, the
    case's 2 s scaled). Abort R; P never reports. The 8 slots stay reserved until lease + grace
    (no in-flight write can land in a reused block), then return; a late "done" is ignored.
    100 requests; free count back at baseline."""
    p = pair_factory("tcp", blocks=1024)
    base = _used(p.b)
    peer = p.client._peer(p.addr)
    hang = _HangingTransport(peer.transport)
    peer.transport = hang
    fetches = []
    for r in range(100):
        keys = chain(8, seed=10_000 + r * 1000)
        p.a.put(keys, NS, payload(keys))
        f = p.client.start_fetch(p.addr, keys, NS, owner=f"req-{r}")
        assert f is not None and f.job.state is JobState.RUNNING
        fetches.append(f)
    for f in fetches:   # R aborted; P never reports
        p.client.abort(f)
    assert _used(p.b) == base + 800            # aborted but not quiescent: still reserved
    p.client.reap()
    assert _used(p.b) == base + 800            # not before lease + grace
    time.sleep(p.client.lease_s + p.client.grace_s + 0.05)
    p.client.reap()   # the reaper thread did it already (item 1); by hand changes nothing
    assert _used(p.b) == base                  # all 800 back
    for f in fetches:                          # P comes back and sends a late "done"
        f.job.part_done(None)
        assert f.settle() == 0                 # ignored: no double free, no crash
    assert _used(p.b) == base and p.b.check() == []
    for f in fetches:
        assert p.b.lookup(f.keys, NS).num_blocks == 0


def test_xfer14_peer_eio_on_block_2_gives_exact_prefix(tmp_path):
    """XFER-14 (peer part): A's NVMe holds blocks 0-3 of P (DRAM empty), the read of block 2
    fails with EIO. B's fetch stages A's NVMe blocks through A's DRAM, gets blocks 0-1
    byte-exact (32 tokens), A counts the failed read, nothing hangs; the engine recomputes
    from block 2."""
    cfg = StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=8),
                      nvme=NvmeConfig(path=str(tmp_path / "nv"), capacity_blocks=32,
                                      direct_io="off"))
    a = Store.open(cfg)
    b = Store.open(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=16)))
    keys = chain(4)
    a.put(keys, NS, payload(keys))
    assert a.flush(timeout_s=20)
    assert a.evict(keys, tier=Tier.DRAM) == {"evicted": 4}   # drop the DRAM copies: NVMe only
    real = a.tiers[Tier.NVME].read_batch
    a.tiers[Tier.NVME].read_batch = lambda items: [
        DiskResult(False, error="eio") if it.key == keys[2] else r
        for it, r in zip(items, real(items))]
    srv = PeerServer(a, SECRET, node="A", settings=PeerSettings(transports=("tcp",)))
    srv.start()
    c = PeerClient(b, SECRET, node="B", settings=PeerSettings(transports=("tcp",)))
    try:
        t0 = time.monotonic()
        n = c.fetch(srv.address, keys, NS)
        assert time.monotonic() - t0 < 2
        assert n == 2 and b.lookup(keys, NS).hit_tokens == 32
        assert b.get(keys) == payload(keys)[:2]
        assert a.counters["nvme_read_errors"] == 1
        assert a.stats()["pins"] == 0
    finally:
        c.close()
        srv.stop()
        a.close()
        b.close()


def test_xfer15_negotiation_fallback_require_rdma_and_midstream_close(pair_factory):
    """XFER-15: A offers {rdma, tcp}, B offers {tcp}: B reads a 4-block object from A and A
    reads one from B, both over TCP, byte-exact, transport visible per peer. With
    require_rdma on A both directions fail fast with an explicit error. Then A closes the TCP
    stream halfway through a read: error within 2x the timeout, no partial block valid (the
    whole blocks before the close are kept, byte-exact)."""
    timeout = 2.0   # generous for a loaded 2-core CI box; the bounds below are relative to it
    p = pair_factory("tcp", server_transports=("rdma", "tcp"), client_transports=("tcp",),
                     timeout_s=timeout)
    ka, kb = chain(4), chain(4, seed=5000)
    p.a.put(ka, NS, payload(ka))
    p.b.put(kb, NS, payload(kb))
    assert "rdma" in p.server.transports
    assert p.client.fetch(p.addr, ka, NS) == 4 and p.b.get(ka) == payload(ka)
    assert p.client.stats()[0]["transport"] == "tcp"
    assert p.server.stats()["sessions"][0]["transport"] == "tcp"
    # A reads from B: B serves {tcp}, A's client offers {rdma, tcp}
    from tierstore.transfer.fakeverbs import FakeDevice
    from tierstore.transfer.rdma import factory
    srv_b = PeerServer(p.b, SECRET, node="B", settings=PeerSettings(transports=("tcp",)))
    srv_b.start()
    st_a = PeerSettings(transports=("rdma", "tcp"), timeout_s=timeout)
    cl_a = PeerClient(p.a, SECRET, node="A", settings=st_a, rdma_factory=factory(FakeDevice()))
    try:
        assert cl_a.fetch(srv_b.address, kb, NS) == 4 and p.a.get(kb) == payload(kb)
        assert cl_a.stats()[0]["transport"] == "tcp"
        # require_rdma on A: both directions refuse, fast, explicitly
        p.server.settings = PeerSettings(transports=("rdma", "tcp"), require_rdma=True)
        p.client.close()
        t0 = time.monotonic()
        with pytest.raises(TransportUnavailable, match="require_rdma"):
            p.client.fetch(p.addr, ka, NS)
        cl_req = PeerClient(p.a, SECRET, node="A", rdma_factory=factory(FakeDevice()),
                            settings=PeerSettings(transports=("rdma", "tcp"), require_rdma=True))
        with pytest.raises(TransportUnavailable, match="require_rdma"):
            cl_req.fetch(srv_b.address, kb, NS)
        cl_req.close()
        assert time.monotonic() - t0 < timeout
    finally:
        cl_a.close()
        srv_b.stop()
    # mid-stream close by the serving side
    p.server.settings = PeerSettings(transports=("tcp",), timeout_s=timeout)
    p.server.hooks = SlowHooks(close_after=5)
    kc = chain(12, seed=9000)
    p.a.put(kc, NS, payload(kc))
    before = _used(p.b)
    t0 = time.monotonic()
    with pytest.raises(TransferFailed):
        p.client.fetch(p.addr, kc, NS)
    assert time.monotonic() - t0 < 2 * timeout
    # no partial block valid: what is visible arrived whole before the close (issue 13 item 2)
    n = p.b.lookup(kc, NS).num_blocks
    assert n <= 5 and _used(p.b) == before + n
    assert p.b.get(kc) == payload(kc)[:n]
    assert p.client.stats()[0]["read_failures"] == 1


@pytest.mark.parametrize("fail", [False, True])
def test_race16_nothing_persisted_before_transfer_completes(pair_factory, fail):
    """RACE-16: R's first 4 blocks arrive from the prefill node over ~200 ms; the connector
    asks to save R's blocks at t=0. Nothing is visible or persisted before the transfer
    completes; afterwards the stored bytes equal the transferred bytes (checksum) and R' with
    the same 64-token prefix hits 64 tokens. Variant: the transfer fails -> nothing that did not
    arrive whole is persisted; R' hits exactly the blocks that did, before the failure (issue 13
    item 2 keeps those: confirmed, verified bytes), here at most block 0."""
    import xxhash
    hooks = SlowHooks(delay_s=0.1, close_after=2 if fail else None)   # 2 streams x 2 blocks: ~200 ms
    p = pair_factory("tcp", hooks=hooks, verify=True)
    keys = chain(4)
    data = payload(keys)
    job = p.a.prepare_store(keys, NS, SLOT)
    for s, b in zip(job.slots, data):
        p.a.slot_view(s)[:SLOT] = b
    p.a.complete_store(job.job_id, checksums=[xxhash.xxh3_64_intdigest(b) for b in data])
    f = p.client.start_fetch(p.addr, keys, NS, owner="R")
    # t=0: the connector saves R's blocks -> they are already pending: nothing written now
    save = p.b.prepare_store(keys, NS, SLOT, owner="connector")
    assert all(s is BlockStatus.PRESENT for s in save.status)
    p.b.complete_store(save.job_id, ok=True)
    assert p.b.lookup(keys, NS).num_blocks == 0     # not valid before completion
    if fail:
        with pytest.raises(TransferFailed):
            f.finish()
        assert f.kept <= 1                          # block 1 was never sent whole
        assert p.b.lookup(keys, NS).hit_tokens == 16 * f.kept
        assert p.b.get(keys) == data[:f.kept]
        assert _used(p.b) == f.kept and p.b.check() == []
        return
    assert f.finish() == 4
    assert f.job.elapsed_s >= 0.15
    assert p.b.lookup(keys, NS).hit_tokens == 64
    got = p.b.get(keys)
    assert got == data
    for b in p.b.blocks():
        k = bytes.fromhex(b["key"])
        assert int(b["checksum"], 16) == xxhash.xxh3_64_intdigest(data[keys.index(k)])


def test_issue13_item1_aborted_fetch_slots_return_with_no_later_traffic(pair_factory):
    """Issue 13 item 1 (XFER-12): B aborts two fetches of 8 blocks each from a peer that never
    reports (its data channel hangs), and then does nothing: no later fetch, nobody calls
    ``reap()``. The 16 reserved slots stay reserved until lease + grace, then come back on
    their own (the client's reaper thread), and the reaper ends once nothing is queued. A third
    aborted fetch whose job ends late (the peer finally answers) gets its slots back as soon as
    the job is terminal, before lease + grace."""
    p = pair_factory("tcp", blocks=256)
    base = _used(p.b)
    peer = p.client._peer(p.addr)
    hang = _HangingTransport(peer.transport)
    peer.transport = hang
    keys = [chain(8, seed=50_000 + r * 1000) for r in range(3)]
    for k in keys:
        p.a.put(k, NS, payload(k))
    fs = [p.client.start_fetch(p.addr, k, NS, owner=f"req-{i}") for i, k in enumerate(keys[:2])]
    t_abort = time.monotonic()
    for f in fs:
        p.client.abort(f)
    assert _used(p.b) == base + 16 and p.client.pending_aborts() == 2
    time.sleep(p.client.lease_s / 2)
    assert _used(p.b) == base + 16                # not before lease + grace
    deadline = t_abort + p.client.lease_s + p.client.grace_s + 2.0
    while _used(p.b) != base and time.monotonic() < deadline:
        time.sleep(0.02)
    took = time.monotonic() - t_abort
    assert _used(p.b) == base, "aborted fetches kept their slots with no later traffic"
    assert took >= p.client.lease_s + p.client.grace_s
    assert p.client.pending_aborts() == 0 and p.b.check() == []
    deadline = time.monotonic() + 2
    while p.client._reaper is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.client._reaper is None                # the reaper ended: nothing queued
    # a job that ends after the abort: freed when it ends, not at lease + grace
    p.client.lease_s = 30.0
    peer = p.client._peer(p.addr)                  # a new session: the old one was torn down
    peer.transport = _HangingTransport(peer.transport)
    f = p.client.start_fetch(p.addr, keys[2], NS, owner="req-late")
    p.client.abort(f)
    assert _used(p.b) == base + 8
    t0 = time.monotonic()
    f.job.part_done(None)                          # the peer's (cancelled) read ends now
    while _used(p.b) != base and time.monotonic() - t0 < 2:
        time.sleep(0.01)
    assert _used(p.b) == base and time.monotonic() - t0 < 1.0
    assert p.b.lookup(keys[2], NS).num_blocks == 0  # an aborted fetch publishes nothing
    print(f"\n16 aborted slots back {took:.2f} s after the abort (lease 0.2 + grace 0.1 s, no "
          f"traffic); a late-ending job's 8 in {time.monotonic() - t0:.3f} s")


class _FailAtBlock(ServeHooks):
    """Serves blocks until it reaches remote slot ``slot``, then drops that data stream (a
    read error on the serving side)."""

    def __init__(self, slot: int) -> None:
        self.slot = slot

    def before_block(self, sess, index, slot):
        if slot == self.slot:
            raise OSError("read error on the serving side (test)")


@pytest.mark.parametrize("streams", [1, 2])
def test_issue13_item2_fetch_failing_at_block_2_keeps_blocks_0_and_1(pair_factory, streams):
    """Issue 13 item 2 (XFER-14, peer part): B fetches 4 blocks from A; A's read of block 2
    (the third) fails mid-transfer. B keeps blocks 0 and 1 — whole, verified, byte-exact —
    so a lookup hits 32 tokens, not 0; block 2 and block 3 are not published and their slots
    are free; the failure is counted. Both with one TCP stream and with two (where block 2
    starts the second stream's part: the first part is let finish)."""
    p = pair_factory("tcp", verify=True)
    p.client.settings = PeerSettings(transports=("tcp",), timeout_s=2.0, streams=streams,
                                     verify_checksums=True)
    from tierstore.transfer.tcp import TcpTransport
    p.client.transports["tcp"] = TcpTransport(p.client.slab, 2.0, streams, True)
    keys = chain(4)
    p.a.put(keys, NS, payload(keys))
    lease = p.a.prepare_load(keys[2:3])
    slot2 = lease.slots[0]
    p.a.complete_load(lease.job_id)
    p.server.hooks = _FailAtBlock(slot2)
    t0 = time.monotonic()
    with pytest.raises(TransferFailed):
        p.client.fetch(p.addr, keys, NS)
    assert time.monotonic() - t0 < 2 * 2.0
    assert p.b.lookup(keys, NS).hit_tokens == 32
    assert p.b.get(keys) == payload(keys)[:2]
    assert _used(p.b) == 2 and p.b.check() == []
    assert p.client.counters["fetch_failed"] == 1 and p.client.counters["fetch_blocks_kept"] == 2
    (st,) = p.client.stats()
    assert st["read_failures"] == 1 and st["blocks_read"] == 2
    assert p.a.stats()["pins"] == 0
