"""Peer sessions: authentication, transport negotiation, the control RPCs, per-peer counters.

Authentication (mutual HMAC challenge-response; the secret never travels)::

    client                                              server
    HELLO {node_c, nonce_c, role, transports_c} ──────▶
                        ◀────── HELLO' {node_s, nonce_s, transports_s, proof_s}
    verify proof_s
    AUTH {proof_c} ───────────────────────────────────▶ verify proof_c
                        ◀────── AUTH' {session, transport}        (or AuthFailed, closed)

    transcript = "tierstore.peer.v1" | role | node_c | node_s | nonce_c | nonce_s
                 | transports_c | transports_s | session?
    proof_s = HMAC-SHA256(K, "server" | transcript)   proof_c = HMAC-SHA256(K, "client" | transcript)
    K       = HMAC-SHA256(cluster secret, "tierstore peer auth v1")   (a key only for this)

Both nonces are fresh random per connection, so a recorded proof is useless on another
connection; both advertised transport lists are inside the transcript, so a man in the middle
cannot strip "rdma" from an offer without breaking the proofs. Until AUTH succeeds the server
answers nothing else and reads frames of at most 4 KiB.

Negotiation: each end offers the transports it can use now (rdma only with a verbs device);
:func:`choose_transport` takes the first of :data:`TRANSPORT_PREFERENCE` both offer. A
``require_rdma`` (on either end) that the pair cannot meet raises :class:`TransportUnavailable`
at connect time — the server refuses the HELLO and the client refuses to go on — never a silent
downgrade (case XFER-15). The chosen transport is in :class:`PeerStats` (CLI ``peers ls``, metrics).

Per-peer counters: :class:`PeerCounters` owns the facts both readers of a peer count (transport,
RPC count and latency, bytes and blocks read, last error) and the rule for each;
:class:`PeerStats` (this session's view) and the daemon's per-peer record
(tierstore/daemon/peers.py, which outlives sessions) derive from it.

Threading: :class:`ControlSession` serialises its RPCs with one lock (one request in flight per
control connection); stats are updated under the same lock.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from tierstore.errors import ProtocolError, TransferFailed
from tierstore.protocol import codec
from tierstore.transfer.transport import (TRANSPORT_PREFERENCE, AuthFailed, TransportUnavailable,
                                     raise_remote)
from tierstore.transfer.peer_frames import (MAX_FRAME_BYTES, NONCE_BYTES, PEER_VERSION,
                                         PRE_AUTH_MAX_FRAME_BYTES, SESSION_BYTES, PeerMsg,
                                         bin_field, field, pack_u32, unpack_u32, unpack_u64)


@dataclass(frozen=True)
class PeerSettings:
    """Per-node peer settings. ``transports``: what this node offers, best first after
    filtering by availability; ``require_rdma``: refuse any peer the pair cannot reach over rdma;
    ``streams``: TCP data connections per peer; ``timeout_s``: longest wait on a silent peer;
    ``verify_checksums``: check xxh3-64 of every received block whose checksum is known."""

    transports: tuple[str, ...] = ("tcp",)
    require_rdma: bool = False
    streams: int = 2
    timeout_s: float = 5.0
    connect_timeout_s: float = 2.0
    verify_checksums: bool = False


def auth_key(secret: bytes) -> bytes:
    return hmac.new(secret, b"tierstore peer auth v1", hashlib.sha256).digest()


def transcript(role: str, node_c: str, node_s: str, nonce_c: bytes, nonce_s: bytes,
               tr_c: Sequence[str], tr_s: Sequence[str], session: bytes = b"") -> bytes:
    parts = [b"tierstore.peer.v1", role.encode(), node_c.encode(), node_s.encode(), nonce_c,
             nonce_s, ",".join(tr_c).encode(), ",".join(tr_s).encode(), session]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def proof(key: bytes, who: bytes, tx: bytes) -> bytes:
    return hmac.new(key, who + tx, hashlib.sha256).digest()


def choose_transport(mine: Sequence[str], theirs: Sequence[str], *, require_rdma: bool = False,
                     peer_requires_rdma: bool = False, peer: str = "peer") -> str:
    common = [t for t in TRANSPORT_PREFERENCE if t in mine and t in theirs]
    if (require_rdma or peer_requires_rdma) and "rdma" not in common:
        who = "this node" if require_rdma else f"{peer}"
        raise TransportUnavailable(
            f"require_rdma is set on {who}, but rdma is not common to both ends "
            f"(this node offers {list(mine)}, {peer} offers {list(theirs)}); refusing to fall "
            f"back to {common[0] if common else 'nothing'}")
    if not common:
        raise TransportUnavailable(f"no common transport with {peer}: this node offers "
                                   f"{list(mine)}, {peer} offers {list(theirs)}")
    return common[0]


@dataclass(kw_only=True)
class PeerCounters:
    """The facts about one peer that every reader of peers counts, and how each is counted:
    the transport in use, the control RPCs and their latency, the bytes and whole blocks
    pulled, the last error. Kept once here; :class:`PeerStats` (one control session) and the
    daemon's per-peer record (tierstore/daemon/peers.py, which outlives sessions) derive from
    it and add what only they know. Not thread-safe: the owner updates it under its own lock.

    ``avg_rpc_ms`` is the running mean of the RPC latencies, or, when ``RPC_MEAN_WINDOW`` is
    set, the running mean of the first that many and an EWMA of weight 1/window after."""

    RPC_MEAN_WINDOW: ClassVar[int | None] = None

    transport: str = ""
    rpcs: int = 0
    last_rpc_ms: float = 0.0
    avg_rpc_ms: float = 0.0
    bytes_read: int = 0
    blocks_read: int = 0
    last_error: str = ""

    def rpc_done(self, ms: float) -> None:
        """One control RPC answered after ``ms`` milliseconds."""
        self.rpcs += 1
        self.last_rpc_ms = ms
        w = self.RPC_MEAN_WINDOW
        self.avg_rpc_ms += (ms - self.avg_rpc_ms) / (self.rpcs if w is None else min(self.rpcs, w))

    def read_done(self, blocks: int, nbytes: int) -> None:
        """``blocks`` whole blocks of ``nbytes`` in all arrived from the peer."""
        self.blocks_read += blocks
        self.bytes_read += nbytes

    def error(self, e: BaseException) -> None:
        """Remember ``e`` as the peer's last error (``"<class>: <message>"``)."""
        self.last_error = f"{type(e).__name__}: {e}"


