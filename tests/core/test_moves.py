"""The store's mover (tierstore/moves.py): eviction is atomic in vLLM's sense (issue 16 item 2)."""

import pickle

import pytest

from tierstore.config import DramConfig, StoreConfig
from tierstore.keys import Keyer, Namespace
from tierstore.store import Store
from tierstore.types import BlockStatus, Tier

B = 16
SLOT = 4096
NS = Namespace("model-a", B, revision="r1", kv_dtype="bfloat16", kv_layout="NHD",
               num_layers=2, num_kv_heads=2, head_size=32, tp_size=2, tp_rank=0)
SECRET = b"k" * 32
POLICIES = ["lru", "s3fifo", "arc", "gdsf", "prefix-lru", "prefix-lhd"]


def make_store(policy: str, capacity: int = 6) -> Store:
    return Store.open(StoreConfig(slot_bytes=SLOT,
                                  dram=DramConfig(capacity_blocks=capacity, policy=policy)))


def chain(start: int, n: int):
    return Keyer(NS, SECRET).chain(list(range(start, start + n * B)))


def put(s, keys):
    return s.put(keys, NS, [k * (SLOT // 32) for k in keys])


def state(s: Store) -> tuple:
    """Everything an eviction could change: the index, the tier's slots, the policy, counters."""
    return (s.blocks(), s.tiers[Tier.DRAM].usage(), dict(s.counters),
            pickle.dumps(s.policies[Tier.DRAM]), s.stats()["pins"])


@pytest.mark.parametrize("policy", POLICIES)
def test_make_room_for_more_than_can_be_evicted_changes_nothing(policy):
    """A full DRAM tier of 6 blocks, 4 of them pinned: making room for 3 finds only 2 victims,
    so it evicts none (the index, the tier's occupancy, the policy's state and the counters
    are unchanged) where it used to evict the 2 it found; making room for 2 evicts exactly 2."""
    s = make_store(policy)
    P, Q = chain(0, 4), chain(1000, 2)
    assert put(s, P) == [BlockStatus.OK] * 4 and put(s, Q) == [BlockStatus.OK] * 2
    assert s.lookup(P, NS, pin=True, owner="reader").num_blocks == 4
    before = state(s)
    assert s.mover.make_room(Tier.DRAM, 3) == 0
    assert state(s) == before
    assert s.mover.make_room(Tier.DRAM, 2) == 2
    assert s.counters["evictions_dram"] == 2
    assert s.lookup(Q, NS).num_blocks == 0 and s.lookup(P, NS).num_blocks == 4
    assert s.check() == []
    s.close()


def test_a_store_short_of_victims_still_takes_what_fits_one_by_one():
    """The caller of an eviction that cannot be had whole makes room one slot at a time:
    storing 3 new blocks where 2 can be evicted stores 2 and skips 1, as before."""
    s = make_store("lru")
    P, Q = chain(0, 4), chain(1000, 2)
    put(s, P)
    put(s, Q)
    s.lookup(P, NS, pin=True, owner="reader")
    assert put(s, chain(5000, 3)) == [BlockStatus.OK, BlockStatus.OK, BlockStatus.SKIPPED]
    assert s.counters["evictions_dram"] == 2 and s.counters["store_skipped"] == 1
    assert s.check() == []
    s.close()
