"""The connector's asynchronous protocol (issue 12 build item 4), driven by a vLLM stand-in
(tests/plugins/minivllm.py) over a real embedded store: no vLLM needed, so the main suite runs
these. The end-to-end tests on real vLLM are in test_vllm_e2e.py / test_vllm_pd_netns.py."""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tierstore.tiers.nvme")

sys.path.insert(0, os.path.dirname(__file__))
from minivllm import MiniVLLM, Req, prompt, stored_blocks_right  # noqa: E402

from tierstore.errors import TransferFailed  # noqa: E402
from tierstore.types import Tier  # noqa: E402

BS = 16


@pytest.fixture
def engine(tmp_path):
    engines = []

    def make(**kw) -> MiniVLLM:
        e = MiniVLLM(tmp_path / "store", block_size=BS, **kw)
        engines.append(e)
        return e
    yield make
    for e in engines:
        e.close()


def test_dram_hit_is_a_synchronous_load_and_costs_three_store_calls(engine):
    """A hit held in DRAM loads in the step that schedules the request (load_async False);
    the store calls of the warm request: prepare_loads, complete_loads, and one shared
    prepare_stores/complete_stores pair for its new blocks; pins are released afterwards."""
    e = engine()
    toks = prompt(1, 100)
    e.add("cold", toks)
    e.run()
    assert stored_blocks_right(e, toks) == 6
    calls = e.sched.counters["store_calls"]
    e.add("warm", toks + prompt(2, 40))
    assert e.sched.get_num_new_matched_tokens(e.reqs["warm"], 0) == (6 * BS, False)
    assert e.sched.get_num_new_matched_tokens(e.reqs["warm"], 0) == (6 * BS, False)  # no call
    assert e.sched.counters["store_calls"] == calls + 1
    assert e.sched.hit_sources(e.reqs["warm"], 6 * BS) == {"dram": 6 * BS}
    e.run()
    assert e.outputs["warm"]["loaded_tokens"] == 6 * BS
    assert e.sched.counters["delivered_tokens"] == 6 * BS
    # prepare_loads, complete_loads, prepare_stores, complete_stores
    assert e.sched.counters["store_calls"] == calls + 4
    assert e.client.flush(timeout_s=30)          # the flusher's own pins go with the writes
    assert e.client.store.pins.total() == 0
    assert stored_blocks_right(e, toks + prompt(2, 40)) == 8


def test_may_load_async_says_where_the_stored_prefix_is(engine):
    """vLLM 0.34's ``may_load_async`` (asked when a request enters a waiting queue): a miss or a
    DRAM-held prefix is False (a synchronous load or none), a prefix that reaches NVMe is True,
    and get_num_new_matched_tokens then answers load_async=True as predicted; one lookup, no
    pins left behind; a planned load answers from its plan without a store call."""
    e = engine()
    toks = prompt(5, 100)
    assert e.sched.may_load_async(e.add("miss", toks + [9])) is False
    e.run()
    assert e.client.flush(timeout_s=30)
    dram = e.add("dram", toks + [1, 2])
    assert e.sched.may_load_async(dram) is False
    e.run()
    assert e.client.flush(timeout_s=30)
    keys = e.sched.keyers[0].chain(toks)
    assert e.client.evict(keys[3:], tier=Tier.DRAM)["evicted"] == 3   # blocks 3-5 on NVMe only
    r = e.add("warm", toks + [1, 2, 3])
    calls = e.sched.counters["store_calls"]
    assert e.sched.may_load_async(r) is True
    assert e.sched.counters["store_calls"] == calls + 1
    assert e.client.store.pins.total() == 0
    assert e.sched.get_num_new_matched_tokens(r, 0) == (6 * BS, True)
    calls = e.sched.counters["store_calls"]
    assert e.sched.may_load_async(r) is True                        # from the plan
    assert e.sched.counters["store_calls"] == calls
    e.run()
    assert e.outputs["warm"]["loaded_tokens"] == 6 * BS


