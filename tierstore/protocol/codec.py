"""Wire format between the daemon and its local clients: versioned, length-prefixed frames.

Every message, in both directions, is one frame: a fixed 16-byte header, then ``length`` bytes of
body. All integers are big-endian (network order)::

    offset  size  field        meaning
    ------  ----  -----------  -------------------------------------------------------------
         0     2  magic        0x54 0x53 (b"TS"); anything else -> ProtocolError, connection closed
         2     1  version      PROTOCOL_VERSION (2); another version -> error reply, connection closed
         3     1  type         MsgType (u8); unknown -> error reply, connection kept
         4     2  flags        bit 0 REPLY (set by the daemon), bit 1 ERROR (body is an error),
                               other bits must be 0
         6     2  reserved     must be 0
         8     4  request_id   u32 chosen by the client, echoed in the reply
        12     4  length       body bytes (u32); > max_frame_bytes -> error reply, connection closed
                               (checked before a single body byte is read)
        16     n  body         one msgpack map (str keys; bytes as msgpack bin); empty body = {}

A reply carries the request's type and id with REPLY set. An error reply also sets ERROR; its body
is ``{"error": <exception class name>, "message": <one line>}`` (a RetryLater adds ``"after_s":
<seconds>``; readers ignore fields they do not know), and the client raises the class of that name
from :mod:`tierstore.errors` (``TierStoreError`` for names it does not know): :func:`error_from_body`.

Compatibility within a version: new requests are new types appended to :class:`MsgType` (a
number is never reused or renumbered); a daemon that predates one answers it with an error reply
(ProtocolError "unknown message type N") and keeps the connection, so a newer client gets a clear
error, never a wrong answer. A new optional body field is allowed only where a reader that
ignores it still does what the sender meant; where ignoring it would change the outcome (a dry
run that an older daemon would carry out) the request is a new type instead (EVICT_DRY_RUN, not
an EVICT field). PROTOCOL_VERSION changes only when an existing frame or message changes
meaning.

Keys travel as one bin field ``keys``: the concatenation of 32-byte keys (the common case), or a
msgpack array of bin when a caller uses keys of another length. :func:`pack_keys` /
:func:`unpack_keys` are the pair that encode and verify that field.

This module is pure (no sockets of its own besides :func:`read_frame`/:func:`write_frame`, which
take a connected socket) and has no state; it is safe to use from any thread.
"""

from __future__ import annotations

import enum
import functools
import socket
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import msgpack

from tierstore import errors
from tierstore.errors import ProtocolError, RetryLater, TierStoreError

MAGIC = b"TS"
PROTOCOL_VERSION = 2   # 2: batched/asynchronous jobs, flush, per-block store answers, evict tier
HEADER = struct.Struct(">2sBBHHII")
HEADER_BYTES = HEADER.size   # 16
assert HEADER_BYTES == 16

FLAG_REPLY = 0x1
FLAG_ERROR = 0x2
_KNOWN_FLAGS = FLAG_REPLY | FLAG_ERROR

DEFAULT_MAX_FRAME_BYTES = 16 << 20
KEY_BYTES = 32


class MsgType(enum.IntEnum):
    """Message types (u8). Request body fields are listed in tierstore/daemon/server.py."""

    HELLO = 1
    LOOKUP = 2
    PREPARE_STORE = 3
    COMPLETE_STORE = 4
    PREPARE_LOAD = 5
    COMPLETE_LOAD = 6
    PIN = 7
    UNPIN = 8
    EVICT = 9
    STATS = 10
    BLOCKS = 11
    BLOCK = 12
    CHECK = 13
    SHUTDOWN = 14
    PING = 15
    FETCH_REMOTE = 16   # pull a chain's missing blocks from peers (tierstore/daemon/peers.py)
    PEERS = 17          # per-peer state for `tierstore peers ls`
    PEER_PING = 18      # one authenticated round trip to a peer
    PREPARE_LOADS = 19  # several chains in one call, asynchronous by default (NVMe reads staged)
    POLL_LOADS = 20     # which of these load jobs are staged
    COMPLETE_LOADS = 21
    PREPARE_STORES = 22
    COMPLETE_STORES = 23
    FLUSH = 24          # wait until every stored block has its NVMe copy
    WAIT_LOAD = 25      # block until one load job is staged (bounded)
    RELEASE = 26        # release every pin one request of this connection holds
    RETAIN = 27         # a retention hint: session pins bounded per tenant (tierstore/retention.py)
    RESOLVE = 28        # hex key prefixes -> full keys (the CLI's `blocks` verbs)
    EVICT_DRY_RUN = 29  # what EVICT would answer, per key; changes nothing
    UNPIN_EACH = 30     # one pin released per key that has one; an answer per key


