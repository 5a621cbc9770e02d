"""serve_frames / call_handler: the frame-serving loop the daemon and the peer server share."""

import socket

import pytest

from tierstore.errors import ProtocolError
from tierstore.protocol.codec import (FLAG_ERROR, FLAG_REPLY, HEADER, MAGIC, FrameError,
                                      decode_body, encode_frame, read_frame)
from tierstore.protocol.serve import call_handler, serve_frames, write_error, write_reply


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_each_frame_reaches_answer_until_eof(pair):
    """Two requests, then a clean EOF: both are answered in order and the loop returns."""
    a, b = pair
    seen = []
    b.sendall(encode_frame(2, 7, {"x": 1}) + encode_frame(3, 8))
    b.shutdown(socket.SHUT_WR)

    def answer(hdr, raw):
        seen.append((hdr.type, hdr.request_id, decode_body(raw)))
        write_reply(a, hdr.type, hdr.request_id, {"ok": hdr.request_id})
        return True

    serve_frames(a, answer, max_frame_bytes=1024)
    assert seen == [(2, 7, {"x": 1}), (3, 8, {})]
    for rid in (7, 8):
        hdr, raw = read_frame(b)
        assert hdr.request_id == rid and hdr.flags == FLAG_REPLY
        assert decode_body(raw) == {"ok": rid}


def test_answer_false_or_not_running_ends_the_loop(pair):
    """``answer`` returning False stops after that frame; ``running()`` false reads nothing."""
    a, b = pair
    b.sendall(encode_frame(2, 1) + encode_frame(2, 2))
    seen = []
    serve_frames(a, lambda hdr, raw: seen.append(hdr.request_id) or False,
                 max_frame_bytes=1024)
    assert seen == [1]
    serve_frames(a, lambda hdr, raw: seen.append(hdr.request_id) or True,
                 max_frame_bytes=1024, running=lambda: False)
    assert seen == [1]


def test_oversized_frame_with_on_bad_frame_replies_once_and_returns(pair):
    """A length over the limit: on_bad_frame sees the FrameError, the sender gets one error
    reply with the header's type and id, and nothing reaches ``answer``."""
    a, b = pair
    b.sendall(HEADER.pack(MAGIC, 2, 5, 0, 0, 42, 4096))
    bad, seen = [], []
    serve_frames(a, lambda hdr, raw: seen.append(hdr) or True, max_frame_bytes=1024,
                 on_bad_frame=bad.append)
    assert len(bad) == 1 and isinstance(bad[0], FrameError) and not seen
    hdr, raw = read_frame(b)
    assert (hdr.type, hdr.request_id, hdr.flags) == (5, 42, FLAG_REPLY | FLAG_ERROR)
    assert decode_body(raw)["error"] == "FrameError"


def test_bad_frame_without_on_bad_frame_is_raised_unanswered(pair):
    """Without on_bad_frame a bad magic is the caller's: raised, and no reply is sent."""
    a, b = pair
    b.sendall(b"XX" + bytes(14))
    with pytest.raises(FrameError):
        serve_frames(a, lambda hdr, raw: True, max_frame_bytes=1024)
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(1)


def test_call_handler_dispatches_by_type_and_names_unknown_types():
    handlers = {2: lambda ctx, body: {"ctx": ctx, **body}}
    assert call_handler(handlers, 2, "c", encode_frame(2, 1, {"k": 1})[16:]) == {"ctx": "c",
                                                                                   "k": 1}
    with pytest.raises(ProtocolError, match="unknown peer message type 9"):
        call_handler(handlers, 9, None, b"", what="peer message")
    with pytest.raises(ProtocolError, match="not a map"):
        call_handler(handlers, 2, None, b"\x01")


def test_write_error_carries_the_class_name(pair):
    a, b = pair
    write_error(a, 0x44, 3, ProtocolError("data connections carry READ only"))
    hdr, raw = read_frame(b)
    assert (hdr.type, hdr.request_id, hdr.flags) == (0x44, 3, FLAG_REPLY | FLAG_ERROR)
    assert decode_body(raw) == {"error": "ProtocolError",
                                "message": "data connections carry READ only"}
