"""The offline harness drives policies exactly as the Store does: same hit ratios as a replay."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tierstore.policy import make_eviction
from tierstore.sim.replay import ReplayOptions, replay
from tierstore.sim.workload import generate_trace

SIM = Path(__file__).resolve().parents[3] / "benchmarks" / "policy_sim.py"


def _sim():
    spec = importlib.util.spec_from_file_location("policy_sim", SIM)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("policy", ["lru", "prefix-lhd", "prefix-gdsf"])
@pytest.mark.parametrize("cap", [40, 150])
def test_harness_equals_store_replay(tmp_path, policy, cap):
    reqs = generate_trace(400, seed=3)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    real = replay(ReplayOptions(trace=str(path), capacity=f"{cap}blocks", policy=policy))
    sim = _sim()
    got = sim.simulate([r["hash_ids"] for r in reqs], make_eviction(policy, cap), cap)
    assert got["block_hit_ratio"] == pytest.approx(real["block_hit_ratio"], abs=1e-6)
