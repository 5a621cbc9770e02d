"""Identity fields of a key (tierstore/keys.py): LoRA fields, prompt-embeddings digests and the
optional namespace fields each enter tagged and length-prefixed."""

from dataclasses import replace

import pytest

from tierstore.keys import ExtraKeys, Keyer, Namespace

S = b"k" * 32
NS = Namespace("m", 16, revision="r", num_layers=2, num_kv_heads=2, head_size=32)
TOKS = list(range(48))


def chain(extras=ExtraKeys(), ns=NS):
    return Keyer(ns, S).chain(TOKS, extras)


def test_lora_name_and_path_are_separate_fields():
    """issue 13 item 6: name "a|b" with path "" and name "a" with path "b|" used to share keys
    (one string "a|b|"); as two tagged fields they differ. No field passes for another: a name
    never equals the same text as a path, as a salt, or as the legacy one-string identity."""
    a = chain(ExtraKeys(lora_name="a|b", lora_path=""))
    b = chain(ExtraKeys(lora_name="a", lora_path="b|"))
    assert set(a).isdisjoint(b)
    variants = [ExtraKeys(lora_name="x"), ExtraKeys(lora_path="x"), ExtraKeys(cache_salt="x"),
                ExtraKeys(lora="x"), ExtraKeys(lora_name="x", lora_path=""),
                ExtraKeys(lora_name="", lora_path="x"), ExtraKeys()]
    firsts = [chain(v)[0] for v in variants]
    # an absent and an empty name (or path) are one field value: lora_name="x" alone equals
    # lora_name="x", lora_path=""; everything else differs
    assert firsts[0] == firsts[4] and firsts[1] == firsts[5]
    assert len(set(firsts)) == len(variants) - 2


def test_lora_weights_fingerprint_changes_keys():
    """issue 13 items 6 and 8: an adapter's new weights at the same name and path key apart."""
    base = ExtraKeys(lora_name="a", lora_path="/adapters/a")
    assert chain(base) != chain(replace(base, lora_weights="fp1"))
    assert chain(replace(base, lora_weights="fp1")) != chain(replace(base, lora_weights="fp2"))


def test_embeds_digest_changes_its_block_and_the_chain_after_it():
    """KEY-29 (key level): a block's embeddings digest changes that block's key and, through
    the chain, every later one; the blocks before it keep theirs."""
    plain = chain()
    e = chain(ExtraKeys(embeds={1: b"d" * 32}))
    assert e[0] == plain[0] and e[1] != plain[1] and e[2] != plain[2]
    assert chain(ExtraKeys(embeds={1: b"d" * 32})) != chain(ExtraKeys(embeds={1: b"e" * 32}))
    # an embeddings digest never equals a multimodal digest of the same bytes
    assert chain(ExtraKeys(embeds={1: b"d" * 32})) != chain(ExtraKeys(mm={1: [b"d" * 32]}))
    # the chain's fast path (blocks without their own extras share one tail) sees embeddings
    from tierstore.keys import _blocks_with_own_extras
    assert list(_blocks_with_own_extras(ExtraKeys(embeds={1: b"d"}, mm={2: ["m"]}), 3)) == [1, 2]
    assert list(_blocks_with_own_extras(ExtraKeys(lora_name="a", cache_salt="s"), 3)) == []


@pytest.mark.parametrize("field", ["weights", "speculative"])
def test_optional_namespace_fields(field):
    """issue 13 item 8 / SPEC-30: a set weights fingerprint or speculative configuration changes
    the namespace; left empty, the digest is the one computed before the fields existed."""
    assert replace(NS, **{field: ""}).digest() == NS.digest()
    assert replace(NS, **{field: "v1"}).digest() != NS.digest()
    assert replace(NS, **{field: "v1"}).digest() != replace(NS, **{field: "v2"}).digest()
    with pytest.raises(Exception):
        replace(NS, **{field: 3})
