"""Least-recently-used eviction: the baseline every other policy is measured against.

O(1) insert/access/remove on an ``OrderedDict``; ``victim`` walks from the cold end past keys the
store cannot evict right now (pinned, in flight). Single-threaded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

from tierstore.policy.interface import EvictionPolicy, Key


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key, size_bytes: int, parent: Optional[Key] = None) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Optional[Key]:
        for key in self._order:
            if evictable(key):
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)
