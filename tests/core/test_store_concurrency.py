"""NVMe I/O runs with the store lock released: other threads go on, nothing goes wrong.

The store releases its lock around NVMe ``read_batch`` / ``write_batch`` (tierstore/moves.py).
These tests hold a read or a write inside the tier on an Event and check what other threads can
do meanwhile, what they must not be able to do (free a slot in use, promote a block twice), and
that random concurrent traffic never returns wrong bytes and leaves ``check()`` clean.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

pytest.importorskip("tierstore.tiers.nvme")

from tierstore.config import DramConfig, NvmeConfig, StoreConfig  # noqa: E402
from tierstore.errors import JobError  # noqa: E402
from tierstore.keys import Keyer, Namespace  # noqa: E402
from tierstore.store import Store  # noqa: E402
from tierstore.types import BlockStatus, Tier  # noqa: E402

B = 16
SLOT = 8192
NS = Namespace("m", B, num_layers=2, num_kv_heads=2, head_size=32)
KEYER = Keyer(NS, b"c" * 32)
WAIT_S = 20     # generous bound for "did not block": a held lock would block until released


def cfg(tmp: Path, dram=4, nvme=64, write_through=False) -> StoreConfig:
    return StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=dram),
                       nvme=NvmeConfig(path=str(tmp / "nvme"), capacity_blocks=nvme,
                                       write_through=write_through, file_slots=16))


def chain(i: int, n: int = 4) -> list[bytes]:
    return KEYER.chain(list(range(i * 10_000, i * 10_000 + n * B)))


def payload(keys):
    return [k * (SLOT // 32) for k in keys]


def store_with_cold(tmp: Path, dram: int, cold: list[bytes], *later: list[bytes]) -> Store:
    """A store where ``cold`` was stored first and pushed to NVMe by the ``later`` chains."""
    s = Store.open(cfg(tmp, dram=dram))
    for c in (cold, *later):
        s.put(c, NS, payload(c))
    assert set(s.lookup(cold, NS).tiers) == {Tier.NVME}
    return s


class Gate:
    """Wraps one method of the NVMe tier: the first call signals ``entered`` and waits for
    ``release`` before doing the real work."""

    def __init__(self, tier, name: str) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        real = getattr(tier, name)

        def gated(*a, **kw):
            self.calls += 1
            if self.calls == 1:
                self.entered.set()
                assert self.release.wait(WAIT_S), "gate never released"
            return real(*a, **kw)

        setattr(tier, name, gated)


def in_thread(fn):
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:   # noqa: BLE001 - reported to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def finished(t: threading.Thread, out: dict):
    t.join(WAIT_S)
    assert not t.is_alive(), "thread still blocked"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_lookups_pins_and_dram_traffic_go_on_during_an_nvme_read(tmp_path):
    cold, hot = chain(1), chain(2)
    s = store_with_cold(tmp_path, 8, cold, chain(3), chain(4), hot)   # LRU: chain 3 goes too
    assert set(s.lookup(hot, NS).tiers) == {Tier.DRAM}
    gate = Gate(s.tiers[Tier.NVME], "read_batch")
    loader, res = in_thread(lambda: s.get(cold))
    assert gate.entered.wait(WAIT_S)
    # the read is in progress inside the tier; the store lock must be free
    other, out = in_thread(lambda: (s.lookup(hot, NS, pin=True).num_blocks,
                                    s.get(hot[:2]), s.unpin(hot), s.stats()["blocks"]))
    n, got, unpinned, _ = finished(other, out)
    assert (n, got, unpinned) == (4, payload(hot[:2]), 4)
    assert set(s.lookup(hot, NS).tiers) == {Tier.DRAM}    # the loader demoted chain 4, not hot
    assert loader.is_alive()
    gate.release.set()
    assert finished(loader, res) == payload(cold)
    assert s.check() == []
    s.close()


def test_lookups_go_on_during_a_write_through(tmp_path):
    s = Store.open(cfg(tmp_path, dram=8, write_through=True))
    first = chain(1)
    s.put(first, NS, payload(first))
    gate = Gate(s.tiers[Tier.NVME], "write_batch")
    keys = chain(2)
    writer, res = in_thread(lambda: s.put(keys, NS, payload(keys)))
    assert gate.entered.wait(WAIT_S)
    other, out = in_thread(lambda: (s.lookup(first, NS).num_blocks, s.lookup(keys, NS).num_blocks,
                                    s.evict(keys)))
    n_first, n_keys, ev = finished(other, out)
    # the new blocks are visible (published before the write) and cannot be evicted mid-write
    assert (n_first, n_keys, ev) == (4, 4, {"pinned": 4})
    gate.release.set()
    assert finished(writer, res) == [BlockStatus.OK] * 4
    assert set(s.lookup(keys, NS).tiers) == {Tier.DRAM}
    assert s.blocks(tier=Tier.NVME) and all(b["pins"] == 0 for b in s.blocks())
    s.close()
    s = Store.open(cfg(tmp_path, dram=8, write_through=True))
    assert s.get(keys) == payload(keys)     # the write-through copy is on disk
    s.close()


def test_a_victim_pinned_during_its_demotion_stays_in_dram(tmp_path):
    """A load that pins a block while it is being demoted keeps its slot: the slot is not freed
    under the reader, the block stays in DRAM (and now also on NVMe)."""
    s = Store.open(cfg(tmp_path, dram=4))
    old = chain(1)
    s.put(old, NS, payload(old))
    gate = Gate(s.tiers[Tier.NVME], "write_batch")
    new = chain(2, n=1)
    storer, res = in_thread(lambda: s.put(new, NS, payload(new)))
    assert gate.entered.wait(WAIT_S)
    # exactly one of `old` is being demoted; pin all of `old` through a load job
    job = s.prepare_load(old)
    assert job.num_ready == 4
    views = [bytes(s.slot_view(sl)[:SLOT]) for sl in job.slots]
    gate.release.set()
    assert finished(storer, res) == [BlockStatus.SKIPPED]   # its victim stayed: no room
    assert [bytes(s.slot_view(sl)[:SLOT]) for sl in job.slots] == views == payload(old)
    s.complete_load(job.job_id)
    assert s.counters["evictions_dram_kept_pinned"] == 1
    assert set(s.lookup(old, NS).tiers) == {Tier.DRAM}
    assert s.put(new, NS, payload(new)) == [BlockStatus.OK]   # unpinned now: room is made
    assert s.get(old) == payload(old) and s.get(new) == payload(new)
    assert s.check() == []
    s.close()


def test_two_loads_of_one_cold_chain_read_it_once(tmp_path):
    cold = chain(1)
    s = store_with_cold(tmp_path, 8, cold, chain(2), chain(3))
    before = s.counters["promotions"]
    gate = Gate(s.tiers[Tier.NVME], "read_batch")
    a, ra = in_thread(lambda: s.get(cold))
    assert gate.entered.wait(WAIT_S)
    b, rb = in_thread(lambda: s.get(cold))     # waits for a's promotion, then hits DRAM
    b.join(0.3)
    assert b.is_alive()
    gate.release.set()
    assert finished(a, ra) == finished(b, rb) == payload(cold)
    assert s.counters["promotions"] - before == 4
    assert gate.calls == 1
    assert s.check() == []
    s.close()


def test_close_during_nvme_io_fails_the_operation_cleanly(tmp_path):
    cold = chain(1)
    s = store_with_cold(tmp_path, 4, cold, chain(2))
    gate = Gate(s.tiers[Tier.NVME], "read_batch")
    loader, res = in_thread(lambda: s.prepare_load(cold))
    assert gate.entered.wait(WAIT_S)
    closer, cres = in_thread(s.close)          # waits for the read in flight, then closes
    closer.join(0.3)
    gate.release.set()
    finished(closer, cres)
    with pytest.raises(JobError, match="closed"):
        finished(loader, res)


@pytest.mark.parametrize("write_through", [False, True])
def test_random_concurrent_traffic_never_returns_wrong_bytes(tmp_path, write_through):
    """4 threads, 1,600 random operations over 24 chains on 6 DRAM + 40 NVMe slots: stores,
    loads (bytes checked), pinned lookups, unpins, evictions. Afterwards: no pins, no reserved
    slots, check() clean, every resident block's bytes right."""
    s = Store.open(cfg(tmp_path, dram=6, nvme=40, write_through=write_through))
    chains = [chain(i, n=3) for i in range(24)]
    expect = {k: p for c in chains for k, p in zip(c, payload(c))}
    errors: list[str] = []
    loaded = [0]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        owner = f"t{seed}"
        pinned: list[bytes] = []
        for _ in range(400):
            c = rng.choice(chains)
            op = rng.random()
            try:
                if op < 0.35:
                    s.put(c, NS, payload(c))
                elif op < 0.75:
                    job = s.prepare_load(c)
                    for k, sl, n in zip(job.keys, job.slots, job.sizes):
                        if bytes(s.slot_view(sl)[:n]) != expect[k]:
                            errors.append(f"wrong bytes for {k.hex()[:12]}")
                    loaded[0] += job.num_ready
                    s.complete_load(job.job_id)
                elif op < 0.85:
                    r = s.lookup(c, NS, pin=True, owner=owner)
                    pinned.extend(r.keys)
                elif op < 0.95:
                    if pinned:
                        s.unpin(pinned, owner=owner)
                        pinned.clear()
                else:
                    s.evict(c[-1:])
            except Exception as e:   # noqa: BLE001 - any exception is a failure here
                errors.append(repr(e))
        if pinned:
            s.unpin(pinned, owner=owner)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    assert errors == []
    assert loaded[0] > 0 and s.counters["promotions"] > 0
    assert s.pins.total() == 0 and not s._reserved[Tier.DRAM] and not s._reserved[Tier.NVME]
    assert s.check() == []
    for c in chains:
        got = s.get(c)
        assert got == payload(c)[: len(got)]
    s.close()


