"""Peer frames: the control and data messages between two nodes.

Framing is the daemon's (tierstore/protocol/codec.py: 16-byte header ``magic "TS", version,
type, flags, reserved, request_id, length`` + one msgpack map), reused unchanged; peer messages
use their own type numbers (0x40..) so one listening socket could serve both later. Frames before
authentication are limited to :data:`PRE_AUTH_MAX_FRAME_BYTES`.

    type  name          direction        body (request -> reply)
    ----  ------------  ---------------  ----------------------------------------------------------
    0x40  HELLO         client -> server {v, node, nonce(32 B), role "control"|"data",
                                          transports [str], session(16 B, data role), transport}
                                         -> {v, node, nonce(32 B), proof(32 B), transports}
    0x41  AUTH          client -> server {proof(32 B)} -> {session(16 B), transport}
    0x42  LOOKUP        control          {keys, ns {Namespace fields}, lease bool}
                                         -> {hit, tiers(u8 per hit block)[, lease, slots(u32[]),
                                             sizes(u32[]), checksums(u64[])]}
    0x43  RELEASE       control          {lease} -> {released bool}
    0x44  READ          data (tcp)       {slots(u32[]), sizes(u32[])} -> {n}, then the raw bytes
                                         of the n blocks back to back (sizes[i] each)
    0x45  RDMA_CONNECT  control          {qpn, psn, gid(16 B), lid} -> same + {mrs [[addr, length,
                                          rkey]], slot_bytes, num_slots}
    0x46  PING          control          {} -> {node, t}

Errors come back as codec error replies (``{"error": class name, "message"}``); a malformed frame
(bad body, wrong field type, unknown type) gets an error reply and the connection goes on; a bad
header closes the connection. Integer arrays travel as little-endian bin (``u32[]``, ``u64[]``):
:func:`pack_u32`/:func:`unpack_u32` are the encode/verify pair.

Pure: no state, no threads.
"""

from __future__ import annotations

import enum
import sys
from array import array
from typing import Any, Sequence

from tierstore.errors import ProtocolError

PEER_VERSION = 1
PRE_AUTH_MAX_FRAME_BYTES = 4096
MAX_FRAME_BYTES = 8 << 20       # 8192 keys = 256 KiB; generous for 100k-key chains
NONCE_BYTES = 32
SESSION_BYTES = 16


class PeerMsg(enum.IntEnum):
    HELLO = 0x40
    AUTH = 0x41
    LOOKUP = 0x42
    RELEASE = 0x43
    READ = 0x44
    RDMA_CONNECT = 0x45
    PING = 0x46


def _pack(typecode: str, values: Sequence[int]) -> bytes:
    a = array(typecode, values)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def _unpack(typecode: str, raw: Any, name: str) -> list[int]:
    if not isinstance(raw, (bytes, bytearray)):
        raise ProtocolError(f"{name} must be bin")
    a = array(typecode)
    if len(raw) % a.itemsize:
        raise ProtocolError(f"{name} of {len(raw)} bytes is not a multiple of {a.itemsize}")
    a.frombytes(raw)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


def pack_u32(values: Sequence[int]) -> bytes:
    return _pack("I", values)


def unpack_u32(raw: Any, name: str = "field") -> list[int]:
    return _unpack("I", raw, name)


def pack_u64(values: Sequence[int]) -> bytes:
    return _pack("Q", values)


def unpack_u64(raw: Any, name: str = "field") -> list[int]:
    return _unpack("Q", raw, name)


def field(body: dict, name: str, kind: type | tuple, *, optional: bool = False, default=None):
    """``body[name]`` checked against ``kind`` (bool is never an int here)."""
    if name not in body:
        if optional:
            return default
        raise ProtocolError(f"missing field {name!r}")
    v = body[name]
    if isinstance(v, bool) and kind is int:
        raise ProtocolError(f"field {name!r} must be int")
    if not isinstance(v, kind):
        raise ProtocolError(f"field {name!r} has type {type(v).__name__}")
    return v


def bin_field(body: dict, name: str, size: int | None = None) -> bytes:
    v = field(body, name, (bytes, bytearray))
    if size is not None and len(v) != size:
        raise ProtocolError(f"field {name!r} must be {size} bytes")
    return bytes(v)
