"""Adversarial review of the hybrid (several KV-cache groups) connector paths (issue 15 item 4).

Runs on the stand-in engine of tests/plugins/hybridvllm.py (no vLLM needed).
"""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "plugins"))
from hybridvllm import HybridVLLM  # noqa: E402
from test_connector_hybrid import GROUPS, SWA, baseline, prompt, store_p  # noqa: E402

from tierstore.errors import TierStoreError  # noqa: E402


class _StuckThenFails:
    """A copy engine whose copies never finish by poll and whose wait raises (a device error
    that surfaces only when the worker waits: sleep, a slab rebuild, a preemption, shutdown)."""

    def __init__(self, real):
        self.real = real

    def start(self, *a, **kw):
        return self.real.start(*a, **kw)

    def poll(self, cj):
        return False

    def wait(self, cj):
        try:
            self.real.wait(cj)
        finally:
            raise TierStoreError("copy failed on the device")

    def close(self):
        self.real.close()


@pytest.mark.parametrize("how", ["drain", "preempt"])
def test_hybrid_load_copy_failing_in_a_wait_is_a_failed_receive(tmp_path, how):
    """A hybrid load copy that fails when the worker *waits* for it (``_drain``: sleep mode,
    a slab rebuild after a daemon restart, shutdown; ``handle_preemptions``) goes through
    ``_copy_done(ok=False)`` only; ``_poll`` is the one path that calls ``_fail_hybrid``. The
    request is then reported in finished_recving but not in failed_recving, so vLLM takes the
    half-copied KV of the sliding-window group as loaded: wrong KV served without a miss. The
    invariant (worker_side.py docstring): any group's copy failing makes the whole load a
    failed receive."""
    P = prompt(21)
    store_p(tmp_path, P)
    e = HybridVLLM(tmp_path / "store", GROUPS)
    try:
        w = e.worker
        w._engines[SWA] = _StuckThenFails(w._engines[SWA])
        r = e.add("p2", P)
        ext, is_async = e.sched.get_num_new_matched_tokens(r, 0)
        assert (ext, is_async) == (112, True)
        # drive the engine until the worker holds the load's copies in flight
        for _ in range(500):
            e.step()
            time.sleep(0.002)
            if any(c.kind == "load" for c in w._copies.values()):
                break
        assert any(c.kind == "load" and c.req_id == "p2" for c in w._copies.values())
        if how == "drain":
            w._drain()
        else:
            from tierstore_plugins.vllm.metadata import TierStoreMetadata
            w.handle_preemptions(TierStoreMetadata(preempted=["p2"]))
        _, recving = w.get_finished(set())
        failed = w.take_failed_recving(recving)
        assert "p2" in (recving or set())
        assert failed == {"p2"}, "a failed copy reported as a successful receive"
    finally:
        e.close()


def test_max_block_bytes_covers_every_group_with_tensor_parallelism(tmp_path):
    """``Geometry.max_block_bytes`` (plugins/vllm/backend.py) is the embedded store's slot size.
    It takes the max over ``lane_namespace(i) for i in range(num_groups)``, but lanes are
    ``group * num_ranks + rank``: with TP = 2 lanes 0 and 1 are group 0's two ranks, and a
    later group with larger blocks is never looked at. The store then refuses every block of
    that group ("does not fit slots"), the scheduler's one ``prepare_stores`` call for the
    step raises, and no request saves anything (not even the groups that fit): every later
    lookup is a miss."""
    from hybridvllm import Group, geometry

    groups = [Group(1, window=32, name="swa"), Group(2, name="full")]   # group 1: 2x the bytes
    geo = geometry(groups, 16, tp=2)
    biggest = max(geo.lane_namespace(i).block_bytes for i in range(geo.num_lanes))
    assert geo.max_block_bytes == biggest

    P = prompt(22)
    e = HybridVLLM(tmp_path / "store", groups, tp=2)
    try:
        e.add("p", P)
        e.run()
        assert e.sched.counters.get("save_plan_errors", 0) == 0
        assert [b for b, _ in e.sched.group_saved] != [0, 0], "nothing was saved"
    finally:
        e.close()


def test_sliding_window_blocks_are_not_orphans_under_the_default_policy(tmp_path):
    """A sliding-window group stores only the windows before its resume points (blocks 5, 6, 7
    of an 8-block prompt), but its save names ``keys[keep[0] - 1]`` (block 4 of that lane,
    never stored) as the parent of the window's first block. Under prefix-aware eviction (the
    default, prefix-lhd: "orphans go before everything") every window is then an orphan
    subtree and the first thing evicted: with two prompts stored, making room for 6 blocks
    takes exactly the 6 window blocks of both (the most recent prompt's too) and keeps all
    32 full-attention blocks, which no hit can use without their windows: P's hit drops
    from 112 tokens to 0."""
    from test_connector_hybrid import keys_of
    from tierstore.types import Tier

    P, Q = prompt(41), prompt(42)
    e = HybridVLLM(tmp_path / "s", GROUPS, nvme_bytes=0)
    try:
        e.add("q", Q)
        e.run()
        e.add("p", P)
        e.run()
        s = e.client.store
        pol = s.policies[Tier.DRAM]
        swa = keys_of(e, P, SWA)
        assert [i for i, k in enumerate(swa) if k in getattr(pol, "_orphans", {})] == []
        s.mover.make_room(Tier.DRAM, 6)
        r = e.add("p2", P)
        e.run()
        assert r.hits == [112]
    finally:
        e.close()
