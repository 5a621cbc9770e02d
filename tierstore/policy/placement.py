"""Placement: which tiers keep a copy of a block when it moves (DESIGN §3, beside eviction).

Eviction policies say *which* block leaves a tier; this policy says *where it goes* and which
copies a move keeps. The rules of the house, in one place::

    HBM  --victim--> DRAM           demoted one step down (copied, then freed in HBM)
    DRAM --victim--> (dropped)      NVMe holds its clean copy, or it was never admitted there
    NVMe --victim--> (deleted)      the last tier
    HBM <--load--> DRAM             exclusive (``StoreConfig.exclusive``): the source copy goes;
                                    not exclusive: both copies stay
    new in DRAM  --write-behind-->  NVMe (a clean copy, written behind the caller; a block
                                    read back from NVMe keeps its record)

Pure: built once from the tiers a store has and its config, answers questions about tiers,
never sees a key, does no I/O and takes no lock (like every policy). The store and its mover
(tierstore/moves.py) ask it; mechanism (copies, slots, the write-behind queue) stays there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tierstore.types import Tier


@dataclass(frozen=True)
class Placement:
    """Where blocks go between the tiers a store has (see the module docstring)."""

    tiers: frozenset[Tier]
    exclusive: bool = True       # between HBM and DRAM a block lives in one tier

    @classmethod
    def of(cls, tiers: Iterable[Tier], *, exclusive: bool = True) -> "Placement":
        return cls(frozenset(tiers), exclusive)

    def demote_to(self, tier: Tier) -> Tier | None:
        """The tier a victim of ``tier`` is copied into before its slot is freed; None: it is
        dropped (DRAM: NVMe holds its clean copy, or it was not admitted) or deleted (NVMe)."""
        if tier is Tier.HBM and Tier.DRAM in self.tiers:
            return Tier.DRAM
        return None

    def keeps_source(self, src: Tier, dst: Tier) -> bool:
        """Whether a block moved between HBM and DRAM (from ``src`` to ``dst``) keeps its copy
        in ``src``: only when the tiers are not exclusive."""
        return not self.exclusive

    def copies_to_nvme(self, tier: Tier) -> bool:
        """Whether a block that becomes resident in ``tier`` (stored, demoted or moved there)
        gets an NVMe copy written behind the caller: every DRAM block, when NVMe exists."""
        return tier is Tier.DRAM and Tier.NVME in self.tiers
