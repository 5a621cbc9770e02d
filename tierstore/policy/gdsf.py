"""GDSF (greedy-dual size frequency): LFU with aging, weighted by bytes.

Priority ``H = L + freq * cost / size``. The cost of a miss is recomputing the block's tokens and
its size is proportional to the same tokens, so ``cost / size`` is taken as one unit per MiB:
``H = L + freq * MiB / size_bytes``. ``L`` (the clock) is the ``H`` of the last victim; new and
re-touched keys start from it, so keys that stop being used age out behind those still in use.

A binary heap of (H, tick, key) entries invalidated lazily: O(log n) per operation; ``victim``
only drops dead entries (internal cleanup) and never changes residency. Single-threaded.
"""

from __future__ import annotations

import heapq
from typing import Callable, Optional

from tierstore.policy.interface import EvictionPolicy, Key

UNIT_BYTES = 1 << 20  # size unit of the frequency term; any constant gives the same order


class GDSF(EvictionPolicy):
    name = "gdsf"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._freq: dict[Key, int] = {}
        self._size: dict[Key, int] = {}
        self._entry: dict[Key, tuple] = {}
        self._heap: list[tuple] = []
        self._clock = 0.0
        self._tick = 0

    def _push(self, key: Key) -> None:
        self._tick += 1
        h = self._clock + self._freq[key] * UNIT_BYTES / max(1, self._size[key])
        e = (h, self._tick, key)
        self._entry[key] = e
        heapq.heappush(self._heap, e)

    def insert(self, key: Key, size_bytes: int, parent: Optional[Key] = None) -> None:
        if key in self._freq:
            self.access(key)
            return
        self._freq[key] = 1
        self._size[key] = size_bytes
        self._push(key)

    def access(self, key: Key) -> None:
        if key in self._freq:
            self._freq[key] += 1
            self._push(key)

    def remove(self, key: Key) -> None:
        e = self._entry.pop(key, None)
        if e is None:
            return
        del self._freq[key], self._size[key]
        if e[0] > self._clock:
            self._clock = e[0]

    def victim(self, evictable: Callable[[Key], bool]) -> Optional[Key]:
        heap, entry = self._heap, self._entry
        while heap and entry.get(heap[0][2]) is not heap[0]:
            heapq.heappop(heap)
        if not heap:
            return None
        if evictable(heap[0][2]):
            return heap[0][2]
        live = sorted(e for e in heap if entry.get(e[2]) is e)  # rare path: head is pinned
        for e in live:
            if evictable(e[2]):
                return e[2]
        return None

    def __len__(self) -> int:
        return len(self._freq)
