"""benchmarks/peer_bench_adapter.py keeps the peer_bench contract (../shared/tools/peer_bench,
adapters.py) on a small layout, without the harness or LMCache."""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from peer_bench_adapter import PeerBenchAdapter  # noqa: E402


@dataclass(frozen=True)
class Layout:   # the harness's KVLayout, same attributes
    num_layers: int = 2
    num_kv_heads: int = 2
    head_dim: int = 64
    chunk_tokens: int = 16
    dtype: torch.dtype = torch.float16

    @property
    def chunk_shape(self):
        return (2, self.num_layers, self.chunk_tokens, self.num_kv_heads * self.head_dim)

    @property
    def chunk_bytes(self):
        n = 1
        for d in self.chunk_shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class Tiers:   # the harness's TierConfig
    memory_bytes: int
    disk_dir: str | None = None
    disk_bytes: int = 0


def workload(L: Layout, n: int, seed: int = 0):
    """n chunks as the harness cuts them: views of one [2, L, n*T, HD] buffer; prefix keys."""
    g = torch.Generator().manual_seed(seed)
    T = L.chunk_tokens
    src = torch.randn(2, L.num_layers, n * T, L.num_kv_heads * L.head_dim, generator=g).to(L.dtype)
    out = torch.zeros_like(src)
    keys, prev = [], seed.to_bytes(8, "little")
    import hashlib
    for i in range(n):
        prev = hashlib.blake2b(prev + i.to_bytes(8, "little"), digest_size=16).digest()
        keys.append(prev)
    cut = lambda t: [t[:, :, i * T:(i + 1) * T] for i in range(n)]  # noqa: E731
    return keys, src, cut(src), out, cut(out)


def test_memory_instance_store_load_reset():
    """Scenario: a memory-only instance stores 24 chunks with batched copies, loads them back
    byte for byte, and after reset finds nothing (a fresh store)."""
    L = Layout()
    a = PeerBenchAdapter(L, Tiers(memory_bytes=32 * L.chunk_bytes), "t-mem")
    try:
        keys, src, chunks, out, outs = workload(L, 24)
        a.store(keys, chunks)
        assert a.load(keys, outs) == 24
        assert torch.equal(out, src)
        a.reset()
        out.zero_()
        assert a.load(keys, outs) == 0
        a.store(keys, chunks)   # a second fill after reset
        assert a.load(keys, outs) == 24 and torch.equal(out, src)
    finally:
        a.close()


def test_disk_instance_flush_drop_cold_load(tmp_path):
    """Scenario: the harness's phases c and d: store (write-behind), flush, drop the DRAM tier
    (NVMe keeps every block), load from NVMe byte for byte; reset deletes the data directory's
    files and starts empty."""
    L = Layout()
    a = PeerBenchAdapter(L, Tiers(32 * L.chunk_bytes, str(tmp_path), 256 * L.chunk_bytes), "t-disk")
    try:
        keys, src, chunks, out, outs = workload(L, 24, seed=3)
        a.store(keys, chunks)
        a.flush()
        a.drop_memory_tier()
        tiers = {t["tier"]: t["blocks"] for t in a.client.stats()["tiers"]}
        assert tiers == {"dram": 0, "nvme": 24}
        assert a.load(keys, outs) == 24
        assert torch.equal(out, src)
        slabs = tmp_path / "ts" / "nvme" / "slabs"
        old = {p.name: p.stat().st_ino for p in slabs.iterdir()}
        assert old
        a.reset()
        assert {t["tier"]: t["blocks"] for t in a.client.stats()["tiers"]} == {"dram": 0, "nvme": 0}
        new = {p.name: p.stat().st_ino for p in slabs.iterdir()} if slabs.exists() else {}
        assert not set(old.items()) & set(new.items()), "reset kept a slab file"
    finally:
        a.close()
    assert not (tmp_path / "ts").exists()


