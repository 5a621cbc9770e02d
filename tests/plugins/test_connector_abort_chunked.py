"""Aborts during or before a save (case ABT-32) and chunked prefill under async scheduling (case
CHK-34), driven through the vLLM stand-in (tests/plugins/minivllm.py) over a real embedded
store. The same two cases against vLLM's own Scheduler are in test_vllm_abort_chunked.py."""

from __future__ import annotations

import os
import random
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tierstore.tiers.nvme")

sys.path.insert(0, os.path.dirname(__file__))
from minivllm import MiniVLLM, prompt, stored_blocks_right  # noqa: E402

from tierstore.errors import TransferFailed  # noqa: E402

BS = 16


class PlanSpy:
    """Records every save plan against the tokens that have KV once its step ran: a SaveSpec
    may only name full blocks below (position + scheduled tokens) // block size."""

    def __init__(self, e: MiniVLLM) -> None:
        self.e, self.bad, self.saved_blocks = e, [], []
        real = e.sched.build_connector_meta

        def spy(out):
            meta = real(out)
            pos = {d.req_id: d.num_computed_tokens for d in out.scheduled_new_reqs or ()}
            c = out.scheduled_cached_reqs
            if c is not None:
                pos.update(zip(c.req_ids, c.num_computed_tokens))
            for s in meta.saves:
                r = e.reqs[s.req_id]
                done = pos[s.req_id] + out.num_scheduled_tokens[s.req_id]
                end = s.first + len(s.block_ids)
                if end > min(done, r.num_prompt_tokens) // e.bs:
                    self.bad.append((s.req_id, s.first, end, done))
                self.saved_blocks.extend((s.req_id, s.first + i) for i in range(len(s.block_ids)))
            return meta
        e.sched.build_connector_meta = spy


def drain(e: MiniVLLM, max_steps: int = 400) -> None:
    for _ in range(max_steps):
        if not e.reqs and not e._inflight and not e.sched.has_pending_work():
            return
        if not e.step():
            time.sleep(0.002)
    raise AssertionError(f"not drained: {[(r.request_id, r.status) for r in e.reqs.values()]}")


def assert_baseline(e: MiniVLLM) -> None:
    """Pins, reserved slots and pending jobs of the store, and every per-request map of both
    connector halves, back at zero."""
    assert e.client.flush(timeout_s=30)
    store = e.client.store
    for _ in range(200):            # the loader thread may still hand back a staged job
        if store.pins.total() == 0 and not store._loads:
            break
        time.sleep(0.01)
    st = store.stats()
    assert (st["pins"], st["pending_stores"], st["pending_loads"]) == (0, 0, 0), st
    assert sum(store._reserved.values()) == 0
    assert store.check() == []
    s = e.sched
    assert not (s._reqs or s._save_jobs or s._load_jobs or s._waiting or s._release
                or s._cancelled or s._dispatch), "scheduler side kept request state"
    w = e.worker
    assert not (w._copies or w._req_pending or w._release_wanted or w._recv_done)
    assert sorted(e.free) == list(range(1, e.kv.shape[1])), "vLLM blocks leaked or doubled"


@pytest.fixture
def engine(tmp_path):
    engines = []

    def make(**kw) -> MiniVLLM:
        kw.setdefault("block_size", BS)
        e = MiniVLLM(tmp_path / f"store{len(engines)}", **kw)
        engines.append(e)
        return e
    yield make
    for e in engines:
        e.close()


# ------------------------------------------------------------------------------------ ABT-32
def test_abt32a_abort_with_block_hashes_but_no_blocks(engine):
    """ABT-32 (a): a request whose prompt is keyed and whose hit is planned (pins taken) but
    which never gets vLLM blocks (the pool is full) is aborted: no exception, no save planned,
    the pins of its planned load go back, no state is kept."""
    e = engine(num_blocks=12, async_sched=True)
    toks = prompt(1, 100)
    e.add("warm", toks)
    drain(e)
    assert stored_blocks_right(e, toks) == 6
    e.add("hog", prompt(2, 160))             # takes 10 of the 11 blocks
    e.step()
    r = e.add("late", toks + prompt(3, 20))  # 6 hit blocks + 2: no room, stays waiting
    e.step()
    assert r.status == "waiting" and not r.block_ids
    assert e.client.store.pins.total() > 0   # its load is planned, pinned
    e.abort("late")
    e.abort("late")                          # a second abort of the same request: nothing
    e.abort("hog")
    drain(e)
    assert_baseline(e)


