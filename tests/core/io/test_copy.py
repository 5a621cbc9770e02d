"""Copy engine (tierstore.io.copy) on the CPU device: layouts, byte format, poisoned outputs,
no allocation after start.

The reference here never uses the engine's stride arithmetic: a logical ``[L, B, H, N, Cb]`` byte
array is laid out physically with ``permute(order).contiguous()`` (what vLLM's KVCacheLayout
does), and a block's expected bytes are ``logical[:, b].contiguous()``.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierstore.errors import ConfigError, JobError
from tierstore.io.copy import ORDERS, CopyEngine, KVLayout, PagedKV, slab_tensor
from tierstore.tiers.dram import DramTier

SENTINEL = 0xA5


def make_kv(L, B, H, N, Cb, order, *, seed=0, fill=None):
    """Physical buffer in ``order`` + the logical [L,B,H,N,Cb] uint8 view of it."""
    g = torch.Generator().manual_seed(seed)
    logical = torch.randint(0, 256, (L, B, H, N, Cb), dtype=torch.uint8, generator=g)
    if fill is not None:
        logical.fill_(fill)
    perm = ["LBHNC".index(d) for d in order]
    phys = logical.permute(perm).contiguous()
    inv = [perm.index(i) for i in range(5)]
    return phys.view(-1), phys.permute(inv)


def layer_views(logical, dtype=torch.bfloat16):
    """What vLLM's register_kv_caches receives: per-layer [B, H, N, C] views of one storage."""
    return [logical[i].view(dtype) for i in range(logical.shape[0])]


def expected_block(logical, b):
    return logical[:, b].contiguous().view(-1)


def test_vllm_observed_lbhnc_strides():
    """VLLM.md §4: 2 layers, 2 KV heads, head 32, bf16, block 32 -> layer view stride
    [4096, 2048, 64, 1] elements, page 8 KiB; one flat buffer, layer 1 at element 268435456."""
    lay = KVLayout(num_layers=2, num_blocks=65536, num_heads=2, block_size=32, entry_bytes=128)
    sL, sB, sH, sN, sC = lay.byte_strides()
    assert (sB // 2, sH // 2, sN // 2, sC) == (4096, 2048, 64, 1)
    assert sL // 2 == 268435456
    assert lay.unpadded_page_bytes == 8192 and lay.block_bytes == 16384


@pytest.mark.parametrize("order", ORDERS)
def test_from_buffer_equals_from_layer_views(order):
    buf, logical = make_kv(3, 7, 2, 4, 16, order)
    a = PagedKV.from_buffer(buf, KVLayout(3, 7, 2, 4, 16, order))
    b = PagedKV.from_layer_views(layer_views(logical))
    assert torch.equal(a.logical(), b.logical())
    assert a.block_outermost == (order[0] == "B")


def test_padded_page_layout():
    lay = KVLayout(2, 5, 2, 4, 16, "LBHNC", page_bytes=256)   # 128 B of data, 128 B padding
    buf = torch.randint(0, 256, (lay.nbytes,), dtype=torch.uint8)
    kv = PagedKV.from_buffer(buf, lay)
    assert kv.byte_strides[:2] == (5 * 256, 256)
    assert torch.equal(kv.logical().view(torch.uint8)[1, 3].reshape(-1),
                       buf[5 * 256 + 3 * 256:5 * 256 + 3 * 256 + 128])
    with pytest.raises(ConfigError):
        KVLayout(2, 5, 2, 4, 16, "LHBNC", page_bytes=256)


def run(engine, kind, ids, slots):
    job = (engine.submit_offload(ids, slots) if kind == "offload"
           else engine.submit_onload(slots, ids))
    assert engine.poll(job)          # synchronous on CPU; same submit/poll shape as CUDA
    with pytest.raises(JobError):
        engine.poll(job)             # retired once reported done


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src_order=st.sampled_from(ORDERS), dst_order=st.sampled_from(ORDERS),
       mla=st.booleans(), L=st.integers(1, 4), N=st.integers(1, 5), B=st.integers(4, 12),
       chunk=st.integers(1, 6), pad=st.booleans(), data=st.data())
