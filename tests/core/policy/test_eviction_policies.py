"""Contract and behaviour tests for every eviction policy in the registry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierstore.policy import EVICTION, make_eviction
from tierstore.policy.gdsf import GDSF
from tierstore.policy.prefix_aware import PrefixGDSF, PrefixLRU
from tierstore.policy.s3fifo import S3FIFO

ALL = sorted(EVICTION)
SIZE = 1 << 20
EVERYTHING = lambda _k: True  # noqa: E731


def fill(policy, keys, chain=False):
    parent = None
    for k in keys:
        policy.insert(k, SIZE, parent if chain else None)
        parent = k


@pytest.mark.parametrize("name", ALL)
def test_victim_is_resident_evictable_and_does_not_mutate(name):
    p = make_eviction(name, 8)
    fill(p, range(8), chain=True)
    p.access(3)
    first = p.victim(EVERYTHING)
    assert first in range(8)
    assert p.victim(EVERYTHING) == first  # no state change between calls
    assert len(p) == 8
    blocked = p.victim(lambda k: k != first)
    assert blocked is not None and blocked != first
    assert p.victim(lambda k: False) is None


@pytest.mark.parametrize("name", ALL)
def test_remove_unknown_key_is_noop_and_empty_has_no_victim(name):
    p = make_eviction(name, 4)
    p.remove("nope")
    p.access("nope")
    assert p.victim(EVERYTHING) is None
    fill(p, "ab")
    p.remove("zzz")
    assert len(p) == 2


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["insert", "access", "remove", "evict"]),
                              st.integers(0, 15), st.integers(-1, 15)), max_size=120))
def test_resident_set_matches_model(name, ops):
    """Any op sequence: the policy tracks exactly the resident set; victim returns a member."""
    p = make_eviction(name, 6)
    model: set = set()
    for op, k, parent in ops:
        if op == "insert" and k not in model:
            p.insert(k, SIZE, None if parent < 0 else parent)
            model.add(k)
        elif op == "access" and k in model:
            p.access(k)
        elif op == "remove":
            p.remove(k)
            model.discard(k)
        elif op == "evict":
            v = p.victim(lambda x: x % 3 != 0)
            if v is not None:
                assert v in model and v % 3 != 0
                p.remove(v)
                model.discard(v)
            else:
                assert all(x % 3 == 0 for x in model)
        assert len(p) == len(model)
        v = p.victim(EVERYTHING)
        assert (v in model) if model else v is None


CIRCLES = [
    [(1, 2), (2, 1)],                        # two blocks, each the other's parent
    [(1, 3), (2, 1), (3, 2)],                # a circle of three, stored child first
    [(2, 1), (1, 2), (3, 2)],                # a circle with a chain hanging off it
    [(5, None), (1, 2), (2, 1), (3, 1)],     # a real root beside a circle
    [(1, 1)],                                # a block its own parent
]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("links", CIRCLES)
def test_circular_parent_links_never_hang_a_policy(name, links):
    """A store's keys form a hash chain, but ``parent`` comes from the caller: a client (or a
    daemon client) that names parents in a circle must not send a policy into an endless walk
    under the store's lock (prefix-lhd's adoption and orphan walks did: the whole store hung).
    Every block stays evictable, one at a time, until none is left."""
    p = make_eviction(name, 6)
    for k, parent in links:
        p.insert(k, SIZE, parent)
    gone = []
    while len(p):
        v = p.victim(EVERYTHING)
        assert v is not None and v not in gone
        p.remove(v)
        gone.append(v)
    assert sorted(gone) == sorted({k for k, _ in links})


def test_s3fifo_one_hit_wonders_leave_from_small_queue():
    p = S3FIFO(10)
    fill(p, range(5))
    for k in range(5):
        p.access(k)
    for v in range(100, 110):  # a scan of one-hit wonders
        while len(p) >= 10:
            x = p.victim(EVERYTHING)
            p.remove(x)
        p.insert(v, SIZE)
    assert all(k in p._freq for k in range(5)), "touched keys survive the scan"


def test_gdsf_ages_out_formerly_hot_keys():
    p = GDSF(3)
    p.insert("old", SIZE)
    for _ in range(3):
        p.access("old")  # H = 4
    for i in range(20):  # a stream of keys each touched a few times pushes the clock up
        while len(p) >= 3:
            p.remove(p.victim(EVERYTHING))
        p.insert(i, SIZE)
        p.access(i)
    assert "old" not in p._freq, "aging lets a stale hot key go"


def test_gdsf_prefers_frequent_keys():
    p = GDSF(3)
    fill(p, "abc")
    p.access("a")
    p.access("c")
    assert p.victim(EVERYTHING) == "b"
    p.remove("x")
    assert p.victim(lambda k: k != "b") == "a"  # every leaf pinned: an inner block as last resort


@pytest.mark.parametrize("cls", [PrefixLRU, PrefixGDSF])
def test_prefix_aware_evicts_leaves_before_parents(cls):
    p = cls(10)
    fill(p, ["a", "b", "c"], chain=True)  # a <- b <- c
    p.insert("x", SIZE, None)
    p.access("a")  # the root is the most recent, yet it has children
    order = []
    while len(p):
        v = p.victim(EVERYTHING)
        order.append(v)
        p.remove(v)
    assert order.index("c") < order.index("b") < order.index("a")


@pytest.mark.parametrize("cls", [PrefixLRU, PrefixGDSF])
def test_prefix_aware_orphans_go_first(cls):
    p = cls(10)
    fill(p, ["a", "b"], chain=True)
    p.insert("z", SIZE, "gone")  # parent not resident: cannot be hit
    p.access("a")
    p.access("b")
    assert p.victim(EVERYTHING) == "z"


def test_prefix_aware_parent_removed_orphans_children_and_readopts():
    p = PrefixLRU(10)
    fill(p, ["a", "b", "c"], chain=True)
    p.insert("y", SIZE, None)
    p.remove("b")  # store deleted a middle block: c is now unreachable
    assert p.victim(EVERYTHING) == "c"
    p.insert("b", SIZE, "a")
    p.access("c")  # chain whole again: c is an ordinary leaf
    assert p.victim(EVERYTHING) == "y"


def test_prefix_aware_skips_pinned_leaf():
    p = PrefixLRU(10)
    fill(p, ["a", "b"], chain=True)
    p.insert("x", SIZE)
    assert p.victim(lambda k: k != "b") == "x"
    assert p.victim(EVERYTHING) == "b"
    p.remove("x")
    assert p.victim(lambda k: k != "b") == "a"  # every leaf pinned: an inner block as last resort
