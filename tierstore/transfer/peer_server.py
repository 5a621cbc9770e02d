"""PeerServer: serves this node's slab and index to authenticated peers.

The seam for the daemon: ``PeerServer(provider, secret, settings=..., node=..., host=..., port=...)``
with ``start()`` / ``stop()``; ``provider`` is a :class:`StoreProvider` (wraps a
:class:`tierstore.store.Store`) or anything with the same five members (``slab``, ``lookup``,
``lease``, ``release``, ``release_owner``). Protocol: transfer/peer_frames.py; authentication and
negotiation: transfer/session.py; the frame-serving loop after authentication:
tierstore/protocol/serve.py (shared with the daemon's).

Leases (what keeps a remote read honest)::

    LOOKUP lease=true  -> provider.lease(keys, owner="peer:<node>:<session>")
                          = Store.prepare_load: pins the hit prefix, stages NVMe-only blocks into
                            DRAM; slots + sizes + checksums go back; the slots join the session's
                            readable set
    READ / RDMA READ   -> only slots in the session's readable set, size <= the leased size;
                          everything else is OutOfRange (the connection goes on)
    RELEASE            -> waits until no READ of this session touches the lease's slots (slot reuse
                          with an active reader is refused: the pins stay until the reader ends),
                          then Store.complete_load
    session ends       -> its data sockets and RDMA queue pair are shut first, then
                          provider.release_owner(owner) drops every pin it still holds

Threads (owned here, joined by ``stop``): one accept thread, one thread per connection. The
provider is called from those threads (the Store takes its own lock).
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import xxhash

from tierstore.errors import ProtocolError, TierStoreError
from tierstore.protocol import codec
from tierstore.protocol.serve import call_handler, serve_frames, write_error, write_reply
from tierstore.transfer.transport import AuthFailed, OutOfRange, Slab, TransportUnavailable
from tierstore.transfer.peer_frames import (MAX_FRAME_BYTES, NONCE_BYTES, PEER_VERSION,
                                         PRE_AUTH_MAX_FRAME_BYTES, SESSION_BYTES, PeerMsg,
                                         bin_field, field as get_field, pack_u32, pack_u64,
                                         unpack_u32)
from tierstore.transfer.session import PeerSettings, auth_key, choose_transport, proof, transcript

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- provider
@dataclass
class Lease:
    lease_id: int
    slots: list[int]
    sizes: list[int]
    checksums: list[int]
    tiers: bytes = b""


class StoreProvider:
    """Adapts a :class:`tierstore.store.Store` to what the peer server needs."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.slab = Slab.of_store(store)
        self._ns_cache: dict[tuple, Any] = {}

    def namespace(self, fields: Any):
        from tierstore.keys import Namespace

        if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
            raise ProtocolError("ns must be a map of Namespace fields")
        try:
            k = tuple(sorted(fields.items()))
            ns = self._ns_cache.get(k)
        except TypeError:
            raise ProtocolError("ns fields must be scalars") from None
        if ns is None:
            try:
                ns = Namespace(**fields)
            except (TypeError, TierStoreError, ValueError) as e:
                raise ProtocolError(f"bad namespace: {e}") from None
            if len(self._ns_cache) < 256:
                self._ns_cache[k] = ns
        return ns

    def lookup(self, keys: Sequence[bytes], ns_fields: Any) -> tuple[int, bytes]:
        r = self.store.lookup(keys, self.namespace(ns_fields))
        return r.num_blocks, bytes(int(t) for t in r.tiers)

    def lease(self, keys: Sequence[bytes], ns_fields: Any, owner: str) -> Lease:
        n, tiers = self.lookup(keys, ns_fields)
        job = self.store.prepare_load(list(keys[:n]), owner=owner)
        return Lease(job.job_id, list(job.slots), list(job.sizes),
                     self.store.checksums(job.keys[: job.num_ready], compute=True),
                     tiers[: job.num_ready])

    def release(self, lease_id: int) -> None:
        self.store.complete_load(lease_id, ok=True)

    def release_owner(self, owner: str) -> None:
        self.store.release_owner(owner)


class ServeHooks:
    """Test seam: called by the TCP READ path before each block is sent (a hand-written
    subclass can sleep, count, or close the connection)."""

    def before_block(self, sess: "ServerSession", index: int, slot: int) -> None:
        pass