def test_a_victim_that_is_not_written_is_still_protected(tmp_path):
    """Adversarial find: a demotion victim the NVMe admission rejects (so it is not written) was
    neither pinned nor in the DRAM policy while the lock was released; another thread could
    evict and re-store it, the demotion then freed the new copy's slot and left a stale policy
    entry, which later made a demotion write another slot's bytes (dram.view(-1)) under its
    key. Now every victim is pinned for the window and freed only with the slot it was picked
    with; check() compares each policy with the index."""
    import dataclasses

    import torch

    from tierstore.config import HbmConfig

    base = cfg(tmp_path, dram=2, nvme=8)
    c = dataclasses.replace(
        base, nvme=dataclasses.replace(base.nvme, admission="seen-twice"),
        hbm=HbmConfig(capacity_blocks=2, device="cpu", policy="lru"))
    s = Store.open(c)
    A, C, X, Y, D, E, F = (chain(i, n=1) for i in range(7))
    for k in (C, X, Y, C, A):       # DRAM: C (offered to NVMe once before), A (never offered)
        s.put(k, NS, payload(k))
    gate = Gate(s.tiers[Tier.NVME], "write_batch")
    t, out = in_thread(lambda: s.put(D + E, NS, payload(D + E)))   # victims C (written), A (not)
    assert gate.entered.wait(WAIT_S)
    assert s.evict(A) == {"pinned": 1}                 # the unwritten victim is protected too
    assert s.put(A, NS, payload(A)) == [BlockStatus.PRESENT]
    gate.release.set()
    assert finished(t, out) == [BlockStatus.OK] * 2
    assert s.check() == []                             # policy and index agree
    # the rest of the old failure path: A into HBM, DRAM pressure, A back through NVMe
    job = s.prepare_store(A, NS, SLOT, tier=Tier.HBM)
    if job.slots[0] is not None:
        s.hbm_tensor(job.slots[0])[:] = torch.frombuffer(bytearray(payload(A)[0]), dtype=torch.uint8)
    s.complete_store(job.job_id)
    s.put(F, NS, payload(F))
    for i in range(100, 103):
        s.put(chain(i, n=1), NS, payload(chain(i, n=1)))
    for k in (A, C, D, E, F):
        got = s.get(k)
        assert got in ([], payload(k))
    assert s.check() == []
    s.close()
    s = Store.open(c)
    assert s.check() == []
    for k in (A, C, D, E, F):
        assert s.get(k) in ([], payload(k))
    s.close()


