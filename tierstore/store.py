"""Store: the one lock, the invariants, the two-phase API (DESIGN §3).

The store owns the index (:mod:`tierstore.index`), one eviction policy per tier, and the tiers.
Policies decide which block leaves; tiers move bytes; the store keeps these invariants:

1. A block is visible to ``lookup`` only after ``complete_store(ok=True)``; a failed or aborted
   store publishes nothing and frees its slots.
2. A pinned block is never evicted, demoted or promoted away (pins live in the index's PinBook,
   per owner; a dead owner's pins go with ``release_owner``).
3. Tiers are exclusive by default: HBM victims demote to DRAM, DRAM victims demote to NVMe (if
   present and admitted); a load moves each block into the tier it is loaded into (``into``:
   DRAM by default, HBM for a GPU reader). With ``nvme.write_through`` every block stored into
   DRAM is also written to NVMe, so a restart keeps it.
4. A load returns an exact prefix: it stops at the first block that is missing or fails its
   checksum (a miss plus a counter, never wrong bytes).

Flow of one request as a prefill node sees it::

    lookup(keys, pin=True) -> hit prefix ──▶ prepare_load(hit) -> DRAM slots ──▶ copy out ──▶ complete_load
                            └─ rest ──────▶ prepare_store(rest) -> DRAM slots ──▶ copy in ──▶ complete_store

Threading: every public method takes ``self._lock`` (an RLock); byte copies by callers into or
out of the slots of a prepared job happen outside the lock, protected by the job's pins (loads)
or by the slots not being published yet (stores). NVMe reads and writes of ``prepare_store``,
``complete_store`` and ``prepare_load`` run with the lock released (``_nvme_lock`` held instead),
so lookups and DRAM hits of other threads do not wait for the disk; what keeps the index
consistent meanwhile is in tierstore/moves.py's docstring.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from tierstore.config import StoreConfig
from tierstore.errors import ConfigError, JobError, RejectedError
from tierstore.index.prefix import longest_prefix, longest_prefix_tiers
from tierstore.index.residency import TIER_BY_VALUE, PinBook, Residency
from tierstore.keys import Namespace
from tierstore.moves import TierMoves
from tierstore.policy import make_admission, make_eviction
from tierstore.policy.base import AdmissionPolicy, EvictionPolicy
from tierstore.tiers.base import DiskTier, MemoryTier, NullTier
from tierstore.types import BlockKey, BlockStatus, LoadJob, LookupResult, StoreJob, Tier

log = logging.getLogger(__name__)

LOCAL = "local"


@dataclass
class _PendingStore:
    owner: str
    ns_id: int
    size: int
    keys: list[BlockKey]
    slots: list[int | None]
    status: list[BlockStatus]
    parent: BlockKey | None
    tier: Tier = Tier.DRAM


@dataclass
class _PendingLoad:
    owner: str
    keys: list[BlockKey]
    pin_owner: str
    sizes: list[int] = field(default_factory=list)


class Store(TierMoves):
    """A node's KV block pool over DRAM (+ optional NVMe, + later HBM) with one prefix index.

    Construct with :meth:`open` from a :class:`StoreConfig`, or pass ready tiers (tests).
    All sizes are bytes, all capacities slots (= blocks).
    """

    def __init__(self, config: StoreConfig, dram: MemoryTier, nvme: DiskTier | None = None,
                 hbm=None, *, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: seconds, for pin TTLs (tests pass a fake one). ``hbm``: an
        :class:`~tierstore.tiers.hbm.HbmTier` attached to ``dram`` (Store.open builds it)."""
        self.config = config
        self._lock = threading.RLock()
        self._nvme_lock = threading.RLock()       # every call into the NVMe tier (moves.py)
        self._promoting: set[BlockKey] = set()    # NVMe-only blocks being read into DRAM
        self._moved = threading.Condition(self._lock)   # notified when promotions finish
        self._reserved: Counter[Tier] = Counter()   # slots allocated, not in the index yet
        self._unlisted: Counter[Tier] = Counter()   # demotion victims out of their policy
        self.res = Residency()
        self.pins = PinBook(self.res, clock=clock)
        self.tiers: dict[Tier, MemoryTier | DiskTier] = {Tier.DRAM: dram}
        self.policies: dict[Tier, EvictionPolicy] = {
            Tier.DRAM: make_eviction(config.dram.policy, dram.num_slots)}
        self.admission: dict[Tier, AdmissionPolicy] = {}
        if nvme is not None:
            self.tiers[Tier.NVME] = nvme
            self.policies[Tier.NVME] = make_eviction(config.nvme.policy, nvme.num_slots)
            self.admission[Tier.NVME] = make_admission(config.nvme.admission)
        if hbm is not None:   # tiers/hbm.py: a torch slab with a copy engine to the DRAM slab
            self.tiers[Tier.HBM] = hbm
            self.policies[Tier.HBM] = make_eviction(config.hbm.policy if config.hbm else
                                                    config.dram.policy, hbm.num_slots)
        self.counters: Counter[str] = Counter()
        self._namespaces: list[Namespace | dict] = []   # by ns id; dict = known only from disk
        self._ns_digests: list[bytes] = []
        self._ns_ids: dict[bytes, int] = {}
        self._stores: dict[int, _PendingStore] = {}
        self._loads: dict[int, _PendingLoad] = {}
        self._pending_keys: set[BlockKey] = set()
        self._job_ids = itertools.count(1)
        self._closed = False
        self._recovery_reported = False
        if nvme is not None:
            self._recover_nvme(nvme)

    # ---------------------------------------------------------------- construction
    @classmethod
    def open(cls, config: StoreConfig, *, clock: Callable[[], float] = time.monotonic) -> "Store":
        """Build tiers from ``config`` and recover persisted NVMe content."""
        from tierstore.tiers.dram import DramTier

        if config.dram.payload:
            dram: MemoryTier = DramTier(config.dram.capacity_blocks, config.slot_bytes,
                                        shm_name=config.dram.shm_name)
        else:
            dram = NullTier(Tier.DRAM, config.dram.capacity_blocks, config.slot_bytes)
        nvme = None
        if config.nvme is not None and config.nvme.capacity_blocks > 0:
            from tierstore.tiers.nvme import NvmeTier

            n = config.nvme
            nvme = NvmeTier(n.path, n.capacity_blocks, config.slot_bytes, direct_io=n.direct_io,
                            compression=n.compression, file_slots=n.file_slots)
        hbm = None
        if config.hbm is not None and config.hbm.capacity_blocks > 0:
            if not config.dram.payload:
                raise ConfigError("an hbm tier needs a DRAM tier that holds bytes")
            from tierstore.tiers.hbm import HbmTier   # torch only where bytes meet a device

            hbm = HbmTier(config.hbm.capacity_blocks, dram.slot_bytes, device=config.hbm.device)
            if hbm.device.type == "cuda":   # pinned once at start, never on the hot path
                from tierstore.tiers.pinning import HostPinning, default_registrar, pin_buffer
                hbm.host_pinning = HostPinning(default_registrar())
                pin_buffer(hbm.host_pinning, dram.buffer, dram.capacity_bytes, dram.slot_bytes)
            hbm.attach_dram(dram)
        return cls(config, dram, nvme, hbm, clock=clock)

    def _recover_nvme(self, nvme: DiskTier) -> None:
        for digest, desc in nvme.namespaces().items():
            self._add_ns(digest, desc)
        pol = self.policies[Tier.NVME]
        duplicates: list[int] = []
        for e in nvme.recover():
            if e.key in self.res:   # two records of one key: keep the first, never fail to open
                duplicates.append(e.slot)
                continue
            ns_id = self._ns_ids.get(e.ns_digest)
            if ns_id is None:
                ns_id = self._add_ns(e.ns_digest, {"digest": e.ns_digest.hex()})
            h = self.res.add(e.key, ns_id, e.size, e.checksum)
            self.res.set_slot(h, Tier.NVME, e.slot)
            pol.insert(e.key, e.size, None)
            self.counters["nvme_recovered"] += 1
        if duplicates:
            log.warning("nvme: %d records repeat a key already recovered; deleted",
                        len(duplicates))
            nvme.delete_batch(duplicates)
            self.counters["nvme_recovery_duplicates"] += len(duplicates)

    # ---------------------------------------------------------------- namespaces
    def _add_ns(self, digest: bytes, ns: Namespace | dict) -> int:
        i = len(self._namespaces)
        self._ns_ids[digest] = i
        self._namespaces.append(ns)
        self._ns_digests.append(digest)
        return i

    def _ns_id(self, ns: Namespace) -> int:
        d = ns.digest()
        i = self._ns_ids.get(d)
        if i is not None:
            if isinstance(self._namespaces[i], dict):
                self._namespaces[i] = ns
            return i
        nvme = self.tiers.get(Tier.NVME)
        if nvme is not None:
            with self._nvme_lock:
                nvme.put_namespace(d, ns.describe())
        return self._add_ns(d, ns)

    def _ns_digest(self, ns_id: int) -> bytes:
        return self._ns_digests[ns_id]

    # ---------------------------------------------------------------- lookup and pins
    def lookup(self, keys: Sequence[BlockKey], namespace: Namespace, *, pin: bool = False,
               owner: str = LOCAL, ttl_s: float | None = None) -> LookupResult:
        """Longest resident prefix of ``keys``; with ``pin`` the hit blocks are pinned for
        ``owner`` in the same critical section (released by ``unpin`` or ``release_owner``).
        ``block_size`` of the result comes from ``namespace``."""
        with self._lock:
            self._expire()
            hs, codes = longest_prefix_tiers(self.res, keys)
            n = len(hs)
            if n and codes.count(codes[0]) == n:    # the common case: one tier for the whole hit
                tiers = (TIER_BY_VALUE[codes[0]],) * n
            else:
                tiers = tuple(map(TIER_BY_VALUE.__getitem__, codes))
            hit = tuple(keys[:n])
            if pin:
                for k in hit:
                    self.pins.pin(owner, k, ttl_s)
            self.counters["lookups"] += 1
            self.counters["lookup_hit_blocks"] += len(hs)
            self.counters["lookup_miss_blocks"] += len(keys) - len(hs)
            return LookupResult(hit, tiers, namespace.block_size, pinned=pin, owner=owner)

    def pin(self, keys: Iterable[BlockKey], owner: str = LOCAL, ttl_s: float | None = None) -> int:
        """Pin resident ``keys`` for ``owner``; returns how many were pinned (non-resident
        keys are skipped)."""
        n = 0
        with self._lock:
            self._expire()
            for k in keys:
                if k in self.res:
                    self.pins.pin(owner, k, ttl_s)
                    n += 1
        return n

    def unpin(self, keys: Iterable[BlockKey], owner: str = LOCAL) -> int:
        """Release one pin per key. Raises PinError on the first key ``owner`` holds no pin on;
        pins released before it stay released (each release is individually valid)."""
        n = 0
        with self._lock:
            self._expire()
            for k in keys:
                self.pins.unpin(owner, k)
                n += 1
        return n

    def release_owner(self, owner: str) -> dict:
        """A client went away: release its pins and abort its unfinished jobs."""
        with self._lock:
            released = self.pins.release_owner(owner)
            aborted = 0
            for jid in [j for j, p in self._stores.items() if p.owner == owner]:
                self.complete_store(jid, ok=False)
                aborted += 1
            for jid in [j for j, p in self._loads.items() if p.owner == owner]:
                self.complete_load(jid, ok=False)
                aborted += 1
            return {"pins_released": released, "jobs_aborted": aborted}

    def _expire(self) -> None:
        n = self.pins.expire()
        if n:
            self.counters["pins_expired"] += n

    # ---------------------------------------------------------------- store
    def prepare_store(self, keys: Sequence[BlockKey], namespace: Namespace, size_bytes: int, *,
                      owner: str = LOCAL, parent: BlockKey | None = None,
                      tier: Tier = Tier.DRAM) -> StoreJob:
        """Reserve DRAM slots for blocks of ``size_bytes`` each.

        Per key: ``PRESENT`` if resident or being stored by another job (nothing to write),
        ``SKIPPED`` if no slot could be freed (every victim pinned), else ``OK`` with a slot the
        caller fills through ``slot_view`` (``tier=Tier.HBM``: an HBM slot, filled through
        ``hbm_tensor``; raises ConfigError without an HBM tier). ``parent`` is the block before ``keys[0]`` in its
        chain (for prefix-aware policies). Raises RejectedError if ``size_bytes`` exceeds
        ``slot_bytes``.
        """
        if size_bytes > self.config.slot_bytes or size_bytes <= 0:
            raise RejectedError(f"block of {size_bytes} bytes does not fit slots of "
                                f"{self.config.slot_bytes} bytes")
        if tier not in (Tier.DRAM, Tier.HBM) or tier not in self.tiers:
            raise ConfigError(f"cannot store into tier {tier.label}: this store has no such tier")
        with self._lock:
            self._expire()
            ns_id = self._ns_id(namespace)
            slots: list[int | None] = []
            status: list[BlockStatus] = []
            target = self.tiers[tier]
            need = sum(1 for k in keys if k not in self.res and k not in self._pending_keys)
            short = need - target.slots.free_count
            if short > 0:   # DRAM victims go to NVMe with the lock released; re-checked below
                self._make_room(tier, short, unlocked_io=tier is Tier.DRAM)
            seen: set[BlockKey] = set()
            for k in keys:
                if k in self.res or k in self._pending_keys or k in seen:
                    slots.append(None)
                    status.append(BlockStatus.PRESENT)
                    continue
                s = self._alloc(tier)
                if s is None:
                    slots.append(None)
                    status.append(BlockStatus.SKIPPED)
                    self.counters["store_skipped"] += 1
                    continue
                seen.add(k)
                slots.append(s)
                status.append(BlockStatus.OK)
            self._pending_keys.update(seen)
            jid = next(self._job_ids)
            self._stores[jid] = _PendingStore(owner, ns_id, size_bytes, list(keys), slots, status,
                                              parent, tier)
            return StoreJob(jid, list(keys), slots, status, size_bytes, tier)

    def complete_store(self, job_id: int, ok: bool = True,
                       checksums: Sequence[int] | None = None) -> list[BlockStatus]:
        """Publish (``ok``) or abort the job. On publish the blocks become visible, NVMe
        write-through runs, and already-present keys count as accessed. Returns final statuses."""
        with self._lock:
            job = self._stores.pop(job_id, None)
            if job is None:
                raise JobError(f"unknown store job {job_id}")
            dram = self.tiers[Tier.DRAM]
            target = self.tiers[job.tier]
            pol = self.policies[job.tier]
            new: list[BlockKey] = []
            prev = job.parent
            for i, (k, s, st) in enumerate(zip(job.keys, job.slots, job.status)):
                if st is BlockStatus.OK:
                    self._pending_keys.discard(k)
                    if not ok:
                        target.free(s)
                        job.status[i] = BlockStatus.FAILED
                        prev = k
                        continue
                    h = self.res.add(k, job.ns_id, job.size, checksums[i] if checksums else 0)
                    self.res.set_slot(h, job.tier, s)
                    pol.insert(k, job.size, prev)
                    new.append(k)
                elif st is BlockStatus.PRESENT and ok:
                    self._touch(k)
                prev = k
            if ok:
                self.counters["stored_blocks"] += len(new)
                self.counters[f"{job.tier.label}_bytes_written"] += len(new) * job.size
                if new and job.tier is Tier.DRAM and self.config.nvme is not None \
                        and self.config.nvme.write_through \
                        and Tier.NVME in self.tiers and getattr(dram, "holds_bytes", True):
                    admitted = [k for k in new
                                if self.admission[Tier.NVME].admit(k, job.size).admitted]
                    self._write_nvme(admitted, unlocked_io=True)
            else:
                self.counters["stores_aborted"] += 1
            return list(job.status)

    def _touch(self, key: BlockKey) -> None:
        h = self.res.get(key)
        if h < 0:
            return
        t = self.res.nearest(h)
        if t is not None:
            self.policies[t].access(key)

    # ---------------------------------------------------------------- load
    def prepare_load(self, keys: Sequence[BlockKey], *, owner: str = LOCAL,
                     into: Tier = Tier.DRAM) -> LoadJob:
        """Pin and stage the longest loadable prefix of ``keys`` in tier ``into`` (DRAM, or HBM
        for a GPU reader; ConfigError if the store has no such tier).

        NVMe-only blocks are read into DRAM slots (promotion) and verified; blocks are then moved
        between HBM and DRAM to reach ``into`` (exclusive tiers: a move, not a copy). The job
        stops at the first block that is missing, corrupt or cannot be staged. The first
        ``num_ready`` blocks are readable through ``slot_view(slot)`` (``hbm_tensor(slot)`` for
        HBM) until ``complete_load``.
        """
        if into not in (Tier.DRAM, Tier.HBM) or into not in self.tiers:
            raise ConfigError(f"cannot load into tier {into.label}: this store has no such tier")
        with self._lock:
            self._expire()
            slot = self.res.slot
            while True:
                hs = longest_prefix(self.res, keys)
                if len(set(hs)) != len(hs):   # a repeated key ends the prefix (one slot each)
                    seen: set[int] = set()
                    for i, h in enumerate(hs):
                        if h in seen:
                            del hs[i:]
                            break
                        seen.add(h)
                # NVMe-only blocks, to be read into DRAM
                need = [i for i, h in enumerate(hs) if slot(h, Tier.DRAM) < 0
                        and (Tier.HBM not in self.tiers or slot(h, Tier.HBM) < 0)]
                if not any(keys[i] in self._promoting for i in need):
                    break
                self._moved.wait()   # another load is reading some of them: wait, then look again
                if self._closed:
                    raise JobError("the store was closed while this load waited for another")
            jid = next(self._job_ids)
            pin_owner = f"job:{jid}"
            status: list[BlockStatus] = [BlockStatus.MISSING] * len(keys)
            came_from = [self.res.nearest(h) for h in hs]
            for k in keys[: len(hs)]:
                self.pins.pin(pin_owner, k)
            # 1. NVMe-only blocks -> DRAM (the lock is released for the disk I/O)
            n_ok = len(hs)
            if need:
                promoting = [keys[i] for i in need]
                self._promoting.update(promoting)
                try:
                    n_ok = self._promote(keys, hs, need, status, unlocked_io=True)
                finally:
                    self._promoting.difference_update(promoting)
                    self._moved.notify_all()
            # 2. between HBM and DRAM, towards ``into``
            if Tier.HBM in self.tiers and n_ok:
                src = Tier.HBM if into is Tier.DRAM else Tier.DRAM
                move = [i for i in range(n_ok) if slot(hs[i], into) < 0]
                if move:
                    moved = self._move_hbm([keys[i] for i in move], down=into is Tier.DRAM)
                    for i, ok in zip(move, moved):
                        if not ok:
                            status[i] = BlockStatus.FAILED
                            n_ok = min(n_ok, i)
                            break
                    for i, ok in zip(move, moved):
                        if ok and self.config.exclusive and i < n_ok:
                            self._release_slot(keys[i], hs[i], src,
                                               own_pins=self.pins.held(pin_owner).get(keys[i], 0))
            slots: list[int] = []
            sizes: list[int] = []
            for i in range(n_ok):
                h = hs[i]
                slots.append(slot(h, into))
                sizes.append(self.res.size[h])
                status[i] = BlockStatus.OK
                if came_from[i] is into:
                    self.policies[into].access(keys[i])
                self.counters[f"load_hits_{came_from[i].label}"] += 1
            for k in keys[n_ok: len(hs)]:
                if self.pins.held(pin_owner).get(k):
                    self.pins.unpin(pin_owner, k)
            self.counters["loaded_blocks"] += n_ok
            self.counters["load_bytes"] += sum(sizes)
            self._loads[jid] = _PendingLoad(owner, list(keys[:n_ok]), pin_owner, sizes)
            return LoadJob(jid, list(keys), slots, status, sizes, into)

    def complete_load(self, job_id: int, ok: bool = True) -> None:
        """Release the job's pins. ``ok=False`` records a failed copy (counter only: the
        caller recomputes)."""
        with self._lock:
            job = self._loads.pop(job_id, None)
            if job is None:
                raise JobError(f"unknown load job {job_id}")
            self.pins.release_owner(job.pin_owner)   # a block left nowhere goes with it
            if not ok:
                self.counters["loads_failed"] += 1

    # ---------------------------------------------------------------- bytes
    def slot_view(self, slot: int) -> memoryview:
        """Writable view of a DRAM slot (``slot_bytes`` long) of a prepared job."""
        return self.tiers[Tier.DRAM].view(slot)

    def hbm_tensor(self, slot: int):
        """The ``[slot_bytes]`` uint8 torch view of an HBM slot of a prepared job (on the tier's
        device). Raises ConfigError without an HBM tier."""
        hbm = self.tiers.get(Tier.HBM)
        if hbm is None:
            raise ConfigError("this store has no hbm tier")
        return hbm.tensor(slot)

    def put(self, keys: Sequence[BlockKey], namespace: Namespace, blocks: Sequence[bytes | memoryview],
            *, owner: str = LOCAL, parent: BlockKey | None = None) -> list[BlockStatus]:
        """Convenience: prepare_store + copy + complete_store for equally sized blocks."""
        size = len(blocks[0]) if blocks else 0
        job = self.prepare_store(keys, namespace, size, owner=owner, parent=parent)
        for s, b in zip(job.slots, blocks):
            if s is not None:
                self.slot_view(s)[:size] = b
        return self.complete_store(job.job_id, ok=True)

    def get(self, keys: Sequence[BlockKey], *, owner: str = LOCAL) -> list[bytes]:
        """Convenience: bytes of the longest loadable prefix of ``keys`` (copies)."""
        job = self.prepare_load(keys, owner=owner)
        try:
            return [bytes(self.slot_view(s)[:n]) for s, n in zip(job.slots, job.sizes)]
        finally:
            self.complete_load(job.job_id)

    # ---------------------------------------------------------------- admin
    def evict(self, keys: Iterable[BlockKey]) -> dict:
        """Remove unpinned ``keys`` from every tier. Returns counts of evicted / pinned / missing."""
        out = Counter()
        with self._lock:
            self._expire()
            for k in keys:
                h = self.res.get(k)
                if h < 0:
                    out["missing"] += 1
                    continue
                if self.res.pins[h]:
                    out["pinned"] += 1
                    continue
                self._drop_block(k, h)
                out["evicted"] += 1
        return dict(out)

    def _drop_block(self, key: BlockKey, h: int) -> None:
        for t in list(self.res.tiers_of(h)):
            s = self.res.clear_slot(h, t)
            self.policies[t].remove(key)
            self._free(t, s)   # NVMe: deletes the record
        self.res.remove(h)

    def blocks(self, limit: int | None = None, tier: Tier | None = None) -> list[dict]:
        """One dict per resident block: key (hex), namespace, tiers, size, checksum, pins."""
        with self._lock:
            self._expire()
            out = []
            for k, h in self.res.handles():
                tiers = self.res.tiers_of(h)
                if tier is not None and tier not in tiers:
                    continue
                out.append(self._describe(k, h, tiers))
                if limit is not None and len(out) >= limit:
                    break
            return out

    def checksums(self, keys: Sequence[BlockKey], *, compute: bool = False) -> list[int]:
        """xxh3-64 of each resident block's payload; 0 when not resident, or when unknown
        (DRAM-only blocks get theirs when first written to NVMe). ``compute``: compute and record
        the unknown ones of blocks in DRAM now (one pass over their bytes; a peer lease does this
        so that the reader can verify every block)."""
        with self._lock:
            out = []
            dram = self.tiers[Tier.DRAM]
            for k in keys:
                h = self.res.get(k)
                c = self.res.checksum[h] if h >= 0 else 0
                if not c and compute and h >= 0 and getattr(dram, "holds_bytes", True) \
                        and self.res.slot(h, Tier.DRAM) >= 0:
                    import xxhash
                    c = xxhash.xxh3_64_intdigest(dram.view(self.res.slot(h, Tier.DRAM))[: self.res.size[h]])
                    self.res.checksum[h] = c
                out.append(c)
            return out

    def block(self, key: BlockKey) -> dict | None:
        """:meth:`blocks`' dict for one block, plus ``pin_owners``: one ``{owner, pins,
        expires_in_s}`` per owner holding a pin (``expires_in_s``: its nearest TTL, None if
        one of its pins has none)."""
        with self._lock:
            self._expire()
            h = self.res.get(key)
            if h < 0:
                return None
            d = self._describe(key, h, self.res.tiers_of(h))
            now = self.pins.now()
            owners = []
            for o, n in sorted(self.pins.owners_of(key).items()):
                dl = self.pins.deadlines(o, key)
                owners.append({"owner": o, "pins": n, "expires_in_s":
                               round(dl[0] - now, 3) if dl and len(dl) >= n else None})
            d["pin_owners"] = owners
            return d

    def _describe(self, k: BlockKey, h: int, tiers: list[Tier]) -> dict:
        ns = self._namespaces[self.res.ns[h]]
        nsd = ns.describe() if isinstance(ns, Namespace) else dict(ns)
        return {
            "key": k.hex(),
            "namespace": nsd,
            "tiers": [t.label for t in tiers],
            "slots": {t.label: self.res.slot(h, t) for t in tiers},
            "size_bytes": self.res.size[h],
            "checksum": f"{self.res.checksum[h]:016x}" if self.res.checksum[h] else None,
            "pins": self.res.pins[h],
        }

    def stats(self) -> dict:
        with self._lock:
            tiers = []
            for t, tier in self.tiers.items():
                u = tier.usage()
                u["blocks"] = len(self.policies[t])
                tiers.append(u)
            c = dict(self.counters)
            for t, tier in self.tiers.items():   # a copy: NVMe I/O may run beside this
                for name, v in dict(getattr(tier, "counters", {})).items():
                    c[f"{t.label}_{name}"] = v
            return {
                "blocks": len(self.res),
                "pinned_blocks": sum(1 for _, h in self.res.handles() if self.res.pins[h]),
                "pins": self.pins.total(),
                "pending_stores": len(self._stores),
                "pending_loads": len(self._loads),
                "tiers": tiers,
                "policies": {t.label: p.name for t, p in self.policies.items()},
                "counters": c,
            }

    def check(self, fix: bool = False) -> list[str]:
        """Verify the invariants (index vs tiers vs pins) and, with NVMe, every record's header
        and checksum. Returns one line per problem; ``fix`` repairs what can be repaired."""
        problems: list[str] = []
        with self._lock:
            for k, h in self.res.handles():
                ts = self.res.tiers_of(h)
                if not ts and not self.res.pins[h]:   # pinned: it goes with its last pin
                    problems.append(f"block {k.hex()[:16]} resident nowhere")
                for t in ts:
                    s = self.res.slot(h, t)
                    if not self.tiers[t].slots.is_used(s):
                        problems.append(f"block {k.hex()[:16]} points at free {t.label} slot {s}")
            for t, tier in self.tiers.items():
                n_index = sum(1 for _, h in self.res.handles() if self.res.slot(h, t) >= 0)
                pending = self._reserved[t] + sum(
                    1 for j in self._stores.values() if j.tier is t for s in j.slots if s is not None)
                used = tier.slots.used
                if used != n_index + pending:
                    problems.append(f"{t.label}: {used} slots used but index holds "
                                    f"{n_index} (+{pending} pending)")
                listed = len(self.policies[t]) + self._unlisted[t]
                if listed != n_index:
                    problems.append(f"{t.label}: eviction policy lists {listed} blocks but the "
                                    f"index holds {n_index}")
            if self.pins.total() != sum(self.res.pins[h] for _, h in self.res.handles()):
                problems.append("pin ledger and pin counts disagree")
            nvme = self.tiers.get(Tier.NVME)
            if nvme is not None:
                problems.extend(self._recovery_problems(nvme))
                with self._nvme_lock:
                    disk = nvme.check(fix=fix)
                problems.extend(f"nvme: {p}" for p in disk)
                if fix and disk:
                    self._resync_nvme()
        return problems

    def _recovery_problems(self, nvme: DiskTier) -> list[str]:
        """What start-up recovery had to drop, reported by the first check after open: committed
        entries whose record failed its check, vanished slab files, unknown files. Orphans (records
        written but never committed when a process died) are expected after a crash and lost
        nothing committed, so they are not problems."""
        if self._recovery_reported:
            return []
        self._recovery_reported = True
        rec = getattr(nvme, "last_recovery", None) or {}
        out = []
        if rec.get("dropped"):
            out.append(f"nvme: recovery at open dropped {rec['dropped']} entries whose record failed its check")
        if rec.get("missing_files"):
            out.append(f"nvme: recovery at open found slab files missing: {', '.join(rec['missing_files'])}")
        if rec.get("unknown_files"):
            out.append(f"nvme: recovery at open removed unknown files: {', '.join(map(str, rec['unknown_files']))}")
        return out

    def _resync_nvme(self) -> None:
        """After a disk repair, drop index entries whose NVMe record no longer exists."""
        nvme = self.tiers[Tier.NVME]
        for k, h in self.res.handles():
            s = self.res.slot(h, Tier.NVME)
            if s >= 0 and not nvme.slots.is_used(s):
                self.res.clear_slot(h, Tier.NVME)
                self.policies[Tier.NVME].remove(k)
                if self.res.nearest(h) is None and not self.res.pins[h]:
                    self.res.remove(h)

    def close(self) -> None:
        """Abort unfinished jobs, release resources. Idempotent."""
        with self._lock:
            if self._closed:
                return
            for jid in list(self._stores):
                self.complete_store(jid, ok=False)
            for jid in list(self._loads):
                self.complete_load(jid, ok=False)
            hbm = self.tiers.get(Tier.HBM)
            if hbm is not None:   # its copy engine holds views of the DRAM slab: close it first
                hbm.close()
                pinning = getattr(hbm, "host_pinning", None)
                if pinning is not None:
                    pinning.unpin()
            for t, tier in self.tiers.items():
                if t is not Tier.HBM:
                    with self._tier_lock(t):   # waits for NVMe I/O in flight
                        tier.close()
            self._closed = True

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
