"""Eviction and admission protocols (DESIGN §3: policy decides, mechanism moves bytes).

A policy instance serves one tier. It sees keys and sizes only: it never does I/O, never takes a
lock and never touches a pin count. The store tells it what happened (``insert``, ``access``,
``remove``) and asks it for a victim, passing a predicate that says which keys may be evicted now
(unpinned, not in flight)::

    store ──insert/access/remove──▶ policy
    store ──victim(evictable)─────▶ policy ──▶ key | None      (store then evicts and calls remove)

Policies are single-threaded; the store calls them under its lock.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Hashable, Optional

Key = Hashable


class EvictionPolicy(ABC):
    """Chooses which resident key of one tier leaves first."""

    name: str = "base"

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks

    @abstractmethod
    def insert(self, key: Key, size_bytes: int, parent: Optional[Key] = None) -> None:
        """``key`` became resident in this tier; ``parent`` is the previous block of its chain."""

    @abstractmethod
    def access(self, key: Key) -> None:
        """``key`` (resident) was hit."""

    @abstractmethod
    def remove(self, key: Key) -> None:
        """``key`` left the tier (evicted, demoted, promoted away or deleted). Unknown keys are ignored."""

    @abstractmethod
    def victim(self, evictable: Callable[[Key], bool]) -> Optional[Key]:
        """The key to evict next among those with ``evictable(key)`` true, or None. Must not
        change state: the store calls ``remove`` once it has evicted the key."""

    def __len__(self) -> int:  # pragma: no cover - optional
        raise NotImplementedError


class Verdict(enum.Enum):
    ADMIT = "admit"
    REJECT = "reject"
    THROTTLED = "throttled"


@dataclass(frozen=True)
class Admission:
    verdict: Verdict
    after_s: float = 0.0

    @property
    def admitted(self) -> bool:
        return self.verdict is Verdict.ADMIT


ADMIT = Admission(Verdict.ADMIT)
REJECT = Admission(Verdict.REJECT)


def throttled(after_s: float) -> Admission:
    """``THROTTLED(after_s)``: not now; the same block may be admitted ``after_s`` seconds later."""
    return Admission(Verdict.THROTTLED, after_s)


class AdmissionPolicy(ABC):
    """Says whether a block may enter a tier (e.g. NVMe only for blocks seen twice)."""

    name: str = "base"

    @abstractmethod
    def admit(self, key: Key, size_bytes: int) -> Admission:
        """Decide for one block about to be written into the tier."""


class AdmitAll(AdmissionPolicy):
    name = "all"

    def admit(self, key: Key, size_bytes: int) -> Admission:
        return ADMIT
