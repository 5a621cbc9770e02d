"""Golden key bytes: ``Keyer`` output pinned as hex literals (DESIGN §2).

Stored NVMe records and peers address blocks by these bytes, so any change of the chain's output
is a format break, not a refactoring. The literals were computed by the ``Keyer`` of commit
c543681 (before the chain was optimised); a second check recomputes keys with a plain,
unoptimised transcription of the formula in the ``tierstore.keys`` docstring.
"""

import hashlib
import random
import struct

import pytest

from tierstore.errors import ConfigError
from tierstore.keys import ExtraKeys, Keyer, Namespace

S1 = b"1" * 32
NS = Namespace("m", 16, revision="r1", kv_dtype="bfloat16", kv_layout="NHD",
               num_layers=2, num_kv_heads=2, head_size=32, tp_size=2, tp_rank=0)
TOKS = [(i * 2654435761) % 150000 for i in range(16 * 3 + 5)]   # 3 full blocks + a partial tail

GOLDEN = {
    "plain": [
        "24d213800122a691d9cd328b91c8795c1736f6d3ad78c7eaf347a0606f1c50dd",
        "76415d4731f4a5ea49327b4f8511d727aa97101c1f511a58b0548eef840510c8",
        "5376d7b541cd66f2d46d07c5ef361d3bbd97754a53ff585187e1452cf17d248b"],
    "salt": [
        "fee5f8fceb6ce4c718475c3b81b65ea84a11bbfae6fc221ef5ceb8827850cdc7",
        "b878e10af02d52c47b56f82ed095626dec22ce0624477bea80ffa7c9f2e2d4b1",
        "f2826a85a95e1c9eeb533367b70e396a04416e881b6ed933728616682646072c"],
    "lora": [
        "9e2686d8b1c4ad826da75e0b9b085c66a6b9e7b9eb414c19ec0163ca13600d0d",
        "d0ee5b95947c288b838b4870c1091b4842442412911bbada5a3f536f8fcf5cf0",
        "b491575e564b08d3ea6586ed0128466754e81009c4329f1ba2a93e18e0832915"],
    "salt_lora_mm": [
        "6035cfd5929219cf0a4a678c366d039c01e08cce5a4f8035aeef5779c7e31845",
        "9a89672d7586fcde6170beb13f9f894f9642c1881a28ce739301bd606a04f174",
        "75a30df647638c6f73c0794e15738327096fe3b4110255c83a7a2710006b4213"],
    "parent": [
        "21dca41893db34d7d70f7416ff328c25cfbd6530af73161189987e5403e2c065",
        "fedc4b0724f282fe72fc9bfde1eca403c7c257b15a3e2376ba6ae1d7f700a928"],
    "bids": [
        "3881a3728245104fa7240054f8232bae0293e75b98a803ded53b7a2e97f074fb",
        "9071dfcce4c6e86db9dc80395cab88a3cd021bfa704d1e34e616fe98aa618f88",
        "3792cf9c49f1d785d8e13bcc5d681ed8a09bee30ba1e31a0f0b98d2960961d75",
        "b3b71461efa495fdbce4a48793589793565bba25a2428a255d4b65d9cde97e58"],
    "bids_salt": [
        "f4099c33842ee90ef1f581e8494b7ec0ec67a1f54988002d458131b04748f060",
        "851f7cd4d06f099d70e580b68f8c75a2b29f86747fde8d242772176f5171266d"],
}


def _cases(k: Keyer) -> dict:
    return {
        "plain": lambda: k.chain(TOKS),
        "salt": lambda: k.chain(TOKS, ExtraKeys(cache_salt="tenant-a")),
        "lora": lambda: k.chain(TOKS, ExtraKeys(lora="adapter@/p/rev3")),
        "salt_lora_mm": lambda: k.chain(TOKS, ExtraKeys(cache_salt="s", lora="l",
                                                        mm={0: [b"\x01" * 16], 2: ["img-b", b"x"]})),
        "parent": lambda: k.chain(TOKS[:32], parent=bytes(range(32))),
        "bids": lambda: k.chain_from_block_ids([0, 7, 2**63 + 5, -1]),
        "bids_salt": lambda: k.chain_from_block_ids([3, 4], ExtraKeys(cache_salt="z")),
    }


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden_keys(case):
    """Scenario: the chain's bytes for tokens (with salt, LoRA, multimodal digests, a parent key,
    a partial trailing block) and for trace block ids equal the bytes the released format wrote."""
    got = _cases(Keyer(NS, S1))[case]()
    assert [x.hex() for x in got] == GOLDEN[case]


def test_golden_block_size_one_and_long_secret():
    """Scenario: block size 1, uint32 max token, a secret longer than BLAKE2b's 64-byte key
    (only the first 64 bytes enter)."""
    k = Keyer(Namespace("m", 1), b"k" * 64 + b"extra")
    assert k.chain([5, 4294967295, 0])[-1].hex() == \
        "1fb75470dce007e52834422004e02b2f7d75a4398453a2b4cc1dd38bc09c75ee"