_TYPES = {int(t) for t in MsgType}


@dataclass(frozen=True)
class FrameHeader:
    type: int          # raw u8: may be an unknown type (the caller decides how to answer)
    flags: int
    request_id: int
    length: int
    version: int = PROTOCOL_VERSION

    @property
    def known_type(self) -> bool:
        return self.type in _TYPES


class FrameError(ProtocolError):
    """A header that cannot be answered on this connection (bad magic, version or length):
    the receiver replies once if it can and closes. ``request_id``/``type`` are those read."""

    def __init__(self, message: str, header: FrameHeader | None = None) -> None:
        super().__init__(message)
        self.header = header


def encode_frame(msg_type: int, request_id: int, body: dict | None = None, flags: int = 0) -> bytes:
    """Header + msgpack body as one bytes object."""
    payload = msgpack.packb(body, use_bin_type=True) if body else b""
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(msg_type), flags, 0,
                       request_id & 0xFFFFFFFF, len(payload)) + payload


def decode_header(raw: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FrameHeader:
    """Verify a 16-byte header. Raises FrameError for bad magic, version, flags, reserved bits or
    a length over ``max_frame_bytes``; an unknown type is *not* an error here."""
    if len(raw) != HEADER_BYTES:
        raise FrameError(f"short header ({len(raw)} bytes)")
    magic, version, mtype, flags, reserved, rid, length = HEADER.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}")
    hdr = FrameHeader(mtype, flags, rid, length, version)
    if version != PROTOCOL_VERSION:
        raise FrameError(f"protocol version {version} not supported (this side speaks "
                         f"{PROTOCOL_VERSION})", hdr)
    if flags & ~_KNOWN_FLAGS or reserved:
        raise FrameError(f"unknown flags 0x{flags:04x} / reserved 0x{reserved:04x}", hdr)
    if length > max_frame_bytes:
        raise FrameError(f"frame of {length} bytes exceeds the limit of {max_frame_bytes}", hdr)
    return hdr


def decode_body(raw: bytes | memoryview) -> dict:
    """msgpack map -> dict. Raises ProtocolError for anything else (trailing bytes included)."""
    if not raw:
        return {}
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated classes for bad input
        raise ProtocolError(f"undecodable body: {type(e).__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError("body is not a map")
    return body


def error_body(exc: BaseException) -> dict:
    """The body of an error reply: ``{"error": class name, "message": one line}``, plus
    ``after_s`` for a RetryLater (an optional field: a reader that does not know it ignores it,
    so protocol version 2 carries it unchanged)."""
    body: dict[str, Any] = {"error": type(exc).__name__,
                            "message": " ".join(str(exc).split())[:1000]}
    if isinstance(exc, RetryLater):
        body["after_s"] = float(exc.after_s)
    return body


def error_from_body(body: dict, extra: Mapping[str, type] | None = None) -> TierStoreError:
    """The exception an error reply names: the one rule for every reader of error replies (the
    daemon's clients, tierstore/client/remote.py, and the peer sessions, tierstore/transfer/).
    The class of that name from :mod:`tierstore.errors` or ``extra`` (a reader's own
    TierStoreError subclasses); any other name (a bug's ValueError, a newer release's class) is
    a TierStoreError whose message names it. A RetryLater keeps the ``after_s`` it was raised
    with (0.0 when the sender did not say)."""
    name = str(body.get("error", "TierStoreError"))
    msg = str(body.get("message", ""))
    cls = (extra or {}).get(name) or getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, TierStoreError)):
        return TierStoreError(f"remote error {name}: {msg}")
    if issubclass(cls, RetryLater):
        try:
            after_s = float(body.get("after_s", 0.0))
        except (TypeError, ValueError):
            after_s = 0.0
        return cls(msg, after_s=after_s)
    return cls(msg)


