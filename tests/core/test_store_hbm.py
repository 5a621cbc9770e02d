"""Store with an HBM tier (on the CPU device without a GPU) above DRAM and NVMe."""

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings, strategies as st  # noqa: E402

from tierstore.config import DramConfig, HbmConfig, NvmeConfig, StoreConfig  # noqa: E402
from tierstore.errors import ConfigError  # noqa: E402
from tierstore.keys import Keyer, Namespace  # noqa: E402
from tierstore.store import Store  # noqa: E402
from tierstore.types import BlockStatus, Tier  # noqa: E402

SLOT = 4096
NS = Namespace("m", 16, num_layers=1, num_kv_heads=1, head_size=8)
K = Keyer(NS, b"h" * 32)


def make(tmp_path, hbm=4, dram=4, nvme=16, policy="lru"):
    return Store.open(StoreConfig(
        slot_bytes=SLOT, dram=DramConfig(capacity_blocks=dram, policy=policy),
        nvme=NvmeConfig(path=str(tmp_path / "nvme"), capacity_blocks=nvme, policy=policy,
                        file_slots=16) if nvme else None,
        hbm=HbmConfig(capacity_blocks=hbm, device="cpu", policy=policy)))


def payload(key):
    return key * (SLOT // 32)


def put_hbm(s, keys):
    job = s.prepare_store(keys, NS, SLOT, tier=Tier.HBM)
    assert job.tier is Tier.HBM
    for k, slot in zip(keys, job.slots):
        if slot is not None:
            s.hbm_tensor(slot).copy_(torch.frombuffer(bytearray(payload(k)), dtype=torch.uint8))
    return s.complete_store(job.job_id)


def load(s, keys, into=Tier.DRAM):
    job = s.prepare_load(keys, into=into)
    try:
        if into is Tier.DRAM:
            return [bytes(s.slot_view(x)[:n]) for x, n in zip(job.slots, job.sizes)]
        return [bytes(s.hbm_tensor(x)[:n].numpy()) for x, n in zip(job.slots, job.sizes)]
    finally:
        s.complete_load(job.job_id)


def test_hbm_victims_demote_to_dram_then_nvme(tmp_path):
    """Victims move one step down (HBM -> DRAM); a block that reaches DRAM gets its NVMe copy
    written behind; DRAM victims are then dropped (clean). Every block reads back byte-exact
    from wherever it landed, into DRAM or into HBM."""
    s = make(tmp_path, hbm=4, dram=8, nvme=16)
    chains = [K.chain(list(range(i * 1000, i * 1000 + 64))) for i in range(4)]   # 4 x 4 blocks
    for c in chains:
        assert put_hbm(s, c) == [BlockStatus.OK] * 4
        assert s.flush(timeout_s=20)
    assert set(s.lookup(chains[3], NS).tiers) == {Tier.HBM}
    assert set(s.lookup(chains[2], NS).tiers) == {Tier.DRAM}
    assert set(s.lookup(chains[1], NS).tiers) == {Tier.DRAM}
    assert set(s.lookup(chains[0], NS).tiers) == {Tier.NVME}
    assert s.counters["demotions_hbm"] == 12 and s.counters["nvme_flushed_blocks"] == 12
    assert load(s, chains[0]) == [payload(k) for k in chains[0]]                  # NVMe -> DRAM
    assert load(s, chains[1], into=Tier.HBM) == [payload(k) for k in chains[1]]   # DRAM -> HBM
    assert set(s.lookup(chains[1], NS).tiers) == {Tier.HBM}                       # moved, exclusive
    assert set(s.lookup(chains[3], NS).tiers) == {Tier.DRAM}                      # made room
    assert load(s, chains[3]) == [payload(k) for k in chains[3]]
    assert load(s, chains[1]) == [payload(k) for k in chains[1]]                  # HBM -> DRAM
    assert set(s.lookup(chains[1], NS).tiers) == {Tier.DRAM}
    assert s.check() == []
    s.close()


def test_no_room_below_drops_victims_never_corrupts(tmp_path):
    """When every DRAM slot is pinned by the load itself, HBM victims have nowhere to go and are
    dropped (a cache may drop; it never serves wrong bytes): the loaded blocks arrive intact."""
    s = make(tmp_path, hbm=4, dram=4, nvme=0)
    a = K.chain(list(range(64)))
    b = K.chain(list(range(5000, 5064)))
    s.put(a, NS, [payload(k) for k in a])          # DRAM full
    put_hbm(s, b)                                   # HBM full
    assert load(s, a, into=Tier.HBM) == [payload(k) for k in a]
    assert s.lookup(b, NS).num_blocks == 0          # b was dropped to make room
    assert s.check() == []
    s.close()


def test_load_into_hbm_from_nvme_goes_through_dram(tmp_path):
    """XFER-14 (staging path): an NVMe block asked for in HBM is staged NVMe -> DRAM -> HBM and
    arrives byte-exact."""
    s = make(tmp_path, hbm=2, dram=4, nvme=8)
    a = K.chain(list(range(32)))
    b = K.chain(list(range(500, 532)))
    c = K.chain(list(range(900, 932)))
    d = K.chain(list(range(1300, 1332)))
    for ch in (a, b, c, d):
        put_hbm(s, ch)
        assert s.flush(timeout_s=20)
    assert set(s.lookup(a, NS).tiers) == {Tier.NVME}
    assert load(s, a, into=Tier.HBM) == [payload(k) for k in a]
    assert set(s.lookup(a, NS).tiers) == {Tier.HBM}
    assert s.counters["promotions"] >= 2 and s.counters["promotions_hbm"] >= 2
    assert s.check() == []
    s.close()


def test_without_hbm_tier_hbm_requests_are_config_errors(tmp_path):
    s = Store.open(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=4)))
    with pytest.raises(ConfigError):
        s.prepare_store(K.chain(list(range(16))), NS, SLOT, tier=Tier.HBM)
    with pytest.raises(ConfigError):
        s.prepare_load([], into=Tier.HBM)
    with pytest.raises(ConfigError):
        s.hbm_tensor(0)
    s.close()


