"""KV events from the store's residency log (issue 15 item 1, case EVT-37): every change of a
block's tiers becomes vLLM's BlockStored / BlockRemoved / AllBlocksCleared naming the medium,
a demotion is a removal plus a store, a restart clears and re-announces what NVMe kept, and the
events carry the engine's hashes, never tierstore's keys."""

from __future__ import annotations

import lmdb
import msgpack
import pytest

from tierstore.config import DramConfig, NvmeConfig, StoreConfig
from tierstore.errors import RejectedError
from tierstore.events import CLEARED, STORED, EventLog, decode_engine_block, engine_block
from tierstore.keys import Keyer, Namespace
from tierstore.kv_events import (KVEventIndex, Translator, decode_batch, encode_batch,
                                 media_of_blocks)
from tierstore.store import Store
from tierstore.types import BlockStatus, Tier

SECRET = b"s" * 32
NS = Namespace(model="m", block_size=16, kv_dtype="bfloat16", num_layers=2, num_kv_heads=2,
               head_size=8)
SIZE = 512


def ehash(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


def blobs(ids, first_parent=None):
    out, parent = [], first_parent
    for i in ids:
        out.append(engine_block(ehash(i), parent, list(range(16 * i, 16 * i + 16)), 16))
        parent = ehash(i)
    return out


def open_store(tmp_path, dram=64, nvme=256, **kw) -> Store:
    nv = NvmeConfig(path=str(tmp_path / "nvme"), capacity_blocks=nvme, **kw) if nvme else None
    return Store.open(StoreConfig(slot_bytes=4096, dram=DramConfig(capacity_blocks=dram), nvme=nv))


class Stream:
    """The store's log through the translator, as a subscriber sees it."""

    def __init__(self, store: Store, max_events: int = 1 << 16) -> None:
        self.log = EventLog(max_events)
        self.tr = Translator()
        self.index = KVEventIndex()
        store.attach_events(self.log)

    def take(self) -> list[dict]:
        ev = self.tr.feed(self.log.drain())
        # through the wire and back, as a subscriber would get them
        ev = decode_batch(encode_batch(ev))[1]
        self.index.apply(ev)
        return ev


def kinds(events):
    return [(e["type"], e.get("medium")) for e in events]


def store_chain(store, keys, ids, *, parent=None):
    job = store.prepare_store(keys, NS, SIZE, parent=parent, engine=blobs(ids), wait_s=10)
    for s in job.slots:
        if s is not None:
            store.slot_view(s)[:SIZE] = b"x" * SIZE
    return store.complete_store(job.job_id, True)


def test_evt37_a_restart_clears_then_reannounces_nvme_survivors(tmp_path):
    """EVT-37 (a): 10 blocks stored (DRAM + NVMe copy); the store goes away; the reopened
    store's stream starts with AllBlocksCleared and re-announces each survivor with
    medium STORAGE, parents first, with the engine's hashes."""
    s = open_store(tmp_path)
    keys = Keyer(NS, SECRET).chain_from_block_ids(range(10))
    assert store_chain(s, keys, range(10)) == [BlockStatus.OK] * 10
    assert s.flush(10)
    st = Stream(s)
    assert kinds(st.take()) == [("AllBlocksCleared", None)] + [("BlockStored", "CPU"),
                                                               ("BlockStored", "STORAGE")] * 10
    s.close()
    s = open_store(tmp_path)
    try:
        st = Stream(s)
        ev = st.take()
        assert kinds(ev) == [("AllBlocksCleared", None)] + [("BlockStored", "STORAGE")] * 10
        assert [e["block_hashes"] for e in ev[1:]] == [[ehash(i)] for i in range(10)]
        assert ev[2]["parent_block_hash"] == ehash(0) and ev[1]["parent_block_hash"] is None
        assert ev[1]["token_ids"] == list(range(16)) and ev[1]["block_size"] == 16
        assert st.index.blocks == media_of_blocks(s.blocks())
    finally:
        s.close()


def test_evt37_b_demotion_is_removal_plus_store(tmp_path):
    """EVT-37 (b): a block demoted from DRAM to NVMe (operator evict --tier dram, and DRAM
    pressure) shows as Removed(CPU) followed by Stored(STORAGE), never a bare removal; a load
    that promotes it back is Stored(CPU)."""
    s = open_store(tmp_path, dram=8, nvme=64)
    try:
        st = Stream(s)
        kr = Keyer(NS, SECRET)
        k = kr.chain_from_block_ids([1])
        store_chain(s, k, [1])
        assert s.flush(10)
        st.take()
        assert s.evict(k, tier=Tier.DRAM)["evicted"] == 1
        assert kinds(st.take()) == [("BlockRemoved", "CPU"), ("BlockStored", "STORAGE")]
        assert st.index.blocks == {ehash(1): {"STORAGE"}}
        job = s.prepare_load(k)
        s.complete_load(job.job_id)
        assert kinds(st.take()) == [("BlockStored", "CPU")]
        # DRAM pressure: 8 slots, 12 more blocks (stored in small jobs so NVMe copies follow)
        for i in range(2, 14):
            store_chain(s, kr.chain_from_block_ids([100 + i]), [100 + i])
            assert s.flush(10)
        ev = st.take()
        for i, e in enumerate(ev):
            if e["type"] == "BlockRemoved" and e["medium"] == "CPU":
                rest = [x for x in ev[i + 1:] if x["block_hashes"] == e["block_hashes"]]
                assert rest and rest[0] == {**rest[0], "type": "BlockStored", "medium": "STORAGE"}
        assert st.index.blocks == media_of_blocks(s.blocks())
        assert any(m == {"STORAGE"} for m in st.index.blocks.values())
    finally:
        s.close()


def test_evt37_d_every_tier_eviction_emits_a_removal(tmp_path):
    """EVT-37 (d): evicting a block from every tier removes it from every medium; an NVMe
    victim (NVMe pressure) is Removed(STORAGE); the subscriber's index equals the store."""
    s = open_store(tmp_path, dram=64, nvme=4)
    try:
        st = Stream(s)
        kr = Keyer(NS, SECRET)
        k = kr.chain_from_block_ids([1])
        store_chain(s, k, [1])
        assert s.flush(10)
        st.take()
        s.evict(k)
        assert kinds(st.take()) == [("BlockRemoved", "CPU"), ("BlockRemoved", "STORAGE")]
        assert st.index.blocks == {}
        for i in range(2, 10):   # NVMe holds 4: older NVMe copies are evicted
            store_chain(s, kr.chain_from_block_ids([i]), [i])
            assert s.flush(10)
        ev = st.take()
        assert ("BlockRemoved", "STORAGE") in kinds(ev)
        assert st.index.blocks == media_of_blocks(s.blocks())
    finally:
        s.close()


def test_events_carry_engine_hashes_never_tierstore_keys(tmp_path):
    """Blocks stored without engine metadata (CLI, plain replay) publish nothing; the payload
    of every batch holds no tierstore key and no part of the cluster secret."""
    s = open_store(tmp_path, nvme=0)
    try:
        st = Stream(s)
        kr = Keyer(NS, SECRET)
        plain = kr.chain_from_block_ids([7, 8])
        s.put(plain, NS, [b"y" * SIZE] * 2)
        assert st.tr.feed(st.log.drain()) == [{"type": "AllBlocksCleared"}]
        keys = kr.chain_from_block_ids([1, 2, 3])
        store_chain(s, keys, [1, 2, 3])
        payload = encode_batch(st.tr.feed(st.log.drain()))
        for k in keys + plain:
            assert bytes(k) not in payload
        assert SECRET[:8] not in payload
        assert {tuple(e["block_hashes"]) for e in decode_batch(payload)[1]} == \
            {(ehash(i),) for i in (1, 2, 3)}
    finally:
        s.close()


def test_tp_ranks_share_one_engine_hash(tmp_path):
    """Two store blocks with one engine hash (two TP ranks' namespaces): one Stored, and the
    removal only when the last copy in that medium goes."""
    s = open_store(tmp_path, nvme=0)
    try:
        st = Stream(s)
        ns1 = Namespace(**{**NS.describe(), "tp_size": 2, "tp_rank": 1})
        ns0 = Namespace(**{**NS.describe(), "tp_size": 2, "tp_rank": 0})
        k0 = Keyer(ns0, SECRET).chain_from_block_ids([1])
        k1 = Keyer(ns1, SECRET).chain_from_block_ids([1])
        for k, ns in ((k0, ns0), (k1, ns1)):
            job = s.prepare_store(k, ns, SIZE, engine=blobs([1]))
            s.complete_store(job.job_id, True)
        assert kinds(st.take())[1:] == [("BlockStored", "CPU")]
        s.evict(k0)
        assert st.take() == []
        s.evict(k1)
        assert kinds(st.take()) == [("BlockRemoved", "CPU")]
    finally:
        s.close()


def test_overflowing_log_resyncs_with_a_snapshot(tmp_path):
    """A consumer that falls behind a full log (16 events) gets AllBlocksCleared and the whole
    state instead of the lost detail: its index still equals the store."""
    s = open_store(tmp_path, dram=128, nvme=0)
    try:
        st = Stream(s, max_events=16)
        kr = Keyer(NS, SECRET)
        for i in range(40):
            store_chain(s, kr.chain_from_block_ids([i]), [i])
        s.evict(kr.chain_from_block_ids([3]))
        assert st.log.dropped > 0
        ev = st.take()
        assert ev[0] == {"type": "AllBlocksCleared"} and st.log.resyncs == 1
        assert st.index.blocks == media_of_blocks(s.blocks())
        assert len(st.index.blocks) == 39
    finally:
        s.close()


def test_engine_metadata_persists_with_the_nvme_entry_and_goes_with_it(tmp_path):
    """The engine blob is committed beside the NVMe entry (LMDB ``e`` key), survives a reopen
    (blocks ls shows engine_hash) and is deleted with the record."""
    s = open_store(tmp_path)
    kr = Keyer(NS, SECRET)
    keys = kr.chain_from_block_ids([1, 2])
    store_chain(s, keys, [1, 2])
    assert s.flush(10)
    s.evict(keys[1:])
    s.close()
    env = lmdb.open(str(tmp_path / "nvme" / "meta"), readonly=True, lock=False, subdir=True)
    with env.begin() as txn:
        metas = [bytes(v) for k, v in txn.cursor() if k[:1] == b"e"]
    env.close()
    assert [decode_engine_block(m).hash for m in metas] == [ehash(1)]
    s = open_store(tmp_path)
    try:
        (b,) = s.blocks()
        assert b["engine_hash"] == ehash(1).hex() and b["tiers"] == ["nvme"]
    finally:
        s.close()


def test_engine_metadata_is_validated(tmp_path):
    s = open_store(tmp_path, nvme=0)
    try:
        keys = Keyer(NS, SECRET).chain_from_block_ids([1, 2])
        with pytest.raises(RejectedError):
            s.prepare_store(keys, NS, SIZE, engine=blobs([1]))
        with pytest.raises(RejectedError):
            s.prepare_store(keys, NS, SIZE, engine=["not bytes", None])
        with pytest.raises(ValueError):
            engine_block("x")
        with pytest.raises(ValueError):
            decode_engine_block(msgpack.packb([9, 1]))
    finally:
        s.close()


def test_engine_metadata_given_later_announces_the_block(tmp_path):
    """A block first stored without engine metadata (the CLI) is announced when an engine
    stores it again with its hash (PRESENT)."""
    s = open_store(tmp_path, nvme=0)
    try:
        st = Stream(s)
        keys = Keyer(NS, SECRET).chain_from_block_ids([5])
        s.put(keys, NS, [b"z" * SIZE])
        st.take()
        job = s.prepare_store(keys, NS, SIZE, engine=blobs([5]))
        assert job.status == [BlockStatus.PRESENT]
        s.complete_store(job.job_id, True)
        assert kinds(st.take()) == [("BlockStored", "CPU")]
    finally:
        s.close()


def test_raw_log_alternates_per_copy(tmp_path):
    """Per (block, tier) the raw log alternates STORED / REMOVED (what the translator counts)."""
    s = open_store(tmp_path, dram=4, nvme=32)
    try:
        log = EventLog()
        s.attach_events(log)
        kr = Keyer(NS, SECRET)
        for i in range(12):
            store_chain(s, kr.chain_from_block_ids([i]), [i])
            assert s.flush(10)
        raw = log.drain()
        assert raw[0][0] == CLEARED
        state: dict = {}
        for op, tier, blob in raw[1:]:
            k = (blob, int(tier))
            assert state.get(k, False) != (op == STORED)
            state[k] = op == STORED
    finally:
        s.close()


def test_hbm_demotion_is_removed_gpu_plus_stored_cpu(tmp_path):
    """An HBM tier (on the CPU device here): a block stored into HBM is Stored(GPU); pushed out
    by HBM pressure it becomes Removed(GPU) followed by Stored(CPU), never a bare removal."""
    pytest.importorskip("torch")
    from tierstore.config import HbmConfig

    s = Store.open(StoreConfig(slot_bytes=4096, dram=DramConfig(capacity_blocks=16),
                               hbm=HbmConfig(capacity_blocks=2, device="cpu", policy="lru")))
    try:
        st = Stream(s)
        kr = Keyer(NS, SECRET)
        for i in range(3):
            job = s.prepare_store(kr.chain_from_block_ids([i]), NS, SIZE, tier=Tier.HBM,
                                  engine=blobs([i]))
            s.complete_store(job.job_id, True)
        ev = st.take()
        assert ("BlockStored", "GPU") in kinds(ev)
        gone = [e for e in ev if e["type"] == "BlockRemoved"]
        assert [e["medium"] for e in gone] == ["GPU"]
        after = [e for e in ev[ev.index(gone[0]):] if e["block_hashes"] == gone[0]["block_hashes"]]
        assert after[-1]["type"] == "BlockStored" and after[-1]["medium"] == "CPU"
        assert st.index.blocks == media_of_blocks(s.blocks())
    finally:
        s.close()
