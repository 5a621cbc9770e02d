"""Contract suite: every transport (loopback, TCP on 127.0.0.1, RDMA over fakeverbs) keeps the
job contract of tierstore/transfer/transport.py."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from transfer_support import NS, SLOT, SlowHooks, chain, payload  # noqa: E402

from tierstore.errors import ChecksumFailed, TransferFailed
from tierstore.transfer import JobState, OutOfRange
from tierstore.transfer.peer_server import ServeHooks


def _store(p, keys):
    p.a.put(keys, NS, payload(keys))


def test_fetch_is_byte_exact_and_releases_pins(pair_factory, transport):
    """B pulls 40 blocks A holds; bytes equal, A's pins all released, transport in stats."""
    p = pair_factory(transport)
    keys = chain(40)
    _store(p, keys)
    assert p.client.lookup(p.addr, keys, NS) == 40
    assert p.client.fetch(p.addr, keys, NS) == 40
    assert p.b.get(keys) == payload(keys)
    assert p.a.stats()["pins"] == 0
    (st,) = p.client.stats()
    assert st["transport"] == transport and st["blocks_read"] == 40
    assert st["bytes_read"] == 40 * SLOT
    assert p.a.check() == [] and p.b.check() == []


def test_partial_hit_fetches_exact_prefix(pair_factory, transport):
    p = pair_factory(transport)
    keys = chain(10)
    _store(p, keys[:6])
    assert p.client.fetch(p.addr, keys, NS) == 6
    assert p.b.lookup(keys, NS).num_blocks == 6


def test_miss_and_empty_read(pair_factory, transport):
    p = pair_factory(transport)
    assert p.client.fetch(p.addr, chain(3, seed=999), NS) == 0
    peer = p.client._peer(p.addr)
    job = peer.transport.read_blocks(peer.link, [], [], [])
    assert job.wait(1) is JobState.DONE


def test_unleased_or_out_of_range_slot_fails_job_server_stays_up(pair_factory, transport):
    p = pair_factory(transport)
    keys = chain(4)
    _store(p, keys)
    peer = p.client._peer(p.addr)
    job = peer.transport.read_blocks(peer.link, [10 ** 6], [0], [SLOT])
    assert job.wait(2) is JobState.FAILED
    assert isinstance(job.error, TransferFailed) or isinstance(job.error, OutOfRange)
    assert job.blocks_ok == bytearray(1)
    with pytest.raises(OutOfRange):   # local bounds are checked before anything moves
        peer.transport.read_blocks(peer.link, [0], [10 ** 6], [SLOT])
    assert p.client.fetch(p.addr, keys, NS) == 4   # same server still serves
    assert p.b.get(keys) == payload(keys)


def test_checksum_mismatch_fails_and_keeps_only_the_verified_blocks_before_it(pair_factory,
                                                                             transport):
    """Block 1's recorded checksum disagrees with its bytes: the fetch fails with
    ChecksumFailed, block 0 (verified, before the failure) is kept, block 1 and everything
    after it are freed (issue 13 item 2: never a block that failed, never one after it)."""
    p = pair_factory(transport, verify=True)
    keys = chain(3)
    good = payload(keys)
    import xxhash
    job = p.a.prepare_store(keys, NS, SLOT)
    for s, b in zip(job.slots, good):
        p.a.slot_view(s)[:SLOT] = b
    sums = [xxhash.xxh3_64_intdigest(b) for b in good]
    sums[1] ^= 1   # recorded checksum disagrees with the bytes
    p.a.complete_store(job.job_id, ok=True, checksums=sums)
    with pytest.raises(ChecksumFailed):
        p.client.fetch(p.addr, keys, NS)
    assert p.b.lookup(keys, NS).num_blocks == 1
    assert p.b.get(keys) == good[:1]
    assert p.b.stats()["tiers"][0]["used_slots"] == 1
    assert p.b.check() == []


