"""The counter-name table (tierstore/counter_names.py) names every counter a store shows."""

import re
from pathlib import Path

import pytest

pytest.importorskip("tierstore.tiers.nvme")

from tierstore import counter_names as cn  # noqa: E402
from tierstore.config import DramConfig, NvmeConfig, StoreConfig  # noqa: E402
from tierstore.keys import Keyer, Namespace  # noqa: E402
from tierstore.store import Store  # noqa: E402
from tierstore.types import Tier  # noqa: E402

B = 16
SLOT = 8192
NS = Namespace("m", B, num_layers=2, num_kv_heads=2, head_size=32)


def _pattern(family: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{\w+\\\}", "[a-z0-9_]+", re.escape(family)) + "$")


def named(counter: str) -> bool:
    if counter in cn.COUNTERS:
        return True
    return any(_pattern(f).match(counter) for f in cn.FAMILIES)


def test_every_counter_of_a_busy_store_is_in_the_table(tmp_path: Path):
    """A DRAM + NVMe store that stores past its DRAM, flushes, promotes, evicts, takes a
    retention hint and token accounting: every counter in stats() is named by the table, and
    the NVMe tier's own counters are exactly TIER_COUNTERS."""
    cfg = StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=4),
                      nvme=NvmeConfig(path=str(tmp_path / "nvme"), capacity_blocks=12, file_slots=4))
    s = Store.open(cfg)
    k = Keyer(NS, b"s" * 32)
    chains = [k.chain(list(range(i * 1000, i * 1000 + 4 * B))) for i in range(4)]
    for c in chains:
        s.put(c, NS, [x * (SLOT // 32) for x in c])
        assert s.flush(timeout_s=30)
    assert s.get(chains[1])                     # promotions from NVMe
    s.retain(chains[3], session="s1", ttl_s=60)
    s.account_tokens({"lookup": 64, "promised.dram": 64, "delivered.dram": 64})
    s.lookup(chains[1], NS)
    counters = s.stats()["counters"]
    assert counters[cn.EVICTIONS_OF[Tier.DRAM]] and counters[cn.EVICTIONS_OF[Tier.NVME]]
    assert counters[cn.PROMOTIONS] and counters[cn.RETENTION_HINTS]
    assert [c for c in counters if not named(c)] == []
    assert set(s.tiers[Tier.NVME].counters) == set(cn.TIER_COUNTERS)
    s.close()


def test_the_table_names_each_counter_once():
    names = list(cn.COUNTERS) + list(cn.FAMILIES)
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-z0-9_{}]+", n) for n in names)
