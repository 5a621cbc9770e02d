"""Longest resident prefix: the C-level probes equal a plain loop over the chain."""

import random

from tierstore.index.prefix import longest_prefix, longest_prefix_tiers
from tierstore.index.residency import NOWHERE, Residency
from tierstore.types import Tier


def _plain(r: Residency, keys):
    """The definition: probe keys in order; stop at the first key not in the index, or whose
    block is resident nowhere (a pinned block whose last copy went)."""
    hs, codes = [], bytearray()
    for k in keys:
        h = r.get(k)
        if h < 0 or r.near[h] == NOWHERE:
            break
        hs.append(h)
        codes.append(r.near[h])
    return hs, bytes(codes)


def test_prefix_equals_plain_loop_on_random_indexes():
    """Scenario: random chains over an index with DRAM, NVMe and nowhere blocks, misses at
    random places, repeated keys, handle 0, one-key and empty chains, lists and tuples."""
    rng = random.Random(7)
    for trial in range(200):
        r = Residency()
        pool = [bytes([trial % 256, i]) * 16 for i in range(12)]
        for k in pool:
            if rng.random() < 0.75:
                h = r.add(k, 0, 1)
                where = rng.choice([Tier.DRAM, Tier.NVME, Tier.HBM, None])
                if where is not None:
                    r.set_slot(h, where, 0)
        keys = [rng.choice(pool) for _ in range(rng.randrange(0, 10))]
        if rng.random() < 0.5:
            keys = tuple(keys)
        assert longest_prefix_tiers(r, keys) == _plain(r, keys), (trial, keys)
        hs = longest_prefix(r, keys)
        assert [r.key_of(h) for h in hs] == list(keys[:len(hs)])
        assert all(r.get(k) >= 0 for k in keys[:len(hs)])
        assert len(hs) == len(keys) or r.get(keys[len(hs)]) < 0


def test_full_hit_and_first_block_miss_of_a_long_chain():
    """Scenario: an 8,192-block chain fully resident (the fast path), then with its first block
    gone, then with a block in the middle resident nowhere."""
    r = Residency()
    keys = [i.to_bytes(32, "little") for i in range(8192)]
    for i, k in enumerate(keys):
        r.set_slot(r.add(k, 0, 1), Tier.DRAM if i % 3 else Tier.NVME, i)
    hs, codes = longest_prefix_tiers(r, keys)
    assert len(hs) == 8192 and codes == bytes(int(Tier.DRAM if i % 3 else Tier.NVME) for i in range(8192))
    assert longest_prefix_tiers(r, [b"x" * 32] + keys) == ([], b"")
    h = r.get(keys[5000])
    r.clear_slot(h, Tier.DRAM)
    hs, codes = longest_prefix_tiers(r, keys)
    assert len(hs) == 5000 and len(codes) == 5000
    assert longest_prefix_tiers(r, iter(keys[:3])) == (hs[:3], codes[:3])
