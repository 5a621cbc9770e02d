"""Cases ABT-32 and CHK-34 against vLLM's own Scheduler (built directly, as in
test_vllm_connector_unit.py; no model runs). Steps are scheduled back to back without their
outputs, as async scheduling does: vLLM advances ``num_computed_tokens`` at schedule time, so
the connector plans while no forward has run. The workers' answers are given by hand."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tierstore_plugins.vllm import CONNECTOR_NAME  # noqa: E402
from tierstore_plugins.vllm.metadata import TierStoreWorkerMeta  # noqa: E402

BS = 16


def _scheduler(model: str, data_dir: str, num_blocks: int, budget: int = 2048):
    import torch
    from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig,
                             SchedulerConfig, VllmConfig)
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,
                                            KVCacheTensor)
    from vllm.v1.structured_output import StructuredOutputManager

    mc = ModelConfig(model=model, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=2048)
    vc = VllmConfig(
        model_config=mc,
        # vLLM's own prefix cache off: a warm replay can only hit tierstore
        cache_config=CacheConfig(block_size=BS, enable_prefix_caching=False),
        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget,
                                         max_model_len=2048, is_encoder_decoder=False,
                                         enable_chunked_prefill=True),
        device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_role="kv_both",
            kv_connector_module_path="tierstore_plugins.vllm.connector",
            kv_connector_extra_config={"data_dir": data_dir, "dram_bytes": 16 << 20,
                                       "nvme_bytes": 0}))
    vc.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    kcc = KVCacheConfig(num_blocks=num_blocks,
                        kv_cache_tensors=[KVCacheTensor(size=2 * spec.page_size_bytes * num_blocks,
                                                        layers=["layers.0", "layers.1"],
                                                        layer_stride=spec.page_size_bytes * num_blocks,
                                                        block_stride=spec.page_size_bytes)],
                        kv_cache_groups=[KVCacheGroupSpec(["layers.0", "layers.1"], spec)])
    return Scheduler(vllm_config=vc, kv_cache_config=kcc, log_stats=True,
                     structured_output_manager=StructuredOutputManager(vc), block_size=BS)


def _request(req_id: str, tokens: list[int]):
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    return Request(request_id=req_id, prompt_token_ids=tokens,
                   sampling_params=SamplingParams(max_tokens=4), pooling_params=None,
                   block_hasher=get_request_block_hasher(BS, sha256))


def _budget(sched, n: int) -> None:
    """This step's token budget (vLLM reads both every schedule)."""
    sched.max_num_scheduled_tokens = n
    object.__setattr__(sched.scheduler_config, "max_num_batched_tokens", n)


def _answer_saves(sched, metas) -> list[tuple[str, int]]:
    """The workers' answer to every save of ``metas``: all copied. Returns (request, block
    index) per planned block."""
    from vllm.v1.outputs import KVConnectorOutput
    saves, planned = {}, []
    for meta in metas:
        for s in meta.saves:
            for j, slots in zip(s.job_ids, s.slots):
                saves[j] = [True] * len(slots)
            planned.extend((s.req_id, s.first + i) for i in range(len(s.block_ids)))
    sched.connector.update_connector_output(KVConnectorOutput(
        kv_connector_worker_meta=TierStoreWorkerMeta(saves=saves)))
    return planned


def _baseline(sched) -> None:
    side = sched.connector.scheduler_side
    store = side.client.store
    st = store.stats()
    assert (st["pins"], st["pending_stores"], st["pending_loads"]) == (0, 0, 0), st
    assert sum(store._reserved.values()) == 0
    assert not (side._reqs or side._save_jobs or side._load_jobs or side._waiting
                or side._dispatch)


