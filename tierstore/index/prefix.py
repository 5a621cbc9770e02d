"""Longest cached prefix over a key chain (DESIGN §3).

A chain's keys depend on every earlier block, so the longest cached prefix is found by probing
keys in order until the first miss: O(k) dict probes, no tree. Single-threaded; the store calls it
under its lock.
"""

from __future__ import annotations

from typing import Sequence

from tierstore.index.residency import NOWHERE, Residency
from tierstore.types import BlockKey


def longest_prefix(residency: Residency, keys: Sequence[BlockKey]) -> list[int]:
    """Handles of the longest prefix of ``keys`` that is resident in any local tier."""
    hs = list(map(residency._handle.get, keys))   # C-level probes; cut at the first miss
    try:
        del hs[hs.index(None):]
    except ValueError:
        pass
    return hs


def longest_prefix_tiers(residency: Residency, keys: Sequence[BlockKey]) -> tuple[list[int], bytes]:
    """``longest_prefix`` plus each hit block's nearest tier as one byte (``Tier`` value)."""
    hs = longest_prefix(residency, keys)
    codes = bytes(map(residency.near.__getitem__, hs))
    cut = codes.find(NOWHERE)   # a pinned block whose last copy went (check --fix): a miss
    if cut >= 0:
        del hs[cut:]
        codes = codes[:cut]
    return hs, codes
