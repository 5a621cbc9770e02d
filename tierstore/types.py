"""Small value types shared by every layer: tiers, keys, lookup results, job ids.

A :data:`BlockKey` is 32 raw bytes (see :mod:`tierstore.keys`); everything else here is a plain
frozen value with no behaviour beyond derived properties.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

BlockKey = bytes
"""32-byte keyed chain hash of one full block (tierstore.keys)."""

BLOCK_KEY_BYTES = 32


_BYTES = {bytes}
_KEY_LEN = {BLOCK_KEY_BYTES}


def check_keys(keys, what: str = "key") -> None:
    """Raise :class:`~tierstore.errors.RejectedError` unless every key is ``bytes`` of
    :data:`BLOCK_KEY_BYTES` (a shorter or longer key would be stored and then never written to
    NVMe, or collide: refused at the API, issue 13 item 9)."""
    if not isinstance(keys, (list, tuple)):
        keys = list(keys)
    if set(map(type, keys)) <= _BYTES and set(map(len, keys)) <= _KEY_LEN:   # C loops: ~4x faster
        return
    for k in keys:
        if type(k) is not bytes or len(k) != BLOCK_KEY_BYTES:
            from tierstore.errors import RejectedError
            n = len(k) if isinstance(k, (bytes, bytearray, memoryview)) else type(k).__name__
            raise RejectedError(f"a {what} must be {BLOCK_KEY_BYTES} bytes, got {n!r}")

JobId = int


class Tier(enum.IntEnum):
    """Storage tiers, ordered nearest (0) to farthest."""

    HBM = 0
    DRAM = 1
    NVME = 2
    PEER = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> "Tier":
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown tier {text!r}; expected one of hbm, dram, nvme, peer") from None


@dataclass(frozen=True)
class LookupResult:
    """Answer of :meth:`Store.lookup`.

    ``tiers[i]`` is the nearest tier holding ``keys[i]``; the hit is always a prefix of the asked
    chain. ``block_size`` is in tokens, so ``hit_tokens = len(keys) * block_size``.
    ``pinned`` says whether the hit blocks were pinned for ``owner`` in the same critical section.
    """

    keys: tuple[BlockKey, ...]
    tiers: tuple[Tier, ...]
    block_size: int
    pinned: bool = False
    owner: str = ""

    @property
    def num_blocks(self) -> int:
        return len(self.keys)

    @property
    def hit_tokens(self) -> int:
        return len(self.keys) * self.block_size

    def hit_tokens_per_tier(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tiers:
            out[t.label] = out.get(t.label, 0) + self.block_size
        return out


class BlockStatus(enum.Enum):
    """Per-block outcome of a store or load job."""

    OK = "ok"
    PRESENT = "present"          # store: already resident, nothing written
    SKIPPED = "skipped"          # store: refused (tier full of pinned blocks, admission said no);
                                 # load: dropped, no room to stage it into (every slot pinned)
    MISSING = "missing"          # load: not resident (evicted, never stored, pin lease expired)
    CORRUPT = "corrupt"          # load: checksum or header check failed; counted, never returned
    FAILED = "failed"            # I/O error or aborted job


@dataclass
class StoreJob:
    """Result of :meth:`Store.prepare_store`.

    ``slots[i]`` is the DRAM slot the caller must fill with block ``keys[i]`` (``None`` when
    ``status[i]`` is not OK). Nothing is visible to lookups until ``complete_store(job_id, ok=True)``.
    """

    job_id: JobId
    keys: list[BlockKey]
    slots: list[int | None]
    status: list[BlockStatus]
    size_bytes: int
    tier: Tier = Tier.DRAM   # the tier the slots belong to (DRAM, or HBM for a GPU writer)


@dataclass
class LoadJob:
    """Result of :meth:`Store.prepare_load`.

    The first ``num_ready`` keys are pinned and readable from ``slots`` (DRAM slot ids) until
    ``complete_load``; the load stops at the first block that is missing or corrupt, so the
    caller always gets an exact prefix and recomputes the rest.

    An asynchronous job (``prepare_load(wait=False)``) that must read NVMe comes back with
    ``ready`` False and no slots: ``expected`` blocks are pinned and being staged;
    ``Store.poll_loads`` gives the staged job (``num_ready`` may then be below ``expected``).
    """

    job_id: JobId
    keys: list[BlockKey]
    slots: list[int]
    status: list[BlockStatus]
    sizes: list[int] = field(default_factory=list)
    tier: Tier = Tier.DRAM   # the tier the slots belong to (``into`` of prepare_load)
    ready: bool = True       # False: still staging (no slots yet)
    expected: int = -1       # blocks pinned when prepared (-1: same as num_ready)
    sources: bytes = b""     # per pinned block, the Tier value it was in when prepared

    def __post_init__(self) -> None:
        if self.expected < 0:
            self.expected = len(self.slots)

    @property
    def num_ready(self) -> int:
        return len(self.slots)
