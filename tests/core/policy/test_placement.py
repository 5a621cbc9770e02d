"""Placement (tierstore/policy/placement.py): where victims go, which copies a move keeps."""

from tierstore.policy.placement import Placement
from tierstore.types import Tier


def test_victims_go_one_step_down_from_hbm_only():
    p = Placement.of([Tier.HBM, Tier.DRAM, Tier.NVME])
    assert p.demote_to(Tier.HBM) is Tier.DRAM
    assert p.demote_to(Tier.DRAM) is None       # dropped: NVMe holds its clean copy
    assert p.demote_to(Tier.NVME) is None       # deleted: the last tier


def test_exclusive_decides_whether_a_move_keeps_its_source():
    assert not Placement.of([Tier.HBM, Tier.DRAM]).keeps_source(Tier.HBM, Tier.DRAM)
    assert Placement.of([Tier.HBM, Tier.DRAM], exclusive=False).keeps_source(Tier.DRAM, Tier.HBM)


def test_dram_blocks_get_an_nvme_copy_when_nvme_exists():
    assert Placement.of([Tier.DRAM, Tier.NVME]).copies_to_nvme(Tier.DRAM)
    assert not Placement.of([Tier.DRAM, Tier.NVME]).copies_to_nvme(Tier.HBM)
    assert not Placement.of([Tier.DRAM]).copies_to_nvme(Tier.DRAM)
