"""The tier protocols: what the store asks of a tier.

Every tier is a set of fixed-size *slots* (``slot_bytes`` each, ``num_slots`` of them) with a free
list; the store decides which slot holds which block (through the index) and a tier only moves
bytes. Two shapes exist:

- :class:`MemoryTier` (hbm, dram): slots are addressable memory; ``view(slot)`` returns a writable
  ``memoryview`` of exactly ``slot_bytes`` bytes, so producers write blocks in place (zero copy).
- the NVMe tier (tiers/nvme.py): slots are records in slab files, reached with batched
  ``write_batch``/``read_batch`` that verify checksums.

``NullTier`` keeps slot accounting but no bytes: trace replay with ``--payload none`` runs the real
store, index and policies on it.

What the store reads of every tier is declared here (never probed with ``getattr``):
``holds_bytes`` (False: slot accounting only), ``counters`` (the tier's own, named in
tierstore/counter_names.py; empty for tiers without I/O of their own), ``health`` (a
:class:`~tierstore.tiers.health.TierHealth`, None for tiers without I/O of their own) and, for a
disk tier, ``last_recovery`` (what start-up recovery dropped).

Tiers are single-threaded; the store calls them under its lock.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from types import MappingProxyType
from typing import Mapping

from tierstore.tiers.health import DiskError, TierHealth  # noqa: F401 (DiskError: re-exported)
from tierstore.types import Tier


class SlotAllocator:
    """Free slots in a min-heap: ``alloc`` hands out the lowest free slot, O(log n) per call, no
    allocation per call after start.

    Lowest-first (not last-freed-first) so that a batch of allocations gets ascending runs of
    consecutive slots whatever order the slots were freed in (an evicted chain frees its slots
    root first): a job's copy between the slab and an engine buffer is then one copy per run
    (io/copy.py, benchmarks/peer_bench_adapter.py), and the NVMe tier fills its slab files from
    the front (the order ``NvmeTier.prepare`` pre-zeroes them)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots))   # ascending: already a heap
        self._used = bytearray(num_slots)

    def alloc(self) -> int | None:
        if not self._free:
            return None
        s = heapq.heappop(self._free)
        self._used[s] = 1
        return s

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or not self._used[slot]:
            raise ValueError(f"slot {slot} is not allocated")
        self._used[slot] = 0
        heapq.heappush(self._free, slot)

    def take(self, slot: int) -> None:
        """Mark a specific slot used (recovery of persisted slots)."""
        if self._used[slot]:
            raise ValueError(f"slot {slot} already used")
        self._used[slot] = 1
        self._free.remove(slot)
        heapq.heapify(self._free)

    def is_used(self, slot: int) -> bool:
        return bool(self._used[slot])

    @property
    def used(self) -> int:
        return self.num_slots - len(self._free)

    @property
    def free_count(self) -> int:
        return len(self._free)


class SlotTier(ABC):
    """Common accounting of every tier, and what the store reads of each (module docstring)."""

    tier: Tier
    slot_bytes: int
    holds_bytes: bool = True                 # False: slots are accounted, no bytes kept
    health: "TierHealth | None" = None       # tiers with I/O of their own (nvme) set one
    counters: dict[str, int]                 # the tier's own counters (names: counter_names.py)

    def __init__(self, tier: Tier, num_slots: int, slot_bytes: int) -> None:
        self.tier = tier
        self.slot_bytes = slot_bytes
        self.slots = SlotAllocator(num_slots)
        self.counters = {}

    @property
    def num_slots(self) -> int:
        return self.slots.num_slots

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def alloc(self) -> int | None:
        return self.slots.alloc()

    def free(self, slot: int) -> None:
        self.slots.free(slot)

    def usage(self) -> dict:
        return {
            "tier": self.tier.label,
            "slots": self.num_slots,
            "used_slots": self.slots.used,
            "slot_bytes": self.slot_bytes,
            "capacity_bytes": self.capacity_bytes,
            "used_bytes": self.slots.used * self.slot_bytes,
        }

    def close(self) -> None:
        """Release resources; idempotent."""


class MemoryTier(SlotTier):
    """A tier whose slots are addressable memory."""

    holds_bytes = True

    @abstractmethod
    def view(self, slot: int) -> memoryview:
        """Writable view of exactly ``slot_bytes`` bytes of ``slot``."""


class NullTier(MemoryTier):
    """Slot accounting without bytes (``--payload none``)."""

    holds_bytes = False

    def view(self, slot: int) -> memoryview:
        raise RuntimeError("NullTier holds no bytes")


class DiskTier(SlotTier):
    """A tier of checksummed records on disk (the NVMe tier implements it).

    Contract (the store relies on each line):

    - ``recover()`` runs once at open and returns the :class:`DiskEntry` list that survived
      start-up recovery (entries whose record fails its header check are dropped, orphan records
      freed, used bytes recomputed). Their slots are already marked used.
    - ``write_batch(items)`` writes every record, fsyncs once, then commits all metadata in one
      LMDB transaction (publish order: data -> fsync -> commit); per-item result. Nothing of a
      failed item is visible after restart.
    - ``read_batch(items)`` reads into ``dst`` and verifies header and checksum; an item whose
      result is not ok has undefined ``dst`` bytes and must be treated as a miss.
    - ``delete_batch(slots)`` removes the metadata in one transaction and frees the slots.
    - ``alloc()`` returns None when the configured capacity or the filesystem is full.
    - ``last_recovery`` says what ``recover()`` found: ``{entries, dropped, orphans,
      unknown_files, missing_files}`` (empty before it ran); the store's first ``check`` reports it.
    """

    holds_bytes = True
    last_recovery: Mapping = MappingProxyType({})

    @abstractmethod
    def recover(self) -> list["DiskEntry"]: ...

    @abstractmethod
    def write_batch(self, items: list["DiskWrite"]) -> list["DiskResult"]: ...

    @abstractmethod
    def read_batch(self, items: list["DiskRead"]) -> list["DiskResult"]: ...

    @abstractmethod
    def delete_batch(self, slots: list[int]) -> None: ...

    @abstractmethod
    def check(self, fix: bool = False) -> list[str]:
        """Full verification (every record's header and checksum against LMDB); returns one line
        per problem; with ``fix`` repairs what it can (drops bad entries, frees orphans)."""

    @abstractmethod
    def put_namespace(self, digest: bytes, descriptor: dict) -> None: ...

    @abstractmethod
    def namespaces(self) -> dict[bytes, dict]: ...


from dataclasses import dataclass  # noqa: E402  (kept next to the types it serves)


@dataclass(frozen=True)
class DiskEntry:
    key: bytes
    slot: int
    size: int          # payload bytes (uncompressed)
    checksum: int      # xxh3-64 of the uncompressed payload
    ns_digest: bytes   # 16 bytes, Namespace.digest()
    meta: bytes | None = None   # the block's engine metadata (tierstore/events.py), if any


@dataclass
class DiskWrite:
    slot: int
    key: bytes
    ns_digest: bytes
    src: memoryview    # exactly the payload (len == size)
    checksum: int = 0  # 0 = compute it
    meta: bytes | None = None   # engine metadata, committed beside the entry (opaque here)


@dataclass
class DiskRead:
    slot: int
    key: bytes
    dst: memoryview    # at least ``size`` bytes
    size: int
    checksum: int


@dataclass
class DiskResult:
    ok: bool
    checksum: int = 0
    error: DiskError | None = None   # why it failed (None when ok); a str is taken as its value

    def __post_init__(self) -> None:
        if self.error is not None and not isinstance(self.error, DiskError):
            self.error = DiskError(self.error)
