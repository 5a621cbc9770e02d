"""Pin books under 10,000 mixed operations (issue 6, item 3): pins never go negative, never leak.

An independent model keeps, per owner and block, the deadline of each pin (None = no TTL) and
applies the documented rules (tierstore/index/residency.py, PinBook): an unpin releases a
TTL-less pin first, else the nearest deadline; expiry drops pins whose deadline has passed;
release_owner drops an owner's all. The store runs with a fake clock that moves only in TICK
steps, each followed by a call that expires, so model and store agree after every step."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tierstore.config import DramConfig, StoreConfig
from tierstore.errors import PinError
from tierstore.keys import Keyer, Namespace
from tierstore.store import Store
from tierstore.types import BlockStatus, Tier

B = 16
SLOT = 1024
CAPACITY = 24
NS = Namespace("pin-books", B, num_layers=1, num_kv_heads=1, head_size=8)
OWNERS = ["conn-1", "conn-2", "session:a", "session:b"]
STEPS = 10_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Model:
    """owner -> key -> list of deadlines (None: no TTL)."""

    def __init__(self) -> None:
        self.pins: dict[str, dict[bytes, list]] = {}

    def pin(self, owner, key, deadline) -> None:
        self.pins.setdefault(owner, {}).setdefault(key, []).append(deadline)

    def holds(self, owner, key) -> int:
        return len(self.pins.get(owner, {}).get(key, []))

    def unpin(self, owner, key) -> None:
        ds = self.pins[owner][key]
        ds.remove(None if None in ds else min(ds))
        self._prune(owner, key)

    def _prune(self, owner, key) -> None:
        if not self.pins[owner][key]:
            del self.pins[owner][key]
        if not self.pins[owner]:
            del self.pins[owner]

    def release(self, owner) -> int:
        return sum(len(v) for v in self.pins.pop(owner, {}).values())

    def expire(self, now) -> int:
        n = 0
        for owner in list(self.pins):
            for key in list(self.pins[owner]):
                ds = self.pins[owner][key]
                keep = [d for d in ds if d is None or d > now]
                n += len(ds) - len(keep)
                self.pins[owner][key] = keep
                self._prune(owner, key)
        return n

    def count(self, key) -> int:
        return sum(len(d.get(key, [])) for d in self.pins.values())

    def pinned_keys(self) -> set:
        return {k for d in self.pins.values() for k in d}


def _check(store: Store, model: Model, step: int) -> None:
    res, book = store.res, store.pins
    where = f"after step {step}"
    for key, h in res.handles():
        assert res.pins[h] >= 0, where
        ledger = sum(book.held(o).get(key, 0) for o in book.owners())
        assert res.pins[h] == ledger, f"{where}: residency {res.pins[h]} != ledger {ledger}"
        assert res.pins[h] == model.count(key), where
    assert sorted(book.owners()) == sorted(model.pins), where
    for owner, held in model.pins.items():
        assert book.held(owner) == {k: len(ds) for k, ds in held.items()}, where
        for k, ds in held.items():
            assert book.deadlines(owner, k) == sorted(d for d in ds if d is not None), where
    for k in model.pinned_keys():
        assert k in res, f"{where}: a pinned block is gone"


@pytest.mark.parametrize("seed", [0, 1])
def test_pin_books_balance_over_10000_mixed_operations(seed):
    """Lookup-pin (with/without TTL), pin, unpin, double unpin, release_owner, store, load,
    evict and TTL expiry at random; the books are checked after every step; a block is never
    evicted while pinned; nothing is left pinned at the end."""
    rng = random.Random(seed)
    clock = FakeClock()
    store = Store.open(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=CAPACITY)),
                       clock=clock)
    keyer = Keyer(NS, b"s" * 32)
    chains = [keyer.chain_from_block_ids([c * 100 + j for j in range(10)]) for c in range(8)]
    model = Model()
    loads: dict[int, list[bytes]] = {}   # job id -> keys it pinned (owner job:<id>)
    done = Counter()

    evicted_pinned = []
    clear_slot = store.res.clear_slot

    def checking_clear_slot(h, tier):   # every DRAM slot clear here is an eviction or a drop
        if store.res.pins[h] != 0:
            evicted_pinned.append(store.res.key_of(h))
        return clear_slot(h, tier)

    store.res.clear_slot = checking_clear_slot

    def chain_part():
        c = rng.choice(chains)
        return list(c[: rng.randint(1, len(c))])

    def ttl():
        return None if rng.random() < 0.4 else float(rng.randint(1, 60))

    for step in range(STEPS):
        op = rng.choices(["lookup_pin", "pin", "unpin", "double_unpin", "release", "store", "load",
                          "complete_load", "evict", "tick"],
                         [14, 8, 14, 4, 3, 20, 8, 8, 6, 8])[0]
        owner = rng.choice(OWNERS)
        if op == "lookup_pin":
            t = ttl()
            r = store.lookup(chain_part(), NS, pin=True, owner=owner, ttl_s=t)
            for k in r.keys:
                model.pin(owner, k, None if t is None else clock.now + t)
        elif op == "pin":
            keys, t = chain_part(), ttl()
            want = [k for k in keys if k in store.res]
            assert store.pin(keys, owner=owner, ttl_s=t) == len(want)
            for k in want:
                model.pin(owner, k, None if t is None else clock.now + t)
        elif op == "unpin":
            held = model.pins.get(owner)
            if not held:
                continue
            k = rng.choice(sorted(held))
            assert store.unpin([k], owner=owner) == 1
            model.unpin(owner, k)
        elif op == "double_unpin":   # a key the owner holds no pin on: refused, nothing changes
            k = rng.choice(rng.choice(chains))
            if model.holds(owner, k):
                continue
            before = store.res.pins[store.res.get(k)] if k in store.res else None
            with pytest.raises(PinError):
                store.unpin([k], owner=owner)
            assert (store.res.pins[store.res.get(k)] if k in store.res else None) == before
        elif op == "release":
            r = store.release_owner(owner)
            assert r["pins_released"] == model.release(owner)
        elif op == "store":
            keys = chain_part()
            store.put(keys, NS, [k * (SLOT // 32) for k in keys])
        elif op == "load":
            job = store.prepare_load(chain_part(), owner="loader")
            ready = job.keys[: job.num_ready]
            assert all(s is BlockStatus.OK for s in job.status[: job.num_ready])
            for k in ready:
                model.pin(f"job:{job.job_id}", k, None)
            if ready:
                loads[job.job_id] = ready
            else:
                store.complete_load(job.job_id)
        elif op == "complete_load":
            if not loads:
                continue
            jid = rng.choice(sorted(loads))
            store.complete_load(jid, ok=rng.random() < 0.8)
            del loads[jid]
            model.release(f"job:{jid}")
        elif op == "evict":
            keys = rng.sample(rng.choice(chains), 3)
            pinned = {k for k in keys if model.count(k)}
            resident = {k for k in keys if k in store.res}
            r = store.evict(keys)
            assert r.get("pinned", 0) == len(pinned & resident)
            assert r.get("evicted", 0) == len(resident - pinned)
        elif op == "tick":
            clock.now += rng.choice([0.5, 1, 5, 20, 61])
            before = store.counters["pins_expired"]
            store.pin([], owner="nobody")   # any store call that expires
            assert store.counters["pins_expired"] - before == model.expire(clock.now)
        done[op] += 1
        assert not evicted_pinned, f"step {step}: pinned blocks evicted"
        _check(store, model, step)

    # wind down: finish loads, release the connections, let the sessions' TTLs run out
    for jid in list(loads):
        store.complete_load(jid)
        model.release(f"job:{jid}")
    for owner in ("conn-1", "conn-2"):
        assert store.release_owner(owner)["pins_released"] == model.release(owner)
    for owner in ("session:a", "session:b"):   # TTL-less session pins would leak: unpin them
        for k, ds in list(model.pins.get(owner, {}).items()):
            for _ in range(ds.count(None)):
                store.unpin([k], owner=owner)
                model.unpin(owner, k)
    clock.now += 3600
    store.pin([], owner="nobody")
    model.expire(clock.now)
    _check(store, model, STEPS)
    assert store.pins.total() == 0 and store.pins.owners() == []
    assert all(store.res.pins[h] == 0 for _, h in store.res.handles())
    assert len(store.pins._expiry) <= 64 or not store.pins._expiry, "stale TTL entries pile up"
    # every kind of step ran, and the interesting paths were taken
    assert min(done.values()) > 50, done
    assert store.counters["pins_expired"] > 100 and store.counters["evictions_dram"] > 100
    assert store.check() == []


def test_unpin_releases_ttl_less_pin_first_and_repin_gets_a_fresh_deadline():
    """Scenario: pin with TTL 10 s, unpin, pin again with TTL 100 s; at t+20 s the second pin
    must still hold (the first pin's stale deadline must not release it). And with one TTL pin
    and one TTL-less pin, an unpin keeps the TTL pin, which then expires: no leak."""
    clock = FakeClock()
    store = Store.open(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=4)), clock=clock)
    keys = Keyer(NS, b"s" * 32).chain_from_block_ids([1, 2])
    store.put(keys, NS, [k * (SLOT // 32) for k in keys])
    k = keys[0]
    store.pin([k], owner="s", ttl_s=10)
    store.unpin([k], owner="s")
    store.pin([k], owner="s", ttl_s=100)
    clock.now += 20
    assert store.block(k)["pins"] == 1
    clock.now += 100
    assert store.block(k)["pins"] == 0

    store.pin([k], owner="s", ttl_s=10)
    store.pin([k], owner="s")
    store.unpin([k], owner="s")
    assert store.pins.deadlines("s", k) == [clock.now + 10]
    clock.now += 11
    assert store.block(k)["pins"] == 0 and store.pins.owners() == []
    assert store.res.slot(store.res.get(k), Tier.DRAM) >= 0


def test_pin_ttl_must_be_finite_and_bounded():
    """Adversarial finding: a TTL of inf (or 1e24 s) made a pin that never expires."""
    import math

    from tierstore.errors import ConfigError, PinError
    from tierstore.index.residency import MAX_PIN_TTL_S, PinBook, Residency, session_owner
    from tierstore.types import Tier
    from tierstore.units import parse_duration

    r = Residency()
    r.set_slot(r.add(b"k" * 32, 0, 1), Tier.DRAM, 0)
    p = PinBook(r)
    for bad in (math.inf, math.nan, MAX_PIN_TTL_S * 2, 0.0, -1.0):
        with pytest.raises(PinError):
            p.pin("o", b"k" * 32, ttl_s=bad)
        with pytest.raises(PinError):
            session_owner("s", bad)
    assert p.total() == 0
    with pytest.raises(ConfigError):
        parse_duration("9" * 400)
