"""Longest cached prefix over a key chain (DESIGN §3).

A chain's keys depend on every earlier block, so the longest cached prefix is found by probing
keys in order until the first miss: O(k) dict probes, no tree. Single-threaded; the store calls it
under its lock.
"""

from __future__ import annotations

from typing import Sequence

from tierstore.index.residency import Residency
from tierstore.types import BlockKey


def longest_prefix(residency: Residency, keys: Sequence[BlockKey]) -> list[int]:
    """Handles of the longest prefix of ``keys`` that is resident in any local tier."""
    out: list[int] = []
    get = residency.get
    for k in keys:
        h = get(k)
        if h < 0:
            break
        out.append(h)
    return out
