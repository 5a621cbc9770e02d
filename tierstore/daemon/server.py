"""The per-node daemon: one Store, its DRAM slab in shared memory, local clients on a Unix socket.

What it owns::

    <data_dir>/lock, store.json, secret, nvme/      through tierstore.datadir (the data-dir lock:
                                                    a second daemon gets DataDirBusy)
    /dev/shm/tierstore-<dirhash>-<pid>-<rand>       the DRAM slab (mode 0600), its memory reserved
                                                    at start (a /dev/shm too small refuses the start
                                                    with a ConfigError naming it); unlinked on stop
                                                    and by a refused start; leftovers of a crashed
                                                    daemon on the same data dir are unlinked at
                                                    start (the lock proves them stale)
    <socket>                                        mode 0600, its directory 0700
    <pid_file>                                      optional; removed on a clean stop

Threading (every thread is owned by :class:`DaemonServer`)::

    main thread      accept loop (listener with a 0.2 s timeout, so a stop request is seen
                     promptly); SIGTERM/SIGINT only set the stop event
    conn-N threads   one per client connection: read frame -> handle -> write reply, strictly
                     request/reply in order (the loop: tierstore/protocol/serve.py, shared with
                     the peer server); every Store call takes the store's own lock
    metrics thread   prometheus-client's HTTP server, when [metrics] enabled
    peer threads     when [peers] enabled: the peer server's accept/connection threads, the etcd
                     keeper and the lookup pool, all owned by tierstore/daemon/peers.py
                     (DaemonPeers), started after the store and stopped before it closes
    events thread    when [events] enabled: ``tierstore-events`` (tierstore/daemon/publisher.py)
                     publishes the store's residency changes as vLLM KV events over ZMQ; started
                     after the store (a new epoch: AllBlocksCleared, then what NVMe kept), stopped
                     after it closed (the last NVMe copies are published too)

Connections and ownership: each connection is one owner (``conn-<n>-pid<peer pid>``). Pins taken
by its lookups/pins and its unfinished jobs belong to it. A request that names ``request`` (LOOKUP,
PIN, UNPIN, FETCH_REMOTE; an engine's request id) pins for ``<owner>/req:<request>`` instead: one
request's release never takes another's pins on a shared prefix (issue 13 item 14), and RELEASE
drops all of one request's pins at once. When the connection closes or dies
(EOF, reset, kill -9 of the client), ``store.release_owner(owner)`` releases the pins (its
requests' too) and aborts
the unfinished stores (their slots are freed, nothing becomes visible) and loads. A connection may
complete only its own jobs.

Who may talk to it (case SEC-26): the socket is mode 0600 in a 0700 directory, so the kernel
lets only the daemon's uid (and root) connect. The daemon checks again: each connection's peer
uid (SO_PEERCRED) must be the daemon's effective uid or root. Another uid (a socket or directory
widened by hand, a shared group) gets AccessDenied on every request but PING, nothing it sends
reaches the store, and each refusal is counted (``stats`` -> ``daemon.refused``, Prometheus
``tierstore_requests_refused_total{reason="uid"}``) and the first per connection is logged.
No TCP port is opened by default: ``[metrics]`` (read-only HTTP GET, loopback unless configured),
``[peers]`` (HMAC-authenticated, tierstore/transfer/session.py) and ``[events]`` are opt-in.

Keys: the daemon never sends the cluster secret. ``hello`` names the file the daemon read it from
(``secret_file``: ``$TIERSTORE_SECRET_FILE`` or ``<data_dir>/secret``, mode 0600, so a client
running as the same user reads it; ``None`` when the secret came from ``$TIERSTORE_SECRET``) and a
``secret_id`` (keyed BLAKE2b of a constant under the secret: reveals nothing, lets a client detect
that its secret differs instead of silently missing every block). Clients compute keys themselves.

Requests (body fields; ``keys`` per tierstore.protocol.codec.pack_keys; ``ns`` = Namespace.describe())::

    HELLO          {}                               -> {version, pid, owner, shm_name, shm_bytes,
                                                        slot_stride, slot_bytes, num_slots, data_dir,
                                                        socket, secret_source (env | file | data_dir),
                                                        secret_file, secret_id, max_frame_bytes}
    LOOKUP         {keys, ns, pin, ttl_s}           -> {n, tiers (bin, one Tier value per hit block)}
    LOOKUP         {…, peers: true}                 -> {n, local, tiers, remote [[peer, blocks]…]}:
                                                       local prefix first, then blocks only peers
                                                       hold (one batched RPC per peer; ``tiers``
                                                       is where each block lives on its node)
    FETCH_REMOTE   {keys, ns, pin, ttl_s, partial}  -> {n (local prefix now), fetched,
                                                        sources {peer: blocks}, errors,
                                                        promised (prefix the peers reported),
                                                        failed[, pinned]}; a failed fetch
                                                        (n < promised after a peer error) is
                                                        TransferFailed unless ``partial``
    PEERS          {probe}                          -> {node, listen, membership, transports,
                                                        peers [per-peer state], serving, counters}
    PEER_PING      {peer (name or host:port)}       -> per-peer state + {rtt_ms}
    PREPARE_STORE  {keys, ns, size, parent, wait_s[, engine]} -> {job, slots [int|nil], status [str]}
                                                       (wait_s: how long a bulk writer waits for
                                                       room in the NVMe write-behind queue, ≤ 60;
                                                       engine: per key bin|nil, the engine's
                                                       identity of the block, tierstore/events.py)
    COMPLETE_STORE {job, ok (bool | [bool] per key)} -> {status [str]}
    PREPARE_LOAD   {keys, wait}                     -> JOB = {job, slots, status, sizes, ready,
                                                       expected, sources (bin: the Tier value
                                                       of each pinned block)}; wait=false: NVMe
                                                       reads are staged by the store's loader
    COMPLETE_LOAD  {job, ok}                        -> {}
    PREPARE_LOADS  {chains [keys], wait}            -> {jobs [JOB]}   (wait defaults to false)
    POLL_LOADS     {jobs [int]}                     -> {done [JOB]}   (the staged ones)
    WAIT_LOAD      {job, timeout_s}                 -> {done: JOB | nil}
    COMPLETE_LOADS {jobs [int], ok[, tokens {name: int}]} -> {}   (tokens: Store.account_tokens)
    PREPARE_STORES {specs [{keys, ns, size, parent[, engine]}]} -> {jobs [{job, slots, status}]}
    COMPLETE_STORES {answers [[job, ok]]}           -> {status [[str]]}
    FLUSH          {timeout_s}                      -> {done: bool}  (every block this connection
                                                       stored has its NVMe copy; false: timeout,
                                                       or one of its writes failed, also one that
                                                       failed before this call)
    PIN / UNPIN    {keys, ttl_s[, session | request]} -> {n}; with ``session`` the pins belong
                                                       to ``session:<NAME>``, not the connection:
                                                       they outlive it, go by TTL (required) or
                                                       UNPIN {keys, session}. UNPIN is all or
                                                       nothing: a key without a pin of that
                                                       owner -> PinError, nothing released
    RELEASE        {request}                        -> {n}: every pin of that request goes
    RETAIN         {keys, session, tenant, ttl_s, priority} -> {pinned, refused, held, displaced,
                                                       ttl_s, cap, tenant}: a retention hint
                                                       (tierstore/retention.py): the pins belong
                                                       to the tenant's session, not the
                                                       connection; bounded by ``[retention]``
    EVICT          {keys, tier}                     -> {evicted, pinned, missing[, not_in_tier,
                                                       only_copy]}; tier: only that tier's copies
    EVICT_DRY_RUN  {keys, tier}                     -> EVICT's counts + {outcomes [str] per key};
                                                       nothing changes
    RESOLVE        {prefixes [str], unknown_ok}     -> {keys [bin | nil] per prefix}; ambiguous
                                                       (or unknown, without unknown_ok) ->
                                                       KeyPrefixError
    UNPIN_EACH     {keys[, session | request]}      -> {unpinned [bool] per key}: one pin of the
                                                       owner released where it holds one
    STATS          {}                               -> Store.stats() + {"daemon": {...}, "events":
                                                       {...} (the publisher: epoch, seq, ...)};
                                                       daemon.requests: {op: requests received
                                                       since start} (every allowed request of a
                                                       known type, answered or refused by the
                                                       store; this one included)
    BLOCKS         {limit, tier}                    -> {blocks [...]}
    BLOCK          {key}                            -> {block | nil}
    CHECK          {fix}                            -> {problems [str]}
    SHUTDOWN       {}                               -> {stopping: true}, then the SIGTERM path
    PING           {}                               -> {}

Peers (tierstore/daemon/peers.py; ``[peers] enabled``): this daemon serves its Store to other
nodes' daemons and pulls from them. ``lookup(keys, ns, peers=True)`` on a RemoteClient reports
where each hit block lives (local hbm/dram/nvme, or ``peer:<name>/dram|nvme``);
``fetch_remote(keys, ns)`` pulls the non-local part from the nearest copies into this node's
DRAM (a peer's NVMe block is staged through its DRAM under its lease; only whole, verified blocks
become visible) and returns the local prefix length; then ``prepare_load`` reads them as usual.
Without ``[peers]`` both answer from the local store alone; PEERS / PEER_PING are ConfigError.

Errors: a frame whose header cannot be trusted (bad magic, version, flags, oversized length) gets
one error reply (when its id is known) and the connection is closed; a well-framed request with an
unknown type, an undecodable body or bad fields gets an error reply and the connection stays.

Stop (SIGTERM, SHUTDOWN): stop accepting and unlink the socket; drain: refuse new prepares and
pinning lookups with RetryLater while in-flight jobs complete (``drain_timeout_s``); then close
every connection (release_owner aborts what is left), ``store.close()`` (writes what waits in
the NVMe write-behind queue, then LMDB closes cleanly), unlink the shm
object, remove the pid file, release the data-dir lock last.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import logging
import os
import secrets
import signal
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

from tierstore import __version__
from tierstore.datadir import DataDir, open_data_dir
from tierstore.errors import (AccessDenied, ConfigError, JobError, PinError, ProtocolError,
                              RejectedError, RetryLater, TierStoreError)
from tierstore.index.residency import request_owner, session_name, session_owner
from tierstore.keys import SECRET_ENV, SECRET_FILE_ENV, Namespace, secret_id
from tierstore.metrics import DaemonMetrics
from tierstore.protocol.codec import (FLAG_REPLY, PROTOCOL_VERSION, FrameError, MsgType,
                                      encode_frame, tune_socket, unpack_keys)
from tierstore.protocol.serve import call_handler, serve_frames, write_error
from tierstore.settings import DaemonSettings, reconcile_store
from tierstore.types import Tier

log = logging.getLogger("tierstore.daemon")

SHM_PREFIX = "tierstore-"
SHM_DIR = "/dev/shm"
REPLY_MAX_BYTES = 256 << 20
_SUN_PATH_MAX = 107
_TIMED_OPS = {MsgType.LOOKUP, MsgType.PREPARE_STORE, MsgType.COMPLETE_STORE,
              MsgType.PREPARE_LOAD, MsgType.COMPLETE_LOAD, MsgType.FETCH_REMOTE,
              MsgType.PREPARE_LOADS, MsgType.POLL_LOADS, MsgType.COMPLETE_LOADS,
              MsgType.PREPARE_STORES, MsgType.COMPLETE_STORES, MsgType.FLUSH}
MAX_WAIT_S = 60.0   # longest wait a client may ask for (flush, wait_load, store admission)


def shm_prefix(data_dir: str | os.PathLike) -> str:
    """``tierstore-<12 hex of the data dir's real path>-``: names every slab of one data dir."""
    h = hashlib.blake2b(os.path.realpath(data_dir).encode(), digest_size=6).hexdigest()
    return f"{SHM_PREFIX}{h}-"


