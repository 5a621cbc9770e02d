"""Cluster replay (``tierstore replay --nodes N --route ...``, issue 15): N simulated nodes, a
router that knows only the KV events they published, beside one pooled cache."""

from __future__ import annotations

import json
import random

import pytest

from tierstore.errors import ConfigError
from tierstore.kv_events import encode_batch
from tierstore.sim.replay import ReplayOptions
from tierstore.sim.cluster_replay import Router, cluster_replay


def conversations(path, n_conv=24, turns=6, seed=1) -> str:
    """A small Mooncake-format trace: conversations whose turns extend their own prefix, all
    starting with one shared system-prompt block (id 0), interleaved."""
    rng = random.Random(seed)
    nxt = [1]
    convs = []
    for _ in range(n_conv):
        ids = [0]
        convs.append(ids)
    lines = []
    order = [c for c in range(n_conv) for _ in range(turns)]
    rng.shuffle(order)
    for c in order:
        ids = convs[c]
        for _ in range(rng.randrange(2, 5)):
            ids.append(nxt[0])
            nxt[0] += 1
        lines.append({"timestamp": 0, "input_length": len(ids) * 512, "output_length": 10,
                      "hash_ids": list(ids)})
    p = path / "conv.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(p)


def test_prefix_aware_routing_beats_round_robin_and_the_router_stays_exact(tmp_path):
    """Caches too small for the whole trace: the prefix-aware router (fed by events only) sends
    a conversation's turns where its prefix lives and gets close to the pooled cache; round-robin
    scatters them. Each router index equals its node's residency at the end."""
    trace = conversations(tmp_path)
    r = cluster_replay(ReplayOptions(trace=trace, capacity="40blocks"), 4,
                       ["round-robin", "prefix-aware"])
    rr, pa = r["routes"]
    pooled = r["pooled"]
    assert (rr["route"], pa["route"], pooled["route"]) == ("round-robin", "prefix-aware", "pooled")
    assert pooled["capacity_blocks_per_node"] == 160 and pooled["nodes"] == 1
    assert rr["referenced_blocks"] == pa["referenced_blocks"] == pooled["referenced_blocks"]
    assert pa["block_hit_ratio"] > rr["block_hit_ratio"] + 0.15
    assert pa["block_hit_ratio"] >= pooled["block_hit_ratio"] - 0.1
    assert all(x["router_exact"] for x in (rr, pa, pooled))
    assert rr["requests_per_node"] == [36] * 4
    assert pa["load_imbalance"] <= 1.25 + 16 / 36
    assert pa["events"] > 0 and pa["event_batches"] > 0


def test_router_picks_the_longest_prefix_and_balances_ties():
    """The prefix-aware router reads only KVEventBatch payloads: the node that announced the
    longest prefix wins; a cold request goes to the least loaded node."""
    from tierstore.kv_events import block_stored

    r = Router(3, "prefix-aware")
    r.receive(1, encode_batch([block_stored(h, None, [], 512, "CPU") for h in (5, 6, 7)]))
    r.receive(2, encode_batch([block_stored(5, None, [], 512, "STORAGE")]))
    assert r.pick([5, 6, 7, 8]) == 1
    assert r.pick([5, 9]) in (1, 2)
    assert r.pick([99]) == 0                      # cold: the node sent nothing yet
    rr = Router(3, "round-robin")
    assert [rr.pick([5]) for _ in range(4)] == [0, 1, 2, 0]


def test_cluster_replay_refuses_what_it_cannot_simulate(tmp_path):
    trace = conversations(tmp_path)
    with pytest.raises(ConfigError):
        cluster_replay(ReplayOptions(trace=trace, capacity="40blocks"), 2, ["nearest"])
    with pytest.raises(ConfigError):
        cluster_replay(ReplayOptions(trace=trace, payload="bytes"), 2, ["round-robin"])
    with pytest.raises(ConfigError):
        cluster_replay(ReplayOptions(trace=trace), 0, ["round-robin"])
