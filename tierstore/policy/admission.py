"""Admission filters: whether a block may be written into a tier (typically NVMe).

- ``SeenTwice`` (``seen-twice``): admit a key only on its second offer within a window of recent
  keys. Most blocks of a prefix workload are used once (three in four on the Mooncake conversation
  trace); writing them to flash wastes write endurance and bandwidth.
- ``WriteBudget`` (``write-budget``): a token bucket of bytes per second; a block that does not fit
  in the bucket now is ``THROTTLED(after_s)`` with the time until it would fit, and a block larger
  than the whole bucket is ``REJECT``ed. Protects SSD endurance (drive writes per day).
- ``Chain`` combines filters: the first verdict that is not ADMIT wins.

Pure and single-threaded like every policy; ``WriteBudget`` takes an injectable clock (seconds,
monotonic) so tests need not sleep. A REJECT/THROTTLED verdict is never charged to the bucket.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Sequence

from tierstore.policy.interface import ADMIT, REJECT, Admission, AdmissionPolicy, Key, throttled

# Keys remembered by SeenTwice: 2**20 keys of 32 bytes is ~100 MiB of Python objects at most,
# and covers a million 512-token blocks, well past the reuse distance of a multi-terabyte tier.
DEFAULT_WINDOW_KEYS = 1 << 20
# Default SSD write budget: 200 MiB/s, ~1 drive write per day on a 15 TiB data-center NVMe (1 DWPD
# is a common endurance rating); one second of burst so short spikes are not throttled.
DEFAULT_BYTES_PER_S = 200 << 20
DEFAULT_BURST_S = 1.0


class SeenTwice(AdmissionPolicy):
    """Admit on the second offer of a key within the last ``window_keys`` distinct first offers."""

    name = "seen-twice"

    def __init__(self, window_keys: int = DEFAULT_WINDOW_KEYS) -> None:
        self.window_keys = window_keys
        self._seen: OrderedDict[Key, None] = OrderedDict()

    def admit(self, key: Key, size_bytes: int) -> Admission:
        if key in self._seen:
            del self._seen[key]
            return ADMIT
        self._seen[key] = None
        if len(self._seen) > self.window_keys:
            self._seen.popitem(last=False)
        return REJECT


class WriteBudget(AdmissionPolicy):
    """Token bucket of ``bytes_per_s`` with ``burst_s`` seconds of capacity."""

    name = "write-budget"

    def __init__(self, bytes_per_s: float = DEFAULT_BYTES_PER_S, burst_s: float = DEFAULT_BURST_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive")
        self.bytes_per_s = float(bytes_per_s)
        self.burst_bytes = self.bytes_per_s * burst_s
        self._clock = clock
        self._tokens = self.burst_bytes
        self._last_s = clock()

    def admit(self, key: Key, size_bytes: int) -> Admission:
        now = self._clock()
        self._tokens = min(self.burst_bytes, self._tokens + (now - self._last_s) * self.bytes_per_s)
        self._last_s = now
        if size_bytes > self.burst_bytes:
            return REJECT
        if size_bytes <= self._tokens:
            self._tokens -= size_bytes
            return ADMIT
        return throttled((size_bytes - self._tokens) / self.bytes_per_s)


class Chain(AdmissionPolicy):
    """Ask each filter in turn; the first verdict that is not ADMIT wins.

    Later filters are not consulted once one refuses, so a write budget is not charged for a block
    that a seen-twice filter rejects.
    """

    name = "chain"

    def __init__(self, filters: Sequence[AdmissionPolicy]) -> None:
        self.filters = list(filters)

    def admit(self, key: Key, size_bytes: int) -> Admission:
        for f in self.filters:
            verdict = f.admit(key, size_bytes)
            if not verdict.admitted:
                return verdict
        return ADMIT
