"""Longest cached prefix over a key chain (DESIGN §3).

A chain's keys depend on every earlier block, so the longest cached prefix is found by probing
keys in order until the first miss: O(k) dict probes, no tree. Single-threaded; the store calls it
under its lock.

Both passes run in C (no Python call per block): the handles of a fully resident chain come from
one ``itemgetter`` over the residency dict (it stops with ``KeyError`` at the first miss), else
from ``dict.get`` probes that stop at the first ``None``; the tier codes come from one
``itemgetter`` over the ``near`` column. 8,192 blocks: docs/benchmarks.md, "Keys and lookup from
tokens".
"""

from __future__ import annotations

from functools import partial
from itertools import takewhile
from operator import is_not, itemgetter
from typing import Sequence

from tierstore.index.residency import NOWHERE, Residency
from tierstore.types import BlockKey

_resident = partial(is_not, None)   # handles are ints >= 0, so 0 is a hit: test identity, not truth


def longest_prefix(residency: Residency, keys: Sequence[BlockKey]) -> list[int]:
    """Handles of the longest prefix of ``keys`` that is resident in any local tier."""
    handle = residency._handle
    if not isinstance(keys, (list, tuple)):
        keys = list(keys)
    if len(keys) > 1:
        try:
            return list(itemgetter(*keys)(handle))   # the common case of a repeated lookup: all hit
        except KeyError:
            pass
    return list(takewhile(_resident, map(handle.get, keys)))


def longest_prefix_tiers(residency: Residency, keys: Sequence[BlockKey]) -> tuple[list[int], bytes]:
    """``longest_prefix`` plus each hit block's nearest tier as one byte (``Tier`` value)."""
    hs = longest_prefix(residency, keys)
    codes = nearest_codes(residency, hs)
    cut = codes.find(NOWHERE)   # a pinned block whose last copy went (check --fix): a miss
    if cut >= 0:
        del hs[cut:]
        codes = codes[:cut]
    return hs, codes


def nearest_codes(residency: Residency, handles: Sequence[int]) -> bytes:
    """Each handle's nearest tier as one byte (``Tier`` value; ``NOWHERE`` for none), in order."""
    if len(handles) > 1:
        return bytes(itemgetter(*handles)(residency.near))
    return bytes(map(residency.near.__getitem__, handles))