def test_abt32a_request_finished_without_ever_being_scheduled(engine):
    """ABT-32 (a), scheduler side alone: request_finished for a request only ever looked up,
    and for one never seen, with empty block lists: no exception, nothing delayed."""
    e = engine()
    toks = prompt(4, 64)
    e.add("a", toks)
    e.run()
    from minivllm import Req
    r = Req("b", toks + [1])
    assert e.sched.get_num_new_matched_tokens(r, 0) == (4 * BS, False)
    assert e.sched.request_finished(r, []) == (False, None)
    assert e.sched.request_finished(Req("never", toks), []) == (False, None)
    assert e.sched.request_finished(r, []) == (False, None)    # repeated: still nothing
    assert_baseline(e)


@pytest.mark.parametrize("async_sched", [True, False])
def test_abt32b_abort_mid_chunked_prefill(engine, async_sched):
    """ABT-32 (b): a 100-token prompt prefilled 48 tokens at a time is aborted once 48 tokens
    are computed; with async scheduling the next chunk is already scheduled and the request's
    computed count lags. Save plans name only full blocks whose KV exists once their step ran,
    every stored block has the right bytes, and everything goes back to baseline."""
    e = engine(async_sched=async_sched, steps=[48, 52], chunk=48)
    spy = PlanSpy(e) if async_sched else None
    toks = prompt(5, 100)
    r = e.add("a", toks)
    while r.num_computed_tokens < 48:
        e.step()
    assert r.num_computed_tokens == 48 and r.status == "running"
    e.abort("a")
    drain(e)
    assert e.frees["a"] == 1
    n = stored_blocks_right(e, toks)
    assert n >= 3                       # the 3 blocks computed before the abort were saved
    if spy is not None:
        assert spy.bad == []
    assert_baseline(e)


def _finish_with_save_in_flight(e: MiniVLLM, toks: list[int]):
    r = e.add("c", toks)
    while r.status != "finished":
        e.step()
    assert r.delayed, "its save is still in flight: vLLM must keep its blocks"
    return r


@pytest.mark.parametrize("async_sched", [True, False])
def test_abt32c_abort_after_request_finished_store_completes(engine, async_sched):
    """ABT-32 (c): the request finished and its store is in flight when the client's abort
    arrives (vLLM ignores it; a connector asked twice must not release twice): the store
    completes, the blocks are freed exactly once."""
    e = engine(async_sched=async_sched)
    toks = prompt(6, 100)
    r = _finish_with_save_in_flight(e, toks)
    e.abort("c")
    again = e.sched.request_finished(r, list(r.block_ids))   # a duplicate finish
    assert again[0] is True             # its blocks are still held for the same save
    drain(e)
    assert e.frees["c"] == 1
    assert e.sched.counters["delayed_frees"] == 1
    assert stored_blocks_right(e, toks) == 6
    assert_baseline(e)


def test_abt32c_store_in_flight_fails_and_is_cancelled(engine, monkeypatch):
    """ABT-32 (c), failing copy: the save of an aborted request fails in the worker; the store
    job is cancelled (nothing published, its slots released) and the blocks are freed once."""
    e = engine(async_sched=True)
    copy_engine = e.worker.engine.engine

    def failing(slots, block_ids):
        raise TransferFailed("injected: copy failed")
    monkeypatch.setattr(copy_engine, "submit_offload", failing)
    toks = prompt(7, 100)
    _finish_with_save_in_flight(e, toks)
    e.abort("c")
    drain(e)
    assert e.frees["c"] == 1
    assert stored_blocks_right(e, toks) == 0
    assert e.sched.counters["save_blocks_not_copied"] == 6
    assert_baseline(e)


