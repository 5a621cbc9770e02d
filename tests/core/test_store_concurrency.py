"""NVMe I/O runs off the caller's path and with the store lock released: other threads go on,
nothing goes wrong.

The store writes NVMe copies from its flusher thread (tierstore/writebehind.py), stages
asynchronous loads on its loader thread, and releases its lock around NVMe ``read_batch`` /
``write_batch`` (tierstore/moves.py). These tests hold a read or a write inside the tier on an
Event and check what other threads can do meanwhile, what they must not be able to do (free a
slot in use, promote a block twice, wait for the disk), and that random concurrent traffic never
returns wrong bytes and leaves ``check()`` clean.
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


def cfg(tmp: Path, dram=4, nvme=64, **nvme_kw) -> StoreConfig:
    return StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=dram),
                       nvme=NvmeConfig(path=str(tmp / "nvme"), capacity_blocks=nvme,
                                       file_slots=16, **nvme_kw))


def chain(i: int, n: int = 4) -> list[bytes]:
    return KEYER.chain(list(range(i * 10_000, i * 10_000 + n * B)))


def payload(keys):
    return [k * (SLOT // 32) for k in keys]


def store_with_cold(tmp: Path, dram: int, cold: list[bytes], *later: list[bytes]) -> Store:
    """A store where ``cold`` was stored first and pushed out of DRAM by the ``later`` chains
    (each flushed to NVMe before the next, so every DRAM victim is a clean copy)."""
    s = Store.open(cfg(tmp, dram=dram))
    for c in (cold, *later):
        s.put(c, NS, payload(c))
        assert s.flush(timeout_s=WAIT_S)
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
    assert set(s.lookup(hot, NS).tiers) == {Tier.DRAM}    # the loader evicted chain 4, not hot
    assert loader.is_alive()
    gate.release.set()
    assert finished(loader, res) == payload(cold)
    assert s.check() == []
    s.close()


def test_a_store_returns_before_its_nvme_copy_is_written(tmp_path):
    """Issue 12 build item 1: complete_store returns once the blocks are in DRAM and indexed;
    the NVMe copy is written behind it. While the flusher's write is held inside the tier the
    blocks are visible, pinned (no eviction), and ``flush`` waits for them."""
    s = Store.open(cfg(tmp_path, dram=8))
    gate = Gate(s.tiers[Tier.NVME], "write_batch")
    keys = chain(1)
    assert s.put(keys, NS, payload(keys)) == [BlockStatus.OK] * 4   # returns: no disk wait
    assert gate.entered.wait(WAIT_S)          # the flusher is inside write_batch now
    assert s.lookup(keys, NS).num_blocks == 4 and s.get(keys) == payload(keys)
    assert s.evict(keys) == {"pinned": 4}     # being written: never a victim
    assert s.flush(timeout_s=0.2) is False
    flusher, out = in_thread(lambda: s.flush(timeout_s=WAIT_S))
    flusher.join(0.3)
    assert flusher.is_alive()
    gate.release.set()
    assert finished(flusher, out) is True
    assert all(b["tiers"] == ["dram", "nvme"] and b["pins"] == 0 for b in map(s.block, keys))
    assert s.check() == []
    s.close()
    s = Store.open(cfg(tmp_path, dram=8))
    assert s.get(keys) == payload(keys)       # the copy is on disk
    s.close()


def store_now(s: Store, keys: list[bytes]) -> list[BlockStatus]:
    """The engine's path: prepare_store without waiting (wait_s=0), fill, complete."""
    job = s.prepare_store(keys, NS, SLOT)
    for sl, b in zip(job.slots, payload(keys)):
        if sl is not None:
            s.slot_view(sl)[:SLOT] = b
    return s.complete_store(job.job_id)


def test_a_full_write_queue_skips_stores_instead_of_waiting(tmp_path):
    """Issue 12 build item 1: when the bytes waiting for their NVMe copy reach
    ``write_queue_bytes``, admission answers SKIPPED at once (counted) instead of blocking the
    caller; queued blocks are never dropped; once the queue drains, stores are taken again. A
    bulk writer (``put``) waits for room instead."""
    s = Store.open(cfg(tmp_path, dram=8, write_queue_bytes=2 * SLOT))
    gate = Gate(s.tiers[Tier.NVME], "write_batch")
    old = chain(1)
    assert store_now(s, old) == [BlockStatus.OK] * 2 + [BlockStatus.SKIPPED] * 2
    assert gate.entered.wait(WAIT_S)             # old[0:2] are being written, held in the tier
    assert s.counters["store_skipped_write_queue"] == 2
    more = chain(2, n=2)
    assert store_now(s, more) == [BlockStatus.SKIPPED] * 2   # no wait for the disk
    assert s.evict(old[:2]) == {"pinned": 2}
    assert s.lookup(old, NS).num_blocks == 2
    writer, out = in_thread(lambda: s.put(more, NS, payload(more)))   # a bulk writer waits
    writer.join(0.3)
    assert writer.is_alive()
    gate.release.set()
    assert finished(writer, out) == [BlockStatus.OK] * 2
    assert s.flush(timeout_s=WAIT_S)
    assert store_now(s, old[2:]) == [BlockStatus.OK] * 2
    assert s.flush(timeout_s=WAIT_S)
    assert s.check() == [] and s.pins.total() == 0
    assert s.stats()["write_behind"]["unwritten_bytes"] == 0
    s.close()
    s = Store.open(cfg(tmp_path, dram=8))
    assert s.get(old) == payload(old) and s.get(more) == payload(more)
    s.close()


