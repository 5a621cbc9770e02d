"""Residency map and pin books."""

import pytest

from tierstore.errors import PinError
from tierstore.index.prefix import longest_prefix
from tierstore.index.residency import PinBook, Residency
from tierstore.types import Tier


def test_handles_are_reused_and_slots_tracked():
    r = Residency()
    h = r.add(b"a" * 32, 0, 100, 7)
    r.set_slot(h, Tier.NVME, 5)
    r.set_slot(h, Tier.DRAM, 2)
    assert r.nearest(h) is Tier.DRAM and r.tiers_of(h) == [Tier.DRAM, Tier.NVME]
    r.clear_slot(h, Tier.DRAM)
    r.clear_slot(h, Tier.NVME)
    r.remove(h)
    h2 = r.add(b"b" * 32, 0, 1)
    assert h2 == h and r.slot(h2, Tier.DRAM) == -1 and r.checksum[h2] == 0


def test_remove_refuses_pinned_or_resident():
    r = Residency()
    h = r.add(b"a" * 32, 0, 1)
    r.set_slot(h, Tier.DRAM, 0)
    with pytest.raises(RuntimeError):
        r.remove(h)
    r.clear_slot(h, Tier.DRAM)
    r.pins[h] = 1
    with pytest.raises(PinError):
        r.remove(h)


def test_longest_prefix_stops_at_first_miss():
    r = Residency()
    keys = [bytes([i]) * 32 for i in range(5)]
    for i in (0, 1, 3):
        r.set_slot(r.add(keys[i], 0, 1), Tier.DRAM, i)
    assert [r.key_of(h) for h in longest_prefix(r, keys)] == keys[:2]


def test_pin_books_per_owner_never_negative():
    r = Residency()
    key = b"k" * 32
    r.set_slot(r.add(key, 0, 1), Tier.DRAM, 0)
    p = PinBook(r)
    p.pin("a", key)
    p.pin("a", key)
    p.pin("b", key)
    assert r.pins[0] == 3 and p.total() == 3
    p.unpin("a", key)
    with pytest.raises(PinError):
        p.unpin("c", key)
    assert p.release_owner("a") == 1
    assert r.pins[0] == 1
    p.unpin("b", key)
    with pytest.raises(PinError):
        p.unpin("b", key)
    assert r.pins[0] == 0 and p.total() == 0 and p.owners() == []


def test_ttl_pins_expire():
    now = [0.0]
    r = Residency()
    key = b"k" * 32
    r.set_slot(r.add(key, 0, 1), Tier.DRAM, 0)
    p = PinBook(r, clock=lambda: now[0])
    p.pin("a", key, ttl_s=5)
    assert p.expire() == 0
    now[0] = 5.0
    assert p.expire() == 1 and r.pins[0] == 0
    with pytest.raises(PinError):
        p.pin("a", b"z" * 32)
