"""The NVMe tier: checksummed records in preallocated slab files, metadata in one LMDB env.

Layout of a data directory::

    <path>/slabs/slab-00000.dat   slots [0, file_slots)            } records of record_bytes each:
    <path>/slabs/slab-00001.dat   slots [file_slots, 2*file_slots) } 4096-byte header (record.py)
    ...                                                             } + payload padded to 4096
    <path>/meta/                  one LMDB environment

Slot ``s`` lives in file ``s // file_slots`` at offset ``(s % file_slots) * record_bytes`` with
``record_bytes = 4096 + round_up(slot_bytes, 4096)``. Slab files are created and grown by
``alloc()`` (or ahead of it by ``prepare()``) with ``posix_fallocate`` in whole-file steps (halving
the step near a full filesystem); on ENOSPC the grow is undone (file truncated back or removed, so
no zero-length or partial file is left), ``alloc()`` returns None and the effective capacity is
clamped to the slots already backed by disk (``usage()["effective_slots"]``, ``capacity_bytes``).
The clamp lasts until reopen.

Fresh and reused space: ``posix_fallocate`` reserves space as *unwritten* extents, and every first
O_DIRECT write into one pays ext4's conversion to written; an overwrite of written space does not.
Measured here (benchmarks/bench_disk_paths.py, docs/benchmarks.md "NVMe data path"): writes into
fresh fallocated files ran at ~0.7-0.9x the speed of overwrites, and sparse (``ftruncate``) files,
files grown by appends and one new file per record (LMCache) were no faster than fallocated ones.
So growth stays ``posix_fallocate`` (ENOSPC shows at grow time, never in the middle of a record)
and the conversion is moved off the write path instead: ``prepare()``, called by an idle flusher,
turns free never-written slots into written zeros (``FALLOC_FL_WRITE_ZEROES`` where the kernel and
device offer it, else zero pages), lowest slot first, the order ``alloc()`` hands them out. A
per-slot bit (``_written``) says which slots are known written: set by a whole-record write or by
``prepare()``, rebuilt at open from ``SEEK_DATA``/``SEEK_HOLE`` (unwritten extents read as holes).
The bit only steers ``prepare()``; a wrong bit costs speed, never data.

LMDB keys (values little-endian)::

    b"!format"        FORMAT_TAG; an env with another tag -> FormatError (one line)
    b"!geometry"      JSON {slot_bytes, file_slots, record_bytes}; a mismatch -> ConfigError
    b"s" + slot(u64 BE)  key(32) ns_digest(16) size(u64) stored(u64) checksum(u64) flags(u16)
    b"e" + slot(u64 BE)  optional: the block's engine metadata (tierstore/events.py, opaque
                         here), committed and deleted in the same txn as its ``s`` entry
    b"n" + ns_digest     JSON namespace descriptor

Publish order of ``write_batch``: records (one ``pwritev`` each, header + payload, from page-aligned
buffers) -> one ``fdatasync`` per touched file -> one LMDB write txn. A crash before the commit
leaves orphan records (valid header, no entry); ``recover()`` zeroes their magic. ``delete_batch``
commits the LMDB delete first, then zeroes the header magic (a lost zeroing is again an orphan).
So after ``kill -9`` at any moment, every surviving entry points at a record whose header verifies.
``recover()`` also removes unknown files from slabs/, drops the entries of a vanished or truncated
slab file (the next ``alloc()`` that needs it recreates it) and recomputes used bytes; ``check()``
adds the full payload checksum of every entry. Both live in tiers/nvme_recovery.py, a part the
tier holds (``_recovery``) and delegates to.

Failures (issue 13 items 10-11): no I/O or LMDB failure escapes ``write_batch``, ``delete_batch``
or ``put_namespace``. A failed record write, ``fdatasync`` or metadata commit fails that item
(``DiskResult.error``, a :class:`~tierstore.tiers.slot_tier.DiskError`: ``eio``, ``enospc``, ``einval``, ``meta``, ...) and zeroes the header of a
record it wrote, so nothing of it is visible now or after a restart. A metadata commit that cannot
be made for a delete or a namespace is *owed*: the in-memory state moves on (the slot is freed,
its header zeroed) and the LMDB part rides along with the next commit that succeeds
(``settle_metadata``; ``check`` and ``close`` settle too). A header zeroing that fails is retried.
Every outcome feeds :attr:`NvmeTier.health` (tiers/health.py: ``degraded`` while recent I/O fails
or something is owed); ``probe()`` takes one record and one metadata commit through the write
path, so ``check`` can tell whether the tier is failing now.

Data path (O_DIRECT when the filesystem allows it, see io/disk.py): a DRAM-slot source is
page-aligned, so a write sends ``[header page, payload's whole pages, one tail page]`` with only the
sub-page tail (< 4096 bytes) copied; a read mirrors it into the destination slot. Unaligned or
read-only buffers go through a per-thread bounce buffer allocated once. Optional zstd (level 1)
uses one compressor per thread; a block whose compressed form is not smaller is stored raw
(flag clear), never expanded.

Threading: the tier is single-threaded like every tier: one call at a time, from any one thread
(the store serialises every call with its ``_nvme_lock``; a write-behind flusher thread may make
the calls). Inside a batch, an :class:`~tierstore.io.disk.IoPool` owned by this tier runs the
per-item checksum, header encode and I/O concurrently (``io_threads`` in flight, 8 by default:
cold reads gained up to QD8 here, writes were flat from QD4); per-thread buffers and zstd contexts
live in a ``threading.local``. Counters and metadata are updated only on the calling thread. After
``fork`` a child opens its own LMDB env (``reader_check()`` at every open reclaims slots of dead
readers) and its own pool; the parent's env handle is never used for a transaction in the child
(see ``_drop_inherited_env``).
"""

