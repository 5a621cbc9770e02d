"""Pinning the DRAM slab: chunk plan, rollback, error clearing, one decision across TP ranks.

Fake pointers and sizes only: the fake registrar records calls and never touches memory.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierstore.errors import ConfigError, RejectedError
from tierstore.tiers.pinning import (
    GiB, HostPinning, NoopRegistrar, PinDecision, PinPolicy, RegistrationFailed, apply_decision,
    decide_across_ranks, map_shared_slab, pin_buffer, plan_chunks)

BASE = 0x7F00_0000_0000
SLOT = 2 * 2**20   # Llama-3-8B block: 2 MiB


class FakeRegistrar:
    """Hand-written fake: rejects single calls above ``max_call_bytes`` and/or fails call number
    ``fail_call`` (0-based); records every call; tracks what is registered now."""

    pinned = True

    def __init__(self, max_call_bytes: int | None = None, fail_call: int | None = None) -> None:
        self.max_call_bytes = max_call_bytes
        self.fail_call = fail_call
        self.calls: list[tuple] = []
        self.registered: dict[int, int] = {}
        self.error_pending = False
        self._n = 0

    def register(self, ptr, size):
        self.calls.append(("register", ptr, size))
        k, self._n = self._n, self._n + 1
        if (self.max_call_bytes is not None and size > self.max_call_bytes) or k == self.fail_call:
            self.error_pending = True
            raise RegistrationFailed("cudaErrorInvalidValue")
        self.registered[ptr] = size

    def unregister(self, ptr):
        self.calls.append(("unregister", ptr))
        del self.registered[ptr]

    def clear_error(self):
        self.calls.append(("clear_error",))
        self.error_pending = False

    def count(self, name):
        return sum(1 for c in self.calls if c[0] == name)


def test_mem22_600gb_tier_vs_512gib_call_limit():
    """MEM-22: a 600 GB DRAM tier against a registrar rejecting any single call > 512 GiB;
    chunks <= 64 GiB on slot boundaries register it all."""
    num_slots = 600 * 10**9 // SLOT
    size = num_slots * SLOT
    reg = FakeRegistrar(max_call_bytes=512 * GiB)
    res = HostPinning(reg).pin(BASE, size, SLOT)
    assert res.pinned and res.error is None
    assert sum(n for _, n in res.chunks) == size
    assert len(res.chunks) == -(-size // (64 * GiB))
    pos = BASE
    for ptr, n in res.chunks:
        assert ptr == pos and n <= 64 * GiB and (ptr - BASE) % SLOT == 0 and n % SLOT == 0
        pos += n
    assert reg.count("unregister") == 0 and not reg.error_pending


def test_mem22_single_call_over_limit_rolls_back_and_clears():
    """MEM-22: a chunk cap above the registrar's limit fails on the first call; nothing stays
    registered, the error is cleared once, the tier runs unpinned."""
    reg = FakeRegistrar(max_call_bytes=512 * GiB)
    p = HostPinning(reg, max_chunk_bytes=1024 * GiB)
    res = p.pin(BASE, 600 * 10**9 // SLOT * SLOT, SLOT)
    assert not res.pinned and res.failed_chunk == 0 and "chunk 0" in res.error
    assert reg.registered == {} and reg.count("clear_error") == 1 and not reg.error_pending


def test_mem22_chunk_3_of_10_fails():
    """MEM-22: chunk 3 of 10 fails => chunks 0..2 unregistered exactly once each, the error is
    cleared, nothing stays registered, later unpin does nothing."""
    reg = FakeRegistrar(fail_call=3)
    p = HostPinning(reg, max_chunk_bytes=64 * SLOT)
    res = p.pin(BASE, 640 * SLOT, SLOT)
    assert not res.pinned and res.failed_chunk == 3
    assert reg.count("register") == 4
    unreg = [c[1] for c in reg.calls if c[0] == "unregister"]
    assert sorted(unreg) == [BASE, BASE + 64 * SLOT, BASE + 128 * SLOT]
    assert reg.calls[-1] == ("clear_error",) and reg.count("clear_error") == 1
    assert reg.registered == {} and not reg.error_pending
    p.unpin()
    assert reg.count("unregister") == 3


def test_mem22_tp2_only_rank1_fails_same_decision():
    """MEM-22: TP=2 where only rank 1's registration fails: both ranks get the same decision;
    rank 0 unpins (PREFER) so both run unpinned, or both refuse (REQUIRE)."""
    for policy, expected in [(PinPolicy.PREFER, PinDecision.UNPINNED),
                             (PinPolicy.REQUIRE, PinDecision.REFUSE)]:
        regs = [FakeRegistrar(), FakeRegistrar(fail_call=1)]
        pins = [HostPinning(r, max_chunk_bytes=4 * SLOT) for r in regs]
        results = [p.pin(BASE, 16 * SLOT, SLOT) for p in pins]
        assert [r.pinned for r in results] == [True, False]
        decisions = [decide_across_ranks(results, policy) for _ in pins]   # each rank decides
        assert decisions == [expected, expected]
        for p, d in zip(pins, decisions):
            if d is PinDecision.REFUSE:
                with pytest.raises(RejectedError):
                    apply_decision(p, d)
            else:
                apply_decision(p, d)
        assert regs[0].registered == {} and regs[1].registered == {}
        assert regs[0].count("unregister") == 4


def test_all_ranks_pinned():
    assert decide_across_ranks([True, True, True]) is PinDecision.PINNED
    assert decide_across_ranks([]) is PinDecision.UNPINNED


@given(num_slots=st.integers(0, 5000), slot=st.integers(1, 1 << 22),
       cap_slots=st.integers(1, 700), extra=st.integers(0, 4095))
def test_plan_chunks_slot_aligned_and_capped(num_slots, slot, cap_slots, extra):
    cap = cap_slots * slot + min(extra, slot - 1)
    size = num_slots * slot
    chunks = plan_chunks(size, slot, cap)
    assert sum(n for _, n in chunks) == size
    pos = 0
    for off, n in chunks:
        assert off == pos and 0 < n <= cap and off % slot == 0 and n % slot == 0
        pos += n


def test_chunk_cap_below_one_slot():
    with pytest.raises(ConfigError):
        plan_chunks(10 * SLOT, SLOT, SLOT - 1)


def test_no_cuda_runs_unpinned():
    res = HostPinning(NoopRegistrar()).pin(BASE, 10 * SLOT, SLOT)
    assert not res.pinned and "unpinned" in res.error


def test_unpin_once_and_double_pin_refused():
    reg = FakeRegistrar()
    p = HostPinning(reg, max_chunk_bytes=2 * SLOT)
    assert p.pin(BASE, 5 * SLOT, SLOT).pinned
    assert [c[2] for c in reg.calls] == [2 * SLOT, 2 * SLOT, SLOT]
    with pytest.raises(ConfigError):
        p.pin(BASE, 5 * SLOT, SLOT)
    p.unpin()
    p.unpin()
    assert reg.count("unregister") == 3 and reg.registered == {}


def test_pin_dram_tier_buffer():
    from tierstore.tiers.dram import DramTier

    dram = DramTier(4, 4096, prefault=False)
    reg = FakeRegistrar()
    res = pin_buffer(HostPinning(reg, max_chunk_bytes=8192), dram.buffer, dram.capacity_bytes,
                     dram.slot_bytes)
    assert res.pinned and [n for _, n in res.chunks] == [8192, 8192]
    dram.close()


def test_client_maps_and_pins_shared_slab():
    """Daemon mode: a client maps the daemon's shared slab, registers its own mapping, and
    its writes are visible through the daemon's DramTier."""
    import os

    from tierstore.tiers.dram import DramTier

    name = f"tierstore-test-{os.getpid()}"
    dram = DramTier(4, 4096, shm_name=name, prefault=False)
    try:
        reg = FakeRegistrar()
        client = map_shared_slab(name, 4, 4096, registrar=reg, max_chunk_bytes=8192)
        assert client.pinned and len(reg.registered) == 2
        client.tensor[2, :5] = client.tensor.new_tensor(list(b"hello"))
        assert bytes(dram.view(2)[:5]) == b"hello"
        client.close()
        client.close()
        assert reg.registered == {} and reg.count("unregister") == 2
    finally:
        dram.close()
