"""S3-FIFO eviction (Yang et al., SOSP'23): a small probation FIFO, a main FIFO and a ghost FIFO.

New keys enter the small queue (10% of capacity, the paper's value). A key at the head of the
small queue leaves the tier unless it was touched while there, in which case it moves to the main
queue: one-hit wonders leave quickly (scan resistance). A key at the head of the main queue that
was touched since it last passed gets reinserted at the tail with its counter lowered (CLOCK-like,
counter capped at 3: the paper's two bits). A key evicted from the small queue is remembered in the
ghost queue (one cache's worth of keys); coming back from the ghost, it goes straight to main.

``victim`` performs the head moves the algorithm prescribes (promotions and reinsertions); they
are idempotent and never change which keys are resident, so a second ``victim`` call without an
intervening operation returns the same key. Keys counted, not bytes: blocks of a tier share one
size. O(1) amortized per operation. Single-threaded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

from tierstore.policy.interface import EvictionPolicy, Key

SMALL_FRACTION = 0.1  # the paper's small-queue size: 10% of the cache
MAX_FREQ = 3  # the paper's 2-bit counter


class S3FIFO(EvictionPolicy):
    name = "s3fifo"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._small: OrderedDict[Key, None] = OrderedDict()
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}
        self._small_target = max(1, int(capacity_blocks * SMALL_FRACTION))

    def insert(self, key: Key, size_bytes: int, parent: Optional[Key] = None) -> None:
        if key in self._freq:
            self.access(key)
            return
        self._freq[key] = 0
        if key in self._ghost:  # came back soon after leaving the small queue: skip probation
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def access(self, key: Key) -> None:
        f = self._freq.get(key)
        if f is not None and f < MAX_FREQ:
            self._freq[key] = f + 1

    def remove(self, key: Key) -> None:
        if self._freq.pop(key, None) is None:
            return
        if key in self._small:  # left from probation: remember it (one cache's worth of keys)
            del self._small[key]
            self._ghost[key] = None
            if len(self._ghost) > self.capacity_blocks:
                self._ghost.popitem(last=False)
        else:
            self._main.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Optional[Key]:
        small, main, freq = self._small, self._main, self._freq
        # Each move lowers a counter or empties a small-queue slot, so this loop is bounded.
        while small or main:
            if small and (len(small) >= self._small_target or not main):
                key = next(iter(small))
                if freq[key] > 0:
                    del small[key]
                    main[key] = None
                    freq[key] = 0
                    continue
                if evictable(key):
                    return key
                break
            key = next(iter(main))
            if freq[key] > 0:
                main.move_to_end(key)
                freq[key] -= 1
                continue
            if evictable(key):
                return key
            break
        # The head is pinned or in flight: the first evictable key, coldest first.
        for q in (small, main):
            for key in q:
                if freq[key] == 0 and evictable(key):
                    return key
        for q in (small, main):
            for key in q:
                if evictable(key):
                    return key
        return None

    def __len__(self) -> int:
        return len(self._freq)