# ------------------------------------------------------------------------------ keys
def pack_keys(keys: Sequence[bytes]) -> bytes | list[bytes]:
    """Keys as one bin (all 32 bytes long) or a list of bin."""
    blob = b"".join(keys)
    if len(blob) == KEY_BYTES * len(keys) and (not keys or set(map(len, keys)) == {KEY_BYTES}):
        return blob
    return [bytes(k) for k in keys]


_STRUCT_MAX_KEYS = 16384


@functools.lru_cache(maxsize=16)
def _key_struct(n: int) -> struct.Struct:
    return struct.Struct(f"{KEY_BYTES}s" * n)


def unpack_keys(value: Any) -> list[bytes]:
    """Inverse of :func:`pack_keys`; raises ProtocolError for anything malformed."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) % KEY_BYTES:
            raise ProtocolError(f"keys field of {len(value)} bytes is not a multiple of {KEY_BYTES}")
        n = len(value) // KEY_BYTES
        if n <= _STRUCT_MAX_KEYS:   # a compiled format splits 4x faster than slicing
            return list(_key_struct(n).unpack(value))
        v = bytes(value)
        return [v[i:i + KEY_BYTES] for i in range(0, len(v), KEY_BYTES)]
    if isinstance(value, list) and all(isinstance(k, (bytes, bytearray)) and len(k) == KEY_BYTES
                                       for k in value):
        return [bytes(k) for k in value]
    raise ProtocolError(f"keys must be bin or an array of {KEY_BYTES}-byte bin")


# ------------------------------------------------------------------------------ sockets
_RECV_CHUNK = 1 << 20   # memory grows with the bytes that arrived, never with a claimed length


def recv_exact(sock: socket.socket, n: int) -> bytearray | bytes | None:
    """Exactly ``n`` bytes, or None on a clean EOF before the first byte; ConnectionError on an
    EOF in the middle.

    The buffer grows as bytes arrive (in steps of at most 1 MiB), so a peer that announces a
    large frame and then sends nothing holds at most one step of memory, not the whole length.
    """
    if n == 0:
        return b""
    buf = bytearray(min(n, _RECV_CHUNK))
    got = 0
    while got < n:
        if got == len(buf):
            buf.extend(bytes(min(n - got, len(buf))))   # double, bounded by what is still due
        with memoryview(buf) as view:
            k = sock.recv_into(view[got:], len(buf) - got)
        if k == 0:
            if got == 0:
                return None
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def read_frame(sock: socket.socket, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
               ) -> tuple[FrameHeader, bytes | bytearray] | None:
    """One frame (header verified before the body is read), or None on a clean EOF."""
    raw = recv_exact(sock, HEADER_BYTES)
    if raw is None:
        return None
    hdr = decode_header(bytes(raw), max_frame_bytes)
    body = recv_exact(sock, hdr.length)
    if body is None:
        raise ConnectionError("connection closed before the body")
    return hdr, body


SOCKET_BUFFER_BYTES = 4 << 20


def tune_socket(sock: socket.socket) -> None:
    """Large kernel buffers, so a frame of a long chain's keys goes out in one send."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        except OSError:
            pass


def write_frame(sock: socket.socket, msg_type: int, request_id: int, body: dict | None = None,
                flags: int = 0) -> None:
    sock.sendall(encode_frame(msg_type, request_id, body, flags))
