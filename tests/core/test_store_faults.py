"""Store under failing NVMe writes and failing metadata; per-request pins; views after close.

Issue 13 items 10, 11, 12, 14, 15 (the embedded store; tests/integration/test_daemon_faults.py has
the daemon side). Disk faults are fakes on the ``tierstore.io.disk`` hooks; metadata faults a fake
``_write_txn`` on the tier, and once a real full filesystem (a tmpfs in a private mount namespace).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import pytest

from tierstore.client import Client
from tierstore.config import DramConfig, NvmeConfig, StoreConfig
from tierstore.errors import PinError
from tierstore.index.residency import request_owner
from tierstore.io import disk
from tierstore.keys import Keyer, Namespace
from tierstore.metrics import DaemonMetrics
from tierstore.store import Store
from tierstore.types import BlockStatus, Tier

B = 16
SLOT = 4096
NS = Namespace("faults", B)
SECRET = b"f" * 32
ROOT = Path(__file__).resolve().parents[2]


def cfg(tmp: Path, dram=8, nvme=64) -> StoreConfig:
    return StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=dram),
                       nvme=NvmeConfig(path=str(tmp / "nvme"), capacity_blocks=nvme, file_slots=16))


def chain(i: int, n: int = 4):
    return Keyer(NS, SECRET).chain(list(range(i * 1000, i * 1000 + n * B)))


def payload(keys):
    return [k * (SLOT // 32) for k in keys]


class FailingRecordWrites:
    """Stands in for ``disk.write_vec``: record writes (header + payload) fail with ``err``."""

    def __init__(self, err: int) -> None:
        self.real, self.err, self.calls = disk.write_vec, err, 0

    def __call__(self, fd, bufs, offset, **kw):
        if len(bufs) > 1:
            self.calls += 1
            raise OSError(self.err, os.strerror(self.err))
        return self.real(fd, bufs, offset, **kw)


def metric(store, name: str) -> float | None:
    text = DaemonMetrics(store.stats).render().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def test_every_nvme_write_failing_is_visible(tmp_path, monkeypatch):
    """Issue 13 item 10: every NVMe write fails with EINVAL. Puts still answer OK (the blocks
    are in DRAM), but flush says False, stats() says degraded with the failures counted by error,
    check() reports it (CLI exit 1), Prometheus has a counter and a gauge. After the disk heals,
    check's probe finds it working at once, and new writes make the status ok: no restart."""
    s = Store.open(cfg(tmp_path))
    fake = FailingRecordWrites(errno.EINVAL)
    monkeypatch.setattr(disk, "write_vec", fake)
    P = chain(1)
    assert s.put(P, NS, payload(P)) == [BlockStatus.OK] * 4
    assert s.flush(timeout_s=30) is False
    st = s.stats()
    nv = st["health"]["tiers"]["nvme"]
    assert st["health"]["status"] == "degraded" and nv["status"] == "degraded"
    assert nv["failures"] == {"write_einval": 4} and "einval" in nv["last_error"]
    assert st["counters"]["nvme_write_einval"] == 4 and st["write_behind"]["failed_blocks"] == 4
    assert next(t for t in st["tiers"] if t["tier"] == "nvme")["health"] == "degraded"
    assert metric(s, 'tierstore_tier_degraded{tier="nvme"}') == 1
    assert metric(s, 'tierstore_tier_io_failures_total{error="einval",op="write",tier="nvme"}') == 4
    assert metric(s, "tierstore_write_behind_failed_blocks_total") == 4
    problems = s.check()                                  # probes the write path: fails too
    assert len(problems) == 1 and problems[0].startswith("nvme: failing: 5 of the last"), problems
    assert s.get(P) == payload(P)                         # served from DRAM all along
    monkeypatch.undo()                                    # the disk works again:
    assert s.check() == []                                # check's probe says so at once
    assert s.stats()["health"]["status"] == "degraded"    # the status still shows the failures
    for i in range(2, 10):                                # ... until a window of good I/O
        Q = chain(i)
        s.put(Q, NS, payload(Q))
        assert s.flush(timeout_s=30)
    assert s.stats()["health"]["status"] == "ok" and s.check() == []
    assert metric(s, 'tierstore_tier_degraded{tier="nvme"}') == 0
    s.close()


