"""NvmeTier under failing metadata and failing disk writes: results, counters, health, no orphans.

Issue 13 items 10 and 11. LMDB failures are injected by a fake ``_write_txn`` on the tier (it
raises what py-lmdb raises on a full filesystem, ``lmdb.DiskError``); disk failures by fakes on the
``tierstore.io.disk`` hooks. tests/core/test_store_faults.py has the real full filesystem.
"""

from __future__ import annotations

import errno
import os
import sys

import lmdb
import pytest

from tierstore.io import disk
from tierstore.tiers.slot_tier import DiskWrite
from tierstore.tiers.health import WINDOW

sys.path.insert(0, os.path.dirname(__file__))
from test_nvme_tier import NS, block, get, headers_on_disk, key, open_tier, put  # noqa: E402


class FailingMeta:
    """Stands in for ``NvmeTier._write_txn``: every commit fails while ``failing``; counts."""

    def __init__(self, tier) -> None:
        self.real = tier._write_txn
        self.failing = True
        self.refused = 0

    def __call__(self, fn):
        if self.failing:
            self.refused += 1
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")
        return self.real(fn)


def fill(tier, ids):
    slots = {i: tier.alloc() for i in ids}
    res = tier.write_batch([DiskWrite(s, key(i), NS, memoryview(block(i))) for i, s in slots.items()])
    return slots, res


def test_metadata_commit_failure_is_a_failed_write_without_orphans(tmp_path):
    """Issue 13 item 11: the LMDB commit of a write batch fails (metadata filesystem full): every
    item fails with ``meta`` (never an exception), the records written are zeroed (no orphan for
    check, nothing after a restart), meta_errors counts it and the tier is degraded; once the
    filesystem has room the tier writes again and is ok after a window of successes."""
    t = open_tier(tmp_path, num_slots=64)
    meta = t._write_txn = FailingMeta(t)
    slots, res = fill(t, range(3))
    assert [r.error for r in res] == ["meta"] * 3
    assert headers_on_disk(t) == set()                     # no orphan record left
    assert t.counters["meta_errors"] == 1 and t.counters["writes"] == 0
    h = t.health.snapshot()
    assert h["status"] == "degraded" and h["failures"] == {"meta_meta": 3}
    assert "No space left" in h["last_error"]
    for s in slots.values():                               # the caller frees failed slots
        t.free(s)
    assert t.slots.used == 0
    meta.failing = False
    assert t.check() == []
    for b in range(0, WINDOW, 4):                          # a window of successful writes
        put(t, range(100 + b, 104 + b))
    assert t.health.snapshot()["status"] == "ok"
    t.close()
    t = open_tier(tmp_path, num_slots=64)
    assert len(t.entries()) == WINDOW and t.last_recovery["dropped"] == 0
    t.close()


def test_delete_with_metadata_full_frees_slots_and_settles_later(tmp_path):
    """Issue 13 item 11: deletes whose LMDB commit fails (NVMe eviction on a full metadata
    filesystem used to raise out of Store.put and leak 1,024 slots): the slots are freed at once,
    the headers zeroed, the stale entries owed (health: pending, degraded) and deleted by the next
    commit that succeeds (here: check), so check is clean without a restart."""
    t = open_tier(tmp_path)
    slots = put(t, range(4))
    meta = t._write_txn = FailingMeta(t)
    t.delete_batch([slots[0], slots[1]])                   # no exception
    assert t.slots.used == 2 and headers_on_disk(t) == {slots[2], slots[3]}
    h = t.health.snapshot()
    assert h["status"] == "degraded" and h["pending"] == {"metadata_deletes": 2}
    assert t.check() == []                                 # stale entries are owed, not corrupt
    s = t.alloc()                                          # a freed slot is reused ...
    assert s in (slots[0], slots[1])
    (r,) = t.write_batch([DiskWrite(s, key(9), NS, memoryview(block(9)))])
    assert r.error == "meta"                               # ... and its write fails cleanly
    t.free(s)
    meta.failing = False
    assert t.check() == []                                 # settles the owed deletes
    assert t.health.snapshot()["pending"] == {}
    assert sorted(e.slot for e in t.entries()) == sorted([slots[2], slots[3]])
    t.close()


def test_stale_entries_owed_at_a_crash_are_dropped_at_open_never_served(tmp_path):
    """Issue 13 item 11: a process that dies while deletes are still owed leaves stale LMDB
    entries whose records were zeroed: the next open drops them (reported once) and serves only
    the live records."""
    t = open_tier(tmp_path)
    slots = put(t, range(3))
    t._write_txn = FailingMeta(t)
    t.delete_batch([slots[1]])
    t._closed = True                                       # "crash": nothing settled at close
    t._pool.close()
    t._env_obj.close()
    t = open_tier(tmp_path)
    assert sorted(e.slot for e in t.entries()) == [slots[0], slots[2]]
    assert t.last_recovery["dropped"] == 1
    assert get(t, 0, slots[0])[1] == block(0)
    t.close()


