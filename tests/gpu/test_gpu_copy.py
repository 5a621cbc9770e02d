"""GPU checks of the copy engine, the hbm tier and pinning (skipped without CUDA).

Run on the GPU machine: ``PYTHONPATH=. python3 -m pytest tests/gpu -q -m gpu``.
"""

from __future__ import annotations

import mmap

import pytest
import torch

from tierstore.io.copy import CopyEngine, KVLayout, PagedKV, slab_tensor
from tierstore.tiers.pinning import (
    CudaRegistrar, HostPinning, RegistrationFailed, buffer_address, pin_buffer)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SENTINEL = 0xA5


def make_kv(L, B, H, N, Cb, order, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logical = torch.randint(0, 256, (L, B, H, N, Cb), dtype=torch.uint8, device="cuda", generator=g)
    perm = ["LBHNC".index(d) for d in order]
    phys = logical.permute(perm).contiguous()
    return phys.view(-1), phys.permute([perm.index(i) for i in range(5)])


@pytest.fixture
def pinned_slab():
    slabs = []

    def make(num_slots, slot_bytes):
        t = torch.empty(num_slots, slot_bytes, dtype=torch.uint8, pin_memory=True)
        t.fill_(SENTINEL)
        slabs.append(t)
        return t
    yield make


@pytest.mark.parametrize("src_order,dst_order,H,Cb", [
    ("LBHNC", "BLHNC", 8, 512), ("LBNHC", "LBHNC", 8, 512), ("BLHNC", "LHBNC", 8, 512),
    ("LBHNC", "BLNHC", 1, 1152)])   # last: MLA-shaped, 576 bf16 elements
@pytest.mark.parametrize("chunk_blocks", [8, 64])
def test_gpu_roundtrip_byte_exact(pinned_slab, src_order, dst_order, H, Cb, chunk_blocks):
    L, B, N, n = 4, 96, 16, 40
    buf, logical = make_kv(L, B, H, N, Cb, src_order, seed=1)
    kv = PagedKV.from_buffer(buf, KVLayout(L, B, H, N, Cb, src_order))
    slab = pinned_slab(64, kv.block_bytes)
    ids = torch.randperm(B)[:n].tolist()
    slots = torch.randperm(64)[:n].tolist()
    eng = CopyEngine(kv, slab, chunk_blocks=chunk_blocks)
    job = eng.submit_offload(ids, slots)
    while not eng.poll(job):
        pass
    host_logical = logical.cpu()
    for b, s in zip(ids, slots):
        assert torch.equal(slab[s], host_logical[:, b].contiguous().view(-1))
    rest = sorted(set(range(64)) - set(slots))
    assert bool((slab[rest] == SENTINEL).all())

    buf2, logical2 = make_kv(L, B, H, N, Cb, dst_order, seed=2)
    logical2.fill_(SENTINEL)
    kv2 = PagedKV.from_layer_views([logical2[i] for i in range(L)])
    eng2 = CopyEngine(kv2, slab, chunk_blocks=chunk_blocks)
    ids2 = torch.randperm(B)[:n].tolist()
    job = eng2.submit_onload(slots, ids2)
    eng2.wait_stream(job)                       # compute stream waits on the device
    got = logical2.cpu()
    assert eng2.poll(job)
    for a, b in zip(ids, ids2):
        assert torch.equal(got[:, b], host_logical[:, a])
    others = sorted(set(range(B)) - set(ids2))
    assert bool((got[:, others] == SENTINEL).all())


def test_gpu_no_device_allocation_after_start(pinned_slab):
    """Issue 5: no device allocation on the hot path (caching-allocator counter, which also
    sees temporaries made inside torch ops)."""
    L, B, H, N, Cb = 4, 64, 8, 16, 512
    buf, _ = make_kv(L, B, H, N, Cb, "LBHNC")
    kv = PagedKV.from_buffer(buf, KVLayout(L, B, H, N, Cb))
    slab = pinned_slab(64, kv.block_bytes)
    eng = CopyEngine(kv, slab, chunk_blocks=16, max_inflight=4)
    j = eng.submit_offload(list(range(20)), list(range(20)))
    eng.wait(j)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for i in range(200):
        ids = torch.randperm(B)[:24].tolist()
        slots = torch.randperm(64)[:24].tolist()
        j1 = eng.submit_offload(ids, slots)
        j2 = eng.submit_onload(slots, ids)
        eng.wait(j1)
        eng.wait(j2)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before


def test_gpu_hbm_tier_demote_promote():
    from tierstore.tiers.hbm import HbmTier

    hbm = HbmTier(32, 8192)
    assert hbm.device.type == "cuda"
    hbm.slab.copy_(torch.randint(0, 256, hbm.slab.shape, dtype=torch.uint8, device="cuda"))
    orig = hbm.slab.cpu()
    dram = torch.full((16, 8192), SENTINEL, dtype=torch.uint8, pin_memory=True)
    hbm.attach_dram(dram)
    hbm.wait(hbm.copy_to_dram([31, 0, 5], [3, 4, 9]))
    assert torch.equal(dram[[3, 4, 9]], orig[[31, 0, 5]])
    hbm.slab.zero_()
    hbm.wait(hbm.copy_from_dram([3, 4, 9], [1, 2, 3]))
    assert torch.equal(hbm.slab[1:4].cpu(), orig[[31, 0, 5]])
    hbm.close()


def test_gpu_mem22_real_registration_rollback():
    """MEM-22 GPU variant: real cudaHostRegister with the chunk cap lowered to 1 GiB on a 4 GiB
    region; chunk 2 is pre-registered so its registration fails; chunks 0-1 are rolled back, the
    error is cleared, and the next GPU allocation and kernel succeed. Then the whole region pins."""
    GiB = 1 << 30
    size, slot = 4 * GiB, 2 << 20
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = memoryview(mm)
    ptr = buffer_address(buf)
    reg = CudaRegistrar()
    reg.register(ptr + 2 * GiB, GiB)               # makes chunk 2 fail: already registered
    p = HostPinning(reg, max_chunk_bytes=GiB)
    res = pin_buffer(p, buf, size, slot)
    assert not res.pinned and res.failed_chunk == 2
    x = torch.ones(1 << 20, device="cuda")          # next allocation + kernel must succeed
    assert float(x.sum()) == float(1 << 20)
    reg.unregister(ptr + 2 * GiB)
    res = pin_buffer(p, buf, size, slot)
    assert res.pinned and len(res.chunks) == 4
    t = slab_tensor(buf, size // slot, slot)
    assert t.is_pinned()
    del t
    p.unpin()
    reg.register(ptr, GiB)
    with pytest.raises(RegistrationFailed):
        reg.register(ptr, GiB)                      # already registered: fails, then cleared
    reg.clear_error()
    reg.unregister(ptr)
    assert float(torch.ones(4, device="cuda").sum()) == 4.0
    buf.release()
    mm.close()


def test_gpu_connector_copier_never_blocks_the_host(pinned_slab):
    """The worker side's Copier on CUDA (plugins/vllm/copier.py, issue 12): an asynchronous
    copy returns before the bytes moved and polls done later; a copy the forward needs
    (now=True) makes the current stream wait on the device, so a kernel queued after it sees
    the loaded bytes without a host synchronize. Byte-exact both ways."""
    import importlib.util
    from pathlib import Path
    # by path: the GPU session runs from a checkout with PYTHONPATH=. (no installed plugins)
    path = Path(__file__).resolve().parents[2] / "plugins" / "vllm" / "copier.py"
    spec = importlib.util.spec_from_file_location("tierstore_copier_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    Copier = mod.Copier

    L, B, H, N, Cb, n = 4, 64, 8, 16, 256, 24
    buf, logical = make_kv(L, B, H, N, Cb, "LBHNC", seed=5)
    kv = PagedKV.from_buffer(buf, KVLayout(L, B, H, N, Cb, "LBHNC"))
    slab = pinned_slab(n, kv.block_bytes)
    c = Copier(CopyEngine(kv, slab, chunk_blocks=8))
    assert not c.threaded
    src = list(range(n))
    t = c.start("offload", list(range(n)), src)
    c.wait(t)
    want = logical[:, :n].clone()
    logical[:, 32:32 + n].zero_()
    t2 = c.start("onload", list(range(n)), list(range(32, 32 + n)), now=True)
    got = logical[:, 32:32 + n].clone()            # queued on the current stream after the wait
    torch.cuda.current_stream().synchronize()
    assert torch.equal(got, want)
    c.wait(t2)
    c.close()
