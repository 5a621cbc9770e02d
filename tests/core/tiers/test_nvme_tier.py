"""NvmeTier: roundtrip, corruption, I/O errors, recovery and the DISK/LMDB/ZSTD cases.

Crashes are simulated in a forked child that ends with SIGKILL (LMDB forbids opening one env
twice in a process, so "reopen without close" happens across processes). Fakes are plain
functions installed on the ``tierstore.io.disk`` hooks; they record calls and fail on request.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import struct
import subprocess
import time
import warnings
from pathlib import Path

import lmdb
import pytest

from tierstore.errors import ConfigError, FormatError
from tierstore.io import disk
from tierstore.tiers import record
from tierstore.tiers.slot_tier import DiskRead, DiskWrite
from tierstore.tiers.nvme import NvmeTier

SLOT = 64 << 10
NS = b"N" * 16


def key(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


def block(i: int, n: int = SLOT) -> bytes:
    return random.Random(i).randbytes(n)


def open_tier(path, num_slots=16, slot_bytes=SLOT, **kw) -> NvmeTier:
    kw.setdefault("file_slots", 4)
    t = NvmeTier(path, num_slots, slot_bytes, **kw)
    t.recover()
    return t


def put(tier: NvmeTier, ids, n: int = SLOT) -> dict[int, int]:
    """Store blocks ``ids``; returns {id: slot}."""
    slots = {i: tier.alloc() for i in ids}
    res = tier.write_batch([DiskWrite(s, key(i), NS, memoryview(block(i, n)))
                            for i, s in slots.items()])
    assert all(r.ok for r in res), res
    return slots


def get(tier: NvmeTier, i: int, slot: int, n: int = SLOT):
    dst = disk.aligned_buffer(n)
    (r,) = tier.read_batch([DiskRead(slot, key(i), dst, n, 0)])
    return r, bytes(dst[:n])


def record_offset(tier: NvmeTier, slot: int) -> tuple[Path, int]:
    f, off = divmod(slot, tier.file_slots)
    return tier._file_path(f), off * tier.record_bytes


def headers_on_disk(tier: NvmeTier) -> set[int]:
    """Slots whose on-disk header carries the record magic (read with plain buffered I/O)."""
    out = set()
    for f in range(tier.num_files):
        p = tier._file_path(f)
        if not p.exists():
            continue
        with open(p, "rb") as fh:
            for i in range(os.path.getsize(p) // tier.record_bytes):
                fh.seek(i * tier.record_bytes)
                if fh.read(4) == record.MAGIC:
                    out.add(f * tier.file_slots + i)
    return out


def fork_run(fn) -> int:
    """Run ``fn()`` in a forked child; returns the child's wait status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


# ----------------------------------------------------------------------------- basics
def test_roundtrip_and_clean_reopen(tmp_path):
    t = open_tier(tmp_path)
    slots = put(t, range(6))
    for i, s in slots.items():
        r, data = get(t, i, s)
        assert r.ok and data == block(i)
    assert t.usage()["disk_used_bytes"] == 6 * t.record_bytes
    t.close()
    t = open_tier(tmp_path)
    assert {e.slot for e in t.entries()} == set(slots.values())
    assert t.check() == []
    r, data = get(t, 3, slots[3])
    assert r.ok and data == block(3)
    t.close()


def test_checksum_corruption_is_a_miss_and_counted(tmp_path):
    t = open_tier(tmp_path)
    slots = put(t, range(3))
    path, off = record_offset(t, slots[1])
    with open(path, "r+b") as fh:          # flip one payload byte on disk
        fh.seek(off + record.HEADER_BYTES + 1234)
        b = fh.read(1)
        fh.seek(off + record.HEADER_BYTES + 1234)
        fh.write(bytes([b[0] ^ 0xFF]))
    r, _ = get(t, 1, slots[1])
    assert not r.ok and r.error == "corrupt"
    assert t.counters["checksum_failures"] == 1
    assert get(t, 0, slots[0])[0].ok
    problems = t.check()
    assert len(problems) == 1 and f"slot {slots[1]}" in problems[0]
    t.check(fix=True)
    assert t.dropped_slots == [slots[1]] and t.check() == []
    t.close()


