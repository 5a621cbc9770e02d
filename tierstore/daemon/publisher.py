"""The daemon's KV event publisher: vLLM's ZMQ framing over the store's residency log.

Owned by :class:`~tierstore.daemon.server.DaemonServer` when ``[events] enabled``; one thread,
``tierstore-events``, owns both sockets (ZMQ sockets are not thread-safe)::

    Store (under its lock) --append--> EventLog --drain every interval_s--> Translator
        --> KVEventBatch (msgpack) --PUB [topic, seq (8 B BE), payload]--> subscribers
                                   \\-> ring of the last ``buffer`` batches
    ROUTER (replay) <--[id, "", start seq (8 B BE)]-- a subscriber that missed something
        --> [id, "", topic, seq, payload] per batch, then [id, "", "", -1 (8 B), ""]

The framing is vLLM's ``ZmqEventPublisher``'s, so its subscribers (and vLLM's example
subscriber) work unchanged. What tierstore adds:

- **Epochs** (case EVT-37 (a)). ``seq = epoch << 40 | n``: ``epoch`` is a counter kept in
  ``<data_dir>/events.epoch``, raised at every start (a ``kill -9`` too), ``n`` counts batches
  from 0. Sequence numbers so grow across restarts and a restart is a gap that any subscriber
  checking ``seq == last + 1`` notices. The first batch of an epoch is ``AllBlocksCleared``
  followed by a ``BlockStored(medium="STORAGE")`` per block that survived on NVMe
  (``Store.attach_events``' snapshot).
- **Late subscribers** (EVT-37 (c)). A replay request whose start lies in the ring (same epoch)
  gets the ring from there, as in vLLM. One that starts earlier (the ring has moved on, another
  epoch, or 0 from a subscriber that just joined) gets one batch instead: ``AllBlocksCleared`` and
  the whole published state (:meth:`Translator.snapshot`), tagged with the last published
  sequence number. Applying it and then any batch after that number gives exactly the state a
  subscriber that never missed anything has. (One message: its size grows with the number of
  blocks held, ~100 bytes each with 32 token ids.)
- **Heartbeat.** When nothing was published for ``heartbeat_s``, an empty batch is sent with the
  last sequence number again (it is not a new batch and is not kept for replay), so a subscriber
  that lost the first batch of a new epoch (ZMQ's slow joiner after a restart) sees the gap and
  asks for a replay without waiting for the next change.

Sockets are bound to the configured endpoints; the defaults are loopback (tcp://127.0.0.1:5557
and :5558): publishing to other hosts is a choice the operator writes down.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from tierstore.errors import ConfigError
from tierstore.events import EventLog
from tierstore.kv_events import Translator, encode_batch

log = logging.getLogger("tierstore.daemon.events")

EPOCH_FILE = "events.epoch"
EPOCH_SHIFT = 40
END_SEQ = (-1).to_bytes(8, "big", signed=True)
MAX_BATCH_EVENTS = 4096


def next_epoch(data_dir: str | os.PathLike) -> int:
    """Raise and return the data dir's event epoch (a new file starts at 1)."""
    p = Path(data_dir) / EPOCH_FILE
    try:
        cur = int(p.read_text().strip() or 0)
    except FileNotFoundError:
        cur = 0
    except ValueError:
        log.warning("%s is not a number; events start a new epoch from the clock", p)
        cur = int(time.time())
    epoch = (cur + 1) % (1 << (63 - EPOCH_SHIFT))
    tmp = p.with_suffix(".tmp")
    tmp.write_text(f"{epoch}\n")
    os.replace(tmp, p)
    return epoch


