"""Store: the one lock, the invariants, the two-phase API (DESIGN §3, §8).

The store owns the index (:mod:`tierstore.index`), one eviction policy per tier, the placement
policy (:mod:`tierstore.policy.placement`), the tiers, the mover that evicts and moves blocks
between them over that state (:mod:`tierstore.moves`, handed it at construction), the flusher
that writes NVMe copies behind the callers (:mod:`tierstore.writebehind`) and the loader thread
that stages asynchronous loads. Policies decide which block leaves and where it goes; tiers move
bytes; the store keeps these invariants:

1. A block is visible to ``lookup`` only after ``complete_store(ok=True)`` (or its own entry of
   a per-block ``ok``); a failed or aborted store publishes nothing and frees its slots.
2. A pinned block is never evicted, demoted or promoted away (pins live in the index's PinBook,
   per owner; a dead owner's pins go with ``release_owner``).
3. NVMe holds a clean copy of every DRAM block it admitted: ``complete_store`` queues new DRAM
   blocks for the flusher and returns; a load that reads a block from NVMe keeps its record; so
   a DRAM victim is dropped without a write. Between HBM and DRAM tiers are exclusive
   (``StoreConfig.exclusive``): HBM victims move down, a load into HBM moves blocks up. These
   placement rules live in one pure object, :class:`~tierstore.policy.placement.Placement`
   (``self.placement``), that the store and tierstore/moves.py ask.
4. A load returns an exact prefix: it stops at the first block that is missing or fails its
   checksum (a miss plus a counter, never wrong bytes).
5. Nothing a serving engine calls waits for the disk: ``prepare_store`` never writes (victims are
   clean), ``complete_store`` queues, ``prepare_load(wait=False)`` hands NVMe reads to the
   loader thread (``poll_loads``). ``flush()`` is the one call that waits for durability.

Flow of one request as a prefill node sees it::

    lookup(keys, pin=True) -> hit prefix ──▶ prepare_load(hit) -> DRAM slots ──▶ copy out ──▶ complete_load
                            └─ rest ──────▶ prepare_store(rest) -> DRAM slots ──▶ copy in ──▶ complete_store
                                                                          flusher: NVMe copy ─┘

Threading: every public method takes ``self._lock`` (an RLock); byte copies by callers into or
out of the slots of a prepared job happen outside the lock, protected by the job's pins (loads)
or by the slots not being published yet (stores). Two threads of the store's own: the flusher
(``tierstore-flush``, writebehind.py) and the loader (``tierstore-load``, one worker), both
started on first use and stopped by ``close``. NVMe reads and writes run with the lock
released (``_nvme_lock`` held instead), so lookups and DRAM hits of other threads do not wait
for the disk; what keeps the index consistent meanwhile is in tierstore/moves.py's docstring.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from tierstore import counter_names as cn
from tierstore.config import StoreConfig
from tierstore.errors import ConfigError, JobError, PinError, RejectedError
from tierstore.events import STORED, EventLog, check_engine_blobs, decode_engine_block
from tierstore.index.prefix import longest_prefix, longest_prefix_tiers, nearest_codes
from tierstore.index.residency import NOWHERE, REQUEST_SEP, TIER_BY_VALUE, PinBook, Residency
from tierstore.keys import Namespace, resolve_prefixes
from tierstore.moves import TierMover
from tierstore.policy import make_admission, make_eviction
from tierstore.policy.interface import AdmissionPolicy, EvictionPolicy
from tierstore.policy.placement import Placement
from tierstore.retention import Retention, RetentionConfig
from tierstore.tiers.slot_tier import DiskTier, MemoryTier, NullTier
from tierstore.types import (BlockKey, BlockStatus, LoadJob, LookupResult, StoreJob, Tier,
                             check_keys)
from tierstore.writebehind import WriteBehind

log = logging.getLogger(__name__)

LOCAL = "local"
# engine token accounting (account_tokens, case MET-38): the outcomes and tiers an engine reports
TOKEN_OUTCOMES = cn.TOKEN_OUTCOMES
TOKEN_TIERS = cn.TOKEN_TIERS


def token_hit_ratio(counters: dict) -> float:
    """Delivered tokens / looked-up tokens (0.0 before any lookup): what engines got, not what
    lookups found or what was promised (case MET-38)."""
    looked = counters.get(cn.LOOKUP_TOKENS, 0)
    got = sum(v for k, v in counters.items() if k.startswith(cn.TOKENS_DELIVERED_PREFIX))
    return round(got / looked, 6) if looked else 0.0
_NEAR = {**TIER_BY_VALUE, NOWHERE: None}   # Residency.near code -> nearest tier
STALE_JOB_S = 600.0
"""A job prepared longer ago than this (seconds) and never completed is reported by ``check``
(its store keys answer PRESENT and never become visible; a load's pins hold its blocks) and
aborted by ``check(fix=True)``: an embedded caller that lost a job has no connection whose end
would abort it (issue 13 item 12, the kind)."""
PUT_WAIT_S = 60.0
"""How long ``put`` (a bulk writer's convenience, never the engine's path) waits for room in
the NVMe write-behind queue before blocks are SKIPPED."""


def _parents_first(items: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """``(handle, engine blob)`` pairs ordered so that a block whose parent is among them comes
    after it (recovery lists blocks in slot order; routers like chains announced root first)."""
    decoded = {}
    for h, m in items:
        try:
            decoded[h] = decode_engine_block(m)
        except ValueError:
            decoded[h] = None
    by_hash = {e.hash: h for h, e in decoded.items() if e is not None}
    blob = dict(items)
    out: list[tuple[int, bytes]] = []
    done: set[int] = set()
    for h, _ in items:
        chain = []
        while h is not None and h not in done:
            chain.append(h)
            done.add(h)
            e = decoded.get(h)
            h = by_hash.get(e.parent) if e is not None and e.parent is not None else None
        out.extend((x, blob[x]) for x in reversed(chain))
    return out


def fill_store_job(backend, job: StoreJob, blocks: Sequence[bytes | memoryview],
                   size: int) -> list[BlockStatus]:
    """The copy half of ``put`` on either client backend (this store, or the daemon's
    RemoteClient): copy ``blocks[i]`` (``size`` bytes each) into ``backend.slot_view`` of each
    reserved slot of ``job``, then ``complete_store``. A copy that raises aborts the job
    (``complete_store(ok=False)``: nothing is published) and re-raises. A count of blocks
    other than of keys aborts the job too (RejectedError): an unwritten slot must never be
    published under a key."""
    if len(blocks) != len(job.keys):
        backend.complete_store(job.job_id, ok=False)
        raise RejectedError(f"put: {len(blocks)} blocks for {len(job.keys)} keys")
    try:
        for s, b in zip(job.slots, blocks):
            if s is not None:
                backend.slot_view(s)[:size] = b
    except BaseException:
        backend.complete_store(job.job_id, ok=False)
        raise
    return backend.complete_store(job.job_id, ok=True)


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
    budget: int = 0          # write-behind bytes reserved per OK block (0: none reserved)
    started_s: float = 0.0   # the store's clock at prepare (check reports stale jobs)
    engine: list[bytes | None] | None = None   # per key: engine metadata (tierstore/events.py)


@dataclass
class _PendingLoad:
    owner: str
    keys: list[BlockKey]
    pin_owner: str
    sizes: list[int] = field(default_factory=list)
    result: LoadJob | None = None    # set once staged (at once, or by the loader thread)
    cancelled: bool = False          # complete_load came while the loader was still staging
    started_s: float = 0.0           # the store's clock at prepare (check reports stale jobs)


class Store:
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
        self.res = Residency()
        self.pins = PinBook(self.res, clock=clock)
        self._clock = clock
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
        self.placement = Placement.of(self.tiers, exclusive=config.exclusive)
        self.counters: Counter[str] = Counter()
        # retention hints: session pins bounded per tenant (tierstore/retention.py)
        self.retention = Retention(self.pins, self.res, dram.num_slots, self.counters)
        self._namespaces: list[Namespace | dict] = []   # by ns id; dict = known only from disk
        self._ns_digests: list[bytes] = []
        self._ns_ids: dict[bytes, int] = {}
        self._stores: dict[int, _PendingStore] = {}
        self._loads: dict[int, _PendingLoad] = {}
        self._pending_keys: set[BlockKey] = set()
        self._job_ids = itertools.count(1)
        self._closed = False
        self._closing = False
        self._recovery_reported = False
        self._loader: ThreadPoolExecutor | None = None   # stages asynchronous loads (NVMe reads)
        if nvme is not None or Tier.HBM in self.tiers:
            # started now, not on the first asynchronous load: starting a thread costs 2-3 ms,
            # which the first engine step that loads from NVMe would pay
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="tierstore-load")
            self._loader.submit(int)
        self._wb: WriteBehind | None = None
        if nvme is not None and dram.holds_bytes:
            # NVMe holds a clean copy of every DRAM block; what waits for it (pinned) is bounded,
            # at most half of DRAM, so loads always find slots to stage NVMe blocks in
            queue_bytes = min(config.nvme.write_queue_bytes if config.nvme else 1 << 30,
                              max(config.slot_bytes, dram.num_slots * config.slot_bytes // 2))
            self._wb = WriteBehind(self, max_queue_bytes=queue_bytes)
        # eviction and tier-to-tier moves (tierstore/moves.py), over the state above
        self.mover = TierMover(res=self.res, pins=self.pins, tiers=self.tiers,
                               policies=self.policies, counters=self.counters,
                               placement=self.placement, lock=self._lock,
                               nvme_lock=self._nvme_lock, reserved=self._reserved,
                               ns_digest=self._ns_digest, is_closed=lambda: self._closed,
                               wb=self._wb)
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
        nvme = hbm = None
        try:   # a refused open gives back what it built (a DRAM slab in /dev/shm: issue 13 item 18)
            if config.nvme is not None and config.nvme.capacity_blocks > 0:
                from tierstore.tiers.nvme import NvmeTier

                n = config.nvme
                nvme = NvmeTier(n.path, n.capacity_blocks, config.slot_bytes,
                                direct_io=n.direct_io, compression=n.compression,
                                file_slots=n.file_slots)
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
        except BaseException:
            for tier in (hbm, nvme, dram):
                if tier is not None:
                    try:
                        tier.close()
                    except Exception:   # the first error is the one to report
                        log.exception("closing a tier of a store that failed to open")
            raise

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
            h = self.res.add(e.key, ns_id, e.size, e.checksum, meta=e.meta)
            self.res.set_slot(h, Tier.NVME, e.slot)
            pol.insert(e.key, e.size, None)
            self.counters[cn.NVME_RECOVERED] += 1
        if duplicates:
            log.warning("nvme: %d records repeat a key already recovered; deleted",
                        len(duplicates))
            nvme.delete_batch(duplicates)
            self.counters[cn.NVME_RECOVERY_DUPLICATES] += len(duplicates)

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
        ``block_size`` of the result comes from ``namespace``. Raises RejectedError for keys of
        the wrong length."""
        check_keys(keys)
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
            self.counters[cn.LOOKUPS] += 1
            self.counters[cn.LOOKUP_HIT_BLOCKS] += len(hs)
            self.counters[cn.LOOKUP_MISS_BLOCKS] += len(keys) - len(hs)
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
        """Release one pin of ``owner`` per key, all or nothing: every key is checked before
        any pin is released, so an unpin that names a key ``owner`` holds no pin on (its lease
        expired, or it was released already) raises PinError and releases nothing (issue 13
        item 14). Returns the number released."""
        with self._lock:
            self._expire()
            return self.pins.unpin_all(owner, list(keys))

    def unpin_each(self, keys: Iterable[BlockKey], owner: str = LOCAL) -> list[bool]:
        """Release one pin of ``owner`` on each key that holds one, in one call (the batched,
        per-key form of :meth:`unpin`: a key listed twice releases two). Returns one bool per
        key, in order: True when a pin was released, False when ``owner`` held none on it (its
        lease expired, it was released already, the block is gone); never raises for those."""
        out: list[bool] = []
        with self._lock:
            self._expire()
            for k in keys:
                try:
                    self.pins.unpin(owner, k)
                except PinError:
                    out.append(False)
                else:
                    out.append(True)
        return out

    def release_owner(self, owner: str) -> dict:
        """A client went away: release its pins, the pins of every request under it
        (``<owner>/req:<id>``, see :func:`~tierstore.index.residency.request_owner`) and abort
        its unfinished jobs. Also the way to release one request's pins at once:
        ``release_owner(request_owner(owner, id))``."""
        with self._lock:
            released = self.pins.release_owner(owner)
            sub = owner + REQUEST_SEP
            for o in [o for o in self.pins.owners() if o.startswith(sub)]:
                released += self.pins.release_owner(o)
            aborted = 0
            if self._wb is not None:
                self._wb.forget_owner(owner)
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
            self.counters[cn.PINS_EXPIRED] += n

    def retain(self, keys: Iterable[BlockKey], *, session: str, tenant: str = "",
               ttl_s: float, priority: int = 0) -> dict:
        """A retention hint (issue 15 item 5): pin the resident ``keys`` for ``session`` of
        ``tenant`` (a cache salt, "" = none) for ``ttl_s`` seconds, refreshing the session's
        other pins to the same deadline; bounded by the tenant's cap and the total
        (tierstore/retention.py: the rules, priority, case TEN-39). Never waits; a hint over a
        cap pins what fits and counts the rest as refused. ``ttl_s`` 0 ends the session.
        Returns ``{pinned, refused, held, displaced, ttl_s, cap, tenant}``; PinError for a bad
        session id, TTL or priority."""
        with self._lock:
            self._expire()
            return self.retention.hint(keys, session=session, tenant=tenant, ttl_s=ttl_s,
                                       priority=priority)

    def configure_retention(self, config: RetentionConfig) -> list[str]:
        """Set the bounds of retention hints (ConfigError when they cannot hold for this
        store's DRAM tier, and nothing changes); returns warnings (oversubscribed caps)."""
        with self._lock:
            return self.retention.configure(config)

    def _refuse_closed(self) -> None:
        if self._closed or self._closing:
            raise JobError("the store is closed")

    # ---------------------------------------------------------------- store
    def prepare_store(self, keys: Sequence[BlockKey], namespace: Namespace, size_bytes: int, *,
                      owner: str = LOCAL, parent: BlockKey | None = None,
                      tier: Tier = Tier.DRAM, wait_s: float = 0.0,
                      engine: Sequence[bytes | None] | None = None) -> StoreJob:
        """Reserve DRAM slots for blocks of ``size_bytes`` each.

        Per key: ``PRESENT`` if resident or being stored by another job (nothing to write),
        ``SKIPPED`` if no slot could be freed (every victim pinned), else ``OK`` with a slot the
        caller fills through ``slot_view`` (``tier=Tier.HBM``: an HBM slot, filled through
        ``hbm_tensor``; raises ConfigError without an HBM tier). ``parent`` is the block before
        ``keys[0]`` in its chain (for prefix-aware policies). Never does disk I/O: DRAM victims
        are dropped (NVMe holds their clean copy). With NVMe, a block is also SKIPPED when the
        bytes still waiting for their NVMe copy would pass ``nvme.write_queue_bytes``
        (writebehind.py: admission instead of waiting). ``wait_s`` (seconds, default 0: a serving
        engine never waits) lets a bulk writer (``put``, replay, CLI) wait that long for the
        queue to drain first: a bounded throttle. ``engine``: per key, the engine's identity of
        the block (:func:`tierstore.events.engine_block`, or None), kept with the block and
        persisted beside its NVMe record so KV events can name it (tierstore/events.py). Raises
        RejectedError if ``size_bytes`` exceeds ``slot_bytes``, a key is not 32 bytes long or
        ``engine`` does not match the keys.
        """
        if size_bytes > self.config.slot_bytes or size_bytes <= 0:
            raise RejectedError(f"block of {size_bytes} bytes does not fit slots of "
                                f"{self.config.slot_bytes} bytes")
        check_keys(keys)
        if parent is not None:
            check_keys((parent,), what="parent key")
        try:
            engine = check_engine_blobs(engine, len(keys))
        except ValueError as e:
            raise RejectedError(str(e)) from None
        if tier not in (Tier.DRAM, Tier.HBM) or tier not in self.tiers:
            raise ConfigError(f"cannot store into tier {tier.label}: this store has no such tier")
        with self._lock:
            self._refuse_closed()
            self._expire()
            ns_id = self._ns_id(namespace)
            slots: list[int | None] = []
            status: list[BlockStatus] = []
            target = self.tiers[tier]
            need = sum(1 for k in keys if k not in self.res and k not in self._pending_keys)
            wb = self._wb if self.placement.copies_to_nvme(tier) else None
            force = False
            if wb is not None and wait_s > 0 and need:
                # a bulk writer: wait for room (the lock is released meanwhile), then take the
                # whole job even past the bound
                force = wb.wait_room(need * size_bytes, wait_s)
                self._refuse_closed()
                need = sum(1 for k in keys if k not in self.res and k not in self._pending_keys)
            short = need - target.slots.free_count
            if short > 0:   # one eviction pass for the whole job; no disk write
                self.mover.make_room(tier, short)
            seen: set[BlockKey] = set()
            for k in keys:
                if k in self.res or k in self._pending_keys or k in seen:
                    slots.append(None)
                    status.append(BlockStatus.PRESENT)
                    continue
                if wb is not None and not wb.reserve(size_bytes, force=force):
                    slots.append(None)   # the NVMe write-behind queue is full: no waiting
                    status.append(BlockStatus.SKIPPED)
                    self.counters[cn.STORE_SKIPPED_WRITE_QUEUE] += 1
                    continue
                s = self.mover.alloc(tier)
                if s is None:
                    if wb is not None:
                        wb.release(size_bytes)
                    slots.append(None)
                    status.append(BlockStatus.SKIPPED)
                    self.counters[cn.STORE_SKIPPED] += 1
                    continue
                seen.add(k)
                slots.append(s)
                status.append(BlockStatus.OK)
            self._pending_keys.update(seen)
            jid = next(self._job_ids)
            self._stores[jid] = _PendingStore(owner, ns_id, size_bytes, list(keys), slots, status,
                                              parent, tier, size_bytes if wb is not None else 0,
                                              self._clock(), engine)
            return StoreJob(jid, list(keys), slots, status, size_bytes, tier)

    def complete_store(self, job_id: int, ok: bool | Sequence[bool] = True,
                       checksums: Sequence[int] | None = None) -> list[BlockStatus]:
        """Publish (``ok``) or abort the job; returns final statuses.

        ``ok`` is one answer for the whole job, or one per key (``len(keys)``): a block whose
        answer is False is freed and reported FAILED (its bytes are not trusted: the copy into
        its slot failed or was not made), the others are published. Published blocks become
        visible to lookups at once; their NVMe copy is written behind the caller
        (tierstore/writebehind.py: :meth:`flush` waits for it). Already-present keys count as
        accessed. Raises JobError for an unknown job, ValueError for a per-key list of the
        wrong length."""
        with self._lock:
            job = self._stores.get(job_id)
            if job is None:
                raise JobError(f"unknown store job {job_id}")
            if isinstance(ok, bool):
                oks = [ok] * len(job.keys)
            else:
                oks = [bool(x) for x in ok]
                if len(oks) != len(job.keys):
                    raise ValueError(f"complete_store: {len(oks)} answers for {len(job.keys)} keys")
            del self._stores[job_id]
            target = self.tiers[job.tier]
            pol = self.policies[job.tier]
            new: list[BlockKey] = []
            prev = job.parent
            failed = 0
            for i, (k, s, st) in enumerate(zip(job.keys, job.slots, job.status)):
                if st is BlockStatus.OK:
                    self._pending_keys.discard(k)
                    if not oks[i] or self._closed:
                        if job.budget and self._wb is not None:
                            self._wb.release(job.budget)
                        target.free(s)
                        job.status[i] = BlockStatus.FAILED
                        failed += 1
                        prev = k
                        continue
                    h = self.res.add(k, job.ns_id, job.size, checksums[i] if checksums else 0,
                                     meta=job.engine[i] if job.engine else None)
                    self.res.set_slot(h, job.tier, s)
                    pol.insert(k, job.size, prev)
                    new.append(k)
                elif st is BlockStatus.PRESENT and oks[i]:
                    self._touch(k)
                    if job.engine and job.engine[i] is not None and k in self.res:
                        self.res.set_meta(self.res.get(k), job.engine[i])
                prev = k
            if new:
                self.counters[cn.STORED_BLOCKS] += len(new)
                self.counters[cn.BYTES_WRITTEN_OF[job.tier]] += len(new) * job.size
                if job.budget and self._wb is not None:
                    admitted = [k for k in new
                                if self.admission[Tier.NVME].admit(k, job.size).admitted]
                    if len(admitted) < len(new):
                        self.counters[cn.NVME_ADMISSION_REJECTS] += len(new) - len(admitted)
                        self._wb.release(job.budget * (len(new) - len(admitted)))
                    self._wb.accept(admitted, reserved=True, owner=job.owner)
            if failed and not any(oks):
                self.counters[cn.STORES_ABORTED] += 1
            elif failed:
                self.counters[cn.STORE_BLOCKS_FAILED] += failed
            return list(job.status)

    def _touch(self, key: BlockKey) -> None:
        h = self.res.get(key)
        if h < 0:
            return
        t = self.res.nearest(h)
        if t is not None:
            self.policies[t].access(key)
        if t is not Tier.NVME and self.res.slot(h, Tier.NVME) >= 0:
            self.mover.touch_nvme((key,))

    def flush(self, timeout_s: float | None = None, owner: str = LOCAL) -> bool:
        """Wait until every block stored before this call has its NVMe copy written (record,
        ``fdatasync``, LMDB commit) or was given up (a failed write: counted). True when every
        block ``owner`` stored (since its previous flush) got its copy; False when one did not
        (its write failed, also before this call) or ``timeout_s`` (seconds) ran out. A store
        without NVMe returns True at once."""
        with self._lock:
            if self._wb is None:
                return True
            return self._wb.flush(timeout_s, owner=owner)

    # ---------------------------------------------------------------- load
    def prepare_load(self, keys: Sequence[BlockKey], *, owner: str = LOCAL,
                     into: Tier = Tier.DRAM, wait: bool = True) -> LoadJob:
        """Pin and stage the longest loadable prefix of ``keys`` in tier ``into`` (DRAM, or HBM
        for a GPU reader; ConfigError if the store has no such tier).

        NVMe-only blocks are read into DRAM slots (promotion; the NVMe record stays: a clean
        copy) and verified; blocks are then moved between HBM and DRAM to reach ``into``. The job
        stops at the first block that is missing, corrupt or cannot be staged. The first
        ``num_ready`` blocks are readable through ``slot_view(slot)`` (``hbm_tensor(slot)`` for
        HBM) until ``complete_load``.

        ``wait=False`` never waits for the disk: the resident prefix is pinned at once
        (``expected`` blocks) and, when a block must be read from NVMe or moved, the job is
        staged by the store's loader thread; the returned job then has ``ready`` False and no
        slots — :meth:`poll_loads` / :meth:`wait_load` give the staged job. A staged job may
        hold fewer than ``expected`` blocks (a read failed or a record was corrupt; counted).
        Raises RejectedError for keys of the wrong length.
        """
        check_keys(keys)
        if into not in (Tier.DRAM, Tier.HBM) or into not in self.tiers:
            raise ConfigError(f"cannot load into tier {into.label}: this store has no such tier")
        with self._lock:
            self._refuse_closed()
            self._expire()
            hs = self._loadable_prefix(keys)
            jid = next(self._job_ids)
            pin_owner = f"job:{jid}"
            self.pins.pin_many(pin_owner, keys[: len(hs)], hs)
            pl = _PendingLoad(owner, list(keys[: len(hs)]), pin_owner, started_s=self._clock())
            self._loads[jid] = pl
            if wait or not self._needs_staging(hs, into):
                return self._stage_load(jid, pl, list(keys), into, unlocked_io=wait)
            # staging needs an NVMe or HBM tier, and a store with one starts its loader at open
            self._loader.submit(self._stage_async, jid, pl, list(keys), into)
            self.counters[cn.LOADS_ASYNC] += 1
            return LoadJob(jid, list(keys), [], [BlockStatus.MISSING] * len(keys), [], into,
                           ready=False, expected=len(hs), sources=nearest_codes(self.res, hs))

    def _loadable_prefix(self, keys: Sequence[BlockKey]) -> list[int]:
        hs = longest_prefix(self.res, keys)
        if len(set(hs)) != len(hs):   # a repeated key ends the prefix (one slot each)
            seen: set[int] = set()
            for i, h in enumerate(hs):
                if h in seen:
                    del hs[i:]
                    break
                seen.add(h)
        return hs

    def _needs_staging(self, hs: list[int], into: Tier) -> bool:
        """Whether a load of ``hs`` must read NVMe or move blocks between HBM and DRAM."""
        slots = self.res.slots[into]
        return any(slots[h] < 0 for h in hs)

    def _stage_async(self, jid: int, pl: _PendingLoad, keys: list[BlockKey], into: Tier) -> None:
        """The loader thread: stage one asynchronous load (see :meth:`prepare_load`)."""
        with self._lock:
            try:
                if self._closing or self._closed:
                    raise JobError("the store was closed before this load was staged")
                self._stage_load(jid, pl, keys, into, unlocked_io=True)
            except Exception as e:   # the job ends with nothing ready; its pins go
                if not isinstance(e, JobError):
                    log.exception("loader: staging load job %d failed", jid)
                self.counters[cn.LOADS_FAILED] += 1
                self.pins.release_owner(pl.pin_owner)
                pl.keys = []
                pl.result = LoadJob(jid, keys, [], [BlockStatus.FAILED] * len(keys), [], into)
            if pl.cancelled:   # complete_load came first: release now
                self._loads.pop(jid, None)
                self.pins.release_owner(pl.pin_owner)
            self._moved.notify_all()

    def _stage_load(self, jid: int, pl: _PendingLoad, keys: list[BlockKey], into: Tier, *,
                    unlocked_io: bool) -> LoadJob:
        """Promote and move the pinned prefix ``pl.keys`` towards ``into``; sets and returns
        ``pl.result``. Called with the store lock held (released for NVMe reads when
        ``unlocked_io``, and while waiting for another load that promotes the same blocks)."""
        slot = self.res.slot
        pin_owner = pl.pin_owner
        while True:
            # pinned blocks stay resident, unless a corrupt record of theirs was dropped
            hs = self._loadable_prefix(pl.keys)
            dram_slots = self.res.slots[Tier.DRAM]
            if Tier.HBM in self.tiers:
                hbm_slots = self.res.slots[Tier.HBM]
                need = [i for i, h in enumerate(hs) if dram_slots[h] < 0 and hbm_slots[h] < 0]
            else:
                need = [i for i, h in enumerate(hs) if dram_slots[h] < 0]
            if not any(pl.keys[i] in self._promoting for i in need):
                break
            self._moved.wait()   # another load is reading some of them: wait, then look again
            if self._closed:
                raise JobError("the store was closed while this load waited for another")
        status: list[BlockStatus] = [BlockStatus.MISSING] * len(keys)
        near = self.res.near
        came_from = [_NEAR[near[h]] for h in hs]
        # 1. NVMe-only blocks -> DRAM (the lock is released for the disk I/O)
        n_ok = len(hs)
        if need:
            promoting = [keys[i] for i in need]
            self._promoting.update(promoting)
            try:
                n_ok = self.mover.promote(keys, hs, need, status, unlocked_io=unlocked_io)
            finally:
                self._promoting.difference_update(promoting)
                self._moved.notify_all()
        # 2. between HBM and DRAM, towards ``into``
        if Tier.HBM in self.tiers and n_ok:
            src = Tier.HBM if into is Tier.DRAM else Tier.DRAM
            move = [i for i in range(n_ok) if slot(hs[i], into) < 0]
            if move:
                moved = self.mover.move_hbm([keys[i] for i in move], down=into is Tier.DRAM)
                for i, ok in zip(move, moved):
                    if not ok:
                        status[i] = BlockStatus.FAILED
                        n_ok = min(n_ok, i)
                        break
                if not self.placement.keeps_source(src, into):   # exclusive: the source goes
                    for i, ok in zip(move, moved):
                        if ok and i < n_ok:
                            self.mover.release_slot(keys[i], hs[i], src,
                                               own_pins=self.pins.held(pin_owner).get(keys[i], 0))
                if self._wb is not None and self.placement.copies_to_nvme(into):   # NVMe copy follows
                    self._wb.accept(keys[i] for i, ok in zip(move, moved) if ok)
        hs_ok = hs[:n_ok]
        slots_into, size = self.res.slots[into], self.res.size
        slots = [slots_into[h] for h in hs_ok]
        sizes = [size[h] for h in hs_ok]
        status[:n_ok] = [BlockStatus.OK] * n_ok
        pol = self.policies[into]
        for i in range(n_ok):
            if came_from[i] is into:
                pol.access(keys[i])
        if Tier.NVME in self.tiers:   # NVMe's order follows every hit (applied when it evicts)
            nv = self.res.slots[Tier.NVME]
            self.mover.touch_nvme([keys[i] for i in range(n_ok)
                              if came_from[i] is not Tier.NVME and nv[hs[i]] >= 0])
        for t, c in Counter(came_from[:n_ok]).items():
            self.counters[cn.LOAD_HITS_OF[t]] += c
        held = self.pins.held(pin_owner)
        for k in pl.keys[n_ok:]:
            if held.get(k):
                self.pins.unpin(pin_owner, k)
                held[k] -= 1
        self.counters[cn.LOADED_BLOCKS] += n_ok
        self.counters[cn.LOAD_BYTES] += sum(sizes)
        if n_ok < len(pl.keys):
            self.counters[cn.LOAD_SHORT_BLOCKS] += len(pl.keys) - n_ok
        pl.keys, pl.sizes = list(keys[:n_ok]), sizes
        pl.result = LoadJob(jid, list(keys), slots, status, sizes, into,
                            expected=len(hs), sources=bytes(near[h] for h in hs))
        return pl.result

    def poll_loads(self, job_ids: Iterable[int]) -> dict[int, LoadJob]:
        """The staged jobs among ``job_ids`` (``ready`` True); jobs still staging are left out.
        Raises JobError for a job id that is not pending.

        Takes no lock (a scheduler polls this every step, and the loader thread holds the store
        lock while it installs a staged job): ``pl.result`` is assigned once, complete, after
        staging, and a dict lookup is atomic, so a poll sees a job either still staging or
        done."""
        out: dict[int, LoadJob] = {}
        loads = self._loads
        for jid in job_ids:
            pl = loads.get(jid)
            if pl is None:
                raise JobError(f"unknown load job {jid}")
            res = pl.result
            if res is not None:
                out[jid] = res
        return out

    def wait_load(self, job_id: int, timeout_s: float | None = None) -> LoadJob | None:
        """Block until load ``job_id`` is staged; the job, or None when ``timeout_s`` (seconds)
        ran out. Raises JobError for an unknown job."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while True:
                pl = self._loads.get(job_id)
                if pl is None:
                    raise JobError(f"unknown load job {job_id}")
                if pl.result is not None:
                    return pl.result
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._moved.wait(left if left is not None else 1.0)

    def complete_load(self, job_id: int, ok: bool = True) -> None:
        """Release the job's pins. ``ok=False`` records a failed copy (counter only: the
        caller recomputes). A job still staging is released when its staging ends."""
        with self._lock:
            job = self._loads.get(job_id)
            if job is None:
                raise JobError(f"unknown load job {job_id}")
            if not ok:
                self.counters[cn.LOADS_FAILED] += 1
            if job.result is None:
                job.cancelled = True
                return
            del self._loads[job_id]
            self.pins.release_owner(job.pin_owner)   # a block left nowhere goes with it

    # ---------------------------------------------------------------- batches (one call each)
    def prepare_loads(self, chains: Sequence[Sequence[BlockKey]], *, owner: str = LOCAL,
                      into: Tier = Tier.DRAM, wait: bool = False) -> list[LoadJob]:
        """:meth:`prepare_load` of several chains (e.g. one per TP rank) in one call;
        ``wait=False`` by default (this is the engine's path)."""
        return self._all_or_none(
            (lambda c=c: self.prepare_load(c, owner=owner, into=into, wait=wait) for c in chains),
            self._loads, self.complete_load)

    def _all_or_none(self, prepares: Iterable[Callable[[], Any]], pending: dict,
                     complete: Callable[..., Any]) -> list:
        """Run ``prepares`` (zero-argument calls, each making one job) under the store lock; when
        one raises, end every job made so far that is still in ``pending`` with
        ``complete(job_id, ok=False)`` and re-raise: no job of the call is left behind."""
        with self._lock:
            jobs: list = []
            try:
                for prepare in prepares:
                    jobs.append(prepare())
            except BaseException:
                for j in jobs:
                    if j.job_id in pending:
                        complete(j.job_id, ok=False)
                raise
            return jobs

    def complete_loads(self, job_ids: Iterable[int], ok: bool = True,
                       tokens: dict[str, int] | None = None) -> None:
        """:meth:`complete_load` of several jobs; unknown jobs are skipped. ``tokens``: the
        engine's token accounting since its last report (:meth:`account_tokens`)."""
        with self._lock:
            for jid in job_ids:
                if jid in self._loads:
                    self.complete_load(jid, ok=ok)
            if tokens:   # after the jobs: a bad report must not leave their pins behind
                self.account_tokens(tokens)

    def account_tokens(self, tokens: dict[str, int]) -> None:
        """Add an engine's token accounting (case MET-38) to the store's counters, so that
        ``stats()`` and the daemon's Prometheus output show what engines were promised and
        actually got. Keys: ``lookup`` (prompt tokens looked up past the engine's own prefix)
        and ``<outcome>.<tier>`` with outcome in :data:`TOKEN_OUTCOMES` and tier a tier label
        or ``peer``/``unknown``; values are non-negative deltas. Raises RejectedError for
        anything else (nothing is added then)."""
        add: list[tuple[str, int]] = []
        for k, v in tokens.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise RejectedError(f"token count {k!r} must be a non-negative int")
            if k == "lookup":
                add.append((cn.LOOKUP_TOKENS, v))
                continue
            outcome, _, tier = str(k).partition(".")
            if outcome not in TOKEN_OUTCOMES or tier not in TOKEN_TIERS:
                raise RejectedError(f"unknown token counter {k!r}")
            add.append((cn.tokens(outcome, tier), v))
        with self._lock:
            for name, v in add:
                self.counters[name] += v

    def prepare_stores(self, specs: Sequence[tuple], *, owner: str = LOCAL) -> list[StoreJob]:
        """:meth:`prepare_store` of several chains in one call; each spec is ``(keys,
        namespace, size_bytes, parent)`` or ``(keys, namespace, size_bytes, parent, engine)``
        (``engine``: per key engine metadata or None, see :meth:`prepare_store`)."""
        return self._all_or_none(
            (lambda sp=sp: self.prepare_store(sp[0], sp[1], sp[2], owner=owner, parent=sp[3],
                                              engine=sp[4] if len(sp) > 4 else None)
             for sp in specs),
            self._stores, self.complete_store)

    def complete_stores(self, answers: Sequence[tuple[int, bool | Sequence[bool]]]
                        ) -> list[list[BlockStatus]]:
        """:meth:`complete_store` of several jobs: ``answers`` is ``[(job_id, ok), ...]``."""
        with self._lock:
            return [self.complete_store(jid, ok=ok) for jid, ok in answers]

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
            *, owner: str = LOCAL, parent: BlockKey | None = None,
            wait_s: float = PUT_WAIT_S) -> list[BlockStatus]:
        """Convenience for bulk writers (CLI, replay, tests): prepare_store + copy +
        complete_store for equally sized blocks, waiting up to ``wait_s`` seconds for the NVMe
        write-behind queue to have room (see ``prepare_store``). A copy that fails aborts the
        job (nothing is published) and re-raises."""
        size = len(blocks[0]) if blocks else 0
        job = self.prepare_store(keys, namespace, size, owner=owner, parent=parent, wait_s=wait_s)
        return fill_store_job(self, job, blocks, size)

    def get(self, keys: Sequence[BlockKey], *, owner: str = LOCAL) -> list[bytes]:
        """Convenience: bytes of the longest loadable prefix of ``keys`` (copies)."""
        job = self.prepare_load(keys, owner=owner)
        try:
            return [bytes(self.slot_view(s)[:n]) for s, n in zip(job.slots, job.sizes)]
        finally:
            self.complete_load(job.job_id)

    # ---------------------------------------------------------------- admin
    def evict(self, keys: Iterable[BlockKey], tier: Tier | None = None, *,
              dry_run: bool = False) -> dict:
        """Remove unpinned ``keys`` from every tier, or with ``tier`` only that tier's copy of
        blocks that another tier still holds (``tier=Tier.DRAM``: drop the DRAM copies of blocks
        NVMe holds, NVMe untouched — how an operator or a benchmark starts cold). Returns counts:
        ``evicted``, ``pinned`` (pinned blocks are never touched, blocks waiting for their NVMe
        copy included), ``missing`` (not resident), ``not_in_tier`` and ``only_copy`` (with
        ``tier``: the tier holds no copy, or holds the only one); an outcome no key had is
        absent.

        ``dry_run``: change nothing; the counts say what this call would answer now (``evicted``:
        would be evicted), judging each key against the store as it is (a key listed twice gets
        the same answer twice, where a real evict finds it ``missing`` the second time), and
        ``outcomes`` adds one of those five names per key, in order."""
        out: Counter[str] = Counter()
        outcomes: list[str] = []
        with self._lock:
            self._expire()
            for k in keys:
                h = self.res.get(k)
                if h < 0:
                    what = "missing"
                elif self.res.pins[h]:
                    what = "pinned"
                elif tier is None:
                    what = "evicted"
                    if not dry_run:
                        self._drop_block(k, h)
                elif self.res.slot(h, tier) < 0:
                    what = "not_in_tier"
                elif len(self.res.tiers_of(h)) < 2:
                    what = "only_copy"
                else:
                    what = "evicted"
                    if not dry_run:
                        self.mover.release_slot(k, h, tier)
                out[what] += 1
                if dry_run:
                    outcomes.append(what)
        return dict(out, outcomes=outcomes) if dry_run else dict(out)

    def resolve(self, prefixes: Sequence[str], *, unknown_ok: bool = False
                ) -> list[BlockKey | None]:
        """Full keys of resident blocks for hex key ``prefixes`` (1 to 64 digits, case ignored;
        a whole key's 64 digits resolve to it when it is resident): one key per prefix, in
        order; with ``unknown_ok``, None for a prefix no resident block has. Raises ConfigError
        for a prefix that is not hex, KeyPrefixError for one that names more than one block (or,
        without ``unknown_ok``, none). Copies the key list under the lock and searches it
        without (:func:`tierstore.keys.resolve_prefixes`), so other callers wait only for the
        copy; about 0.5 s per million blocks held, nothing built per block but the key list."""
        with self._lock:
            held = self.res.keys()
        return resolve_prefixes(prefixes, held, unknown_ok=unknown_ok)

    # ---------------------------------------------------------------- events
    def attach_events(self, log: EventLog | None) -> None:
        """Log every residency change of blocks with engine metadata into ``log`` from now on
        (tierstore/events.py); None detaches. The log starts with CLEARED and one STORED per
        copy of every such block now resident (parents before children), so a consumer that
        starts from it knows the whole state: after a restart that is the epoch change plus
        the re-announcement of what survived on NVMe (case EVT-37 (a)). The same snapshot
        answers the log's overflow (``log.resync``)."""
        with self._lock:
            self.res.events = None
            if log is None:
                return
            log.resync = lambda: self._snapshot_events(log)
            self._snapshot_events(log)

    def _snapshot_events(self, log: EventLog) -> None:
        with self._lock:
            res = self.res
            items = [(h, m) for _, h in res.handles() if (m := res.meta[h]) is not None]
            log.reset([(STORED, t, m) for h, m in _parents_first(items) for t in res.tiers_of(h)])
            res.events = log

    def _drop_block(self, key: BlockKey, h: int) -> None:
        for t in list(self.res.tiers_of(h)):
            s = self.res.clear_slot(h, t)
            self.policies[t].remove(key)
            self.mover.free(t, s)   # NVMe: deletes the record
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
                if not c and compute and h >= 0 and dram.holds_bytes \
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
        d = {
            "key": k.hex(),
            "namespace": nsd,
            "tiers": [t.label for t in tiers],
            "slots": {t.label: self.res.slot(h, t) for t in tiers},
            "size_bytes": self.res.size[h],
            "checksum": f"{self.res.checksum[h]:016x}" if self.res.checksum[h] else None,
            "pins": self.res.pins[h],
        }
        m = self.res.meta[h]
        if m is not None:   # the engine's hash: what KV events name this block by
            try:
                eh = decode_engine_block(m).hash
                d["engine_hash"] = eh.hex() if isinstance(eh, bytes) else eh
            except ValueError:
                d["engine_hash"] = None
        return d

    def stats(self) -> dict:
        with self._lock:
            retention = self.retention.stats()   # first: it expires sessions (counters)
            tiers = []
            for t, tier in self.tiers.items():
                u = tier.usage()
                u["blocks"] = len(self.policies[t])
                tiers.append(u)
            c = dict(self.counters)
            for t, tier in self.tiers.items():   # a copy: NVMe I/O may run beside this
                for name, v in dict(tier.counters).items():
                    c[cn.tier_counter(t.label, name)] = v
            return {
                "health": self._health(),
                "blocks": len(self.res),
                "pinned_blocks": sum(1 for _, h in self.res.handles() if self.res.pins[h]),
                "pins": self.pins.total(),
                "pending_stores": len(self._stores),
                "pending_loads": len(self._loads),
                "write_behind": self._wb.stats() if self._wb is not None else None,
                "tiers": tiers,
                "policies": {t.label: p.name for t, p in self.policies.items()},
                "counters": c,
                "token_hit_ratio": token_hit_ratio(c),
                "retention": retention,
            }

    def _health(self) -> dict:
        """``{"status": "ok" | "degraded", "tiers": {label: TierHealth snapshot}}``: a tier is
        degraded while its recent I/O fails or it owes work it could not do (tiers/health.py).
        Tiers without I/O of their own (dram, hbm) are always ok."""
        tiers = {}
        for t, tier in self.tiers.items():
            h = tier.health
            tiers[t.label] = h.snapshot() if h is not None else {"status": "ok", "reason": ""}
        bad = any(v["status"] != "ok" for v in tiers.values())
        return {"status": "degraded" if bad else "ok", "tiers": tiers}

    def check(self, fix: bool = False) -> list[str]:
        """Verify the invariants (index vs tiers vs pins) and, with NVMe, every record's header
        and checksum; a failing tier (its latest I/O failed, probed again here, or it owes
        metadata it could not commit: tiers/health.py) is a problem too. Returns one line per
        problem; ``fix`` repairs what can be repaired (a failing disk is not among it)."""
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
                listed = len(self.policies[t])
                if listed != n_index:
                    problems.append(f"{t.label}: eviction policy lists {listed} blocks but the "
                                    f"index holds {n_index}")
            if self.pins.total() != sum(self.res.pins[h] for _, h in self.res.handles()):
                problems.append("pin ledger and pin counts disagree")
            problems.extend(self._stale_jobs(fix))
            nvme = self.tiers.get(Tier.NVME)
            if nvme is not None:
                problems.extend(self._recovery_problems(nvme))
                with self._nvme_lock:
                    disk = nvme.check(fix=fix)
                problems.extend(f"nvme: {p}" for p in disk)
                if fix and disk:
                    self._resync_nvme()
            for t, tier in self.tiers.items():   # after nvme.check settled and probed
                h = tier.health
                if h is not None and h.failing:
                    problems.append(f"{t.label}: failing: {h.snapshot()['reason']}")
        return problems

    def _stale_jobs(self, fix: bool) -> list[str]:
        """Jobs prepared more than STALE_JOB_S ago and never completed (with ``fix``: aborted)."""
        now = self._clock()
        out = []
        for jid, j in list(self._stores.items()):
            age = now - j.started_s
            if age > STALE_JOB_S:
                n = sum(st is BlockStatus.OK for st in j.status)
                out.append(f"store job {jid} of {j.owner} pending for {age:.0f} s: its {n} "
                           "blocks answer PRESENT and never become visible")
                if fix:
                    self.complete_store(jid, ok=False)
        for jid, j in list(self._loads.items()):
            age = now - j.started_s
            if age > STALE_JOB_S and j.result is not None:
                out.append(f"load job {jid} of {j.owner} pending for {age:.0f} s: it pins "
                           f"{len(j.keys)} blocks")
                if fix:
                    self.complete_load(jid, ok=False)
        return out

    def _recovery_problems(self, nvme: DiskTier) -> list[str]:
        """What start-up recovery had to drop, reported by the first check after open: committed
        entries whose record failed its check, vanished slab files, unknown files. Orphans (records
        written but never committed when a process died) are expected after a crash and lost
        nothing committed, so they are not problems."""
        if self._recovery_reported:
            return []
        self._recovery_reported = True
        rec = nvme.last_recovery
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
        """Write what waits for NVMe (queue and backlog: a clean close loses no stored block),
        abort unfinished jobs, release resources. Idempotent; later calls that would start work
        raise JobError."""
        with self._lock:
            if self._closed or self._closing:
                return
            self._closing = True
            if self._wb is not None:
                self._wb.stop()   # releases the lock while the flusher drains
            loader, self._loader = self._loader, None
        if loader is not None:
            loader.shutdown(wait=True)   # staging jobs see _closing and end with nothing
        with self._lock:
            for jid in list(self._stores):
                self.complete_store(jid, ok=False)
            for jid in list(self._loads):
                pl = self._loads.pop(jid)
                self.pins.release_owner(pl.pin_owner)
                self.counters[cn.LOADS_FAILED] += 1
            hbm = self.tiers.get(Tier.HBM)
            if hbm is not None:   # its copy engine holds views of the DRAM slab: close it first
                hbm.close()
                pinning = hbm.host_pinning
                if pinning is not None:
                    pinning.unpin()
            for t, tier in self.tiers.items():
                if t is not Tier.HBM:
                    with self.mover.tier_lock(t):   # waits for NVMe I/O in flight
                        tier.close()
            self._closed = True
            self._moved.notify_all()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
