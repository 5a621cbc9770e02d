"""Store: two-phase API, pins, eviction, prefix lookups, public cases on the DRAM tier."""


import pytest
from hypothesis import given, settings, strategies as st

from tierstore.config import DramConfig, StoreConfig
from tierstore.errors import JobError, PinError, RejectedError
from tierstore.index.residency import PinBook
from tierstore.keys import ExtraKeys, Keyer, Namespace
from tierstore.plan import plan_load
from tierstore.store import Store
from tierstore.types import BlockStatus, Tier

B = 16
SLOT = 4096
NS = Namespace("model-a", B, revision="r1", kv_dtype="bfloat16", kv_layout="NHD",
               num_layers=2, num_kv_heads=2, head_size=32, tp_size=2, tp_rank=0)
SECRET = b"k" * 32


def make_store(capacity=8, **kw) -> Store:
    return Store.open(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=capacity), **kw))


def blocks_for(keys):
    return [k * (SLOT // 32) for k in keys]


def put(store, keys, ns=NS):
    return store.put(keys, ns, blocks_for(keys))


def test_put_get_roundtrip_and_lookup_tiers():
    s = make_store()
    keys = Keyer(NS, SECRET).chain(list(range(64)))
    assert put(s, keys) == [BlockStatus.OK] * 4
    r = s.lookup(keys, NS)
    assert r.hit_tokens == 64 and r.tiers == (Tier.DRAM,) * 4
    assert r.hit_tokens_per_tier() == {"dram": 64}
    assert s.get(keys) == blocks_for(keys)
    assert s.check() == []


def test_nothing_visible_before_complete_and_abort_publishes_nothing():
    s = make_store()
    keys = Keyer(NS, SECRET).chain(list(range(32)))
    job = s.prepare_store(keys, NS, SLOT)
    assert s.lookup(keys, NS).hit_tokens == 0
    # a second writer of the same keys is told they are being stored
    job2 = s.prepare_store(keys, NS, SLOT)
    assert job2.status == [BlockStatus.PRESENT] * 2
    s.complete_store(job2.job_id)
    s.complete_store(job.job_id, ok=False)
    assert s.lookup(keys, NS).hit_tokens == 0
    assert s.tiers[Tier.DRAM].slots.used == 0
    with pytest.raises(JobError):
        s.complete_store(job.job_id)
    assert s.check() == []


def test_oversized_block_rejected():
    s = make_store()
    with pytest.raises(RejectedError):
        s.prepare_store([b"x" * 32], NS, SLOT + 1)


def test_partial_block_never_served_and_one_token_left():
    """BLK-05: a 55-token prompt stores 3 full blocks; lookups of P+20 and of P hit 48 tokens
    (never 55); a whole-prompt hit is cut back so the engine computes >= 1 token; with the engine
    holding tokens 0-31 the load plan covers exactly tokens 32-47 and writes nothing below 32."""
    s = make_store()
    k = Keyer(NS, SECRET)
    p = list(range(55))
    pk = k.chain(p)
    assert len(pk) == 3
    put(s, pk)
    q = p + list(range(1000, 1020))
    assert s.lookup(k.chain(q), NS).hit_tokens == 48                     # (a)
    hit_p = s.lookup(k.chain(p), NS)
    assert hit_p.hit_tokens == 48                                        # (b) never 55
    assert plan_load(len(p), hit_p.num_blocks, 0, B).num_tokens == 48
    # a prompt of exactly 48 tokens: the last block is left for the engine
    assert plan_load(48, 3, 0, B).num_tokens == 32
    plan = plan_load(len(q), s.lookup(k.chain(q), NS).num_blocks, 32, B)   # (c)
    assert plan.token_range == (32, 48) and plan.num_blocks == 1
    with pytest.raises(ValueError):
        plan_load(55, 3, 20, B)


def test_pinned_blocks_survive_pressure_and_double_unpin_is_error():
    """EVC-07: capacity 4, store P (4 blocks), lookup(P, pin) -> 64; storing Q (4 new blocks)
    must not evict pinned P (Q is reported skipped); retrieve returns P byte-exact; after the
    first unpin P is evictable; the second unpin raises and the count stays 0."""
    s = make_store(capacity=4)
    k = Keyer(NS, SECRET)
    P = k.chain(list(range(64)))
    Q = k.chain(list(range(100, 164)))
    put(s, P)
    r = s.lookup(P, NS, pin=True, owner="req-1")
    assert r.hit_tokens == 64 and r.pinned
    assert put(s, Q) == [BlockStatus.SKIPPED] * 4
    assert s.counters["store_skipped"] == 4
    assert s.get(P) == blocks_for(P)
    assert s.unpin(P, owner="req-1") == 4
    assert all(s.block(key)["pins"] == 0 for key in P)
    with pytest.raises(PinError):
        s.unpin(P[:1], owner="req-1")
    assert s.block(P[0])["pins"] == 0
    assert put(s, Q) == [BlockStatus.OK] * 4          # P is evictable now
    assert s.lookup(P, NS).hit_tokens == 0
    assert s.check() == []


def test_pin_lease_expiry_gives_exact_shorter_count():
    """EVC-07: a pin lease that expires before the read: the read returns an exact shorter
    count that the caller is told, no crash."""
    now = [0.0]
    s = make_store(capacity=4)
    s.pins = PinBook(s.res, clock=lambda: now[0])
    k = Keyer(NS, SECRET)
    P = k.chain(list(range(64)))
    put(s, P)
    s.lookup(P, NS, pin=True, owner="r", ttl_s=2.0)
    now[0] = 3.0
    Q = k.chain(list(range(500, 532)))
    assert put(s, Q) == [BlockStatus.OK] * 2         # the lease expired: two P blocks evicted
    hit = s.lookup(P, NS).num_blocks
    job = s.prepare_load(P)
    assert job.num_ready == hit < 4 and job.status[hit] is BlockStatus.MISSING
    assert [bytes(s.slot_view(x)[:n]) for x, n in zip(job.slots, job.sizes)] == blocks_for(P[:hit])
    s.complete_load(job.job_id)
    assert s.counters["pins_expired"] == 4
    with pytest.raises(PinError):
        s.unpin(P[:1], owner="r")
    assert s.check() == []


def test_no_pin_or_slot_leak_over_many_cycles():
    """EVC-08: capacity 8; 1,000 x (store a fresh 2-block prompt, lookup+pin, retrieve, unpin):
    afterwards 0 pins, every resident block unpinned, DRAM used <= 8, the last 4 prompts fully
    hit, no store refused, and index memory does not grow past its warm-up size."""
    s = make_store(capacity=8)
    k = Keyer(NS, SECRET)
    prompts = []
    for i in range(1000):
        P = k.chain(list(range(i * 32, i * 32 + 32)))
        prompts.append(P)
        assert put(s, P) == [BlockStatus.OK] * 2
        r = s.lookup(P, NS, pin=True, owner=f"req-{i}")
        assert r.hit_tokens == 32
        assert s.get(P) == blocks_for(P)
        s.unpin(P, owner=f"req-{i}")
        if i == 20:
            warm_handles = len(s.res._keys)
    st_ = s.stats()
    assert st_["pins"] == 0 and st_["pinned_blocks"] == 0
    assert s.tiers[Tier.DRAM].slots.used <= 8
    assert all(s.lookup(P, NS).hit_tokens == 32 for P in prompts[-4:])
    assert s.counters["store_skipped"] == 0
    assert len(s.res._keys) == warm_handles
    assert s.pins.owners() == []
    assert s.check() == []


def test_salt_isolation_on_dram():
    """KEY-01 (store level, DRAM): data stored under salt tenant-a is invisible to tenant-b and
    to requests without a salt; an empty salt is the same as no salt."""
    s = make_store()
    k = Keyer(NS, SECRET)
    P = list(range(64))
    put(s, k.chain(P, ExtraKeys(cache_salt="tenant-a")))
    assert s.lookup(k.chain(P, ExtraKeys(cache_salt="tenant-b")), NS).hit_tokens == 0
    assert s.lookup(k.chain(P), NS).hit_tokens == 0
    P2 = list(range(200, 232))
    put(s, k.chain(P2, ExtraKeys(cache_salt="")))
    assert s.lookup(k.chain(P2), NS).hit_tokens == 32
    assert s.lookup(k.chain(P, ExtraKeys(cache_salt="tenant-a")), NS).hit_tokens == 64
    assert "tenant-a" not in repr(s.blocks())


def test_namespace_change_reads_nothing():
    """KEY-03 (store level): changing dtype, revision, TP geometry, layout or block size gives 0
    hit tokens and reads no byte; the unchanged namespace hits 48. After storing under the fp8
    namespace, blocks() shows entries that differ in dtype."""
    from dataclasses import replace
    s = make_store(capacity=16)
    P = list(range(48))
    put(s, Keyer(NS, SECRET).chain(P))
    loaded = s.counters["loaded_blocks"]
    for change in ({"kv_dtype": "fp8_e4m3"}, {"revision": "r2"}, {"tp_size": 4},
                   {"kv_layout": "HND"}, {"block_size": 32}):
        ns2 = replace(NS, **change)
        keys = Keyer(ns2, SECRET).chain(P)
        assert s.lookup(keys, ns2).hit_tokens == 0
        assert s.prepare_load(keys).num_ready == 0
    assert s.counters["loaded_blocks"] == loaded
    assert s.lookup(Keyer(NS, SECRET).chain(P), NS).hit_tokens == 48
    fp8 = replace(NS, kv_dtype="fp8_e4m3")
    put(s, Keyer(fp8, SECRET).chain(P), ns=fp8)
    dtypes = {b["namespace"]["kv_dtype"] for b in s.blocks()}
    assert dtypes == {"bfloat16", "fp8_e4m3"}


def test_release_owner_frees_pins_and_aborts_jobs():
    s = make_store()
    k = Keyer(NS, SECRET)
    P = k.chain(list(range(32)))
    put(s, P)
    s.lookup(P, NS, pin=True, owner="conn-1")
    job = s.prepare_store(k.chain(list(range(300, 332))), NS, SLOT, owner="conn-1")
    assert job.status == [BlockStatus.OK] * 2
    out = s.release_owner("conn-1")
    assert out == {"pins_released": 2, "jobs_aborted": 1}
    assert s.stats()["pins"] == 0 and s.tiers[Tier.DRAM].slots.used == 2
    assert s.check() == []


def test_evict_skips_pinned():
    s = make_store()
    P = Keyer(NS, SECRET).chain(list(range(48)))
    put(s, P)
    s.pin(P[:1], owner="x")
    assert s.evict(P) == {"pinned": 1, "evicted": 2}
    assert s.evict(P[1:]) == {"missing": 2}
    assert s.lookup(P, NS).hit_tokens == 16


ops = st.lists(st.tuples(st.sampled_from(["put", "pin", "unpin", "evict", "load", "expire_owner"]),
                         st.integers(0, 11), st.integers(1, 4)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_random_operations_keep_invariants(seq):
    """Any sequence of operations keeps the books: check() is clean, pins never go negative,
    used slots never exceed capacity, and every load returns the bytes that were stored."""
    s = make_store(capacity=6)
    k = Keyer(NS, SECRET)
    chains = [k.chain(list(range(i * 100, i * 100 + 64))) for i in range(12)]
    for op, i, n in seq:
        keys = chains[i][:n]
        owner = f"o{i % 3}"
        if op == "put":
            put(s, keys)
        elif op == "pin":
            s.pin(keys, owner=owner)
        elif op == "unpin":
            try:
                s.unpin(keys[:1], owner=owner)
            except PinError:
                pass
        elif op == "evict":
            s.evict(keys)
        elif op == "load":
            job = s.prepare_load(keys)
            for key, slot, size in zip(keys, job.slots, job.sizes):
                assert bytes(s.slot_view(slot)[:size]) == key * (SLOT // 32)
            s.complete_load(job.job_id)
        else:
            s.release_owner(owner)
        assert s.check() == []
        assert all(p >= 0 for p in s.res.pins)
        assert s.tiers[Tier.DRAM].slots.used <= 6


@pytest.mark.parametrize("policy", ["prefix-lhd", "prefix-lru", "prefix-gdsf"])
def test_parents_a_caller_names_in_a_circle_never_hang_the_store(policy):
    """``parent`` is the caller's word (``prepare_store(..., parent=)``): a client that names
    two blocks each other's parent, then fills the tier, gets its blocks evicted like any
    others; the prefix-aware policies must not walk the circle for ever under the store lock
    (prefix-lhd did, hanging every client of the store)."""
    store = Store.open(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=4,
                                                                     policy=policy)))
    keyer = Keyer(NS, SECRET)
    a, b = keyer.chain(list(range(2 * B)))
    assert store.put([a], NS, [b"a" * SLOT], parent=b) == [BlockStatus.OK]
    assert store.put([b], NS, [b"b" * SLOT], parent=a) == [BlockStatus.OK]
    more = keyer.chain(list(range(1000, 1000 + 8 * B)))
    for k in more:   # 8 more blocks through a 4-block tier: every put finds a victim
        assert store.put([k], NS, [b"x" * SLOT]) == [BlockStatus.OK]
    assert store.stats()["tiers"][0]["blocks"] == 4
    assert store.lookup(more[-1:], NS).num_blocks == 1
    store.close()
