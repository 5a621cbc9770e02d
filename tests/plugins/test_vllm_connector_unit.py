"""The connector against vLLM's own classes: KVConnectorFactory, Request with its block hasher,
and a Scheduler built directly (as vLLM's connector unit tests do), no model execution."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tierstore.errors import ConfigError  # noqa: E402
from tierstore_plugins.vllm import CONNECTOR_NAME, register  # noqa: E402
from tierstore_plugins.vllm.metadata import PluginSettings, TierStoreMetadata  # noqa: E402

BS = 32


def test_register_is_idempotent_and_resolves_both_ways():
    """The entry point may run many times per process; the name and the module path resolve to
    the same class."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from tierstore_plugins.vllm.connector import TierStoreConnector

    register()
    register()
    by_name = KVConnectorFactory.get_connector_class(
        KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both"))
    by_path = KVConnectorFactory.get_connector_class(
        KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both",
                         kv_connector_module_path="tierstore_plugins.vllm.connector"))
    assert by_name is by_path is TierStoreConnector


@pytest.mark.parametrize("extra", [{}, {"socket": "/s", "data_dir": "/d"},
                                   {"data_dir": "/d", "bogus": 1},
                                   {"data_dir": "/d", "load_failure_policy": "ignore"}])
def test_settings_refuse_bad_extra_config(extra):
    """Exactly one backend; known keys only; a known failure policy."""
    with pytest.raises(ConfigError):
        PluginSettings.from_extra_config(extra)


def _configs(model: str, data_dir: str, *, max_num_seqs: int = 8, nvme_bytes: int = 0,
             **sched_kw):
    """A VllmConfig with the connector (embedded store) and a 2-layer, 64-block KVCacheConfig."""
    from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig,
                             SchedulerConfig, VllmConfig)
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,
                                            KVCacheTensor)
    import torch

    mc = ModelConfig(model=model, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=2048)
    vc = VllmConfig(
        model_config=mc,
        cache_config=CacheConfig(block_size=BS, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=2048,
                                         max_model_len=2048, is_encoder_decoder=False,
                                         **sched_kw),
        device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_role="kv_both",
            kv_connector_module_path="tierstore_plugins.vllm.connector",
            kv_connector_extra_config={"data_dir": data_dir, "dram_bytes": 4 << 20,
                                       "nvme_bytes": nvme_bytes}))
    vc.cache_config.num_gpu_blocks = 64
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    num_blocks = 64
    kcc = KVCacheConfig(num_blocks=num_blocks,
                        kv_cache_tensors=[KVCacheTensor(size=2 * spec.page_size_bytes * num_blocks,
                                                        layers=["layers.0", "layers.1"],
                                                        layer_stride=spec.page_size_bytes * num_blocks,
                                                        block_stride=spec.page_size_bytes)],
                        kv_cache_groups=[KVCacheGroupSpec(["layers.0", "layers.1"], spec)])
    return vc, kcc


def _scheduler(model: str, data_dir: str, **kw):
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    vc, kcc = _configs(model, data_dir, **kw)
    return Scheduler(vllm_config=vc, kv_cache_config=kcc, log_stats=True,
                     structured_output_manager=StructuredOutputManager(vc), block_size=BS)


def _request(req_id: str, tokens: list[int], salt=None):
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    return Request(request_id=req_id, prompt_token_ids=tokens,
                   sampling_params=SamplingParams(max_tokens=4), pooling_params=None,
                   cache_salt=salt, block_hasher=get_request_block_hasher(BS, sha256))


def _keys(side, tokens: list[int]) -> list[bytes]:
    """The keys the scheduler side derives for a plain request of ``tokens``."""
    from tierstore_plugins.vllm.backend import request_keys
    return request_keys(side.keyers, _request("keys", tokens), BS, side.geo.engine_hash_algo)[0]


@pytest.mark.parametrize("keys,algo,expect", [
    ("auto", "sha256", "vllm-sha256:"), ("auto", "xxhash", ""), ("tokens", "sha256", ""),
    ("engine", "sha256_cbor", "vllm-sha256_cbor:"), ("engine", "xxhash", None)])
