"""KV events on the connector's side (issue 15 item 1): what the store needs to know to name a
block by the engine's hash, and ``take_events`` for an embedded store.

**The hook.** tierstore keys blocks by its own keyed hash, which a router cannot compute. When the
scheduler side saves blocks ``[lo, hi)`` of a request it passes, per key, the engine's identity of
the block (:func:`engine_blobs`: ``request.block_hashes[i]`` as vLLM's own events carry it, the
parent's, the block's token ids, the block size, the LoRA name) as the fifth element of each
``prepare_stores`` spec. The store keeps it with the block (and beside its NVMe record), so the
node's daemon publishes the block under the hash routers already know (tierstore/events.py).

**Where events are published.** The daemon's publisher (``[events]``, tierstore/daemon/
publisher.py) is the primary path: the store is the node's, shared by every engine and TP rank
on it, and one stream per node is what a router subscribes to. vLLM's ``take_events`` (drained
into the engine's own KV-event stream every step) fits only an *embedded* store, which belongs
to this one engine: :class:`EmbeddedEvents` attaches a log to it when vLLM's ``kv_events_config``
is enabled, and hands vLLM ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` objects of
vLLM's own classes with medium ``CPU`` or ``STORAGE``. (tierstore's HBM tier is not announced
there: on the engine's stream ``GPU`` is vLLM's own prefix cache.) Through a daemon
``take_events`` returns nothing: the daemon publishes, and an engine relaying node-wide events
would announce other engines' blocks as its own.

Threading: called on vLLM's scheduler thread only.
"""

from __future__ import annotations

import logging
from typing import Any

from tierstore.events import EventLog, engine_block
from tierstore.kv_events import MEDIUM_GPU, Translator

logger = logging.getLogger("tierstore.vllm")


def _convert():
    try:
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
        return maybe_convert_block_hash
    except ImportError:   # pragma: no cover - every supported vLLM has it
        return lambda h: h


def engine_blobs(request: Any, lo: int, hi: int, block_size: int) -> list[bytes | None] | None:
    """Per block ``lo..hi-1`` of ``request``, its engine metadata blob (None where vLLM has no
    hash for it); None when the request carries no block hashes at all."""
    hashes = getattr(request, "block_hashes", None)
    if not hashes:
        return None
    conv = _convert()
    tokens = getattr(request, "all_token_ids", None) or getattr(request, "prompt_token_ids", ())
    lora = getattr(getattr(request, "lora_request", None), "name", None)
    out: list[bytes | None] = []
    for i in range(lo, hi):
        if i >= len(hashes):
            out.append(None)
            continue
        try:
            out.append(engine_block(conv(hashes[i]), conv(hashes[i - 1]) if i else None,
                                    tokens[i * block_size:(i + 1) * block_size], block_size,
                                    lora))
        except ValueError:   # an unexpected hash type: the block is stored, not announced
            out.append(None)
    return out


class EmbeddedEvents:
    """``take_events`` for an embedded store (module docstring); ``store``: the Store object."""

    def __init__(self, store: Any, max_events: int = 1 << 20) -> None:
        self.log = EventLog(max_events)
        self.translator = Translator()
        store.attach_events(self.log)

    def take(self) -> list:
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        out = []
        for e in self.translator.feed(self.log.drain()):
            kind = e.pop("type")
            if e.get("medium") == MEDIUM_GPU:
                continue
            if kind == "BlockStored":
                out.append(BlockStored(**e))
            elif kind == "BlockRemoved":
                out.append(BlockRemoved(**e))
            else:
                out.append(AllBlocksCleared())
        return out


def embedded_events(client: Any, vllm_config: Any) -> EmbeddedEvents | None:
    """An :class:`EmbeddedEvents` when vLLM publishes KV events and the store is embedded."""
    cfg = getattr(vllm_config, "kv_events_config", None)
    store = getattr(client, "store", None)
    if cfg is None or not getattr(cfg, "enable_kv_cache_events", False) or store is None:
        return None
    return EmbeddedEvents(store)


__all__ = ["EmbeddedEvents", "embedded_events", "engine_blobs"]