def test_abt32c_shutdown_with_store_in_flight_cancels_it(engine):
    """ABT-32 (c), engine stops: a scheduler side shut down while a finished request's store is
    unreported completes or cancels every job: no pending store, no pin, no reserved slot."""
    e = engine(async_sched=True)
    toks = prompt(8, 100)
    _finish_with_save_in_flight(e, toks)
    e.sched.shutdown()
    e.worker.shutdown()
    assert e.client.flush(timeout_s=30)     # the write-behind's own pins go with its writes
    st = e.client.store.stats()
    assert (st["pins"], st["pending_stores"], st["pending_loads"]) == (0, 0, 0)
    assert e.client.store.check() == []
    assert stored_blocks_right(e, toks) in (0, 6)


def _soak(e: MiniVLLM, rng: random.Random, aborts: int, max_steps: int) -> dict:
    """Random traffic over a few shared prefixes; every step maybe admits, preempts and aborts.
    Returns what happened; raises whatever escapes the connector."""
    bases = [prompt(50 + i, 80) for i in range(4)]
    done = {"aborts": 0, "preemptions": 0, "finished": 0}
    k = 0
    for _ in range(max_steps):
        if done["aborts"] >= aborts:
            break
        if len(e.reqs) < 6:
            toks = bases[rng.randrange(4)][:rng.choice((16, 40, 64, 80))] + \
                prompt(k, rng.randrange(1, 60))
            e.add(f"r{k}", toks, max_tokens=rng.choice((1, 2, 3)))
            k += 1
        running = [r.request_id for r in e.reqs.values() if r.status == "running"]
        if running and rng.random() < 0.5:     # continuous preemption
            done["preemptions"] += e.preempt(rng.choice(running))
        live = [r.request_id for r in e.reqs.values() if r.status != "finished"]
        if live and rng.random() < 0.7:
            e.abort(rng.choice(live))
            done["aborts"] += 1
        before = len(e.outputs)
        e.step()
        done["finished"] += len(e.outputs) - before
    for rid in list(e.reqs):
        e.abort(rid)
    drain(e)
    return done


def test_abt32d_a_thousand_random_aborts_under_continuous_preemption(engine):
    """ABT-32 (d): 1,000 random aborts while requests are preempted continuously, with async
    scheduling (one step always in flight): no exception escapes, every block the store holds
    has the KV of its prefix, and pins, reserved slots, pending jobs and the connector's
    per-request maps are back at baseline; vLLM's blocks are all free, none freed twice."""
    e = engine(async_sched=True, steps=[24, 40], num_blocks=96)
    done = _soak(e, random.Random(1234), 1000, 20_000)
    assert done["aborts"] >= 1000 and done["preemptions"] > 100
    assert all(n == 1 for n in e.frees.values())
    for i in range(4):
        assert stored_blocks_right(e, prompt(50 + i, 80)) >= 0
    assert_baseline(e)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as hs  # noqa: E402


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=hs.integers(0, 2**32 - 1), steps=hs.lists(hs.integers(1, 70), min_size=1,
                                                      max_size=3),
       async_sched=hs.booleans())
def test_abt32d_random_aborts_property(tmp_path_factory, seed, steps, async_sched):
    """ABT-32 (d), property: for any seed and prefill step sizes, random aborts under
    preemption leave the store and both connector halves at baseline, and never a wrong
    block."""
    e = MiniVLLM(tmp_path_factory.mktemp("abt32d"), block_size=BS, async_sched=async_sched,
                 steps=steps, num_blocks=64)
    try:
        if not async_sched:
            e.prefill_steps = steps     # the sync path chunks by ``chunk``
            e.chunk = max(steps)
            e.preempt = lambda rid: False
        _soak(e, random.Random(seed), 60, 2_000)
        for i in range(4):
            stored_blocks_right(e, prompt(50 + i, 80))
        assert all(n == 1 for n in e.frees.values())
        assert_baseline(e)
    finally:
        e.close()


# ------------------------------------------------------------------------------------ CHK-34
@pytest.mark.parametrize("bs,steps", [(16, [96, 160, 256, 488]), (16, [97, 159, 255, 489]),
                                      (64, [96, 160, 256, 488])])
