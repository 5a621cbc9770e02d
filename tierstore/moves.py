"""Moving blocks between tiers: eviction, demotion, promotion (mixed into :class:`Store`).

The policy of each tier picks victims; these methods move the bytes and keep the index in step:

    HBM --demote (copy engine)--> DRAM --demote (write_batch)--> NVMe
    HBM <--load into HBM-------- DRAM <--promote (read_batch)--- NVMe

``_make_room(tier, n)`` evicts up to ``n`` unpinned blocks from a tier, demoting each one step
down when the tier below has room (else the block is dropped: a cache may drop, never corrupt).
``_alloc(tier)`` is a slot, making room once if needed. ``_promote`` reads NVMe-only blocks into
DRAM, verifying checksums (a corrupt record is a miss plus a counter and is deleted).

Threading: every method here is called with the store's lock held and uses the store's state
(``res``, ``pins``, ``tiers``, ``policies``, ``admission``, ``counters``, ``config``); none is
public. Every call into the NVMe tier holds ``_nvme_lock`` (the tier is single-threaded); lock
order: store lock, then NVMe lock, never the reverse.

NVMe I/O outside the store lock (``unlocked_io=True``, passed by the public methods that own the
lock once): the store lock is released around ``write_batch`` and ``read_batch`` only, so
lookups, pins and DRAM hits of other threads go on while a cold load or a demotion waits for the
disk. NVMe slot allocation and deletes stay under the store lock (so no slot is freed or reused
while a record on it is still live), and so wait for another thread's batch: a known convoy.
What keeps that safe while the lock is released:

- demotion victims (written or not) and blocks whose DRAM bytes are being written to NVMe are
  pinned by ``MOVE_OWNER`` (never evicted, re-stored or moved: ``_release_slot`` keeps a pinned
  block's slot), victims are out of the DRAM policy, and the NVMe slots they go to are reserved
  (allocated, not yet in the index); a victim is freed only if it still has the slot it was
  picked with;
- blocks being promoted are pinned by their load job and listed in ``_promoting`` (a second
  load of the same block waits for the first, see ``Store.prepare_load``); the DRAM slots they
  are read into are reserved until the read is committed;
- after the lock is taken back, every step re-reads the index (handles of pinned keys are
  stable): a victim that another thread pinned meanwhile stays in DRAM.

``_reserved`` counts slots allocated but not in the index yet, ``_unlisted`` demotion victims
out of their policy but still in the index (both change only under the store lock), so
``check()`` balances while I/O is in flight.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Sequence

from tierstore.errors import JobError
from tierstore.tiers.base import DiskRead, DiskWrite
from tierstore.types import BlockKey, BlockStatus, Tier

MOVE_OWNER = "move:nvme"   # internal pin owner: DRAM bytes being written to NVMe (no client
                           # owner has this form: the daemon names owners conn:/session:/job:)


class TierMoves:
    """Eviction and tier-to-tier moves of :class:`tierstore.store.Store` (see module docstring)."""

    # ---------------------------------------------------------------- locks
    def _tier_lock(self, tier: Tier):
        """The lock that serialises calls into ``tier`` (NVMe) beyond the store lock."""
        return self._nvme_lock if tier is Tier.NVME else nullcontext()

    @contextmanager
    def _unlocked(self, release: bool = True):
        """Release the store lock (held once by a public method) around NVMe I/O. Held twice (a
        re-entrant caller), it stays held: the I/O then runs under it, as it always did."""
        if not release:
            yield
            return
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            if self._closed:
                raise JobError("the store was closed while this operation waited for NVMe I/O")

    def _free(self, tier: Tier, slot: int) -> None:
        with self._tier_lock(tier):
            self.tiers[tier].free(slot)

    # ---------------------------------------------------------------- eviction
    def _evictable(self, key: BlockKey) -> bool:
        h = self.res.get(key)
        return h >= 0 and self.res.pins[h] == 0

    def _pick_victims(self, tier: Tier, n: int) -> list[BlockKey]:
        pol = self.policies[tier]
        victims: list[BlockKey] = []
        for _ in range(n):
            v = pol.victim(self._evictable)
            if v is None:
                break
            pol.remove(v)
            victims.append(v)
        return victims

    def _make_room(self, tier: Tier, n: int, *, unlocked_io: bool = False) -> int:
        """Evict up to ``n`` unpinned blocks from ``tier`` (demoting DRAM victims to NVMe, HBM
        victims to DRAM); returns how many slots were freed. ``unlocked_io``: release the store
        lock while the DRAM victims are written (see the module docstring)."""
        victims = self._pick_victims(tier, n)
        if not victims:
            return 0
        slots = [self.res.slot(self.res.get(v), tier) for v in victims]
        if tier is Tier.DRAM and Tier.NVME in self.tiers:
            # every victim, written or not, stays pinned (never evicted, moved or re-stored by
            # another thread) and counted out of its policy until it is dropped below
            for v in victims:
                self.pins.pin(MOVE_OWNER, v)
            self._unlisted[tier] += len(victims)
            try:
                self._demote(victims, unlocked_io=unlocked_io)
            finally:
                for v in victims:
                    self.pins.unpin(MOVE_OWNER, v)
                self._unlisted[tier] -= len(victims)
        elif tier is Tier.HBM:
            self._move_hbm(victims, down=True)
        return self._drop_victims(tier, victims, slots)

    def _drop_victims(self, tier: Tier, victims: list[BlockKey], slots: list[int]) -> int:
        """Free the ``tier`` slots of ``victims`` (out of its policy already; ``slots``: their
        slots when picked). A victim pinned by someone else meanwhile (possible only while the
        lock was released for I/O) stays, back in the policy. NVMe records go in one batch."""
        freed: list[int] = []
        for v, slot in zip(victims, slots):
            h = self.res.get(v)
            if h < 0 or self.res.slot(h, tier) != slot:   # not the copy that was picked
                continue
            if self.res.pins[h]:
                self.policies[tier].insert(v, self.res.size[h], None)
                self.counters[f"evictions_{tier.label}_kept_pinned"] += 1
                continue
            freed.append(self.res.clear_slot(h, tier))
            self.counters[f"evictions_{tier.label}"] += 1
            if self.res.nearest(h) is None:
                self.res.remove(h)
        if tier is Tier.NVME:
            with self._nvme_lock:
                self.tiers[tier].delete_batch(freed)
        else:
            for s in freed:
                self.tiers[tier].free(s)
        return len(freed)

    def _alloc(self, tier: Tier) -> int | None:
        t = self.tiers[tier]
        with self._tier_lock(tier):
            s = t.alloc()
        if s is None and self._make_room(tier, 1):
            with self._tier_lock(tier):
                s = t.alloc()
        return s

    def _move_hbm(self, keys: list[BlockKey], down: bool) -> list[bool]:
        """Copy blocks HBM -> DRAM (``down``) or DRAM -> HBM, one batched copy job, and record the
        new slots; the source slot is left to the caller. A block whose destination slot cannot
        be had (everything pinned) is not moved. Returns per key whether it now has the slot."""
        hbm = self.tiers[Tier.HBM]
        dst_tier = Tier.DRAM if down else Tier.HBM
        src_tier = Tier.HBM if down else Tier.DRAM
        moved = [False] * len(keys)
        pairs: list[tuple[int, int, int]] = []      # (index, source slot, destination slot)
        for i, k in enumerate(keys):
            h = self.res.get(k)
            if self.res.slot(h, dst_tier) >= 0:
                moved[i] = True                      # already there (e.g. write-through copy)
                continue
            d = self._alloc(dst_tier)
            if d is None:
                self.counters[f"{dst_tier.label}_staging_failed"] += 1
                continue
            pairs.append((i, self.res.slot(h, src_tier), d))
        if pairs:
            src = [p[1] for p in pairs]
            dst = [p[2] for p in pairs]
            job = hbm.copy_to_dram(src, dst) if down else hbm.copy_from_dram(src, dst)
            hbm.wait(job)
            for i, _, d in pairs:
                k = keys[i]
                h = self.res.get(k)
                self.res.set_slot(h, dst_tier, d)
                self.policies[dst_tier].insert(k, self.res.size[h], None)
                moved[i] = True
            self.counters["demotions_hbm" if down else "promotions_hbm"] += len(pairs)
        return moved

    def _demote(self, victims: list[BlockKey], *, unlocked_io: bool = False) -> None:
        """Write DRAM victims that NVMe does not hold yet to NVMe (one batch)."""
        dram = self.tiers[Tier.DRAM]
        if not getattr(dram, "holds_bytes", True):
            return
        writes = []
        for v in victims:
            h = self.res.get(v)
            if self.res.slot(h, Tier.NVME) >= 0 or self.res.slot(h, Tier.DRAM) < 0:
                continue
            if not self.admission[Tier.NVME].admit(v, self.res.size[h]).admitted:
                self.counters["nvme_admission_rejects"] += 1
                continue
            writes.append(v)
        if writes:
            self.counters["demotions"] += self._write_nvme(writes, unlocked_io=unlocked_io)

    def _write_nvme(self, keys: list[BlockKey], *, unlocked_io: bool = False) -> int:
        """Write resident DRAM blocks to NVMe in one batch; a block that hits ENOSPC gets one
        retry after evicting an NVMe victim, then is reported skipped. Returns blocks written.
        The blocks are pinned by ``MOVE_OWNER`` throughout; with ``unlocked_io`` the store lock
        is released for the writes."""
        for k in keys:
            self.pins.pin(MOVE_OWNER, k)
        try:
            items = self._reserve_nvme(keys)
            written = 0
            for attempt in range(2):
                if not items:
                    break
                with self._unlocked(unlocked_io):
                    with self._nvme_lock:
                        results = self.tiers[Tier.NVME].write_batch([w for _, _, w in items])
                items, n = self._commit_nvme_writes(items, results, retry=attempt == 0)
                written += n
            return written
        finally:
            for k in keys:
                self.pins.unpin(MOVE_OWNER, k)

    def _reserve_nvme(self, keys: list[BlockKey]) -> list[tuple[BlockKey, int, DiskWrite]]:
        """One NVMe slot per key (evicting NVMe victims in one batch when short) and the write
        of its DRAM bytes; the slots count as reserved until committed."""
        nvme = self.tiers[Tier.NVME]
        short = len(keys) - nvme.slots.free_count
        if short > 0:
            self._make_room(Tier.NVME, short)
        items = []
        for k in keys:
            s = self._alloc(Tier.NVME)
            if s is None:
                self.counters["nvme_store_skipped"] += 1
                continue
            items.append((k, s, self._disk_write(k, s)))
        self._reserved[Tier.NVME] += len(items)
        return items

    def _disk_write(self, key: BlockKey, nvme_slot: int) -> DiskWrite:
        h = self.res.get(key)
        dram = self.tiers[Tier.DRAM]
        return DiskWrite(nvme_slot, key, self._ns_digest(self.res.ns[h]),
                         dram.view(self.res.slot(h, Tier.DRAM))[: self.res.size[h]],
                         self.res.checksum[h])

    def _commit_nvme_writes(self, items, results, retry: bool):
        """Record written blocks in the index; free failed slots. Returns (items to retry after
        ENOSPC, blocks written)."""
        nvme = self.tiers[Tier.NVME]
        self._reserved[Tier.NVME] -= len(items)
        again = []
        written = 0
        for (k, s, _w), r in zip(items, results):
            h = self.res.get(k)
            if h < 0:   # gone (cannot happen while MOVE_OWNER pins it): never index it
                self._free(Tier.NVME, s)
                continue
            if r.ok:
                self.res.set_slot(h, Tier.NVME, s)
                self.res.checksum[h] = r.checksum
                self.policies[Tier.NVME].insert(k, self.res.size[h], None)
                self.counters["nvme_bytes_written"] += self.res.size[h]
                written += 1
                continue
            self._free(Tier.NVME, s)
            self.counters[f"nvme_write_{r.error or 'error'}"] += 1
            if r.error == "enospc" and retry and self._make_room(Tier.NVME, 1):
                with self._nvme_lock:
                    s2 = nvme.alloc()
                if s2 is not None:
                    again.append((k, s2, self._disk_write(k, s2)))
                    continue
            self.counters["nvme_store_skipped"] += 1
        self._reserved[Tier.NVME] += len(again)
        return again, written

    def _release_slot(self, key: BlockKey, h: int, tier: Tier, own_pins: int = 0) -> None:
        """Drop ``key``'s copy in ``tier`` (it lives on elsewhere), unless someone besides the
        caller (``own_pins`` of its pins) pins the block: another load job may be reading that
        slot, or its bytes are being written to NVMe. Then both copies stay."""
        if self.res.pins[h] > own_pins:
            return
        s = self.res.clear_slot(h, tier)
        self.policies[tier].remove(key)
        self._free(tier, s)

    def _promote(self, keys: Sequence[BlockKey], hs: list[int], need: list[int],
                 status: list[BlockStatus], *, unlocked_io: bool = False) -> int:
        """Read NVMe-only blocks ``need`` (indices into ``hs``; pinned by the caller's job and
        listed in ``_promoting``) into fresh DRAM slots; returns the length of the prefix that
        is ready. ``unlocked_io``: release the store lock for the demotions and the reads."""
        dram = self.tiers[Tier.DRAM]
        nvme = self.tiers[Tier.NVME]
        short = len(need) - dram.slots.free_count
        if short > 0:   # one demotion batch, not one per block
            self._make_room(Tier.DRAM, short, unlocked_io=unlocked_io)
        staged: list[tuple[int, int]] = []   # (index, dram slot)
        for i in need:
            if self.res.slot(hs[i], Tier.NVME) < 0:   # its record went while the lock was free
                status[i] = BlockStatus.FAILED
                self.counters["nvme_read_errors"] += 1
                break
            s = self._alloc(Tier.DRAM)
            if s is None:
                status[i] = BlockStatus.FAILED
                self.counters["load_staging_failed"] += 1
                break
            staged.append((i, s))
        if not getattr(dram, "holds_bytes", True):
            results = [None] * len(staged)
        else:
            reads = [DiskRead(self.res.slot(hs[i], Tier.NVME), keys[i], dram.view(s),
                              self.res.size[hs[i]], self.res.checksum[hs[i]]) for i, s in staged]
            self._reserved[Tier.DRAM] += len(staged)
            try:
                with self._unlocked(unlocked_io):
                    with self._nvme_lock:
                        results = nvme.read_batch(reads)
            finally:
                self._reserved[Tier.DRAM] -= len(staged)
        first_bad = len(hs) if len(staged) == len(need) else need[len(staged)]
        drop: list[int] = []
        moved_off: list[int] = []   # NVMe records of promoted blocks (exclusive tiers)
        exclusive = self.config.exclusive and not (self.config.nvme and self.config.nvme.write_through)
        for (i, s), r in zip(staged, results):
            h = hs[i]
            if r is not None and not r.ok:
                dram.free(s)
                status[i] = BlockStatus.CORRUPT if r.error == "corrupt" else BlockStatus.FAILED
                self.counters["checksum_failures" if r.error == "corrupt" else "nvme_read_errors"] += 1
                first_bad = min(first_bad, i)
                if r.error == "corrupt":
                    drop.append(i)
                continue
            self.res.set_slot(h, Tier.DRAM, s)
            self.policies[Tier.DRAM].insert(keys[i], self.res.size[h], keys[i - 1] if i else None)
            self.counters["promotions"] += 1
            self.counters["nvme_bytes_read"] += self.res.size[h]
            if exclusive and self.res.slot(h, Tier.NVME) >= 0:
                moved_off.append(self.res.clear_slot(h, Tier.NVME))
                self.policies[Tier.NVME].remove(keys[i])
        for i in drop:   # a corrupt record is dropped from the index and the disk
            h = hs[i]
            if self.res.slot(h, Tier.NVME) >= 0:
                moved_off.append(self.res.clear_slot(h, Tier.NVME))
                self.policies[Tier.NVME].remove(keys[i])
            if self.res.nearest(h) is None:
                self.pins.forget(keys[i])
                self.res.remove(h)
        if moved_off:   # one batch, under the store lock: a slot must not be freed (check --fix)
            with self._nvme_lock:   # or handed out again before its record is deleted
                nvme.delete_batch(moved_off)
        return first_bad
