"""Authentication, negotiation, bounds and frame fuzzing of the peer server."""

from __future__ import annotations

import os
import socket
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from transfer_support import NS, SECRET, chain, payload  # noqa: E402

from tierstore.protocol import codec
from tierstore.transfer import AuthFailed, OutOfRange, TransportUnavailable
from tierstore.transfer.peer_frames import PeerMsg, pack_u32
from tierstore.transfer.session import choose_transport, open_data_conn


def test_choose_transport_prefers_rdma_and_refuses_downgrade():
    assert choose_transport(["rdma", "tcp"], ["tcp"]) == "tcp"
    assert choose_transport(["tcp", "rdma"], ["rdma", "tcp"]) == "rdma"
    with pytest.raises(TransportUnavailable, match="require_rdma"):
        choose_transport(["rdma", "tcp"], ["tcp"], require_rdma=True)
    with pytest.raises(TransportUnavailable):
        choose_transport(["tcp"], ["loopback"])


def test_peer_without_the_secret_is_refused(pair_factory):
    """A client with another secret gets AuthFailed; the server never learns or sends the
    secret, stays up and still serves a client that has it."""
    p = pair_factory("tcp", secret_b=b"x" * 32)
    keys = chain(2)
    p.a.put(keys, NS, payload(keys))
    with pytest.raises(AuthFailed):
        p.client.lookup(p.addr, keys, NS)
    assert p.server.counters["auth_refused"] >= 0
    good = pair_factory("tcp")
    from tierstore.transfer import PeerClient, PeerSettings
    c = PeerClient(good.b, SECRET, node="C", settings=PeerSettings(transports=("tcp",)))
    try:
        assert c.lookup(p.addr, keys, NS) == 2
    finally:
        c.close()


def test_server_refuses_a_client_with_the_wrong_secret(pair_factory):
    """The client side checks the server's proof too (mutual authentication)."""
    p = pair_factory("tcp")
    p.server._key = b"\0" * 32   # a server that does not hold the secret
    with pytest.raises(AuthFailed):
        p.client.lookup(p.addr, chain(1), NS)


def _raw(addr):
    s = socket.create_connection(addr, timeout=2)
    return s


def test_requests_before_auth_are_refused(pair_factory):
    p = pair_factory("tcp")
    s = _raw(p.addr)
    codec.write_frame(s, PeerMsg.LOOKUP, 1, {"keys": b"", "ns": NS.describe()})
    hdr, body = codec.read_frame(s)
    assert hdr.flags & codec.FLAG_ERROR and codec.decode_body(body)["error"] == "AuthFailed"
    s.close()


def test_out_of_range_and_unleased_reads_are_refused(pair_factory):
    """A READ of a slot outside the slab, or not leased to the session, gets OutOfRange and
    the connection goes on."""
    p = pair_factory("tcp")
    keys = chain(2)
    p.a.put(keys, NS, payload(keys))
    sess = p.client.session(p.addr)
    conn = open_data_conn(sess, "tcp")
    for slots in ([10 ** 6], [0], [2 ** 32 - 1]):
        with pytest.raises(OutOfRange):
            conn.request(PeerMsg.READ, {"slots": pack_u32(slots), "sizes": pack_u32([16])})
    lease = sess.lookup(keys, NS, lease=True)
    with pytest.raises(OutOfRange):   # more bytes than the leased block
        conn.request(PeerMsg.READ, {"slots": pack_u32(lease["slots"][:1]),
                                    "sizes": pack_u32([p.a.config.slot_bytes * 2])})
    r = conn.request(PeerMsg.READ, {"slots": pack_u32(lease["slots"][:1]), "sizes": pack_u32([8])})
    assert r == {"n": 1}
    assert conn.sock.recv(8, socket.MSG_WAITALL) == payload(keys)[0][:8]
    conn.close()
    assert sess.release(lease["lease"]) is True
    assert sess.release(lease["lease"]) is False   # a late second release is ignored


def test_require_rdma_fails_fast_when_peer_has_no_rdma(pair_factory):
    p = pair_factory("tcp", server_transports=("tcp",), client_transports=("rdma", "tcp"),
                     require_b=True)
    with pytest.raises(TransportUnavailable, match="require_rdma"):
        p.client.lookup(p.addr, chain(1), NS)


