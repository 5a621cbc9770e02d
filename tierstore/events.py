"""Residency events: the store's change log, for KV-event publishers (issue 15 item 1).

Collection only. What turns this log into vLLM's event model (``BlockStored`` / ``BlockRemoved``
/ ``AllBlocksCleared``, msgpack, sequence numbers) is tierstore/kv_events.py; what puts it on a
ZMQ socket is tierstore/daemon/publisher.py.

**Engine metadata.** tierstore's keys are keyed hashes (a router without the cluster secret cannot
compute them) and must never leave the node in an event. A block that a router should see carries
the *engine's* identity: the caller of ``prepare_store`` passes, per key, an opaque blob made by
:func:`engine_block` (vLLM's block hash, its parent's, the block's token ids, block size, LoRA
name). The store keeps the blob in its index (``Residency.meta``), writes it beside the NVMe
entry (tiers/nvme.py, LMDB ``e`` keys) and so re-announces NVMe survivors after a restart. Blocks
stored without one (the CLI, a plain replay) produce no event. Blob layout (msgpack array)::

    [version=1, hash (bin | int), parent hash (bin | int | nil), token ids ([int] | nil),
     block size (int, tokens), lora name (str | nil)]

**The log.** :class:`EventLog` is a bounded buffer of raw residency changes, one tuple each::

    (STORED,  tier, blob)   the block got a copy in ``tier`` (stored, promoted, moved, recovered)
    (REMOVED, tier, blob)   its copy in ``tier`` went (evicted, demoted, dropped, corrupt)
    (CLEARED, None, None)   everything before is void (attach, resync)

Only ``Residency.set_slot`` / ``clear_slot`` / ``set_meta`` append (one call each, under the store
lock; nothing at all while no log is attached), so every residency change of every code path
(store, moves, write-behind, recovery, check --fix) is in the log, and the store's hot path pays a
``deque.append``. Per (key, tier) STORED and REMOVED alternate: a consumer can count.

:meth:`EventLog.drain` (any one consumer thread, without the store lock) takes what is there.
When more than ``max_events`` wait, new ones are dropped and the log is marked *overflowed*; the
next drain then asks the store for a resync (``Store.attach_events``' snapshot: CLEARED + one
STORED per copy of every block with engine metadata, under the store lock; the snapshot itself
is not bounded), so a slow consumer loses detail, never correctness.

Threading: ``append`` is called with the store lock held; ``drain`` from one consumer thread
(the daemon's publisher, or the replay's router loop). ``collections.deque`` append/popleft are
atomic, so the two need no lock of their own.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, NamedTuple, Sequence

import msgpack

STORED, REMOVED, CLEARED = 0, 1, 2
ENGINE_BLOB_VERSION = 1
MAX_ENGINE_BLOB_BYTES = 16384
"""Largest engine metadata blob the store accepts (a 512-token block's ids fit easily)."""
DEFAULT_MAX_EVENTS = 1 << 20


class EngineBlock(NamedTuple):
    """What a router knows a block by (decoded :func:`engine_block` blob)."""

    hash: bytes | int
    parent: bytes | int | None
    token_ids: tuple[int, ...] | None
    block_size: int
    lora_name: str | None


def _check_hash(h, what: str) -> None:
    if isinstance(h, bool) or not isinstance(h, (bytes, int)):
        raise ValueError(f"{what} must be bytes or int, got {type(h).__name__}")
    if isinstance(h, int) and not 0 <= h < 1 << 64:
        raise ValueError(f"{what} as int must fit 64 bits unsigned")


def engine_block(hash: bytes | int, parent: bytes | int | None = None,
                 token_ids: Sequence[int] | None = None, block_size: int = 0,
                 lora_name: str | None = None) -> bytes:
    """The engine metadata blob of one block (see the module docstring). ``hash``: the engine's
    block hash as its events carry it (vLLM: a 64-bit int by default,
    ``bytes`` with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``). Raises ValueError for a bad field."""
    _check_hash(hash, "engine hash")
    if parent is not None:
        _check_hash(parent, "parent hash")
    blob = msgpack.packb([ENGINE_BLOB_VERSION, bytes(hash) if isinstance(hash, (bytes, bytearray))
                          else hash, parent, None if token_ids is None else [int(t) for t in token_ids],
                          int(block_size), lora_name], use_bin_type=True)
    if len(blob) > MAX_ENGINE_BLOB_BYTES:
        raise ValueError(f"engine metadata of {len(blob)} bytes exceeds {MAX_ENGINE_BLOB_BYTES}")
    return blob


def decode_engine_block(blob: bytes) -> EngineBlock:
    """Inverse of :func:`engine_block`. Raises ValueError for a blob it cannot read."""
    try:
        v = msgpack.unpackb(blob, raw=False, use_list=True)
        if not isinstance(v, list) or len(v) < 6 or v[0] != ENGINE_BLOB_VERSION:
            raise ValueError("not an engine metadata blob of version 1")
        h, parent, toks, bs, lora = v[1:6]
        _check_hash(h, "engine hash")
        return EngineBlock(h, parent, None if toks is None else tuple(toks), int(bs), lora)
    except (msgpack.UnpackException, TypeError, ValueError) as e:
        raise ValueError(f"bad engine metadata: {e}") from None


def check_engine_blobs(blobs: Sequence[bytes | None] | None, n: int) -> list[bytes | None] | None:
    """Validate the per-key blobs a caller passes with ``n`` keys (None: no metadata at all).
    Raises ValueError for a wrong count, a non-bytes entry or an oversized one."""
    if blobs is None:
        return None
    out = list(blobs)
    if len(out) != n:
        raise ValueError(f"{len(out)} engine metadata entries for {n} keys")
    for b in out:
        if b is not None and (not isinstance(b, (bytes, bytearray)) or len(b) > MAX_ENGINE_BLOB_BYTES):
            raise ValueError("engine metadata must be bytes of at most "
                             f"{MAX_ENGINE_BLOB_BYTES} (tierstore.events.engine_block)")
    return [None if b is None else bytes(b) for b in out]


class EventLog:
    """Bounded buffer of raw residency changes (see the module docstring)."""

    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.max_events = max(16, int(max_events))
        self._buf: deque[tuple] = deque()
        self._overflowed = False
        self.resync: Callable[[], None] | None = None   # set by Store.attach_events
        self.appended = 0
        self.dropped = 0
        self.resyncs = 0

    # called with the store lock held -------------------------------------------------------
    def append(self, op: int, tier, blob) -> None:
        if len(self._buf) >= self.max_events:
            self._overflowed = True
            self.dropped += 1
            return
        self._buf.append((op, tier, blob))
        self.appended += 1

    def reset(self, state: list[tuple] = ()) -> None:
        """Forget what waits; start again with CLEARED and ``state`` (the STORED events of what
        is resident now: not bounded by ``max_events``, since it is the whole truth)."""
        self._buf.clear()
        self._overflowed = False
        self._buf.append((CLEARED, None, None))
        self._buf.extend(state)

    # the consumer --------------------------------------------------------------------------
    def drain(self, limit: int | None = None) -> list[tuple]:
        """What waits (at most ``limit`` events), oldest first; after an overflow, a resync
        first (see the module docstring)."""
        if self._overflowed and self.resync is not None:
            self.resyncs += 1
            self.resync()
        buf = self._buf
        n = len(buf) if limit is None else min(limit, len(buf))
        return [buf.popleft() for _ in range(n)]

    def __len__(self) -> int:
        return len(self._buf)

    def stats(self) -> dict:
        return {"pending": len(self._buf), "appended": self.appended, "dropped": self.dropped,
                "resyncs": self.resyncs, "max_events": self.max_events}


__all__ = ["CLEARED", "EngineBlock", "EventLog", "REMOVED", "STORED", "check_engine_blobs",
           "decode_engine_block", "engine_block"]
