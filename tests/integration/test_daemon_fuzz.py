"""Malformed frames against a live daemon (issue 3 acceptance, third bullet; hypothesis-driven).

Every malformed input gets an error reply or a closed connection; the daemon stays up and keeps
answering a well-behaved client correctly.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from daemon_support import DaemonProc, config_toml  # noqa: E402

from tierstore.protocol.codec import (FLAG_ERROR, FLAG_REPLY, HEADER, HEADER_BYTES, MAGIC,  # noqa: E402
                                      PROTOCOL_VERSION, MsgType, decode_header, encode_frame)

pytestmark = pytest.mark.timeout(120)
MAX_FRAME = 1 << 16


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    d = DaemonProc(tmp / "data", tmp / "data" / "ts.sock",
                   config_toml(tmp / "ts.toml", slot_bytes=4096, dram_blocks=64,
                               max_frame_bytes=MAX_FRAME))
    d.start()
    yield d
    d.kill()


@pytest.fixture(scope="module")
def good(daemon):
    from tierstore.client import open_client
    from tierstore.keys import Namespace

    c = open_client(socket=daemon.socket)
    ns = Namespace("fuzz", 16)
    keys = c.keyer(ns).chain(list(range(16 * 8)))
    blocks = [bytes([i]) * 4096 for i in range(8)]
    c.put(keys, ns, blocks)
    yield c, ns, keys, blocks
    c.close()


def _header(version=PROTOCOL_VERSION, mtype=int(MsgType.PING), flags=0, reserved=0, rid=7,
            length=0, magic=MAGIC) -> bytes:
    return HEADER.pack(magic, version, mtype, flags, reserved, rid, length)


def _msgpack_values():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.binary(max_size=70),
                     st.text(max_size=20), st.floats(allow_nan=False))
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


_known = [int(t) for t in MsgType if t not in (MsgType.SHUTDOWN,)]

inputs = st.one_of(
    st.binary(min_size=1, max_size=300).map(lambda b: ("random", b)),
    st.integers(0, 255).filter(lambda v: v != PROTOCOL_VERSION).map(
        lambda v: ("version", _header(version=v))),
    st.integers(MAX_FRAME + 1, 2**32 - 1).map(lambda n: ("oversized", _header(length=n))),
    st.integers(0, 255).filter(lambda t: t not in {int(m) for m in MsgType}).map(
        lambda t: ("unknown", encode_frame(t, 9, {"x": 1}))),
    st.tuples(st.sampled_from(_known), st.binary(min_size=1, max_size=200)).map(
        lambda a: ("garbage-body", _header(mtype=a[0], length=len(a[1])) + a[1])),
    st.tuples(st.sampled_from(_known), st.dictionaries(
        st.sampled_from(["keys", "ns", "pin", "ttl_s", "size", "job", "ok", "limit", "tier",
                         "key", "fix", "parent"]), _msgpack_values(), max_size=6)).map(
        lambda a: ("bad-fields", _frame_raw(a[0], a[1]))),
    st.tuples(st.integers(1, 0x3FFF), st.integers(0, 0xFFFF)).map(
        lambda a: ("flags", _header(flags=a[0] << 2 | 1, reserved=a[1]))),
    st.binary(min_size=1, max_size=15).map(lambda b: ("short", MAGIC + b[:13])),
)


def _frame_raw(mtype, body):
    payload = msgpack.packb(body, use_bin_type=True)
    return _header(mtype=mtype, length=len(payload)) + payload


def _exchange(path, data: bytes) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)          # an incomplete frame must not hang the daemon
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def _frames(raw: bytes):
    off = 0
    while off < len(raw):
        hdr = decode_header(raw[off:off + HEADER_BYTES], 256 << 20)
        yield hdr, raw[off + HEADER_BYTES: off + HEADER_BYTES + hdr.length]
        off += HEADER_BYTES + hdr.length


def _one_case(daemon, good, case):
    """One malformed input against the daemon, then the good client's lookup."""
    kind, data = case
    reply = _exchange(daemon.socket, data)
    frames = list(_frames(reply))
    for hdr, body in frames:
        assert hdr.flags & FLAG_REPLY
    if kind in ("version", "oversized", "unknown", "garbage-body", "flags"):
        assert frames and frames[0][0].flags & FLAG_ERROR, (kind, reply[:64])
    if kind in ("version", "oversized"):
        assert len(frames) == 1                       # replied once, then closed
    c, ns, keys, blocks = good
    assert daemon.alive(), daemon.log_text()
    assert c.lookup(keys, ns).num_blocks == len(keys)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=inputs)
