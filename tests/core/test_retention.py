"""Retention hints in the store (issue 15 item 5; tierstore/retention.py): session pins bounded
per tenant, TTL on the store's clock, priority inside one tenant, and case TEN-39's spirit for
pins (one tenant never releases or displaces another's pins; impossible caps are refused,
oversubscribed ones warned about; a tenant without an entry gets the documented default)."""

from __future__ import annotations

import pytest

from tierstore.config import DramConfig, StoreConfig
from tierstore.errors import ConfigError, PinError
from tierstore.keys import Keyer, Namespace
from tierstore.retention import RetentionConfig, tenant_label
from tierstore.store import Store

SLOT = 1024
CAP = 40
NS = Namespace("retain", 16, num_layers=1, num_kv_heads=1, head_size=8)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env():
    clock = FakeClock()
    store = Store.open(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=CAP)),
                       clock=clock)
    keyer = Keyer(NS, b"r" * 32)
    yield store, keyer, clock
    store.close()


def put(store, keyer, first: int, n: int):
    keys = keyer.chain_from_block_ids(list(range(first, first + n)))
    store.put(keys, NS, [b"x" * 64] * n)
    return list(keys)


def flood(store, keyer, rounds: int = 4):
    for r in range(rounds):
        put(store, keyer, 100_000 + r * 1000, CAP)


def resident(store, keys) -> int:
    return sum(k in store.res for k in keys)


def test_hinted_session_survives_a_flood_until_its_ttl(env):
    """8 blocks pinned for a session survive a flood of 4x the tier; unhinted blocks go; after
    the TTL (fake clock) the pins expire and a flood evicts them."""
    store, keyer, clock = env
    store.configure_retention(RetentionConfig(tenant_blocks=12))
    kept, lost = put(store, keyer, 0, 8), put(store, keyer, 500, 8)
    r = store.retain(kept, session="agent-1", tenant="acme", ttl_s=60)
    assert (r["pinned"], r["refused"], r["held"]) == (8, 0, 8)
    flood(store, keyer)
    assert resident(store, kept) == 8 and resident(store, lost) == 0
    clock.now += 61
    flood(store, keyer)
    assert resident(store, kept) == 0
    assert store.stats()["counters"]["retention_sessions_expired"] == 1
    assert store.stats()["retention"]["pinned_blocks"] == 0


def test_a_later_hint_of_the_session_refreshes_the_ttl(env):
    store, keyer, clock = env
    store.configure_retention(RetentionConfig(tenant_blocks=12))
    a = put(store, keyer, 0, 4)
    store.retain(a, session="s", ttl_s=60)
    clock.now += 50
    b = put(store, keyer, 10, 2)
    r = store.retain(b, session="s", ttl_s=60)      # adds 2, refreshes the first 4
    assert r["held"] == 6
    clock.now += 50                                 # 100 s after the first hint
    flood(store, keyer)
    assert resident(store, a + b) == 6
    clock.now += 11
    flood(store, keyer)
    assert resident(store, a + b) == 0


def test_over_its_cap_a_tenant_is_refused_and_another_tenant_is_unaffected(env):
    """TEN-39 for pins: tenant A (cap 6) hints 10 blocks: the first 6 are pinned, 4 refused
    and counted (per tenant too); tenant B's hint right after pins all it asks for; nothing A
    does (more hints, ending its sessions) touches B's pins."""
    store, keyer, _ = env
    store.configure_retention(RetentionConfig(tenants={"A": 6, "B": 8}))
    a, b = put(store, keyer, 0, 10), put(store, keyer, 300, 8)
    r = store.retain(a, session="s1", tenant="A", ttl_s=60)
    assert (r["pinned"], r["refused"], r["cap"]) == (6, 4, 6)
    r = store.retain(a, session="s2", tenant="A", ttl_s=60)   # shares A's 6 pinned: free
    assert (r["pinned"], r["refused"]) == (6, 4)
    rb = store.retain(b, session="s1", tenant="B", ttl_s=60)
    assert (rb["pinned"], rb["refused"]) == (8, 0)
    st = store.stats()
    assert st["counters"]["retention_hints_refused"] == 2
    assert st["counters"]["retention_blocks_refused"] == 8
    ta, tb = st["retention"]["tenants"][tenant_label("A")], st["retention"]["tenants"][tenant_label("B")]
    assert (ta["pinned_blocks"], ta["hints_refused"], ta["blocks_refused"]) == (6, 2, 8)
    assert (tb["pinned_blocks"], tb["hints_refused"], tb["blocks_refused"]) == (8, 0, 0)
    from tierstore.metrics import _StoreCollector
    fams = {f.name: f for f in _StoreCollector(store.stats).collect()}
    refused = {s.labels["tenant"]: s.value for s in fams["tierstore_retention_refused_blocks"].samples}
    assert refused == {tenant_label("A"): 8, tenant_label("B"): 0}
    store.retain([], session="s1", tenant="A", ttl_s=0, priority=10**6)   # A ends its s1
    store.retain(a, session="s9", tenant="A", ttl_s=60, priority=10**6)
    flood(store, keyer)
    assert resident(store, b) == 8
    assert len(store.pins.held(f"retain:{tenant_label('B')}/s1")) == 8