def test_roundtrip_random_blocks_across_layouts(src_order, dst_order, mla, L, N, B, chunk, pad, data):
    """Offload random blocks from one layout into random slots of a poisoned slab, onload them
    into random blocks of a poisoned cache in another layout; check every byte of both."""
    H, Cb = (1, 24) if mla else (2, 8)           # MLA: [B, 1, N, C]
    buf, logical = make_kv(L, B, H, N, Cb, src_order, seed=data.draw(st.integers(0, 99)))
    kv = PagedKV.from_buffer(buf, KVLayout(L, B, H, N, Cb, src_order))
    n = data.draw(st.integers(0, B))
    ids = data.draw(st.permutations(range(B)))[:n]
    num_slots = B + 3
    slots = data.draw(st.permutations(range(num_slots)))[:n]
    bb = L * H * N * Cb
    slot_bytes = bb + (40 if pad else 0)
    slab = torch.full((num_slots, slot_bytes), SENTINEL, dtype=torch.uint8)
    eng = CopyEngine(kv, slab, chunk_blocks=chunk)
    run(eng, "offload", ids, slots)
    for s in range(num_slots):
        if s in slots:
            b = ids[slots.index(s)]
            assert torch.equal(slab[s, :bb], expected_block(logical, b))
            assert bool((slab[s, bb:] == SENTINEL).all())
        else:
            assert bool((slab[s] == SENTINEL).all())

    buf2, logical2 = make_kv(L, B, H, N, Cb, dst_order, fill=SENTINEL)
    kv2 = PagedKV.from_layer_views(layer_views(logical2, torch.uint8))
    ids2 = data.draw(st.permutations(range(B)))[:n]
    eng2 = CopyEngine(kv2, slab, chunk_blocks=chunk)
    run(eng2, "onload", ids2, slots)
    for b in range(B):
        if b in ids2:
            src_b = ids[ids2.index(b)]
            assert torch.equal(logical2[:, b], logical[:, src_b])   # bytes per token identical
        else:
            assert bool((logical2[:, b] == SENTINEL).all())


def test_save_lbhnc_load_blhnc_llama_like_bf16():
    """Blocks saved from an LBHNC cache load into a BLHNC cache of the same model: identical
    bytes for every layer, head and token (the byte format is layout independent)."""
    L, B, H, N, C = 4, 16, 2, 16, 2 * 32                  # K|V concatenated, bf16
    buf, logical = make_kv(L, B, H, N, 2 * C, "LBHNC", seed=3)
    src = PagedKV.from_layer_views(layer_views(logical))
    buf2, logical2 = make_kv(L, B, H, N, 2 * C, "BLHNC", fill=SENTINEL)
    dst = PagedKV.from_layer_views(layer_views(logical2))
    slab = torch.full((8, src.block_bytes), SENTINEL, dtype=torch.uint8)
    run(CopyEngine(src, slab), "offload", [9, 2, 14], [4, 5, 6])
    run(CopyEngine(dst, slab), "onload", [3, 11, 0], [4, 5, 6])
    for a, b in [(9, 3), (2, 11), (14, 0)]:
        for layer in range(L):
            for n in range(N):
                assert torch.equal(logical2[layer, b, :, n], logical[layer, a, :, n])
    assert bool((logical2[:, [i for i in range(B) if i not in (3, 11, 0)]] == SENTINEL).all())


def test_mla_views_bf16():
    """MLA: per-layer [num_blocks, 1, block_size, 576] bf16 views (H = 1)."""
    L, B, N, C = 3, 6, 8, 576
    buf, logical = make_kv(L, B, 1, N, 2 * C, "LBHNC", seed=5)
    views = layer_views(logical)
    assert views[0].shape == (B, 1, N, C)
    kv = PagedKV.from_layer_views(views)
    assert kv.block_bytes == L * N * C * 2
    slab = torch.full((4, kv.block_bytes), SENTINEL, dtype=torch.uint8)
    run(CopyEngine(kv, slab), "offload", [5, 0], [2, 1])
    assert torch.equal(slab[2], expected_block(logical, 5))
    assert torch.equal(slab[1], expected_block(logical, 0))
    assert bool((slab[[0, 3]] == SENTINEL).all())


def test_consecutive_slots_are_one_copy_scattered_one_per_run():
    buf, logical = make_kv(2, 32, 2, 4, 8, "LBHNC")
    kv = PagedKV.from_buffer(buf, KVLayout(2, 32, 2, 4, 8))
    slab = torch.zeros(64, kv.block_bytes, dtype=torch.uint8)
    eng = CopyEngine(kv, slab, chunk_blocks=32)
    run(eng, "offload", list(range(31, 7, -1)), list(range(10, 34)))     # 24 blocks, one run
    # on the CPU a run is gathered straight into the slab's rows: no staging copy at all
    assert (eng.stats["copies"], eng.stats["direct"]) == (0, 1)
    run(eng, "onload", [1, 2, 3, 4], [40, 41, 50, 51])                   # two runs
    assert (eng.stats["copies"], eng.stats["direct"]) == (2, 1)
    run(eng, "onload", [9, 8, 7], [12, 13, 14])                          # one run: direct
    assert (eng.stats["copies"], eng.stats["direct"]) == (2, 2)


def test_job_validation():
    buf, _ = make_kv(1, 4, 1, 2, 8, "LBHNC")
    kv = PagedKV.from_buffer(buf, KVLayout(1, 4, 1, 2, 8))
    eng = CopyEngine(kv, torch.zeros(4, kv.block_bytes, dtype=torch.uint8))
    for ids, slots in [([0, 1], [0]), ([4], [0]), ([0], [9]), ([1, 1], [0, 1]), ([0, 1], [2, 2])]:
        with pytest.raises(ConfigError):
            eng.submit_offload(ids, slots)
    with pytest.raises(JobError):
        eng.poll(12345)
    with pytest.raises(ConfigError):
        CopyEngine(kv, torch.zeros(4, kv.block_bytes - 1, dtype=torch.uint8))


