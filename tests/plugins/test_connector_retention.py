"""Retention hints from the request (issue 15 item 5), driven through the connector by the vLLM
stand-in (tests/plugins/minivllm.py): ``kv_transfer_params["tierstore_retention"] =
{"session_id", "ttl_s", "priority"}`` pins a session's blocks in the store
(tierstore/retention.py), bounded per tenant (the request's cache salt), in the spirit of case
TEN-39: a tenant over its cap gets refused hints and a counter, another tenant is unaffected,
one tenant's hints never release another's pins. TTLs run on the store's injectable clock.
Embedded store first, then the same through the daemon (RETAIN over its protocol)."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(__file__))
from minivllm import MiniVLLM  # noqa: E402

from tierstore.errors import ConfigError  # noqa: E402
from tierstore.retention import tenant_label  # noqa: E402
from tierstore_plugins.vllm.backend import request_keys  # noqa: E402
from tierstore_plugins.vllm.metadata import RETENTION_KEY, PluginSettings  # noqa: E402

BS = 16
DRAM = 64          # blocks
N = 8              # blocks per prompt


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def prompt(seed: int, n_blocks: int = N) -> list[int]:
    return [(seed * 131 + 7 * i) % 500 + 1 for i in range(n_blocks * BS + 3)]


def hint(session: str, ttl_s: float = 60, priority: int = 0) -> dict:
    return {RETENTION_KEY: {"session_id": session, "ttl_s": ttl_s, "priority": priority}}


def held(e: MiniVLLM, tokens, salt=None) -> int:
    """How many of the prompt's full blocks the store holds (a lookup, no pin)."""
    class R:
        prompt_token_ids = tokens
        num_prompt_tokens = len(tokens)
        cache_salt = salt
        lora_request = mm_features = None
    [keys] = request_keys(e.sched.keyers, R, BS, e.sched.geo.engine_hash_algo)
    return e.client.lookup(keys, e.sched.namespaces[0]).num_blocks


def run(e: MiniVLLM, reqs) -> None:
    for rid, toks, kw in reqs:
        e.add(rid, toks, **kw)
    e.run(max_steps=500)
    assert e.client.flush(timeout_s=30)


def flood(e: MiniVLLM, tag: str, n: int = 10) -> None:
    """Other requests' saves: ``n`` x 8 blocks, more than the DRAM tier holds."""
    run(e, [(f"{tag}-{i}", prompt(1000 + i + 100 * len(tag)), {}) for i in range(n)])


@pytest.fixture
def engine(tmp_path):
    engines = []

    def make(**kw) -> tuple[MiniVLLM, FakeClock]:
        kw.setdefault("dram_bytes", DRAM * 4096)
        e = MiniVLLM(tmp_path / "store", block_size=BS, nvme_bytes=0, **kw)
        engines.append(e)
        clock = FakeClock()
        e.client.store.pins._clock = clock    # the store's TTL clock (retention reads it too)
        return e, clock
    yield make
    for e in engines:
        e.close()


def test_session_pinned_prefix_survives_a_flood_and_goes_after_its_ttl(engine):
    """An agent's turn with a session hint pins its 8 blocks; a flood of other requests' saves
    (80 blocks on a 64-block tier) evicts an unhinted prompt but not the session's; the next
    turn loads the whole prefix (and refreshes the TTL); once the TTL passed on the store's
    clock, a flood evicts it."""
    e, clock = engine(retention_tenant_blocks=16)
    agent, plain = prompt(1), prompt(2)
    run(e, [("turn-1", agent, {"kv_transfer_params": hint("agent-7", ttl_s=60)}),
            ("plain", plain, {})])
    assert e.sched.counters["retention_blocks_pinned"] == N
    flood(e, "a")
    assert held(e, agent) == N and held(e, plain) == 0
    turn2 = agent + prompt(3, 2)
    run(e, [("turn-2", turn2, {"kv_transfer_params": hint("agent-7", ttl_s=60)})])
    assert e.outputs["turn-2"]["loaded_tokens"] == N * BS
    clock.now += 30
    flood(e, "b")
    assert held(e, turn2) == len(turn2) // BS        # turn 2's blocks joined the session
    clock.now += 31                                  # 61 s after turn 2's hint
    flood(e, "c")
    assert held(e, agent) == 0
    assert e.client.stats()["counters"]["retention_sessions_expired"] == 1


def test_a_tenant_over_its_cap_is_refused_and_another_tenant_is_unaffected(engine):
    """TEN-39 for pins: tenants are cache salts. Tenant A (cap 4) asks to keep 8 blocks: 4 are
    pinned (the prefix), 4 refused and counted, the request is served all the same; tenant B
    (no entry: the default cap, 6 = DRAM / 10) pins 6 of its 8. After a flood A keeps 4 and B 6.
    A's next hint with a higher priority displaces only A's own session, never B's."""
    e, _ = engine(retention_tenants={"A": 4})
    a, b = prompt(10), prompt(20)
    run(e, [("a1", a, {"cache_salt": "A", "kv_transfer_params": hint("s")}),
            ("b1", b, {"cache_salt": "B", "kv_transfer_params": hint("s")})])
    assert set(e.outputs) == {"a1", "b1"}
    c = e.sched.counters
    assert c["retention_blocks_pinned"] == 4 + 6
    assert c["retention_blocks_refused"] == 4 + 2 and c["retention_hints_refused"] >= 2
    tenants = e.client.stats()["retention"]["tenants"]
    assert tenants[tenant_label("A")]["blocks_refused"] == 4
    assert tenants[tenant_label("A")]["cap"] == 4 and tenants[tenant_label("B")]["cap"] == 6
    flood(e, "x")
    assert (held(e, a, "A"), held(e, b, "B")) == (4, 6)
    a2 = prompt(30)
    run(e, [("a2", a2, {"cache_salt": "A", "kv_transfer_params": hint("urgent", priority=5)})])
    flood(e, "y")
    assert (held(e, a, "A"), held(e, a2, "A"), held(e, b, "B")) == (0, 4, 6)
    assert e.client.stats()["retention"]["tenants"][tenant_label("A")]["sessions_displaced"] == 1