def test_dram_view_refuses_a_negative_slot():
    """The last line of defence against the bug above: view(-1) must not be the last slot."""
    from tierstore.tiers.dram import DramTier

    t = DramTier(4, 4096)
    with pytest.raises(IndexError):
        t.view(-1)
    assert len(t.view(3)) == 4096
    t.close()


def test_a_load_waiting_on_another_gets_a_clean_error_when_the_store_closes(tmp_path):
    cold = chain(1, n=2)
    s = store_with_cold(tmp_path, 8, cold, chain(2), chain(3))
    s.evict(chain(3))                        # DRAM has room: the waiter needs no demotion
    gate = Gate(s.tiers[Tier.NVME], "read_batch")
    a, ra = in_thread(lambda: s.prepare_load(cold))
    assert gate.entered.wait(WAIT_S)
    b, rb = in_thread(lambda: s.prepare_load(cold))
    b.join(0.3)
    closer, rc = in_thread(s.close)
    closer.join(0.3)
    gate.release.set()
    finished(closer, rc)
    for t, r in ((a, ra), (b, rb)):
        with pytest.raises(JobError, match="closed"):
            finished(t, r)


def test_a_repeated_key_ends_the_loaded_prefix(tmp_path):
    """prepare_load([k, k]) stages one slot per block: the repeat ends the prefix (adversarial
    find: it staged two DRAM slots for one block and leaked one)."""
    s = Store.open(cfg(tmp_path, dram=4))
    c1 = chain(1, n=1)
    s.put(c1, NS, payload(c1))
    s.put(chain(2), NS, payload(chain(2)))   # c1 -> NVMe
    s.evict(chain(2)[2:])
    assert s.get([c1[0], c1[0]]) == payload(c1)
    assert s.check() == []
    s.close()