def test_pinned_hbm_blocks_stay(tmp_path):
    s = make(tmp_path, hbm=2, dram=2, nvme=0)
    a = K.chain(list(range(32)))
    put_hbm(s, a)
    s.pin(a, owner="r")
    assert put_hbm(s, K.chain(list(range(700, 732)))) == [BlockStatus.SKIPPED] * 2
    assert set(s.lookup(a, NS).tiers) == {Tier.HBM}
    s.unpin(a, owner="r")
    assert s.check() == []
    s.close()


ops = st.lists(st.tuples(st.sampled_from(["put_hbm", "put_dram", "load_dram", "load_hbm", "evict"]),
                         st.integers(0, 7)), max_size=40)


@settings(max_examples=40, deadline=None)
@given(ops)
def test_random_operations_over_three_tiers(tmp_path_factory, seq):
    """Any mix of stores into HBM or DRAM, loads into either, and evictions keeps check()
    clean and every loaded block byte-exact."""
    s = make(tmp_path_factory.mktemp("h"), hbm=3, dram=6, nvme=8)
    chains = [K.chain(list(range(i * 100, i * 100 + 32))) for i in range(8)]
    try:
        for op, i in seq:
            c = chains[i]
            if op == "put_hbm":
                put_hbm(s, c)
            elif op == "put_dram":
                s.put(c, NS, [payload(k) for k in c])
            elif op in ("load_dram", "load_hbm"):
                got = load(s, c, into=Tier.DRAM if op == "load_dram" else Tier.HBM)
                assert got == [payload(k) for k in c[:len(got)]]
            else:
                s.evict(c)
            assert s.check() == []
    finally:
        s.close()