def test_malformed_frames_get_an_error_or_a_closed_connection(daemon, good, case):
    """Random bytes, wrong versions, oversized lengths, unknown types, garbage bodies, bad
    fields and unknown flags: each is answered with replies only (errors for the bad frame) or
    the connection is closed; afterwards the daemon still serves a good client correctly."""
    _one_case(daemon, good, case)


def test_daemon_state_is_intact_after_the_fuzzing(daemon, good):
    """After fuzzing (its own round of examples: this test does not rely on running after the
    one above): the good client's blocks are byte-exact, check() is clean, and once the fuzzing
    connections are gone (the good client's is the only one left) no job is left pending."""
    settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))(
        given(case=inputs)(lambda case: _one_case(daemon, good, case)))()
    c, ns, keys, blocks = good
    assert c.get(keys) == blocks
    assert c.check() == []
    deadline = time.monotonic() + 10
    while (st := c.stats())["daemon"]["connections"] > 1:   # the daemon notices the closes
        assert time.monotonic() < deadline, st["daemon"]
        time.sleep(0.05)
    assert st["daemon"]["connections"] == 1
    assert st["pending_stores"] == 0 and st["pending_loads"] == 0
    assert daemon.alive()
    log = daemon.log.read_text(errors="replace")
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]


def test_header_byte_table_matches_the_codec():
    """The docstring's byte table: 16 bytes, big-endian, magic first."""
    raw = encode_frame(MsgType.LOOKUP, 0x01020304, {"a": 1}, FLAG_REPLY)
    assert raw[:2] == b"TS" and raw[2] == PROTOCOL_VERSION and raw[3] == MsgType.LOOKUP
    assert struct.unpack(">H", raw[4:6])[0] == FLAG_REPLY and raw[6:8] == b"\0\0"
    assert raw[8:12] == b"\x01\x02\x03\x04"
    assert struct.unpack(">I", raw[12:16])[0] == len(raw) - 16


@pytest.mark.parametrize("mtype,body", [
    (MsgType.LOOKUP, {"keys": [b"short"], "ns": {"model": "fuzz", "block_size": 16}}),
    (MsgType.PREPARE_STORE, {"keys": [b"k" * 32], "ns": {"model": "fuzz", "block_size": 16}, "size": "12"}),
    (MsgType.PREPARE_STORE, {"keys": [b"k" * 32], "ns": {"model": "fuzz", "block_size": float("nan")}, "size": 8}),
    (MsgType.PREPARE_STORE, {"keys": [b"k" * 32], "ns": {"model": [1], "block_size": 16}, "size": 8}),
    (MsgType.PREPARE_STORE, {"keys": [b"k" * 32], "ns": {"model": "fuzz", "block_size": 16}}),
    (MsgType.BLOCKS, {"limit": -1}),
])
def test_field_validation_is_an_error_reply(daemon, good, mtype, body):
    """Adversarial findings: keys that are not 32 bytes, a size given as a string, a namespace
    with a NaN block size or a non-string model, a missing size and a negative limit are error
    replies (the connection stays usable), never silently accepted."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(str(daemon.socket))
        s.sendall(encode_frame(int(mtype), 11, body))
        hdr = decode_header(_recv(s, HEADER_BYTES))
        assert hdr.flags & FLAG_ERROR and hdr.request_id == 11
        _recv(s, hdr.length)
        s.sendall(encode_frame(int(MsgType.PING), 12, {}))
        hdr = decode_header(_recv(s, HEADER_BYTES))
        assert hdr.flags & FLAG_REPLY and not hdr.flags & FLAG_ERROR
    finally:
        s.close()
    c, ns, keys, blocks = good
    assert c.get(keys) == blocks


def _recv(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "connection closed"
        buf += chunk
    return buf