def test_golden_long_chain_with_late_multimodal_block():
    """Scenario: a 1,000-block chain with a salt and a multimodal digest on its last block."""
    k = Keyer(Namespace("long", 16), b"2" * 32)
    ks = k.chain(list(range(1000 * 16 + 3)), ExtraKeys(cache_salt="s", mm={999: [b"d"]}))
    assert len(ks) == 1000
    assert ks[998].hex() == "e4d0145487174d5a8f8a283b0c9c35353e4c947987156012d398e7d6e5e23464"
    assert ks[999].hex() == "dd90afed6bf1ec58c6c614f1ffdf9e62edd7a434080d7fc62f6495ee34a1d8c3"


# -- a plain transcription of the docstring formula, for random inputs ---------------------------

def _f(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack("<I", len(value)) + value


def _reference(k: Keyer, payloads: list[bytes], tag: bytes, extras: ExtraKeys,
               parent: bytes | None) -> list[bytes]:
    req = b""
    if extras.cache_salt:
        req += _f(b"salt", extras.cache_salt.encode())
    if extras.lora:
        req += _f(b"lora", extras.lora.encode())
    out, prev = [], parent or b""
    for i, p in enumerate(payloads):
        x = req
        for d in (extras.mm or {}).get(i, []):
            x += _f(b"mm", d if isinstance(d, bytes) else d.encode())
        h = hashlib.blake2b(digest_size=32, key=k.secret[:64], person=b"tierstore.key.v1")
        h.update(_f(b"ns", k.namespace.digest()) + _f(b"parent", prev) + _f(tag, p) + _f(b"x", x))
        prev = h.digest()
        out.append(prev)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_chain_matches_plain_formula(seed):
    """Scenario: random block sizes, token ids, extras and parents; the optimised chain equals
    the formula computed field by field."""
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 16, 32, 256])
    secret = bytes(rng.randrange(256) for _ in range(rng.choice([16, 32, 80])))
    k = Keyer(Namespace(f"m{seed}", bs, num_layers=seed), secret)
    toks = [rng.randrange(2**32) for _ in range(bs * rng.randrange(0, 12) + rng.randrange(bs))]
    n = len(toks) // bs
    mm = {i: [rng.randbytes(rng.randrange(1, 40)) for _ in range(rng.randrange(1, 3))]
          for i in range(n) if rng.random() < 0.3}
    extras = ExtraKeys(cache_salt=rng.choice([None, "", "salt"]), lora=rng.choice([None, "", "lora-x"]),
                       mm=mm or None)
    parent = rng.choice([None, rng.randbytes(32)])
    payloads = [b"".join(t.to_bytes(4, "little") for t in toks[i * bs:(i + 1) * bs]) for i in range(n)]
    assert k.chain(toks, extras, parent) == _reference(k, payloads, b"tok", extras, parent)
    bids = [rng.randrange(-2**63, 2**64) for _ in range(rng.randrange(0, 9))]
    ref = _reference(k, [(b % 2**64).to_bytes(8, "little") for b in bids], b"bid", extras, None)
    assert k.chain_from_block_ids(bids, extras) == ref


def test_chain_accepts_tuples_and_arrays():
    """Scenario: token ids as a tuple or an ``array('l')`` give the same keys as a list."""
    from array import array
    k = Keyer(NS, S1)
    assert k.chain(tuple(TOKS)) == k.chain(TOKS) == k.chain(array("l", TOKS))


def test_multimodal_extras_at_float_keys_out_of_range_and_in_subclasses():
    """Scenario: ``mm`` keyed by 1.0 (equal to block 1 for ``block_bytes``), by indices past the
    chain or negative (ignored), and an ExtraKeys subclass with its own ``block_bytes`` (asked
    for every block): the chain equals the field-by-field formula in each case."""
    k = Keyer(NS, S1)
    toks = list(range(64))
    payloads = [b"".join(t.to_bytes(4, "little") for t in toks[i * 16:(i + 1) * 16]) for i in range(4)]
    for mm in ({1.0: [b"d"]}, {1: [b"d"], 9: [b"e"], -1: [b"f"]}, {True: ["t"], 3: ["z"]}):
        e = ExtraKeys(cache_salt="s", mm=mm)
        assert k.chain(toks, e) == _reference(k, payloads, b"tok", e, None)
    assert k.chain(toks, ExtraKeys(mm={1.0: [b"d"]})) == k.chain(toks, ExtraKeys(mm={1: [b"d"]}))

    class EveryOther(ExtraKeys):
        def block_bytes(self, index, base):
            return base + (b"odd" if index % 2 else b"")

    got = k.chain(toks, EveryOther(lora="l"))
    plain = k.chain(toks, ExtraKeys(lora="l"))
    assert got[0] == plain[0] and got[1] != plain[1]
    req = ExtraKeys(lora="l").request_bytes()
    h = hashlib.blake2b(digest_size=32, key=S1, person=b"tierstore.key.v1")
    h.update(_f(b"ns", NS.digest()) + _f(b"parent", got[0]) + _f(b"tok", payloads[1])
             + _f(b"x", req + b"odd"))
    assert got[1] == h.digest()