def _until(pred, timeout_s: float = 10.0) -> None:
    """Wait for an event the test can observe (never a fixed sleep standing in for it)."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out waiting for the event"
        time.sleep(0.002)


def _reading(hooks, transport):
    """True once the read is in flight: A has started sending a block (TCP), or B's reads sit
    posted on a QP of the paused fabric (RDMA: the fake fabric's send queues; on real verbs,
    conftest's gate, whose QPs hold the posted reads while paused)."""
    if transport == "rdma":
        from tierstore.transfer.fakeverbs import FABRIC

        def posted() -> bool:
            qps = FABRIC.qps.values() if isinstance(FABRIC.qps, dict) else FABRIC.qps
            return any(getattr(qp, "sq", None) or getattr(qp, "held", None) for qp in list(qps))
        return posted
    return lambda: hooks.sent > 0


def _slow(p, transport):
    """Make A's data path stall: TCP/loopback by a hook, RDMA by pausing the fake fabric."""
    if transport == "rdma":
        from tierstore.transfer.fakeverbs import FABRIC
        FABRIC.pause()
        return FABRIC.resume
    return lambda: None


@pytest.mark.parametrize("transport", ["tcp", "rdma"])
def test_cancel_mid_read_frees_slots_only_when_quiescent(pair_factory, transport):
    hooks = SlowHooks(delay_s=0.02)
    p = pair_factory(transport, hooks=hooks)
    keys = chain(30)
    _store(p, keys)
    undo = _slow(p, transport)
    try:
        f = p.client.start_fetch(p.addr, keys, NS)
        _until(_reading(hooks, transport))
        used = p.b.stats()["tiers"][0]["used_slots"]
        assert used == 30   # reserved, invisible
        assert p.b.lookup(keys, NS).num_blocks == 0
        p.client.abort(f)
    finally:
        undo()
    assert f.job.wait(2).terminal
    assert f.job.state is JobState.CANCELLED
    p.client.reap()
    assert p.b.stats()["tiers"][0]["used_slots"] == 0
    assert p.b.lookup(keys, NS).num_blocks == 0
    assert f.settle() == 0   # a late completion is ignored: no double free
    assert p.b.check() == []


@pytest.mark.parametrize("transport", ["tcp", "rdma"])
def test_peer_gone_mid_read_fails_within_timeout(pair_factory, transport):
    timeout = 0.5
    hooks = SlowHooks(delay_s=0.01)
    p = pair_factory(transport, hooks=hooks, timeout_s=timeout)
    keys = chain(40)
    _store(p, keys)
    undo = _slow(p, transport)
    try:
        f = p.client.start_fetch(p.addr, keys, NS)
        _until(_reading(hooks, transport))
        t0 = time.monotonic()
        p.server.stop()   # A goes away mid-read (data sockets shut, RDMA QP to error)
        if transport == "rdma":
            undo()
        st = f.job.wait(2 * timeout + 1)
        elapsed = time.monotonic() - t0
    finally:
        undo()
    assert st is JobState.FAILED and elapsed < 2 * timeout
    with pytest.raises(TransferFailed):
        f.finish()
    # what arrived whole before the failure is kept, byte-exact; nothing else (item 2)
    n = p.b.lookup(keys, NS).num_blocks
    assert n == f.kept < len(keys)
    assert p.b.get(keys) == payload(keys)[:n]
    assert p.b.stats()["tiers"][0]["used_slots"] == n
    assert p.b.check() == []


class _Tamper(ServeHooks):
    """Overwrites the first bytes of every slot it serves, after the lease (adversarial case)."""

    def __init__(self, store):
        self.store = store

    def before_block(self, sess, index, slot):
        self.store.slot_view(slot)[:4] = b"EVIL"


def test_dram_only_blocks_are_verified_too(pair_factory):
    """A block that only ever lived in the serving node's DRAM has no recorded checksum; the
    lease computes one, so a block whose bytes change in transit fails its check and nothing is
    published (adversarial finding: verify_checksums did nothing for DRAM-only blocks)."""
    p = pair_factory("tcp", verify=True)
    p.server.hooks = _Tamper(p.a)
    keys = chain(3)
    p.a.put(keys, NS, payload(keys))
    assert p.a.checksums(keys) == [0, 0, 0]        # never written to NVMe: not computed yet
    with pytest.raises(ChecksumFailed):
        p.client.fetch(p.addr, keys, NS)
    assert p.b.lookup(keys, NS).num_blocks == 0
