"""A KV-event subscriber as a router would write one against vLLM's publisher: ZMQ SUB on the
endpoint, ZMQ DEALER on the replay socket, ``seq == last + 1`` checks, a replay on any gap. It
keeps what it learnt in a :class:`tierstore.kv_events.KVEventIndex` (engine hash -> media).

DEALER, not REQ: the replay socket (vLLM's ROUTER, and tierstore's, which frames alike) answers
one request with several messages (one per batch, then the end marker), which a REQ socket
refuses after the first ("Operation cannot be accomplished in current state"), so vLLM's example
subscriber's REQ works only for a one-batch replay.

``decode`` turns one payload into a list of events: by default tierstore's own msgpack reader;
the vLLM end-to-end test passes vLLM's ``msgspec.msgpack.Decoder(KVEventBatch)`` instead, so the
events are decoded by vLLM's own classes. Owns one thread (``kv-sub``), stopped by ``close``.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import zmq

from tierstore.kv_events import KVEventIndex, decode_batch

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def _default_decode(payload: bytes) -> list:
    return decode_batch(payload)[1]


class Subscriber:
    def __init__(self, endpoint: str, replay_endpoint: str, *,
                 decode: Callable[[bytes], list] = _default_decode, catch_up: bool = False) -> None:
        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint
        self.decode = decode
        self.index = KVEventIndex()
        self.last_seq = -1
        self.replays = 0
        self.batches = 0
        self.errors: list[str] = []
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(endpoint)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._catch_up = catch_up
        self._thread = threading.Thread(target=self._run, name="kv-sub", daemon=True)
        self._thread.start()

    def _apply(self, seq: int, payload: bytes) -> None:
        events = self.decode(payload)
        with self._lock:
            self.index.apply(events)
            self.last_seq = seq
            self.batches += 1

    def _replay(self, start: int) -> None:
        req = self._ctx.socket(zmq.DEALER)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(self.replay_endpoint)
        try:
            req.send_multipart((b"", start.to_bytes(8, "big")))   # the REQ envelope, by hand
            self.replays += 1
            while True:
                if not req.poll(10_000):
                    self.errors.append(f"replay from {start}: no answer")
                    return
                _empty, _topic, seq_b, payload = req.recv_multipart()
                if seq_b == END_SEQ:
                    return
                # ring batches from ``start``, or one snapshot batch (AllBlocksCleared + the
                # whole state) tagged with the publisher's last seq: applied alike
                self._apply(int.from_bytes(seq_b, "big"), payload)
        finally:
            req.close(0)

    def _run(self) -> None:
        try:
            if self._catch_up:   # a late joiner: everything so far, through the replay socket
                time.sleep(0.2)   # let the SUB connection settle (ZMQ's slow joiner)
                self._replay(0)
            while not self._stop.is_set():
                if not self._sub.poll(100):
                    continue
                _topic, seq_b, payload = self._sub.recv_multipart()
                seq = int.from_bytes(seq_b, "big")
                if seq <= self.last_seq:   # a heartbeat, or covered by a replay already
                    continue
                if seq > self.last_seq + 1:   # a gap (a new epoch too): ask for what we missed
                    self._replay(self.last_seq + 1)
                    if seq <= self.last_seq:
                        continue
                self._apply(seq, payload)
        except Exception as e:  # noqa: BLE001 - reported through errors
            self.errors.append(f"{type(e).__name__}: {e}")

    def snapshot(self) -> tuple[int, dict]:
        with self._lock:
            return self.last_seq, {h: set(m) for h, m in self.index.blocks.items()}

    def wait_for(self, seq: int, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.last_seq >= seq:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sub.close(0)
        self._ctx.term()


def settle(stats: Callable[[], dict], timeout_s: float = 30.0) -> int:
    """Wait until the daemon's publisher has published every residency change (its log is
    empty and the NVMe write queue drained); returns its last sequence number."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = stats()
        ev = st["events"]
        wb = st.get("write_behind") or {}
        if ev["log"]["pending"] == 0 and not wb.get("queued_blocks"):
            time.sleep(0.3)   # one more publisher turn: what was drained is sent
            st2 = stats()["events"]
            if st2["log"]["pending"] == 0 and st2["seq"] == stats()["events"]["seq"]:
                return st2["seq"]
        if time.monotonic() > deadline:
            raise AssertionError(f"the publisher did not settle: {ev}")
        time.sleep(0.1)