@dataclass
class PeerStats(PeerCounters):
    """What one control session knows of its peer (``PeerClient.stats()``): the counters, plus
    whether the session is connected and its read jobs (all, and those that failed)."""

    peer: str
    address: str
    connected: bool = False
    read_jobs: int = 0
    read_failures: int = 0

    def as_dict(self) -> dict:
        return {"peer": self.peer, "address": self.address, "transport": self.transport,
                "connected": self.connected, "rpcs": self.rpcs, "last_rpc_ms": self.last_rpc_ms,
                "avg_rpc_ms": self.avg_rpc_ms, "bytes_read": self.bytes_read,
                "blocks_read": self.blocks_read, "read_jobs": self.read_jobs,
                "read_failures": self.read_failures, "last_error": self.last_error}


class Conn:
    """A connected socket speaking codec frames, with request ids. Single-threaded."""

    def __init__(self, sock: socket.socket, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.sock = sock
        self.max_frame_bytes = max_frame_bytes
        self._rid = 0

    def request(self, mtype: int, body: dict | None = None) -> dict:
        self._rid = (self._rid + 1) & 0xFFFFFFFF
        codec.write_frame(self.sock, mtype, self._rid, body)
        return self.reply(mtype, self._rid)

    def reply(self, mtype: int, rid: int) -> dict:
        got = codec.read_frame(self.sock, self.max_frame_bytes)
        if got is None:
            raise ConnectionError("peer closed the connection")
        hdr, raw = got
        if hdr.type != mtype or hdr.request_id != rid or not hdr.flags & codec.FLAG_REPLY:
            raise ProtocolError(f"unexpected reply type {hdr.type} id {hdr.request_id}")
        body = codec.decode_body(raw)
        if hdr.flags & codec.FLAG_ERROR:
            raise_remote(body)
        return body

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def dial(address: tuple[str, int], timeout_s: float) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    codec.tune_socket(sock)
    return sock


def client_handshake(sock: socket.socket, secret: bytes, node: str, transports: Sequence[str], *,
                     role: str = "control", session: bytes = b"", require_rdma: bool = False,
                     peer_label: str = "peer") -> tuple[Conn, str, bytes, str]:
    """Authenticate on a fresh connection. Returns (conn, peer node, session id, transport)."""
    conn = Conn(sock, PRE_AUTH_MAX_FRAME_BYTES)
    nonce_c = os.urandom(NONCE_BYTES)
    tr_c = list(transports)
    hello = {"v": PEER_VERSION, "node": node, "nonce": nonce_c, "role": role, "transports": tr_c,
             "require_rdma": require_rdma}
    if session:
        hello["session"] = session
    r = conn.request(PeerMsg.HELLO, hello)
    try:
        node_s = field(r, "node", str)
        nonce_s = bin_field(r, "nonce", NONCE_BYTES)
        tr_s = [t for t in field(r, "transports", list) if isinstance(t, str)]
        p_s = bin_field(r, "proof", 32)
    except ProtocolError as e:
        raise AuthFailed(f"bad HELLO reply from {peer_label}: {e}") from None
    key = auth_key(secret)
    tx = transcript(role, node, node_s, nonce_c, nonce_s, tr_c, tr_s, session)
    if not hmac.compare_digest(p_s, proof(key, b"server", tx)):
        raise AuthFailed(f"{peer_label} ({node_s}) failed to prove the cluster secret")
    chosen = choose_transport(tr_c, tr_s, require_rdma=require_rdma,
                              peer_requires_rdma=bool(r.get("require_rdma")), peer=node_s)
    r2 = conn.request(PeerMsg.AUTH, {"proof": proof(key, b"client", tx), "transport": chosen})
    sid = bin_field(r2, "session", SESSION_BYTES)
    conn.max_frame_bytes = MAX_FRAME_BYTES
    return conn, node_s, sid, field(r2, "transport", str)


class ControlSession:
    """Client end of one authenticated control connection to a peer."""

    def __init__(self, address: tuple[str, int], secret: bytes, node: str,
                 settings: PeerSettings, transports: Sequence[str]) -> None:
        self.address = address
        self.settings = settings
        self.label = f"{address[0]}:{address[1]}"
        self._lock = threading.Lock()
        sock = dial(address, settings.connect_timeout_s)
        try:
            sock.settimeout(settings.timeout_s)
            self.conn, self.peer_node, self.session_id, self.transport = client_handshake(
                sock, secret, node, transports, require_rdma=settings.require_rdma,
                peer_label=self.label)
        except BaseException:
            sock.close()
            raise
        self.secret, self.node, self.offered = secret, node, list(transports)
        self.stats = PeerStats(self.peer_node, self.label, transport=self.transport,
                               connected=True)
        self.closed = False

    def rpc(self, mtype: int, body: dict | None = None) -> dict:
        with self._lock:
            if self.closed:
                raise TransferFailed(f"session to {self.label} is closed")
            t0 = time.perf_counter()
            try:
                r = self.conn.request(mtype, body)
            except (OSError, ConnectionError) as e:
                self._mark_dead(e)
                raise TransferFailed(f"peer {self.label}: {type(e).__name__}: {e}") from None
            except ProtocolError as e:
                if isinstance(e, codec.FrameError):
                    self._mark_dead(e)
                raise
            self.stats.rpc_done((time.perf_counter() - t0) * 1e3)
            return r

    def _mark_dead(self, e: BaseException) -> None:
        self.closed = True
        self.stats.connected = False
        self.stats.error(e)
        try:
            self.conn.close()
        except OSError:
            pass

    # ----------------------------------------------------------------- RPCs
    def lookup(self, keys: Sequence[bytes], namespace: Any, *, lease: bool = False) -> dict:
        """One batched lookup. Returns {hit, tiers[, lease, slots, sizes, checksums]} decoded."""
        body = {"keys": codec.pack_keys(keys), "ns": namespace.describe(), "lease": lease}
        r = self.rpc(PeerMsg.LOOKUP, body)
        out = {"hit": field(r, "hit", int), "tiers": list(bin_field(r, "tiers"))}
        if lease:
            out["lease"] = field(r, "lease", int)
            out["slots"] = unpack_u32(r.get("slots", b""), "slots")
            out["sizes"] = unpack_u32(r.get("sizes", b""), "sizes")
            out["checksums"] = unpack_u64(r.get("checksums", b""), "checksums")
            if not len(out["slots"]) == len(out["sizes"]) == len(out["checksums"]) == out["hit"]:
                raise ProtocolError("lease reply lengths disagree")
        return out

    def release(self, lease_id: int) -> bool:
        return bool(self.rpc(PeerMsg.RELEASE, {"lease": lease_id}).get("released"))

    def ping(self) -> float:
        t0 = time.perf_counter()
        self.rpc(PeerMsg.PING, {})
        return (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self.stats.connected = False
                self.conn.close()


def open_data_conn(session: ControlSession, transport: str) -> Conn:
    """An extra authenticated connection bound to ``session`` (TCP data streams)."""
    s = session.settings
    sock = dial(session.address, s.connect_timeout_s)
    try:
        sock.settimeout(s.timeout_s)
        conn, _, _, _ = client_handshake(sock, session.secret, session.node, [transport],
                                         role="data", session=session.session_id,
                                         peer_label=session.label)
    except BaseException:
        sock.close()
        raise
    return conn


__all__ = ["ControlSession", "Conn", "PeerCounters", "PeerSettings", "PeerStats", "choose_transport",
           "client_handshake", "open_data_conn", "pack_u32"]