def test_flush_reports_a_failed_write_to_its_owner_even_when_it_failed_earlier(tmp_path,
                                                                               monkeypatch):
    """Issue 13 item 11 ("75 write-through blocks were acknowledged without metadata"): a copy
    whose write failed before ``flush`` was called made flush answer True (it counted only
    failures during its wait). Now the owner that stored the block hears of it, once; another
    owner's flush is not answered with someone else's failure."""
    s = Store.open(cfg(tmp_path))
    monkeypatch.setattr(disk, "write_vec", FailingRecordWrites(errno.EIO))
    P = chain(1)
    s.put(P, NS, payload(P), owner="a")
    while s.stats()["write_behind"]["queued_blocks"]:     # the writes fail before any flush
        time.sleep(0.01)
    assert s.flush(timeout_s=30, owner="b") is True       # b stored nothing that failed
    assert s.flush(timeout_s=30, owner="a") is False      # a's blocks have no NVMe copy
    assert s.flush(timeout_s=30, owner="a") is True       # reported once
    monkeypatch.undo()
    Q = chain(2)
    s.put(Q, NS, payload(Q), owner="a")
    assert s.flush(timeout_s=30, owner="a") is True
    s.close()


def test_failed_writes_kept_per_owner_are_bounded_and_never_acknowledged():
    """Issue 13 item 11: the failed writes kept for an owner's next flush are bounded (an owner
    that never flushes, e.g. a scheduler connection, must not grow memory while every write
    fails), and the folding never lets a flush miss a failure it covers."""
    import random

    from tierstore.writebehind import _Failed

    rng = random.Random(13)
    for _ in range(300):
        f, real, seq = _Failed(cap=rng.choice([1, 2, 4, 16])), set(), 0
        for _ in range(200):
            if rng.random() < 0.6:
                seq += rng.randint(1, 3)
                if rng.random() < 0.5:
                    f.add(seq)
                    real.add(seq)
                assert len(f.seqs) <= f.cap
            else:
                truth = any(q <= seq for q in real)
                assert f.report(seq) or not truth
                real = {q for q in real if q > seq}
        f.report(seq)
        assert f.empty


class FailingMeta:
    """Stands in for ``NvmeTier._write_txn``: commits fail while ``failing``."""

    def __init__(self, tier) -> None:
        self.real, self.failing = tier._write_txn, True

    def __call__(self, fn):
        if self.failing:
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")
        return self.real(fn)


def test_metadata_failures_become_skipped_copies_with_the_index_intact(tmp_path):
    """Issue 13 item 11 (the kind, injected at the tier boundary): with every LMDB commit failing
    — new namespaces, record commits, NVMe evictions' deletes — no error escapes put, flush,
    get or evict; the DRAM policy keeps its blocks, no slot leaks (check reports only the
    degraded tier), nothing is acknowledged durable (flush False); when commits work again,
    check is clean without a restart and a reopen finds exactly what was committed."""
    s = Store.open(cfg(tmp_path, dram=8, nvme=8))
    nvme = s.tiers[Tier.NVME]
    early = [chain(i, 2) for i in range(4)]               # fill NVMe: later copies must evict
    for P in early:
        s.put(P, NS, payload(P))
    assert s.flush(timeout_s=30)
    meta = nvme._write_txn = FailingMeta(nvme)
    other = Namespace("faults-2", B)                       # a new namespace: put_namespace fails
    late = [Keyer(other, SECRET).chain(list(range(i * 100, i * 100 + 2 * B))) for i in range(6)]
    for P in late:
        assert s.put(P, other, payload(P)) == [BlockStatus.OK] * 2
    assert s.flush(timeout_s=30) is False
    assert s.evict(late[-1]) == {"evicted": 2}
    for P in early + late[:-1]:            # what is left: exact prefixes (DRAM or older NVMe)
        got = s.get(P)
        assert got == payload(P)[:len(got)]
    assert s.get(late[-2]) == payload(late[-2])
    st = s.stats()
    assert st["counters"]["nvme_meta_errors"] > 0 and st["counters"]["nvme_write_meta"] > 0
    dram = next(t for t in st["tiers"] if t["tier"] == "dram")
    assert dram["blocks"] == dram["used_slots"] > 0        # the eviction list is intact
    problems = s.check()
    assert problems and all(p.startswith("nvme: failing:") for p in problems), problems
    meta.failing = False
    assert s.check() == []                                 # settled: no restart needed
    on_nvme = {bytes.fromhex(b["key"]) for b in s.blocks(tier=Tier.NVME)}
    s.close()
    s = Store.open(cfg(tmp_path, dram=8, nvme=8))
    assert {bytes.fromhex(b["key"]) for b in s.blocks(tier=Tier.NVME)} == on_nvme
    assert s.check() == []
    s.close()