@pytest.mark.parametrize("async_sched", [True, False])
def test_chk34_chunked_prefill_stores_every_full_block_once(engine, bs, steps, async_sched):
    """CHK-34: a 1,000-token prompt prefilled in steps of 96, 160, 256 and 488 tokens (and
    steps that cut blocks, and 64-token blocks that the steps cut), with async scheduling
    (the request's computed count lags the scheduled one): the cold pass stores every full
    block once, those straddling step boundaries included, with the right bytes; the store's
    write counter equals the number of full blocks (no duplicate writes); a warm replay of the
    same prompt hits every full block but the one holding the last token when it is full
    (vLLM computes at least the last token), and writes nothing new."""
    e = engine(block_size=bs, async_sched=async_sched, steps=steps, num_blocks=1200 // bs + 8,
               chunk=max(steps), dram_bytes=(1200 // bs + 8) * 512 * bs)
    if not async_sched:
        it = iter(steps)
        e.chunk = next(it)
        real = e.sched.build_connector_meta

        def next_chunk(out):          # the sync stand-in chunks by ``chunk``: walk the steps
            meta = real(out)
            e.chunk = next(it, e.chunk)
            return meta
        e.sched.build_connector_meta = next_chunk
    spy = PlanSpy(e) if async_sched else None
    toks = prompt(9, 1000)
    n_full = 1000 // bs
    e.add("cold", toks)
    drain(e)
    assert stored_blocks_right(e, toks) == n_full
    store = e.client.store
    assert store.counters["stored_blocks"] == n_full
    assert e.sched.counters["saved_blocks"] == n_full
    if spy is not None:
        assert spy.bad == []
        assert sorted(b for _, b in spy.saved_blocks) == list(range(n_full))
    hit = min(n_full, (1000 - 1) // bs) * bs
    r = e.add("warm", list(toks))
    e.run() if not async_sched else drain(e)
    assert r.loaded_tokens == hit
    assert store.counters["stored_blocks"] == n_full
    assert_baseline(e)


def test_abt32d_preempted_request_loads_again_when_resumed(engine):
    """ABT-32 (d), preemption: a request whose hit was loaded is preempted while that step is
    in flight; vLLM asks get_num_new_matched_tokens again when it resumes, and the connector
    plans the load anew (it used to answer 0: a resumed request recomputed its whole hit)."""
    e = engine(async_sched=True)
    toks = prompt(12, 100)
    e.add("cold", toks)
    drain(e)
    r = e.add("warm", toks + prompt(13, 30))
    e.step()                                  # scheduled with a synchronous load, in flight
    assert r.status == "running" and r.loaded_tokens == 6 * BS
    assert e.preempt("warm")
    drain(e)
    assert e.sched.counters["loads"] == 2 and e.sched.counters["preempted"] == 1
    assert e.outputs["warm"]["loaded_tokens"] == 6 * BS
    assert stored_blocks_right(e, toks + prompt(13, 30)) == 8
    assert_baseline(e)


def test_abt32_worker_never_reports_a_key_without_a_block_as_copied(engine):
    """ABT-32, worker side: a save that names more keys than vLLM blocks (a plan past the
    blocks vLLM holds) copies what has a block and answers False for the rest, so the store
    never publishes a slot nobody wrote."""
    from tierstore_plugins.vllm.metadata import SaveSpec, TierStoreMetadata
    e = engine()
    keys = e.sched.keyers[0].chain(prompt(14, 32))
    (job,) = e.client.prepare_stores([(keys, e.sched.namespaces[0], e.sched.block_bytes, None)])
    e.worker.wait_for_save(TierStoreMetadata(saves=[SaveSpec("x", [3], [job.slots],
                                                             [job.job_id], 0)]))
    e.worker._drain()
    wm = e.worker.build_connector_worker_meta()
    assert wm.saves[job.job_id] == [True, False]
    e.client.complete_stores([(job.job_id, wm.saves[job.job_id])])
    assert e.client.lookup(keys, e.sched.namespaces[0]).num_blocks == 1
