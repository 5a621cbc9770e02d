"""The synthetic workload is deterministic, Mooncake-shaped and shares prefixes."""

from tierstore.sim.workload import generate_trace


def test_generate_trace_is_deterministic_and_well_formed():
    a = generate_trace(300, seed=1)
    assert a == generate_trace(300, seed=1)
    assert a != generate_trace(300, seed=2)
    assert len(a) == 300
    ts = [r["timestamp"] for r in a]
    assert ts == sorted(ts)
    for r in a:
        assert set(r) == {"timestamp", "input_length", "output_length", "hash_ids"}
        assert len(r["hash_ids"]) == -(-r["input_length"] // 512)


def test_generate_trace_has_reuse():
    seen, hits = set(), 0
    for r in generate_trace(500):
        hits += sum(1 for b in r["hash_ids"] if b in seen)
        seen.update(r["hash_ids"])
    assert hits > 0
