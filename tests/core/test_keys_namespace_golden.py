"""Golden key values: keys that are already stored must keep their bytes.

The values below were computed by the code as it was *before* the identity fixes of issue 13
items 6-8 (tagged LoRA fields, prompt-embeds digests, weights fingerprint) and of issue 17
(speculative configuration). A request without LoRA, prompt embeddings or a speculative draft
must key exactly as before, or every block in every existing store would silently become a
miss. When one of these fails, the change made stored data unreachable: that needs a
deliberate format bump (``_PERSON`` in tierstore/keys.py), never a quiet edit of the values.
"""

from tierstore.keys import ExtraKeys, Keyer, Namespace

S = bytes(range(32))
TOKS = [(7 * i) % 500 + 1 for i in range(100)]
NS = Namespace("tiny-llama", 32, revision="r1", kv_dtype="bfloat16", kv_layout="HNC",
               num_layers=2, num_kv_heads=2, head_size=32, tp_size=2, tp_rank=1, pp_rank=0)


def hexes(keys):
    return [k.hex() for k in keys]


def test_namespace_digest_is_unchanged():
    """issue 13 items 6-8: a namespace built from the fields that existed before keys as before
    (new namespace fields enter the digest only when set)."""
    assert NS.digest().hex() == "b272ca467dbcc933da6292f138ec0520"


def test_plain_salt_and_multimodal_keys_are_unchanged():
    """issue 13 item 6: keys without LoRA or prompt embeddings are byte-identical to the keys
    computed before LoRA and embeddings got their own tagged fields."""
    k = Keyer(NS, S)
    assert hexes(k.chain(TOKS)) == [
        "00a7c67c62a1315811c7ea0c6720982a70b3d5a9714cc0aa07aec07a10fe5c20",
        "1d217067b4d2d2642a28aa1e63dd570a9f807c96d9b13382c68757e4e0976449",
        "474063efe754ce6d91bb03e179b77ba3dff7e5355ba0278884b09c16bd299c0e"]
    assert hexes(k.chain(TOKS, ExtraKeys(cache_salt="tenant-a"))) == [
        "5f58712888449f503c9934ffa0a81ca9a06d05f736778839f96948d66c2e89f3",
        "6899868913ff20e491d5ad64af8484c8ac676a58d7311f4dda2cd95cbbf4ea5b",
        "0e8f38e9ad0f7239440b83cad054335af3fd5631cae58f5af6251be918313db9"]
    assert hexes(k.chain(TOKS, ExtraKeys(mm={1: ["img@3"], 2: [b"raw"]}))) == [
        "00a7c67c62a1315811c7ea0c6720982a70b3d5a9714cc0aa07aec07a10fe5c20",
        "3fe02d52a50bbfd7a8fd63822f4bc8b3e23054dbe263f4b2a1bc1ea5520749ac",
        "2ed66c30a4d7679f50a743eb5d81848f7153f01aff8e3e25009467472accb3f1"]
    assert hexes(k.chain(TOKS, ExtraKeys(cache_salt="s", mm={0: ["a@0", "b@5"]}))) == [
        "20cad530559c0982bf862238f2cf622189ff0f0fa681c46d9dd737a42e9af29e",
        "af509a3f724bef1c56fb26d303e7e954f5e9d5ec1036843e204f1170d02338a1",
        "b82e6d7f9c07f876f3d81aa9ccc787af4f6be3e1cb849a3a02fa083ffa8c4385"]
    assert hexes(k.chain_from_block_ids([1, 2, 3])) == [
        "6ad9b227dbf5db6a78e09cc942e0d9e1fcb23a01b0e48378fec6d60d0d5a55f4",
        "29f909eb91156a8e27f937385c780f34ec02e27cc8be88facefa3a2e926d5682",
        "975f84f23f685c8c576f34b44592db702c03c6fa1ab913ee3dce02eb40997874"]