def test_parent_of_any_length_and_empty_inputs():
    """Scenario: a parent key that is not 32 bytes enters as it is (length-prefixed); an empty
    parent equals none; fewer tokens than a block and no block ids give no keys."""
    k = Keyer(NS, S1)
    toks = list(range(32))
    payloads = [b"".join(t.to_bytes(4, "little") for t in toks[i * 16:(i + 1) * 16]) for i in range(2)]
    assert k.chain(toks, parent=b"short") == _reference(k, payloads, b"tok", ExtraKeys(), b"short")
    assert k.chain(toks, parent=b"") == k.chain(toks)
    assert k.chain(list(range(15))) == [] and k.chain([]) == [] and k.chain_from_block_ids([]) == []


# -- chain_from_engine_hashes --------------------------------------------------------------------

def _vllm_sha256_hashes(tokens, bs=16, root_seed="vllm-none-hash"):
    """vLLM's default block hashes (sha256 of pickle, chained from NONE_HASH), rebuilt with
    hashlib and pickle (shared/docs/VLLM.md §3)."""
    import pickle
    prev = hashlib.sha256(pickle.dumps(root_seed, protocol=pickle.HIGHEST_PROTOCOL)).digest()
    out = []
    for i in range(0, len(tokens) // bs * bs, bs):
        prev = hashlib.sha256(pickle.dumps((prev, tuple(tokens[i:i + bs]), None),
                                           protocol=pickle.HIGHEST_PROTOCOL)).digest()
        out.append(prev)
    return out


def test_vllm_hash_rebuild_matches_documented_vector():
    """Scenario: the helper above reproduces vLLM 0.33.0's documented test vector."""
    assert _vllm_sha256_hashes(list(range(16)))[0].hex().startswith("fe8fa5dd")


def test_engine_hash_keys_golden_and_formula():
    """Scenario: keys from vLLM sha256 block hashes are pinned, equal the documented formula, and
    depend on the algorithm name, the namespace and the secret."""
    from dataclasses import replace
    k = Keyer(Namespace("m", 16), S1)
    eh = _vllm_sha256_hashes(list(range(32)))
    got = k.chain_from_engine_hashes(eh, "sha256")
    assert [x.hex() for x in got] == [
        "8fcbf6ac5be46a48a15e15f11a8dc47d74dfe2327d8ae963862f5744ab94f607",
        "f646f5bf2774054a52c6660b5f5d20b0f08ad160b8a403131f39055e468dacf9"]
    engine_key = hashlib.blake2b(_f(b"ns", k.namespace.digest()) + _f(b"algo", b"sha256"),
                                 digest_size=32, key=S1, person=b"tierstore.eky.v1").digest()
    for key, h in zip(got, eh):
        assert key == hashlib.blake2s(h, digest_size=32, key=engine_key, person=b"ts.eh.v1").digest()
    assert k.chain_from_engine_hashes(eh, "sha256_cbor") != got
    other_ns = replace(k.namespace, tp_rank=0, tp_size=2)
    assert Keyer(other_ns, S1).chain_from_engine_hashes(eh, "sha256") != got
    assert Keyer(k.namespace, b"2" * 32).chain_from_engine_hashes(eh, "sha256") != got
    assert k.chain_from_engine_hashes(iter(eh), "sha256") == got
    assert k.chain_from_engine_hashes([], "sha256") == []


def test_engine_hash_keys_are_apart_from_token_keys():
    """Scenario: the same tokens keyed by ``chain`` and by their vLLM hashes give disjoint keys
    (a store must not mix the two key spaces by accident)."""
    k = Keyer(Namespace("m", 16), S1)
    toks = list(range(64))
    assert not set(k.chain(toks)) & set(k.chain_from_engine_hashes(_vllm_sha256_hashes(toks), "sha256"))


def test_engine_hash_keys_refuse_unstable_or_malformed_hashes():
    """Scenario: xxhash (random root per process, not collision resistant) and an unknown name
    are refused; so is a hash that is not 32 bytes."""
    k = Keyer(Namespace("m", 16), S1)
    for algo in ("xxhash", "xxhash_cbor", "md5", ""):
        with pytest.raises(ConfigError):
            k.chain_from_engine_hashes([b"\0" * 32], algo)
    for bad in ([b"\0" * 16], [b"\0" * 32, b"\0" * 33]):
        with pytest.raises(ConfigError):
            k.chain_from_engine_hashes(bad, "sha256")