def test_key_source_follows_vllm_hash_algo(tiny_model, tmp_path, keys, algo, expect):
    """Issue 12 item 5: keys come from vLLM's own block hashes only where those are the same in
    every process (sha256 / sha256_cbor); ``keys="engine"`` refuses anything else at start,
    ``"auto"`` falls back to token ids. The mode is part of the namespace: engines keyed
    differently never share blocks."""
    from tierstore_plugins.vllm.backend import key_source
    vc, kcc = _configs(tiny_model, str(tmp_path / "store"))
    vc.cache_config.prefix_caching_hash_algo = algo
    settings = PluginSettings.from_extra_config({"data_dir": str(tmp_path), "keys": keys})
    if expect is None:
        with pytest.raises(ConfigError, match="keys='engine'"):
            key_source(vc, kcc, settings, BS, speculative=False)
        return
    src = key_source(vc, kcc, settings, BS, speculative=False)
    assert src.startswith(expect) if expect else src == ""
    if keys == "engine":     # speculative decoding adds lookahead tokens to vLLM's hashes
        with pytest.raises(ConfigError, match="speculative"):
            key_source(vc, kcc, settings, BS, speculative=True)
    else:
        assert key_source(vc, kcc, settings, BS, speculative=True) == ""


def test_engine_keys_match_vllm_hashes_and_salt(tiny_model, tmp_path):
    """Engine-hash keys: two requests with the same tokens get the same keys in this process
    and the keys of a freshly hashed request (no per-process root); another cache_salt or one
    changed token changes every key from that block on."""
    sched = _scheduler(tiny_model, str(tmp_path / "store"))
    side = sched.connector.scheduler_side
    tokens = [(11 * i) % 500 + 1 for i in range(5 * BS)]
    a, b = _keys(side, tokens), _keys(side, list(tokens))
    assert a == b and len(a) == 5 and len(set(a)) == 5
    assert a != side.keyers[0].chain(tokens)              # not the token-id chain
    from tierstore_plugins.vllm.backend import request_keys
    salted = request_keys(side.keyers, _request("s", tokens, salt="t"), BS,
                          side.geo.engine_hash_algo)[0]
    assert not set(salted) & set(a)
    changed = list(tokens)
    changed[2 * BS + 3] += 1
    c = _keys(side, changed)
    assert c[:2] == a[:2] and not set(c[2:]) & set(a)
    sched.connector.shutdown()


def test_scheduler_loads_hit_beyond_engine_and_unpins_on_abort(tiny_model, tmp_path):
    """A 300-token prompt whose 9 full blocks are in tierstore: vLLM schedules only the 12
    remaining tokens, the metadata loads exactly 9 blocks into the request's first 9 block ids,
    pins are held until the request is aborted, then released (BLK-05 / EVC pins)."""
    from vllm.v1.request import RequestStatus

    sched = _scheduler(tiny_model, str(tmp_path / "store"))
    side = sched.connector.scheduler_side
    tokens = [(7 * i) % 500 + 1 for i in range(300)]
    assert side.geo.engine_hash_algo == "sha256"     # keys="auto" takes vLLM's block hashes
    keys = _keys(side, tokens)
    assert len(keys) == 9
    side.client.put(keys, side.namespaces[0], [bytes(1024)] * 9)

    req = _request("r1", tokens)
    assert len(req.block_hashes) == 9          # vLLM's own hasher ran
    sched.add_request(req)
    out = sched.schedule()
    assert out.num_scheduled_tokens["r1"] == 300 - 288
    # a DRAM hit is a synchronous load: vLLM >= 0.33 then starts it before the forward
    assert getattr(out, "has_sync_kv_loads", True)
    meta = out.kv_connector_metadata
    assert isinstance(meta, TierStoreMetadata) and len(meta.loads) == 1
    block_ids = sched.kv_cache_manager.get_block_ids("r1")[0]
    spec = meta.loads[0]
    assert spec.block_ids == block_ids[:9] and spec.n_ok == 9 and not spec.is_async
    store = side.client.store
    assert [store.block(k)["slots"]["dram"] for k in keys] == spec.slots[0]
    assert sum(store.res.pins[store.res.get(k)] for k in keys) == 9
    sched.finish_requests("r1", RequestStatus.FINISHED_ABORTED)
    # the workers already have the load: its pins go when they report the copy done
    assert sum(store.res.pins[store.res.get(k)] for k in keys) == 9
    from vllm.v1.outputs import KVConnectorOutput
    from tierstore_plugins.vllm.metadata import TierStoreWorkerMeta
    sched.connector.update_connector_output(KVConnectorOutput(
        kv_connector_worker_meta=TierStoreWorkerMeta(loads=spec.job_ids)))
    assert sum(store.res.pins[store.res.get(k)] for k in keys) == 0
    sched.connector.shutdown()


