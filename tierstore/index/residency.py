"""Residency map and pin books: the only place where block locations and pin counts live.

``Residency`` maps each resident :data:`BlockKey` to a small integer *handle*; per-handle fields
are kept in flat ``array`` columns rather than one Python object per block, so that a resident
block costs about 170 bytes of index memory (key bytes object + dict entry + columns; measured by
``benchmarks/bench_index.py``)::

    column      type   meaning
    ns          u16    namespace id (Store's namespace table)
    size        i64    payload bytes
    checksum    u64    xxh3-64 of the payload, 0 = not computed yet (DRAM-only blocks)
    pins        i32    number of live pins (never negative)
    slot[tier]  i32    slot in that tier, -1 = not resident there (hbm, dram, nvme)
    near        u8     nearest tier holding it (Tier value), 255 = none (kept for fast lookups)
    meta        object engine metadata blob (tierstore/events.py) or None: how routers know it

Events: with an :class:`~tierstore.events.EventLog` attached (``events``), every change of a
block's tiers is logged here and only here: ``set_slot`` of a new copy appends STORED,
``clear_slot`` of a copy appends REMOVED, ``set_meta`` on a resident block appends STORED per copy
(blocks without engine metadata log nothing). Without a log the cost is one attribute test.

A block may be resident in several tiers at once (NVMe write-through); ``nearest`` is the one a
load uses. ``PinBook`` records which owner (a connection, a session, a job) holds each pin, so a
dead owner's pins are released in one call and an unpin without a matching pin is an error that
changes nothing (case EVC-07). Pins may carry a TTL (seconds, monotonic clock).

Single-threaded: the caller (``Store``) holds its lock around every call.
"""

from __future__ import annotations

import heapq
import time
from array import array
from typing import Iterator, Sequence

from tierstore.errors import PinError
from tierstore.events import REMOVED, STORED
from tierstore.types import BlockKey, Tier

_LOCAL_TIERS = (Tier.HBM, Tier.DRAM, Tier.NVME)
NOWHERE = 255
MAX_PIN_TTL_S = 30 * 86400.0   # a pin held longer than a month is a leak by another name
TIER_BY_VALUE = {int(t): t for t in Tier}


