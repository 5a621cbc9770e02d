"""The verbs seam (tierstore/transfer/verbs.py) on a real device: what the fake cannot prove.

Runs where ``TIERSTORE_RDMA_DEVICE`` names a device (the Soft-RoCE guest). Two RC QPs on the
same device, connected to each other (rxe loops back in the kernel):

- a chained post of 128 READs lands byte-exact (pyverbs links a chain by bare C pointers; a
  chain whose WRs were garbage-collected before post_send failed here with ENOMEM);
- posting more WRs than the send queue holds raises PostFailed naming how many got on the QP,
  and exactly that many completions come back;
- moving the QP to ERR flushes what is still queued (WR_FLUSH_ERR), nothing else arrives.
"""

from __future__ import annotations

import mmap
import os
import time

import pytest

from tierstore.transfer import verbs as V
from tierstore.transfer.rdma import buffer_address

DEVICE = os.environ.get("TIERSTORE_RDMA_DEVICE", "")
pytestmark = pytest.mark.skipif(not DEVICE, reason="TIERSTORE_RDMA_DEVICE is not set "
                                "(runs in the Soft-RoCE guest, tools/softroce)")
BLOCK = 4096


@pytest.fixture
def pair():
    dev = V.open_device(DEVICE)
    n = 512
    src_mm, dst_mm = mmap.mmap(-1, n * BLOCK), mmap.mmap(-1, n * BLOCK)
    src_mm.write(os.urandom(n * BLOCK))
    src, dst = buffer_address(memoryview(src_mm)), buffer_address(memoryview(dst_mm))
    rmr = dev.reg_mr(src, n * BLOCK, V.ACCESS_LOCAL_WRITE | V.ACCESS_REMOTE_READ)
    lmr = dev.reg_mr(dst, n * BLOCK, V.ACCESS_LOCAL_WRITE)
    cq_a, cq_b = dev.create_cq(1024), dev.create_cq(16)
    qa, qb = dev.create_qp(cq_a, 128), dev.create_qp(cq_b, 16)
    me = {"gid": dev.gid, "lid": dev.lid, "mtu": dev.mtu}
    qa.connect(dict(me, qpn=qb.qpn, psn=qb.psn))
    qb.connect(dict(me, qpn=qa.qpn, psn=qa.psn))

    def wrs(ids):
        return [(i, dst + i * BLOCK, BLOCK, lmr.lkey, src + i * BLOCK, rmr.rkey) for i in ids]

    yield dict(qa=qa, cq=cq_a, wrs=wrs, src=src_mm, dst=dst_mm)
    for o in (qa, qb, lmr, rmr, cq_a, cq_b):
        o.close()
    dev.close()


def _drain(cq, want: int, timeout_s: float = 20.0):
    out = []
    end = time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < end:
        out += cq.poll(64)
    time.sleep(0.2)
    out += cq.poll(64)   # nothing more may arrive
    return out


def test_chained_post_of_128_reads_is_byte_exact(pair):
    pair["qa"].post_reads(pair["wrs"](range(128)))
    comps = _drain(pair["cq"], 128)
    assert sorted(comps) == [(i, V.WC_SUCCESS) for i in range(128)]
    assert pair["dst"][:128 * BLOCK] == pair["src"][:128 * BLOCK]


def test_overfull_post_reports_how_many_reached_the_qp(pair):
    with pytest.raises(V.PostFailed) as ei:
        pair["qa"].post_reads(pair["wrs"](range(400)))
    posted = ei.value.posted
    assert 128 <= posted < 400, posted
    comps = _drain(pair["cq"], posted)
    assert sorted(i for i, _ in comps) == list(range(posted))
    assert all(st == V.WC_SUCCESS for _, st in comps)


def test_qp_to_error_flushes_what_is_queued(pair):
    qa = pair["qa"]
    qa.to_error()
    qa.post_reads(pair["wrs"](range(8)))   # posted to a QP in ERR: flushed, never executed
    comps = _drain(pair["cq"], 8)
    assert sorted(comps) == [(i, V.WC_WR_FLUSH_ERR) for i in range(8)]
    assert pair["dst"][:8 * BLOCK] == bytes(8 * BLOCK)