def test_nvme_hit_is_asynchronous_and_the_request_waits_for_it(engine):
    """Blocks on NVMe only: get_num_new_matched_tokens answers load_async=True at once (no
    disk read on the scheduler's step), the request waits while the store's loader stages the
    blocks, the worker copies and reports it in finished_recving, the KV is right."""
    e = engine()
    toks = prompt(3, 100)
    e.add("cold", toks)
    e.run()
    assert e.client.flush(timeout_s=30)
    keys = e.sched.keyers[0].chain(toks)
    assert e.client.evict(keys, tier=Tier.DRAM)["evicted"] == 6   # NVMe only now
    r = e.add("warm", toks + [1, 2, 3])
    ext, is_async = e.sched.get_num_new_matched_tokens(r, 0)
    assert (ext, is_async) == (6 * BS, True)
    assert e.sched.hit_sources(r, ext) == {"nvme": 6 * BS}      # vLLM's per-tier hit metric
    e.run()
    assert e.sched.counters["promised_tokens_nvme"] == 6 * BS
    assert e.outputs["warm"]["loaded_tokens"] == 6 * BS
    assert e.sched.counters["loads_async"] == 1 and e.sched.counters["failed_tokens"] == 0
    assert e.worker.counters["loaded_blocks"] == 6
    assert e.client.flush(timeout_s=30)
    assert e.client.store.pins.total() == 0


