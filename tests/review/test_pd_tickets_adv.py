"""P/D ticket attacks (scheduler side on an embedded store, minivllm for end to end)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from tierstore.client import Client
from tierstore.config import DramConfig, StoreConfig
from tierstore.store import Store
from tierstore_plugins.vllm.backend import Geometry, tail_keys, ticket_mac, request_keys
from tierstore_plugins.vllm.metadata import PluginSettings
from tierstore_plugins.vllm.scheduler_side import SchedulerSide

BS = 16
GEO = Geometry(model="m", revision="", kv_dtype="bfloat16", num_layers=2, num_kv_heads=2,
               head_size=16, use_mla=False, block_size=BS, tp_size=1, pp_size=1)
SECRET = bytes.fromhex("28" * 32)
TOKENS = list(range(1, 3 * BS + 6))


@dataclass
class Req:
    request_id: str
    prompt_token_ids: list
    kv_transfer_params: object = None
    cache_salt: object = None
    lora_request: object = None
    mm_features: object = None

    @property
    def num_prompt_tokens(self):
        return len(self.prompt_token_ids)


def consumer():
    cfg = StoreConfig(slot_bytes=GEO.namespace(0).block_bytes, dram=DramConfig(capacity_blocks=64))
    client = Client(Store.open(cfg), secret=SECRET)
    return SchedulerSide(client, GEO, PluginSettings(data_dir="/unused"), role="kv_consumer",
                         engine_id="c")


def genuine(side, tokens=TOKENS, **over):
    p = {"version": 2, "transfer_id": "prod/r1", "namespace": side.ns_digest, "block_size": BS,
         "num_prompt_tokens": len(tokens), "tail_tokens": len(tokens) % BS}
    p.update(over)
    return dict(p, mac=ticket_mac(SECRET, p, tokens))


def test_non_ascii_mac_crashes_the_scheduler():
    """A client-sent ticket whose mac is a non-ASCII string: expected a rejected ticket
    (pd_tickets_rejected + 1, request served); observed: TypeError out of
    get_num_new_matched_tokens (hmac.compare_digest refuses non-ASCII str) = engine crash."""
    side = consumer()
    g = dict(genuine(side), mac="é" * 64)
    r = Req("r", TOKENS, {"tierstore": g})
    side.get_num_new_matched_tokens(r, 0)   # raises TypeError
    assert side.counters["pd_tickets_rejected"] == 1


@pytest.mark.parametrize("bad", [
    {"version": "2"}, {"block_size": "16"}, {"num_prompt_tokens": 53.0}, {"tail_tokens": None},
    {"transfer_id": 5}, {"namespace": ["x"]}, {"mac": 5}, {"mac": b"ab"}, {"mac": ""},
    {"extra": 1}, {1: 2}, {"mac": "0" * 64},
])
def test_malformed_tickets_are_rejected(bad):
    side = consumer()
    g = dict(genuine(side), **{k: v for k, v in bad.items() if isinstance(k, str)})
    g.update({k: v for k, v in bad.items() if not isinstance(k, str)})
    r = Req("r", TOKENS, {"tierstore": g})
    assert side.get_num_new_matched_tokens(r, 0) == (0, False)
    assert side.counters["pd_tickets_rejected"] == 1


def test_truncated_ticket_rejected():
    side = consumer()
    g = genuine(side)
    for k in list(g):
        side2 = consumer()
        t = {x: v for x, v in g.items() if x != k}
        assert side2.get_num_new_matched_tokens(Req("r", TOKENS, {"tierstore": t}), 0) == (0, False)
        assert side2.counters["pd_tickets_rejected"] + side2.counters["pd_params_rejected"] == 1, k


def test_huge_token_ids_do_not_crash():
    side = consumer()
    toks = TOKENS[:-1] + [2 ** 70]
    g = genuine(side)
    assert side.get_num_new_matched_tokens(Req("r", toks, {"tierstore": g}), 0) == (0, False)


class Lora:
    def __init__(self, name):
        self.lora_name, self.lora_path, self.lora_int_id = name, "", 1


def test_tail_key_ignores_lora_salt_for_short_prompt():
    """NOTE: unreachable end to end (a prompt under one block has no keys: never saved nor
    loaded), kept as a key-level observation only. A prompt shorter than one block (n_full == 0): the tail key has no parent, so it does
    not carry the LoRA adapter or the cache salt. The ticket's MAC covers only token ids, so
    a ticket replayed on the same tokens with another adapter/salt addresses the same tail
    block: the consumer loads KV computed with adapter A into a request for adapter B."""
    side = consumer()
    toks = list(range(1, 10))       # 9 tokens, < one block
    a = Req("a", toks, lora_request=Lora("adapter-A"), cache_salt="tenant-1")
    b = Req("b", toks, lora_request=Lora("adapter-B"), cache_salt="tenant-2")
    ka = tail_keys(side.keyers, a, 0, "prod/r1", [None])
    kb = tail_keys(side.keyers, b, 0, "prod/r1", [None])
    assert ka != kb, "same tail key for different LoRA adapters and salts"


class Pos:
    def __init__(self, offset, length):
        self.offset, self.length = offset, length


class MM:
    def __init__(self, ident, offset, length):
        self.identifier, self.mm_position = ident, Pos(offset, length)


def test_tail_key_ignores_multimodal_in_tail():
    """An image whose placeholder lies in the tail (after the last full block): the tail key
    covers token ids (the same placeholder ids for any image) and the parent key only, so two
    prompts with different images share the tail key (a replayed ticket loads image A's KV)."""
    side = consumer()
    toks = list(range(1, 2 * BS + 9))
    a = Req("a", toks, mm_features=[MM("img-A", 2 * BS + 1, 6)])
    b = Req("b", toks, mm_features=[MM("img-B", 2 * BS + 1, 6)])
    pa = request_keys(side.keyers, a, BS)[0]
    pb = request_keys(side.keyers, b, BS)[0]
    assert pa == pb          # full blocks hold no image: same prefix (correct)
    ka = tail_keys(side.keyers, a, 2, "prod/r1", [pa[-1]])
    kb = tail_keys(side.keyers, b, 2, "prod/r1", [pb[-1]])
    assert ka != kb, "same tail key for different images in the tail"



def test_replayed_ticket_loads_image_a_tail_into_image_b_request(tmp_path):
    """End to end on minivllm (one kv_both engine = producer and consumer on one store):
    request A (2 full blocks + a 9-token tail holding image A's placeholder) saves its tail and
    gets a ticket; request B (same token ids, image B in the tail) replays that ticket.
    Expected: B loads only the 2 shared full blocks (32 tokens). Observed: B also loads A's
    tail (32 + 8 tokens): KV of image A in a request about image B."""
    from minivllm import MiniVLLM
    e = MiniVLLM(tmp_path / "s", block_size=BS, save_tail=True, load_tail=True)
    try:
        toks = list(range(1, 2 * BS + 10))
        e.add("a", toks, mm_features=[MM("img-A", 2 * BS + 1, 6)])
        e.run()
        assert e.client.flush(timeout_s=30)
        params = e.outputs["a"]["params"]
        assert params and params["tierstore"]["tail_tokens"] == 9
        e.add("b", toks, mm_features=[MM("img-B", 2 * BS + 1, 6)], kv_transfer_params=params)
        e.run()
        assert e.outputs["b"]["loaded_tokens"] == 2 * BS, (
            f"image-B request loaded {e.outputs['b']['loaded_tokens']} tokens incl. image-A tail")
    finally:
        e.close()
