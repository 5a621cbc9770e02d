"""``put`` (both client backends share ``fill_store_job``, tierstore/store.py) with fewer
blocks than keys.

``fill_store_job`` copies ``zip(job.slots, blocks)``, so with ``len(blocks) < len(keys)`` the
last keys' slots are reserved but never written, and ``complete_store(ok=True)`` then publishes
them: whatever bytes the slot last held (another key's evicted block) become readable under
the new key. A load of that key returns wrong bytes with no error: the "never wrong KV"
invariant broken by a caller's slip that should be a RejectedError.
"""

import pytest

from tierstore.config import DramConfig, StoreConfig
from tierstore.errors import RejectedError
from tierstore.keys import Keyer, Namespace
from tierstore.store import Store

SLOT = 4096
NS = Namespace("m", 16)


def test_put_with_fewer_blocks_than_keys_publishes_nothing_unwritten():
    s = Store.open(StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=2)))
    try:
        k = Keyer(NS, b"s" * 32)
        old = k.chain(list(range(32)))                 # two blocks fill the tier
        s.put(old, NS, [b"\x11" * SLOT, b"\x22" * SLOT])
        new = k.chain(list(range(1000, 1032)))         # both evicted to make room
        with pytest.raises(RejectedError):
            s.put(new, NS, [b"\x33" * SLOT])           # one block for two keys
        got = s.get(new)
        assert all(g == b"\x33" * SLOT for g in got), \
            "a key was published with bytes nobody wrote for it"
        assert s.check() == []
    finally:
        s.close()