def test_priority_displaces_only_the_tenants_own_lower_sessions(env):
    store, keyer, _ = env
    store.configure_retention(RetentionConfig(tenants={"A": 6, "B": 6}))
    low, high = put(store, keyer, 0, 6), put(store, keyer, 100, 6)
    other = put(store, keyer, 200, 6)
    store.retain(low, session="low", tenant="A", ttl_s=60, priority=0)
    store.retain(other, session="b", tenant="B", ttl_s=60, priority=-5)
    r = store.retain(high, session="same", tenant="A", ttl_s=60, priority=0)
    assert (r["pinned"], r["refused"], r["displaced"]) == (0, 6, 0)   # equal: refused
    r = store.retain(high, session="high", tenant="A", ttl_s=60, priority=1)
    assert (r["pinned"], r["refused"], r["displaced"]) == (6, 0, 1)
    flood(store, keyer)
    assert resident(store, high) == 6 and resident(store, low) == 0
    assert resident(store, other) == 6                  # B's lower priority is not A's to take


def test_total_cap_bounds_all_tenants_and_caps_are_checked(env):
    """A total of 10 blocks over any number of tenants without entries (default cap 4 =
    CAP // 10): three tenants fill 4 + 4 + 2; impossible caps are ConfigError; caps adding up to
    more than the total (TEN-39's 10 + 10 on 15) are a warning; an unknown tenant gets the
    default, not zero."""
    store, keyer, _ = env
    store.configure_retention(RetentionConfig(total_blocks=10))
    got = [store.retain(put(store, keyer, i * 100, 6), session="s", tenant=f"T{i}", ttl_s=60)
           for i in range(3)]
    assert [g["pinned"] for g in got] == [4, 4, 2]
    assert [g["cap"] for g in got] == [4, 4, 4]
    with pytest.raises(ConfigError, match="more than the DRAM tier"):
        store.configure_retention(RetentionConfig(total_blocks=CAP + 1))
    with pytest.raises(ConfigError, match="can never be reached"):
        store.configure_retention(RetentionConfig(total_blocks=15, tenants={"A": 16}))
    warn = store.configure_retention(RetentionConfig(total_blocks=15, tenants={"A": 10, "B": 10}))
    assert warn and "oversubscribed" in warn[0]
    assert store.stats()["retention"]["warnings"] == warn


def test_bad_hints_change_nothing_and_ttl_is_clamped(env):
    store, keyer, clock = env
    store.configure_retention(RetentionConfig(max_ttl_s=30))
    keys = put(store, keyer, 0, 2)
    for bad in (dict(session="has space", ttl_s=5), dict(session="s", ttl_s=-1),
                dict(session="s", ttl_s=5, priority=1.5)):
        with pytest.raises(PinError):
            store.retain(keys, **bad)
    assert store.pins.total() == 0
    r = store.retain(keys, session="s", ttl_s=3600)
    assert r["ttl_s"] == 30 and store.stats()["counters"]["retention_ttl_clamped"] == 1
    clock.now += 31
    assert store.stats()["retention"]["pinned_blocks"] == 0 and store.pins.total() == 0
