"""HbmTier on the CPU device: one slab, slot views, demote/promote against a DramTier."""

from __future__ import annotations

import pytest
import torch

from tierstore.errors import ConfigError, JobError
from tierstore.tiers.dram import DramTier
from tierstore.tiers.hbm import HbmTier
from tierstore.types import Tier

SENTINEL = 0x5A


def test_one_slab_fixed_slots():
    hbm = HbmTier(8, 1000, device="cpu")
    assert hbm.tier is Tier.HBM and hbm.num_slots == 8 and hbm.capacity_bytes == 8000
    assert hbm.slab.shape == (8, 1000) and hbm.slab.dtype == torch.uint8
    t = hbm.tensor(3)
    assert t.shape == (1000,) and t.data_ptr() == hbm.slab.data_ptr() + 3000
    t.fill_(7)
    assert bytes(hbm.view(3)) == bytes([7]) * 1000
    hbm.view(2)[:4] = b"abcd"
    assert bytes(hbm.slab[2, :4].numpy()) == b"abcd"
    with pytest.raises(IndexError):
        hbm.tensor(8)
    s = [hbm.alloc() for _ in range(8)]
    assert s == list(range(8)) and hbm.alloc() is None
    hbm.free(5)
    assert hbm.alloc() == 5
    assert hbm.usage()["device"] == "cpu" and hbm.usage()["tier"] == "hbm"
    hbm.close()
    hbm.close()


def test_default_device_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert HbmTier(2, 64).device.type == "cpu"


def test_demote_and_promote_through_dram_poisoned():
    """Victims demote hbm -> dram (any slots), come back dram -> hbm; every byte checked,
    untouched slots keep their sentinel."""
    hbm = HbmTier(16, 3000, device="cpu")           # DRAM slots round up to 4096
    dram = DramTier(10, 3000, prefault=False)
    hbm.slab.copy_(torch.randint(0, 256, hbm.slab.shape, dtype=torch.uint8))
    orig = hbm.slab.clone()
    eng = hbm.attach_dram(dram)
    for i in range(dram.num_slots):
        dram.view(i)[:] = bytes([SENTINEL]) * dram.slot_bytes
    src, dst = [15, 2, 7, 8], [9, 0, 1, 5]
    job = hbm.copy_to_dram(src, dst)
    assert hbm.poll(job)
    for a, b in zip(src, dst):
        assert bytes(dram.view(b)[:3000]) == bytes(orig[a].numpy())
        assert bytes(dram.view(b)[3000:]) == bytes([SENTINEL]) * 1096
    for b in set(range(10)) - set(dst):
        assert bytes(dram.view(b)) == bytes([SENTINEL]) * 4096
    hbm.slab.fill_(SENTINEL)
    job = hbm.copy_from_dram(dst, [0, 1, 2, 3])
    hbm.wait(job)
    with pytest.raises(JobError):
        hbm.poll(job)
    for k, a in enumerate(src):
        assert torch.equal(hbm.slab[k], orig[a])
    assert bool((hbm.slab[4:] == SENTINEL).all())
    assert eng.stats["jobs"] == 2
    with pytest.raises(ConfigError):
        hbm.attach_dram(dram)
    hbm.close()
    del eng
    dram.close()


def test_copy_without_dram_attached_is_an_error():
    hbm = HbmTier(2, 64, device="cpu")
    with pytest.raises(ConfigError):
        hbm.copy_to_dram([0], [0])


def test_dram_slot_must_hold_hbm_slot():
    hbm = HbmTier(2, 8192, device="cpu")
    with pytest.raises(ConfigError):
        hbm.attach_dram(torch.zeros(4, 4096, dtype=torch.uint8))