def _cleanup_stale_shm(prefix: str, keep: str) -> list[str]:
    removed = []
    for path in glob.glob(os.path.join(SHM_DIR, prefix + "*")):
        if os.path.basename(path) != keep:
            try:
                os.unlink(path)
                removed.append(path)
            except OSError as e:
                log.warning("cannot remove stale shared memory %s: %s", path, e)
    return removed


def _secure_dir(d: Path) -> None:
    """Create ``d`` with mode 0700; an existing directory is never changed (it may be /run or a
    home directory): refuse one that others may write without the sticky bit (someone could
    replace the socket), accept anything else with a warning when it is not 0700 (the socket
    itself is 0600)."""
    if not d.exists():
        d.mkdir(mode=0o700, parents=True)
        os.chmod(d, 0o700)
        return
    st = d.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 == 0:
        return
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise ConfigError(f"socket directory {d} is writable by others (mode {mode:04o}); "
                          "use a directory with mode 0700")
    else:
        log.warning("socket directory %s has mode %04o (not 0700); the socket itself is 0600", d, mode)


def check_socket_path(path: str) -> None:
    """Refuse (ConfigError) a socket path the daemon must not use: too long, or something that
    is not a socket (a user's file, a directory, a link: never replaced). Runs before anything
    is written; :func:`_bind_socket` checks again when it binds."""
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ConfigError(f"socket path {path} is longer than {_SUN_PATH_MAX} bytes")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else \
            "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
        raise ConfigError(f"socket path {path} is {kind}, not a socket; refusing to replace it "
                          "(choose another --socket, or remove it yourself)")


