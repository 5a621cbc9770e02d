"""tierstore.sim.sweep: Belady and infinite references on hand-checked traces; sweep progress."""

from __future__ import annotations

import pytest

from tierstore.errors import ConfigError
from tierstore.sim.replay import ReplayOptions, TraceRequest
from tierstore.sim.sweep import belady, infinite, sweep


def reqs(*ids_lists):
    return [TraceRequest(i, 512 * len(ids), 1, tuple(ids)) for i, ids in enumerate(ids_lists)]


def test_belady_keeps_the_block_used_again_soonest():
    """cap 1: [1] [2] [1]. LRU would miss all three; Belady drops 2 (never used again) right
    after inserting it, so the third request hits."""
    r = reqs([1], [2], [1])
    assert belady(r, 1)["block_hit_ratio"] == pytest.approx(1 / 3, abs=1e-6)
    assert infinite(r)["block_hit_ratio"] == pytest.approx(1 / 3, abs=1e-6)


def test_prefix_semantics_a_hit_stops_at_the_first_miss():
    """[1,2,3] then [1,9,3]: block 3 is cached but after the miss on 9, so it is no hit."""
    r = reqs([1, 2, 3], [1, 9, 3])
    assert infinite(r)["block_hit_ratio"] == pytest.approx(1 / 6, abs=1e-6)
    assert belady(r, 10)["block_hit_ratio"] == pytest.approx(1 / 6, abs=1e-6)
    assert belady(r, 0)["block_hit_ratio"] == 0.0


def test_token_hit_ratio_caps_the_last_block_at_the_input_length():
    r = [TraceRequest(0, 700, 1, (1, 2)), TraceRequest(1, 700, 1, (1, 2))]
    assert infinite(r)["token_hit_ratio"] == pytest.approx(700 / 1400, abs=1e-6)
    assert infinite(r)["block_hit_ratio"] == pytest.approx(2 / 4, abs=1e-6)


def test_sweep_progress_is_monotone_and_ends_at_the_total():
    pytest.importorskip("tierstore.sim.workload")
    seen = []
    d = sweep(ReplayOptions(num_requests=150), ["lru", "s3fifo"], ["100blocks", "400blocks"],
              progress=lambda done, total: seen.append((done, total)))
    assert len(d["results"]) == 4 and len(d["references"]) == 4
    totals = {t for _, t in seen}
    assert len(totals) == 1
    dones = [x for x, _ in seen]
    assert dones == sorted(dones) and dones[-1] == totals.pop()


def test_sweep_refuses_a_daemon_and_an_empty_list():
    with pytest.raises(ConfigError, match="in-process"):
        sweep(ReplayOptions(socket="/tmp/x.sock"), ["lru"], ["1M"])
    with pytest.raises(ConfigError, match="at least one"):
        sweep(ReplayOptions(), [" "], ["1M"])
