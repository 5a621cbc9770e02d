"""RemoteClient: the daemon backend of the client API (same methods as tierstore.client.Client).

Control goes over the daemon's Unix socket as frames (tierstore/protocol/codec.py); block bytes
never do: ``hello`` names the daemon's shared-memory slab, this client maps it (``MAP_SHARED``),
and ``slot_view(slot)`` returns a writable ``memoryview`` of the slot inside that mapping, so a
producer writes a block straight into the daemon's DRAM tier and a consumer reads it from there
(zero copy through the daemon)::

    client                          daemon
    prepare_store(keys) ─────────▶  reserve slots (unpublished)  ──▶ {job, slots}
    slot_view(s)[:n] = block        (same pages, /dev/shm/tierstore-…)
    complete_store(job) ─────────▶  publish                      ──▶ {status}

Keys: computed here, never by the daemon and never with a secret sent over the socket. The
secret is resolved as ``tierstore.keys.load_secret`` does (``secret=`` argument,
``$TIERSTORE_SECRET``, ``$TIERSTORE_SECRET_FILE``), else from the file the daemon names in
``hello`` (``<data_dir>/secret``, mode 0600: readable by the daemon's user). A secret whose
fingerprint differs from the daemon's is refused with ConfigError.

Connection loss: pins and unfinished jobs belong to the connection, and the daemon releases them
when it drops. A call that loses the connection raises DaemonUnreachable (read-only calls retry
once on a fresh connection first); the next call reconnects (after a daemon restart: a new slab
is mapped; views from the old mapping stay valid memory but are no longer the store's). The same
holds after ``close``: a mapping lives as long as any view of it (never SIGSEGV, issue 13 item 15).

Threading: one request at a time per client (a lock around each request/reply pair); slot views
may be used from any thread while their job's pin or reservation holds.
"""

from __future__ import annotations

import itertools
import mmap
import os
import socket
import threading
import time
from typing import Any, Sequence

from tierstore.client.contract import check_pin_owner
from tierstore.errors import ConfigError, DaemonUnreachable, ProtocolError
from tierstore.keys import Keyer, Namespace, load_secret
from tierstore.protocol.codec import (FLAG_ERROR, PROTOCOL_VERSION, FrameError, MsgType, decode_body,
                                      encode_frame, error_from_body, pack_keys, read_frame,
                                      tune_socket)
from tierstore.store import fill_store_job
from tierstore.types import BlockKey, BlockStatus, LoadJob, LookupResult, StoreJob, Tier

REPLY_MAX_BYTES = 256 << 20
SHM_DIR = "/dev/shm"
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)   # Linux >= 5.14
_TIERS = {int(t): t for t in Tier}
_STATUS = {s.value: s for s in BlockStatus}


def _raise_remote(body: dict) -> None:
    """The error a reply names, by the one rule every reader of error replies uses
    (``error_from_body``; the peer transfer's own classes included, as a fetch may end in one);
    a RetryLater keeps the daemon's ``after_s``. Imported here, on the error path: the package
    tierstore.transfer is heavy and a daemon client never needs it otherwise."""
    from tierstore.transfer.transport import ERROR_CLASSES

    raise error_from_body(body, ERROR_CLASSES)


