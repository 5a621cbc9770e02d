"""The store's HBM tier on a real GPU (skipped without CUDA): demotion to pinned DRAM and loads
into either tier are byte-exact. Needs no lmdb (no NVMe tier)."""

from __future__ import annotations

import pytest
import torch

from tierstore.config import DramConfig, HbmConfig, StoreConfig
from tierstore.keys import Keyer, Namespace
from tierstore.store import Store
from tierstore.types import BlockStatus, Tier

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SLOT = 2 << 20


def test_hbm_on_gpu_demotes_to_dram_and_loads_back():
    ns = Namespace("gpu", 16, num_layers=32, num_kv_heads=8, head_size=128)
    keyer = Keyer(ns, b"g" * 32)
    s = Store.open(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=64, policy="lru"),
                               hbm=HbmConfig(capacity_blocks=16, device="cuda", policy="lru")))
    try:
        assert s.tiers[Tier.HBM].device.type == "cuda"
        chains = [keyer.chain(list(range(i * 4096, i * 4096 + 16 * 16))) for i in range(3)]
        data = {}
        for c in chains:
            job = s.prepare_store(c, ns, SLOT, tier=Tier.HBM)
            for k, slot in zip(c, job.slots):
                t = torch.randint(0, 256, (SLOT,), dtype=torch.uint8, device="cuda")
                s.hbm_tensor(slot).copy_(t)
                data[k] = t.cpu().numpy().tobytes()
            assert s.complete_store(job.job_id) == [BlockStatus.OK] * 16
        assert set(s.lookup(chains[0], ns).tiers) == {Tier.DRAM}     # demoted through the engine
        job = s.prepare_load(chains[0])
        assert [bytes(s.slot_view(x)[:n]) for x, n in zip(job.slots, job.sizes)] == [data[k] for k in chains[0]]
        s.complete_load(job.job_id)
        job = s.prepare_load(chains[0], into=Tier.HBM)
        got = [s.hbm_tensor(x)[:n].cpu().numpy().tobytes() for x, n in zip(job.slots, job.sizes)]
        assert got == [data[k] for k in chains[0]]
        s.complete_load(job.job_id)
        assert s.check() == []
    finally:
        s.close()
