"""Admission filters: seen-twice, SSD write budget, chaining, registry."""

from __future__ import annotations

import pytest

from tierstore.errors import ConfigError
from tierstore.policy import make_admission, make_eviction
from tierstore.policy.admission import Chain, SeenTwice, WriteBudget
from tierstore.policy.interface import ADMIT, REJECT, Verdict


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_seen_twice_admits_on_second_offer_only():
    f = SeenTwice(window_keys=2)
    assert f.admit("a", 10) == REJECT
    assert f.admit("a", 10) == ADMIT
    assert f.admit("b", 10) == REJECT
    f.admit("c", 10)
    f.admit("d", 10)  # window of 2 distinct keys: "b" is forgotten
    assert f.admit("b", 10) == REJECT


def test_write_budget_throttles_with_time_until_fit_and_refills():
    clock = FakeClock()
    f = WriteBudget(bytes_per_s=100, burst_s=1.0, clock=clock)
    assert f.admit("a", 60) == ADMIT
    v = f.admit("b", 60)
    assert v.verdict is Verdict.THROTTLED and v.after_s == pytest.approx(0.2)
    clock.now_s += 0.2
    assert f.admit("b", 60).admitted
    assert f.admit("huge", 101) == REJECT  # never fits in the bucket


def test_chain_first_refusal_wins_and_budget_not_charged():
    clock = FakeClock()
    budget = WriteBudget(bytes_per_s=100, burst_s=1.0, clock=clock)
    f = Chain([SeenTwice(), budget])
    assert f.admit("a", 100) == REJECT
    assert f.admit("a", 100) == ADMIT  # the whole bucket was still there
    assert f.admit("b", 100) == REJECT


def test_registry_builds_filters_and_rejects_unknown():
    assert isinstance(make_admission("seen-twice"), SeenTwice)
    assert isinstance(make_admission("write-budget", bytes_per_s=10), WriteBudget)
    with pytest.raises(ConfigError):
        make_admission("nope")
    with pytest.raises(ConfigError):
        make_eviction("nope", 4)
