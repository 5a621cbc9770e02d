"""Moving blocks between tiers: eviction, promotion, the NVMe writes (the store's :class:`TierMover`).

The policy of each tier picks victims; these methods move the bytes and keep the index in step:

    HBM --demote (copy engine)--> DRAM ==write-behind (writebehind.py)==> NVMe
    HBM <--load into HBM-------- DRAM <--promote (read_batch)------------ NVMe

NVMe holds a *clean copy* of every DRAM block it admitted: ``complete_store`` hands new DRAM
blocks to the flusher (tierstore/writebehind.py), a block promoted from NVMe keeps its NVMe
record, and so DRAM victims are simply dropped — evicting from DRAM never writes. A block whose
NVMe copy is not written yet is queued, and pinned until it is: never a victim. ``make_room(tier, n)`` evicts up to ``n`` unpinned blocks from a
tier (HBM victims are copied down to DRAM; NVMe victims are deleted). ``alloc(tier)`` is a slot,
making room once if needed. ``promote`` reads NVMe-only blocks into DRAM, verifying checksums
(a corrupt record is a miss plus a counter and is deleted).

Ownership: the store builds one :class:`TierMover` over its own state, handed over explicitly
(``res``, ``pins``, ``tiers``, ``policies``, ``counters``, ``placement``, its two locks, the
``reserved`` counts, the flusher); the mover owns nothing else but the NVMe hits its policy has
not seen yet (``touch_nvme``). Where a victim goes and which copies a move keeps is asked of
the store's :class:`~tierstore.policy.placement.Placement`.

Threading: every method is called with the store's lock held (the store's public methods, the
flusher's thread). Every call into the NVMe tier holds the NVMe lock (the tier is
single-threaded); lock order: store lock, then NVMe lock, never the reverse.

NVMe I/O outside the store lock (``unlocked_io=True``): the store lock is released around
``write_batch`` (the flusher's thread) and ``read_batch`` (a load), so lookups, pins and DRAM hits
of other threads go on while the disk works. NVMe slot allocation and deletes stay under the
store lock (so no slot is freed or reused while a record on it is still live). What keeps that
safe while the lock is released:

- blocks whose DRAM bytes are being written to NVMe are pinned (``FLUSH_OWNER``: never evicted, re-stored or moved: ``release_slot`` keeps a pinned block's
  slot), and the NVMe slots they go to are reserved (allocated, not yet in the index);
- blocks being promoted are pinned by their load job and listed in ``_promoting`` (a second
  load of the same block waits for the first, see ``Store._stage_load``); the DRAM slots they
  are read into are reserved until the read is committed;
- after the lock is taken back, every step re-reads the index (handles of pinned keys are
  stable).

``reserved`` counts slots allocated but not in the index yet (changes only under the store
lock), so ``check()`` balances while I/O is in flight.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Callable, Sequence

from tierstore import counter_names as cn
from tierstore.errors import JobError
from tierstore.index.residency import PinBook, Residency
from tierstore.policy.placement import Placement
from tierstore.tiers.slot_tier import DiskError, DiskRead, DiskWrite
from tierstore.types import BlockKey, BlockStatus, Tier

if TYPE_CHECKING:  # pragma: no cover
    from tierstore.writebehind import WriteBehind

class TierMover:
    """Eviction and tier-to-tier moves of one :class:`tierstore.store.Store` (see the module
    docstring). Holds references to the store's index, pins, tiers, policies, counters and
    locks, handed over at construction; owns the NVMe hits its policy has not seen yet."""

    def __init__(self, *, res: Residency, pins: PinBook, tiers: dict, policies: dict,
                 counters: Counter, placement: Placement, lock, nvme_lock, reserved: Counter,
                 ns_digest: Callable[[int], bytes], is_closed: Callable[[], bool],
                 wb: "WriteBehind | None" = None) -> None:
        self.res = res
        self.pins = pins
        self.tiers = tiers
        self.policies = policies
        self.counters = counters
        self.placement = placement
        self.wb = wb                      # the flusher (writebehind.py), None without NVMe
        self._lock = lock                 # the store's lock (released around NVMe I/O)
        self._nvme_lock = nvme_lock       # every call into the NVMe tier
        self._reserved = reserved         # slots allocated, not in the index yet (per tier)
        self._ns_digest = ns_digest
        self._is_closed = is_closed
        self._nvme_touched: list[BlockKey] = []   # hits NVMe's policy has not seen yet

    # ---------------------------------------------------------------- NVMe hits
    def touch_nvme(self, keys: Sequence[BlockKey]) -> None:
        """Hits on blocks NVMe also holds: its policy sees them in order, applied in one pass
        before it next picks a victim (the flusher's thread, off the callers' path)."""
        self._nvme_touched.extend(keys)
        if len(self._nvme_touched) > 65536:
            self.apply_nvme_touches()

    def apply_nvme_touches(self) -> None:
        touched, self._nvme_touched = self._nvme_touched, []
        pol = self.policies.get(Tier.NVME)
        if pol is not None:
            for k in touched:
                pol.access(k)

    # ---------------------------------------------------------------- locks
    def tier_lock(self, tier: Tier):
        """The lock that serialises calls into ``tier`` (NVMe) beyond the store lock."""
        return self._nvme_lock if tier is Tier.NVME else nullcontext()

    @contextmanager
    def unlocked(self, release: bool = True):
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
            if self._is_closed():
                raise JobError("the store was closed while this operation waited for NVMe I/O")

    def free(self, tier: Tier, slot: int) -> None:
        with self.tier_lock(tier):
            self.tiers[tier].free(slot)

    # ---------------------------------------------------------------- eviction
    def _evictable(self, key: BlockKey) -> bool:
        h = self.res.get(key)
        return h >= 0 and self.res.pins[h] == 0

    def _can_evict(self, tier: Tier, n: int) -> bool:
        """Whether ``tier`` holds at least ``n`` evictable (unpinned) blocks; changes nothing.
        A policy's ``victim`` answers None only when none of its keys is evictable, so ``n``
        evictable blocks mean ``n`` victims. Cheap when the tier holds more unpinned blocks than
        pinned ones could take (O(owners)); else one pass over the index's columns."""
        if n <= 1:   # one victim: asking the policy for it is the check
            return True
        if len(self.policies[tier]) - self.pins.pinned_blocks_bound() >= n:
            return True
        return sum(1 for s, p in zip(self.res.slots[tier], self.res.pins) if s >= 0 and not p) >= n

    def _pick_victims(self, tier: Tier, n: int) -> list[BlockKey]:
        """``n`` victims of ``tier``, out of its policy, or none at all (nothing changed: the
        policy, the index, the counters are as before)."""
        if not self._can_evict(tier, n):
            return []
        if tier is Tier.NVME and self._nvme_touched:
            self.apply_nvme_touches()
        pol = self.policies[tier]
        victims: list[BlockKey] = []
        for _ in range(n):
            v = pol.victim(self._evictable)
            if v is None:
                break
            pol.remove(v)
            victims.append(v)
        return victims

    def make_room(self, tier: Tier, n: int) -> int:
        """Evict ``n`` unpinned blocks from ``tier``, atomically in vLLM's sense: all ``n``
        victims are chosen before anything moves, and when ``tier`` holds fewer than ``n``
        evictable blocks nothing is evicted and nothing changes (the caller then makes room
        one slot at a time through :meth:`alloc`, or answers SKIPPED). Returns how many slots
        were freed: ``n`` or 0. DRAM victims are dropped (NVMe holds their clean copy, or they
        were never going to reach it: not admitted, or still in the flusher's backlog —
        counted); HBM victims are copied down to DRAM (one that finds no DRAM slot is dropped
        all the same: counted ``dram_staging_failed``); NVMe victims are deleted. No disk write
        happens here."""
        victims = self._pick_victims(tier, n)
        if not victims:
            return 0
        slots = [self.res.slot(self.res.get(v), tier) for v in victims]
        below = self.placement.demote_to(tier)
        if below is None:   # dropped (DRAM: a clean copy on NVMe) or deleted (NVMe)
            return self._drop_victims(tier, victims, slots)
        self.move_hbm(victims, down=True)
        freed = self._drop_victims(tier, victims, slots)
        if self.wb is not None and self.placement.copies_to_nvme(below):
            self.wb.accept(victims)   # new in DRAM: NVMe copies follow (pins them: after the drop)
        return freed

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
                self.counters[cn.EVICTIONS_KEPT_PINNED_OF[tier]] += 1
                continue
            freed.append(self.res.clear_slot(h, tier))
            self.counters[cn.EVICTIONS_OF[tier]] += 1
            if self.res.nearest(h) is None:
                self.res.remove(h)
        if tier is Tier.NVME:
            with self._nvme_lock:
                self.tiers[tier].delete_batch(freed)
        else:
            for s in freed:
                self.tiers[tier].free(s)
        return len(freed)

    def alloc(self, tier: Tier) -> int | None:
        t = self.tiers[tier]
        with self.tier_lock(tier):
            s = t.alloc()
        if s is None and self.make_room(tier, 1):
            with self.tier_lock(tier):
                s = t.alloc()
        return s

    def move_hbm(self, keys: list[BlockKey], down: bool) -> list[bool]:
        """Copy blocks HBM -> DRAM (``down``) or DRAM -> HBM, one batched copy job, and record the
        new slots; the source slot is left to the caller, and so is handing blocks new in DRAM
        to the flusher (its pin must not keep the source slot). A block whose destination slot cannot
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
            d = self.alloc(dst_tier)
            if d is None:
                self.counters[cn.STAGING_FAILED_OF[dst_tier]] += 1
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
            self.counters[cn.DEMOTIONS_HBM if down else cn.PROMOTIONS_HBM] += len(pairs)
        return moved

    def flush_batch(self, keys: list[BlockKey]) -> int:
        """The flusher's batch (writebehind.py): write the DRAM bytes of ``keys`` (pinned by
        ``FLUSH_OWNER``) to NVMe with the store lock released for the I/O. Keys that lost their
        DRAM copy or gained an NVMe one meanwhile are skipped. Returns blocks written."""
        todo = []
        for k in keys:
            h = self.res.get(k)
            if h >= 0 and self.res.slot(h, Tier.DRAM) >= 0 and self.res.slot(h, Tier.NVME) < 0:
                todo.append(k)
        return self.write_nvme(todo, unlocked_io=True) if todo else 0

    def write_nvme(self, keys: list[BlockKey], *, unlocked_io: bool = False) -> int:
        """Write resident DRAM blocks to NVMe in one batch; a block that hits ENOSPC gets one
        retry after evicting an NVMe victim, then is reported skipped. Returns blocks written.
        The caller keeps ``keys`` pinned throughout (the flusher: ``FLUSH_OWNER``); with
        ``unlocked_io`` the store lock is released for the writes."""
        items = self._reserve_nvme(keys)
        written = 0
        for attempt in range(2):
            if not items:
                break
            try:
                with self.unlocked(unlocked_io):
                    with self._nvme_lock:
                        results = self.tiers[Tier.NVME].write_batch([w for _, _, w in items])
            except BaseException:
                self._reserved[Tier.NVME] -= len(items)
                for _, s, _ in items:
                    self.free(Tier.NVME, s)
                raise
            items, n = self._commit_nvme_writes(items, results, retry=attempt == 0)
            written += n
        return written

    def _reserve_nvme(self, keys: list[BlockKey]) -> list[tuple[BlockKey, int, DiskWrite]]:
        """One NVMe slot per key (evicting NVMe victims in one batch when short) and the write
        of its DRAM bytes; the slots count as reserved until committed."""
        nvme = self.tiers[Tier.NVME]
        short = len(keys) - nvme.slots.free_count
        if short > 0:
            self.make_room(Tier.NVME, short)
        items = []
        for k in keys:
            s = self.alloc(Tier.NVME)
            if s is None:
                self.counters[cn.NVME_STORE_SKIPPED] += 1
                continue
            items.append((k, s, self._disk_write(k, s)))
        self._reserved[Tier.NVME] += len(items)
        return items

    def _disk_write(self, key: BlockKey, nvme_slot: int) -> DiskWrite:
        h = self.res.get(key)
        dram = self.tiers[Tier.DRAM]
        return DiskWrite(nvme_slot, key, self._ns_digest(self.res.ns[h]),
                         dram.view(self.res.slot(h, Tier.DRAM))[: self.res.size[h]],
                         self.res.checksum[h], self.res.meta[h])

    def _commit_nvme_writes(self, items, results, retry: bool):
        """Record written blocks in the index; free failed slots. Returns (items to retry after
        ENOSPC, blocks written)."""
        nvme = self.tiers[Tier.NVME]
        self._reserved[Tier.NVME] -= len(items)
        again = []
        written = 0
        for (k, s, _w), r in zip(items, results):
            h = self.res.get(k)
            if h < 0:   # gone (cannot happen while FLUSH_OWNER pins it): never index it
                self.free(Tier.NVME, s)
                continue
            if r.ok:
                self.res.set_slot(h, Tier.NVME, s)
                self.res.checksum[h] = r.checksum
                self.policies[Tier.NVME].insert(k, self.res.size[h], None)
                self.counters[cn.NVME_BYTES_WRITTEN] += self.res.size[h]
                written += 1
                continue
            self.free(Tier.NVME, s)
            self.counters[cn.nvme_write_error(r.error)] += 1
            if r.error is DiskError.ENOSPC and retry and self.make_room(Tier.NVME, 1):
                with self._nvme_lock:
                    s2 = nvme.alloc()
                if s2 is not None:
                    again.append((k, s2, self._disk_write(k, s2)))
                    continue
            self.counters[cn.NVME_STORE_SKIPPED] += 1
        self._reserved[Tier.NVME] += len(again)
        return again, written

    def release_slot(self, key: BlockKey, h: int, tier: Tier, own_pins: int = 0) -> None:
        """Drop ``key``'s copy in ``tier`` (it lives on elsewhere), unless someone besides the
        caller (``own_pins`` of its pins) pins the block: another load job may be reading that
        slot, or its bytes are being written to NVMe. Then both copies stay."""
        if self.res.pins[h] > own_pins:
            return
        s = self.res.clear_slot(h, tier)
        self.policies[tier].remove(key)
        self.free(tier, s)

    def promote(self, keys: Sequence[BlockKey], hs: list[int], need: list[int],
                 status: list[BlockStatus], *, unlocked_io: bool = False) -> int:
        """Read NVMe-only blocks ``need`` (indices into ``hs``; pinned by the caller's job and
        listed in ``_promoting``) into fresh DRAM slots; returns the length of the prefix that
        is ready. ``unlocked_io``: release the store lock for the demotions and the reads."""
        dram = self.tiers[Tier.DRAM]
        nvme = self.tiers[Tier.NVME]
        short = len(need) - dram.slots.free_count
        if short > 0:   # one eviction pass, not one per block
            self.make_room(Tier.DRAM, short)
        staged: list[tuple[int, int]] = []   # (index, dram slot)
        for i in need:
            if self.res.slot(hs[i], Tier.NVME) < 0:   # its record went while the lock was free
                status[i] = BlockStatus.FAILED
                self.counters[cn.NVME_READ_ERRORS] += 1
                break
            s = self.alloc(Tier.DRAM)
            if s is None:   # no room to stage it: dropped (not an I/O failure; MET-38)
                status[i] = BlockStatus.SKIPPED
                self.counters[cn.LOAD_STAGING_FAILED] += 1
                break
            staged.append((i, s))
        if not dram.holds_bytes:
            results = [None] * len(staged)
        else:
            reads = [DiskRead(self.res.slot(hs[i], Tier.NVME), keys[i], dram.view(s),
                              self.res.size[hs[i]], self.res.checksum[hs[i]]) for i, s in staged]
            self._reserved[Tier.DRAM] += len(staged)
            try:
                with self.unlocked(unlocked_io):
                    with self._nvme_lock:
                        results = nvme.read_batch(reads)
            finally:
                self._reserved[Tier.DRAM] -= len(staged)
        first_bad = len(hs) if len(staged) == len(need) else need[len(staged)]
        drop: list[int] = []
        moved_off: list[int] = []   # NVMe records of corrupt blocks
        for (i, s), r in zip(staged, results):
            h = hs[i]
            if r is not None and not r.ok:
                dram.free(s)
                corrupt = r.error is DiskError.CORRUPT
                status[i] = BlockStatus.CORRUPT if corrupt else BlockStatus.FAILED
                self.counters[cn.CHECKSUM_FAILURES if corrupt else cn.NVME_READ_ERRORS] += 1
                first_bad = min(first_bad, i)
                if corrupt:
                    drop.append(i)
                continue
            self.res.set_slot(h, Tier.DRAM, s)
            self.policies[Tier.DRAM].insert(keys[i], self.res.size[h], keys[i - 1] if i else None)
            self.counters[cn.PROMOTIONS] += 1
            self.counters[cn.NVME_BYTES_READ] += self.res.size[h]
            self.touch_nvme((keys[i],))   # the NVMe record stays: a clean copy
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
