"""Keys: chain hashing, domain separation, namespaces, secrets (DESIGN §2)."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tierstore.errors import ConfigError
from tierstore.keys import ExtraKeys, Keyer, Namespace, load_secret

ROOT = Path(__file__).resolve().parents[2]
S1 = b"1" * 32
NS = Namespace("m", 16, revision="r1", kv_dtype="bfloat16", kv_layout="NHD",
               num_layers=2, num_kv_heads=2, head_size=32, tp_size=2, tp_rank=0)


def test_chain_keys_are_32_bytes_and_only_full_blocks():
    keys = Keyer(NS, S1).chain(list(range(55)))
    assert len(keys) == 3 and all(len(k) == 32 for k in keys)
    assert len(set(keys)) == 3


def test_chain_depends_on_every_earlier_block():
    k = Keyer(NS, S1)
    a = k.chain(list(range(48)))
    b = k.chain([999] + list(range(1, 48)))
    assert all(x != y for x, y in zip(a, b))
    # same block content at a different position has a different key
    c = k.chain(list(range(16)) * 2)
    assert c[0] != c[1]


def test_fields_are_length_prefixed():
    """("ab","c") and ("a","bc") differ; a LoRA name never equals a salt."""
    k = Keyer(NS, S1)
    toks = list(range(16))
    assert k.chain(toks, ExtraKeys(cache_salt="ab", lora="c")) != k.chain(toks, ExtraKeys(cache_salt="a", lora="bc"))
    assert k.chain(toks, ExtraKeys(cache_salt="x")) != k.chain(toks, ExtraKeys(lora="x"))


def test_empty_salt_equals_no_salt():
    k = Keyer(NS, S1)
    assert k.chain(list(range(32)), ExtraKeys(cache_salt="")) == k.chain(list(range(32)))


def test_multimodal_digest_changes_only_from_its_block_on():
    k = Keyer(NS, S1)
    toks = list(range(48))
    plain = k.chain(toks)
    mm = k.chain(toks, ExtraKeys(mm={1: [b"img-digest"]}))
    assert plain[0] == mm[0] and plain[1] != mm[1] and plain[2] != mm[2]


@pytest.mark.parametrize("field,value", [
    ("kv_dtype", "fp8_e4m3"), ("revision", "r2"), ("tp_size", 4), ("kv_layout", "HND"),
    ("block_size", 32), ("model", "other"), ("pp_rank", 1), ("use_mla", True),
])
def test_namespace_fields_change_keys(field, value):
    """KEY-03 (key level): every namespace field that makes blocks incompatible changes keys."""
    from dataclasses import replace
    other = replace(NS, **{field: value})
    toks = list(range(64))
    assert Keyer(NS, S1).chain(toks)[0] != Keyer(other, S1).chain(toks)[0]


def test_secret_changes_keys_and_keys_are_not_a_plain_digest():
    """KEY-04: the key under S2 differs; no key equals an unkeyed sha256 of the token ids."""
    toks = list(range(32))
    k1 = Keyer(NS, S1).chain(toks)
    k2 = Keyer(NS, b"2" * 32).chain(toks)
    assert k1[0] != k2[0]
    raw = b"".join(t.to_bytes(4, "little") for t in toks[:16])
    assert k1[0] not in (hashlib.sha256(raw).digest(), hashlib.blake2b(raw, digest_size=32).digest())


def test_keys_identical_across_processes_with_different_hash_seeds():
    """KEY-04: processes with PYTHONHASHSEED=1 and =2 compute byte-identical keys."""
    code = ("import sys; from tierstore.keys import Keyer, Namespace, ExtraKeys;"
            "ns=Namespace('m',16,num_layers=2,num_kv_heads=2,head_size=32);"
            "print(Keyer(ns, b'1'*32).chain(list(range(32)), ExtraKeys(cache_salt='s'))[1].hex())")
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, check=True).stdout.strip())
    assert len(outs) == 1
    ns = Namespace("m", 16, num_layers=2, num_kv_heads=2, head_size=32)
    assert outs.pop() == Keyer(ns, S1).chain(list(range(32)), ExtraKeys(cache_salt="s"))[1].hex()


def test_no_secret_generates_random_persisted_one(tmp_path, monkeypatch):
    """KEY-04: with no secret configured a random one is generated and persisted (mode 0600),
    never a built-in constant: two data dirs get different secrets; a reopen gets the same."""
    monkeypatch.delenv("TIERSTORE_SECRET", raising=False)
    monkeypatch.delenv("TIERSTORE_SECRET_FILE", raising=False)
    a = load_secret(data_dir=tmp_path / "a")
    b = load_secret(data_dir=tmp_path / "b")
    assert a != b and len(a) == 32
    assert load_secret(data_dir=tmp_path / "a") == a
    assert (tmp_path / "a" / "secret").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError):
        load_secret(data_dir=tmp_path / "c", generate=False)


def test_secret_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERSTORE_SECRET", "ab" * 16)
    assert load_secret() == bytes.fromhex("ab" * 16)
    monkeypatch.delenv("TIERSTORE_SECRET")
    f = tmp_path / "s"
    f.write_text("cd" * 16)
    assert load_secret(path=f) == bytes.fromhex("cd" * 16)
    raw = bytes(range(200, 232))           # raw bytes, as <data_dir>/secret holds
    (tmp_path / "raw").write_bytes(raw)
    assert load_secret(path=tmp_path / "raw") == raw
    with pytest.raises(ConfigError):
        load_secret(path=tmp_path / "missing")
    with pytest.raises(ConfigError):
        load_secret(value=b"short")


def test_block_ids_chain_matches_prefix_semantics():
    k = Keyer(Namespace("m", 512), S1)
    a = k.chain_from_block_ids([0, 1, 2])
    b = k.chain_from_block_ids([0, 1, 7])
    assert a[:2] == b[:2] and a[2] != b[2]


def test_token_ids_out_of_range_is_config_error():
    with pytest.raises(ConfigError):
        Keyer(NS, S1).chain([-1] * 16)
