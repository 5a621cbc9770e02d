"""Store over DRAM + NVMe: clean copies, write-behind, promotion, restart, corruption and I/O
errors."""

import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("tierstore.tiers.nvme")

from tierstore.client import Client  # noqa: E402
from tierstore.config import DramConfig, NvmeConfig, StoreConfig  # noqa: E402
from tierstore.keys import ExtraKeys, Keyer, Namespace  # noqa: E402
from tierstore.store import Store  # noqa: E402
from tierstore.tiers.slot_tier import DiskResult  # noqa: E402
from tierstore.types import BlockStatus, Tier  # noqa: E402

B = 16
SLOT = 8192
NS = Namespace("m", B, num_layers=2, num_kv_heads=2, head_size=32)
SECRET = b"s" * 32


def cfg(tmp: Path, dram=4, nvme=64, **nvme_kw) -> StoreConfig:
    return StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=dram),
                       nvme=NvmeConfig(path=str(tmp / "nvme"), capacity_blocks=nvme,
                                       file_slots=16, **nvme_kw))


def payload(keys):
    return [k * (SLOT // 32) for k in keys]


def nvme_only(s, keys):
    """Put ``keys`` and leave them on NVMe only: write-behind flushed, DRAM copies dropped."""
    s.put(keys, NS, payload(keys))
    assert s.flush(timeout_s=30)
    assert s.evict(keys, tier=Tier.DRAM).get("evicted") == len(keys)


def test_clean_copies_promotion_keeps_the_record_and_eviction_writes_nothing(tmp_path):
    """Issue 12 build item 2: a block promoted from NVMe keeps its NVMe record; evicting a clean
    block from DRAM writes nothing; every stored block is written to NVMe once."""
    s = Store.open(cfg(tmp_path))
    k = Keyer(NS, SECRET)
    P = k.chain(list(range(64)))           # 4 blocks fill DRAM
    Q = k.chain(list(range(1000, 1064)))   # 4 more: P's DRAM copies are dropped
    s.put(P, NS, payload(P))
    assert s.flush(timeout_s=30)
    assert s.counters["nvme_flushed_blocks"] == 4
    s.put(Q, NS, payload(Q))
    r = s.lookup(P, NS)
    assert r.hit_tokens == 64 and set(r.tiers) == {Tier.NVME}
    assert s.flush(timeout_s=30)
    written = s.counters["nvme_bytes_written"]
    assert written == 8 * SLOT and s.counters["nvme_flushed_blocks"] == 8
    assert s.get(P) == payload(P)           # promotion: NVMe -> DRAM, Q's DRAM copies dropped
    assert set(s.lookup(P, NS).tiers) == {Tier.DRAM}
    assert all(b["tiers"] == ["dram", "nvme"] for b in map(s.block, P))   # record kept
    assert set(s.lookup(Q, NS).tiers) == {Tier.NVME}
    assert s.get(Q) == payload(Q) and s.get(P) == payload(P)   # ping-pong: no rewrite
    assert s.flush(timeout_s=30)
    assert s.counters["nvme_bytes_written"] == written
    assert s.counters["promotions"] == 12 and s.counters["nvme_deletes"] == 0
    assert s.check() == []
    s.close()


def test_write_through_survives_clean_restart_without_rewriting(tmp_path):
    """DISK-18 (clean part): 5 blocks to NVMe, clean stop, start, lookup -> 80 hit tokens and
    0 bytes written by the lookup and the load."""
    s = Store.open(cfg(tmp_path, dram=8))
    P = Keyer(NS, SECRET).chain(list(range(80)))
    s.put(P, NS, payload(P))
    s.close()                    # a clean close writes what waited for NVMe
    s = Store.open(cfg(tmp_path, dram=8))
    assert s.lookup(P, NS).hit_tokens == 80
    assert s.get(P) == payload(P)
    assert s.counters["nvme_bytes_written"] == 0
    assert s.check() == []
    s.close()


def test_crash_with_lost_record_and_stray_file(tmp_path):
    """DISK-18 (crash part): store 5 more, SIGKILL, destroy one record by hand, drop an unknown
    file into the data dir, start: the damaged entry is dropped (lookup stops before it), the
    unknown file is removed, used bytes = surviving records, LMDB and records one-to-one."""
    c = cfg(tmp_path, dram=16)
    s = Store.open(c)
    P = Keyer(NS, SECRET).chain(list(range(160)))
    s.put(P[:5], NS, payload(P[:5]))
    s.close()
    pid = os.fork()
    if pid == 0:   # the writer: stores 5 more, flushes, then dies without any clean-up
        try:
            w = Store.open(c)
            w.put(P[5:], NS, payload(P[5:]), parent=P[4])
            w.flush()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    s = Store.open(c)
    assert s.lookup(P, NS).hit_tokens == 160
    nvme = s.tiers[Tier.NVME]
    f, off = nvme._locate(s.block(P[7])["slots"]["nvme"])
    s.close()
    with open(nvme._file_path(f), "r+b") as fh:       # destroy block 7's record header
        fh.seek(off)
        fh.write(b"\0" * 64)
    stray = Path(c.nvme.path) / "slabs" / "stray.bin"
    stray.write_bytes(b"junk")
    probe = Path(c.nvme.path) / "slabs" / ".direct-probe-99999"   # a kill mid O_DIRECT probe
    probe.write_bytes(b"\0" * 4096)
    s2 = Store.open(c)
    assert s2.lookup(P, NS).hit_tokens == 7 * B
    assert not stray.exists()
    assert s2.tiers[Tier.NVME].usage()["used_slots"] == 9
    first = s2.check()          # the first check reports what recovery had to drop ...
    assert any("dropped 1 entries" in p for p in first), first
    assert any("unknown files" in p and "stray.bin" in p for p in first), first
    assert not probe.exists() and not any(".direct-probe" in p for p in first), first
    assert s2.check() == []     # ... and the store is consistent afterwards
    assert s2.get(P[:7]) == payload(P[:7])
    s2.close()


def test_corrupt_payload_is_a_miss_and_a_counter(tmp_path):
    """A checksum mismatch on read is a miss plus a counter, never bytes: the load stops at the
    corrupt block, the engine recomputes from there, and the bad record is dropped."""
    s = Store.open(cfg(tmp_path, dram=4))
    k = Keyer(NS, SECRET)
    P = k.chain(list(range(64)))
    nvme_only(s, P)
    nvme = s.tiers[Tier.NVME]
    f, off = nvme._locate(s.block(P[2])["slots"]["nvme"])
    with open(nvme._file_path(f), "r+b") as fh:
        fh.seek(off + 4096 + 100)
        fh.write(b"\xff" * 8)
    job = s.prepare_load(P)
    assert job.num_ready == 2 and job.status[2] is BlockStatus.CORRUPT
    assert [bytes(s.slot_view(x)[:n]) for x, n in zip(job.slots, job.sizes)] == payload(P[:2])
    s.complete_load(job.job_id)
    assert s.counters["checksum_failures"] == 1
    assert s.lookup(P, NS).hit_tokens == 32
    assert s.check() == []
    s.close()


def _rot(s, key):
    """Flip payload bytes of ``key``'s NVMe record on disk (a bad sector)."""
    nvme = s.tiers[Tier.NVME]
    f, off = nvme._locate(s.block(key)["slots"]["nvme"])
    with open(nvme._file_path(f), "r+b") as fh:
        fh.seek(off + 4096 + 100)
        fh.write(b"\xff" * 8)


def test_a_block_repaired_away_while_pinned_goes_with_its_last_pin(tmp_path):
    """check --fix drops a corrupt record whose block a client pins: until the pin goes the
    block is a miss (lookup must not fail on it), then it leaves the index and can be stored
    again (adversarial find: it stayed 'resident nowhere' for good, and lookup raised)."""
    s = Store.open(cfg(tmp_path, dram=4))
    k = Keyer(NS, SECRET)
    P = k.chain(list(range(64)))
    nvme_only(s, P)
    _rot(s, P[0])
    assert s.lookup(P, NS, pin=True, owner="client").num_blocks == 4
    probs = s.check(fix=True)
    assert len(probs) == 1 and "payload checksum mismatch" in probs[0]
    assert s.check() == []                          # pinned, nowhere: waits for its pin
    assert s.lookup(P, NS).num_blocks == 0          # a miss, not KeyError
    assert s.get(P) == []
    s.unpin(P, owner="client")
    assert s.check() == [] and s.block(P[0]) is None
    assert s.put(P, NS, payload(P))[0] is BlockStatus.OK
    assert s.get(P) == payload(P)
    s.close()


def test_two_records_of_one_key_do_not_stop_the_store_from_opening(tmp_path):
    """Recovery keeps the first record of a key and deletes a second one (counted), instead of
    failing to open the data directory."""
    from tierstore.tiers.slot_tier import DiskWrite

    s = Store.open(cfg(tmp_path, dram=4))
    P = Keyer(NS, SECRET).chain(list(range(16)))
    s.put(P, NS, payload(P))
    s.close()
    s = Store.open(cfg(tmp_path, dram=4))
    nvme = s.tiers[Tier.NVME]
    a, b = nvme.alloc(), nvme.alloc()
    data = payload(P)[0]
    assert all(r.ok for r in nvme.write_batch([DiskWrite(x, P[0], NS.digest(), data, 0)
                                               for x in (a, b)]))
    s.close()
    s = Store.open(cfg(tmp_path, dram=4))   # the store's own record of P[0] + two by hand
    assert s.counters["nvme_recovery_duplicates"] == 2
    assert s.check() == []
    assert s.get(P) == payload(P)
    s.close()


class FailingReads:
    """Wraps the NVMe tier's read_batch and fails the read of one key with EIO."""

    def __init__(self, tier, bad_key):
        self.tier, self.bad_key, self.calls = tier, bad_key, 0
        self.real = tier.read_batch

    def __call__(self, items):
        self.calls += 1
        out = self.real(items)
        return [DiskResult(False, error="eio") if it.key == self.bad_key else r
                for it, r in zip(items, out)]


def test_eio_on_block_2_loads_exact_prefix(tmp_path):
    """XFER-14 (store part): EIO on the read of block 2 -> the load reports failure for block 2,
    hit count for the engine = 32 tokens, the failed-load counter goes up; nothing hangs."""
    s = Store.open(cfg(tmp_path, dram=4))
    k = Keyer(NS, SECRET)
    P = k.chain(list(range(64)))
    nvme_only(s, P)
    s.tiers[Tier.NVME].read_batch = FailingReads(s.tiers[Tier.NVME], P[2])
    job = s.prepare_load(P)
    assert job.num_ready == 2 and job.status[2] is BlockStatus.FAILED
    assert job.num_ready * B == 32
    s.complete_load(job.job_id)
    assert s.counters["nvme_read_errors"] == 1
    # an I/O error is not proof of corruption: the record stays for a later retry
    assert s.lookup(P, NS).hit_tokens == 64
    assert s.check() == []
    s.close()


def test_salt_never_reaches_disk_or_listing(tmp_path):
    """KEY-01: store P (4 blocks) under salt "tenant-a"; tenant-b and no-salt lookups get 0;
    an empty salt equals no salt (P2 -> 32); tenant-a gets 64. The literal salt appears nowhere
    in the data dir (slabs, LMDB) nor in the block listing."""
    d = tmp_path / "dd"
    c = Client.embedded(d, cfg(d, dram=16), secret=SECRET)
    k = c.keyer(NS)
    P = list(range(64))
    c.put(k.chain(P, ExtraKeys(cache_salt="tenant-a")), NS, payload(k.chain(P, ExtraKeys(cache_salt="tenant-a"))))
    assert c.lookup(k.chain(P, ExtraKeys(cache_salt="tenant-b")), NS).hit_tokens == 0
    assert c.lookup(k.chain(P), NS).hit_tokens == 0
    P2 = list(range(500, 532))
    c.put(k.chain(P2, ExtraKeys(cache_salt="")), NS, payload(k.chain(P2)))
    assert c.lookup(k.chain(P2), NS).hit_tokens == 32
    assert c.lookup(k.chain(P, ExtraKeys(cache_salt="tenant-a")), NS).hit_tokens == 64
    listing = repr(c.blocks())
    c.close()
    assert "tenant-a" not in listing
    for root, _, files in os.walk(d):
        for name in files:
            assert b"tenant-a" not in (Path(root) / name).read_bytes(), name


def test_data_dir_opens_the_same_from_anywhere(tmp_path, monkeypatch):
    """store.json keeps the NVMe path relative to the data dir: opening from another working
    directory finds the same blocks, and a copy of the data dir has its own NVMe tier."""
    import json
    import shutil
    monkeypatch.chdir(tmp_path)
    c = Client.embedded("dd", StoreConfig(
        slot_bytes=SLOT, dram=DramConfig(capacity_blocks=8),
        nvme=NvmeConfig(path="", capacity_blocks=32, file_slots=16)), secret=SECRET)
    P = c.keyer(NS).chain(list(range(32)))
    c.put(P, NS, payload(P))
    c.close()
    assert json.loads((tmp_path / "dd" / "store.json").read_text())["nvme"]["path"] == "nvme"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with Client.embedded(tmp_path / "dd", create=False) as c2:
        assert c2.lookup(P, NS).hit_tokens == 32
    shutil.copytree(tmp_path / "dd", tmp_path / "copy")
    (tmp_path / "copy" / "lock").unlink()
    with Client.embedded(tmp_path / "copy", create=False) as c3:
        assert Path(c3.store.tiers[Tier.NVME].path).resolve().is_relative_to((tmp_path / "copy").resolve())
        c3.evict(P)
    with Client.embedded(tmp_path / "dd", create=False) as c4:
        assert c4.lookup(P, NS).hit_tokens == 32
