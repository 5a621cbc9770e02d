"""Run the real tierstore daemon with disk and metadata faults injected (tests, tools/fault_run.py).

    python tools/fault_inject.py --plan PLAN.json --log FAULTS.jsonl [--meta-dir DIR] -- \
        --data-dir D --socket S --config C          # the arguments of python -m tierstore.daemon

The daemon is ``tierstore.daemon.__main__.main`` unchanged; before it starts, this wraps the calls
through which the NVMe tier reaches the disk (``tierstore.io.disk.write_vec`` / ``read_vec``,
``os.fdatasync``) and its LMDB write transactions (``NvmeTier._write_txn``). What fails is read
from the plan file, a JSON object re-read when it changes (a poller thread, every 20 ms)::

    {"gen": 3,                                   # echoed in the log once the plan is applied
     "seed": 1,
     "write": {"eio": 0.1, "enospc": 0.05, "einval": 0.0},   # record writes (header + payload)
     "zero":  {"eio": 0.0},                      # zeroing the header of a deleted record
     "read":  {"eio": 0.02},                     # record reads
     "fsync": {"eio": 0.0},                      # fdatasync of a slab file
     "meta":  0.0,                               # an LMDB write txn raises lmdb.DiskError
     "meta_full": false}                         # fill --meta-dir with a ballast file (a real
                                                 # ENOSPC; put the dir on a small tmpfs)

Values are probabilities per call. Every fault injected is one JSON line in the log,
``{"op": "write", "error": "eio"}``; every plan applied is ``{"plan": gen}``. Nothing here is part
of tierstore: it only patches module attributes in this process.

Threading: the wrappers run on the NVMe tier's I/O pool threads; one lock guards the random
generator and the log. The poller thread is a daemon thread owned by this script.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ERRNOS = {"eio": errno.EIO, "enospc": errno.ENOSPC, "einval": errno.EINVAL}


class Faults:
    """The plan, the random draws and the log of one daemon process."""

    def __init__(self, plan_path: str, log_path: str, meta_dir: str | None) -> None:
        self.plan_path = plan_path
        self.meta_dir = meta_dir
        self.plan: dict = {}
        self._mtime = None
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self._log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._ballast: str | None = None

    # ---------------------------------------------------------------- plan
    def poll(self) -> None:
        try:
            mtime = os.stat(self.plan_path).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        try:
            plan = json.loads(Path(self.plan_path).read_text())
        except (OSError, ValueError):
            return   # caught mid-write: the next poll reads it whole
        self._mtime = mtime
        with self._lock:
            if plan.get("seed") is not None and plan.get("seed") != self.plan.get("seed"):
                self._rng.seed(plan["seed"])
            self.plan = plan
        self._set_meta_full(bool(plan.get("meta_full")))
        self._write({"plan": plan.get("gen", 0)})

    def run_poller(self) -> None:
        def loop():
            while True:
                self.poll()
                time.sleep(0.02)
        threading.Thread(target=loop, name="fault-plan", daemon=True).start()

    def _set_meta_full(self, full: bool) -> None:
        if not self.meta_dir:
            return
        path = os.path.join(self.meta_dir, "ballast")
        if not full:
            if self._ballast:
                os.unlink(self._ballast)
                self._ballast = None
            return
        if self._ballast:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for chunk in (1 << 16, 1 << 12):   # fill every page the filesystem has left
                buf = b"\0" * chunk
                while True:
                    try:
                        os.write(fd, buf)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        self._ballast = path

    # ---------------------------------------------------------------- draws and log
    def _write(self, rec: dict) -> None:
        os.write(self._log, (json.dumps(rec) + "\n").encode())

    def draw(self, op: str) -> str | None:
        """The error to inject into this call of ``op``, or None."""
        with self._lock:
            spec = self.plan.get(op)
            if not spec:
                return None
            if op == "meta":
                hit = "meta" if self._rng.random() < float(spec) else None
            else:
                hit = None
                r = self._rng.random()
                for err, p in sorted(spec.items()):
                    if r < p:
                        hit = err
                        break
                    r -= p
            if hit is not None:
                self._write({"op": op, "error": hit})
            return hit


def install(faults: Faults) -> None:
    """Wrap the disk and LMDB entry points of the NVMe tier in this process."""
    import lmdb

    from tierstore.io import disk
    from tierstore.tiers import nvme

    real_write, real_read, real_sync = disk.write_vec, disk.read_vec, os.fdatasync
    real_txn = nvme.NvmeTier._write_txn

    def write_vec(fd, bufs, offset, **kw):
        op = "write" if len(bufs) > 1 else "zero"   # a record has a header and a payload
        err = faults.draw(op)
        if err:
            raise OSError(ERRNOS[err], f"injected {err.upper()} ({op})")
        return real_write(fd, bufs, offset, **kw)

    def read_vec(fd, bufs, offset, **kw):
        if len(bufs) > 1:   # record reads (header-only reads are recovery and check)
            err = faults.draw("read")
            if err:
                raise OSError(ERRNOS[err], f"injected {err.upper()} (read)")
        return real_read(fd, bufs, offset, **kw)

    def fdatasync(fd):
        err = faults.draw("fsync")
        if err:
            raise OSError(ERRNOS[err], f"injected {err.upper()} (fsync)")
        return real_sync(fd)

    def write_txn(self, fn):
        if faults.draw("meta"):
            raise lmdb.DiskError("injected: mdb_txn_commit: No space left on device")
        return real_txn(self, fn)

    disk.write_vec, disk.read_vec, os.fdatasync = write_vec, read_vec, fdatasync
    nvme.NvmeTier._write_txn = write_txn


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        ours, daemon_args = argv[:i], argv[i + 1:]
    else:
        ours, daemon_args = argv, []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", required=True, help="JSON plan file (re-read when it changes)")
    p.add_argument("--log", required=True, help="one JSON line per injected fault")
    p.add_argument("--meta-dir", help="the NVMe metadata dir, for meta_full (a small tmpfs)")
    a = p.parse_args(ours)
    faults = Faults(a.plan, a.log, a.meta_dir)
    faults.poll()
    install(faults)
    faults.run_poller()
    from tierstore.daemon.__main__ import main as daemon_main

    return daemon_main(daemon_args)


if __name__ == "__main__":
    sys.exit(main())