def test_scheduler_salt_and_partial_blocks(tiny_model, tmp_path):
    """Another cache_salt gets no hit (KEY-01); a prompt that is all hit still leaves its last
    block to vLLM (never the whole prompt, BLK-05); the partial tail is never a prefix key."""
    sched = _scheduler(tiny_model, str(tmp_path / "store"))
    side = sched.connector.scheduler_side
    tokens = [(5 * i) % 500 + 1 for i in range(320)]          # exactly 10 blocks
    keys = _keys(side, tokens)
    side.client.put(keys, side.namespaces[0], [bytes(1024)] * len(keys))
    salted = _request("s", tokens, salt="tenant-b")
    assert side.get_num_new_matched_tokens(salted, 0) == (0, False)
    plain = _request("p", tokens)
    assert side.get_num_new_matched_tokens(plain, 0) == (9 * BS, False)
    assert side.get_num_new_matched_tokens(plain, 0) == (9 * BS, False)   # repeatable
    assert side.get_num_new_matched_tokens(plain, 2 * BS) == (7 * BS, False)
    side.request_finished(plain, [])
    side.request_finished(salted, [])
    store = side.client.store
    assert sum(store.res.pins[store.res.get(k)] for k in keys) == 0
    sched.connector.shutdown()


class _WorkerRig:
    """A scheduler-role and a worker-role connector made by vLLM's KVConnectorFactory over one
    embedded store, the worker registered on a 2-layer CPU KV cache; saves and loads are driven
    through the worker hooks as vLLM's steps call them."""

    def __init__(self, vc, kcc):
        import torch
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

        self.sched = KVConnectorFactory.create_connector(vc, KVConnectorRole.SCHEDULER, kcc)
        self.worker = KVConnectorFactory.create_connector(vc, KVConnectorRole.WORKER, kcc)
        nb, heads, c = 64, 2, 64                   # [num_blocks, H, N, K|V] per layer, bf16
        self.storage = torch.randn(2 * nb * heads * BS * c).to(torch.bfloat16)
        self.layers = self.storage.view(2, nb, heads, BS, c)
        self.worker.register_kv_caches({"layers.0": self.layers[0],
                                        "layers.1": self.layers[1]})
        self.side = self.sched.scheduler_side
        self.client = self.side.client
        self.keys = self.side.keyers[0].chain([(3 * i) % 500 + 1 for i in range(2 * BS)])

    def step(self, meta, load: bool):
        import time

        from tierstore_plugins.vllm.metadata import TierStoreWorkerMeta
        worker = self.worker
        worker.bind_connector_metadata(meta)
        (worker.start_load_kv if load else lambda _ctx: worker.wait_for_save())(None)
        errors, wm = set(), TierStoreWorkerMeta()
        deadline = time.monotonic() + 10
        while True:   # copies run on the copier's thread: poll as vLLM's later steps would
            worker.get_finished(set())
            errors |= worker.get_block_ids_with_load_errors()
            wm = wm.aggregate(worker.build_connector_worker_meta())
            want = len(meta.saves) + sum(1 for s_ in meta.loads if s_.n_ok)
            if len(wm.saves) + len(wm.loads) >= want or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        worker.clear_connector_metadata()
        return errors, wm

    def save(self, block_ids):
        """Save the rig's keys from ``block_ids``: (store job, per-key copied)."""
        from tierstore_plugins.vllm.metadata import SaveSpec
        (job,) = self.client.prepare_stores([(self.keys, self.side.namespaces[0],
                                              self.side.block_bytes, None)])
        _, wm = self.step(TierStoreMetadata(saves=[SaveSpec("a", block_ids, [job.slots],
                                                            [job.job_id], 0)]), False)
        return job, wm.saves[job.job_id]

    def load(self, block_ids):
        """Load the rig's keys into ``block_ids``: the block ids reported as load errors."""
        from tierstore_plugins.vllm.metadata import LoadSpec
        (lj,) = self.client.prepare_loads([self.keys])
        spec = LoadSpec("b", block_ids, [lj.slots], lj.num_ready, 0, [lj.job_id])
        errors, _ = self.step(TierStoreMetadata(loads=[spec]), True)
        self.client.complete_loads([lj.job_id])
        return errors

    def close(self):
        self.worker.shutdown()
        self.sched.shutdown()


