"""Retention hint attacks on Store.retain / Retention directly and through the connector."""
from __future__ import annotations

import math
import time

import pytest

from tierstore.config import DramConfig, StoreConfig
from tierstore.errors import PinError
from tierstore.keys import Keyer
from tierstore.retention import MIN_SESSIONS, RetentionConfig
from tierstore.store import Store
from tierstore.keys import Namespace

SLOT = 4096


def mkstore(blocks=64, **rc):
    s = Store.open(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=blocks)))
    if rc:
        s.configure_retention(RetentionConfig(**rc))
    return s


def ns():
    return Namespace(model="m", revision="", kv_dtype="bfloat16", num_layers=1, num_kv_heads=1,
                     head_size=16, block_size=16)


def put(s, n, seed=0):
    keys = [bytes([seed % 256, i % 256, i // 256]) + b"\0" * 29 for i in range(n)]
    s.put(keys, ns(), [b"x" * SLOT] * n)
    return keys


@pytest.mark.parametrize("ttl", [float("nan"), -1, -0.0001, "10", None, True, [1]])
def test_bad_ttl_is_pin_error(ttl):
    s = mkstore()
    k = put(s, 2)
    with pytest.raises(PinError):
        s.retain(k, session="s", ttl_s=ttl)
    assert s.stats()["retention"]["pinned_blocks"] == 0


def test_huge_int_ttl_is_pin_error_not_overflow():
    """Expected PinError (or a clamp to max_ttl_s); observed OverflowError from float()."""
    s = mkstore()
    k = put(s, 2)
    r = s.retain(k, session="s", ttl_s=10 ** 400)
    assert r["ttl_s"] == 3600.0


def test_inf_ttl_is_clamped():
    s = mkstore()
    k = put(s, 2)
    assert s.retain(k, session="s", ttl_s=math.inf)["ttl_s"] == 3600.0


@pytest.mark.parametrize("sid", [None, 5, b"s", "", "a b", "x" * 129, "\u200b", "tab\t",
                                 "new\nline", ["s"]])
def test_bad_session_ids(sid):
    s = mkstore()
    with pytest.raises(PinError):
        s.retain(put(s, 1), session=sid, ttl_s=10)


def test_unicode_and_slash_session_ids_are_isolated():
    s = mkstore(tenant_blocks=10, total_blocks=30)
    k = put(s, 4)
    assert s.retain(k[:2], session="ü/../req:1", tenant="A", ttl_s=60)["pinned"] == 2
    assert s.retain(k[2:], session="ü", tenant="A", ttl_s=60)["pinned"] == 2
    s.retain([], session="ü", tenant="A", ttl_s=0)          # ends only "ü"
    assert s.stats()["retention"]["pinned_blocks"] == 2


def test_session_id_reused_across_tenants():
    s = mkstore(tenant_blocks=10, total_blocks=30)
    k = put(s, 4)
    s.retain(k[:2], session="s", tenant="A", ttl_s=60)
    s.retain(k[2:], session="s", tenant="B", ttl_s=60)
    s.retain([], session="s", tenant="B", ttl_s=0)
    s.retain(k, session="s", tenant="B", ttl_s=60, priority=1_000_000)
    st = s.stats()["retention"]
    from tierstore.retention import tenant_label
    assert st["tenants"][tenant_label("A")]["pinned_blocks"] == 2


def test_cap_zero_refuses_everything():
    s = mkstore(tenants={"A": 0}, total_blocks=30)
    r = s.retain(put(s, 3), session="s", tenant="A", ttl_s=60, priority=10)
    assert (r["pinned"], r["refused"]) == (0, 3)


def test_total_cap_zero():
    s = mkstore(total_blocks=0, tenant_blocks=0)
    r = s.retain(put(s, 3), session="s", ttl_s=60)
    assert r["pinned"] == 0


def test_tenant_stats_grow_without_bound():
    """Every salt that ever sent a hint keeps an entry in Retention._tstats (and a Prometheus
    series per label), even after its sessions ended: a salt per request grows the stats and
    /metrics without bound. Expected: entries of tenants with no sessions go (or are capped)."""
    s = mkstore()
    k = put(s, 1)
    for i in range(3000):
        s.retain(k, session="s", tenant=f"salt-{i}", ttl_s=0)
    assert len(s.stats()["retention"]["tenants"]) < 3000


def test_displacement_cost_is_quadratic_in_sessions():
    """S sessions of one tenant share the same block (cap counts it once, so nothing limits
    S); one higher-priority hint needing one more block displaces them one per loop turn,
    rescanning all sessions each turn: O(S^2) under the store lock (the engine's step waits).
    Expected: bounded work per hint."""
    def run(S):
        s = mkstore(blocks=64, tenant_blocks=1, total_blocks=32)
        k = put(s, 2)
        for i in range(S):
            s.retain(k[:1], session=f"s{i}", ttl_s=3600)
        t0 = time.perf_counter()
        r = s.retain(k[1:], session="vip", ttl_s=60, priority=1)
        dt = time.perf_counter() - t0
        assert r["displaced"] == MIN_SESSIONS   # sessions beyond the bound were refused
        return dt
    t1, t2 = run(1500), run(3000)
    print(f"1500 sessions: {t1:.3f}s, 3000 sessions: {t2:.3f}s")
    assert t2 < 0.1, f"one hint took {t2:.2f}s under the store lock ({t2 / t1:.1f}x for 2x S)"


def test_sessions_unbounded_per_tenant():
    """A cap of 1 block still lets one tenant hold any number of sessions (all on the shared
    block): each is a PinBook owner + ledger entry until its TTL (up to max_ttl_s)."""
    s = mkstore(tenant_blocks=1, total_blocks=32)
    k = put(s, 1)
    for i in range(5000):
        s.retain(k, session=f"s{i}", ttl_s=3600)
    assert s.stats()["retention"]["tenants"]["default"]["sessions"] <= 1000
