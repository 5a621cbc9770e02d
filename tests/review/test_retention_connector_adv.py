"""Retention hints through the connector (minivllm) and the daemon's RETAIN."""
from __future__ import annotations

import pytest

from minivllm import MiniVLLM
from tierstore_plugins.vllm.metadata import RETENTION_KEY

BS = 16


def prompt(seed, n=8 * BS + 3):
    return [(seed * 131 + 7 * i) % 500 + 1 for i in range(n)]


@pytest.fixture
def engine(tmp_path):
    es = []

    def make(**kw):
        kw.setdefault("dram_bytes", 64 * 4096)
        e = MiniVLLM(tmp_path / f"s{len(es)}", block_size=BS, nvme_bytes=0, **kw)
        es.append(e)
        return e
    yield make
    for e in es:
        e.close()


@pytest.mark.parametrize("h", [
    {"session_id": "s", "ttl_s": float("nan")}, {"session_id": "s", "ttl_s": float("inf")},
    {"session_id": "s", "ttl_s": -5}, {"session_id": "s", "ttl_s": 10 ** 400},
    {"session_id": "s", "ttl_s": "60"}, {"session_id": 7}, {"session_id": "x" * 10_000},
    {"session_id": "s", "priority": 10 ** 30}, {"session_id": "s", "priority": 1.5},
    {}, None, 5, [], {"session_id": "s", "ttl_s": 60, "extra": {"deep": [1] * 1000}},
])
def test_bad_hint_ignored_request_served(engine, h):
    e = engine(retention_tenant_blocks=16)
    e.add("r", prompt(1), kv_transfer_params={RETENTION_KEY: h})
    e.run()
    assert "r" in e.outputs
    assert e.client.stats()["retention"]["pinned_blocks"] == 0


def test_hint_with_mixed_type_unknown_keys_crashes_scheduler(engine):
    """kv_transfer_params from the Python API (LLM.generate) may hold non-str keys. A hint with
    two unknown keys of different types: sorted() in _retention_hint raises TypeError, outside
    the PinError handler, out of get_num_new_matched_tokens. Expected: hint ignored +
    retention_hints_invalid. Observed: TypeError (engine crash)."""
    e = engine(retention_tenant_blocks=16)
    e.add("r", prompt(2), kv_transfer_params={RETENTION_KEY: {"session_id": "s", 1: 0, "x": 0}})
    e.run()
    assert e.sched.counters["retention_hints_invalid"] == 1


def test_hint_on_aborted_and_preempted_requests(engine):
    e = engine(retention_tenant_blocks=16, async_sched=True)
    hint = {RETENTION_KEY: {"session_id": "agent", "ttl_s": 60}}
    e.add("a", prompt(3), kv_transfer_params=hint, max_tokens=4)
    e.step()
    e.abort("a")
    e.add("b", prompt(3), kv_transfer_params=hint, max_tokens=4)
    e.step()
    e.step()
    e.preempt("b")
    e.run()
    assert e.client.flush(timeout_s=30)
    r = e.client.stats()["retention"]
    assert r["pinned_blocks"] <= 16
    assert e.client.store.pins.total() == r["pinned_blocks"]


def test_daemon_retain_bad_bodies(tmp_path, monkeypatch):
    import textwrap
    from tierstore.daemon.server import DaemonServer
    from tierstore.settings import load_settings
    from tierstore.errors import TierStoreError

    monkeypatch.setenv("TIERSTORE_SECRET", "5e" * 32)
    cfg = tmp_path / "ts.toml"
    cfg.write_text(textwrap.dedent("""
        [daemon]
        drain_timeout_s = 1.0
        [store]
        slot_bytes = 4096
        [dram]
        capacity_blocks = 64
        """))
    st = load_settings(cfg, env={}, data_dir=str(tmp_path / "d"), socket=str(tmp_path / "d.sock"))
    d = DaemonServer(st)
    d.start()
    d.run_in_thread()
    try:
        e = MiniVLLM(tmp_path / "u", block_size=BS, socket=str(d.socket_path))
        try:
            e.add("r", prompt(4))
            e.run()
            keys = e.sched.keyers[0].chain(prompt(4))
            c = e.client
            bad = [dict(session=None, ttl_s=5), dict(session="s", ttl_s=float("nan")),
                   dict(session="s", ttl_s=-1), dict(session="s", ttl_s=5, priority=2 ** 63),
                   dict(session="s" * 200, ttl_s=5), dict(session="s", ttl_s=5, tenant=7)]
            for kw in bad:
                kw.setdefault("tenant", "")
                with pytest.raises(TierStoreError):
                    c.retain(keys, **kw)
            r = c.retain(keys, session="ok", ttl_s=5)   # the connection still works
            assert r["pinned"] > 0
        finally:
            e.close()
    finally:
        d.request_stop()
        assert d.wait(15)