def test_an_async_load_returns_before_the_nvme_read_and_polls_ready(tmp_path):
    """Issue 12 build item 4 (store half): prepare_load(wait=False) pins the resident prefix
    and hands the NVMe read to the loader thread; the caller never waits for the disk."""
    cold = chain(1)
    s = store_with_cold(tmp_path, 4, cold, chain(2))
    gate = Gate(s.tiers[Tier.NVME], "read_batch")
    job = s.prepare_load(cold, wait=False)       # returns while the read is held in the tier
    assert not job.ready and job.expected == 4 and job.num_ready == 0
    assert gate.entered.wait(WAIT_S)
    assert s.poll_loads([job.job_id]) == {}
    assert s.evict(cold) == {"pinned": 4}        # promised: pinned until complete_load
    assert s.lookup(chain(2), NS).num_blocks == 4
    gate.release.set()
    staged = s.wait_load(job.job_id, timeout_s=WAIT_S)
    assert staged is not None and staged.ready and staged.num_ready == 4
    assert s.poll_loads([job.job_id])[job.job_id] is staged
    assert [bytes(s.slot_view(x)[:n]) for x, n in zip(staged.slots, staged.sizes)] == payload(cold)
    s.complete_load(job.job_id)
    assert s.pins.total() == 0 and s.check() == []
    hot = s.prepare_load(cold, wait=False)       # all in DRAM now: ready at once
    assert hot.ready and hot.num_ready == 4
    s.complete_load(hot.job_id)
    s.close()


def test_an_async_load_completed_before_it_is_staged_releases_its_pins_later(tmp_path):
    cold = chain(1)
    s = store_with_cold(tmp_path, 4, cold, chain(2))
    gate = Gate(s.tiers[Tier.NVME], "read_batch")
    job = s.prepare_load(cold, wait=False)
    assert gate.entered.wait(WAIT_S)
    s.complete_load(job.job_id)                  # the engine gave up on the request
    assert s.pins.total() == 4
    gate.release.set()
    for _ in range(200):
        if s.pins.total() == 0:
            break
        threading.Event().wait(0.05)
    assert s.pins.total() == 0 and s.check() == []
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


@pytest.mark.parametrize("wait", [True, False])
def test_random_concurrent_traffic_never_returns_wrong_bytes(tmp_path, wait):
    """4 threads, 1,600 random operations over 24 chains on 6 DRAM + 40 NVMe slots: stores,
    loads (bytes checked; synchronous, or asynchronous and polled), pinned lookups, unpins,
    evictions (all tiers, or DRAM copies only), flushes. Afterwards: no pins, no reserved slots,
    check() clean, every resident block's bytes right."""
    s = Store.open(cfg(tmp_path, dram=6, nvme=40))
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
                    job = s.prepare_load(c, wait=wait)
                    if not job.ready:
                        job = s.wait_load(job.job_id, timeout_s=WAIT_S)
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
                elif op < 0.97:
                    s.evict(c, tier=Tier.DRAM)
                elif op < 0.98:
                    s.flush(timeout_s=WAIT_S)
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
    assert s.flush(timeout_s=WAIT_S)
    assert s.pins.total() == 0 and not s._reserved[Tier.DRAM] and not s._reserved[Tier.NVME]
    assert s.check() == []
    for c in chains:
        got = s.get(c)
        assert got == payload(c)[: len(got)]
    s.close()


def test_blocks_nvme_does_not_admit_are_dropped_from_dram_and_hbm_moves_stay_sound(tmp_path):
    """With an NVMe admission policy ("seen-twice") a DRAM block that was never admitted has no
    NVMe copy: DRAM pressure drops it, never writes it, and never leaves a stale policy entry.
    Then the old adversarial path (a block into HBM, DRAM pressure, back through NVMe) keeps
    check() clean and returns right bytes or nothing, also after a reopen."""
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
        assert s.flush(timeout_s=WAIT_S)
    assert s.put(D + E, NS, payload(D + E)) == [BlockStatus.OK] * 2
    assert s.check() == []                             # policy and index agree
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
    assert s.flush(timeout_s=WAIT_S)
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
    assert s.flush(timeout_s=WAIT_S)
    s.evict(c1, tier=Tier.DRAM)              # c1 on NVMe only
    assert s.get([c1[0], c1[0]]) == payload(c1)
    assert s.check() == []
    s.close()
