"""MET-38 token accounting and ABT-32 / CHK-34 attacks through minivllm."""
from __future__ import annotations

import threading
import time

import pytest

from minivllm import MiniVLLM, _Blocks
from tierstore.errors import TransferFailed
from tierstore.types import Tier

BS = 16


def prompt(seed, n):
    return [(seed * 131 + 7 * i) % 500 + 1 for i in range(n)]


@pytest.fixture
def engine(tmp_path):
    es = []

    def make(**kw):
        e = MiniVLLM(tmp_path / f"s{len(es)}", block_size=BS, **kw)
        es.append(e)
        return e
    yield make
    for e in es:
        e.close()


def identity_holds(tokens):
    tiers = {k.split(".", 1)[1] for k in tokens if "." in k}
    bad = {}
    for t in tiers:
        p = tokens.get(f"promised.{t}", 0)
        o = sum(tokens.get(f"{x}.{t}", 0) for x in ("delivered", "failed", "dropped"))
        if p != o:
            bad[t] = (p, o)
    return bad


def test_abort_during_async_load_counts_promised_and_declined(engine):
    """A request accepted with an async (NVMe) load and aborted while staging: its tokens are
    counted 'promised' (update_state_after_alloc) AND 'declined' (_finish). Expected: each
    promised token has one outcome (promised = delivered + failed + dropped, the documented
    MET-38 identity). Observed: promised.nvme 96, delivered/failed/dropped 0, declined 96."""
    e = engine()
    toks = prompt(6, 100)
    e.add("cold", toks)
    e.run()
    assert e.client.flush(timeout_s=30)
    e.client.evict(e.sched.keyers[0].chain(toks), tier=Tier.DRAM)
    e.add("warm", toks + [1])
    gate = e.client.store.tiers[Tier.NVME]
    release = threading.Event()
    real = gate.read_batch
    gate.read_batch = lambda items: (release.wait(10), real(items))[1]
    e.step()
    assert e.reqs["warm"].status == "loading"
    e.abort("warm")
    release.set()
    e.run()
    print(e.sched.tokens)
    assert not identity_holds(e.sched.tokens), (identity_holds(e.sched.tokens), e.sched.tokens)


def test_worker_copy_failure_counted_as_delivered(engine, monkeypatch):
    """A synchronous load whose copy fails in the worker (6 blocks reported as load errors,
    vLLM recomputes them): the scheduler counted them 'delivered' at dispatch and never learns
    otherwise. Expected: failed.dram 96, delivered.dram 0 (the hit ratio counts what engines
    got). Observed: delivered.dram 96, failed 0."""
    e = engine()
    base = prompt(4, 100)
    e.add("cold", base)
    e.run()
    ce = e.worker.engine.engine
    real = ce.submit_onload
    n = {"fail": 1}

    def failing(slots, ids):
        if n["fail"]:
            n["fail"] -= 1
            raise TransferFailed("injected")
        return real(slots, ids)
    monkeypatch.setattr(ce, "submit_onload", failing)
    e.add("warm", base + [1])
    e.run()
    assert e.worker.counters["load_error_blocks"] == 6
    t = e.sched.tokens
    print(t)
    assert t.get("delivered.dram", 0) == 0 and t.get("failed.dram", 0) == 6 * BS, t


def test_stats_json_equals_prometheus_and_no_negative(engine):
    from tierstore.metrics import DaemonMetrics
    from prometheus_client.parser import text_string_to_metric_families
    e = engine()
    for i in range(3):
        e.add(f"c{i}", prompt(i, 70))
        e.run()
        e.add(f"w{i}", prompt(i, 70) + [3])
        e.run()
    e.sched.shutdown()
    st = e.client.store.stats()
    fams = {f.name: f for f in text_string_to_metric_families(
        DaemonMetrics(e.client.store.stats).render().decode())}
    prom = {f"tokens_{s.labels['outcome']}_{s.labels['tier']}": s.value
            for s in fams["tierstore_tokens"].samples if s.name == "tierstore_tokens_total"}
    js = {k: v for k, v in st["counters"].items() if k.startswith("tokens_")}
    assert prom == js and all(v >= 0 for v in js.values())


def test_double_finish_and_finish_before_schedule(engine):
    e = engine()
    toks = prompt(1, 70)
    e.add("c", toks)
    e.run()
    assert e.client.flush(timeout_s=30)
    r = e.add("x", toks + [1])
    ext, _ = e.sched.get_num_new_matched_tokens(r, 0)
    assert ext > 0
    assert e.sched.request_finished(r, []) == (False, None)
    assert e.sched.request_finished(r, []) == (False, None)
    e.reqs.pop("x")
    assert e.client.store.pins.total() == 0
    # finish of a request accepted but never scheduled (blocks allocated, load not dispatched)
    r = e.add("y", toks + [2])
    ext, _ = e.sched.get_num_new_matched_tokens(r, 0)
    e._alloc(r, ext)
    e.sched.update_state_after_alloc(r, _Blocks(r.block_ids), ext)
    e.sched.request_finished(r, r.block_ids)
    e.free.extend(r.block_ids)
    r.block_ids = []
    e.reqs.pop("y")
    e.run()
    assert e.client.store.pins.total() == 0
    assert not e.sched._reqs and not e.sched._dispatch
    assert not identity_holds(e.sched.tokens), e.sched.tokens


def test_preempt_right_after_sync_load_dispatch_then_resume(engine):
    e = engine(async_sched=True)
    toks = prompt(2, 100)
    e.add("c", toks)
    e.run()
    assert e.client.flush(timeout_s=30)
    e.add("w", toks + [5], max_tokens=3)
    e.step()
    e.preempt("w")
    e.step()
    e.preempt("w")
    e.run()
    assert e.client.flush(timeout_s=30)
    for _ in range(100):
        if e.client.store.pins.total() == 0:
            break
        time.sleep(0.02)
    assert e.client.store.pins.total() == 0
    assert not identity_holds(e.sched.tokens), e.sched.tokens