def test_worker_sleep_hooks_stop_and_resume_copies(tiny_model, tmp_path):
    """Sleep mode (vLLM >= 0.33 calls unregister_kv_caches / restore_kv_caches; 0.32 never does,
    the methods are plain extras there): while unregistered no copy touches the KV cache (a load
    is reported as load errors, a save copies nothing and answers False per key); after restore
    a load round-trips the blocks saved before the sleep. Both calls are idempotent."""
    import torch

    from tierstore_plugins.vllm.connector import TierStoreConnector

    vc, kcc = _configs(tiny_model, str(tmp_path / "store"))
    assert TierStoreConnector.supports_sleep_mode(vc.kv_transfer_config) is True
    rig = _WorkerRig(vc, kcc)
    worker, layers, client = rig.worker, rig.layers, rig.client
    job, oks = rig.save([3, 4])
    assert oks == [True, True]
    client.complete_store(job.job_id, ok=oks)
    assert worker.worker_side.counters["saved_blocks"] == 2
    layers[:, 10:12].zero_()

    worker.unregister_kv_caches()
    worker.unregister_kv_caches()
    assert worker.worker_side.engine is None
    assert rig.load([10, 11]) == {10, 11}
    assert not layers[:, 10:12].any()
    client.evict(rig.keys)
    job, oks = rig.save([5, 6])
    assert oks == [False, False]                    # asleep: nothing copied, nothing published
    assert client.complete_store(job.job_id, ok=oks)[0].value == "failed"
    worker.restore_kv_caches()
    worker.restore_kv_caches()
    job, oks = rig.save([3, 4])
    client.complete_store(job.job_id, ok=oks)
    assert rig.load([10, 11]) == set()
    assert torch.equal(layers[:, 10:12], layers[:, 3:5])
    rig.close()


# ---------------------------------------------------------------- vLLM 0.34's new hooks
def _vllm_034():
    """Skip unless this vLLM has 0.34's connector hooks (KVCacheAccess marks them)."""
    try:
        from vllm.config.kv_transfer import KVCacheAccess
    except ImportError:
        pytest.skip("vLLM < 0.34: no kv_cache_access / may_load_async / lookahead hashes")
    return KVCacheAccess