class RemoteClient:
    """A client of the daemon on ``socket_path``. Build with :meth:`connect`."""

    def __init__(self, socket_path: str | os.PathLike, *, timeout_s: float = 5.0,
                 call_timeout_s: float | None = 300.0, secret: bytes | str | None = None) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout_s = timeout_s
        self.call_timeout_s = call_timeout_s
        self._explicit_secret = secret
        self._secret: bytes | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._mm: mmap.mmap | None = None
        self._buf: memoryview | None = None
        self._stride = 0
        self._ns_cache: dict[Namespace, dict] = {}
        self.info: dict = {}
        self.generation = 0   # connections made so far (a new one means pins and jobs were lost)
        self._load_keys: dict[int, list[BlockKey]] = {}   # asynchronous load jobs' keys
        self._closed = False

    # ---------------------------------------------------------------- connection
    @classmethod
    def connect(cls, socket_path: str | os.PathLike, **kw: Any) -> "RemoteClient":
        """Connect and say hello. Raises DaemonUnreachable when nothing answers."""
        c = cls(socket_path, **kw)
        with c._lock:
            c._connect()
        return c

    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tune_socket(s)
        s.settimeout(self.timeout_s)
        try:
            s.connect(self.socket_path)
        except OSError as e:
            s.close()
            raise DaemonUnreachable(f"no tierstore daemon answers on {self.socket_path}: "
                                    f"{e.strerror or e}") from None
        s.settimeout(self.call_timeout_s)
        self._sock = s
        try:
            info = self._roundtrip(MsgType.HELLO, {"pid": os.getpid()})
        except OSError as e:   # the daemon went away between accept and hello (a failed start)
            self._drop()
            raise DaemonUnreachable(f"the tierstore daemon on {self.socket_path} closed the "
                                    f"connection during the hello: {e.strerror or e}") from None
        except BaseException:
            self._drop()
            raise
        if info.get("version") != PROTOCOL_VERSION:
            self._drop()
            raise ProtocolError(f"daemon speaks protocol {info.get('version')}, "
                                f"this client {PROTOCOL_VERSION}")
        if info.get("shm_name") != self.info.get("shm_name"):
            self._unmap()   # mapped again on the first slot_view (the CLI never maps it)
        self.info = info
        self.generation += 1

    def _map(self, info: dict) -> None:
        """Map the slab with writable page-table entries populated up front (MAP_POPULATE plus
        MADV_POPULATE_WRITE): a first write to a page of a fresh mapping otherwise faults, which
        halved put throughput of a new client process. Costs ~10 ms per GiB, once, on the first
        ``slot_view`` (the CLI never maps the slab)."""
        path = os.path.join(SHM_DIR, str(info["shm_name"]))
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise DaemonUnreachable(f"cannot map the daemon's slab {path}: {e.strerror}") from None
        try:
            mm = mmap.mmap(fd, int(info["shm_bytes"]),
                           flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        try:   # writable page-table entries now, not one write fault per page on the hot path
            mm.madvise(_MADV_POPULATE_WRITE)
        except (OSError, ValueError):
            pass   # kernel < 5.14: first writes fault once per page
        self._unmap()
        self._mm = mm
        self._buf = memoryview(mm)
        self._stride = int(info["slot_stride"])

    def _unmap(self) -> None:
        """Forget the mapping; never unmap it here. Views handed out (``slot_view`` slices,
        ``slab()``'s buffer, a ``torch.frombuffer`` tensor over it: torch keeps a reference to
        the buffer object, not a buffer export) keep the mapping alive, and it is unmapped when
        the last of them goes: a view used after ``close`` reads or writes memory that is no
        longer the daemon's slab, never an unmapped page (issue 13 item 15: closing the mmap
        under a torch tensor killed the process with SIGSEGV)."""
        self._buf = None
        self._mm = None

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _roundtrip(self, mtype: MsgType, body: dict | None) -> dict:
        rid = next(self._ids) & 0xFFFFFFFF
        self._sock.sendall(encode_frame(mtype, rid, body))
        frame = read_frame(self._sock, REPLY_MAX_BYTES)
        if frame is None:
            raise ConnectionError("the daemon closed the connection")
        hdr, raw = frame
        try:
            if hdr.request_id != rid or hdr.type != mtype:
                raise ProtocolError(f"reply {hdr.type}/{hdr.request_id} does not match request "
                                    f"{int(mtype)}/{rid}")
            out = decode_body(raw)
        except ProtocolError:
            self._drop()   # the stream can no longer be trusted
            raise
        if hdr.flags & FLAG_ERROR:
            _raise_remote(out)
        return out

    def _call(self, mtype: MsgType, body: dict | None = None, *, idempotent: bool = False) -> dict:
        with self._lock:
            if self._closed:
                raise DaemonUnreachable("client is closed")
            for attempt in (0, 1):
                if self._sock is None:
                    self._connect()
                try:
                    return self._roundtrip(mtype, body)
                except (OSError, FrameError) as e:   # ConnectionError and socket.timeout are OSErrors
                    if isinstance(e, DaemonUnreachable):
                        raise
                    self._drop()
                    if not idempotent or attempt:
                        raise DaemonUnreachable(
                            f"lost the connection to the daemon on {self.socket_path} during "
                            f"{mtype.name.lower()} ({e}); its pins and unfinished jobs were "
                            "released") from None
            raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()
            self._unmap()

    def __enter__(self) -> "RemoteClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- keys
    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self._secret = self._resolve_secret()
        return self._secret

    def _resolve_secret(self) -> bytes:
        from tierstore.keys import secret_id

        explicit = self._explicit_secret
        env = os.environ
        try:
            if explicit is not None or env.get("TIERSTORE_SECRET") or env.get("TIERSTORE_SECRET_FILE"):
                raw = load_secret(explicit, generate=False)
            elif self.info.get("secret_source") == "data_dir":
                raw = load_secret(None, data_dir=os.path.dirname(self.info["secret_file"]),
                                  generate=False)
            elif self.info.get("secret_file"):
                raw = load_secret(None, path=self.info["secret_file"], generate=False)
            else:
                raise ConfigError("the daemon's secret comes from $TIERSTORE_SECRET; set the same "
                                  "variable (or TIERSTORE_SECRET_FILE) for this client")
        except PermissionError:
            raise ConfigError(f"cannot read the cluster secret {self.info.get('secret_file')}: "
                              "permission denied (run as the daemon's user or set "
                              "TIERSTORE_SECRET_FILE)") from None
        if secret_id(raw) != self.info.get("secret_id"):
            raise ConfigError("this client's cluster secret differs from the daemon's "
                              f"(id {secret_id(raw)} vs {self.info.get('secret_id')}): keys would "
                              "never match")
        return raw

    def keyer(self, namespace: Namespace) -> Keyer:
        return Keyer(namespace, self.secret)

    def _ns(self, namespace: Namespace) -> dict:
        d = self._ns_cache.get(namespace)
        if d is None:
            d = self._ns_cache[namespace] = namespace.describe()
        return d

    @property
    def owner(self) -> str:
        return str(self.info.get("owner", ""))

    def _pin_owner(self, request: str | None) -> str:
        from tierstore.index.residency import request_owner
        return self.owner if request is None else request_owner(self.owner, request)

    # ---------------------------------------------------------------- store API
    def lookup(self, keys: Sequence[BlockKey], namespace: Namespace, *, pin: bool = False,
               ttl_s: float | None = None, peers: bool = False,
               request: str | None = None) -> LookupResult:
        """Longest cached prefix of ``keys``. With ``peers=True`` the daemon also asks its peers
        (one batched RPC each) and the answer is a
        :class:`tierstore.cluster.lookup.ClusterLookup`: the same fields plus ``locations``
        (``Location(tier, peer)`` per hit block), ``local_blocks`` and ``by_peer()``; ``pin``
        pins only the local part. ``request`` (e.g. the engine's request id): the pins belong to
        that request of this connection, so releasing it (``unpin(..., request=)``,
        :meth:`release`) never takes another request's pins on a shared prefix; all of them
        still go when the connection closes."""
        body = {"keys": pack_keys(keys), "ns": self._ns(namespace), "pin": pin, "ttl_s": ttl_s}
        if request is not None:
            body["request"] = request
        if peers:
            from tierstore.cluster.lookup import ClusterLookup, decode_locations

            body["peers"] = True
            r = self._call(MsgType.LOOKUP, body, idempotent=not pin)
            local, locs = decode_locations(r)
            return ClusterLookup.of(keys[:len(locs)], locs, namespace.block_size, local,
                                    pinned=pin, owner=self._pin_owner(request))
        r = self._call(MsgType.LOOKUP, body, idempotent=not pin)
        n = int(r["n"])
        tb = r["tiers"]
        if n and tb == tb[:1] * n:   # the common case: the whole hit in one tier
            tiers = (_TIERS[tb[0]],) * n
        else:
            tiers = tuple(map(_TIERS.__getitem__, tb))
        return LookupResult(tuple(keys[:n]), tiers,
                            namespace.block_size, pinned=pin, owner=self._pin_owner(request))

    def prepare_store(self, keys: Sequence[BlockKey], namespace: Namespace, size_bytes: int,
                      parent: BlockKey | None = None, wait_s: float = 0.0,
                      engine: Sequence[bytes | None] | None = None) -> StoreJob:
        """``engine``: per key engine metadata (``tierstore.events.engine_block``) or None."""
        body = {"keys": pack_keys(keys), "ns": self._ns(namespace), "size": int(size_bytes),
                "parent": parent, "wait_s": float(wait_s)}
        if engine is not None:
            body["engine"] = list(engine)
        r = self._call(MsgType.PREPARE_STORE, body)
        return StoreJob(r["job"], list(keys), r["slots"], [_STATUS[s] for s in r["status"]],
                        int(size_bytes))

    def complete_store(self, job_id: int, ok: bool | Sequence[bool] = True) -> list[BlockStatus]:
        r = self._call(MsgType.COMPLETE_STORE,
                       {"job": job_id, "ok": ok if isinstance(ok, bool) else [bool(x) for x in ok]})
        return [_STATUS[s] for s in r["status"]]

    def prepare_stores(self, specs: Sequence[tuple]) -> list[StoreJob]:
        """Several ``(keys, namespace, size_bytes, parent[, engine])`` store jobs in one round
        trip (``engine``: per key engine metadata or None, see ``Store.prepare_store``)."""
        out = []
        for sp in specs:
            d = {"keys": pack_keys(sp[0]), "ns": self._ns(sp[1]), "size": int(sp[2]),
                 "parent": sp[3]}
            if len(sp) > 4 and sp[4] is not None:
                d["engine"] = list(sp[4])
            out.append(d)
        r = self._call(MsgType.PREPARE_STORES, {"specs": out})
        return [StoreJob(j["job"], list(sp[0]), j["slots"], [_STATUS[x] for x in j["status"]],
                         int(sp[2])) for j, sp in zip(r["jobs"], specs)]

    def complete_stores(self, answers: Sequence[tuple]) -> list[list[BlockStatus]]:
        """Several ``(job_id, ok)`` answers (``ok``: bool or one per key) in one round trip."""
        body = {"answers": [[int(j), ok if isinstance(ok, bool) else [bool(x) for x in ok]]
                            for j, ok in answers]}
        r = self._call(MsgType.COMPLETE_STORES, body)
        return [[_STATUS[x] for x in st] for st in r["status"]]

    @staticmethod
    def _load_job(keys: Sequence[BlockKey], j: dict) -> LoadJob:
        return LoadJob(j["job"], list(keys), j["slots"], [_STATUS[s] for s in j["status"]],
                       j["sizes"], ready=bool(j.get("ready", True)),
                       expected=int(j.get("expected", -1)), sources=bytes(j.get("sources", b"")))

    def prepare_load(self, keys: Sequence[BlockKey], wait: bool = True) -> LoadJob:
        r = self._call(MsgType.PREPARE_LOAD, {"keys": pack_keys(keys), "wait": bool(wait)})
        job = self._load_job(keys, r)
        if not job.ready:
            self._load_keys[job.job_id] = list(keys)
        return job

    def prepare_loads(self, chains: Sequence[Sequence[BlockKey]], wait: bool = False) -> list[LoadJob]:
        """Several chains in one round trip; by default never waits for the daemon's disk
        (``Store.prepare_load(wait=False)``): poll with :meth:`poll_loads`."""
        r = self._call(MsgType.PREPARE_LOADS, {"chains": [pack_keys(c) for c in chains],
                                               "wait": bool(wait)})
        jobs = [self._load_job(c, j) for c, j in zip(chains, r["jobs"])]
        for c, j in zip(chains, jobs):
            if not j.ready:
                self._load_keys[j.job_id] = list(c)
        return jobs

    def poll_loads(self, job_ids: Sequence[int]) -> dict[int, LoadJob]:
        """The staged jobs among ``job_ids`` (one round trip)."""
        r = self._call(MsgType.POLL_LOADS, {"jobs": [int(j) for j in job_ids]}, idempotent=False)
        out = {}
        for j in r["done"]:
            out[j["job"]] = self._load_job(self._load_keys.pop(j["job"], []), j)
        return out

    def wait_load(self, job_id: int, timeout_s: float | None = None) -> LoadJob | None:
        """As ``Store.wait_load``: None once ``timeout_s`` ran out; without ``timeout_s`` it
        waits until the job is staged (asking the daemon at most 60 s at a time)."""
        while True:
            t = 60.0 if timeout_s is None else min(max(0.0, timeout_s), 60.0)
            t0 = time.monotonic()
            r = self._call(MsgType.WAIT_LOAD, {"job": int(job_id), "timeout_s": t})
            if r["done"] is not None:
                return self._load_job(self._load_keys.pop(job_id, []), r["done"])
            if timeout_s is not None:
                timeout_s -= time.monotonic() - t0
                if timeout_s <= 0:
                    return None

    def complete_load(self, job_id: int, ok: bool = True) -> None:
        self._load_keys.pop(job_id, None)
        self._call(MsgType.COMPLETE_LOAD, {"job": job_id, "ok": ok})

    def complete_loads(self, job_ids: Sequence[int], ok: bool = True,
                       tokens: dict[str, int] | None = None) -> None:
        """``tokens``: the engine's token accounting since its last report, added to the
        daemon's counters (``Store.account_tokens``; ``tierstore stats``, ``/metrics``)."""
        for j in job_ids:
            self._load_keys.pop(j, None)
        body: dict = {"jobs": [int(j) for j in job_ids], "ok": ok}
        if tokens:
            body["tokens"] = {str(k): int(v) for k, v in tokens.items()}
        self._call(MsgType.COMPLETE_LOADS, body)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every block stored so far has its NVMe copy on the daemon's disk; False on
        a failed write or when ``timeout_s`` (at most 60 s per call) ran out."""
        t = 60.0 if timeout_s is None else min(max(0.0, timeout_s), 60.0)
        while True:
            t0 = time.monotonic()
            if self._call(MsgType.FLUSH, {"timeout_s": t})["done"]:
                return True
            if timeout_s is not None:
                return False
            if time.monotonic() - t0 < t:   # not a timeout: a write failed
                return False

    def slab(self) -> tuple[memoryview, int, int]:
        """``(buffer, num_slots, slot_bytes)`` of the daemon's shared DRAM slab, mapped on first use."""
        self.slot_view(0)
        return self._buf, int(self.info["num_slots"]), self._stride

    def slot_view(self, slot: int) -> memoryview:
        """Writable view of DRAM slot ``slot`` in the daemon's shared slab (``slot_stride`` bytes)."""
        if self._buf is None:
            with self._lock:
                if not self.info:
                    raise DaemonUnreachable("not connected to a daemon")
                if self._buf is None:
                    self._map(self.info)
        if not 0 <= slot < int(self.info["num_slots"]):
            raise IndexError(f"slot {slot} outside the slab")
        off = slot * self._stride
        return self._buf[off:off + self._stride]

    def put(self, keys: Sequence[BlockKey], namespace: Namespace,
            blocks: Sequence[bytes | memoryview], parent: BlockKey | None = None,
            wait_s: float = 60.0) -> list[BlockStatus]:
        """Bulk writer's convenience (as ``Store.put``): waits up to ``wait_s`` for room in the
        daemon's NVMe write-behind queue."""
        size = len(blocks[0]) if blocks else 0
        job = self.prepare_store(keys, namespace, size, parent=parent, wait_s=wait_s)
        return fill_store_job(self, job, blocks, size)

    def get(self, keys: Sequence[BlockKey]) -> list[bytes]:
        job = self.prepare_load(keys)
        try:
            return [bytes(self.slot_view(s)[:n]) for s, n in zip(job.slots, job.sizes)]
        finally:
            self.complete_load(job.job_id)

    def pin(self, keys: Sequence[BlockKey], ttl_s: float | None = None,
            session: str | None = None, request: str | None = None) -> int:
        """Pin resident ``keys``; returns how many were pinned. Without ``session`` the pins
        belong to this connection (gone when it closes), or to one ``request`` of it (see
        :meth:`lookup`); with ``session`` they belong to ``session:<session>``, outlive the
        connection and need ``ttl_s`` (PinError without); ``session`` and ``request`` together
        are a PinError."""
        body = _owned(keys, session, request, ttl_s=ttl_s)
        return int(self._call(MsgType.PIN, body)["n"])

    def unpin(self, keys: Sequence[BlockKey], session: str | None = None,
              request: str | None = None) -> int:
        """Release one pin per key of this connection, of one ``request`` of it, or of
        ``session``. All or nothing: PinError when the owner holds no pin on one of the keys
        (a lease ran out), and then nothing is released."""
        body = _owned(keys, session, request)
        return int(self._call(MsgType.UNPIN, body)["n"])

    def unpin_each(self, keys: Sequence[BlockKey], session: str | None = None,
                   request: str | None = None) -> list[bool]:
        """Release one pin of the owner (as :meth:`unpin` picks it) on each key that holds
        one, in one round trip; one bool per key, False where the owner held none. A daemon
        older than this request answers ProtocolError (unknown message type)."""
        body = _owned(keys, session, request)
        return [bool(x) for x in self._call(MsgType.UNPIN_EACH, body)["unpinned"]]

    def retain(self, keys: Sequence[BlockKey], *, session: str, tenant: str = "",
               ttl_s: float, priority: int = 0) -> dict:
        """A retention hint (``Store.retain``, tierstore/retention.py): pin the resident
        ``keys`` for ``session`` of ``tenant`` (a cache salt) for ``ttl_s``, within the daemon's
        ``[retention]`` caps. The pins belong to the session, not this connection: they outlive
        it and go by their TTL. Returns ``{pinned, refused, held, displaced, ttl_s, cap,
        tenant}``."""
        return dict(self._call(MsgType.RETAIN, {"keys": pack_keys(keys), "session": session,
                                                "tenant": tenant, "ttl_s": ttl_s,
                                                "priority": priority}))

    def release(self, request: str) -> int:
        """Release every pin ``request`` (of this connection) still holds; returns how many.
        Pins whose lease ran out are simply gone: no error."""
        return int(self._call(MsgType.RELEASE, {"request": request})["n"])

    def evict(self, keys: Sequence[BlockKey], tier: Tier | str | None = None,
              dry_run: bool = False) -> dict:
        """``Store.evict``; ``tier`` drops only that tier's copies of blocks held elsewhere too.
        ``dry_run`` is its own request (EVICT_DRY_RUN: a daemon that predates it refuses it
        instead of evicting) and changes nothing."""
        body: dict = {"keys": pack_keys(keys)}
        if tier is not None:
            body["tier"] = tier.label if isinstance(tier, Tier) else str(tier)
        if dry_run:
            return self._call(MsgType.EVICT_DRY_RUN, body, idempotent=True)
        return self._call(MsgType.EVICT, body)

    def resolve(self, prefixes: Sequence[str], unknown_ok: bool = False) -> list[BlockKey | None]:
        """``Store.resolve`` in one round trip: hex key prefixes -> full keys (None for an
        unknown prefix with ``unknown_ok``); ConfigError for a prefix that is not hex,
        KeyPrefixError for an ambiguous (or unknown) one."""
        body = {"prefixes": [str(p) for p in prefixes], "unknown_ok": bool(unknown_ok)}
        return [None if k is None else bytes(k)
                for k in self._call(MsgType.RESOLVE, body, idempotent=True)["keys"]]

    def blocks(self, limit: int | None = None, tier: Tier | str | None = None) -> list[dict]:
        t = tier.label if isinstance(tier, Tier) else tier
        return self._call(MsgType.BLOCKS, {"limit": limit, "tier": t}, idempotent=True)["blocks"]

    def block(self, key: BlockKey) -> dict | None:
        return self._call(MsgType.BLOCK, {"key": bytes(key)}, idempotent=True)["block"]

    def stats(self) -> dict:
        return self._call(MsgType.STATS, idempotent=True)

    def check(self, fix: bool = False) -> list[str]:
        return self._call(MsgType.CHECK, {"fix": fix}, idempotent=not fix)["problems"]

    def usage(self) -> list[dict]:
        return self.stats()["tiers"]

    # ---------------------------------------------------------------- peers
    def fetch_remote(self, keys: Sequence[BlockKey], namespace: Namespace, *, pin: bool = False,
                     ttl_s: float | None = None, detail: bool = False,
                     request: str | None = None, partial: bool = False) -> int | dict:
        """Pull the blocks of ``keys`` this node lacks from the nearest peers into the daemon's
        DRAM; returns how many blocks of ``keys`` are now local (a prefix), or with ``detail``
        the daemon's ``{n, fetched, sources, errors, promised, failed[, pinned]}``. ``pin``: the
        local prefix is pinned for this connection (like ``lookup(pin=True)``) so nothing
        evicts it before ``prepare_load``. Raises TransferFailed when a peer failed mid-read
        and no other peer covered its part; the blocks that arrived whole before the failure
        stay visible (never a partial block). ``partial``: answer such a fetch instead of
        raising (``failed`` true, ``n`` < ``promised``; ``pin`` pins what is local). Blocks
        for the whole transfer: use a client of its own from a side thread when the caller
        must not wait."""
        body = {"keys": pack_keys(keys), "ns": self._ns(namespace), "pin": pin, "ttl_s": ttl_s}
        if partial:
            body["partial"] = True
        if request is not None:   # the pins belong to that request (see lookup)
            body["request"] = request
        r = self._call(MsgType.FETCH_REMOTE, body, idempotent=not pin)
        return r if detail else int(r["n"])

    def peers(self, probe: bool = False) -> dict:
        """The daemon's peer view (``tierstore peers ls``); ``probe`` dials idle peers first."""
        return self._call(MsgType.PEERS, {"probe": probe}, idempotent=True)

    def peer_ping(self, peer: str) -> dict:
        """One authenticated round trip from the daemon to ``peer`` (name or host:port)."""
        return self._call(MsgType.PEER_PING, {"peer": peer}, idempotent=True)

    # ---------------------------------------------------------------- daemon only
    def ping(self) -> float:
        """Round-trip time in seconds."""
        t0 = time.perf_counter()
        self._call(MsgType.PING, idempotent=True)
        return time.perf_counter() - t0

    def shutdown(self) -> dict:
        """Ask the daemon to stop (the SIGTERM path). Returns ``{"stopping": True, "pid": …}``."""
        try:
            return self._call(MsgType.SHUTDOWN)
        finally:
            with self._lock:
                self._drop()


def _owned(keys: Sequence[BlockKey], session: str | None, request: str | None, **extra) -> dict:
    """A PIN / UNPIN / UNPIN_EACH body: ``keys``, ``extra``, and whose pins (``session`` or
    ``request``; neither: this connection's). Both at once is a PinError, before anything is
    encoded or sent."""
    check_pin_owner(session, request)
    body = {"keys": pack_keys(keys), **extra}
    if session is not None:
        body["session"] = session
    if request is not None:
        body["request"] = request
    return body
