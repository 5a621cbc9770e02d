"""Moving blocks between tiers: eviction, demotion, promotion (mixed into :class:`Store`).

The policy of each tier picks victims; these methods move the bytes and keep the index in step:

    HBM --demote (copy engine)--> DRAM --demote (write_batch)--> NVMe
    HBM <--load into HBM-------- DRAM <--promote (read_batch)--- NVMe

``_make_room(tier, n)`` evicts up to ``n`` unpinned blocks from a tier, demoting each one step
down when the tier below has room (else the block is dropped: a cache may drop, never corrupt).
``_alloc(tier)`` is a slot, making room once if needed. ``_promote`` reads NVMe-only blocks into
DRAM, verifying checksums (a corrupt record is a miss plus a counter and is deleted).

Threading: every method here runs under the store's lock and uses the store's state (``res``,
``pins``, ``tiers``, ``policies``, ``admission``, ``counters``, ``config``); none is public.
"""

from __future__ import annotations

from typing import Sequence

from tierstore.tiers.base import DiskRead, DiskWrite
from tierstore.types import BlockKey, BlockStatus, Tier


class TierMoves:
    """Eviction and tier-to-tier moves of :class:`tierstore.store.Store` (see module docstring)."""

    def _evictable(self, key: BlockKey) -> bool:
        h = self.res.get(key)
        return h >= 0 and self.res.pins[h] == 0

    def _make_room(self, tier: Tier, n: int) -> int:
        """Evict up to ``n`` unpinned blocks from ``tier`` (demoting DRAM victims to NVMe when
        exclusive); returns how many slots were freed."""
        pol = self.policies[tier]
        victims: list[BlockKey] = []
        for _ in range(n):
            v = pol.victim(self._evictable)
            if v is None:
                break
            pol.remove(v)
            victims.append(v)
        if not victims:
            return 0
        if tier is Tier.DRAM and Tier.NVME in self.tiers:
            self._demote(victims)
        elif tier is Tier.HBM:
            self._move_hbm(victims, down=True)
        t = self.tiers[tier]
        for v in victims:
            h = self.res.get(v)
            t.free(self.res.clear_slot(h, tier))
            self.counters[f"evictions_{tier.label}"] += 1
            if self.res.nearest(h) is None:
                self.res.remove(h)
        return len(victims)

    def _alloc(self, tier: Tier) -> int | None:
        t = self.tiers[tier]
        s = t.alloc()
        if s is None and self._make_room(tier, 1):
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

    def _demote(self, victims: list[BlockKey]) -> None:
        """Write DRAM victims that NVMe does not hold yet to NVMe (one batch)."""
        dram = self.tiers[Tier.DRAM]
        if not getattr(dram, "holds_bytes", True):
            return
        writes = []
        for v in victims:
            h = self.res.get(v)
            if self.res.slot(h, Tier.NVME) >= 0:
                continue
            if not self.admission[Tier.NVME].admit(v, self.res.size[h]).admitted:
                self.counters["nvme_admission_rejects"] += 1
                continue
            writes.append(v)
        if writes:
            self._write_nvme(writes)
            self.counters["demotions"] += len(writes)

    def _write_nvme(self, keys: list[BlockKey]) -> int:
        """Write resident DRAM blocks to NVMe in one batch; a block that hits ENOSPC gets one
        retry after evicting an NVMe victim, then is reported skipped. Returns blocks written."""
        nvme = self.tiers[Tier.NVME]
        dram = self.tiers[Tier.DRAM]
        items: list[tuple[BlockKey, int, int]] = []   # key, handle, nvme slot
        for k in keys:
            h = self.res.get(k)
            s = self._alloc(Tier.NVME)
            if s is None:
                self.counters["nvme_store_skipped"] += 1
                continue
            items.append((k, h, s))
        written = 0
        for attempt in range(2):
            if not items:
                break
            batch = [DiskWrite(s, k, self._ns_digest(self.res.ns[h]),
                               dram.view(self.res.slot(h, Tier.DRAM))[: self.res.size[h]],
                               self.res.checksum[h]) for k, h, s in items]
            results = nvme.write_batch(batch)
            retry = []
            for (k, h, s), r in zip(items, results):
                if r.ok:
                    self.res.set_slot(h, Tier.NVME, s)
                    self.res.checksum[h] = r.checksum
                    self.policies[Tier.NVME].insert(k, self.res.size[h], None)
                    self.counters["nvme_bytes_written"] += self.res.size[h]
                    written += 1
                    continue
                nvme.free(s)
                self.counters[f"nvme_write_{r.error or 'error'}"] += 1
                if r.error == "enospc" and attempt == 0 and self._make_room(Tier.NVME, 1):
                    s2 = nvme.alloc()
                    if s2 is not None:
                        retry.append((k, h, s2))
                        continue
                self.counters["nvme_store_skipped"] += 1
            items = retry
        return written

    def _release_slot(self, key: BlockKey, h: int, tier: Tier) -> None:
        """Drop ``key``'s copy in ``tier`` (it lives on elsewhere)."""
        s = self.res.clear_slot(h, tier)
        self.policies[tier].remove(key)
        self.tiers[tier].free(s)

    def _promote(self, keys: Sequence[BlockKey], hs: list[int], need: list[int],
                 status: list[BlockStatus]) -> int:
        """Read NVMe-only blocks ``need`` (indices into ``hs``) into fresh DRAM slots; returns
        the length of the prefix that is ready."""
        dram = self.tiers[Tier.DRAM]
        nvme = self.tiers[Tier.NVME]
        staged: list[tuple[int, int]] = []   # (index, dram slot)
        short = len(need) - dram.slots.free_count
        if short > 0:
            self._make_room(Tier.DRAM, short)   # one demotion batch, not one per block
        for i in need:
            s = self._alloc(Tier.DRAM)
            if s is None:
                status[i] = BlockStatus.FAILED
                self.counters["load_staging_failed"] += 1
                break
            staged.append((i, s))
        if not getattr(dram, "holds_bytes", True):
            results = [None] * len(staged)
        else:
            reads = []
            for i, s in staged:
                h = hs[i]
                reads.append(DiskRead(self.res.slot(h, Tier.NVME), keys[i], dram.view(s),
                                      self.res.size[h], self.res.checksum[h]))
            results = nvme.read_batch(reads)
        first_bad = len(hs) if len(staged) == len(need) else need[len(staged)]
        drop: list[int] = []
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
            if self.config.exclusive and not (self.config.nvme and self.config.nvme.write_through):
                nslot = self.res.clear_slot(h, Tier.NVME)
                self.policies[Tier.NVME].remove(keys[i])
                nvme.delete_batch([nslot])
        for i in drop:   # a corrupt record is dropped from the index and the disk
            h = hs[i]
            nslot = self.res.clear_slot(h, Tier.NVME)
            self.policies[Tier.NVME].remove(keys[i])
            nvme.delete_batch([nslot])
            if self.res.nearest(h) is None:
                self.pins.forget(keys[i])
                self.res.remove(h)
        return first_bad