def test_abt32_vllm_scheduler_aborts_before_blocks_and_mid_chunked_prefill(tiny_model, tmp_path):
    """ABT-32 on vLLM's Scheduler: (a) a request with block hashes and a planned hit but no
    blocks (the pool is too small) is aborted: no exception, its pins go back; (b) a 100-token
    prompt scheduled 48 then 52 tokens back to back (async: no output processed yet) is aborted:
    the plans cover only the full blocks of the tokens scheduled so far, the blocks are held
    until the save is answered, then everything is at baseline."""
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import RequestStatus

    sched = _scheduler(tiny_model, str(tmp_path / "store"), num_blocks=12, budget=48)
    side = sched.connector.scheduler_side
    hot = [(3 * i) % 500 + 1 for i in range(96)]
    from tierstore_plugins.vllm.backend import request_keys
    keys = request_keys(side.keyers, _request("k", hot), BS, side.geo.engine_hash_algo)[0]
    side.client.put(keys, side.namespaces[0], [bytes(side.block_bytes)] * len(keys))

    # (b) first, so it holds the pool: 48 then 52 tokens, no output in between
    toks = [(7 * i) % 500 + 1 for i in range(100)]
    sched.add_request(_request("b", toks))
    out1 = sched.schedule()
    assert out1.num_scheduled_tokens == {"b": 48}
    _budget(sched, 52)
    out2 = sched.schedule()
    assert out2.num_scheduled_tokens == {"b": 52}
    # (a) hashes and a planned hit (pins), no room for its blocks
    late = _request("a", hot + [9] * 100)
    assert len(late.block_hashes) == 12
    sched.add_request(late)
    out3 = sched.schedule()
    assert "a" not in out3.num_scheduled_tokens
    assert side.client.store.pins.total() == len(keys)
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert side.client.store.pins.total() == 0
    sched.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert "b" in sched.requests                 # held: its save is in flight
    planned = _answer_saves(sched, [out1.kv_connector_metadata, out2.kv_connector_metadata,
                                    out3.kv_connector_metadata])
    assert sorted(planned) == [("b", i) for i in range(6)]
    assert [s.first + len(s.block_ids) for s in out1.kv_connector_metadata.saves] == [3]
    sched.connector.update_connector_output(KVConnectorOutput(finished_sending={"b"}))
    assert side.client.lookup(keys, side.namespaces[0]).num_blocks == len(keys)
    _baseline(sched)
    sched.connector.shutdown()


def test_chk34_vllm_scheduler_chunked_prefill_stores_every_block_once(tiny_model, tmp_path):
    """CHK-34 on vLLM's Scheduler: a 1,000-token prompt (B=16) scheduled in steps of 96, 160,
    256 and 488 tokens back to back (async scheduling: no output in between): the plans name
    each of the 62 full blocks exactly once, the store writes 62 blocks, and a warm replay of
    the same prompt is scheduled for its last 8 tokens only (992 loaded)."""
    from vllm.v1.request import RequestStatus

    sched = _scheduler(tiny_model, str(tmp_path / "store"), num_blocks=160, budget=96)
    side = sched.connector.scheduler_side
    toks = [(11 * i) % 500 + 1 for i in range(1000)]
    sched.add_request(_request("cold", toks))
    metas = []
    for n in (96, 160, 256, 488):
        _budget(sched, n)
        out = sched.schedule()
        assert out.num_scheduled_tokens == {"cold": n}
        metas.append(out.kv_connector_metadata)
    planned = _answer_saves(sched, metas)
    assert sorted(planned) == [("cold", i) for i in range(62)]
    store = side.client.store
    assert store.counters["stored_blocks"] == 62
    sched.finish_requests("cold", RequestStatus.FINISHED_ABORTED)
    _budget(sched, 2048)
    sched.add_request(_request("warm", list(toks)))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"warm": 1000 - 992}
    (spec,) = out.kv_connector_metadata.loads
    assert spec.n_ok == 62
    assert not out.kv_connector_metadata.saves
    assert store.counters["stored_blocks"] == 62
    sched.connector.shutdown()
