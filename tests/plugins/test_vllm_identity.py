"""What identifies a vLLM block: the namespace of an engine and the extras of a request
(plugins/vllm/backend.py). Plain fakes stand for vLLM's ``Request``: no vLLM needed."""

from __future__ import annotations

from types import SimpleNamespace as Obj

from tierstore.keys import Keyer
from tierstore_plugins.vllm.backend import Geometry, extras_of

S = bytes(range(32))
TOKS = [(7 * i) % 500 + 1 for i in range(100)]
GEO = Geometry(model="/models/x", revision="main", kv_dtype="bfloat16", num_layers=2,
               num_kv_heads=2, head_size=32, use_mla=False, block_size=32, tp_size=1, pp_size=1)


def request(tokens=TOKS, salt=None, lora=None, mm=(), **kw):
    return Obj(request_id="r", prompt_token_ids=tokens, cache_salt=salt, lora_request=lora,
               mm_features=list(mm), **kw)


def test_golden_plugin_keys_without_lora_or_embeds():
    """issue 13 items 6-8: the namespace of an engine whose model has a revision, and the keys
    of a request with a salt and an image, are byte-identical to the values computed before the
    identity fixes (stored blocks stay valid)."""
    assert GEO.namespace(0).digest().hex() == "562d91751f9899d8d868dd3e3373bf66"
    g2 = Geometry(model="deepseek", revision="abc", kv_dtype="fp8_e4m3", num_layers=4,
                  num_kv_heads=1, head_size=576, use_mla=True, block_size=16, tp_size=2,
                  pp_size=2)
    assert [g2.namespace(r).digest().hex() for r in range(4)] == [
        "5497077547c3955bc6e1a11cff223022", "5c0ca7befd93a2b715194dac996a4687",
        "b86c35b9ce9baf3eb75f0043bfe1b838", "f00f117f491150e7b4d8b27f6a2b1beb"]
    req = request(salt="t", mm=[Obj(mm_position=Obj(offset=20, length=30), identifier="img-1")])
    keys = Keyer(GEO.namespace(0), S).chain(TOKS, extras_of(req, 32))
    assert [k.hex() for k in keys] == [
        "0874f6286fe518983b836963916ea18ce9948e5f4ab38df413b2b13ae621ddd2",
        "ab08bce70fffea51d62dbd0bf916dc2d16fb1d917a8d19e944c65eda8a6ecfab",
        "51511abd588a7348ea2a7f9b5303725886385d2aa28f9b28155e2449f79cc2df"]