from __future__ import annotations

import errno
import heapq
import json
import logging
import os
import threading
from array import array
from pathlib import Path

import lmdb
import xxhash

from tierstore import counter_names as cn
from tierstore.errors import ConfigError, FormatError
from tierstore.io import disk
from tierstore.io.disk import ALIGN, IoPool, aligned_buffer, round_up
from tierstore.tiers.slot_tier import (
    DiskEntry,
    DiskError,
    DiskRead,
    DiskResult,
    DiskTier,
    DiskWrite,
    SlotAllocator,
)
from tierstore.tiers.health import TierHealth, error_name
from tierstore.tiers.nvme_recovery import NvmeRecovery
from tierstore.tiers.nvme_upkeep import SLOT_KEY, VALUE, NvmeUpkeep, meta_key, slot_key
from tierstore.tiers.record import (
    FLAG_ZSTD,
    HEADER_BYTES,
    KEY_BYTES,
    NS_BYTES,
    encode_header,
    verify_header,
)
from tierstore.types import Tier

log = logging.getLogger(__name__)

FORMAT_TAG = b"tierstore-nvme-meta/1"
_VALUE = VALUE
_SLOT_KEY = SLOT_KEY
_ZEROS = bytes(ALIGN)
PREPARE_RUN = 4   # records per zero-fill I/O in prepare() (~8 MiB for 2 MiB slots)
_xxh = xxhash.xxh3_64_intdigest
_ABANDONED_ENVS: list = []   # inherited env handles a fork child could not close: kept, never used


_slot_key = slot_key


class _ClampAllocator(SlotAllocator):
    """SlotAllocator that can retire free slots (disk full) and take many slots in O(n)."""

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots)
        self.disabled: set[int] = set()

    def take_many(self, slots: list[int]) -> None:
        for s in slots:
            if self._used[s]:
                raise ValueError(f"slot {s} already used")
            self._used[s] = 1
        self._free = [s for s in self._free if not self._used[s]]
        heapq.heapify(self._free)

    def disable(self, pred) -> int:
        keep = []
        for s in self._free:
            if pred(s):
                self._used[s] = 1
                self.disabled.add(s)
            else:
                keep.append(s)
        heapq.heapify(keep)
        self._free = keep
        return len(self.disabled)

    @property
    def used(self) -> int:
        return super().used - len(self.disabled)


class _ThreadState:
    """Per-thread aligned buffers and zstd contexts (allocated once per I/O thread)."""

    def __init__(self, payload_bytes: int) -> None:
        self.hdr = aligned_buffer(HEADER_BYTES)
        self.tail = aligned_buffer(ALIGN)
        self._payload_bytes = payload_bytes
        self._bounce: memoryview | None = None
        self.cctx = None
        self.dctx = None

    @property
    def bounce(self) -> memoryview:
        if self._bounce is None:
            self._bounce = aligned_buffer(self._payload_bytes)
        return self._bounce