FRAME_TYPES = st.sampled_from([int(t) for t in PeerMsg] + [0, 1, 2, 99, 255])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_frames_leave_the_server_up(pair_factory, data):
    """Fuzz: random headers, bodies and message types, before and after authentication; the
    server answers or closes that one connection and keeps serving everyone else."""
    if not hasattr(test_malformed_frames_leave_the_server_up, "pair"):
        p = pair_factory("tcp")
        keys = chain(2)
        p.a.put(keys, NS, payload(keys))
        test_malformed_frames_leave_the_server_up.pair = p
    p = test_malformed_frames_leave_the_server_up.pair
    mode = data.draw(st.sampled_from(["raw", "frame", "authed"]))
    try:
        if mode == "authed":
            sess = p.client.session(p.addr)
            s = open_data_conn(sess, "tcp").sock if data.draw(st.booleans()) else sess.conn.sock
        else:
            s = _raw(p.addr)
        s.settimeout(0.1)
        if mode == "raw":
            s.sendall(data.draw(st.binary(max_size=64)))
        else:
            body = data.draw(st.one_of(
                st.binary(max_size=64),
                st.dictionaries(st.sampled_from(["keys", "ns", "lease", "slots", "sizes", "v",
                                                 "node", "nonce", "role", "proof", "session"]),
                                st.one_of(st.integers(-2 ** 40, 2 ** 40), st.binary(max_size=40),
                                          st.text(max_size=8), st.none(), st.booleans(),
                                          st.lists(st.integers(0, 5), max_size=3)),
                                max_size=5).map(lambda d: __import__("msgpack").packb(d))))
            t = data.draw(FRAME_TYPES)
            s.sendall(codec.HEADER.pack(codec.MAGIC, 1, t, 0, 0, 7, len(body)) + body)
        try:
            s.recv(4096)
        except OSError:
            pass
        if mode != "authed":
            s.close()
    finally:
        p.client.close()
    keys = chain(2)
    assert p.client.lookup(p.addr, keys, NS) == 2


def test_handshake_has_one_deadline_not_one_per_recv(pair_factory):
    """Adversarial finding: a peer that trickles its HELLO one byte at a time kept an
    unauthenticated connection (and its thread) open indefinitely; now the whole handshake has
    one deadline of 2 x timeout_s."""
    import socket as _socket
    import time as _time

    from tierstore.protocol import codec
    from tierstore.transfer.peer_frames import PeerMsg

    p = pair_factory("tcp", timeout_s=0.5)
    host, port = p.addr
    frame = codec.encode_frame(int(PeerMsg.HELLO), 1, {"node": "slow", "pad": "x" * 64})
    s = _socket.create_connection((host, port), timeout=5)
    t0 = _time.monotonic()
    closed = False
    try:
        for i in range(40):            # 40 x 0.1 s = 4 s of a valid frame, trickled
            try:
                s.send(frame[i:i + 1])
            except OSError:
                closed = True
                break
            s.settimeout(0.1)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except _socket.timeout:
                pass
    finally:
        s.close()
    assert closed and _time.monotonic() - t0 < 2.5


def test_unauthenticated_connections_are_capped(pair_factory):
    """Adversarial finding: every pre-auth connection held a thread, without limit. Past
    MAX_PREAUTH_CONNS at once, new ones are closed on accept; authenticated peers still work once
    the idle ones are gone."""
    import socket as _socket

    from tierstore.transfer.peer_server import MAX_PREAUTH_CONNS

    p = pair_factory("tcp", timeout_s=3.0)
    host, port = p.addr
    idle = [_socket.create_connection((host, port), timeout=5) for _ in range(MAX_PREAUTH_CONNS)]
    try:
        extra = _socket.create_connection((host, port), timeout=5)
        extra.settimeout(2.0)
        assert extra.recv(1) == b""          # closed at once, not held until a deadline
        extra.close()
        assert p.server.counters["preauth_refused"] >= 1
    finally:
        for s in idle:
            s.close()
    import time as _time

    keys = chain(2)
    p.a.put(keys, NS, payload(keys))
    deadline = _time.monotonic() + 10
    while True:   # the server notices the closed idle sockets and frees their places
        try:
            assert p.client.fetch(p.addr, keys, NS) == 2
            break
        except Exception:
            if _time.monotonic() > deadline:
                raise
            _time.sleep(0.2)