def test_more_jobs_than_ring_entries_still_poll_once_each():
    buf, _ = make_kv(1, 16, 1, 2, 8, "LBHNC")
    kv = PagedKV.from_buffer(buf, KVLayout(1, 16, 1, 2, 8))
    eng = CopyEngine(kv, torch.zeros(16, kv.block_bytes, dtype=torch.uint8), max_inflight=2)
    jobs = [eng.submit_offload([i], [i]) for i in range(10)]
    assert eng.stats["ring_waits"] == 8 and eng.pending() == 10
    assert all(eng.poll(j) for j in jobs) and eng.pending() == 0
    with pytest.raises(JobError):
        eng.poll(jobs[0])


def test_layer_views_must_share_storage_and_spacing():
    _, logical = make_kv(3, 4, 1, 2, 8, "LBHNC")
    views = layer_views(logical, torch.uint8)
    with pytest.raises(ConfigError):
        PagedKV.from_layer_views([views[0], views[2], views[1]])
    with pytest.raises(ConfigError):
        PagedKV.from_layer_views([views[0], views[1].clone()])


def test_dram_tier_slab_roundtrip():
    """The engine writes straight into a DramTier's slab (slots rounded up to 4096 bytes)."""
    L, B, H, N, Cb = 2, 8, 2, 4, 64                      # 1 KiB blocks in 4 KiB slots
    buf, logical = make_kv(L, B, H, N, Cb, "BLNHC", seed=7)
    kv = PagedKV.from_buffer(buf, KVLayout(L, B, H, N, Cb, "BLNHC"))
    dram = DramTier(6, kv.block_bytes, prefault=False)
    try:
        slab = slab_tensor(dram.buffer, dram.num_slots, dram.slot_bytes)
        slab.fill_(SENTINEL)
        eng = CopyEngine(kv, slab)
        run(eng, "offload", [6, 1], [3, 4])
        assert bytes(dram.view(3)[:kv.block_bytes]) == bytes(expected_block(logical, 6).numpy())
        assert bytes(dram.view(4)[kv.block_bytes:]) == bytes([SENTINEL]) * (4096 - kv.block_bytes)
        eng.close()
        del eng, slab
    finally:
        dram.close()


class CountingFakeRegistrar:
    """Records register/unregister/clear_error calls."""

    pinned = True

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def register(self, ptr, size):
        self.calls.append(("register", ptr, size))

    def unregister(self, ptr):
        self.calls.append(("unregister", ptr))

    def clear_error(self):
        self.calls.append(("clear_error",))


ALLOCATORS = ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "tensor", "as_tensor",
              "frombuffer", "empty_strided", "randint", "arange")


def test_no_allocation_or_registration_after_start(monkeypatch):
    """Issue 5 acceptance: slab allocation and pinning happen once at start; 1,000 stores and
    1,000 loads call no torch allocator and no registrar."""
    from tierstore.tiers.pinning import HostPinning, pin_buffer

    L, B, H, N, Cb = 2, 64, 2, 4, 32
    buf, logical = make_kv(L, B, H, N, Cb, "LBHNC", seed=11)
    kv = PagedKV.from_buffer(buf, KVLayout(L, B, H, N, Cb))
    dram = DramTier(32, kv.block_bytes, prefault=False)
    reg = CountingFakeRegistrar()
    pinning = HostPinning(reg, max_chunk_bytes=8 * dram.slot_bytes)
    assert pin_buffer(pinning, dram.buffer, dram.capacity_bytes, dram.slot_bytes).pinned
    start_calls = len(reg.calls)
    assert start_calls == 4                          # 32 slots, 8 per chunk
    slab = slab_tensor(dram.buffer, dram.num_slots, dram.slot_bytes)
    eng = CopyEngine(kv, slab, chunk_blocks=4, max_inflight=4)

    counts = {name: 0 for name in ALLOCATORS}
    for name in ALLOCATORS:
        real = getattr(torch, name)

        def counting(*a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(torch, name, counting)

    rng = random.Random(0)
    for i in range(1000):
        n = rng.randint(1, 8)
        ids = rng.sample(range(B), n)
        slots = rng.sample(range(32), n)
        j = eng.submit_offload(ids, slots)
        assert eng.poll(j)
        j = eng.submit_onload(slots, ids)
        assert eng.poll(j)
    monkeypatch.undo()
    assert counts == {name: 0 for name in ALLOCATORS}
    assert len(reg.calls) == start_calls
    assert eng.stats["jobs"] == 2000
    assert torch.equal(kv.logical().view(torch.uint8), logical)   # loads wrote back same bytes
    eng.close()
    del eng, slab
    pinning.unpin()
    assert [c[0] for c in reg.calls[start_calls:]] == ["unregister"] * 4
    dram.close()