def test_vllm034_kv_cache_access_is_in_process_so_the_extensible_cache_may_back_it(
        tiny_model, tmp_path, monkeypatch):
    """kv_cache_access: vLLM asks the configured connector class through its factory; tierstore
    only copies with torch in the worker's process, so IN_PROCESS: nothing registered with
    UCX/RDMA, nothing exported, no memory pool of ours. vLLM's own resolution of the
    extensible KV cache then turns it on where the platform has one (here a CUDA platform is
    claimed, since this machine has none)."""
    KVCacheAccess = _vllm_034()
    from vllm.platforms import current_platform

    from tierstore_plugins.vllm.connector import TierStoreConnector

    vc, kcc = _configs(tiny_model, str(tmp_path / "store"))
    kvt = vc.kv_transfer_config
    assert TierStoreConnector.kv_cache_access(kvt) is KVCacheAccess.IN_PROCESS
    assert kvt.kv_cache_access() is KVCacheAccess.IN_PROCESS
    assert not kvt.registers_kv_cache_memory() and not kvt.uses_custom_mem_pool()
    # CPU: vLLM settled it off at VllmConfig creation; resolve again on a CUDA-like platform
    assert vc.cache_config.enable_extensible_kv_cache is False
    monkeypatch.setattr(current_platform, "is_cuda_alike", lambda: True)
    monkeypatch.setattr(current_platform, "is_rocm", lambda: False)
    vc.cache_config._extensible_kv_cache_resolved = False
    vc.cache_config.enable_extensible_kv_cache = None
    vc.cache_config.num_gpu_blocks_override = None
    vc._resolve_extensible_kv_cache()
    assert vc.cache_config.enable_extensible_kv_cache is True
    # extend_kv_cache refuses a connector that allocates the KV cache from its own pool
    rig = _WorkerRig(vc, kcc)
    assert rig.worker.get_mem_pool_context() is None
    rig.close()


def test_vllm034_lookahead_block_hashes_declined(tiny_model, tmp_path):
    """supports_lookahead_block_hashes: False (tierstore refuses EAGLE-style drafts, whose draft
    KV these hashes exist for). vLLM's own resolution with an EAGLE-like speculative config then
    hashes without lookahead tokens under tierstore, where an opted-in connector (vLLM's
    OffloadingConnector) gets the lookahead; a plain engine's block hashes are unchanged."""
    _vllm_034()
    from types import SimpleNamespace

    from vllm.config import KVTransferConfig, VllmConfig

    from tierstore_plugins.vllm.connector import TierStoreConnector

    vc, _ = _configs(tiny_model, str(tmp_path / "store"))
    assert TierStoreConnector.supports_lookahead_block_hashes(vc.kv_transfer_config) is False

    def lookahead(kvt):
        eagle = SimpleNamespace(use_eagle_block_drop=lambda: True,
                                disable_lookahead_block_hashes=False)
        return VllmConfig._resolve_num_hash_lookahead_tokens(SimpleNamespace(
            speculative_config=eagle, kv_transfer_config=kvt, cache_config=vc.cache_config,
            num_prefill_lookahead_tokens=1))

    assert lookahead(vc.kv_transfer_config) == 0
    assert lookahead(KVTransferConfig(kv_connector="OffloadingConnector",
                                      kv_role="kv_both")) == 1
    # no speculative config: vLLM's hashes are the plain chain the engine keys are made from
    req = _request("plain", [(7 * i) % 500 + 1 for i in range(3 * BS)])
    assert len(req.block_hashes) == 3


def test_vllm034_may_load_async_starts_an_nvme_load_while_the_batch_is_full(tiny_model,
                                                                            tmp_path):
    """may_load_async with --max-num-inflight-kv-loads: vLLM's Scheduler puts a request whose
    stored prefix is on NVMe in its async-load queue and starts the load while its one running
    slot is taken (the request waits in WAITING_FOR_REMOTE_KVS, its blocks are being staged);
    a request whose prefix is in DRAM (a synchronous load) waits for a slot as before."""
    _vllm_034()
    from vllm.v1.request import RequestStatus

    from tierstore.types import Tier

    sched = _scheduler(tiny_model, str(tmp_path / "store"), max_num_seqs=1,
                       nvme_bytes=64 << 20, max_num_inflight_kv_loads=2)
    side = sched.connector.scheduler_side
    nvme_toks = [(7 * i) % 500 + 1 for i in range(300)]
    dram_toks = [(13 * i) % 500 + 1 for i in range(300)]
    nvme_keys, dram_keys = _keys(side, nvme_toks), _keys(side, dram_toks)
    ns = side.namespaces[0]
    side.client.put(nvme_keys, ns, [bytes(side.block_bytes)] * 9)
    side.client.put(dram_keys, ns, [bytes(side.block_bytes)] * 9)
    assert side.client.flush(timeout_s=30)
    assert side.client.evict(nvme_keys, tier=Tier.DRAM)["evicted"] == 9

    sched.add_request(_request("busy", [(3 * i) % 500 + 1 for i in range(40)]))
    out = sched.schedule()
    assert list(out.num_scheduled_tokens) == ["busy"]     # the one running slot is taken
    nvme, dram = _request("nvme", nvme_toks), _request("dram", dram_toks)
    sched.add_request(nvme)
    sched.add_request(dram)
    assert nvme in sched.async_kv_waiting and dram in sched.waiting
    sched.schedule()
    assert nvme.status == RequestStatus.WAITING_FOR_REMOTE_KVS   # load started, batch full
    assert dram.status == RequestStatus.WAITING and dram.num_computed_tokens == 0
    assert [r.request_id for r in sched.running] == ["busy"]
    st = side._reqs["nvme"]
    assert st.load is not None and st.load.block_ids is not None and st.load.n == 9
    assert side.counters["hit_tokens"] == 9 * BS
    for rid in ("busy", "nvme", "dram"):
        sched.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
    sched.connector.shutdown()


