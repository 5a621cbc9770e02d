"""Two nodes, one real RDMA device (rxe0 in the Soft-RoCE guest): block fetch over one-sided
RDMA READ, and the two ways a transfer dies mid-flight.

Runs only where ``TIERSTORE_RDMA_DEVICE`` names a device (tools/softroce/guest/run.sh sets it);
node A lives in its own process (guest/nodes.py), node B is this process.

- B reads 1,000 blocks from A byte-exact, over rdma (require_rdma: no fallback).
- B's QP is moved to the error state after some blocks landed: the job fails, only the blocks
  whose READ completed before the first one that did not are published (issue 13 item 2),
  every other reserved slot is freed; the next fetch reconnects and succeeds.
- A is SIGKILLed after some blocks landed (its QP and MRs die with it): the job fails within
  the timeout, only whole blocks before the failure are published, other slots are freed.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import nodes  # noqa: E402

from tierstore.errors import TransferFailed
from tierstore.transfer import JobState

DEVICE = os.environ.get("TIERSTORE_RDMA_DEVICE", "")
N = 1000
SLOT = 32768
TIMEOUT_S = 3.0

pytestmark = pytest.mark.skipif(not DEVICE, reason="TIERSTORE_RDMA_DEVICE is not set "
                                "(runs in the Soft-RoCE guest, tools/softroce)")


@pytest.fixture(scope="module")
def shared_a():
    """One node A for the tests that leave it alive (starting one costs seconds under TCG)."""
    a = nodes.NodeA(DEVICE, N, SLOT, timeout_s=TIMEOUT_S)
    yield a
    a.stop()


@pytest.fixture
def node_b():
    b_store, b = nodes.client(DEVICE, N, SLOT, timeout_s=TIMEOUT_S)
    yield b_store, b
    b.close()
    b_store.close()


@pytest.fixture
def two_nodes(shared_a, node_b):
    return (shared_a,) + node_b


@pytest.fixture
def own_a_two_nodes(node_b):
    a = nodes.NodeA(DEVICE, N, SLOT, timeout_s=TIMEOUT_S)
    yield (a,) + node_b
    a.stop()


def _expected(keys):
    return [nodes.block(k, i, SLOT) for i, k in enumerate(keys)]


def _only_whole_blocks_published(store, keys, f, done):
    """Issue 13 item 2: a failed job publishes the blocks whose READ completed (in order, on an
    RC queue pair) before the first that did not — byte-exact — and frees every other slot."""
    n = store.lookup(keys, nodes.NS).num_blocks
    assert n == f.kept and 0 < n <= done, (n, f.kept, done)
    assert store.get(keys[:n]) == _expected(keys)[:n]
    assert store.stats()["tiers"][0]["used_slots"] == n
    assert store.check() == []


def test_b_reads_1000_blocks_from_a_byte_exact(two_nodes):
    a, store, b = two_nodes
    keys = nodes.keys_for(N)
    t0 = time.monotonic()
    assert b.fetch(a.address, keys, nodes.NS) == N
    dt = time.monotonic() - t0
    got = store.get(keys)
    exp = _expected(keys)
    bad = [i for i in range(N) if got[i] != exp[i]]
    assert not bad, f"{len(bad)} blocks differ, first {bad[:5]}"
    (st,) = b.stats()
    assert st["transport"] == "rdma" and st["blocks_read"] == N
    assert st["bytes_read"] == N * SLOT
    print(f"\n1000 x {SLOT} B over rxe RDMA READ: {dt:.2f} s "
          f"({N * SLOT / dt / 2**20:.1f} MiB/s)")


def test_qp_moved_to_error_mid_transfer_fails_the_job_and_keeps_only_whole_blocks(two_nodes):
    a, store, b = two_nodes
    keys = nodes.keys_for(N)
    f = b.start_fetch(a.address, keys, nodes.NS)
    landed = nodes.wait_for_blocks(f.job, 1)
    f.peer.link.qp.to_error()                    # the QP, not the transport, goes to ERR
    st = f.job.wait(3 * TIMEOUT_S)
    done = sum(f.job.blocks_ok)
    print(f"\nQP to ERR after {landed} blocks; {done}/{N} had completed; state {st}")
    assert st is JobState.FAILED, (st, done)
    assert 0 < done < N
    with pytest.raises(TransferFailed):
        f.finish()
    _only_whole_blocks_published(store, keys, f, done)
    # the link is broken; the next fetch reconnects (new QP pair) and succeeds
    assert b.fetch(a.address, keys, nodes.NS) == N
    assert store.get(keys[:3] + keys[-3:]) == _expected(keys)[:3] + _expected(keys)[-3:]


def test_peer_gone_mid_transfer_fails_within_timeout_and_keeps_only_whole_blocks(
        own_a_two_nodes):
    a, store, b = own_a_two_nodes
    keys = nodes.keys_for(N)
    f = b.start_fetch(a.address, keys, nodes.NS)
    landed = nodes.wait_for_blocks(f.job, 1)
    t0 = time.monotonic()
    a.kill()                                     # SIGKILL: its QP and MRs go with it
    st = f.job.wait(3 * TIMEOUT_S)
    elapsed = time.monotonic() - t0
    done = sum(f.job.blocks_ok)
    print(f"\nA killed after {landed} blocks; {done}/{N} had completed; {st} after "
          f"{elapsed:.2f} s: {f.job.error}")
    assert st is JobState.FAILED, (st, done)
    assert done < N
    assert elapsed < 2 * TIMEOUT_S
    with pytest.raises(TransferFailed):
        f.finish()
    _only_whole_blocks_published(store, keys, f, done)
