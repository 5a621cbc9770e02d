"""The frame-serving loop both listening sides share: the daemon's local clients
(tierstore/daemon/server.py) and the peer server (tierstore/transfer/peer_server.py).

What it owns: reading one request after another off a connected socket (each header verified,
its length checked against the caller's limit before a byte of the body is read:
:func:`tierstore.protocol.codec.read_frame`), handing each to the caller, the handler lookup by
message type, the reply and error-reply frames, and the one rule for a header that cannot be
trusted. What stays with each server: its handlers, its counters, authentication, which
exceptions it answers and which end the connection::

    serve_frames(sock, answer, max_frame_bytes=N, running=..., on_bad_frame=...)
        while running():
            read_frame(sock, N)          clean EOF                    -> return
                                         FrameError, on_bad_frame set -> on_bad_frame(e), one error
                                                                         reply when the header's
                                                                         type and id were read,
                                                                         return
                                         FrameError, no on_bad_frame  -> raised
                                         OSError / ConnectionError    -> raised
            answer(hdr, raw) is False                                 -> return
    call_handler(handlers, mtype, ctx, raw)   handlers[mtype](ctx, decode_body(raw)); a type
                                              without a handler is ProtocolError "unknown
                                              <what> type N" (the caller answers it and goes on)
    write_reply / write_error                 the reply frame (REPLY) / the error reply (REPLY |
                                              ERROR, body codec.error_body); OSError is raised

After any ``return`` the caller closes the connection. The frame layout and the error-reply
body are codec.py's; this module adds no wire format.

Threading: none of its own and no state; called from the servers' connection threads.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Mapping

from tierstore.errors import ProtocolError
from tierstore.protocol.codec import (FLAG_ERROR, FLAG_REPLY, FrameError, FrameHeader,
                                      decode_body, encode_frame, error_body, read_frame)

Answer = Callable[[FrameHeader, "bytes | bytearray"], bool]
Handler = Callable[[Any, dict], dict]


def serve_frames(sock: socket.socket, answer: Answer, *, max_frame_bytes: int,
                 running: Callable[[], bool] | None = None,
                 on_bad_frame: Callable[[FrameError], None] | None = None) -> None:
    """Read frames of at most ``max_frame_bytes`` and hand each to ``answer(hdr, raw)`` until a
    clean EOF, ``answer`` returns False or ``running()`` turns false. A header that cannot be
    trusted ends the loop: with ``on_bad_frame``, it is called, then the sender gets one error
    reply when the header's type and id were read (a send that fails is ignored); without it
    the FrameError is raised to the caller. Socket errors are raised."""
    while running is None or running():
        try:
            got = read_frame(sock, max_frame_bytes)
        except FrameError as e:
            if on_bad_frame is None:
                raise
            on_bad_frame(e)
            if e.header is not None:
                try:
                    write_error(sock, e.header.type, e.header.request_id, e)
                except OSError:
                    pass
            return
        if got is None:
            return
        hdr, raw = got
        if not answer(hdr, raw):
            return


def call_handler(handlers: Mapping[int, Handler], mtype: int, ctx: Any, raw: bytes | bytearray,
                 *, what: str = "message") -> dict:
    """The reply body of ``handlers[mtype](ctx, body)``, ``body`` decoded from ``raw``. A type
    without a handler is ProtocolError ``unknown <what> type <mtype>``; a body that is not a
    msgpack map is ProtocolError; whatever the handler raises is raised."""
    h = handlers.get(mtype)
    if h is None:
        raise ProtocolError(f"unknown {what} type {mtype}")
    return h(ctx, decode_body(raw))


def write_reply(sock: socket.socket, mtype: int, rid: int, body: dict | None) -> None:
    """The reply to request ``rid`` of type ``mtype``."""
    sock.sendall(encode_frame(mtype, rid, body, FLAG_REPLY))


def write_error(sock: socket.socket, mtype: int, rid: int, exc: BaseException) -> None:
    """The error reply to request ``rid`` of type ``mtype``: ``codec.error_body(exc)``."""
    sock.sendall(encode_frame(mtype & 0xFF, rid, error_body(exc), FLAG_REPLY | FLAG_ERROR))


__all__ = ["call_handler", "serve_frames", "write_error", "write_reply"]
