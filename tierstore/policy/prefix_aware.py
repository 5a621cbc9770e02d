"""Prefix-aware eviction: leaves of the prefix tree go before their parents.

A lookup hits the leading blocks of a chain only, so a block whose parent is gone can never be
hit again until the parent comes back, and a parent is worth at least as much as any child (every
hit on the child is also a hit on the parent). These policies therefore only ever evict *leaves*
(resident blocks with no resident child), and *orphans* (blocks whose parent is not resident)
before anything else::

    tree of resident blocks           eviction order
        a ── b ── c                   orphans first (oldest first), then the leaf with the lowest
         └── d                        priority: c or d; b only once c is gone, a only once b and d are

Among leaves the order is a priority, with the tick of the last touch as tie-break (older first):

- ``PrefixLRU`` (``prefix-lru``): priority = tick of the last touch, i.e. LRU restricted to leaves.
- ``PrefixGDSF`` (``prefix-gdsf``): greedy-dual frequency with aging, ``H = L + freq``; ``L`` is
  the ``H`` of the last victim, so blocks that stop being used age out behind newer ones.
  Frequencies survive a short absence through a ghost table (see ``PrefixGDSF``).

Data structure: one binary heap of (priority, tick, key) entries for leaves, invalidated lazily
(an entry is live only while it is the key's current entry and the key is a leaf), so insert,
access and remove are O(log n) and victim is O(log n) amortized. Only when every leaf is
unevictable (pinned) does victim fall back to the lowest evictable inner block, by a linear scan. ``victim`` may drop dead heap
entries (internal cleanup); it never changes which keys are resident or their order.
Single-threaded; the store calls it under its lock.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Callable, Optional

from tierstore.policy.interface import EvictionPolicy, Key

_ORPHAN = float("-inf")  # priority of a block whose parent is not resident: it cannot be hit


class PrefixLRU(EvictionPolicy):
    """LRU among leaves of the prefix tree; orphans first. O(log n) per operation."""

    name = "prefix-lru"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._parent: dict[Key, Optional[Key]] = {}
        self._kids: dict[Key, set] = {}
        self._entry: dict[Key, tuple] = {}  # key -> its current (priority, tick, key) heap entry
        self._heap: list[tuple] = []
        self._tick = 0

    # -- priority hooks (overridden by PrefixGDSF) ------------------------------------------------
    def _on_insert(self, key: Key, size_bytes: int) -> None:
        pass

    def _on_access(self, key: Key) -> None:
        pass

    def _on_remove(self, key: Key, prio: float) -> None:
        pass

    def _priority(self, key: Key) -> float:
        return float(self._tick)

    # -- protocol ---------------------------------------------------------------------------------
    def insert(self, key: Key, size_bytes: int, parent: Optional[Key] = None) -> None:
        if key in self._parent:
            self.access(key)
            return
        if parent == key:   # a block cannot be its own parent; treat as a chain root
            parent = None
        if parent is not None and parent not in self._parent:
            self._parent[key] = parent
            self._kids[key] = set()
            self._on_insert(key, size_bytes)
            self._push(key, orphan=True)
            return
        self._parent[key] = parent
        self._kids[key] = set()
        if parent is not None:
            self._adopt(parent, key)
        self._on_insert(key, size_bytes)
        self._push(key)

    def access(self, key: Key) -> None:
        if key not in self._parent:
            return
        self._on_access(key)
        parent = self._parent[key]
        orphan = self._entry[key][0] == _ORPHAN
        if orphan and parent is not None and parent in self._parent:
            self._adopt(parent, key)  # the parent came back: the chain is whole again
            orphan = False
        if orphan and parent is None:
            orphan = False
        self._push(key, orphan=orphan)

    def remove(self, key: Key) -> None:
        if key not in self._parent:
            return
        entry = self._entry.pop(key)
        parent = self._parent.pop(key)
        kids = self._kids.pop(key)
        self._on_remove(key, entry[0])
        for kid in kids:  # a parent left before its children (store delete/demote): orphan them
            self._push(kid, orphan=True)
        if parent is not None and parent in self._kids:
            siblings = self._kids[parent]
            if key in siblings:
                siblings.discard(key)
                if not siblings:
                    e = self._entry[parent]
                    heapq.heappush(self._heap, e)  # became a leaf: eligible again, same priority

    def victim(self, evictable: Callable[[Key], bool]) -> Optional[Key]:
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        if heap and evictable(heap[0][2]):
            return heap[0][2]
        skipped = []
        found = None
        while heap:
            e = heapq.heappop(heap)
            if not self._live(e):
                continue
            skipped.append(e)
            if evictable(e[2]):
                found = e[2]
                break
        for e in skipped:
            heapq.heappush(heap, e)
        if found is None:
            # Every leaf is pinned or in flight (or the parent links form no leaf at all, which
            # a hash chain cannot but a caller's keys could): rather than fail the store's
            # insert, give up an inner block (its children become orphans). Rare: a linear scan.
            inner = [e for e in self._entry.values() if evictable(e[2])]
            found = min(inner)[2] if inner else None
        return found

    def __len__(self) -> int:
        return len(self._parent)

    def __contains__(self, key: Key) -> bool:
        return key in self._parent

    # -- helpers ----------------------------------------------------------------------------------
    def _adopt(self, parent: Key, key: Key) -> None:
        self._kids[parent].add(key)

    def _live(self, e: tuple) -> bool:
        key = e[2]
        return self._entry.get(key) is e and not self._kids[key]

    def _push(self, key: Key, orphan: bool = False) -> None:
        self._tick += 1
        e = (_ORPHAN if orphan else self._priority(key), self._tick, key)
        self._entry[key] = e
        if not self._kids[key]:
            heapq.heappush(self._heap, e)


class PrefixGDSF(PrefixLRU):
    """Greedy-dual frequency with aging among leaves: ``H = L + freq``.

    ``freq`` counts touches while resident, plus the count the block had when it was last evicted
    if it is still in the ghost table. The ghost table keeps the counts of the last
    ``capacity_blocks`` evictions (FIFO): one cache's worth of history, the usual ARC/2Q choice,
    so it adapts to the tier's size rather than to a trace. Cost per byte is uniform (a block's
    recompute cost and its size both scale with its tokens), so GDSF's cost/size term is 1.
    """

    name = "prefix-gdsf"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._freq: dict[Key, int] = {}
        self._ghost: OrderedDict[Key, int] = OrderedDict()
        self._clock = 0.0  # L: the H of the last victim

    def _on_insert(self, key: Key, size_bytes: int) -> None:
        self._freq[key] = self._ghost.pop(key, 0) + 1

    def _on_access(self, key: Key) -> None:
        self._freq[key] += 1

    def _on_remove(self, key: Key, prio: float) -> None:
        if prio != _ORPHAN and prio > self._clock:
            self._clock = prio
        self._ghost[key] = self._freq.pop(key)
        if len(self._ghost) > self.capacity_blocks:
            self._ghost.popitem(last=False)

    def _priority(self, key: Key) -> float:
        return self._clock + self._freq[key]
