"""Engine-hash keys: different requests must never share keys."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from tierstore.keys import Keyer
from tierstore_plugins.vllm.backend import Geometry, request_keys

BS = 16
GEO = Geometry(model="m", revision="", kv_dtype="bfloat16", num_layers=2, num_kv_heads=2,
               head_size=16, use_mla=False, block_size=BS, tp_size=1, pp_size=1)
KEYER = Keyer(GEO.namespace(0), b"k" * 32)


@dataclass
class R:
    prompt_token_ids: list
    block_hashes: list
    cache_salt: object = None
    lora_request: object = None
    mm_features: object = None
    prompt_embeds: object = None

    @property
    def num_prompt_tokens(self):
        return len(self.prompt_token_ids) if self.prompt_token_ids is not None else \
            int(self.prompt_embeds.shape[0])


class Lora:
    def __init__(self, n, p=""):
        self.lora_name, self.lora_path, self.lora_int_id = n, p, 1


def hs(tag, n):
    return [hashlib.sha256(f"{tag}{i}".encode()).digest() for i in range(n)]


def test_lora_vs_plain_vs_other_lora_never_meet():
    toks = list(range(40))
    H = hs("same", 2)   # vLLM hashes LoRA by name only: pretend equal hashes
    ks = [request_keys([KEYER], R(toks, H, lora_request=l), BS, "sha256")[0]
          for l in (None, Lora("a", "/p1"), Lora("a", "/p2"), Lora("a|", ""), Lora("a", "|"))]
    flat = [tuple(k) for k in ks]
    assert len(set(flat)) == len(flat)


def test_embeds_vs_tokens_never_meet():
    toks = list(range(32))
    emb = torch.zeros(32, 8)
    a = request_keys([KEYER], R(toks, hs("x", 2)), BS, "sha256")[0]
    b = request_keys([KEYER], R(None, hs("x", 2), prompt_embeds=emb), BS, "sha256")[0]
    c = request_keys([KEYER], R(None, hs("x", 2), prompt_embeds=emb + 1), BS, "sha256")[0]
    d = request_keys([KEYER], R(toks, hs("x", 2)), BS, None)[0]
    assert len({tuple(a), tuple(b), tuple(c), tuple(d)}) == 4


def test_fewer_hashes_than_blocks_keys_prefix_only():
    toks = list(range(64))
    k = request_keys([KEYER], R(toks, hs("x", 2)), BS, "sha256")[0]
    assert len(k) == 2