class NvmeTier(NvmeUpkeep, DiskTier):
    """Records of at most ``slot_bytes`` payload bytes in ``num_slots`` slots under ``path``."""

    def __init__(self, path: str | os.PathLike, num_slots: int, slot_bytes: int, *,
                 direct_io: str = "auto", compression: str = "none", file_slots: int = 64,
                 fsync: bool = True, io_threads: int = 8, zstd_level: int = 1,
                 map_size: int = 64 << 20, max_readers: int = 126) -> None:
        if num_slots <= 0 or slot_bytes <= 0 or file_slots <= 0:
            raise ConfigError("nvme tier: num_slots, slot_bytes and file_slots must be positive")
        if compression not in ("none", "zstd"):
            raise ConfigError("nvme tier: compression must be 'none' or 'zstd', "
                              f"got {compression!r}")
        super().__init__(Tier.NVME, num_slots, slot_bytes)
        self.slots = _ClampAllocator(num_slots)
        self.path = Path(path)
        self.slab_dir = self.path / "slabs"
        self.meta_dir = self.path / "meta"
        self.slab_dir.mkdir(parents=True, exist_ok=True)
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        self.file_slots = file_slots
        self.payload_bytes = round_up(slot_bytes)
        self.record_bytes = HEADER_BYTES + self.payload_bytes
        self.num_files = (num_slots + file_slots - 1) // file_slots
        self.compression = compression
        self.zstd_level = zstd_level
        self.fsync = fsync
        self.direct = disk.resolve_direct_io(direct_io, str(self.slab_dir))
        self.counters = dict.fromkeys(cn.TIER_COUNTERS, 0)   # the names: counter_names.py
        self.last_recovery: dict = {}
        self.dropped_slots: list[int] = []   # slots freed by the last check(fix=True)
        self.health = TierHealth("nvme")
        # metadata the tier owes LMDB (a commit failed: full or failing metadata filesystem)
        self._meta_backlog: set[int] = set()          # slots whose stale entry is to be deleted
        self._ns_backlog: dict[bytes, bytes] = {}     # namespace descriptors to be written
        self._unzeroed: set[int] = set()              # freed slots whose header zeroing failed
        self._probe_owed = False                      # probe() entries still to be deleted
        self._fds = [-1] * self.num_files
        self._ready = [0] * self.num_files   # slots of each file backed by allocated bytes
        self._stored = array("q", [-1]) * num_slots   # stored payload bytes; -1 = no entry
        self._flags = bytearray(num_slots)
        self._sizes = array("q", [0]) * num_slots     # payload bytes (uncompressed)
        self._zero = aligned_buffer(HEADER_BYTES)     # never written: shared by all I/O threads
        self._zero_run: memoryview | None = None      # PREPARE_RUN zero records, made on first use
        self._written = bytearray(num_slots)          # 1: the slot's whole record area is written
        self._write_zeroes = True                     # FALLOC_FL_WRITE_ZEROES worth trying
        self._used_bytes = 0
        self._payload_used = 0
        self._clamped = False
        self._recovered = False
        self._closed = False
        self._tls = threading.local()
        self._pool = IoPool(io_threads)
        self._map_size = map_size
        self._max_readers = max_readers
        self._env_obj: lmdb.Environment | None = None
        self._env_pid = -1
        self._recovery = NvmeRecovery(self)   # recover() and check(): tiers/nvme_recovery.py
        self._env()   # validates the format now: a foreign env fails at open, not at first write

    # ------------------------------------------------------------------ geometry, files
    def _slots_in_file(self, f: int) -> int:
        return min(self.file_slots, self.num_slots - f * self.file_slots)

    def _file_path(self, f: int) -> Path:
        return self.slab_dir / f"slab-{f:05d}.dat"

    def _locate(self, slot: int) -> tuple[int, int]:
        f, i = divmod(slot, self.file_slots)
        return f, i * self.record_bytes

    def _is_ready(self, slot: int) -> bool:
        f, i = divmod(slot, self.file_slots)
        return i < self._ready[f]

    def _fsync_dir(self) -> None:
        fd = os.open(self.slab_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _grow(self, f: int, need: int) -> bool:
        """Back at least ``need`` slots of file ``f`` with disk; False on ENOSPC (undone)."""
        ready, full = self._ready[f], self._slots_in_file(f)
        created = False
        if self._fds[f] < 0:
            self._fds[f] = disk.open_file(str(self._file_path(f)), direct=self.direct, create=True)
            created = True
        fd = self._fds[f]
        add = full - ready
        while ready + add >= need:
            try:
                disk.fallocate(fd, ready * self.record_bytes, add * self.record_bytes)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    self._undo_grow(f, ready, created)   # EIO and the like: nothing half-grown
                    raise
                self.counters[cn.T_ENOSPC] += 1
                os.ftruncate(fd, ready * self.record_bytes)   # drop any partial allocation
                if ready + add == need:
                    break
                add = max(need - ready, add // 2)
                continue
            self._ready[f] = ready + add
            base = f * self.file_slots
            self._written[base + ready:base + ready + add] = bytes(add)   # fresh: unwritten
            if created:
                self._fsync_dir()
            return True
        if created:
            os.close(fd)
            self._fds[f] = -1
            os.unlink(self._file_path(f))
        return False

    def _undo_grow(self, f: int, ready: int, created: bool) -> None:
        """A grow of file ``f`` failed with an I/O error: back to ``ready`` slots (a file this
        grow created is removed), best effort."""
        fd = self._fds[f]
        try:
            if created:
                os.close(fd)
                self._fds[f] = -1
                os.unlink(self._file_path(f))
            else:
                os.ftruncate(fd, ready * self.record_bytes)
        except OSError as e:
            log.warning("nvme tier: undoing a failed grow of %s: %s", self._file_path(f), e)

    def _clamp(self) -> None:
        self._clamped = True
        n = self.slots.disable(lambda s: not self._is_ready(s))
        log.warning("nvme tier %s: filesystem full; capacity clamped to %d of %d slots",
                    self.path, self.num_slots - n, self.num_slots)

    # ------------------------------------------------------------------ LMDB
    def _env(self) -> lmdb.Environment:
        pid = os.getpid()
        if self._env_obj is not None and self._env_pid == pid:
            return self._env_obj
        if self._env_obj is not None:
            self._drop_inherited_env()
        env = lmdb.open(str(self.meta_dir), map_size=self._map_size, subdir=True,
                        max_readers=self._max_readers, sync=self.fsync, metasync=self.fsync,
                        readahead=False, lock=True)
        env.reader_check()   # reclaim reader slots of dead processes
        self._env_obj, self._env_pid = env, pid
        try:
            self._check_format(env)
        except BaseException:
            self._env_obj = None
            env.close()
            raise
        return env

    def _drop_inherited_env(self) -> None:
        """Forked child: never begin a txn on the parent's handle (its cached reader slot belongs
        to the parent: BAD_RSLOT, LMDB-23). py-lmdb refuses a second open of an env it holds, so
        the inherited handle is closed; LMDB's close clears only the *calling* process's reader
        slots and mappings, and fcntl locks are per process, so the parent is untouched."""
        inherited, self._env_obj = self._env_obj, None
        try:
            inherited.close()
        except lmdb.Error as e:   # pragma: no cover - keep it alive rather than risk it
            log.warning("nvme tier: could not drop inherited LMDB handle: %s", e)
            _ABANDONED_ENVS.append(inherited)

    def _check_format(self, env: lmdb.Environment) -> None:
        geometry = json.dumps({"slot_bytes": self.payload_bytes, "file_slots": self.file_slots,
                               "record_bytes": self.record_bytes}, sort_keys=True).encode()
        with self._read_txn() as txn:
            tag, geo = txn.get(b"!format"), txn.get(b"!geometry")
        if tag is None:
            if env.stat()["entries"]:
                raise FormatError(f"{self.meta_dir}: not a tierstore NVMe metadata env "
                                  "(no format record)")
            self._write_txn(lambda t: (t.put(b"!format", FORMAT_TAG),
                                       t.put(b"!geometry", geometry)))
            return
        if tag != FORMAT_TAG:
            raise FormatError(f"{self.meta_dir}: metadata format {tag.decode(errors='replace')!r}, "
                              f"this tierstore reads {FORMAT_TAG.decode()!r}")
        if geo != geometry:
            raise ConfigError(f"{self.path}: written with geometry {geo.decode()}, opened with "
                              f"{geometry.decode()}; reopen with the same slot_bytes/file_slots")

    def _read_txn(self):
        env = self._env_obj if self._env_pid == os.getpid() else self._env()
        for attempt in range(3):
            try:
                return env.begin(write=False)
            except lmdb.ReadersFullError:
                if attempt == 2:
                    raise
                env.reader_check()
        raise AssertionError("unreachable")

    def _write_txn(self, fn) -> None:
        """Run ``fn(txn)`` in one write txn; grows the map on MapFullError and retries."""
        for _ in range(12):
            env = self._env()
            try:
                with env.begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                self._map_size *= 2
                env.set_mapsize(self._map_size)
            except lmdb.ReadersFullError:
                env.reader_check()
        raise lmdb.MapFullError("LMDB map could not be grown enough")

    def _read_entries(self) -> list[tuple[int, tuple]]:
        out = []
        with self._read_txn() as txn:
            cur = txn.cursor()
            if cur.set_range(b"s"):
                for k, v in cur:
                    if k[:1] != b"s":
                        break
                    out.append((_SLOT_KEY.unpack(k)[1], _VALUE.unpack(v)))
        return out

    def _read_metas(self) -> dict[int, bytes]:
        """slot -> engine metadata, for the slots that have one."""
        out = {}
        with self._read_txn() as txn:
            cur = txn.cursor()
            if cur.set_range(b"e"):
                for k, v in cur:
                    if k[:1] != b"e":
                        break
                    out[_SLOT_KEY.unpack(k)[1]] = bytes(v)
        return out

    def recover(self) -> list[DiskEntry]:
        """Start-up recovery (see DiskTier and tiers/nvme_recovery.py); runs fully once, later
        calls list current entries."""
        return self._recovery.recover()

    def check(self, fix: bool = False) -> list[str]:
        """Verify every entry (header and payload checksum) and look for orphan records; with
        ``fix`` repair (tiers/nvme_recovery.py)."""
        return self._recovery.check(fix)

    def entries(self) -> list[DiskEntry]:
        """Every entry LMDB holds now (one read txn for the entries, one for their metadata)."""
        metas = self._read_metas()
        return [DiskEntry(key, slot, size, cs, ns, metas.get(slot))
                for slot, (key, ns, size, _st, cs, _fl) in self._read_entries()]

    def namespaces(self) -> dict[bytes, dict]:
        out = {}
        with self._read_txn() as txn:
            cur = txn.cursor()
            if cur.set_range(b"n"):
                for k, v in cur:
                    if k[:1] != b"n":
                        break
                    out[bytes(k[1:])] = json.loads(v)
        out.update({d: json.loads(v) for d, v in self._ns_backlog.items()})
        return out

    # ------------------------------------------------------------------ accounting
    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError("nvme tier is closed")
        if not self._recovered:
            self.recover()

    @property
    def effective_slots(self) -> int:
        return self.num_slots - len(self.slots.disabled)

    @property
    def capacity_bytes(self) -> int:
        return self.effective_slots * self.slot_bytes

    def alloc(self) -> int | None:
        """A free slot backed by disk, or None: the tier is full, the filesystem is full (the
        capacity is clamped), or growing a slab file failed with an I/O error (counted:
        ``io_errors``, health ``grow``; the next alloc tries again)."""
        self._ensure_open()
        while True:
            s = self.slots.alloc()
            if s is None:
                return None
            f, i = divmod(s, self.file_slots)
            if i < self._ready[f]:
                return s
            try:
                grown = self._grow(f, i + 1)
            except OSError as e:
                log.warning("nvme tier: growing %s failed: %s", self._file_path(f), e)
                self.counters[cn.T_IO_ERRORS] += 1
                self.health.fail("grow", error_name(e), e.strerror or str(e))
                self.slots.free(s)
                return None
            if grown:
                return s
            self.slots.free(s)
            self._clamp()

    def free(self, slot: int) -> None:
        if self._stored[slot] >= 0:
            self.delete_batch([slot])
        else:
            self.slots.free(slot)

    def usage(self) -> dict:
        u = super().usage()
        # used_bytes is payload bytes, the unit of capacity_bytes; disk_used_bytes counts whole
        # records (4 KiB header + payload padded to 4 KiB)
        u.update(effective_slots=self.effective_slots, clamped=self._clamped,
                 used_bytes=self._payload_used, disk_used_bytes=self._used_bytes,
                 file_bytes=sum(self._ready) * self.record_bytes, direct_io=self.direct,
                 compression=self.compression, written_slots=self._written.count(1),
                 counters=dict(self.counters), health=self.health.snapshot()["status"])
        return u

    # ------------------------------------------------------------------ idle-time preparation
    def prepare(self, max_bytes: int = 64 << 20) -> int:
        """Idle-time work that takes slab growth and the first-write cost off ``write_batch``.

        Writes zeros over up to ``max_bytes`` of free slots that were never written (lowest slot
        first: the order ``alloc()`` hands out fresh slots), so that a later ``write_batch`` there
        overwrites written space instead of converting unwritten extents (measured: 1.3-1.4x
        faster tier writes into fresh files, see the module docstring). When every slot backed by a
        file is written or in use, it grows the next slab file instead (``posix_fallocate``, with
        ``alloc()``'s ENOSPC handling: undo, clamp), so ``alloc()`` rarely grows on the write
        path. Returns the bytes of slab space it made ready (zeroed or grown); 0 means there is
        nothing left to do (every slot prepared, or the filesystem is full). A failed zero write
        is logged and counted (``io_errors``); its slots stay unprepared (only slower to write).

        Safe between any other calls: it touches only slots that are free (never one ``alloc()``
        handed out, never a record LMDB knows) and writes no header, so a crash in the middle
        leaves zeros, which recovery reads as "no record". For the store's write-behind flusher:
        call it with the lock that serialises ``write_batch`` when the write queue is empty, one
        bounded call at a time (64 MiB takes ~40 ms on the disk measured here), and stop when it
        returns 0. Preparing the whole tier writes its capacity once.
        """
        self._ensure_open()
        if max_bytes <= 0:
            return 0
        limit = max(1, max_bytes // self.record_bytes)
        todo = self._unprepared(limit)
        if not todo:
            return self._grow_ahead()
        runs: list[list[int]] = []
        for slot in todo:   # adjacent slots of one file -> one I/O of up to PREPARE_RUN records
            last = runs[-1] if runs else None
            if last and len(last) < PREPARE_RUN and last[-1] + 1 == slot \
                    and slot // self.file_slots == last[0] // self.file_slots:
                last.append(slot)
            else:
                runs.append([slot])
        if self._zero_run is None:      # the zero pages, made once (on this thread)
            self._zero_run = aligned_buffer(PREPARE_RUN * self.record_bytes)
        done = 0
        for run, err in zip(runs, self._pool.map(self._zero_slots, runs)):
            if err is not None:
                log.warning("nvme tier: preparing slots %d-%d failed: %s", run[0], run[-1], err)
                self.counters[cn.T_IO_ERRORS] += 1
                continue
            for slot in run:
                self._written[slot] = 1
            done += len(run) * self.record_bytes
        self.counters[cn.T_PREPARED_BYTES] += done
        return done

    def _unprepared(self, limit: int) -> list[int]:
        """Up to ``limit`` free, file-backed, never-written slots, lowest first."""
        out: list[int] = []
        s = self._written.find(0)
        while s >= 0 and len(out) < limit:
            f, i = divmod(s, self.file_slots)
            if i >= self._ready[f]:                  # past this file's backed slots
                s = self._written.find(0, (f + 1) * self.file_slots)
                continue
            if not self.slots.is_used(s):
                out.append(s)
            s = self._written.find(0, s + 1)
        return out

    def _grow_ahead(self) -> int:
        """Grow the first slab file that is not full; returns the bytes added (0: none)."""
        if self._clamped:
            return 0
        for f in range(self.num_files):
            ready = self._ready[f]
            if ready < self._slots_in_file(f):
                if self._grow(f, ready + 1):
                    return (self._ready[f] - ready) * self.record_bytes
                self._clamp()
                return 0
        return 0

    def _zero_slots(self, run: list[int]) -> OSError | None:
        """Make the records of adjacent slots ``run`` written zeros (on a pool thread)."""
        f, off = self._locate(run[0])
        length = len(run) * self.record_bytes
        fd = self._fds[f]
        try:
            if self._write_zeroes and disk.write_zeroes(fd, off, length):
                return None
            self._write_zeroes = False     # not offered here: zero pages from now on
            disk.write_vec(fd, [self._zero_run[:length]], off, direct=self.direct)
        except OSError as e:
            return e
        return None

    def _account(self, slot: int, stored: int, size: int, sign: int) -> None:
        self._used_bytes += sign * (HEADER_BYTES + round_up(stored))
        self._payload_used += sign * size

    def _thread_state(self) -> _ThreadState:
        st = getattr(self._tls, "st", None)
        if st is None:
            st = self._tls.st = _ThreadState(self.payload_bytes)
        return st

    # ------------------------------------------------------------------ compression hooks
    def _compress(self, src: memoryview) -> bytes:
        st = self._thread_state()
        if st.cctx is None:
            import zstandard
            st.cctx = zstandard.ZstdCompressor(level=self.zstd_level)
        return st.cctx.compress(src)

    def _decompress(self, data: memoryview, size: int) -> bytes:
        st = self._thread_state()
        if st.dctx is None:
            import zstandard
            st.dctx = zstandard.ZstdDecompressor()
        return st.dctx.decompress(data, max_output_size=size)

    # ------------------------------------------------------------------ write
    def _payload_bufs(self, st: _ThreadState, src: memoryview, n: int) -> list:
        """Buffers that put ``src[:n]`` on disk as whole pages (direct) or as is (buffered)."""
        if not self.direct:
            return [src[:n]]
        addr = disk.address_of(src)
        if addr is not None and addr % ALIGN == 0:
            a = n - n % ALIGN
            bufs = [src[:a]] if a else []
            if n > a:
                r = n - a
                st.tail[:r] = src[a:n]
                st.tail[r:] = _ZEROS[:ALIGN - r]
                bufs.append(st.tail)
            return bufs
        b = st.bounce
        b[:n] = src[:n]
        p = round_up(n)
        b[n:p] = _ZEROS[:p - n]
        return [b[:p]]

    def _write_one(self, w: DiskWrite) -> tuple[DiskResult, int, int]:
        st = self._thread_state()
        src = memoryview(w.src).cast("B")
        size = src.nbytes
        checksum = w.checksum or _xxh(src)
        flags, stored = 0, size
        if self.compression == "zstd" and size:
            try:
                packed = self._compress(src)
            except Exception as e:  # noqa: BLE001 - any codec failure fails this item only
                log.warning("nvme tier: compression of slot %d failed: %s", w.slot, e)
                return DiskResult(False, checksum, DiskError.COMPRESS), 0, 0
            if len(packed) < size:
                flags, stored = FLAG_ZSTD, len(packed)
                b = st.bounce
                b[:stored] = packed
                p = round_up(stored) if self.direct else stored
                b[stored:p] = _ZEROS[:p - stored]
                bufs = [b[:p]]
            else:
                bufs = None
        else:
            bufs = None
        if bufs is None:
            bufs = self._payload_bufs(st, src, size)
        encode_header(st.hdr, key=w.key, ns_digest=w.ns_digest, size=size, stored=stored,
                      flags=flags, checksum=checksum, slot=w.slot)
        f, off = self._locate(w.slot)
        try:
            disk.write_vec(self._fds[f], [st.hdr, *bufs], off, direct=self.direct)
        except OSError as e:
            log.warning("nvme tier: write of slot %d failed: %s", w.slot, e)
            return DiskResult(False, checksum, error_name(e)), 0, 0
        return DiskResult(True, checksum), stored, flags

    def write_batch(self, items: list[DiskWrite]) -> list[DiskResult]:
        """Write, ``fdatasync``, then commit the metadata of every item in one LMDB txn.

        Per-item result; ``error`` names what failed: ``eio``, ``enospc``, ``einval``,
        ``oserror`` (the record write or its fsync), ``compress``, ``meta`` (the LMDB commit: a
        full or failing metadata filesystem; retrying with NVMe victims evicted would not help),
        ``badslot``, ``too_large``, ``badkey`` (the caller's mistake). A record that was written
        but whose fsync or commit failed gets its header zeroed, so nothing of a failed item is
        visible, now or after a restart (no orphan for ``check`` to find either). Every I/O
        outcome feeds :attr:`health`. Never raises for an I/O or LMDB failure."""
        self._ensure_open()
        results: list[DiskResult | None] = [None] * len(items)
        todo = []
        for i, w in enumerate(items):
            if not (0 <= w.slot < self.num_slots and self.slots.is_used(w.slot)
                    and self._is_ready(w.slot)):
                results[i] = DiskResult(False, w.checksum, DiskError.BADSLOT)
            elif memoryview(w.src).nbytes > self.slot_bytes:
                results[i] = DiskResult(False, w.checksum, DiskError.TOO_LARGE)
            elif len(w.key) != KEY_BYTES or len(w.ns_digest) != NS_BYTES:
                results[i] = DiskResult(False, w.checksum, DiskError.BADKEY)
            else:
                todo.append(i)
        done = self._pool.map(lambda i: self._write_one(items[i]), todo)
        meta = {}
        torn: list[int] = []
        for i, (res, stored, flags) in zip(todo, done):
            results[i] = res
            if res.ok:
                meta[i] = (stored, flags)
                self._unzeroed.discard(items[i].slot)   # overwritten: no old header left
                if round_up(stored) == self.payload_bytes:   # the whole record area is written
                    self._written[items[i].slot] = 1
                continue
            self.health.fail("write", res.error)
            if res.error is DiskError.COMPRESS:
                self.counters[cn.T_COMPRESS_ERRORS] += 1
                continue
            if res.error is DiskError.ENOSPC:
                self.counters[cn.T_ENOSPC] += 1
            else:
                self.counters[cn.T_IO_ERRORS] += 1
            torn.append(items[i].slot)
        self._zero_headers(torn)   # a failed pwritev may have written part of a header
        if self.fsync and meta:
            files = sorted({items[i].slot // self.file_slots for i in meta})
            bad: dict[int, str] = {}
            for f in files:
                try:
                    os.fdatasync(self._fds[f])
                except OSError as e:
                    log.warning("nvme tier: fdatasync of %s failed: %s", self._file_path(f), e)
                    self.counters[cn.T_IO_ERRORS] += 1
                    bad[f] = error_name(e)
                    self.health.fail("fsync", bad[f], e.strerror or str(e))
            lost = [i for i in meta if items[i].slot // self.file_slots in bad]
            for i in lost:
                results[i] = DiskResult(False, results[i].checksum,
                                        bad[items[i].slot // self.file_slots])
                del meta[i]
            self._zero_headers([items[i].slot for i in lost])
        if meta:
            backlog, ns_backlog = self._meta_backlog - {items[i].slot for i in meta}, \
                dict(self._ns_backlog)

            def publish(txn):
                self._owed(txn, backlog, ns_backlog)
                for i, (stored, flags) in meta.items():
                    w = items[i]
                    txn.put(_slot_key(w.slot), _VALUE.pack(bytes(w.key), bytes(w.ns_digest),
                                                           memoryview(w.src).nbytes, stored,
                                                           results[i].checksum, flags))
                    if w.meta is not None:
                        txn.put(meta_key(w.slot), bytes(w.meta))
                    else:   # a reused slot never inherits another block's metadata
                        txn.delete(meta_key(w.slot))
            try:
                self._write_txn(publish)
            except lmdb.Error as e:
                log.warning("nvme tier: metadata commit failed: %s", e)
                self.counters[cn.T_META_ERRORS] += 1
                self.health.fail("meta", DiskError.META, str(e), n=len(meta))
                for i in meta:
                    results[i] = DiskResult(False, results[i].checksum, DiskError.META)
                self._zero_headers([items[i].slot for i in meta])
                return results  # type: ignore[return-value]
            self._paid(backlog | {items[i].slot for i in meta}, ns_backlog)
            self.health.ok(len(meta))
            for i, (stored, flags) in meta.items():
                s = items[i].slot
                if self._stored[s] >= 0:
                    self._account(s, self._stored[s], self._sizes[s], -1)
                size = memoryview(items[i].src).nbytes
                self._stored[s], self._flags[s], self._sizes[s] = stored, flags, size
                self._account(s, stored, size, +1)
                if flags == 0 and self.compression == "zstd" and stored:
                    self.counters[cn.T_STORED_RAW_INCOMPRESSIBLE] += 1
            self.counters[cn.T_WRITES] += len(meta)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ read
    def _read_record(self, st: _ThreadState, slot: int, dst: memoryview | None,
                     key: bytes | None, size: int | None, stored: int, flags: int):
        """Read and verify one record; returns (header, payload view) or raises.

        FormatError: header or length problem; ValueError: payload checksum mismatch;
        OSError: I/O error. ``dst`` None reads into the bounce buffer.
        """
        f, off = self._locate(slot)
        if self._fds[f] < 0:
            raise FormatError(f"slab file {self._file_path(f).name} missing")
        raw = not flags & FLAG_ZSTD
        if size is not None and raw and stored != size:
            raise FormatError(f"slot {slot}: size {size} asked, {stored} stored")
        post, a = "", 0
        if raw and dst is not None and not self.direct:
            bufs = [dst[:stored]] if stored else []
        elif raw and dst is not None and disk.address_of(dst) is not None \
                and disk.address_of(dst) % ALIGN == 0:
            a = stored - stored % ALIGN          # whole pages straight into dst, tail via a page
            bufs = [dst[:a]] if a else []
            if stored > a:
                bufs.append(st.tail)
                post = "tail"
        else:
            p = round_up(stored) if self.direct else stored
            bufs = [st.bounce[:p]] if p else []
            post = "bounce"
        want = HEADER_BYTES + sum(b.nbytes for b in bufs)
        got = disk.read_vec(self._fds[f], [st.hdr, *bufs], off, direct=self.direct)
        if got < want:
            raise FormatError(f"slot {slot}: record truncated ({got} of {want} bytes)")
        h = verify_header(st.hdr, key=key, slot=slot)
        if h.stored != stored or h.flags != flags or (size is not None and h.size != size):
            raise FormatError(f"slot {slot}: header lengths/flags disagree with metadata")
        if raw:
            if dst is None:
                payload = st.bounce[:stored]
            else:
                if post == "tail":
                    dst[a:stored] = st.tail[:stored - a]
                elif post == "bounce":
                    dst[:stored] = st.bounce[:stored]
                payload = dst[:stored]
        else:
            try:
                out = self._decompress(st.bounce[:stored], h.size)
            except Exception as e:  # noqa: BLE001 - a bad frame is corruption
                raise ValueError(f"slot {slot}: zstd frame does not decode ({e})") from None
            if len(out) != h.size:
                raise ValueError(f"slot {slot}: decompressed {len(out)} of {h.size} bytes")
            if dst is not None:
                dst[:h.size] = out
                payload = dst[:h.size]
            else:
                payload = memoryview(out)
        if _xxh(payload) != h.checksum:
            raise ValueError(f"slot {slot}: payload checksum mismatch")
        return h, payload

    def _read_one(self, r: DiskRead) -> tuple[DiskResult, str]:
        st = self._thread_state()
        try:
            dst = memoryview(r.dst).cast("B")
            if dst.nbytes < r.size:
                return DiskResult(False, 0, DiskError.BADBUF), ""
            h, _ = self._read_record(st, r.slot, dst, bytes(r.key), r.size,
                                     self._stored[r.slot], self._flags[r.slot])
        except OSError as e:
            log.warning("nvme tier: read of slot %d failed: %s", r.slot, e)
            return DiskResult(False, 0, error_name(e)), cn.T_IO_ERRORS
        except FormatError as e:
            log.warning("nvme tier: %s", e)
            return DiskResult(False, 0, DiskError.CORRUPT), cn.T_HEADER_FAILURES
        except ValueError as e:
            log.warning("nvme tier: %s", e)
            return DiskResult(False, 0, DiskError.CORRUPT), cn.T_CHECKSUM_FAILURES
        if r.checksum and h.checksum != r.checksum:
            return DiskResult(False, h.checksum, DiskError.CORRUPT), cn.T_CHECKSUM_FAILURES
        return DiskResult(True, h.checksum), ""

    def read_batch(self, items: list[DiskRead]) -> list[DiskResult]:
        self._ensure_open()
        results: list[DiskResult | None] = [None] * len(items)
        todo = []
        for i, r in enumerate(items):
            if not 0 <= r.slot < self.num_slots or self._stored[r.slot] < 0:
                results[i] = DiskResult(False, 0, DiskError.MISSING)
            else:
                todo.append(i)
        done = self._pool.map(lambda i: self._read_one(items[i]), todo)
        for i, (res, counter) in zip(todo, done):
            results[i] = res
            if counter:
                self.counters[counter] += 1
            if counter == cn.T_IO_ERRORS:
                self.health.fail("read", res.error or DiskError.EIO)
            elif res.ok:
                self.health.ok()
        self.counters[cn.T_READS] += sum(1 for r in results if r.ok)  # type: ignore[union-attr]
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ delete
    def delete_batch(self, slots: list[int]) -> None:
        """Delete the records of ``slots`` (LMDB first, then the header magic) and free the
        slots. A failed LMDB commit or header write is owed and retried (see
        :meth:`_delete_entries`, :meth:`_zero_headers`): the slots are freed all the same, so
        nothing leaks and no caller sees an exception for it."""
        self._ensure_open()
        slots = [s for s in dict.fromkeys(slots) if 0 <= s < self.num_slots]
        live = [s for s in slots if self._stored[s] >= 0]
        try:
            if self._unzeroed:
                self._retry_zeroing()
            if live:
                self._delete_entries(live)
                self._zero_headers(live)
                self.counters[cn.T_DELETES] += len(live)
        finally:
            for s in live:
                self._account(s, self._stored[s], self._sizes[s], -1)
                self._stored[s] = -1
                self._flags[s] = 0
            for s in slots:
                if self.slots.is_used(s) and s not in self.slots.disabled:
                    self.slots.free(s)

    def close(self) -> None:
        if self._closed:
            return
        if self._recovered and self._env_obj is not None and self._env_pid == os.getpid():
            try:   # best effort: what failed commits left owed, and headers left to zero
                self._settle()
                self._retry_zeroing()
            except Exception as e:  # noqa: BLE001 - closing must not fail for this
                log.warning("nvme tier: settling owed metadata at close failed: %s", e)
        self._closed = True
        self._pool.close()
        for f, fd in enumerate(self._fds):
            if fd >= 0:
                os.close(fd)
                self._fds[f] = -1
        if self._env_obj is not None:
            if self._env_pid == os.getpid():
                self._env_obj.close()
                self._env_obj = None
            else:
                self._drop_inherited_env()

