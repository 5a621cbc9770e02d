"""Health of a disk tier: the outcome of its recent I/O, failures counted by operation and error.

A tier that fails must say so (issue 13 item 10): the store keeps serving from DRAM when NVMe
writes fail, so nothing else would show that blocks stopped getting their NVMe copy. The tier
records every I/O outcome here; ``Store.stats()`` reports the snapshot, ``Store.check()`` turns a
degraded tier into a problem line (``tierstore check`` exit 1), and the daemon exports it to
Prometheus (``tier_degraded{tier}``, ``tier_io_failures_total{tier,op,error}``)::

    op       what failed                                   error (errno class)
    write    a record write (pwritev of header + payload)  eio, enospc, einval, oserror, compress
    fsync    the fdatasync that makes a batch durable      eio, ...
    meta     an LMDB commit (entries, deletes, namespaces) meta (a full or failing filesystem)
    read     a record read (I/O error, not a checksum)      eio, ...
    zero     zeroing the header of a deleted record         eio, ...
    grow     growing a slab file (posix_fallocate)          eio, ... (ENOSPC clamps instead)

State: ``degraded`` while a failure is among the last :data:`WINDOW` outcomes, or while the tier
holds work it could not finish (``pending``: e.g. LMDB deletes waiting for a metadata filesystem
with room); ``ok`` otherwise. So a tier whose every write fails stays degraded, and one that had a
transient error is ``ok`` again after :data:`WINDOW` successful I/Os. No clock: an idle tier keeps
its last state (``last_failure_age_s`` says how old it is). ``failing`` is the narrower "failing
now": the latest outcome failed, or work is pending; ``check`` asks that, after probing the tier
(``NvmeTier.probe``), so a disk that works again checks clean at once.

Thread-safe (its own lock): the tier records on whatever thread runs it, ``stats()`` reads from
another.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import Counter, deque
try:
    from enum import StrEnum
except ImportError:   # Python 3.10 (requires-python >= 3.10): str() and format() give the value
    from enum import Enum

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str.__str__(self)

        def __format__(self, spec: str) -> str:
            return str.__format__(str(self), spec)

class DiskError(StrEnum):
    """Why one item of a disk batch failed (``DiskResult.error`` of tiers/slot_tier.py). A ``str``: its value is
    the label the counters (``nvme_write_<error>``) and the tier's health
    (tiers/health.py: ``tier_io_failures_total{error}``) show."""

    EIO = "eio"                # an I/O error (EIO)
    ENOSPC = "enospc"          # no space (ENOSPC, EDQUOT): the store retries after evicting
    EINVAL = "einval"          # EINVAL (e.g. O_DIRECT alignment refused)
    OSERROR = "oserror"        # any other OSError
    COMPRESS = "compress"      # the codec failed (that item only)
    META = "meta"              # the LMDB commit failed (a full or failing metadata filesystem)
    CORRUPT = "corrupt"        # a read whose header or checksum does not verify
    MISSING = "missing"        # a read of a slot that holds no record
    BADSLOT = "badslot"        # the caller's mistakes: a slot not allocated or not backed,
    TOO_LARGE = "too_large"    # a payload past ``slot_bytes``,
    BADKEY = "badkey"          # a key or namespace digest of the wrong length,
    BADBUF = "badbuf"          # a read buffer shorter than the record


WINDOW = 32
"""Recent I/O outcomes that decide the state."""


def error_name(e: BaseException) -> DiskError:
    """The error label of an OSError: ``enospc`` (also EDQUOT), ``eio``, ``einval``, else
    ``oserror``."""
    no = getattr(e, "errno", None)
    if no in (errno.ENOSPC, errno.EDQUOT):
        return DiskError.ENOSPC
    if no == errno.EIO:
        return DiskError.EIO
    if no == errno.EINVAL:
        return DiskError.EINVAL
    return DiskError.OSERROR


class TierHealth:
    """Recent outcomes and failure counts of one tier (see the module docstring)."""

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self._lock = threading.Lock()
        self._recent: deque[bool] = deque(maxlen=WINDOW)   # True = a failure
        self._failed_in_window = 0
        self.failures: Counter[tuple[str, str]] = Counter()   # (op, error) -> count
        self.successes = 0
        self._last_error = ""
        self._last_failure_t = 0.0
        self._last_failed = False
        self._pending: dict[str, int] = {}

    def ok(self, n: int = 1) -> None:
        """``n`` I/Os succeeded."""
        if n <= 0:
            return
        with self._lock:
            self.successes += n
            self._last_failed = False
            for _ in range(min(n, WINDOW)):
                self._push(False)

    def fail(self, op: str, error: str, detail: str = "", n: int = 1) -> None:
        """``n`` I/Os of kind ``op`` failed with ``error``; ``detail``: one line for people."""
        if n <= 0:
            return
        with self._lock:
            self.failures[(op, error)] += n
            self._last_failed = True
            for _ in range(min(n, WINDOW)):
                self._push(True)
            self._last_error = f"{op} {error}" + (f": {detail}" if detail else "")
            self._last_failure_t = time.monotonic()

    def set_pending(self, what: str, n: int) -> None:
        """Work the tier still owes (e.g. ``meta_deletes``): degraded while any is non-zero."""
        with self._lock:
            if n:
                self._pending[what] = n
            else:
                self._pending.pop(what, None)

    def _push(self, failed: bool) -> None:
        if len(self._recent) == WINDOW and self._recent[0]:
            self._failed_in_window -= 1
        self._recent.append(failed)
        self._failed_in_window += failed

    @property
    def degraded(self) -> bool:
        with self._lock:
            return bool(self._failed_in_window or self._pending)

    @property
    def failing(self) -> bool:
        """The latest I/O failed, or work is pending."""
        with self._lock:
            return self._last_failed or bool(self._pending)

    def snapshot(self) -> dict:
        """``{status, reason, recent_failures, failures {op_error: n}, pending, last_error,
        last_failure_age_s}`` (plain JSON values)."""
        with self._lock:
            degraded = bool(self._failed_in_window or self._pending)
            reasons = []
            if self._failed_in_window:
                reasons.append(f"{self._failed_in_window} of the last {len(self._recent)} I/Os "
                               f"failed (last: {self._last_error})")
            reasons += [f"{n} {what.replace('_', ' ')} pending" for what, n in self._pending.items()]
            return {
                "status": "degraded" if degraded else "ok",
                "failing": self._last_failed or bool(self._pending),
                "reason": "; ".join(reasons),
                "recent_failures": self._failed_in_window,
                "failures": {f"{op}_{err}": n for (op, err), n in sorted(self.failures.items())},
                "pending": dict(self._pending),
                "last_error": self._last_error or None,
                "last_failure_age_s": (round(time.monotonic() - self._last_failure_t, 3)
                                       if self._last_failure_t else None),
            }