def _bind_socket(path: str) -> socket.socket:
    check_socket_path(path)
    p = Path(path)
    _secure_dir(p.parent)
    if os.path.lexists(p):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(p))
        except OSError:
            os.unlink(p)   # a socket nobody listens on: a crashed daemon's leftover
        else:
            raise ConfigError(f"socket {p} is served by another running daemon")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(p))
    finally:
        os.umask(old)
    os.chmod(p, 0o600)
    sock.listen(128)
    return sock


class _Conn:
    """One client connection: its socket, owner id and the jobs it may complete."""

    def __init__(self, n: int, sock: socket.socket, owner: str, peer_pid: int,
                 peer_uid: int | None = None, allowed: bool = True) -> None:
        self.n = n
        self.sock = sock
        self.owner = owner
        self.peer_pid = peer_pid
        self.peer_uid = peer_uid
        self.allowed = allowed   # False: another uid; every request but PING is refused
        self.refusals = 0
        self.store_jobs: set[int] = set()
        self.load_jobs: set[int] = set()
        self.thread: threading.Thread | None = None


class DaemonServer:
    """Owns the store, the listener, one thread per connection and the metrics endpoint.

    Use: ``s = DaemonServer(settings); s.start(); s.serve_forever()`` (returns after a stop
    request and a complete shutdown), or ``run_in_thread()`` in tests.
    """

    def __init__(self, settings: DaemonSettings) -> None:
        if not settings.data_dir:
            raise ConfigError("the daemon needs a data dir (--data-dir or TIERSTORE_DATA_DIR)")
        self.settings = settings
        self.data_dir = Path(settings.data_dir).absolute()
        self.socket_path = os.path.abspath(settings.resolved_socket())
        self.datadir: DataDir | None = None
        self.store = None
        self.metrics: DaemonMetrics | None = None
        self.peers: Any = None   # tierstore.daemon.peers.DaemonPeers when [peers] enabled
        self.events: Any = None  # tierstore.daemon.publisher.KVEventPublisher when [events] enabled
        self.shm_name = ""
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._draining = False
        self._conns: dict[int, _Conn] = {}
        self._conns_lock = threading.Lock()
        self._conn_ids = itertools.count(1)
        self._started_at = time.time()
        self._uid = os.geteuid()
        self._refused = {"uid": 0}   # requests refused, by reason (stats -> daemon.refused)
        self._refused_lock = threading.Lock()
        self._requests: dict[str, int] = {}   # requests by op (stats -> daemon.requests)
        self._requests_lock = threading.Lock()
        self._hello: dict = {}
        self._handlers: dict[int, Callable[[_Conn, dict], dict]] = {
            MsgType.HELLO: self._h_hello, MsgType.LOOKUP: self._h_lookup,
            MsgType.PREPARE_STORE: self._h_prepare_store, MsgType.COMPLETE_STORE: self._h_complete_store,
            MsgType.PREPARE_LOAD: self._h_prepare_load, MsgType.COMPLETE_LOAD: self._h_complete_load,
            MsgType.PIN: self._h_pin, MsgType.UNPIN: self._h_unpin, MsgType.EVICT: self._h_evict,
            MsgType.STATS: self._h_stats, MsgType.BLOCKS: self._h_blocks, MsgType.BLOCK: self._h_block,
            MsgType.CHECK: self._h_check, MsgType.SHUTDOWN: self._h_shutdown, MsgType.PING: self._h_ping,
            MsgType.FETCH_REMOTE: self._h_fetch_remote, MsgType.PEERS: self._h_peers,
            MsgType.PEER_PING: self._h_peer_ping,
            MsgType.PREPARE_LOADS: self._h_prepare_loads, MsgType.POLL_LOADS: self._h_poll_loads,
            MsgType.WAIT_LOAD: self._h_wait_load, MsgType.COMPLETE_LOADS: self._h_complete_loads,
            MsgType.PREPARE_STORES: self._h_prepare_stores,
            MsgType.COMPLETE_STORES: self._h_complete_stores, MsgType.FLUSH: self._h_flush,
            MsgType.RELEASE: self._h_release, MsgType.RETAIN: self._h_retain,
            MsgType.RESOLVE: self._h_resolve, MsgType.EVICT_DRY_RUN: self._h_evict_dry_run,
            MsgType.UNPIN_EACH: self._h_unpin_each,
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open the data dir (lock, store, shm slab), bind the socket, start metrics."""
        s = self.settings
        check_socket_path(self.socket_path)   # before anything is written
        if not self.data_dir.exists():
            self.data_dir.mkdir(mode=0o700, parents=True)
        prefix = shm_prefix(self.data_dir)
        self.shm_name = f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        for w in s.warnings:
            log.warning("settings: %s", w)
        try:
            self.datadir = open_data_dir(
                self.data_dir, s.store, shm_name=self.shm_name,
                reconcile=lambda stored: reconcile_store(stored, s, self.data_dir))
        except BaseException:
            self._unlink_own_shm()
            raise
        try:
            stale = _cleanup_stale_shm(prefix, keep=self.shm_name)
            if stale:
                log.warning("removed %d stale shared-memory slab(s) of a previous daemon: %s",
                            len(stale), ", ".join(stale))
            self.store = self.datadir.store
            cfg = self.store.config
            if cfg.dram.payload is False:
                raise ConfigError("the daemon needs a DRAM tier with payload")
            # [retention]: ConfigError (no start) for caps the DRAM tier cannot hold; warnings
            # (oversubscribed tenant caps, TEN-39) are logged by configure_retention
            self.store.configure_retention(s.retention)
            self._listener = _bind_socket(self.socket_path)
            st = os.stat(self.socket_path)
            self._socket_id = (st.st_dev, st.st_ino)
            self._listener.settimeout(0.2)
            self.metrics = DaemonMetrics(self.store.stats)
            if s.metrics.enabled:
                try:
                    host, port = self.metrics.start(s.metrics.host, s.metrics.port)
                except OSError as e:   # a setting the machine refuses: one line, exit 2
                    raise ConfigError(f"[metrics] cannot listen on {s.metrics.host}:"
                                      f"{s.metrics.port}: {e.strerror or e}") from None
                log.info("metrics on http://%s:%d/metrics", host, port)
            if s.peers.enabled:
                from tierstore.daemon.peers import DaemonPeers

                self.peers = DaemonPeers(s.peers, self.store, self.datadir.secret).start()
                self.metrics.add_peer_source(self.peers.metric_rows)
            if s.events.enabled:
                self._start_events()
            if s.pid_file:
                Path(s.pid_file).write_text(f"{os.getpid()}\n")
            self._hello = self._make_hello()
        except BaseException:
            self._stop_events()
            self._stop_peers()
            if self.metrics is not None:
                self.metrics.stop()
            if self._listener is not None:   # a failed start leaves no socket file behind
                self._listener.close()
                self._listener = None
                self._unlink_socket()
            self._close_store()
            self._unlink_own_shm()
            raise
        log.info("tierstore daemon %s serving %s on %s (shm %s, %d slots of %d bytes)",
                 __version__, self.data_dir, self.socket_path, self.shm_name,
                 self._hello["num_slots"], self._hello["slot_stride"])

    def _start_events(self) -> None:
        from tierstore.daemon.publisher import KVEventPublisher, next_epoch
        from tierstore.events import EventLog

        ev = self.settings.events
        log_ = EventLog(ev.max_pending)
        pub = KVEventPublisher(log_, ev, epoch=next_epoch(self.data_dir))
        self.store.attach_events(log_)   # the epoch's first batch: cleared + what NVMe kept
        self.events = pub.start()
        log.info("KV events on %s (replay %s), epoch %d", pub.endpoint, pub.replay_endpoint,
                 pub.epoch)

    def _stop_events(self) -> None:
        if self.events is not None:
            try:
                self.events.stop()
            except Exception:
                log.exception("stopping the KV event publisher failed")
            self.events = None

    def _unlink_own_shm(self) -> None:
        """A refused start leaves no slab behind (issue 13 item 18: a unit restarting every 2 s
        filled /dev/shm). Only this daemon's own name: another daemon's slab is never touched."""
        if self.shm_name:
            try:
                os.unlink(os.path.join(SHM_DIR, self.shm_name))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot remove this daemon's slab %s: %s", self.shm_name, e)

    def _make_hello(self) -> dict:
        dram = self.store.tiers[Tier.DRAM]
        if os.environ.get(SECRET_ENV):
            secret_source, secret_file = "env", None
        elif os.environ.get(SECRET_FILE_ENV):
            secret_source, secret_file = "file", os.path.abspath(os.environ[SECRET_FILE_ENV])
        else:
            secret_source, secret_file = "data_dir", str(self.data_dir / "secret")
        return {
            "version": PROTOCOL_VERSION, "server": __version__, "pid": os.getpid(),
            "shm_name": self.shm_name, "shm_bytes": dram.size_bytes, "slot_stride": dram.slot_bytes,
            "slot_bytes": self.store.config.slot_bytes, "num_slots": dram.num_slots,
            "data_dir": str(self.data_dir), "socket": self.socket_path,
            "secret_source": secret_source, "secret_file": secret_file,
            "secret_id": secret_id(self.datadir.secret),
            "max_frame_bytes": self.settings.max_frame_bytes,
        }

    def request_stop(self) -> None:
        """Ask the accept loop to stop (safe from signal handlers and any thread)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())

    def serve_forever(self) -> None:
        """Accept until a stop request, then shut down completely."""
        try:
            while not self._stop.is_set():
                try:
                    sock, _ = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError as e:
                    if self._stop.is_set():
                        break
                    log.warning("accept failed: %s", e)
                    time.sleep(0.05)
                    continue
                self._spawn(sock)
        finally:
            self.shutdown()

    def run_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="tierstore-accept", daemon=True)
        t.start()
        return t

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._done.wait(timeout_s)

    def shutdown(self) -> None:
        """The SIGTERM path (idempotent): stop accepting, drain, close connections, close the
        store, unlink socket / shm / pid file, release the data-dir lock."""
        if self._done.is_set():
            return
        self._stop.set()
        if self._listener is not None:
            try:
                self._listener.close()
            finally:
                self._listener = None
                self._unlink_socket()
        self._stop_peers()   # in-flight peer fetches fail and free their slots; peers' pins go
        self._draining = True
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while time.monotonic() < deadline:
            st = self.store.stats()
            if not st["pending_stores"] and not st["pending_loads"]:
                break
            time.sleep(0.02)
        else:
            log.warning("drain timeout: aborting unfinished jobs of %d connection(s)", len(self._conns))
        with self._conns_lock:
            conns = list(self._conns.values())
        for c in conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for c in conns:
            if c.thread is not None and c.thread is not threading.current_thread():
                c.thread.join(timeout=5.0)
        if self.metrics is not None:
            self.metrics.stop()
        self._close_store()
        self._stop_events()   # after the store: its last NVMe copies are published too
        if self.settings.pid_file:
            try:
                os.unlink(self.settings.pid_file)
            except FileNotFoundError:
                pass
        log.info("tierstore daemon stopped")
        self._done.set()

    def _unlink_socket(self) -> None:
        """Remove the socket file if it is still the one this daemon bound."""
        try:
            st = os.stat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._socket_id:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def _stop_peers(self) -> None:
        if self.peers is not None:
            try:
                self.peers.stop()
            except Exception:
                log.exception("stopping the peer transports failed")
            self.peers = None

    def _close_store(self) -> None:
        if self.datadir is not None:
            self.datadir.close()   # store.close() (aborts jobs, closes LMDB, unlinks shm), then the lock
            self.datadir = None

    # ------------------------------------------------------------------ connections
    def _spawn(self, sock: socket.socket) -> None:
        n = next(self._conn_ids)
        try:
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", cred)
        except OSError:
            pid, uid = 0, None   # unknown credentials: refused like another uid
        sock.settimeout(None)
        tune_socket(sock)
        allowed = uid is not None and uid in (self._uid, 0)
        conn = _Conn(n, sock, f"conn-{n}-pid{pid}", pid, uid, allowed)
        conn.thread = threading.Thread(target=self._serve_conn, args=(conn,), name=f"conn-{n}",
                                       daemon=True)
        with self._conns_lock:
            self._conns[n] = conn
        self.metrics.connections.inc()
        conn.thread.start()

    def _serve_conn(self, conn: _Conn) -> None:
        """Request after request until EOF, a bad frame (one error reply, then closed: the
        loop and that rule are tierstore/protocol/serve.py's) or a reply that ends it."""

        def bad_frame(e: FrameError) -> None:
            self.metrics.protocol_errors.inc()
            log.info("%s: closing after a bad frame: %s", conn.owner, e)

        try:
            serve_frames(conn.sock,
                         lambda hdr, raw: self._answer(conn, hdr.type, hdr.request_id, hdr.flags,
                                                       raw),
                         max_frame_bytes=self.settings.max_frame_bytes, on_bad_frame=bad_frame)
        except (OSError, ConnectionError):
            pass
        finally:
            self._drop(conn)

    def _answer(self, conn: _Conn, mtype: int, rid: int, flags: int, raw: bytes) -> bool:
        """Handle one request and send its reply; False when the connection must close."""
        t0 = time.perf_counter()
        try:
            if not conn.allowed and mtype != MsgType.PING:
                self._refuse(conn, mtype)
            if flags & FLAG_REPLY or mtype not in self._handlers:
                self.metrics.protocol_errors.inc()
                if mtype in self._handlers:
                    raise ProtocolError("a client must not send reply frames")
            else:
                op = _op_name(mtype)
                with self._requests_lock:
                    self._requests[op] = self._requests.get(op, 0) + 1
            # a type without a handler: ProtocolError "unknown message type N"
            body = call_handler(self._handlers, mtype, conn, raw)
        except TierStoreError as e:
            if isinstance(e, ProtocolError):
                self.metrics.protocol_errors.inc()
            return self._reply_error(conn.sock, mtype, rid, e, t0)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
            self.metrics.protocol_errors.inc()
            err = ProtocolError(f"bad {_op_name(mtype)} request: {type(e).__name__}: {e}")
            return self._reply_error(conn.sock, mtype, rid, err, t0)
        except Exception as e:   # a bug: answer, log, keep serving
            log.exception("%s: internal error in %s", conn.owner, _op_name(mtype))
            return self._reply_error(conn.sock, mtype, rid, e, t0)
        try:
            frame = encode_frame(mtype, rid, body, FLAG_REPLY)
        except (TypeError, ValueError, OverflowError) as e:
            log.exception("cannot encode the reply to %s", _op_name(mtype))
            return self._reply_error(conn.sock, mtype, rid, e, t0)
        if len(frame) > REPLY_MAX_BYTES:
            return self._reply_error(conn.sock, mtype, rid, RejectedError(
                f"reply of {len(frame)} bytes exceeds {REPLY_MAX_BYTES}; ask for fewer (limit)"), t0)
        if mtype in _TIMED_OPS:
            self.metrics.observe(_op_name(mtype), time.perf_counter() - t0)
        try:
            conn.sock.sendall(frame)
        except OSError:
            return False
        return mtype != MsgType.SHUTDOWN or not self._stop.is_set()

    def _reply_error(self, sock: socket.socket, mtype: int, rid: int, exc: BaseException,
                     t0: float | None = None) -> bool:
        if t0 is not None and mtype in _TIMED_OPS:
            self.metrics.observe(_op_name(mtype), time.perf_counter() - t0, error=True)
        try:
            write_error(sock, mtype, rid, exc)
            return True
        except OSError:
            return False

    def _drop(self, conn: _Conn) -> None:
        with self._conns_lock:
            if self._conns.pop(conn.n, None) is None:
                return
        self.metrics.connections.dec()
        try:
            conn.sock.close()
        except OSError:
            pass
        store = self.store
        if store is not None and self.datadir is not None:
            try:
                r = store.release_owner(conn.owner)
            except Exception:
                log.exception("%s: release_owner failed", conn.owner)
                return
            if r["pins_released"] or r["jobs_aborted"]:
                log.info("%s gone: released %d pin(s), aborted %d job(s)", conn.owner,
                         r["pins_released"], r["jobs_aborted"])

    def _refuse(self, conn: _Conn, mtype: int) -> None:
        """Count and refuse one request of a connection whose uid may not use this daemon."""
        with self._refused_lock:
            self._refused["uid"] += 1
        self.metrics.refused.labels("uid").inc()
        conn.refusals += 1
        if conn.refusals == 1:
            log.warning("refused %s from uid %s (pid %d): only uid %d and root may use this "
                        "daemon", _op_name(mtype), conn.peer_uid, conn.peer_pid, self._uid)
        raise AccessDenied(f"uid {conn.peer_uid} may not use this daemon (only uid {self._uid} "
                           "and root may); run as the daemon's user")

    # ------------------------------------------------------------------ handlers
    def _refuse_when_draining(self) -> None:
        if self._draining:
            raise RetryLater("the daemon is stopping", after_s=1.0)

    def _h_hello(self, conn: _Conn, body: dict) -> dict:
        return dict(self._hello, owner=conn.owner)

    def _h_ping(self, conn: _Conn, body: dict) -> dict:
        return {}

    def _h_lookup(self, conn: _Conn, body: dict) -> dict:
        pin = bool(body.get("pin", False))
        if pin:
            self._refuse_when_draining()
        keys = unpack_keys(body["keys"])
        if body.get("peers"):
            return self._lookup_peers(conn, keys, body, pin)
        r = self.store.lookup(keys, _namespace(body["ns"]), pin=pin, owner=_owner(conn, body),
                              ttl_s=_opt_float(body.get("ttl_s")))
        tiers = bytes(r.tiers)
        if tiers:
            self.metrics.count_lookup_hits(tiers, _tier_label)
        return {"n": r.num_blocks, "tiers": tiers}

    def _lookup_peers(self, conn: _Conn, keys: list, body: dict, pin: bool) -> dict:
        ns, ttl_s = _namespace(body["ns"]), _opt_float(body.get("ttl_s"))
        owner = _owner(conn, body)
        if self.peers is None:
            r = self.store.lookup(keys, ns, pin=pin, owner=owner, ttl_s=ttl_s)
            return {"n": r.num_blocks, "local": r.num_blocks, "tiers": bytes(r.tiers), "remote": []}
        out = self.peers.locate(keys, ns, pin=pin, owner=owner, ttl_s=ttl_s)
        if out["local"]:
            self.metrics.count_lookup_hits(out["tiers"][:out["local"]], _tier_label)
        return out

    def _h_fetch_remote(self, conn: _Conn, body: dict) -> dict:
        self._refuse_when_draining()
        keys, ns = unpack_keys(body["keys"]), _namespace(body["ns"])
        if self.peers is None:
            n = self.store.lookup(keys, ns).num_blocks
            out = {"n": n, "fetched": 0, "sources": {}, "errors": [], "promised": n,
                   "failed": False}
        else:
            out = self.peers.fetch(keys, ns, partial=bool(body.get("partial")))
        if body.get("pin") and out["n"]:   # hold the now-local prefix for this connection
            out["pinned"] = self.store.pin(keys[:out["n"]], owner=_owner(conn, body),
                                           ttl_s=_opt_float(body.get("ttl_s")))
        return out

    def _need_peers(self):
        if self.peers is None:
            raise ConfigError("peers are not enabled on this daemon (set [peers] enabled = true)")
        return self.peers

    def _h_peers(self, conn: _Conn, body: dict) -> dict:
        return self._need_peers().ls(probe=bool(body.get("probe", False)))

    def _h_peer_ping(self, conn: _Conn, body: dict) -> dict:
        peer = body["peer"]
        if not isinstance(peer, str) or not peer:
            raise ProtocolError("peer must be a name or host:port")
        return self._need_peers().ping(peer)

    def _h_prepare_store(self, conn: _Conn, body: dict) -> dict:
        self._refuse_when_draining()
        keys = unpack_keys(body["keys"])
        parent = body.get("parent")
        if parent is not None and not isinstance(parent, bytes):
            raise ProtocolError("parent must be bin")
        job = self.store.prepare_store(keys, _namespace(body["ns"]), _uint(body, "size", required=True),
                                       owner=conn.owner, parent=parent,
                                       wait_s=_wait_s(body.get("wait_s")),
                                       engine=_engine(body, len(keys)))
        conn.store_jobs.add(job.job_id)
        return {"job": job.job_id, "slots": job.slots, "status": [s.value for s in job.status]}

    def _h_complete_store(self, conn: _Conn, body: dict) -> dict:
        jid = int(body["job"])
        if jid not in conn.store_jobs:
            raise JobError(f"store job {jid} is not this connection's")
        ok = _ok(body.get("ok", True))
        status = self.store.complete_store(jid, ok=ok)
        conn.store_jobs.discard(jid)
        return {"status": [s.value for s in status]}

    def _h_prepare_stores(self, conn: _Conn, body: dict) -> dict:
        self._refuse_when_draining()
        specs = []
        for sp in body["specs"]:
            parent = sp.get("parent")
            if parent is not None and not isinstance(parent, bytes):
                raise ProtocolError("parent must be bin")
            keys = unpack_keys(sp["keys"])
            specs.append((keys, _namespace(sp["ns"]), _uint(sp, "size", required=True), parent,
                          _engine(sp, len(keys))))
        jobs = self.store.prepare_stores(specs, owner=conn.owner)
        conn.store_jobs.update(j.job_id for j in jobs)
        return {"jobs": [{"job": j.job_id, "slots": j.slots,
                          "status": [s.value for s in j.status]} for j in jobs]}

    def _h_complete_stores(self, conn: _Conn, body: dict) -> dict:
        answers = [(int(jid), _ok(ok)) for jid, ok in body["answers"]]
        for jid, _ in answers:
            if jid not in conn.store_jobs:
                raise JobError(f"store job {jid} is not this connection's")
        status = self.store.complete_stores(answers)
        conn.store_jobs.difference_update(jid for jid, _ in answers)
        return {"status": [[s.value for s in st] for st in status]}

    def _h_prepare_load(self, conn: _Conn, body: dict) -> dict:
        self._refuse_when_draining()
        keys = unpack_keys(body["keys"])
        job = self.store.prepare_load(keys, owner=conn.owner, wait=bool(body.get("wait", True)))
        conn.load_jobs.add(job.job_id)
        return _load_job(job)

    def _h_prepare_loads(self, conn: _Conn, body: dict) -> dict:
        self._refuse_when_draining()
        chains = [unpack_keys(c) for c in body["chains"]]
        jobs = self.store.prepare_loads(chains, owner=conn.owner,
                                        wait=bool(body.get("wait", False)))
        conn.load_jobs.update(j.job_id for j in jobs)
        return {"jobs": [_load_job(j) for j in jobs]}

    def _own_loads(self, conn: _Conn, ids) -> list[int]:
        out = [int(j) for j in ids]
        for jid in out:
            if jid not in conn.load_jobs:
                raise JobError(f"load job {jid} is not this connection's")
        return out

    def _h_poll_loads(self, conn: _Conn, body: dict) -> dict:
        done = self.store.poll_loads(self._own_loads(conn, body["jobs"]))
        return {"done": [_load_job(j) for j in done.values()]}

    def _h_wait_load(self, conn: _Conn, body: dict) -> dict:
        (jid,) = self._own_loads(conn, [body["job"]])
        job = self.store.wait_load(jid, _wait_s(body.get("timeout_s"), default=MAX_WAIT_S))
        return {"done": None if job is None else _load_job(job)}

    def _h_complete_load(self, conn: _Conn, body: dict) -> dict:
        (jid,) = self._own_loads(conn, [body["job"]])
        conn.load_jobs.discard(jid)
        self.store.complete_load(jid, ok=bool(body.get("ok", True)))
        return {}

    def _h_complete_loads(self, conn: _Conn, body: dict) -> dict:
        ids = self._own_loads(conn, body["jobs"])
        conn.load_jobs.difference_update(ids)
        tokens = body.get("tokens")
        if tokens is not None and not isinstance(tokens, dict):
            raise RejectedError("tokens must be a map of counter -> int")
        self.store.complete_loads(ids, ok=bool(body.get("ok", True)), tokens=tokens)
        return {}

    def _h_flush(self, conn: _Conn, body: dict) -> dict:
        return {"done": self.store.flush(_wait_s(body.get("timeout_s"), default=MAX_WAIT_S),
                                         owner=conn.owner)}

    def _h_pin(self, conn: _Conn, body: dict) -> dict:
        self._refuse_when_draining()
        ttl_s = _opt_float(body.get("ttl_s"))
        session = body.get("session")   # named session: the pins outlive this connection
        owner = _owner(conn, body) if session is None else session_owner(session, ttl_s)
        return {"n": self.store.pin(unpack_keys(body["keys"]), owner=owner, ttl_s=ttl_s)}

    def _h_unpin(self, conn: _Conn, body: dict) -> dict:
        session = body.get("session")
        owner = _owner(conn, body) if session is None else session_name(session)
        return {"n": self.store.unpin(unpack_keys(body["keys"]), owner=owner)}

    def _h_unpin_each(self, conn: _Conn, body: dict) -> dict:
        session = body.get("session")
        owner = _owner(conn, body) if session is None else session_name(session)
        return {"unpinned": self.store.unpin_each(unpack_keys(body["keys"]), owner=owner)}

    def _h_retain(self, conn: _Conn, body: dict) -> dict:
        self._refuse_when_draining()
        tenant = body.get("tenant") or ""
        if not isinstance(tenant, str):
            raise ProtocolError("retain: tenant must be a string")
        return self.store.retain(unpack_keys(body["keys"]), session=body.get("session"),
                                 tenant=tenant, ttl_s=body.get("ttl_s"),
                                 priority=body.get("priority", 0))

    def _h_release(self, conn: _Conn, body: dict) -> dict:
        owner = _owner(conn, body)
        if owner == conn.owner:
            raise ProtocolError("release needs a request")
        return {"n": self.store.release_owner(owner)["pins_released"]}

    def _h_evict(self, conn: _Conn, body: dict, dry_run: bool = False) -> dict:
        tier = body.get("tier")
        return self.store.evict(unpack_keys(body["keys"]),
                                tier=None if tier is None else Tier.parse(str(tier)),
                                dry_run=dry_run)

    def _h_evict_dry_run(self, conn: _Conn, body: dict) -> dict:
        return self._h_evict(conn, body, dry_run=True)

    def _h_resolve(self, conn: _Conn, body: dict) -> dict:
        prefixes = body["prefixes"]
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise ProtocolError("prefixes must be a list of strings")
        return {"keys": self.store.resolve(prefixes, unknown_ok=bool(body.get("unknown_ok")))}

    def _h_stats(self, conn: _Conn, body: dict) -> dict:
        st = self.store.stats()
        with self._conns_lock:
            n_conns = len(self._conns)
        st["daemon"] = {"pid": os.getpid(), "version": __version__, "socket": self.socket_path,
                        "data_dir": str(self.data_dir), "shm_name": self.shm_name,
                        "uptime_s": round(time.time() - self._started_at, 3),
                        "connections": n_conns, "stopping": self._draining,
                        "uid": self._uid, "refused": dict(self._refused),
                        "requests": self._request_counts(),
                        "metrics": (f"http://{self.metrics.address[0]}:{self.metrics.address[1]}/metrics"
                                    if self.metrics.address else None)}
        st["events"] = self.events.stats() if self.events is not None else {"enabled": False}
        return st

    def _request_counts(self) -> dict[str, int]:
        with self._requests_lock:
            return dict(sorted(self._requests.items()))

    def _h_blocks(self, conn: _Conn, body: dict) -> dict:
        limit = _uint(body, "limit")
        tier = body.get("tier")
        return {"blocks": self.store.blocks(limit=limit,
                                            tier=None if tier is None else Tier.parse(str(tier)))}

    def _h_block(self, conn: _Conn, body: dict) -> dict:
        key = body["key"]
        if not isinstance(key, bytes):
            raise ProtocolError("key must be bin")
        return {"block": self.store.block(key)}

    def _h_check(self, conn: _Conn, body: dict) -> dict:
        return {"problems": self.store.check(fix=bool(body.get("fix", False)))}

    def _h_shutdown(self, conn: _Conn, body: dict) -> dict:
        log.info("%s asked the daemon to stop", conn.owner)
        self.request_stop()
        return {"stopping": True, "pid": os.getpid()}


