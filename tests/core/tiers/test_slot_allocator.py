"""SlotAllocator hands out the lowest free slot, so batches get ascending runs."""

import random

import pytest

from tierstore.tiers.slot_tier import SlotAllocator


def test_fresh_allocator_hands_out_slots_in_order():
    """Scenario: a new allocator gives 0, 1, 2, ... and None when full."""
    a = SlotAllocator(5)
    assert [a.alloc() for _ in range(5)] == [0, 1, 2, 3, 4]
    assert a.alloc() is None
    assert a.used == 5 and a.free_count == 0


def test_batch_after_frees_in_chain_order_is_one_ascending_run():
    """Scenario: a chain stored in slots 10..19 is evicted root first (slot 10 first), as an
    LRU or ``evict(keys)`` frees it; the next 10 allocations are 10..19 ascending (one run for a
    batched copy), not 19..10 as a last-freed-first list would give."""
    a = SlotAllocator(32)
    for _ in range(20):
        a.alloc()
    for s in range(10, 20):
        a.free(s)
    assert [a.alloc() for _ in range(10)] == list(range(10, 20))


def test_random_frees_then_allocs_are_sorted_and_consistent():
    """Scenario: random frees and allocations; every allocation is the lowest free slot, no slot
    is handed out twice, double frees are refused, and take() removes a specific slot."""
    rng = random.Random(7)
    a = SlotAllocator(200)
    used = {a.alloc() for _ in range(150)}
    for _ in range(500):
        if used and rng.random() < 0.5:
            s = rng.choice(sorted(used))
            a.free(s)
            used.discard(s)
        else:
            free = sorted(set(range(200)) - used)
            s = a.alloc()
            assert s == (free[0] if free else None)
            if s is not None:
                used.add(s)
        assert a.used == len(used)
    free = sorted(set(range(200)) - used)
    if free:
        a.take(free[-1])
        used.add(free[-1])
        assert a.alloc() == (free[0] if len(free) > 1 else None)
    with pytest.raises(ValueError):
        a.free(next(s for s in range(200) if not a.is_used(s)))
