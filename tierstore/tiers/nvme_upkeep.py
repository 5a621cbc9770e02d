"""What the NVMe tier owes after a failure, and how it finds out whether it still fails (mixed
into :class:`~tierstore.tiers.nvme.NvmeTier`; issue 13 items 10-11).

A metadata commit that cannot be made (a full or failing metadata filesystem: ``lmdb.DiskError``)
never raises out of the tier. For a delete or a namespace descriptor the work is *owed*::

    delete_batch(slots) --LMDB delete fails--> slots freed, headers zeroed, entries owed
    put_namespace(d)    --LMDB put fails----->  descriptor kept in memory (listed), owed
    next commit that works (a write batch, a delete, settle_metadata, check, close)
                        --carries what is owed--> settled; ``health.pending`` back to {}

A stale entry owed a delete names a record whose header was zeroed, so if the process dies first
the next open drops it (reported once by ``check``): nothing owed is ever served. A header zeroing
that fails is remembered and retried (``_unzeroed``), else ``check`` would find an orphan.
``probe()`` takes one record and a batch's worth of metadata through the write path: ``check``
calls it when the latest I/O failed, so a disk that works again checks clean without a restart.

Uses the tier's state (``_meta_backlog``, ``_ns_backlog``, ``_probe_owed``, ``_unzeroed``,
``health``, ``counters``, ``slots``, ``_pool``, ``_fds``, ``_write_txn``, ``_write_one``); runs on
the caller's thread like the rest of the tier (header writes on the tier's pool).
"""

from __future__ import annotations

import json
import logging
import os
import struct

import lmdb

from tierstore import counter_names as cn
from tierstore.io import disk
from tierstore.io.disk import aligned_buffer
from tierstore.tiers.slot_tier import DiskError, DiskWrite
from tierstore.tiers.health import error_name
from tierstore.tiers.record import KEY_BYTES, NS_BYTES

log = logging.getLogger("tierstore.tiers.nvme")

SLOT_KEY = struct.Struct(">cQ")           # LMDB key of a slot's entry: b"s" + slot (u64 BE)
VALUE = struct.Struct("<32s16sQQQH")      # its value (tiers/nvme.py has the table)
PROBE_KEY = b"\xfe" * KEY_BYTES          # the record ``probe()`` writes to a free slot (never committed)
PROBE_META_KEYS = [b"!probe/%02d" % i for i in range(32)]   # ``probe()``'s metadata entries


def slot_key(slot: int) -> bytes:
    return SLOT_KEY.pack(b"s", slot)


def meta_key(slot: int) -> bytes:
    """LMDB key of a slot's engine metadata (optional; written and deleted with its entry)."""
    return SLOT_KEY.pack(b"e", slot)