def _owner(conn: _Conn, body: dict) -> str:
    """The pin owner a request names: the connection, or one request under it (``request``
    given, and no ``session``)."""
    request = body.get("request")
    if request is None:
        return conn.owner
    if body.get("session") is not None:
        raise PinError("a pin belongs to a session or to a request, not both")
    return request_owner(conn.owner, request)


def _engine(body: dict, n: int) -> list | None:
    """The optional per-key engine metadata of a store request (bin or nil each)."""
    v = body.get("engine")
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != n or \
            not all(x is None or isinstance(x, bytes) for x in v):
        raise ProtocolError(f"engine must be a list of {n} bin or nil entries")
    return v


def _wait_s(v: Any, default: float = 0.0) -> float:
    """A client's wait in seconds: a number in [0, MAX_WAIT_S] (nil: ``default``)."""
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_WAIT_S:
        raise ProtocolError(f"a wait must be a number of seconds in [0, {MAX_WAIT_S:.0f}]")
    return float(v)


def _ok(v: Any) -> bool | list[bool]:
    """A store job's answer: one bool, or one per key."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, bool) for x in v):
        return list(v)
    raise ProtocolError("ok must be a bool or a list of bools")


def _load_job(job) -> dict:
    return {"job": job.job_id, "slots": job.slots, "status": [s.value for s in job.status],
            "sizes": job.sizes, "ready": job.ready, "expected": job.expected,
            "sources": job.sources}


def _op_name(mtype: int) -> str:
    try:
        return MsgType(mtype).name.lower()
    except ValueError:
        return f"type{mtype}"


def _tier_label(value: int) -> str:
    return Tier(value).label


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _namespace(d: Any) -> Namespace:
    if not isinstance(d, dict):
        raise ProtocolError("ns must be a map of Namespace fields")
    try:
        return Namespace(**d)
    except (TypeError, ConfigError) as e:
        raise ProtocolError(f"bad namespace: {e}") from None


def _uint(body: dict, name: str, required: bool = False) -> int | None:
    """A non-negative integer field (not a string, not a bool); ProtocolError otherwise."""
    v = body.get(name)
    if v is None:
        if required:
            raise ProtocolError(f"{name} is required")
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ProtocolError(f"{name} must be a non-negative integer, got {v!r}")
    return v