# ----------------------------------------------------------------------------- sessions
@dataclass
class ServerSession:
    sid: bytes
    node: str
    transport: str
    owner: str
    leases: dict[int, Lease] = field(default_factory=dict)
    readable: Counter = field(default_factory=Counter)        # slot -> leases holding it
    max_size: dict[int, int] = field(default_factory=dict)    # slot -> leased size
    reading: Counter = field(default_factory=Counter)         # slot -> active READs
    data_socks: set = field(default_factory=set)
    closed: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    bytes_served: int = 0


class PeerServer:
    """Accepts peers on ``host:port`` (port 0 = any) and serves ``provider``'s slab."""

    def __init__(self, provider: Any, secret: bytes, *, node: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, settings: PeerSettings | None = None,
                 rdma: Any = None, hooks: ServeHooks | None = None) -> None:
        if not hasattr(provider, "slab"):
            provider = StoreProvider(provider)
        self.provider = provider
        self.slab: Slab = provider.slab
        self.settings = settings or PeerSettings()
        self.node = node or f"node-{os.getpid()}"
        self.host, self.port = host, port
        self._key = auth_key(secret)
        self.rdma = rdma   # server side of transfer/rdma.py (RdmaServer) or None
        offered = list(self.settings.transports)
        if "rdma" in offered and rdma is None:
            offered.remove("rdma")
        self.transports = offered
        self.hooks = hooks or ServeHooks()
        self.sessions: dict[bytes, ServerSession] = {}
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._preauth = threading.BoundedSemaphore(MAX_PREAUTH_CONNS)
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> tuple[str, int]:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((self.host, self.port))
        ls.listen(64)
        self._listener = ls
        self.port = ls.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name=f"peer-accept-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        from tierstore.transfer import loopback
        loopback.register(self)
        return self.host, self.port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def stop(self) -> None:
        self._stopping = True
        from tierstore.transfer import loopback
        loopback.unregister(self)
        if self._listener is not None:
            _shutdown(self._listener)   # wakes the accept() of the accept thread
            try:
                self._listener.close()
            except OSError:
                pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _shutdown(c)
        for t in list(self._threads):
            t.join(timeout=2.0)
        for sess in list(self.sessions.values()):
            self._end_session(sess)
        if self.rdma is not None and hasattr(self.rdma, "close"):
            self.rdma.close()

    def __enter__(self) -> "PeerServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            if not self._preauth.acquire(blocking=False):
                self.counters["preauth_refused"] += 1   # too many unauthenticated at once
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            codec.tune_socket(sock)
            with self._lock:
                self._conns.add(sock)
                self._threads = [t for t in self._threads if t.is_alive()]
            t = threading.Thread(target=self._serve_conn, args=(sock,), daemon=True,
                                 name=f"peer-conn-{self.port}")
            self._threads.append(t)
            t.start()

    # ------------------------------------------------------------------ connections
    def _serve_conn(self, sock: socket.socket) -> None:
        sess: ServerSession | None = None
        role = "control"
        # One deadline for the whole handshake (not per recv): a peer that trickles bytes cannot
        # hold a connection and its thread open while unauthenticated.
        deadline = threading.Timer(2 * self.settings.timeout_s, _shutdown, args=(sock,))
        deadline.daemon = True
        preauth = True
        try:
            sock.settimeout(self.settings.timeout_s)   # a silent unauthenticated peer goes
            deadline.start()
            try:
                got = self._handshake(sock)
            finally:
                deadline.cancel()
                self._preauth.release()
                preauth = False
            if got is None:
                return
            sess, role = got
            sock.settimeout(None if role == "control" else self.settings.timeout_s * 4)
            if role == "control":   # a peer that vanishes without a FIN is noticed, its leases go
                _keepalive(sock)
            if role == "data":
                with sess.cond:
                    sess.data_socks.add(sock)
            self._loop(sock, sess, role)
        except (OSError, ConnectionError, ProtocolError):
            self.counters["conn_errors"] += 1
        except Exception:   # never let one peer take the server down
            self.counters["conn_crashes"] += 1
            log.exception("peer connection crashed")
        finally:
            deadline.cancel()
            if preauth:
                self._preauth.release()
            _shutdown(sock)
            sock.close()
            with self._lock:
                self._conns.discard(sock)
            if sess is not None:
                if role == "control":
                    self._end_session(sess)
                else:
                    with sess.cond:
                        sess.data_socks.discard(sock)

    def _handshake_step(self, sock: socket.socket, parse: Callable[[codec.FrameHeader, Any], Any]
                        ) -> tuple[Any, Any] | None:
        """One handshake request (a frame of at most PRE_AUTH_MAX_FRAME_BYTES): (its header,
        ``parse(header, body)``), or None after a clean EOF or a refusal (``parse`` raised:
        counted, answered with an error reply; the caller closes)."""
        got = codec.read_frame(sock, PRE_AUTH_MAX_FRAME_BYTES)
        if got is None:
            return None
        hdr, raw = got
        try:
            return hdr, parse(hdr, raw)
        except Exception as e:
            self.counters["auth_refused"] += 1
            write_error(sock, hdr.type, hdr.request_id, e)
            return None

    def _hello(self, hdr: Any, raw: Any) -> tuple:
        if hdr.type != PeerMsg.HELLO:
            raise AuthFailed("authenticate first (HELLO)")
        b = codec.decode_body(raw)
        if get_field(b, "v", int) != PEER_VERSION:
            raise ProtocolError(f"peer protocol version {b.get('v')} not supported")
        node_c = get_field(b, "node", str)
        nonce_c = bin_field(b, "nonce", NONCE_BYTES)
        role = get_field(b, "role", str)
        tr_c = get_field(b, "transports", list)
        if role not in ("control", "data") or not all(isinstance(t, str) for t in tr_c):
            raise ProtocolError("bad role or transports")
        sid = bin_field(b, "session", SESSION_BYTES) if role == "data" else b""
        peer_req = bool(b.get("require_rdma"))
        if role == "control" and self.settings.require_rdma and "rdma" not in tr_c:
            raise TransportUnavailable(
                f"require_rdma is set on {self.node}; peer {node_c} offers {tr_c}")
        return node_c, nonce_c, role, tr_c, sid, peer_req

    def _handshake(self, sock: socket.socket) -> tuple[ServerSession, str] | None:
        got = self._handshake_step(sock, self._hello)
        if got is None:
            return None
        hdr, (node_c, nonce_c, role, tr_c, sid, peer_req) = got
        nonce_s = os.urandom(NONCE_BYTES)
        tx = transcript(role, node_c, self.node, nonce_c, nonce_s, tr_c, self.transports, sid)
        codec.write_frame(sock, PeerMsg.HELLO, hdr.request_id,
                          {"v": PEER_VERSION, "node": self.node, "nonce": nonce_s,
                           "proof": proof(self._key, b"server", tx),
                           "transports": self.transports,
                           "require_rdma": self.settings.require_rdma}, codec.FLAG_REPLY)

        def auth(hdr: Any, raw: Any) -> ServerSession:
            if hdr.type != PeerMsg.AUTH:
                raise AuthFailed("expected AUTH")
            b = codec.decode_body(raw)
            if not hmac.compare_digest(bin_field(b, "proof", 32), proof(self._key, b"client", tx)):
                raise AuthFailed(f"peer {node_c} failed to prove the cluster secret")
            chosen = choose_transport(tr_c, self.transports,
                                      require_rdma=self.settings.require_rdma and role == "control",
                                      peer_requires_rdma=peer_req, peer=node_c)
            if role == "data":
                sess = self.sessions.get(sid)
                if sess is None or sess.closed:
                    raise AuthFailed("unknown or closed session")
                if chosen != sess.transport:
                    raise TransportUnavailable(f"session uses {sess.transport}, not {chosen}")
            else:
                new_sid = os.urandom(SESSION_BYTES)
                sess = ServerSession(new_sid, node_c, chosen,
                                     f"peer:{node_c}:{new_sid.hex()[:12]}")
                with self._lock:
                    self.sessions[new_sid] = sess
            return sess

        got = self._handshake_step(sock, auth)
        if got is None:
            return None
        hdr, sess = got
        codec.write_frame(sock, PeerMsg.AUTH, hdr.request_id,
                          {"session": sess.sid, "transport": sess.transport}, codec.FLAG_REPLY)
        self.counters["sessions" if role == "control" else "data_conns"] += 1
        return sess, role

    def _loop(self, sock: socket.socket, sess: ServerSession, role: str) -> None:
        """Requests after authentication (frames of at most MAX_FRAME_BYTES) until EOF, stop or
        the session's end; the loop is tierstore/protocol/serve.py's. A bad header is raised
        (no reply; _serve_conn counts it and closes); a refused request gets an error reply and
        the connection goes on; anything else a handler raises ends the connection."""
        handlers = {PeerMsg.LOOKUP: self._on_lookup, PeerMsg.RELEASE: self._on_release,
                    PeerMsg.PING: self._on_ping, PeerMsg.RDMA_CONNECT: self._on_rdma_connect}

        def data(hdr: Any, raw: Any) -> bool:
            if hdr.type != PeerMsg.READ:
                write_error(sock, hdr.type, hdr.request_id,
                            ProtocolError("data connections carry READ only"))
                return True
            return self._on_read(sock, sess, hdr.request_id, raw)

        def control(hdr: Any, raw: Any) -> bool:
            try:
                body = call_handler(handlers, hdr.type, sess, raw, what="peer message")
            except TierStoreError as e:
                self.counters["request_errors"] += 1
                write_error(sock, hdr.type, hdr.request_id, e)
                return True
            write_reply(sock, hdr.type, hdr.request_id, body)
            return True

        serve_frames(sock, data if role == "data" else control, max_frame_bytes=MAX_FRAME_BYTES,
                     running=lambda: not self._stopping and not sess.closed)

    # ------------------------------------------------------------------ control handlers
    def _on_ping(self, sess: ServerSession, b: dict) -> dict:
        return {"node": self.node, "t": time.time()}

    def _on_lookup(self, sess: ServerSession, b: dict) -> dict:
        keys = codec.unpack_keys(get_field(b, "keys", (bytes, bytearray, list)))
        ns = get_field(b, "ns", dict)
        if not bool(b.get("lease")):
            hit, tiers = self.provider.lookup(keys, ns)
            self.counters["lookups"] += 1
            return {"hit": hit, "tiers": tiers}
        lease = self.provider.lease(keys, ns, sess.owner)
        with sess.cond:
            if sess.closed:
                self.provider.release(lease.lease_id)
                raise TransportUnavailable("session closed")
            sess.leases[lease.lease_id] = lease
            for s, n in zip(lease.slots, lease.sizes):
                sess.readable[s] += 1
                sess.max_size[s] = max(sess.max_size.get(s, 0), n)
        self.counters["leases"] += 1
        return {"hit": len(lease.slots), "tiers": lease.tiers, "lease": lease.lease_id,
                "slots": pack_u32(lease.slots), "sizes": pack_u32(lease.sizes),
                "checksums": pack_u64(lease.checksums)}

    def _on_release(self, sess: ServerSession, b: dict) -> dict:
        lid = get_field(b, "lease", int)
        with sess.cond:
            lease = sess.leases.get(lid)
            if lease is None:
                return {"released": False}   # unknown / late release: ignored (XFER-12)
            deadline = time.monotonic() + self.settings.timeout_s
            while any(sess.reading[s] for s in lease.slots) and time.monotonic() < deadline:
                sess.cond.wait(0.05)   # a reader still streams these slots: keep the pins
            if any(sess.reading[s] for s in lease.slots):
                raise TransportUnavailable("lease still being read; release refused")
            self._drop_lease_locked(sess, lease)
        self.provider.release(lid)
        return {"released": True}

    def _drop_lease_locked(self, sess: ServerSession, lease: Lease) -> None:
        sess.leases.pop(lease.lease_id, None)
        for s in lease.slots:
            sess.readable[s] -= 1
            if sess.readable[s] <= 0:
                del sess.readable[s]
                sess.max_size.pop(s, None)

    def _on_rdma_connect(self, sess: ServerSession, b: dict) -> dict:
        if self.rdma is None or sess.transport != "rdma":
            raise TransportUnavailable("this session does not use rdma")
        return self.rdma.accept(sess.sid, b)

    # ------------------------------------------------------------------ reads
    def check_read(self, sess: ServerSession, slots: Sequence[int], sizes: Sequence[int]) -> None:
        """Bounds check against the slab and the session's leases (call with sess.cond held)."""
        if len(slots) != len(sizes):
            raise ProtocolError("slots and sizes differ in length")
        for s, n in zip(slots, sizes):
            self.slab.check(s, n)
            if not sess.readable.get(s) or n > sess.max_size.get(s, 0):
                raise OutOfRange(f"slot {s} ({n} bytes) is not leased to this session")

    def begin_read(self, sess: ServerSession, slots: Sequence[int], sizes: Sequence[int]) -> None:
        with sess.cond:
            if sess.closed:
                raise TransportUnavailable("session closed")
            self.check_read(sess, slots, sizes)
            for s in slots:
                sess.reading[s] += 1

    def end_read(self, sess: ServerSession, slots: Sequence[int], nbytes: int) -> None:
        with sess.cond:
            for s in slots:
                sess.reading[s] -= 1
                if sess.reading[s] <= 0:
                    del sess.reading[s]
            sess.bytes_served += nbytes
            sess.cond.notify_all()

    def _on_read(self, sock: socket.socket, sess: ServerSession, rid: int, raw) -> bool:
        """Serve one READ; False when the connection must close (stream state unknown)."""
        try:
            b = codec.decode_body(raw)
            slots = unpack_u32(get_field(b, "slots", (bytes, bytearray)), "slots")
            sizes = unpack_u32(get_field(b, "sizes", (bytes, bytearray)), "sizes")
            self.begin_read(sess, slots, sizes)
        except TierStoreError as e:
            self.counters["read_refused"] += 1
            write_error(sock, PeerMsg.READ, rid, e)
            return True
        sent = 0
        try:
            codec.write_frame(sock, PeerMsg.READ, rid, {"n": len(slots)}, codec.FLAG_REPLY)
            hooks, slab = self.hooks, self.slab
            for i, (s, n) in enumerate(zip(slots, sizes)):
                hooks.before_block(sess, i, s)
                sock.sendall(slab.view(s, n))
                sent += n
            return True
        except OSError:
            return False
        finally:
            self.end_read(sess, slots, sent)
            self.counters["bytes_served"] += sent

    def local_read(self, sid: bytes, slots: Sequence[int], sizes: Sequence[int],
                   dst: Sequence[memoryview]) -> int:
        """The loopback transport's data path: same checks, memcpy instead of a socket."""
        sess = self.sessions.get(sid)
        if sess is None:
            raise TransportUnavailable("unknown session")
        self.begin_read(sess, slots, sizes)
        n = 0
        try:
            for s, size, d in zip(slots, sizes, dst):
                d[:size] = self.slab.view(s, size)
                n += size
        finally:
            self.end_read(sess, slots, n)
        return n

    # ------------------------------------------------------------------ session end
    def _end_session(self, sess: ServerSession) -> None:
        with sess.cond:
            if sess.closed:
                return
            sess.closed = True
            socks = list(sess.data_socks)
        for s in socks:
            _shutdown(s)   # stop streaming first ...
        if self.rdma is not None:
            self.rdma.drop(sess.sid)   # ... and the RDMA QP (flushes the peer's reads)
        with sess.cond:
            deadline = time.monotonic() + self.settings.timeout_s
            while sess.reading and time.monotonic() < deadline:
                sess.cond.wait(0.05)
            sess.leases.clear()
        self.provider.release_owner(sess.owner)   # ... then drop every pin it held
        with self._lock:
            self.sessions.pop(sess.sid, None)
        self.counters["sessions_ended"] += 1

    def stats(self) -> dict:
        return {"node": self.node, "address": f"{self.host}:{self.port}",
                "transports": self.transports,
                "sessions": [{"peer": s.node, "transport": s.transport, "leases": len(s.leases),
                              "bytes_served": s.bytes_served} for s in self.sessions.values()],
                "counters": dict(self.counters)}


MAX_PREAUTH_CONNS = 64   # unauthenticated connections at once; more are closed on accept


def _keepalive(sock: socket.socket, idle_s: int = 10, interval_s: int = 5, count: int = 3) -> None:
    """TCP keepalive: a silent peer is declared gone after about idle + interval x count
    seconds (25 s), so its session ends and its leases and pins are released."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, v in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", interval_s), ("TCP_KEEPCNT", count)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), v)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def checksum(view) -> int:
    return xxhash.xxh3_64_intdigest(view)