def test_vllm034_extensible_cache_weight_update_unregisters_and_restores(tiny_model, tmp_path,
                                                                         monkeypatch):
    """The extensible KV cache (vLLM 0.34) lends its physical memory to a layerwise weight
    update when the cache is empty: vLLM's kv_cache_lent_for_weight_update calls the
    connector's unregister_kv_caches, releases the memory, and after the update recommits it
    at the same addresses and calls restore_kv_caches. Driven through that vLLM function with
    the rig's worker as the KV transfer group and a stand-in cache whose release scribbles
    over the memory: no copy touches the KV cache while it is lent, and afterwards a load
    round-trips the blocks saved before."""
    _vllm_034()
    import torch
    from vllm.distributed.kv_transfer import kv_transfer_state
    ekv = pytest.importorskip("vllm.v1.worker.extensible_kv_cache")

    vc, kcc = _configs(tiny_model, str(tmp_path / "store"))
    rig = _WorkerRig(vc, kcc)
    job, oks = rig.save([3, 4])
    rig.client.complete_store(job.job_id, ok=oks)
    saved = rig.layers[:, 3:5].clone()
    events: list[str] = []

    class LentCache:   # ExtensibleKVCache's surface that the lending path uses
        torch_memory_limit = None
        buffer = type("B", (), {"physical_bytes": rig.storage.numel() * 2})()

        def release_physical(self):
            events.append("release")
            rig.storage.fill_(float("nan"))      # the memory is gone; contents undefined

        def recommit(self):
            events.append("recommit")
            rig.storage.zero_()                  # same addresses, fresh pages

    worker = rig.worker
    real_unreg, real_restore = worker.unregister_kv_caches, worker.restore_kv_caches
    monkeypatch.setattr(worker, "unregister_kv_caches",
                        lambda: (events.append("unregister"), real_unreg())[1])
    monkeypatch.setattr(worker, "restore_kv_caches",
                        lambda: (events.append("restore"), real_restore())[1])
    monkeypatch.setattr(kv_transfer_state, "_KV_CONNECTOR_AGENT", worker)
    monkeypatch.setattr(ekv, "max_layer_reload_bytes", lambda model: 1 << 30)
    monkeypatch.setattr(ekv, "device_memory_info", lambda: (0, 1 << 34))
    monkeypatch.setattr(torch.accelerator, "memory_reserved", lambda *a: 0, raising=False)
    monkeypatch.setattr(torch.accelerator, "memory_allocated", lambda *a: 0, raising=False)
    monkeypatch.setattr(torch.accelerator, "empty_cache", lambda *a: None, raising=False)

    with ekv.kv_cache_lent_for_weight_update(LentCache(), torch.nn.Linear(2, 2),
                                             reclaimable=True, fail_if_short=True):
        assert events == ["unregister", "release"]
        assert worker.worker_side.engine is None
        assert rig.load([10, 11]) == {10, 11}          # lent: reported, nothing copied
        assert rig.layers[:, 10:12].isnan().all()
    assert events == ["unregister", "release", "recommit", "restore"]
    assert rig.load([10, 11]) == set()
    assert torch.equal(rig.layers[:, 10:12], saved)
    rig.close()