class Residency:
    """key -> handle -> (ns, size, checksum, pins, slot per tier). Single-threaded."""

    def __init__(self) -> None:
        self._handle: dict[BlockKey, int] = {}
        self._keys: list[BlockKey | None] = []
        self._free: list[int] = []
        self.ns = array("H")
        self.size = array("q")
        self.checksum = array("Q")
        self.pins = array("i")
        self.slots = {t: array("i") for t in _LOCAL_TIERS}
        self.near = array("B")
        self.meta: list[bytes | None] = []
        self.events = None   # tierstore.events.EventLog, attached by Store.attach_events

    # -- lookups -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._handle)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._handle

    def get(self, key: BlockKey) -> int:
        """Handle of ``key`` or -1."""
        return self._handle.get(key, -1)

    def key_of(self, h: int) -> BlockKey:
        k = self._keys[h]
        assert k is not None, "dangling handle"
        return k

    def handles(self) -> Iterator[tuple[BlockKey, int]]:
        return iter(list(self._handle.items()))

    def keys(self) -> list[BlockKey]:
        """A copy of every resident key (one list, no per-block objects)."""
        return list(self._handle)

    def slot(self, h: int, tier: Tier) -> int:
        return self.slots[tier][h]

    def tiers_of(self, h: int) -> list[Tier]:
        return [t for t in _LOCAL_TIERS if self.slots[t][h] >= 0]

    def nearest(self, h: int) -> Tier | None:
        n = self.near[h]
        return None if n == NOWHERE else TIER_BY_VALUE[n]

    def _renear(self, h: int) -> None:
        for t in _LOCAL_TIERS:
            if self.slots[t][h] >= 0:
                self.near[h] = t
                return
        self.near[h] = NOWHERE

    # -- mutation ------------------------------------------------------------------------------
    def add(self, key: BlockKey, ns_id: int, size: int, checksum: int = 0,
            meta: bytes | None = None) -> int:
        """A new block, resident nowhere yet; ``meta``: its engine metadata blob."""
        if key in self._handle:
            raise KeyError("key already resident")
        if self._free:
            h = self._free.pop()
            self._keys[h] = key
            self.ns[h], self.size[h], self.checksum[h], self.pins[h] = ns_id, size, checksum, 0
            for t in _LOCAL_TIERS:
                self.slots[t][h] = -1
            self.near[h] = NOWHERE
            self.meta[h] = meta
        else:
            h = len(self._keys)
            self._keys.append(key)
            self.ns.append(ns_id)
            self.size.append(size)
            self.checksum.append(checksum)
            self.pins.append(0)
            for t in _LOCAL_TIERS:
                self.slots[t].append(-1)
            self.near.append(NOWHERE)
            self.meta.append(meta)
        self._handle[key] = h
        return h

    def set_slot(self, h: int, tier: Tier, slot: int) -> None:
        if self.events is not None and self.slots[tier][h] < 0 and self.meta[h] is not None:
            self.events.append(STORED, tier, self.meta[h])
        self.slots[tier][h] = slot
        self._renear(h)

    def clear_slot(self, h: int, tier: Tier) -> int:
        """Forget the block's place in ``tier``; returns the old slot (-1 if none)."""
        old = self.slots[tier][h]
        if old >= 0 and self.events is not None and self.meta[h] is not None:
            self.events.append(REMOVED, tier, self.meta[h])
        self.slots[tier][h] = -1
        self._renear(h)
        return old

    def set_meta(self, h: int, meta: bytes) -> None:
        """Give a resident block without engine metadata its blob (a block stored first by the
        CLI, then by an engine): its copies are announced now. In memory only: an NVMe entry
        committed before keeps none, so after a restart the block is announced again only once
        an engine stores it again."""
        if self.meta[h] is not None:
            return
        self.meta[h] = meta
        if self.events is not None:
            for t in self.tiers_of(h):
                self.events.append(STORED, t, meta)

    def remove(self, h: int) -> None:
        """Drop a block that is resident nowhere and unpinned."""
        if self.pins[h]:
            raise PinError("cannot remove a pinned block")
        if any(self.slots[t][h] >= 0 for t in _LOCAL_TIERS):
            raise RuntimeError("block still has slots")
        key = self._keys[h]
        del self._handle[key]
        self._keys[h] = None
        self.meta[h] = None
        self._free.append(h)


SESSION_PREFIX = "session:"
SESSION_NAME_MAX = 128
REQUEST_SEP = "/req:"
REQUEST_NAME_MAX = 256


def request_owner(owner: str, request: str) -> str:
    """The pin owner of one request of ``owner`` (a connection, or the embedded client):
    ``<owner>/req:<request>``. Each request's pins are its own: releasing request A never touches
    request B's pins on a shared prefix (issue 13 item 14), and releasing ``owner``
    (``Store.release_owner``: the connection went away) releases every request under it.
    ``request``: 1-256 printable characters, no spaces (an engine's request id). Raises
    PinError."""
    if not isinstance(request, str) or not 0 < len(request) <= REQUEST_NAME_MAX \
            or not request.isprintable() or any(c.isspace() for c in request):
        raise PinError(f"bad request name {request!r}: 1-{REQUEST_NAME_MAX} printable "
                       "characters, no spaces")
    return owner + REQUEST_SEP + request


def session_owner(session: str, ttl_s: float | None) -> str:
    """The pin owner of a named session, ``session:<NAME>``: pins that outlive the connection
    that took them (``tierstore blocks pin --session``) and go only by their TTL or an explicit
    unpin. A session pin must carry a positive TTL, so none can leak forever (an unpin names
    the owner with :func:`session_name`, no TTL). Raises PinError."""
    if ttl_s is None or not 0 < ttl_s <= MAX_PIN_TTL_S:
        raise PinError(f"a session pin needs a TTL between 0 and {MAX_PIN_TTL_S:.0f} s "
                       f"(session {session!r}): without one nothing would ever release it")
    return session_name(session)


def session_name(session: str) -> str:
    """``session:<NAME>`` for a valid name (1-128 printable characters, no spaces). Raises
    PinError."""
    if not isinstance(session, str) or not 0 < len(session) <= SESSION_NAME_MAX \
            or not session.isprintable() or any(c.isspace() for c in session):
        raise PinError(f"bad session name {session!r}: 1-{SESSION_NAME_MAX} printable characters, "
                       "no spaces")
    return SESSION_PREFIX + session


