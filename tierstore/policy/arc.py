"""ARC (Megiddo & Modha, FAST'03) weighted by bytes.

Four LRU lists: T1 (seen once recently), T2 (seen at least twice), and their ghosts B1, B2 (keys
only). The target ``p`` (bytes of T1) adapts: a hit in B1 says T1 was too small (grow p), a hit in
B2 says T2 was too small (shrink p), each step scaled by the ghosts' size ratio as in the paper,
and in bytes rather than entries so blocks of different sizes weigh what they occupy. ``victim``
takes the LRU end of T1 while T1 holds more than ``p`` bytes, else of T2. Ghosts are trimmed so
that T+B stays within twice the tier's bytes (the paper's bound, in bytes).

The tier's byte capacity is ``capacity_blocks`` times the largest block size seen. O(1) amortized
per operation; ``victim`` is read-only. Single-threaded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

from tierstore.policy.interface import EvictionPolicy, Key


class ARC(EvictionPolicy):
    name = "arc"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._t1: OrderedDict[Key, int] = OrderedDict()  # key -> size_bytes
        self._t2: OrderedDict[Key, int] = OrderedDict()
        self._b1: OrderedDict[Key, int] = OrderedDict()
        self._b2: OrderedDict[Key, int] = OrderedDict()
        self._bytes = {"t1": 0, "t2": 0, "b1": 0, "b2": 0}
        self._p = 0.0
        self._block_bytes = 1

    @property
    def _cap_bytes(self) -> int:
        return self.capacity_blocks * self._block_bytes

    def insert(self, key: Key, size_bytes: int, parent: Optional[Key] = None) -> None:
        if key in self._t1 or key in self._t2:
            self.access(key)
            return
        self._block_bytes = max(self._block_bytes, size_bytes)
        b = self._bytes
        if key in self._b1:
            step = max(size_bytes, size_bytes * b["b2"] / max(1, b["b1"]))
            self._p = min(float(self._cap_bytes), self._p + step)
            b["b1"] -= self._b1.pop(key)
            self._t2[key] = size_bytes
            b["t2"] += size_bytes
        elif key in self._b2:
            step = max(size_bytes, size_bytes * b["b1"] / max(1, b["b2"]))
            self._p = max(0.0, self._p - step)
            b["b2"] -= self._b2.pop(key)
            self._t2[key] = size_bytes
            b["t2"] += size_bytes
        else:
            self._t1[key] = size_bytes
            b["t1"] += size_bytes
        self._trim_ghosts()

    def access(self, key: Key) -> None:
        if key in self._t1:
            size = self._t1.pop(key)
            self._bytes["t1"] -= size
            self._t2[key] = size
            self._bytes["t2"] += size
        elif key in self._t2:
            self._t2.move_to_end(key)

    def remove(self, key: Key) -> None:
        b = self._bytes
        if key in self._t1:
            size = self._t1.pop(key)
            b["t1"] -= size
            self._b1[key] = size
            b["b1"] += size
        elif key in self._t2:
            size = self._t2.pop(key)
            b["t2"] -= size
            self._b2[key] = size
            b["b2"] += size
        else:
            return
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        b, cap = self._bytes, self._cap_bytes
        while self._b1 and b["t1"] + b["b1"] > cap:
            b["b1"] -= self._b1.popitem(last=False)[1]
        while self._b2 and sum(b.values()) > 2 * cap:
            b["b2"] -= self._b2.popitem(last=False)[1]

    def victim(self, evictable: Callable[[Key], bool]) -> Optional[Key]:
        first, second = (self._t1, self._t2) if self._t1 and self._bytes["t1"] > self._p else (self._t2, self._t1)
        for q in (first, second):
            for key in q:
                if evictable(key):
                    return key
        return None

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)
