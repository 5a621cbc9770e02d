"""Start-up recovery and ``check()`` of the NVMe tier (a part the tier holds: ``NvmeTier._recovery``).

``recover()`` runs once at open: unknown files in slabs/ are removed, every known slab file is
opened (a zero-length or partial leftover of an interrupted grow is removed or truncated to whole
records), every LMDB entry whose record header does not verify is dropped, orphan records (a valid
header with no entry: a crash between the records and the LMDB commit) get their magic zeroed, and
the used-byte accounting is rebuilt, as are the "slot written" bits that steer ``prepare()`` (from
``SEEK_DATA``). ``check()`` reports the same problems plus a full payload checksum of every entry,
and with ``fix`` repairs them. Why this order is safe: the publish order
in the module docstring of tiers/nvme.py.

Composition, not a mixin: the tier builds one :class:`NvmeRecovery` over itself and its
``recover()`` / ``check()`` call it; the recovery owns no state and reads and repairs the tier's
slab files, LMDB entries and accounting through the tier (``_fds``, ``_ready``, ``_written``, ``_locate``, ``_file_path``,
``_read_entries``, ``_delete_entries``, ``_read_record``, ``_zero_headers``, ``_settle``,
``_retry_zeroing``, ``_meta_backlog``, ``_pool``); runs on
the caller's thread like the rest of the tier, with per-slot header reads on the tier's pool.
"""

from __future__ import annotations

import logging
import os
import shutil

from tierstore.errors import FormatError
from tierstore.io import disk
from tierstore.io.disk import round_up
from tierstore.tiers.slot_tier import DiskEntry
from tierstore.tiers.record import HEADER_BYTES, is_header_like, verify_header

log = logging.getLogger("tierstore.tiers.nvme")
PROBE_PREFIX = ".direct-probe-"   # io/disk.py's probe file (a kill mid-probe leaves it)