def test_namespace_descriptor_is_kept_when_metadata_cannot_commit(tmp_path):
    """Issue 13 item 11: put_namespace on a full metadata filesystem raised out of
    prepare_store; now the descriptor is kept, listed, and written with the next commit."""
    t = open_tier(tmp_path)
    meta = t._write_txn = FailingMeta(t)
    t.put_namespace(b"D" * 16, {"model": "m"})             # no exception
    assert t.namespaces() == {b"D" * 16: {"model": "m"}}
    assert t.health.snapshot()["pending"] == {"namespace_writes": 1}
    meta.failing = False
    put(t, [1])                                            # the next commit carries it
    assert t.health.snapshot()["pending"] == {}
    t.close()
    t = open_tier(tmp_path)
    assert t.namespaces() == {b"D" * 16: {"model": "m"}}
    t.close()


def test_fsync_failure_fails_the_items_and_leaves_no_orphan(tmp_path, monkeypatch):
    """Issue 13 item 10 (kind: a write whose durability failed): fdatasync EIO fails the items
    of that file with ``eio``; their records are zeroed, so check finds no orphan."""
    t = open_tier(tmp_path)

    def failing_sync(fd):
        raise OSError(errno.EIO, "injected EIO")

    monkeypatch.setattr(os, "fdatasync", failing_sync)
    slots, res = fill(t, range(2))
    monkeypatch.undo()
    assert [r.error for r in res] == ["eio", "eio"]
    assert headers_on_disk(t) == set()
    for s in slots.values():
        t.free(s)
    assert t.check() == []
    assert t.health.snapshot()["failures"] == {"fsync_eio": 1}
    t.close()


def test_header_zeroing_failure_is_counted_and_retried(tmp_path, monkeypatch):
    """Issue 13 item 10: the header write of a delete fails: counted (io_errors, health
    ``zero``), remembered, and zeroed by the next check, which is then clean (no orphan)."""
    t = open_tier(tmp_path)
    slots = put(t, range(2))
    real = disk.write_vec

    def failing(fd, bufs, offset, **kw):
        if len(bufs) == 1:                                 # the header-only write of a delete
            raise OSError(errno.EIO, "injected EIO")
        return real(fd, bufs, offset, **kw)

    monkeypatch.setattr(disk, "write_vec", failing)
    t.delete_batch([slots[0]])
    assert slots[0] in headers_on_disk(t) and not t.slots.is_used(slots[0])
    assert t.health.snapshot()["pending"] == {"header_zeroings": 1}
    assert t.counters["io_errors"] == 1
    monkeypatch.undo()
    assert t.check() == []
    assert headers_on_disk(t) == {slots[1]} and t.health.snapshot()["pending"] == {}
    t.close()


def test_grow_eio_fails_the_alloc_without_raising(tmp_path, monkeypatch):
    """Issue 13 item 10: growing a slab file fails with EIO: alloc answers None (counted, the
    tier degraded), no half-grown file is left, and the next alloc grows it."""
    t = open_tier(tmp_path)

    def failing(fd, offset, length):
        raise OSError(errno.EIO, "injected EIO")

    monkeypatch.setattr(disk, "fallocate", failing)
    assert t.alloc() is None
    assert not t._file_path(0).exists()
    assert t.health.snapshot()["failures"] == {"grow_eio": 1}
    monkeypatch.undo()
    s = t.alloc()
    assert s is not None and t._file_path(0).exists()
    t.close()


@pytest.mark.parametrize("err", [errno.EIO, errno.EINVAL, errno.ENOSPC])
def test_write_errors_are_named_by_errno(tmp_path, monkeypatch, err):
    """Issue 13 item 10: a failed record write says which error it was (eio, einval, enospc),
    and the tier's health counts it under that name."""
    t = open_tier(tmp_path)
    real = disk.write_vec

    def failing(fd, bufs, offset, **kw):
        if len(bufs) > 1:
            raise OSError(err, os.strerror(err))
        return real(fd, bufs, offset, **kw)

    monkeypatch.setattr(disk, "write_vec", failing)
    _, res = fill(t, [1])
    name = {errno.EIO: "eio", errno.EINVAL: "einval", errno.ENOSPC: "enospc"}[err]
    assert res[0].error == name
    assert t.health.snapshot()["failures"] == {f"write_{name}": 1}
    assert t.usage()["health"] == "degraded"
    t.close()