def test_truncated_slab_file(tmp_path):
    t = open_tier(tmp_path)
    slots = put(t, range(4))                      # one file: slots 0..3
    path, off = record_offset(t, slots[3])
    os.truncate(path, off + record.HEADER_BYTES + 100)
    r, _ = get(t, 3, slots[3])
    assert not r.ok and r.error == "corrupt"
    assert get(t, 2, slots[2])[0].ok
    t.close()
    t = open_tier(tmp_path)
    assert sorted(e.slot for e in t.entries()) == sorted(slots[i] for i in range(3))
    assert os.path.getsize(path) % t.record_bytes == 0
    assert all(get(t, i, slots[i])[1] == block(i) for i in range(3))
    assert t.check() == []
    t.close()


def test_eio_on_read_and_write_fails_only_that_item(tmp_path, monkeypatch):
    t = open_tier(tmp_path)
    slots = put(t, range(3))
    bad_path, bad_off = record_offset(t, slots[1])
    bad_fd = t._fds[slots[1] // t.file_slots]
    calls = []
    real_read, real_write = disk.read_vec, disk.write_vec

    def failing_read(fd, bufs, offset, **kw):
        calls.append(("read", offset))
        if fd == bad_fd and offset == bad_off:
            raise OSError(errno.EIO, "injected EIO")
        return real_read(fd, bufs, offset, **kw)

    monkeypatch.setattr(disk, "read_vec", failing_read)
    res = t.read_batch([DiskRead(s, key(i), disk.aligned_buffer(SLOT), SLOT, 0)
                        for i, s in slots.items()])
    assert [r.ok for r in res] == [True, False, True] and res[1].error == "eio"
    assert t.counters["io_errors"] == 1 and len(calls) == 3
    monkeypatch.setattr(disk, "read_vec", real_read)

    new = {i: t.alloc() for i in (10, 11)}
    target = record_offset(t, new[11])[1]

    def failing_write(fd, bufs, offset, **kw):
        if offset == target:
            raise OSError(errno.EIO, "injected EIO")
        return real_write(fd, bufs, offset, **kw)

    monkeypatch.setattr(disk, "write_vec", failing_write)
    res = t.write_batch([DiskWrite(s, key(i), NS, memoryview(block(i))) for i, s in new.items()])
    assert [r.ok for r in res] == [True, False] and res[1].error == "eio"
    monkeypatch.setattr(disk, "write_vec", real_write)
    t.close()
    t = open_tier(tmp_path)           # nothing of the failed item is visible after restart
    assert new[11] not in {e.slot for e in t.entries()} and new[10] in {e.slot for e in t.entries()}
    t.close()


def test_delete_zeroes_magic_and_is_not_resurrected(tmp_path):
    t = open_tier(tmp_path)
    slots = put(t, range(4))
    t.delete_batch([slots[0], slots[2]])
    assert headers_on_disk(t) == {slots[1], slots[3]}
    assert t.slots.used == 2 and t.usage()["disk_used_bytes"] == 2 * t.record_bytes
    t.close()
    t = open_tier(tmp_path)
    assert sorted(e.slot for e in t.entries()) == [slots[1], slots[3]]
    assert t.last_recovery["orphans"] == 0
    t.close()


def test_map_grows_on_map_full(tmp_path):
    t = open_tier(tmp_path, map_size=64 << 10)
    for i in range(40):
        t.put_namespace(i.to_bytes(16, "little"), {"model": "m" * 3000, "i": i})
    assert t._map_size > 64 << 10
    assert len(t.namespaces()) == 40 and t.namespaces()[(7).to_bytes(16, "little")]["i"] == 7
    t.close()


def test_format_version_mismatch_is_one_line_format_error(tmp_path):
    open_tier(tmp_path).close()
    env = lmdb.open(str(tmp_path / "meta"), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"!format", b"tierstore-nvme-meta/99")
    env.close()
    with pytest.raises(FormatError) as ei:
        NvmeTier(tmp_path, 16, SLOT, file_slots=4)
    assert "meta/99" in str(ei.value) and "\n" not in str(ei.value)


def test_foreign_env_and_geometry_change_are_refused(tmp_path):
    (tmp_path / "a" / "meta").mkdir(parents=True)
    env = lmdb.open(str(tmp_path / "a" / "meta"), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    with pytest.raises(FormatError):
        NvmeTier(tmp_path / "a", 16, SLOT)
    open_tier(tmp_path / "b").close()
    with pytest.raises(ConfigError):
        NvmeTier(tmp_path / "b", 16, 2 * SLOT, file_slots=4)


# ----------------------------------------------------------------------------- cases
def test_disk18_metadata_in_sync_after_clean_restart_and_crash(tmp_path):
    """DISK-18: clean reopen keeps all 5; then 5 more + SIGKILL, a record corrupted, a slab file
    deleted and an unknown file dropped in: the bad entries are dropped, the unknown file removed,
    the orphan freed, used bytes = sum of survivors, LMDB entries and records one-to-one."""
    t = open_tier(tmp_path)
    first = put(t, range(5))                     # slots 0..4
    t.close()
    t = open_tier(tmp_path)
    assert sorted(e.slot for e in t.entries()) == sorted(first.values())
    assert t.check() == [] and t.counters["writes"] == 0
    t.close()

    def crash():
        c = open_tier(tmp_path)
        put(c, range(5, 10))                     # slots 5..9
        s = c.alloc()                            # data written, metadata never committed
        c._write_one(DiskWrite(s, key(99), NS, memoryview(block(99))))
        os.kill(os.getpid(), signal.SIGKILL)

    status = fork_run(crash)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    probe = NvmeTier(tmp_path, 16, SLOT, file_slots=4)   # geometry only, not recovered
    path, off = record_offset(probe, 2)
    with open(path, "r+b") as fh:                        # corrupt block 2's header
        fh.seek(off + 20)
        fh.write(b"\xff\xff\xff\xff")
    os.unlink(probe._file_path(2))                       # slots 8..11 vanish (blocks 8, 9)
    (tmp_path / "slabs" / "stray.bin").write_bytes(b"not ours")
    probe.close()

    t = open_tier(tmp_path)
    survivors = {0, 1, 3, 4, 5, 6, 7}
    assert {e.slot for e in t.entries()} == survivors
    assert t.last_recovery["dropped"] == 3 and t.last_recovery["orphans"] == 1
    assert not (tmp_path / "slabs" / "stray.bin").exists()
    assert headers_on_disk(t) == survivors                # one-to-one
    assert t.usage()["disk_used_bytes"] == len(survivors) * t.record_bytes
    for s in survivors:
        r, data = get(t, s, s)
        assert r.ok and data == block(s)
    assert t.check() == []
    again = put(t, [20])                                  # the vanished file is recreated
    assert get(t, 20, again[20])[1] == block(20)
    t.close()


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 64 MiB tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk20_enospc_below_budget_clamps_capacity(small_tmpfs):
    """DISK-20: 1 GiB budget on a 64 MiB filesystem; 1 MiB blocks until full, then 100 more:
    alloc() returns None, capacity clamped, no zero-length or partial files, earlier blocks read
    back byte-exact."""
    mb = 1 << 20
    t = open_tier(small_tmpfs / "nv", num_slots=1024, slot_bytes=mb, file_slots=8)
    stored = {}
    for i in range(1024):
        s = t.alloc()
        if s is None:
            break
        (r,) = t.write_batch([DiskWrite(s, key(i), NS, memoryview(block(i, mb)))])
        assert r.ok, r
        stored[i] = s
    assert 30 < len(stored) < 64
    assert all(t.alloc() is None for _ in range(100))
    u = t.usage()
    assert u["clamped"] and u["effective_slots"] == len(stored)
    assert u["capacity_bytes"] == len(stored) * mb < 64 * mb
    assert t.counters["enospc"] >= 1
    for p in (small_tmpfs / "nv" / "slabs").iterdir():
        size = p.stat().st_size
        assert size > 0 and size % t.record_bytes == 0, (p, size)
    for i, s in stored.items():
        r, data = get(t, i, s, mb)
        assert r.ok and data == block(i, mb)
    t.delete_batch([stored[0]])                  # a freed slot is reusable after the clamp
    assert t.alloc() == stored[0]
    t.close()


class _Recorder:
    """Records (addresses, lengths, offset) of every vectored call, then does the real call."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, fd, bufs, offset):
        self.calls.append(([disk.address_of(memoryview(b)) for b in bufs],
                           [memoryview(b).nbytes for b in bufs], offset))
        return self.real(fd, bufs, offset)


def test_disk21_direct_io_alignment_with_512_aligned_payload(tmp_path, monkeypatch):
    """DISK-21: 3,098,112-byte payload (512- but not 4096-aligned) with direct I/O: every buffer
    address, length and file offset is 4096-aligned; roundtrip byte-exact (aligned slab source
    and an unaligned source through the bounce buffer)."""
    n = 3_098_112
    if disk.probe_direct(str(tmp_path)) is not None:
        pytest.skip("this filesystem refuses O_DIRECT")
    wr, rd = _Recorder(disk._sys_pwritev), _Recorder(disk._sys_preadv)
    monkeypatch.setattr(disk, "_sys_pwritev", wr)
    monkeypatch.setattr(disk, "_sys_preadv", rd)
    t = open_tier(tmp_path, num_slots=4, slot_bytes=n, direct_io="on")
    assert t.direct
    slab = disk.aligned_buffer(2 * t.payload_bytes)      # like the DRAM slab: aligned slots
    src = slab[:n]
    src[:] = block(1, n)
    unaligned = memoryview(bytearray(b"x" + block(2, n)))[1:]
    s1, s2 = t.alloc(), t.alloc()
    res = t.write_batch([DiskWrite(s1, key(1), NS, src), DiskWrite(s2, key(2), NS, unaligned)])
    assert all(r.ok for r in res)
    dst = slab[t.payload_bytes:t.payload_bytes + n]
    odd = memoryview(bytearray(n + 1))[1:]
    res = t.read_batch([DiskRead(s1, key(1), dst, n, res[0].checksum),
                        DiskRead(s2, key(2), odd, n, res[1].checksum)])
    assert all(r.ok for r in res)
    assert bytes(dst) == block(1, n) and bytes(odd) == block(2, n)
    for rec in (wr, rd):
        assert rec.calls
        for addrs, lens, off in rec.calls:
            assert off % 4096 == 0
            assert all(a is not None and a % 4096 == 0 for a in addrs), addrs
            assert all(x % 4096 == 0 for x in lens), lens
    # header + payload padded to 4096, one pwritev per record
    assert sum(sum(c[1]) == 4096 + 3_100_672 for c in wr.calls) == 2
    assert t.entries()[0].size == n                     # the true length is what's kept
    t.close()


def test_disk21_tmpfs_refusing_o_direct_falls_back_with_one_warning(monkeypatch):
    """DISK-21: on tmpfs (/dev/shm) that refuses O_DIRECT, buffered I/O with exactly one warning.
    Kernels >= 6.6 let tmpfs accept O_DIRECT; there a fake open refuses it like older tmpfs."""
    import shutil
    import tempfile
    base = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="tierstore-test-"))
    try:
        if disk.probe_direct(str(base)) is None:
            real_open = disk._sys_open

            def refusing_open(path, flags, mode=0o777):
                if flags & disk.O_DIRECT:
                    raise OSError(errno.EINVAL, "Invalid argument")
                return real_open(path, flags, mode)

            monkeypatch.setattr(disk, "_sys_open", refusing_open)
        n = 3_098_112
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = open_tier(base / "nv", num_slots=8, slot_bytes=n, file_slots=2)
            slots = {i: t.alloc() for i in range(5)}          # 3 slab files created
            data = {i: memoryview(bytearray(block(i, n))) for i in slots}
            assert all(r.ok for r in t.write_batch(
                [DiskWrite(s, key(i), NS, data[i]) for i, s in slots.items()]))
            for i, s in slots.items():
                assert get(t, i, s, n)[1] == block(i, n)
        assert not t.direct
        ours = [w for w in caught if "O_DIRECT" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        t.close()
        with pytest.raises(ConfigError):
            if disk.probe_direct(str(base)) is not None:
                NvmeTier(base / "nv2", 8, n, direct_io="on")
            else:
                raise ConfigError("real tmpfs accepts O_DIRECT here")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_disk21_direct_io_off_works_with_unaligned_size(tmp_path, monkeypatch):
    """DISK-21: direct_io="off" boots and works with the 512-aligned size; no O_DIRECT opens."""
    flags_seen = []
    real_open = disk._sys_open
    def recording_open(path, flags, mode=0o777):
        flags_seen.append(flags)
        return real_open(path, flags, mode)

    monkeypatch.setattr(disk, "_sys_open", recording_open)
    n = 3_098_112
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = open_tier(tmp_path, num_slots=4, slot_bytes=n, direct_io="off")
    slots = put(t, range(2), n)
    assert all(get(t, i, s, n)[1] == block(i, n) for i, s in slots.items())
    assert flags_seen and not any(f & disk.O_DIRECT for f in flags_seen)
    t.close()


def test_lmdb23_forked_readers_killed_mid_transaction(tmp_path):
    """LMDB-23: 4 forked children open their own env and read; 2 are SIGKILLed while holding a
    read transaction; 20 rounds with only 8 reader slots: no BAD_RSLOT / READERS_FULL, every
    lookup succeeds, and no child uses the parent's env handle."""
    t = open_tier(tmp_path, max_readers=8)
    slots = put(t, range(6))
    parent_env = t._env()
    expected = sorted(slots.values())

    def child(w, hold: bool) -> None:
        assert sorted(e.slot for e in t.entries()) == expected
        env = t._env()
        assert env is not parent_env and t._env_pid == os.getpid()
        txn = env.begin()
        assert txn.get(b"!format") is not None
        os.write(w, b"r")
        if hold:
            time.sleep(30)            # killed here, read txn open
        txn.abort()

    for _ in range(20):
        pids, pipes = [], []
        for c in range(4):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                code = 1
                try:
                    child(w, hold=c < 2)
                    code = 0
                except BaseException:  # noqa: BLE001 - reported through the exit code
                    import traceback
                    traceback.print_exc()
                finally:
                    os._exit(code)
            os.close(w)
            pids.append(pid)
            pipes.append(r)
        for r in pipes:
            assert os.read(r, 1) == b"r"
            os.close(r)
        for pid in pids[:2]:
            os.kill(pid, signal.SIGKILL)
        statuses = [os.waitpid(pid, 0)[1] for pid in pids]
        assert all(os.WIFSIGNALED(s) for s in statuses[:2])
        assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses[2:]), statuses
        assert sorted(e.slot for e in t.entries()) == expected   # the parent still reads
    assert t._env() is parent_env
    t.put_namespace(b"x" * 16, {"ok": True})
    t.close()


def _fp16_normalish(n_values: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return struct.pack(f"<{n_values}e", *(rng.gauss(0.0, 1.0) for _ in range(n_values)))


def test_zstd25_compression_flags_and_forced_failure(tmp_path, monkeypatch):
    """ZSTD-25: zstd on; blocks [2,16,8,128] fp16 — zeros, random, normal — read back
    byte-identical; the random one is stored raw with the flag clear (never expanded); a forced
    compression failure of block 2 fails only block 2 and increments compress_errors."""
    n = 2 * 16 * 8 * 128 * 2
    blocks = [bytes(n), os.urandom(n), _fp16_normalish(n // 2, 7)]
    t = open_tier(tmp_path, slot_bytes=n, compression="zstd")
    slots = [t.alloc() for _ in blocks]
    res = t.write_batch([DiskWrite(s, key(i), NS, memoryview(b))
                         for i, (s, b) in enumerate(zip(slots, blocks))])
    assert all(r.ok for r in res)
    assert t._flags[slots[0]] == record.FLAG_ZSTD and t._stored[slots[0]] < n // 100
    assert t._flags[slots[1]] == 0 and t._stored[slots[1]] == n            # raw, not expanded
    assert t._flags[slots[2]] == record.FLAG_ZSTD and t._stored[slots[2]] < n
    for i, (s, b) in enumerate(zip(slots, blocks)):
        r, data = get(t, i, s, n)
        assert r.ok and data == b
    assert {e.slot: e.size for e in t.entries()} == {s: n for s in slots}

    real = t._compress

    def failing_compress(src):
        if bytes(src) == blocks[1]:
            raise RuntimeError("injected compression failure")
        return real(src)

    monkeypatch.setattr(t, "_compress", failing_compress)
    again = [t.alloc() for _ in blocks]
    res = t.write_batch([DiskWrite(s, key(10 + i), NS, memoryview(b))
                         for i, (s, b) in enumerate(zip(again, blocks))])
    assert [r.ok for r in res] == [True, False, True] and res[1].error == "compress"
    assert t.counters["compress_errors"] == 1
    assert again[1] not in {e.slot for e in t.entries()}
    t.close()
    t = open_tier(tmp_path, slot_bytes=n, compression="zstd")
    assert {e.slot for e in t.entries()} == set(slots) | {again[0], again[2]}
    assert t.check() == []
    t.close()


def test_kill9_at_random_moments_recovers_consistently(tmp_path):
    """Crash safety: a writer/deleter killed with SIGKILL at random moments, 8 rounds on the same
    dir: after each, recover() + check() find a consistent store whose records all verify."""
    rng = random.Random(5)
    for rnd in range(8):
        def writer(rnd=rnd):
            w = open_tier(tmp_path, num_slots=32)
            i = 1000 * rnd
            while True:
                s = w.alloc()
                if s is None:
                    w.delete_batch([e.slot for e in w.entries()[:8]])
                    continue
                w.write_batch([DiskWrite(s, key(i), NS, memoryview(block(i)))])
                i += 1

        pid = os.fork()
        if pid == 0:
            try:
                writer()
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        t = open_tier(tmp_path, num_slots=32)
        entries = t.entries()
        assert headers_on_disk(t) == {e.slot for e in entries}
        assert t.check() == []
        for e in entries:
            r, data = get(t, int.from_bytes(e.key[:4], "little"), e.slot)
            assert r.ok and data == block(int.from_bytes(e.key[:4], "little"))
        t.close()


# ----------------------------------------------------------------------------- prepare()
class _SlotRecorder:
    """Records the slots (by file name and offset) every vectored write covers, then writes."""

    def __init__(self, tier: NvmeTier, real):
        self.tier, self.real, self.slots = tier, real, []

    def __call__(self, fd, bufs, offset):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        f = int(name.removeprefix("slab-").removesuffix(".dat"))
        n = sum(memoryview(b).nbytes for b in bufs)
        rb = self.tier.record_bytes
        first = f * self.tier.file_slots + offset // rb
        self.slots.extend(range(first, first + -(-n // rb)))
        return self.real(fd, bufs, offset)


def test_prepare_zeroes_only_free_never_written_slots(tmp_path, monkeypatch):
    """prepare() until it returns 0: every backed slot ends up written, files are grown to full,
    and no byte of a live record or of an allocated-but-unwritten slot was overwritten."""
    t = open_tier(tmp_path, num_slots=14, file_slots=4)      # 4 files, the last one of 2 slots
    live = put(t, range(3))                                   # slots 0-2
    reserved = t.alloc()                                      # slot 3: handed out, not written
    rec = _SlotRecorder(t, disk._sys_pwritev)
    monkeypatch.setattr(disk, "_sys_pwritev", rec)
    steps = 0
    while t.prepare(2 * t.record_bytes) and steps < 100:
        steps += 1
    assert steps < 100 and t.prepare() == 0
    u = t.usage()
    assert u["written_slots"] == 14 - 1                        # all but the reserved one
    assert u["file_bytes"] == 14 * t.record_bytes
    assert t.counters["prepared_bytes"] == 10 * t.record_bytes
    assert sorted(rec.slots) == list(range(4, 14))             # each free slot zeroed once
    monkeypatch.setattr(disk, "_sys_pwritev", rec.real)
    for i, s in live.items():
        r, data = get(t, i, s)
        assert r.ok and data == block(i)
    (r,) = t.write_batch([DiskWrite(reserved, key(9), NS, memoryview(block(9)))])
    assert r.ok and get(t, 9, reserved)[1] == block(9)
    assert t.check() == [] and headers_on_disk(t) == {*live.values(), reserved}
    t.close()


def test_prepare_state_survives_reopen_and_deleted_slots_are_not_rezeroed(tmp_path):
    """The "slot written" bits come back from the files at open (SEEK_DATA): after a full
    prepare() and a reopen there is nothing left to prepare; a slot whose record was deleted is
    written space and is not zeroed again."""
    t = open_tier(tmp_path, num_slots=8, file_slots=4)
    slots = put(t, range(2))
    while t.prepare():
        pass
    t.delete_batch([slots[0]])
    assert t.prepare() == 0
    t.close()
    t = open_tier(tmp_path, num_slots=8, file_slots=4)
    assert t.usage()["written_slots"] == 8
    assert t.prepare() == 0 and t.counters["prepared_bytes"] == 0
    assert get(t, 1, slots[1])[1] == block(1)
    t.close()


def test_prepare_uses_write_zeroes_when_offered_else_zero_pages(tmp_path, monkeypatch):
    """FALLOC_FL_WRITE_ZEROES first; where the kernel/device refuses it (EOPNOTSUPP) the tier
    writes zero pages and stops asking; a real error (EIO) fails the run, counted, bits clear."""
    calls = []

    def offering(fd, mode, offset, length):
        calls.append((mode, offset, length))

    monkeypatch.setattr(disk, "_sys_fallocate", offering)
    t = open_tier(tmp_path, num_slots=8, file_slots=4)
    t.alloc()                                          # grows file 0 (4 slots)
    t.slots.free(0)
    assert t.prepare(4 * t.record_bytes) == 4 * t.record_bytes
    assert calls == [(disk.FALLOC_FL_WRITE_ZEROES, 0, 4 * t.record_bytes)]
    t.close()

    refused = []

    def refusing(fd, mode, offset, length):
        refused.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(disk, "_sys_fallocate", refusing)
    t = open_tier(tmp_path / "b", num_slots=8, file_slots=4)
    assert t.prepare(4 * t.record_bytes) == 4 * t.record_bytes     # grows file 0
    assert t.prepare(2 * t.record_bytes) == 2 * t.record_bytes     # zero pages, slots 0-1
    assert t.prepare(2 * t.record_bytes) == 2 * t.record_bytes     # slots 2-3, no second ask
    assert refused == [disk.FALLOC_FL_WRITE_ZEROES]
    assert t.usage()["written_slots"] == 4
    t.close()

    def eio(fd, mode, offset, length):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(disk, "_sys_fallocate", eio)
    t = open_tier(tmp_path / "c", num_slots=8, file_slots=4)
    t.prepare()                                                    # grows file 0
    assert t.prepare() == 0 and t.counters["io_errors"] == 1
    assert t.usage()["written_slots"] == 0
    t.close()


def test_prepare_on_a_full_filesystem_clamps_like_alloc(small_tmpfs):
    """DISK-20 with prepare(): growing ahead on a 64 MiB filesystem stops at ENOSPC with the grow
    undone (no zero-length or partial file), the capacity clamped, earlier records intact, and
    every slot it did back is usable."""
    mb = 1 << 20
    t = open_tier(small_tmpfs / "nv", num_slots=1024, slot_bytes=mb, file_slots=8)
    slots = put(t, range(3), n=mb)
    steps = 0
    while t.prepare(16 * mb) and steps < 1000:
        steps += 1
    u = t.usage()
    assert u["clamped"] and 30 < u["effective_slots"] < 64
    for p in (small_tmpfs / "nv" / "slabs").iterdir():
        size = p.stat().st_size
        assert size > 0 and size % t.record_bytes == 0, (p, size)
    for i, s in slots.items():
        r, data = get(t, i, s, mb)
        assert r.ok and data == block(i, mb)
    more = []
    while (s := t.alloc()) is not None:
        more.append(s)
    assert len(more) + 3 == u["effective_slots"]
    res = t.write_batch([DiskWrite(s, key(100 + s), NS, memoryview(block(100 + s, mb)))
                         for s in more])
    assert all(r.ok for r in res)
    t.close()


def test_kill9_during_prepare_and_writes_recovers_consistently(tmp_path):
    """Crash safety with prepare(): a loop of prepare / write / delete killed with SIGKILL at
    random moments, 6 rounds on the same dir: recover() + check() find only verifiable records,
    headers on disk match LMDB one to one, and every record reads back."""
    rng = random.Random(11)
    for rnd in range(6):
        def worker(rnd=rnd):
            w = open_tier(tmp_path, num_slots=32)
            i = 1000 * rnd
            while True:
                w.prepare(3 * w.record_bytes)
                s = w.alloc()
                if s is None:
                    w.delete_batch([e.slot for e in w.entries()[:8]])
                    continue
                w.write_batch([DiskWrite(s, key(i), NS, memoryview(block(i)))])
                i += 1

        pid = os.fork()
        if pid == 0:
            try:
                worker()
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        t = open_tier(tmp_path, num_slots=32)
        entries = t.entries()
        assert headers_on_disk(t) == {e.slot for e in entries}
        assert t.check() == []
        for e in entries:
            i = int.from_bytes(e.key[:4], "little")
            r, data = get(t, i, e.slot)
            assert r.ok and data == block(i)
        t.close()


def test_batches_from_a_background_thread(tmp_path):
    """The store's write-behind flusher calls the tier from its own thread (one caller at a time):
    write_batch / prepare / read_batch there, then read_batch and delete_batch on this thread."""
    import threading

    t = open_tier(tmp_path, num_slots=8, file_slots=4)
    out = {}

    def flusher():
        slots = {i: t.alloc() for i in range(4)}
        out["w"] = t.write_batch([DiskWrite(s, key(i), NS, memoryview(block(i)))
                                  for i, s in slots.items()])
        out["p"] = t.prepare()
        out["slots"] = slots
        out["r"] = [get(t, i, s) for i, s in slots.items()]

    th = threading.Thread(target=flusher)
    th.start()
    th.join()
    assert all(r.ok for r in out["w"]) and out["p"] > 0
    assert all(r.ok and data == block(i) for i, (r, data) in enumerate(out["r"]))
    dsts = {i: disk.aligned_buffer(SLOT) for i in out["slots"]}
    res = t.read_batch([DiskRead(s, key(i), dsts[i], SLOT, 0) for i, s in out["slots"].items()])
    assert all(r.ok for r in res)
    assert all(bytes(dsts[i][:SLOT]) == block(i) for i in out["slots"])
    t.delete_batch(list(out["slots"].values()))
    assert t.entries() == [] and t.check() == []
    t.close()