FULL_META = """
import json, os, subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tierstore.config import DramConfig, NvmeConfig, StoreConfig
from tierstore.keys import Keyer, Namespace
from tierstore.store import Store
root = Path(sys.argv[1])
meta = root / "nvme" / "meta"
cfg = StoreConfig(slot_bytes=4096, dram=DramConfig(capacity_blocks=64),
                  nvme=NvmeConfig(path=str(root / "nvme"), capacity_blocks=1024, file_slots=64))
ns = Namespace("full", 16)
k = Keyer(ns, b"s" * 32)
s = Store.open(cfg)
raised, chains = 0, []
for i in range(200):                     # 2,000 blocks through a 96 KiB metadata filesystem
    keys = k.chain(list(range(i * 160, i * 160 + 160)))
    chains.append(keys)
    try:
        st = s.put(keys, ns, [bytes([i % 251]) * 4096] * 10, wait_s=5)
    except Exception as e:
        raised += 1
out = {"raised": raised, "flush": s.flush(30), "check_full": s.check()}
st = s.stats()
dram = next(t for t in st["tiers"] if t["tier"] == "dram")
nv = next(t for t in st["tiers"] if t["tier"] == "nvme")
out.update(meta_errors=st["counters"].get("nvme_meta_errors", 0),
           dram_blocks=dram["blocks"], dram_used=dram["used_slots"],
           nvme_blocks=nv["blocks"], nvme_used=nv["used_slots"])
subprocess.run(["mount", "-o", "remount,size=4m", str(meta)], check=True)   # room again
out["check_room"] = s.check()
for i in range(200, 210):
    keys = k.chain(list(range(i * 160, i * 160 + 160)))
    chains.append(keys)
    s.put(keys, ns, [bytes([i % 251]) * 4096] * 10)
out["flush_room"] = s.flush(30)
out["check_after"] = s.check()
s.close()
s = Store.open(cfg)
out["check_reopen"] = s.check()
bad = 0
for i, keys in enumerate(chains):
    bad += sum(g != bytes([i % 251]) * 4096 for g in s.get(keys))
out["wrong_blocks"] = bad
s.close()
print(json.dumps(out))
"""


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare (a private tmpfs mount)")
def test_a_full_metadata_filesystem_for_real(tmp_path):
    """Issue 13 item 11, as reported: the LMDB directory on a full filesystem (a 96 KiB tmpfs in
    a private mount namespace). 2,000 blocks are put: no error escapes put (12 of 200 did), the
    DRAM eviction list matches DRAM (it was left empty), NVMe slots match the index (1,024
    leaked), flush is False (blocks were acknowledged without metadata); check reports only the
    degraded tier, is clean once the filesystem has room, without a restart; a reopen is clean
    and serves no wrong byte."""
    meta = tmp_path / "nvme" / "meta"
    meta.mkdir(parents=True)
    script = tmp_path / "full_meta.py"
    script.write_text(FULL_META)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f'mount -t tmpfs -o size=96k tmpfs "{meta}" && exec "$0" "$@"',
                        sys.executable, str(script), str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["raised"] == 0 and out["flush"] is False and out["meta_errors"] > 0, out
    assert out["dram_blocks"] == out["dram_used"] > 0
    assert out["nvme_blocks"] == out["nvme_used"]
    assert out["check_full"] and all(p.startswith("nvme: failing:") for p in out["check_full"])
    assert out["check_room"] == [] and out["flush_room"] is True and out["check_after"] == []
    assert out["check_reopen"] == [] and out["wrong_blocks"] == 0


def test_a_put_whose_copy_fails_is_aborted(tmp_path):
    """Issue 13 item 12 (embedded store and client): a copy into the slots that raises aborts the
    job: nothing pending, the keys are not PRESENT (a new store of them is OK), lookups miss
    them, check is clean."""
    for c in (Client(Store.open(cfg(tmp_path)), secret=SECRET),):
        P = chain(7)
        blocks = payload(P)
        blocks[2] = blocks[2][:100]                        # the copy of block 2 raises
        with pytest.raises(ValueError):
            c.put(P, NS, blocks)
        st = c.stats()
        assert st["pending_stores"] == 0 and st["counters"]["stores_aborted"] == 1
        assert c.lookup(P, NS).num_blocks == 0
        job = c.prepare_store(P, NS, SLOT)
        assert job.status == [BlockStatus.OK] * 4
        c.complete_store(job.job_id, ok=False)
        assert c.check() == []
        c.close()