class NvmeRecovery:
    """``recover()`` and ``check()`` of one :class:`tierstore.tiers.nvme.NvmeTier` (``tier``),
    which holds it and delegates both; it keeps no state of its own."""

    def __init__(self, tier) -> None:
        # tier: the NvmeTier that holds this part (not imported here: nvme.py imports this module)
        self.tier = tier

    def _scan_files(self, remove_unknown: bool) -> list[str]:
        """Names of files in slabs/ that are not ours (removed when asked). The O_DIRECT probe's
        file of a process killed mid-probe (``.direct-probe-<pid>``, io/disk.py) is ours: it is
        removed without being reported."""
        ours = {self.tier._file_path(f).name for f in range(self.tier.num_files)}
        names = sorted(os.listdir(self.tier.slab_dir))
        if remove_unknown:
            for name in names:
                if name.startswith(PROBE_PREFIX):
                    try:
                        (self.tier.slab_dir / name).unlink()
                    except OSError:
                        pass
        unknown = [name for name in names if name not in ours
                   and not name.startswith(PROBE_PREFIX)]
        if remove_unknown:
            for name in unknown:
                p = self.tier.slab_dir / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        return unknown

    def _open_existing(self) -> list[int]:
        """Open every known slab file; returns indexes of files that are missing."""
        missing = []
        for f in range(self.tier.num_files):
            p = self.tier._file_path(f)
            if self.tier._fds[f] >= 0:
                os.close(self.tier._fds[f])
                self.tier._fds[f] = -1
            self.tier._ready[f] = 0
            try:
                size = os.stat(p).st_size
            except FileNotFoundError:
                missing.append(f)
                continue
            ready = min(size // self.tier.record_bytes, self.tier._slots_in_file(f))
            if ready == 0:
                p.unlink()   # zero-length / partial leftovers of an interrupted grow
                missing.append(f)
                continue
            fd = disk.open_file(str(p), direct=self.tier.direct)
            if size != ready * self.tier.record_bytes:
                os.ftruncate(fd, ready * self.tier.record_bytes)
            self.tier._fds[f], self.tier._ready[f] = fd, ready
        return missing

    def _scan_written(self) -> None:
        """Rebuild the per-slot "record area written" bits from the files' data ranges (only
        ``prepare()`` reads them: a wrong bit costs speed, never data)."""
        self.tier._written[:] = bytes(self.tier.num_slots)
        for f in range(self.tier.num_files):
            if self.tier._fds[f] < 0:
                continue
            base, rb = f * self.tier.file_slots, self.tier.record_bytes
            for a, b in disk.written_ranges(self.tier._fds[f], self.tier._ready[f] * rb):
                first, last = -(-a // rb), b // rb        # slots wholly inside [a, b)
                if last > first:
                    self.tier._written[base + first:base + last] = b"\x01" * (last - first)

    def _header_ok(self, slot: int, val: tuple) -> str | None:
        key, ns, size, stored, checksum, flags = val
        st = self.tier._thread_state()
        f, off = self.tier._locate(slot)
        try:
            if self.tier._fds[f] < 0 or not self.tier._is_ready(slot):
                return "slab file missing or too short"
            if off + HEADER_BYTES + round_up(stored) > self.tier._ready[f] * self.tier.record_bytes:
                return "record extends past end of file"
            if disk.read_vec(self.tier._fds[f], [st.hdr], off, direct=self.tier.direct) < HEADER_BYTES:
                return "header truncated"
            h = verify_header(st.hdr, key=key, slot=slot)
        except OSError as e:
            return f"I/O error reading header ({e.strerror})"
        except FormatError as e:
            return str(e)
        if (h.size, h.stored, h.checksum, h.flags, h.ns_digest) != \
                (size, stored, checksum, flags, ns):
            return "header disagrees with metadata"
        return None

    def _orphan(self, slot: int) -> bool:
        st = self.tier._thread_state()
        f, off = self.tier._locate(slot)
        try:
            n = disk.read_vec(self.tier._fds[f], [st.hdr], off, direct=self.tier.direct)
        except OSError:
            return False
        return n >= 4 and is_header_like(st.hdr)

    def _find_orphans(self, live: set[int]) -> list[int]:
        """Slots backed by disk, not in ``live``, whose header still carries the magic."""
        cand = [s for f in range(self.tier.num_files)
                for s in range(f * self.tier.file_slots, f * self.tier.file_slots + self.tier._ready[f])
                if s not in live]
        return [s for s, o in zip(cand, self.tier._pool.map(self._orphan, cand)) if o]

    def recover(self) -> list[DiskEntry]:
        """Start-up recovery (see DiskTier); runs fully once, later calls list current entries."""
        if self.tier._closed:
            raise RuntimeError("nvme tier is closed")
        if self.tier._recovered:
            return self.tier.entries()
        unknown = self._scan_files(remove_unknown=True)
        for name in unknown:
            log.warning("nvme tier %s: removed unknown file slabs/%s", self.tier.path, name)
        missing = self._open_existing()
        self._scan_written()
        rows = self.tier._read_entries()
        problems = self.tier._pool.map(
            lambda sv: "slot out of range" if sv[0] >= self.tier.num_slots else self._header_ok(*sv),
            rows)
        keep, drop = [], []
        for (slot, val), why in zip(rows, problems):
            if why is None:
                keep.append((slot, val))
            else:
                log.debug("nvme tier %s: dropped entry of slot %d: %s", self.tier.path, slot, why)
                drop.append(slot)
        if drop:
            log.warning("nvme tier %s: dropped %d entries whose record failed its check "
                        "(first: slot %d: %s)", self.tier.path, len(drop), drop[0],
                        next(w for w in problems if w is not None))
            self.tier._delete_entries(drop)
        live = {s for s, _ in keep}
        orphans = self._find_orphans(live)
        self.tier._zero_headers(orphans)
        if orphans:
            log.warning("nvme tier %s: freed %d orphan records", self.tier.path, len(orphans))
        self.tier._used_bytes = self.tier._payload_used = 0
        for slot, (_k, _ns, size, stored, _cs, flags) in keep:
            self.tier._stored[slot], self.tier._flags[slot], self.tier._sizes[slot] = stored, flags, size
            self.tier._account(slot, stored, size, +1)
        self.tier.slots.take_many(sorted(live))
        self.tier._recovered = True
        vanished = sorted({s // self.tier.file_slots for s in drop if s < self.tier.num_slots}
                          & set(missing))
        self.tier.last_recovery = {"entries": len(keep), "dropped": len(drop), "orphans": len(orphans),
                              "unknown_files": unknown,
                              "missing_files": [self.tier._file_path(f).name for f in vanished]}
        metas = self.tier._read_metas()
        return [DiskEntry(k, s, size, cs, ns, metas.get(s))
                for s, (k, ns, size, _st, cs, _fl) in keep]

    def _check_one(self, slot: int, val: tuple) -> str | None:
        why = self._header_ok(slot, val)
        if why is not None:
            return why
        try:
            h, _ = self.tier._read_record(self.tier._thread_state(), slot, None, val[0], None,
                                     val[3], val[5])
        except OSError as e:
            return f"I/O error reading record ({e.strerror})"
        except (FormatError, ValueError) as e:
            return str(e).removeprefix(f"slot {slot}: ")   # the caller names the slot
        return None if h.checksum == val[4] else "payload checksum differs from metadata"

    def check(self, fix: bool = False) -> list[str]:
        """Verify every entry (header and payload checksum) and look for orphan records. First
        settles what failed commits and header writes left owed (so a filesystem that has room
        again checks clean without a restart) and, when the latest I/O failed, probes the write
        path (``probe``); entries still owed a delete are not verified
        (their records are zeroed on purpose): the tier's health reports them as pending."""
        self.tier._ensure_open()
        problems: list[str] = []
        self.tier.dropped_slots = []
        self.tier._settle()
        self.tier._retry_zeroing()
        if self.tier.health.failing:
            self.tier.probe()   # is it failing now? (a disk that works again checks clean)
        for name in self._scan_files(remove_unknown=fix):
            problems.append(f"unknown file slabs/{name}")
        for f in range(self.tier.num_files):
            if self.tier._fds[f] >= 0 and not self.tier._file_path(f).exists():
                problems.append(f"slab file {self.tier._file_path(f).name} missing")
                os.close(self.tier._fds[f])
                self.tier._fds[f], self.tier._ready[f] = -1, 0
        rows = [r for r in self.tier._read_entries() if r[0] not in self.tier._meta_backlog]
        whys = self.tier._pool.map(
            lambda sv: "slot out of range" if sv[0] >= self.tier.num_slots else self._check_one(*sv),
            rows)
        bad = []
        for (slot, _), why in zip(rows, whys):
            if why is not None:
                problems.append(f"slot {slot}: {why}")
                bad.append(slot)
        orphans = self._find_orphans({s for s, _ in rows} | self.tier._meta_backlog)
        problems += [f"slot {s}: orphan record (no metadata entry)" for s in orphans]
        if fix:
            in_range = [s for s in bad if s < self.tier.num_slots]
            out_range = [s for s in bad if s >= self.tier.num_slots]
            if out_range:
                self.tier._delete_entries(out_range)
            if in_range:
                self.tier.delete_batch(in_range)
            self.tier._zero_headers(orphans)
            self.tier.dropped_slots = in_range
        return problems