def test_pipelined_parts_serve_an_exact_prefix(tmp_path):
    """Scenario: stores and loads cut into parts of 8 blocks (the pipelined path): a cold load
    of 24 NVMe blocks round-trips; a load asking for 28 when 20 are stored serves 20 (the third
    part is short, the fourth is a miss); with block 10 evicted everywhere it serves 10."""
    L = Layout()
    a = PeerBenchAdapter(L, Tiers(64 * L.chunk_bytes, str(tmp_path), 256 * L.chunk_bytes), "t-pipe",
                         store_blocks=8, load_blocks=8)
    try:
        keys, src, chunks, out, outs = workload(L, 28, seed=11)
        a.store(keys[:24], chunks[:24])
        a.flush()
        a.drop_memory_tier()
        assert a.load(keys[:24], outs[:24]) == 24
        assert torch.equal(out[:, :, :24 * L.chunk_tokens], src[:, :, :24 * L.chunk_tokens])
        a.reset()
        a.store(keys[:20], chunks[:20])
        a.flush()
        a.drop_memory_tier()
        out.zero_()
        assert a.load(keys, outs) == 20
        assert all(torch.equal(outs[i], chunks[i]) for i in range(20))
        assert a.client.evict([a._keys(keys)[10]])["evicted"] == 1
        assert a.load(keys, outs) == 10
        assert a.client.stats()["pending_loads"] == 0   # every part's job was completed
    finally:
        a.close()


def test_copy_fallback_matches_batched():
    """Scenario: chunks that are not equally spaced views of one buffer (here: separate
    tensors, and the reverse order) take the per-chunk path and still round-trip."""
    L = Layout()
    a = PeerBenchAdapter(L, Tiers(memory_bytes=32 * L.chunk_bytes), "t-fallback")
    try:
        keys, src, chunks, out, outs = workload(L, 8, seed=5)
        loose = [c.clone() for c in chunks]
        a.store(keys, loose)
        got = [torch.zeros(L.chunk_shape, dtype=L.dtype) for _ in range(8)]
        assert a.load(keys, got) == 8
        assert all(torch.equal(g, c) for g, c in zip(got, chunks))
        assert a.load(keys, outs[::-1]) == 8   # reversed views: negative spacing, per chunk
        assert all(torch.equal(outs[7 - i], chunks[i]) for i in range(8))
    finally:
        a.close()


def test_store_refuses_to_drop_blocks(tmp_path):
    """Scenario: DRAM too small for the write-behind queue (dram_factor 1, a store of more than
    half of DRAM with wait_s=0): the store answers SKIPPED for some blocks and the adapter
    raises instead of reporting a number for a partial store."""
    L = Layout()
    a = PeerBenchAdapter(L, Tiers(16 * L.chunk_bytes, str(tmp_path), 64 * L.chunk_bytes), "t-skip",
                         dram_factor=1.0)
    try:
        keys, _src, chunks, _out, _outs = workload(L, 14, seed=7)
        with pytest.raises(RuntimeError, match="SKIPPED"):
            a.store(keys, chunks)
    finally:
        a.close()


@pytest.mark.skipif(not os.path.isdir(Path(__file__).resolve().parents[3] / "shared" / "tools"
                                      / "peer_bench"), reason="../shared/tools/peer_bench absent")
def test_against_the_harness_smoke(tmp_path):
    """Scenario: the harness itself (loopback + this adapter, 8 chunks, one repetition, no
    page-cache drop needed for correctness) runs every phase and verifies every load."""
    import subprocess
    root = Path(__file__).resolve().parents[2]
    bench = root.parent / "shared" / "tools" / "peer_bench" / "lmcache_bench.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "benchmarks"),
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(bench), "--stores",
                        "loopback,tierstore=peer_bench_adapter:PeerBenchAdapter",
                        "--num-chunks", "8", "--repeats", "1", "--warmup", "0",
                        "--layers", "4", "--disk-dir", str(tmp_path / "pb")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "d load <- disk, cold   tierstore" in r.stdout, r.stdout