def test_failed_load_never_saves_blocks_computed_on_top(engine, monkeypatch):
    """Issue 12 (the wrong-KV case): a synchronous load of blocks 0-5 fails in the worker (the
    copy raises) while the same step computes blocks 6-8 on top of the unloaded KV and saves
    them. The worker copies none of those (failed-load rule), the scheduler publishes none, vLLM
    recomputes from block 0, and every block the store ends up holding has the bytes of a
    computation from scratch; a later request gets a hit with right KV."""
    e = engine()
    base = prompt(4, 96)
    e.add("cold", base)
    e.run()
    longer = base + prompt(5, 60)
    copy_engine = e.worker.engine.engine          # the CopyEngine under the worker's Copier
    real = copy_engine.submit_onload
    fail = {"n": 1}

    def failing(slots, block_ids):
        if fail["n"]:
            fail["n"] -= 1
            raise TransferFailed("injected: DMA error")
        return real(slots, block_ids)
    monkeypatch.setattr(copy_engine, "submit_onload", failing)
    e.add("warm", longer)
    e.run()
    assert e.worker.counters["load_error_blocks"] == 6          # blocks 0-5
    assert e.worker.counters["saves_cut_by_failed_load"] >= 1
    assert e.sched.counters["save_blocks_not_copied"] >= 1
    assert stored_blocks_right(e, longer) == len(longer) // BS   # all right, none stale
    e.add("again", longer + [9])
    e.run()
    assert e.outputs["again"]["loaded_tokens"] == (len(longer) // BS) * BS


def test_async_load_of_a_request_aborted_while_staging_releases_everything(engine):
    """A request aborted while its NVMe blocks are being staged: the workers still answer it in
    finished_recving (vLLM holds its blocks until then), nothing is copied, pins go."""
    e = engine()
    toks = prompt(6, 100)
    e.add("cold", toks)
    e.run()
    assert e.client.flush(timeout_s=30)
    e.client.evict(e.sched.keyers[0].chain(toks), tier=Tier.DRAM)
    e.add("warm", toks + [1])
    gate = e.client.store.tiers[Tier.NVME]
    import threading
    release = threading.Event()
    real = gate.read_batch

    def held(items):
        release.wait(10)
        return real(items)
    gate.read_batch = held
    e.step()
    assert e.reqs["warm"].status == "loading"
    e.abort("warm")
    release.set()
    e.run()
    assert "warm" not in e.reqs
    assert e.client.flush(timeout_s=30)
    for _ in range(100):
        if e.client.store.pins.total() == 0:
            break
        threading.Event().wait(0.05)
    assert e.client.store.pins.total() == 0 and e.worker.counters["loaded_blocks"] == 0


def test_blocks_a_save_still_reads_are_freed_only_after_the_copy(engine):
    """request_finished returns delay_free_blocks while the request's save is unconfirmed; the
    worker answers finished_sending once its copies are done and reported."""
    e = engine()
    e.add("a", prompt(7, 64))
    e.step()                                   # prefill + the one output token
    assert e.reqs["a"].delayed and e.sched.counters["delayed_frees"] == 1
    e.run()
    assert "a" not in e.reqs and not e.sched._reqs


def test_pd_consumer_waits_for_the_producers_blocks(tmp_path):
    """P/D on one store: the consumer's request carries the producer's params; blocks the
    producer has not published yet make the consumer answer None (ask again) up to pd_wait_s,
    never a short hit; once published, every full block loads, and the partial tail too
    (``load_tail`` unset: on where the attention kernel takes it, issue 13 item 5), so vLLM
    computes only the last token."""
    prod = MiniVLLM(tmp_path / "p", block_size=BS, role="kv_producer")
    toks = prompt(8, 100)
    prod.add("r", toks)
    prod.step()
    params = prod.outputs["r"]["params"]
    assert params["tierstore"]["num_prompt_tokens"] == 100
    side = prod.sched
    from tierstore_plugins.vllm.scheduler_side import SchedulerSide
    cons = SchedulerSide(prod.client, prod.geo, prod.settings, role="kv_consumer",
                         engine_id="c")
    req = Req("d", toks, kv_transfer_params=params)
    published = prod.client.lookup(side.keyers[0].chain(toks), side.namespaces[0]).num_blocks
    answer = cons.get_num_new_matched_tokens(req, 0)
    if published < 6:
        assert answer == (None, False) and cons.counters["pd_waits"] == 1
    prod.run()
    assert cons.get_num_new_matched_tokens(Req("d2", toks, kv_transfer_params=params), 0)[0] \
        == 100 - 1
    cons.shutdown()
    prod.close()


def test_copier_runs_cpu_copies_off_the_calling_thread():
    """On the CPU device the worker's copies run on the copier's thread: start returns a ticket
    at once, poll says when the bytes are in place, a failed copy raises on poll; a copy the
    forward needs (now=True) is in place when start returns."""
    import threading

    from tierstore.io.copy import CopyEngine, PagedKV, slab_tensor
    from tierstore_plugins.vllm.copier import Copier

    kv = torch.randn(2, 8, 2, BS, 32).to(torch.bfloat16)
    paged = PagedKV.from_layer_views([kv[0], kv[1]])
    slab = slab_tensor(memoryview(bytearray(8 * paged.block_bytes)), 8, paged.block_bytes)
    c = Copier(CopyEngine(paged, slab, chunk_blocks=4))
    assert c.threaded
    t = c.start("offload", [0, 1, 2], [5, 6, 7])
    c.wait(t)
    assert any(th.name == "tierstore-copy" for th in threading.enumerate())
    kv[:, 1:4].zero_()
    t2 = c.start("onload", [0, 1, 2], [1, 2, 3], now=True)
    assert torch.equal(kv[:, 1:4], kv[:, 5:8]) and c.poll(t2)
    bad = c.start("onload", [0], [99])                # block id out of range
    for _ in range(200):
        try:
            if c.poll(bad):
                raise AssertionError("a bad copy reported done")
        except TransferFailed:
            break
        except Exception as e:   # ConfigError from the engine's checks is a TierStoreError
            assert "out of range" in str(e)
            break
        threading.Event().wait(0.01)
    else:
        raise AssertionError("the bad copy never finished")
    c.close()


def test_an_idle_engine_keeps_stepping_until_its_saves_are_published(engine):
    """After the last request finished, the workers still owe the report of its save copies:
    the connector says so (has_pending_push_work: vLLM's engine loop keeps stepping) until the
    scheduler published them; an engine shut down without those steps still publishes what the
    worker copied (embedded store)."""
    e = engine()
    toks = prompt(9, 100)
    e.add("a", toks)
    e.step()                                   # prefill + the one output token: finished
    assert e.sched.has_pending_work()
    for _ in range(50):
        if not e.sched.has_pending_work():
            break
        e.step()
        import time
        time.sleep(0.005)
    assert not e.sched.has_pending_work()
    assert stored_blocks_right(e, toks) == 6
    e.add("b", prompt(10, 100))
    e.step()                                   # finished, its report not stepped through
    e.worker.shutdown()                        # the worker half goes first: it publishes
    e.sched.shutdown()
    assert stored_blocks_right(e, prompt(10, 100)) == 6


def test_an_engine_shut_down_scheduler_first_still_publishes_its_last_saves(engine):
    """An in-process engine (vLLM's LLM with VLLM_ENABLE_V1_MULTIPROCESSING=0) stops stepping
    when its last request finished; at shutdown the scheduler half collects the unreported save
    results of the worker half in this process and publishes them."""
    e = engine()
    toks = prompt(11, 100)
    e.add("c", toks)
    e.step()
    assert e.sched.has_pending_work()
    e.sched.shutdown()                         # the scheduler half first
    e.worker.shutdown()
    assert stored_blocks_right(e, toks) == 6
