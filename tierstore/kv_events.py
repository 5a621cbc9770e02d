"""vLLM's KV event model over the store's residency log (issue 15 item 1; case EVT-37).

Routers that already read vLLM's KV events (``vllm.distributed.kv_events``) read tierstore's
without new code: the same classes, the same msgpack layout, the same ZMQ framing
(tierstore/daemon/publisher.py). This module has no ZMQ and no vLLM import; it turns the raw log
of tierstore/events.py into those events, encodes and decodes batches, and keeps an index of
what a subscriber knows (used by the replay's router and by tests).

**Media** (vLLM's constants ``MEDIUM_GPU``, ``MEDIUM_CPU``, ``MEDIUM_STORAGE``)::

    hbm -> "GPU"      dram -> "CPU"      nvme -> "STORAGE"

The node that holds a block is the publisher: one stream per node (daemon), as vLLM has one per
engine.

**From residency to events** (:class:`Translator`). Several store blocks can share one engine
hash (one per TP rank's namespace, or two models on one daemon): the translator counts copies
per (engine hash, medium) and publishes only the transitions, so the stream says "this node
holds hash H in medium M" exactly while at least one such copy exists::

    raw STORED  (tier, blob)  count 0 -> 1   BlockStored(block_hashes=[H], parent_block_hash,
                                                          token_ids, block_size, lora_id=None,
                                                          medium, lora_name)
    raw REMOVED (tier, blob)  count 1 -> 0   BlockRemoved(block_hashes=[H], medium)
                                             ... and when H is still held in another medium,
                                             BlockStored(H, nearest medium) at the end of the
                                             batch: a demotion is a removal plus a store,
                                             never a bare removal (EVT-37 (b))
    raw CLEARED                              AllBlocksCleared()

A block's NVMe copy is written behind (NVMe keeps a clean copy of DRAM blocks), so a typical
life is ``Stored(CPU)``, ``Stored(STORAGE)`` (the flusher), ``Removed(CPU)`` +
``Stored(STORAGE)`` (DRAM eviction), ``Removed(STORAGE)`` (NVMe eviction). A subscriber that keeps
a set of media per hash, or one that keeps only the last medium it heard, ends right either way.

**Wire layout** (what ``msgspec.msgpack.Encoder().encode(KVEventBatch(...))`` produces; vLLM's
``msgspec.msgpack.Decoder(KVEventBatch)`` decodes it)::

    KVEventBatch   array  [ts (float), events (array)]           (array_like; dp rank omitted)
    BlockStored    map    {"type": "BlockStored", "block_hashes": [bin | int],
                           "parent_block_hash": bin | int | nil, "token_ids": [int],
                           "block_size": int, "lora_id": nil, "medium": str,
                           "lora_name": str | nil}
    BlockRemoved   map    {"type": "BlockRemoved", "block_hashes": [...], "medium": str}
    AllBlocksCleared map  {"type": "AllBlocksCleared"}

Threading: a :class:`Translator` and a :class:`KVEventIndex` are single-threaded (one consumer).
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import msgpack

from tierstore.events import CLEARED, REMOVED, STORED, decode_engine_block
from tierstore.types import Tier

MEDIUM_GPU, MEDIUM_CPU, MEDIUM_STORAGE = "GPU", "CPU", "STORAGE"
MEDIUM = {Tier.HBM: MEDIUM_GPU, Tier.DRAM: MEDIUM_CPU, Tier.NVME: MEDIUM_STORAGE}
MEDIA = (MEDIUM_GPU, MEDIUM_CPU, MEDIUM_STORAGE)   # nearest first
_MI = {m: i for i, m in enumerate(MEDIA)}
_TIER_MI = {int(t): _MI[m] for t, m in MEDIUM.items()}


def block_stored(h, parent, token_ids, block_size: int, medium: str,
                 lora_name: str | None = None) -> dict:
    return {"type": "BlockStored", "block_hashes": [h], "parent_block_hash": parent,
            "token_ids": list(token_ids or ()), "block_size": int(block_size), "lora_id": None,
            "medium": medium, "lora_name": lora_name}


def block_removed(h, medium: str) -> dict:
    return {"type": "BlockRemoved", "block_hashes": [h], "medium": medium}


ALL_BLOCKS_CLEARED = {"type": "AllBlocksCleared"}


def encode_batch(events: Sequence[dict], ts: float | None = None) -> bytes:
    """One ``KVEventBatch`` payload (see the module docstring)."""
    return msgpack.packb([time.time() if ts is None else ts, list(events)], use_bin_type=True)


def decode_batch(payload: bytes) -> tuple[float, list[dict]]:
    """``(ts, events)`` of a ``KVEventBatch`` payload (events as dicts with vLLM's field names
    and ``type``). Raises ValueError for anything else."""
    try:
        v = msgpack.unpackb(payload, raw=False)
    except (msgpack.UnpackException, ValueError) as e:
        raise ValueError(f"not a KVEventBatch: {e}") from None
    if not isinstance(v, list) or len(v) < 2 or not isinstance(v[1], list):
        raise ValueError("not a KVEventBatch: expected [ts, events, ...]")
    for e in v[1]:
        if not isinstance(e, dict) or "type" not in e:
            raise ValueError("not a KVEventBatch: an event is not a tagged map")
    return float(v[0]), v[1]


class _Entry:
    __slots__ = ("info", "counts")

    def __init__(self, info) -> None:
        self.info = info           # EngineBlock
        self.counts = [0, 0, 0]    # copies per medium (MEDIA order)


class Translator:
    """Raw residency log -> vLLM events, with the state it has published (module docstring).

    :meth:`snapshot` is that state as events (AllBlocksCleared, then one BlockStored per held
    medium, parents first): what a subscriber that joins late needs to be exact."""

    def __init__(self) -> None:
        self._blocks: dict = {}    # engine hash -> _Entry (insertion order: first stored first)
        self.events_out = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def feed(self, raw: Iterable[tuple]) -> list[dict]:
        out: list[dict] = []
        demoted: dict = {}
        blocks = self._blocks
        for op, tier, blob in raw:
            if op == CLEARED:
                blocks.clear()
                demoted.clear()
                out.append(dict(ALL_BLOCKS_CLEARED))
                continue
            try:
                info = decode_engine_block(blob)
            except ValueError:
                continue
            mi = _TIER_MI.get(int(tier))
            if mi is None:
                continue
            e = blocks.get(info.hash)
            if op == STORED:
                if e is None:
                    e = blocks[info.hash] = _Entry(info)
                e.counts[mi] += 1
                if e.counts[mi] == 1:
                    out.append(self._stored(e.info, MEDIA[mi]))
            elif op == REMOVED and e is not None and e.counts[mi] > 0:
                e.counts[mi] -= 1
                if e.counts[mi] == 0:
                    out.append(block_removed(info.hash, MEDIA[mi]))
                    if any(e.counts):
                        demoted[info.hash] = e
                    else:
                        del blocks[info.hash]
        for h, e in demoted.items():   # a removal with copies left: name where it lives now
            if blocks.get(h) is e and any(e.counts):
                out.append(self._stored(e.info, MEDIA[next(i for i, c in enumerate(e.counts) if c)]))
        self.events_out += len(out)
        return out

    @staticmethod
    def _stored(info, medium: str) -> dict:
        return block_stored(info.hash, info.parent, info.token_ids, info.block_size, medium,
                            info.lora_name)

    def media(self) -> dict:
        """engine hash -> set of media held (the published state)."""
        return {h: {MEDIA[i] for i, c in enumerate(e.counts) if c} for h, e in self._blocks.items()}

    def snapshot(self) -> list[dict]:
        out = [dict(ALL_BLOCKS_CLEARED)]
        done: set = set()
        blocks = self._blocks
        for h in blocks:
            chain = []
            while h is not None and h not in done and h in blocks:
                chain.append(h)
                done.add(h)
                h = blocks[h].info.parent
            for x in reversed(chain):
                e = blocks[x]
                out.extend(self._stored(e.info, MEDIA[i]) for i, c in enumerate(e.counts) if c)
        return out


class KVEventIndex:
    """What a subscriber knows: engine hash -> set of media, built only from events (decoded
    dicts, or vLLM's own event objects: anything with the field names). ``AllBlocksCleared``
    empties it. The replay's router keeps one per node; tests compare it with the store."""

    def __init__(self) -> None:
        self.blocks: dict = {}
        self.batches = 0
        self.events = 0

    def apply(self, events: Iterable) -> None:
        self.batches += 1
        blocks = self.blocks
        for e in events:
            self.events += 1
            kind = e["type"] if isinstance(e, dict) else type(e).__name__
            get = e.get if isinstance(e, dict) else (lambda f, _e=e: getattr(_e, f))
            if kind == "BlockStored":
                for h in get("block_hashes"):
                    blocks.setdefault(h, set()).add(get("medium"))
            elif kind == "BlockRemoved":
                for h in get("block_hashes"):
                    s = blocks.get(h)
                    if s is not None:
                        s.discard(get("medium"))
                        if not s:
                            del blocks[h]
            elif kind == "AllBlocksCleared":
                blocks.clear()

    def holds(self, h) -> bool:
        return h in self.blocks

    def longest_prefix(self, hashes: Sequence) -> int:
        """Leading ``hashes`` this subscriber believes held (in any medium)."""
        n = 0
        blocks = self.blocks
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n


def media_of_blocks(blocks: Iterable[dict]) -> dict:
    """engine hash -> set of media, from ``Store.blocks()`` / ``tierstore blocks ls --json``
    rows (hex hashes become bytes): the truth a subscriber's :class:`KVEventIndex` must equal."""
    label = {t.label: m for t, m in MEDIUM.items()}
    out: dict = {}
    for b in blocks:
        h = b.get("engine_hash")
        if h is None:
            continue
        key = bytes.fromhex(h) if isinstance(h, str) else h
        media = {label[t] for t in b.get("tiers", ()) if t in label}
        if media:
            out.setdefault(key, set()).update(media)
    return out


__all__ = ["ALL_BLOCKS_CLEARED", "KVEventIndex", "MEDIA", "MEDIUM", "MEDIUM_CPU", "MEDIUM_GPU",
           "MEDIUM_STORAGE", "Translator", "block_removed", "block_stored", "decode_batch",
           "encode_batch", "media_of_blocks"]
