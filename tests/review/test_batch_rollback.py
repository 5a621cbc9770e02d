"""A batch call that raises for one of its chains must not leave the earlier chains' jobs behind.

``Store.prepare_stores`` / ``prepare_loads`` call ``prepare_store`` / ``prepare_load`` chain after
chain; when chain ``i`` is refused (a key that is not 32 bytes: RejectedError from check_keys) the
jobs already made for chains ``< i`` are never returned to the caller, so nobody can complete
them: their slots stay reserved, their keys stay in ``_pending_keys`` (a later store of the same
keys answers PRESENT and publishes nothing, so those blocks can never be stored), and a load
job's pins keep its blocks from eviction, until the owner is released or the store closes.
"""

from tierstore.config import DramConfig, StoreConfig
from tierstore.errors import RejectedError
from tierstore.keys import Keyer, Namespace
from tierstore.store import Store
from tierstore.types import BlockStatus

import pytest

SLOT = 4096
NS = Namespace("m", 16)


def _store():
    return Store.open(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=8)))


def test_prepare_stores_with_a_bad_chain_leaves_no_job():
    s = _store()
    try:
        good = Keyer(NS, b"s" * 32).chain(list(range(32)))
        with pytest.raises(RejectedError):
            s.prepare_stores([(good, NS, SLOT, None), ([b"short"], NS, SLOT, None)])
        assert s.stats()["pending_stores"] == 0
        assert s.put(good, NS, [b"a" * SLOT, b"b" * SLOT]) == [BlockStatus.OK] * 2
        assert s.check() == []
    finally:
        s.close()


def test_prepare_loads_with_a_bad_chain_leaves_no_pin():
    s = _store()
    try:
        good = Keyer(NS, b"s" * 32).chain(list(range(32)))
        s.put(good, NS, [b"a" * SLOT, b"b" * SLOT])
        with pytest.raises(RejectedError):
            s.prepare_loads([good, [bytearray(32)]])
        assert s.stats()["pins"] == 0 and s.stats()["pending_loads"] == 0
        assert s.evict(good)["evicted"] == 2
    finally:
        s.close()
