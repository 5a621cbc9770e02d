"""Answers of a lookup across nodes: where each hit block lives (this node's tier or a peer's).

Owns :class:`Location`, :class:`ClusterLookup` (a superset of :class:`tierstore.types.LookupResult`)
and :func:`decode_locations`, the reading of a LOOKUP reply's ``tiers`` bin plus ``remote`` runs.
The daemon (daemon/peers.py) builds these answers; the daemon's client (client/remote.py) decodes
them from its socket. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierstore.errors import TierStoreError
from tierstore.types import LookupResult, Tier

@dataclass(frozen=True)
class Location:
    """Where one hit block lives: ``tier`` on this node (``peer`` None) or on peer ``peer``."""

    tier: Tier
    peer: str | None = None

    @property
    def local(self) -> bool:
        return self.peer is None

    @property
    def label(self) -> str:
        return self.tier.label if self.peer is None else f"peer:{self.peer}/{self.tier.label}"


@dataclass(frozen=True)
class ClusterLookup(LookupResult):
    """Answer of a lookup across nodes: a :class:`tierstore.types.LookupResult` whose ``keys`` are
    the hit prefix (local blocks first, then blocks only peers hold) and whose ``tiers`` name
    :attr:`Tier.PEER` for remote blocks, plus ``locations`` (the exact place of each block) and
    ``local_blocks``. Only the local blocks are pinned (``pinned``); remote ones are leased at
    fetch time. Build it with :meth:`of`."""

    locations: tuple[Location, ...] = ()
    local_blocks: int = 0

    @classmethod
    def of(cls, keys, locations, block_size: int, local_blocks: int, *, pinned: bool = False,
           owner: str = "") -> "ClusterLookup":
        locations = tuple(locations)
        tiers = tuple(loc.tier if loc.local else Tier.PEER for loc in locations)
        return cls(tuple(keys), tiers, block_size, pinned, owner, locations, local_blocks)

    @property
    def remote_blocks(self) -> int:
        return len(self.keys) - self.local_blocks

    def by_peer(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for loc in self.locations:
            if loc.peer is not None:
                out[loc.peer] = out.get(loc.peer, 0) + 1
        return out


def decode_locations(reply: dict) -> tuple[int, list[Location]]:
    """(local blocks, locations) from a LOOKUP reply (``tiers`` bin + ``remote`` runs)."""
    n = int(reply["n"])
    local = int(reply.get("local", n))
    tiers = bytes(reply["tiers"])
    if len(tiers) != n or not 0 <= local <= n:
        raise TierStoreError("lookup reply: tiers and counts disagree")
    locs = [Location(Tier(tiers[i])) for i in range(local)]
    i = local
    for name, count in reply.get("remote", []):
        for _ in range(int(count)):
            if i >= n:
                raise TierStoreError("lookup reply: remote runs longer than the hit")
            locs.append(Location(Tier(tiers[i]), str(name)))
            i += 1
    if i != n:
        raise TierStoreError("lookup reply: remote runs shorter than the hit")
    return local, locs