def test_a_store_job_never_completed_is_reported_by_check_and_fixed():
    """Issue 13 item 12 (the kind): a job that its embedded caller lost (prepared, never
    completed: no connection ends to abort it) kept its keys PRESENT forever while check said
    clean. Now check reports a job pending longer than STALE_JOB_S, and --fix aborts it; a lost
    load job (pinning its blocks) likewise."""
    from tierstore.store import STALE_JOB_S

    now = [0.0]
    s = Store(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=16)), _dram(16),
              clock=lambda: now[0])
    P, Q = chain(5), chain(6)
    s.put(Q, NS, payload(Q))
    s.prepare_store(P, NS, SLOT)
    s.prepare_load(Q)
    now[0] = STALE_JOB_S - 1
    assert s.check() == []
    now[0] = STALE_JOB_S + 1
    problems = s.check()
    assert len(problems) == 2 and "4 blocks answer PRESENT" in problems[0], problems
    assert "pins 4 blocks" in problems[1]
    s.check(fix=True)
    assert s.check() == [] and s.stats()["pins"] == 0
    assert s.prepare_store(P, NS, SLOT).status == [BlockStatus.OK] * 4
    s.close()


def test_unpin_checks_every_key_before_releasing_any(tmp_path):
    """Issue 13 item 14: an unpin that names a key the owner holds no pin on releases nothing
    (it used to keep what it released before failing); a key listed twice needs two pins."""
    s = Store(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=16)),
              _dram(16))
    P = chain(3)
    s.put(P, NS, payload(P))
    s.pin(P[:3], owner="a")
    with pytest.raises(PinError, match="1 of the 4"):
        s.unpin(P, owner="a")
    assert [s.block(k)["pins"] for k in P] == [1, 1, 1, 0]
    with pytest.raises(PinError):
        s.unpin([P[0], P[0]], owner="a")
    assert s.block(P[0])["pins"] == 1
    assert s.unpin(P[:3], owner="a") == 3
    assert s.stats()["pins"] == 0 and s.check() == []
    s.close()


def _dram(n):
    from tierstore.tiers.dram import DramTier
    return DramTier(n, SLOT)


def test_one_request_never_releases_another_requests_pins():
    """Issue 13 item 14, as reported: requests A and B of one client pin a shared prefix; A's
    lease runs out; releasing A (unpin of its keys, or release) leaves B's pins alone, where
    it used to leave B with 0 pins. Closing the client's owner releases both."""
    now = [0.0]
    s = Store(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=16)), _dram(16),
              clock=lambda: now[0])
    c = Client(s, secret=SECRET)
    P = chain(4)
    c.put(P, NS, payload(P))
    assert c.lookup(P, NS, pin=True, ttl_s=1.0, request="A").num_blocks == 4
    assert c.lookup(P[:2], NS, pin=True, ttl_s=60.0, request="B").num_blocks == 2
    now[0] = 5.0                                          # A's lease ran out
    with pytest.raises(PinError):
        c.unpin(P, request="A")
    assert c.release("A") == 0
    assert [s.block(k)["pins"] for k in P] == [1, 1, 0, 0]
    assert {o["owner"] for o in s.block(P[0])["pin_owners"]} == {request_owner(c.owner, "B")}
    assert c.lookup(P, NS, pin=True, request="C").num_blocks == 4
    assert s.release_owner(c.owner)["pins_released"] == 6   # the client goes: B's and C's
    assert s.stats()["pins"] == 0 and s.check() == []
    with pytest.raises(PinError):
        c.lookup(P, NS, pin=True, request="bad name")
    c.close()


VIEW_AFTER_CLOSE = """
import torch
from tierstore.client import Client
from tierstore.config import DramConfig, StoreConfig
c = Client.embedded(None, StoreConfig(slot_bytes=4096, dram=DramConfig(capacity_blocks=4)))
t = torch.frombuffer(c.slab()[0], dtype=torch.uint8)
v = c.slot_view(1)
c.close()
t[0] = 7
v[0] = 9
print(int(t[0]), int(t[4096]), v[0])
"""


def test_a_slab_view_used_after_close_does_not_crash():
    """Issue 13 item 15 (embedded): a torch tensor over the DRAM slab and a slot view, used
    after close: the mapping lives as long as they do (it was unmapped: SIGSEGV)."""
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(VIEW_AFTER_CLOSE)],
                       capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split() == ["7", "9", "9"]