class PinBook:
    """Who holds which pin. The residency ``pins`` column is the sum over owners; this is the
    ledger that makes double unpins detectable and dead owners' pins releasable.

    TTLs: each pin taken with ``ttl_s`` has its own deadline; :meth:`expire` releases exactly
    the pins whose deadline has passed. An explicit :meth:`unpin` of an owner's key releases a
    pin without a TTL first (nothing else would ever release it), else the one whose deadline
    is nearest; so a pin re-taken after an unpin never inherits the old pin's deadline.

    Invariants (checked by ``tests/core/index/test_pin_books.py``): every count is positive; for each
    resident block ``pins`` = sum over owners of their count on it; an owner's live deadlines on
    a key never outnumber its pins on it.

    Single-threaded.
    """

    def __init__(self, residency: Residency, clock=time.monotonic) -> None:
        self._res = residency
        self._by_owner: dict[str, dict[BlockKey, int]] = {}
        # live TTL pins: (owner, key) -> {seq: deadline}; the heap may hold stale entries
        # (released by unpin/release_owner/forget) that expire() skips and _compact() drops
        self._ttl: dict[tuple[str, BlockKey], dict[int, float]] = {}
        self._expiry: list[tuple[float, int, str, BlockKey]] = []  # (deadline, seq, owner, key)
        self._live_ttl = 0
        self._seq = 0
        self._clock = clock

    def pin(self, owner: str, key: BlockKey, ttl_s: float | None = None) -> None:
        h = self._res.get(key)
        if h < 0:
            raise PinError("cannot pin a block that is not resident")
        if ttl_s is not None and not 0 < ttl_s <= MAX_PIN_TTL_S:
            raise PinError(f"a pin TTL must be positive and at most {MAX_PIN_TTL_S:.0f} s "
                           f"(30 days), got {ttl_s!r}")
        held = self._by_owner.setdefault(owner, {})
        held[key] = held.get(key, 0) + 1
        self._res.pins[h] += 1
        if ttl_s is not None:
            self._seq += 1
            deadline = self._clock() + ttl_s
            self._ttl.setdefault((owner, key), {})[self._seq] = deadline
            self._live_ttl += 1
            heapq.heappush(self._expiry, (deadline, self._seq, owner, key))
            if len(self._expiry) > 64 and len(self._expiry) > 4 * self._live_ttl:
                self._compact()

    def pin_many(self, owner: str, keys: Sequence[BlockKey], handles: Sequence[int]) -> None:
        """One TTL-less pin of ``owner`` on each of ``keys`` whose resident ``handles`` the
        caller just looked up (a load job's prefix: one call instead of one per block)."""
        held = self._by_owner.setdefault(owner, {})
        pins = self._res.pins
        get = held.get
        for k, h in zip(keys, handles):
            held[k] = get(k, 0) + 1
            pins[h] += 1

    def _release_one(self, owner: str, key: BlockKey, seq: int | None) -> None:
        """Drop one pin of ``owner`` on ``key`` (the TTL pin ``seq``, or a TTL-less one)."""
        held = self._by_owner[owner]
        n = held[key]
        if seq is not None:
            live = self._ttl[(owner, key)]
            del live[seq]
            self._live_ttl -= 1
            if not live:
                del self._ttl[(owner, key)]
        if n == 1:
            del held[key]
            if not held:
                del self._by_owner[owner]
        else:
            held[key] = n - 1
        h = self._res.get(key)
        if h >= 0 and self._res.pins[h] > 0:
            self._res.pins[h] -= 1
            self._unpinned(h)

    def _unpinned(self, h: int) -> None:
        """A block whose last copy went while it was pinned (a repair dropped its record) leaves
        the index with its last pin: nothing else would ever remove it."""
        if self._res.pins[h] == 0 and self._res.nearest(h) is None:
            self._res.remove(h)

    def unpin(self, owner: str, key: BlockKey) -> None:
        """Release one pin of ``owner`` on ``key``. Raises PinError (and changes nothing) if the
        owner holds none."""
        held = self._by_owner.get(owner)
        n = held.get(key, 0) if held else 0
        if n <= 0:
            raise PinError(f"owner {owner!r} holds no pin on this block")
        live = self._ttl.get((owner, key))
        seq = None
        if live is not None and len(live) >= n:   # every pin has a TTL: release the nearest
            seq = min(live, key=live.__getitem__)
        self._release_one(owner, key, seq)

    def unpin_all(self, owner: str, keys) -> int:
        """Release one pin of ``owner`` per key of ``keys`` (a key listed twice releases two),
        all or nothing: when the owner lacks a pin for any of them, PinError names how many and
        nothing is released. Returns the pins released."""
        want: dict[BlockKey, int] = {}
        for k in keys:
            want[k] = want.get(k, 0) + 1
        held = self._by_owner.get(owner, {})
        short = sum(n - held.get(k, 0) for k, n in want.items() if held.get(k, 0) < n)
        if short:
            raise PinError(f"owner {owner!r} holds no pin for {short} of the {sum(want.values())} "
                           "keys to unpin; nothing was released")
        for k, n in want.items():
            for _ in range(n):
                self.unpin(owner, k)
        return sum(want.values())

    def _drop_ttls(self, owner: str, key: BlockKey) -> None:
        live = self._ttl.pop((owner, key), None)
        if live:
            self._live_ttl -= len(live)

    def release_owner(self, owner: str) -> int:
        """Drop every pin ``owner`` holds; returns how many were released."""
        held = self._by_owner.pop(owner, None)
        if not held:
            return 0
        res = self._res
        get, pins, near = res._handle.get, res.pins, res.near
        ttl = self._ttl
        total = 0
        for key, n in held.items():
            if ttl and (owner, key) in ttl:
                self._drop_ttls(owner, key)
            h = get(key, -1)
            if h >= 0:
                p = pins[h] - n
                pins[h] = p if p > 0 else 0
                if p <= 0 and near[h] == NOWHERE:   # its last copy went while pinned
                    res.remove(h)
            total += n
        return total

    def expire(self) -> int:
        """Release pins whose TTL has passed; returns the number released."""
        now = self._clock()
        released = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, seq, owner, key = heapq.heappop(self._expiry)
            live = self._ttl.get((owner, key))
            if live is not None and seq in live:
                self._release_one(owner, key, seq)
                released += 1
        return released

    def _compact(self) -> None:
        """Drop heap entries of pins already released another way (bounds the heap)."""
        self._expiry = [e for e in self._expiry if e[1] in self._ttl.get((e[2], e[3]), ())]
        heapq.heapify(self._expiry)

    def forget(self, key: BlockKey) -> int:
        """The block is gone for good (e.g. its only copy failed its checksum): drop every
        owner's pins on it. A later unpin by those owners raises PinError. Returns pins dropped."""
        dropped = 0
        for owner in list(self._by_owner):
            held = self._by_owner[owner]
            n = held.pop(key, 0)
            if n:
                self._drop_ttls(owner, key)
            dropped += n
            if not held:
                del self._by_owner[owner]
        h = self._res.get(key)
        if h >= 0:
            self._res.pins[h] = 0
        return dropped

    def now(self) -> float:
        """The clock TTL deadlines are measured on."""
        return self._clock()

    def held(self, owner: str) -> dict[BlockKey, int]:
        return dict(self._by_owner.get(owner, {}))

    def owners(self) -> list[str]:
        return list(self._by_owner)

    def owners_of(self, key: BlockKey) -> dict[str, int]:
        """Owner -> pins it holds on ``key`` (O(owners); for inspection, not the hot path)."""
        return {o: d[key] for o, d in self._by_owner.items() if key in d}

    def deadlines(self, owner: str, key: BlockKey) -> list[float]:
        """Deadlines (clock time) of ``owner``'s TTL pins on ``key``, nearest first."""
        return sorted(self._ttl.get((owner, key), {}).values())

    def total(self) -> int:
        return sum(sum(d.values()) for d in self._by_owner.values())

    def pinned_blocks_bound(self) -> int:
        """An upper bound of the number of pinned blocks, O(owners): keys summed over owners
        (a block two owners pin counts twice). The store's eviction asks it before counting
        exactly."""
        return sum(map(len, self._by_owner.values()))