def test_a_bad_hint_never_fails_the_request(engine):
    """Unknown fields, a bad session id, a bool priority: the hint is ignored with a counter,
    the request is served and saved; a TTL above retention_max_ttl_s is clamped; ttl_s 0 ends
    the session."""
    e, _ = engine(retention_tenant_blocks=16, retention_max_ttl_s=120, retention_ttl_s=60)
    bad = [{"session_id": "has space"}, {"session_id": "s", "pin": 1},
           {"session_id": "s", "priority": True}, "agent-1"]
    run(e, [(f"bad{i}", prompt(40 + i), {"kv_transfer_params": {RETENTION_KEY: h}})
            for i, h in enumerate(bad)])
    assert set(e.outputs) == {f"bad{i}" for i in range(4)}
    assert e.sched.counters["retention_hints_invalid"] == 4
    assert e.client.stats()["retention"]["pinned_blocks"] == 0
    run(e, [("long", prompt(50), {"kv_transfer_params": hint("s", ttl_s=10**7)})])
    assert e.sched.counters["retention_ttl_clamped"] == 1
    assert e.client.stats()["retention"]["pinned_blocks"] == N
    run(e, [("end", prompt(50), {"kv_transfer_params": hint("s", ttl_s=0)})])
    assert e.client.stats()["retention"]["pinned_blocks"] == 0


def test_retention_settings_are_checked():
    with pytest.raises(ConfigError, match="daemon"):
        PluginSettings.from_extra_config({"socket": "/s", "retention_tenants": {"A": 4}})
    with pytest.raises(ConfigError, match="retention_max_ttl_s"):
        PluginSettings.from_extra_config({"data_dir": "/d", "retention_max_ttl_s": 0})
    with pytest.raises(ConfigError, match="blocks"):
        PluginSettings.from_extra_config({"data_dir": "/d", "retention_tenants": {"A": -1}})
    with pytest.raises(ConfigError, match="longer than"):
        PluginSettings.from_extra_config({"socket": "/s", "retention_ttl_s": 7200})
    s = PluginSettings.from_extra_config({"socket": "/s", "retention_ttl_s": 30})
    assert s.retention_ttl_s == 30


def test_embedded_caps_the_dram_tier_cannot_hold_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="more than the DRAM tier"):
        MiniVLLM(tmp_path / "s", block_size=BS, dram_bytes=DRAM * 4096, nvme_bytes=0,
                 retention_total_blocks=DRAM + 1)


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    from tierstore.daemon.server import DaemonServer
    from tierstore.settings import load_settings

    monkeypatch.setenv("TIERSTORE_SECRET", "5e" * 32)
    cfg = tmp_path / "ts.toml"
    cfg.write_text(textwrap.dedent(f"""
        [daemon]
        drain_timeout_s = 1.0
        [store]
        slot_bytes = 4096
        [dram]
        capacity_blocks = {DRAM}
        [retention]
        tenants = ["A=4", "=16"]
        """))
    st = load_settings(cfg, env={}, data_dir=str(tmp_path / "d"), socket=str(tmp_path / "d.sock"))
    d = DaemonServer(st)
    d.start()
    d.run_in_thread()
    clock = FakeClock()
    d.store.pins._clock = clock
    yield d, clock
    d.request_stop()
    assert d.wait(15)


def test_hints_through_the_daemon(daemon, tmp_path):
    """The same over the daemon's RETAIN: the caps are the daemon's [retention] (tenant A: 4,
    no salt: 16); a session prefix survives a flood until its TTL, A is refused beyond 4 while
    the default tenant keeps its 8; the pins belong to the session, not the connection."""
    d, clock = daemon
    e = MiniVLLM(tmp_path / "unused", block_size=BS, socket=str(d.socket_path))
    try:
        agent, a = prompt(1), prompt(10)
        run(e, [("t1", agent, {"kv_transfer_params": hint("agent", ttl_s=60)}),
                ("a1", a, {"cache_salt": "A", "kv_transfer_params": hint("agent", ttl_s=60)}),
                ("plain", prompt(2), {})])
        c = e.sched.counters
        assert (c["retention_blocks_pinned"], c["retention_blocks_refused"]) == (N + 4, 4)
        flood(e, "a")
        assert (held(e, agent), held(e, a, "A"), held(e, prompt(2))) == (N, 4, 0)
        tenants = e.client.stats()["retention"]["tenants"]
        assert tenants[tenant_label("A")]["hints_refused"] >= 1
        assert tenants["default"]["hints_refused"] == 0
        clock.now += 61
        flood(e, "b")
        assert (held(e, agent), held(e, a, "A")) == (0, 0)
    finally:
        e.close()