class KVEventPublisher:
    """PUB + ROUTER sockets and the thread that feeds them (see the module docstring)."""

    def __init__(self, events: EventLog, settings, *, epoch: int) -> None:
        try:
            import zmq
        except ImportError:
            raise ConfigError("[events] enabled needs pyzmq: pip install pyzmq (in a checkout: "
                              "pip install -e '.[events]')") from None
        self._zmq = zmq
        self.log = events
        self.settings = settings
        self.epoch = epoch
        self.translator = Translator()
        self._n = 0                     # batches published in this epoch
        self._last_seq: int | None = None
        self._ring: deque[tuple[int, bytes]] = deque(maxlen=max(1, settings.buffer))
        self._topic = settings.topic.encode()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = {"batches": 0, "events": 0, "replays": 0, "snapshots": 0,
                         "heartbeats": 0, "errors": 0}
        self._ctx = zmq.Context()
        self._pub = self._replay = None
        try:
            self._pub = self._ctx.socket(zmq.PUB)
            self._pub.set_hwm(settings.hwm)
            self._pub.setsockopt(zmq.LINGER, 0)
            self.endpoint = self._bind(self._pub, settings.endpoint, "endpoint")
            self.replay_endpoint = None
            if settings.replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self.replay_endpoint = self._bind(self._replay, settings.replay_endpoint,
                                                  "replay_endpoint")
        except BaseException:
            self._close_sockets()
            raise

    def _bind(self, sock, endpoint: str, what: str) -> str:
        try:
            sock.bind(endpoint)
        except self._zmq.ZMQError as e:
            raise ConfigError(f"[events] {what} {endpoint!r}: cannot bind: {e}") from None
        return sock.getsockopt_string(self._zmq.LAST_ENDPOINT)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "KVEventPublisher":
        self._thread = threading.Thread(target=self._run, name="tierstore-events", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Publish what waits, then close the sockets."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._close_sockets()

    def _close_sockets(self) -> None:
        for s in (self._pub, self._replay):
            if s is not None:
                s.close(linger=0)
        self._pub = self._replay = None
        self._ctx.term()

    @property
    def last_seq(self) -> int | None:
        return self._last_seq

    def stats(self) -> dict:
        return {"enabled": True, "endpoint": self.endpoint, "replay_endpoint": self.replay_endpoint,
                "epoch": self.epoch, "seq": self._last_seq, "ring_batches": len(self._ring),
                "blocks": len(self.translator), **self.counters, "log": self.log.stats()}

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        interval_ms = max(1, int(self.settings.interval_s * 1000))
        last_sent = time.monotonic()
        while True:
            stopping = self._stop.is_set()
            try:
                if self._replay is not None and dict(poller.poll(0 if stopping else interval_ms)):
                    self._serve_replay()
                elif self._replay is None and not stopping:
                    self._stop.wait(self.settings.interval_s)
                if self._publish_pending():
                    last_sent = time.monotonic()
                elif self._last_seq is not None and \
                        time.monotonic() - last_sent >= self.settings.heartbeat_s:
                    self._send(self._last_seq, encode_batch([]))
                    self.counters["heartbeats"] += 1
                    last_sent = time.monotonic()
            except Exception:   # never let the thread die: count, log, go on
                self.counters["errors"] += 1
                log.exception("events: publisher loop")
                time.sleep(0.1)
            if stopping and not len(self.log):
                return

    def _publish_pending(self) -> bool:
        raw = self.log.drain()
        if not raw:
            return False
        events = self.translator.feed(raw)
        sent = False
        for i in range(0, len(events), MAX_BATCH_EVENTS):
            chunk = events[i:i + MAX_BATCH_EVENTS]
            seq = (self.epoch << EPOCH_SHIFT) | self._n
            self._n += 1
            payload = encode_batch(chunk)
            self._send(seq, payload)
            self._ring.append((seq, payload))
            self._last_seq = seq
            self.counters["batches"] += 1
            self.counters["events"] += len(chunk)
            sent = True
        return sent

    def _send(self, seq: int, payload: bytes) -> None:
        self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            log.warning("events: bad replay request of %d frames", len(frames))
            return
        client, _, start_b = frames
        start = int.from_bytes(start_b, "big")
        self.counters["replays"] += 1
        self._publish_pending()   # the answer covers everything appended so far
        send = self._replay.send_multipart
        ring = self._ring
        if self._last_seq is None:
            pass
        elif ring and start >> EPOCH_SHIFT == self.epoch and start >= ring[0][0]:
            for seq, payload in ring:
                if seq >= start:
                    send((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
        else:   # the ring cannot cover it: the whole published state, as of the last batch
            self.counters["snapshots"] += 1
            send((client, b"", self._topic, self._last_seq.to_bytes(8, "big"),
                  encode_batch(self.translator.snapshot())))
        send((client, b"", b"", END_SEQ, b""))


__all__ = ["EPOCH_FILE", "EPOCH_SHIFT", "KVEventPublisher", "next_epoch"]
