"""The daemon's peer side: serve this node's slab to other nodes, find and pull blocks from them.

What it owns (built from ``[peers]`` in tierstore/settings.py; nothing exists when disabled)::

    PeerServer     listens on [peers] host:port; serves lookups, leases and reads of this
                   node's Store to authenticated peers (tierstore/transfer/peer_server.py)
    PeerClient     one authenticated control session (+ data link) per peer, opened on first
                   use; pulls blocks into this node's DRAM slab (tierstore/transfer/fetcher.py)
    membership     the static list of ``[peers] peers``, or etcd (this node registered under a
                   lease; the live members polled) — tierstore/cluster/membership.py
    _PeerState     per peer: state, last error, RPC latency, cumulative bytes / blocks /
                   failures (they outlive sessions: what ``peers ls`` and the metrics show);
                   the facts a session counts too are kept and counted by the base class
                   they share (tierstore/transfer/session.py, PeerCounters)

Nearest-tier lookup (``LOOKUP {…, peers: true}``)::

    local Store.lookup(keys)                -> local prefix n_local (hbm / dram / nvme)
    keys[n_local:] -> every live peer       -> one batched LOOKUP RPC per peer, in parallel,
                                               nothing pinned there; hit count + tier per block
    per block after n_local: the peer whose copy is nearest (dram before nvme), then the
    longest run, then the lowest RPC latency; the chain ends at the first block no node has

Fetch from the nearest copy (``FETCH_REMOTE``)::

    local prefix n_local; peers asked as above for keys[n_local:]
    best peer (furthest reach, then dram first, then latency)
        PeerClient.start_fetch(peer, lacking)     -> ``lacking`` = keys[pos:pos+w] minus the
                                                    blocks already here (a chain with a gap
                                                    moves only the gap: issue 13 item 3); the
                                                    peer leases (pins) its hit prefix, staging
                                                    NVMe-only blocks through its DRAM; local
                                                    DRAM slots reserved (invisible)
        Fetch.finish()                            -> bytes land in the slots; published when
                                                    the job is DONE; a job that fails keeps the
                                                    blocks that arrived whole before the first
                                                    one that did not (issue 13 item 2)
    a peer whose lease came back short (its DRAM could stage only part of an NVMe run) is asked
    again while each round makes progress, with half the window when a lease came back empty;
    another peer is tried while it reaches further than what is now local (each at most once
    after a round without progress or with an error); a failure marks the peer down for
    ``retry_s``. When no other peer covered the gap the answer says so (``failed``, ``n`` <
    ``promised``: what the peers reported) and a plain FETCH_REMOTE raises TransferFailed (a
    ``partial`` one answers, so the caller can apply its load-failure policy to the blocks
    the peers promised); never a silently short answer

Pool placement (a second copy on each block's home node by rendezvous hashing over the live
members, ``cluster.membership.home_node``) is not done: the node that computed a block keeps it
and lookups ask every live peer, which is one RPC per peer and fine for tens of nodes.

Local fetch jobs are owned by ``peer-fetch`` (not by the asking connection): a client that
disconnects mid-fetch must not free slots the transport is still writing; the Fetch settles
them itself (tierstore/transfer/fetcher.py, case XFER-12).

Threads: the PeerServer's accept/connection threads, the etcd keeper thread (EtcdMembership),
and a small lookup pool (``peers-lookup-N``) — all owned by :class:`DaemonPeers` and stopped by
``stop()``. Public methods are called from the daemon's connection threads; per-peer state is
guarded by ``self._lock``; the PeerClient serialises RPCs per session itself.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from tierstore.errors import ConfigError, TierStoreError, TransferFailed
from tierstore.transfer.session import PeerCounters
from tierstore.types import Tier

log = logging.getLogger("tierstore.daemon.peers")

FETCH_OWNER = "peer-fetch"


# ----------------------------------------------------------------------------- per peer
@dataclass
class _PeerState(PeerCounters):
    """This daemon's record of one member: the counters every reader of a peer keeps
    (:class:`tierstore.transfer.session.PeerCounters`: transport, RPCs and latency, bytes and
    blocks read, last error), kept across sessions, plus what only the daemon knows."""

    RPC_MEAN_WINDOW = 100             # running mean of the first 100 RPCs, then an EWMA

    name: str
    address: tuple[str, int]
    state: str = "idle"               # idle (never dialled), up, down
    node: str = ""                    # the name the peer proved in its handshake
    down_until: float = 0.0
    lookups: int = 0
    lookup_hit_blocks: int = 0
    fetches: int = 0
    failures: int = 0
    blocks_kept_after_failure: int = 0   # whole blocks a failed fetch kept (issue 13 item 2)
    connects: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "address": f"{self.address[0]}:{self.address[1]}",
                "node": self.node, "state": self.state, "transport": self.transport,
                "rpc_ms": round(self.last_rpc_ms, 3), "avg_rpc_ms": round(self.avg_rpc_ms, 3),
                "rpcs": self.rpcs, "lookups": self.lookups,
                "lookup_hit_blocks": self.lookup_hit_blocks, "fetches": self.fetches,
                "bytes_read": self.bytes_read, "blocks_read": self.blocks_read,
                "failures": self.failures,
                "blocks_kept_after_failure": self.blocks_kept_after_failure,
                "last_error": self.last_error}


def peer_settings(ps: Any, transports: Sequence[str] | None = None):
    """``[peers]`` -> :class:`tierstore.transfer.session.PeerSettings`."""
    from tierstore.transfer.session import PeerSettings

    return PeerSettings(transports=tuple(transports if transports is not None else ps.transports),
                        require_rdma=ps.require_rdma, streams=ps.streams, timeout_s=ps.timeout_s,
                        connect_timeout_s=ps.connect_timeout_s,
                        verify_checksums=ps.verify_checksums)


def _rdma(ps: Any, slab: Any) -> tuple[Any, Any]:
    """(RdmaServer, rdma_factory) when rdma is offered and a device exists, else (None, None).
    ``require_rdma`` without a device fails loudly here, at daemon start."""
    if "rdma" not in ps.transports:
        return None, None
    from tierstore.transfer import verbs

    ok, why = verbs.probe()
    if not ok:
        if ps.require_rdma:
            raise ConfigError(f"[peers] require_rdma is set but {why}")
        log.warning("[peers] rdma offered but unusable (%s); peers will use %s", why,
                    [t for t in ps.transports if t != "rdma"] or "nothing")
        return None, None
    from tierstore.transfer import rdma

    dev = verbs.open_device()
    return rdma.RdmaServer(dev, slab), rdma.factory(dev)


# ----------------------------------------------------------------------------- the seam
class DaemonPeers:
    """Peer server + client + membership of one daemon (see the module docstring)."""

    def __init__(self, ps: Any, store: Any, secret: bytes) -> None:
        self.ps = ps
        self.store = store
        self.secret = secret
        self.node = ps.node_name()
        self.server: Any = None
        self.client: Any = None
        self.membership: Any = None
        self.kind = "etcd" if ps.etcd else "static"
        self._states: dict[str, _PeerState] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._rdma_server: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "DaemonPeers":
        from tierstore.cluster.membership import EtcdMembership, Member, StaticMembership
        from tierstore.transfer import PeerClient, PeerServer, Slab

        ps = self.ps
        try:
            self._rdma_server, rdma_factory = _rdma(ps, Slab.of_store(self.store))
            offered = [t for t in ps.transports if t != "rdma" or self._rdma_server is not None]
            if not offered:
                raise ConfigError("[peers] transports: nothing usable on this node")
            st = peer_settings(ps, offered)
            self.server = PeerServer(self.store, self.secret, node=self.node, host=ps.host,
                                     port=ps.port, settings=st, rdma=self._rdma_server)
            self.server.start()
            self.client = PeerClient(self.store, self.secret, node=self.node, settings=st,
                                     rdma_factory=rdma_factory)
            if ps.etcd:
                me = Member(self.node, ps.advertise_host or ps.host, self.server.port,
                            tuple(self.server.transports))
                host, port = ps.etcd[0]
                self.membership = EtcdMembership(host, port, me, prefix=ps.etcd_prefix,
                                                 ttl_s=ps.lease_ttl_s,
                                                 timeout_s=ps.connect_timeout_s)
            else:
                self.membership = StaticMembership(
                    [Member(e.name, e.host, e.port) for e in ps.peers], self_node=self.node)
            self.membership.start()
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="peers-lookup")
        except BaseException:
            self.stop()
            raise
        log.info("peers: node %s listening on %s:%d (%s membership, transports %s)", self.node,
                 ps.host, self.server.port, self.kind, ",".join(self.server.transports))
        return self

    def stop(self) -> None:
        """Leave the membership first (etcd lease revoked: others stop sending here), then close
        outgoing sessions (in-flight fetches fail and free their slots), then the server (its
        sessions' pins are released)."""
        if self.membership is not None:
            try:
                self.membership.stop()
            except Exception:
                log.exception("peers: leaving the membership failed")
            self.membership = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.stop()   # also closes the RdmaServer it was given
            self.server = None

    @property
    def address(self) -> tuple[str, int] | None:
        return None if self.server is None else self.server.address

    # ------------------------------------------------------------------ members
    def _members(self) -> list[Any]:
        if self.membership is None:
            return []
        me = self.address
        return [m for m in self.membership.peers()
                if m.node != self.node and (m.host, m.port) != me]

    def _state(self, m: Any) -> _PeerState:
        with self._lock:
            s = self._states.get(m.node)
            if s is None or s.address != m.address:
                s = self._states[m.node] = _PeerState(m.node, m.address)
            return s

    def _live(self) -> list[tuple[Any, _PeerState]]:
        now = time.monotonic()
        out = []
        for m in self._members():
            s = self._state(m)
            if s.state in ("down", "self") and now < s.down_until:
                continue
            out.append((m, s))
        return out

    def _failed(self, s: _PeerState, e: BaseException) -> None:
        with self._lock:
            if s.state == "self":   # not a failure: skipped for good (see _session)
                return
            s.state = "down"
            s.failures += 1
            s.error(e)
            s.down_until = time.monotonic() + self.ps.retry_s
        log.info("peers: %s (%s:%d) failed: %s", s.name, *s.address, s.last_error)

    def _session(self, s: _PeerState) -> Any:
        sess = self.client.session(s.address)
        if sess.peer_node == self.node:
            # the member is this node under another name or address: never ask ourselves
            with self._lock:
                s.state, s.node, s.down_until = "self", sess.peer_node, float("inf")
            raise ConfigError(f"peer {s.name} at {s.address} is this node ({self.node}); skipped")
        with self._lock:
            if s.state != "up":
                s.connects += 1
            s.state, s.node, s.transport = "up", sess.peer_node, sess.transport
        return sess

    # ------------------------------------------------------------------ lookup
    def _ask(self, s: _PeerState, keys: Sequence[bytes], ns: Any) -> tuple[int, list[int]] | None:
        try:
            sess = self._session(s)
            t0 = time.perf_counter()
            r = sess.lookup(keys, ns)
            ms = (time.perf_counter() - t0) * 1e3
        except (TierStoreError, OSError) as e:
            self._failed(s, e)
            return None
        hit = min(int(r["hit"]), len(keys))
        tiers = list(r["tiers"])[:hit]
        if len(tiers) < hit:
            tiers += [int(Tier.DRAM)] * (hit - len(tiers))
        # a peer's tier bytes are not trusted: anything but a local tier is read as DRAM (the
        # peer stages it there for the read anyway)
        local = {int(Tier.HBM), int(Tier.DRAM), int(Tier.NVME)}
        tiers = [t if t in local else int(Tier.DRAM) for t in tiers]
        with self._lock:
            s.rpc_done(ms)
            s.lookups += 1
            s.lookup_hit_blocks += hit
        return hit, tiers

    def _ask_all(self, keys: Sequence[bytes], ns: Any) -> dict[str, tuple[_PeerState, int, list[int]]]:
        """One batched lookup RPC per live peer (in parallel); peers that fail are marked down."""
        live = self._live()
        if not live or not keys:
            return {}
        if len(live) == 1 or self._pool is None:
            got = [self._ask(s, keys, ns) for _, s in live]
        else:
            futs = [self._pool.submit(self._ask, s, keys, ns) for _, s in live]
            got = [f.result() for f in futs]
        return {s.name: (s, r[0], r[1]) for (_, s), r in zip(live, got) if r is not None and r[0]}

    def locate(self, keys: Sequence[bytes], ns: Any, *, pin: bool = False, owner: str = "",
               ttl_s: float | None = None) -> dict:
        """Nearest-tier lookup across nodes; the reply body of ``LOOKUP {peers: true}``:
        ``{n, local, tiers (bin, one Tier value per hit block, where it lives), remote
        [[peer, blocks], ...] (runs after the local prefix)}``."""
        r = self.store.lookup(keys, ns, pin=pin, owner=owner, ttl_s=ttl_s)
        n_local = r.num_blocks
        tiers = bytearray(int(t) for t in r.tiers)
        rest = list(keys[n_local:])
        answers = self._ask_all(rest, ns)
        runs: list[list] = []
        for i in range(len(rest)):
            best = None
            for name, (s, hit, pt) in answers.items():
                if hit > i:
                    rank = (pt[i], -hit, s.avg_rpc_ms, name)
                    if best is None or rank < best[0]:
                        best = (rank, name, pt[i])
            if best is None:
                break   # a chain ends at the first block no node holds
            _, name, t = best
            tiers.append(t)
            if runs and runs[-1][0] == name:
                runs[-1][1] += 1
            else:
                runs.append([name, 1])
        return {"n": len(tiers), "local": n_local, "tiers": bytes(tiers), "remote": runs}

    # ------------------------------------------------------------------ fetch
    def fetch(self, keys: Sequence[bytes], ns: Any, *, partial: bool = False) -> dict:
        """Pull the blocks of ``keys`` that are not local from the nearest peers into local
        DRAM; blocks already here (also after a gap) are neither leased nor read again.
        Returns ``{n (local prefix now), fetched, sources {peer: blocks}, errors, promised
        (the prefix the peers reported), failed}``. A peer that fails mid-read leaves the
        blocks that arrived whole before the failure (issue 13 item 2). ``failed``: a peer
        failed and nobody covered its part (``n < promised``); then, unless ``partial``, this
        raises TransferFailed instead of answering."""
        keys = list(keys)
        n_local = self.store.lookup(keys, ns).num_blocks
        out = {"n": n_local, "fetched": 0, "sources": {}, "errors": [], "promised": n_local,
               "failed": False}
        if n_local >= len(keys):
            return out
        answers = self._ask_all(keys[n_local:], ns)
        reach = {name: (s, n_local + hit, pt) for name, (s, hit, pt) in answers.items()}
        promised = max((r for _, r, _ in reach.values()), default=n_local)
        tried: set[str] = set()
        window = {name: r - n_local for name, (_, r, _) in reach.items()}
        errors: list[str] = []
        pos = n_local
        # every round makes progress, halves a peer's window, or retires a peer: bounded
        for _ in range(2 * len(keys) + 2 * len(reach)):
            cands = [(name, s, r, pt) for name, (s, r, pt) in reach.items()
                     if name not in tried and r > pos]
            if not cands:
                break
            name, s, r, pt = min(cands, key=lambda c: (-c[2], c[3][pos - n_local], c[1].avg_rpc_ms,
                                                       c[0]))
            w = min(window[name], r - pos)
            n_err = len(errors)
            lacking = self._lacking(keys[pos:pos + w], ns)   # item 3: never what is here
            got = self._fetch_from(s, lacking, ns, errors) if lacking else 0
            if got:
                out["sources"][name] = out["sources"].get(name, 0) + got
                out["fetched"] += got
            new_pos = self.store.lookup(keys, ns).num_blocks
            if len(errors) > n_err:
                tried.add(name)         # it failed (what arrived whole is kept): not again
            elif not got and w > 1 and new_pos <= pos:
                window[name] = w // 2   # lease came back empty: its DRAM could not stage that
                                        # many NVMe blocks at once (all of a lease is pinned)
            elif new_pos <= pos:
                tried.add(name)
            pos = new_pos
        out["n"] = pos
        out["errors"] = errors
        out["promised"] = promised
        out["failed"] = bool(errors) and pos < promised
        if out["failed"] and not partial:
            raise TransferFailed(f"fetch stopped at block {pos} of {promised} found on peers: "
                                 + "; ".join(errors))
        return out

    def _lacking(self, keys: Sequence[bytes], ns: Any) -> list[bytes]:
        """``keys`` minus those resident here (one lookup for the leading run, then per key
        after the first miss: a chain with a gap fetches only the gap)."""
        keys = list(keys)
        n = self.store.lookup(keys, ns).num_blocks
        return [k for k in keys[n:] if self.store.lookup([k], ns).num_blocks == 0]

    def _fetch_from(self, s: _PeerState, keys: Sequence[bytes], ns: Any, errors: list) -> int:
        f = None
        try:
            self._session(s)
            f = self.client.start_fetch(s.address, keys, ns, owner=FETCH_OWNER)
            if f is None:
                return 0
            n = f.finish()
            if f.settled is None:   # not terminal in time: the reaper frees the slots later
                raise TransferFailed(f"fetch from {s.name} did not end within the timeout")
        except (TierStoreError, OSError) as e:
            if f is not None and f.settled is None:
                self.client.abort(f)
            self._failed(s, e)
            errors.append(f"{s.name}: {type(e).__name__}: {e}")
            if f is not None and f.kept:   # whole blocks that arrived before the failure
                with self._lock:
                    s.read_done(f.kept, f.kept * (f.job.sizes[0] if f.job.sizes else 0))
                    s.blocks_kept_after_failure += f.kept
            return 0
        with self._lock:
            s.fetches += 1
            s.read_done(n, f.job.bytes_moved)
        return n

    # ------------------------------------------------------------------ admin
    def ls(self, probe: bool = False) -> dict:
        """``tierstore peers ls``: this node and every known peer (``probe``: dial idle or
        retry-due peers first, so their transport and latency are known)."""
        members = self._members()
        if probe and self.client is not None:
            for _, s in self._live():
                try:
                    self._ping_state(s)
                except (TierStoreError, OSError):
                    pass   # recorded in the peer's state and shown below
        rows = [self._state(m).as_dict() for m in members]
        srv = self.server.stats() if self.server is not None else {}
        fetching = {}
        if self.client is not None:   # this node's pulls: aborted ones whose slots are held
            fetching = dict(self.client.counters, aborted_pending=self.client.pending_aborts())
        return {"node": self.node, "listen": srv.get("address"), "membership": self.kind,
                "transports": srv.get("transports", []), "peers": rows,
                "serving": srv.get("sessions", []), "counters": srv.get("counters", {}),
                "fetching": fetching}

    def _ping_state(self, s: _PeerState) -> float:
        try:
            self._session(s)
            ms = self.client.ping(s.address)
        except (TierStoreError, OSError) as e:
            self._failed(s, e)
            if isinstance(e, TierStoreError):
                raise
            raise TransferFailed(f"peer {s.name} ({s.address[0]}:{s.address[1]}): "
                                 f"{type(e).__name__}: {e}") from None
        with self._lock:
            s.rpc_done(ms)
        return ms

    def ping(self, target: str) -> dict:
        """One authenticated round trip to peer ``target`` (a member name or ``host:port``)."""
        from tierstore.settings import parse_address

        for m in self._members():
            if target in (m.node, f"{m.host}:{m.port}"):
                s = self._state(m)
                break
        else:
            host, port = parse_address(target, "peer")
            s = _PeerState(target, (host, port))   # not a member: not kept, not exported
        ms = self._ping_state(s)
        return dict(s.as_dict(), rtt_ms=round(ms, 3))

    def metric_rows(self) -> list[dict]:
        """Per-peer rows of the current members for tierstore/metrics.py (no I/O: etcd
        membership answers from its cache)."""
        names = {m.node for m in self._members()}
        with self._lock:
            return [s.as_dict() for s in self._states.values() if s.name in names]