class NvmeUpkeep:
    """Owed metadata, header zeroing and the write-path probe of the NVMe tier."""

    def put_namespace(self, digest: bytes, descriptor: dict) -> None:
        """Record a namespace's descriptor. When LMDB cannot commit it (a full metadata
        filesystem) it is owed and written with the next commit that succeeds (counted:
        ``meta_errors``; the tier reports ``namespace_writes`` pending); never raises for that."""
        value = json.dumps(descriptor, sort_keys=True).encode()
        backlog, ns_backlog = set(self._meta_backlog), dict(self._ns_backlog)
        ns_backlog[bytes(digest)] = value
        try:
            self._write_txn(lambda t: self._owed(t, backlog, ns_backlog))
        except lmdb.Error as e:
            log.warning("nvme tier: namespace descriptor not committed (kept, retried): %s", e)
            self.counters[cn.T_META_ERRORS] += 1
            self.health.fail("meta", DiskError.META, str(e))
            self._owe(namespaces={bytes(digest): value})
            return
        self._paid(backlog, ns_backlog)
        self.health.ok()

    def probe(self) -> bool | None:
        """Take one record through every step a write takes (header + payload ``pwritev``,
        ``fdatasync``, an LMDB commit of as many new entries as a flusher batch: ``!probe/NN``,
        deleted again by a second commit) in a free slot, then give the slot back
        (header zeroed). Outcomes feed :attr:`health` like any I/O, so a disk that works again
        is no longer ``failing``. None when no slot is free (nothing probed)."""
        self._ensure_open()
        s = self.alloc()
        if s is None:
            return None
        try:
            res, _, _ = self._write_one(DiskWrite(s, PROBE_KEY, bytes(NS_BYTES),
                                                  aligned_buffer(self.slot_bytes)))
            if not res.ok:
                self.counters[cn.T_IO_ERRORS] += 1
                self.health.fail("write", res.error, "probe")
                return False
            if self.fsync:
                try:
                    os.fdatasync(self._fds[s // self.file_slots])
                except OSError as e:
                    self.counters[cn.T_IO_ERRORS] += 1
                    self.health.fail("fsync", error_name(e), "probe")
                    return False
            value = bytes(VALUE.size)
            try:   # as many new entries as a flusher batch commits (the metadata must grow)
                self._write_txn(lambda t: [t.put(k, value) for k in PROBE_META_KEYS])
            except lmdb.Error as e:
                self.counters[cn.T_META_ERRORS] += 1
                self.health.fail("meta", DiskError.META, f"probe: {e}")
                return False
            self.health.ok()
            self._owe(probe=True)
            self._settle()   # deletes them again (owed, should that commit fail)
            return True
        finally:
            self._zero_headers([s])
            self.slots.free(s)

    def _owed(self, txn, backlog: set[int], ns_backlog: dict[bytes, bytes]) -> None:
        """Inside a write txn: what earlier failed commits left undone (stale entries of freed
        slots, namespace descriptors, the entries of a probe)."""
        for s in backlog:
            txn.delete(slot_key(s))
            txn.delete(meta_key(s))
        for digest, value in ns_backlog.items():
            txn.put(b"n" + digest, value)
        if self._probe_owed:
            for k in PROBE_META_KEYS:
                txn.delete(k)

    def _paid(self, slots: set[int], ns_digests) -> None:
        """A txn carrying ``_owed`` committed: forget what it settled."""
        self._meta_backlog -= slots
        for d in ns_digests:
            self._ns_backlog.pop(d, None)
        self._probe_owed = False
        self._report_owed()

    def _owe(self, slots=(), namespaces: dict[bytes, bytes] | None = None,
             probe: bool = False) -> None:
        self._meta_backlog.update(slots)
        self._ns_backlog.update(namespaces or {})
        self._probe_owed = self._probe_owed or probe
        self._report_owed()

    def _report_owed(self) -> None:
        self.health.set_pending("metadata_deletes",
                                len(self._meta_backlog) + len(PROBE_META_KEYS) * self._probe_owed)
        self.health.set_pending("namespace_writes", len(self._ns_backlog))

    def settle_metadata(self) -> bool:
        """Commit what earlier failed LMDB commits left undone (one txn); True when nothing is
        owed any more. Called by ``check``, ``close`` and every later write or delete."""
        self._ensure_open()
        return self._settle()

    def _settle(self) -> bool:
        if not self._meta_backlog and not self._ns_backlog and not self._probe_owed:
            return True
        backlog, ns_backlog = set(self._meta_backlog), dict(self._ns_backlog)
        try:
            self._write_txn(lambda t: self._owed(t, backlog, ns_backlog))
        except lmdb.Error as e:
            log.warning("nvme tier: metadata still cannot be committed: %s", e)
            self.counters[cn.T_META_ERRORS] += 1
            self.health.fail("meta", DiskError.META, str(e))
            return False
        self._paid(backlog, ns_backlog)
        self.health.ok()
        return True

    def _delete_entries(self, slots: list[int]) -> bool:
        """Delete the LMDB entries of ``slots`` in one write txn (records are left as they are),
        with whatever earlier commits left owed. When LMDB cannot commit (a full or failing
        metadata filesystem) the deletes are owed instead (settled by the next commit that
        succeeds; the tier reports ``metadata_deletes`` pending) and False is returned; never
        raises for that. The caller zeroes the records' headers either way, so a stale entry
        names a record that fails its check: dropped at the next open, never served."""
        backlog = set(self._meta_backlog) | set(slots)
        ns_backlog = dict(self._ns_backlog)
        try:
            self._write_txn(lambda t: self._owed(t, backlog, ns_backlog))
        except lmdb.Error as e:
            log.warning("nvme tier: metadata delete of %d entries not committed (retried "
                        "later): %s", len(slots), e)
            self.counters[cn.T_META_ERRORS] += 1
            self.health.fail("meta", DiskError.META, str(e))
            self._owe(slots)
            return False
        self._paid(backlog, ns_backlog)
        self.health.ok()
        return True

    def _zero_header(self, slot: int) -> str | None:
        """Zero the magic of the record in ``slot`` (pool thread). Returns None, or the error
        name when the write failed (the caller counts it and remembers the slot)."""
        f, off = self._locate(slot)
        if self._fds[f] >= 0 and self._is_ready(slot):
            try:
                disk.write_vec(self._fds[f], [self._zero], off, direct=self.direct)
            except OSError as e:
                log.warning("nvme tier: zeroing header of slot %d failed: %s", slot, e)
                return error_name(e)
        return None

    def _zero_headers(self, slots) -> None:
        """Zero the headers of free (or about to be freed) ``slots`` on the pool; failures are
        counted (``io_errors``, health ``zero``) and remembered for a retry."""
        slots = list(slots)
        if not slots:
            return
        errors = self._pool.map(self._zero_header, slots)
        self._unzeroed.difference_update(slots)
        for s, err in zip(slots, errors):
            if err is not None:
                self.counters[cn.T_IO_ERRORS] += 1
                self.health.fail("zero", err, f"header of slot {s}")
                self._unzeroed.add(s)
        self.health.set_pending("header_zeroings", len(self._unzeroed))

    def _retry_zeroing(self) -> None:
        """Zero again the headers whose zeroing failed, of slots that are free now (a slot in
        use stays listed until a write over it succeeds or it is freed and zeroed)."""
        again = [s for s in self._unzeroed if not self.slots.is_used(s)]
        if again:
            self._zero_headers(again)
