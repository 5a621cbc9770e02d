"""Fault-injection run through the daemon (issue 13 acceptance): many operations, faults on.

    python tools/fault_run.py [--ops 100000] [--threads 2] [--seed 1] [--json]

Starts a real daemon (``tools/fault_inject.py``: the daemon with its disk and LMDB calls wrapped)
on a fresh data dir, its NVMe metadata dir on a 2 MiB tmpfs in a private mount namespace when
this runs as root (so "metadata filesystem full" is a real ENOSPC; otherwise LMDB commits are
made to fail instead), and drives it from ``--threads`` clients through phases::

    clean | metadata filesystem full | write EIO 25% | write ENOSPC 25% | write EINVAL 100% |
    mixed (write, read, fsync, header-zeroing faults) | LMDB commits failing 30% | clean

In every phase a client process is killed (SIGKILL) in the middle of a save. Operations: puts,
gets, pinned reads (lookup pinned per request, asynchronous load, release), stores whose copy
fails for some blocks (garbage in those slots, answered ``ok=False``), DRAM evictions (later
reads come from NVMe), flushes, lookups. Every block's bytes are a function of its key, so every
byte served is checked. Afterwards the faults are cleared, fresh blocks are stored and flushed,
and the run checks: 0 wrong bytes served, 0 pins / pending jobs left, ``check`` clean, every
injected fault in a counter (the tier's ``failures`` by op and error equal the injected counts;
Prometheus equals ``stats``). Prints the summary; exit 1 when a check fails.

tests/integration/test_fault_run.py runs this with fewer operations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SLOT = 4096
B = 16
BLOCKS = 6            # blocks per prompt
PROMPTS = 1000
META_TMPFS = "2m"
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("TIERSTORE_SECRET", None)
ENV.pop("TIERSTORE_SECRET_FILE", None)

PHASES = [
    ("clean", {}),
    ("meta_full", {"meta_full": True}),   # early: the metadata still grows (new entries)
    ("write_eio", {"write": {"eio": 0.25}}),
    ("write_enospc", {"write": {"enospc": 0.25}}),
    ("write_einval", {"write": {"einval": 1.0}}),
    ("mixed", {"write": {"eio": 0.05, "enospc": 0.05, "einval": 0.05}, "read": {"eio": 0.05},
               "fsync": {"eio": 0.05}, "zero": {"eio": 0.2}}),
    ("meta_failing", {"meta": 0.3}),
    ("clean_again", {}),
]

KILLED_SAVER = """
import sys
from tierstore.client import open_client
from tierstore.keys import Namespace
c = open_client(socket=sys.argv[1])
ns = Namespace("faultrun", 16)
base = int(sys.argv[2])
keys = c.keyer(ns).chain(list(range(base, base + 16 * 8)))
job = c.prepare_store(keys, ns, 4096)
for s in job.slots[: len(job.slots) // 2]:
    if s is not None:
        c.slot_view(s)[:4096] = b"\\xee" * 4096          # half-written, never completed
print("READY", sum(s is not None for s in job.slots), flush=True)
import time; time.sleep(60)
"""


def content(key: bytes) -> bytes:
    """The bytes of the block with ``key`` (so a wrong block is always detected)."""
    return (hashlib.blake2b(key, digest_size=64).digest() * (SLOT // 64))[:SLOT]


def can_mount_private() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {d}"], capture_output=True)
        return r.returncode == 0


class Daemon:
    """The daemon under fault injection (own process; in a private mount namespace with the
    metadata dir on a tmpfs when ``meta_tmpfs``)."""

    def __init__(self, work: Path, meta_tmpfs: bool) -> None:
        self.work = work
        self.data = work / "data"
        self.sock = work / "ts.sock"
        self.plan = work / "plan.json"
        self.log = work / "faults.jsonl"
        self.meta = self.data / "nvme" / "meta"
        self.meta_tmpfs = meta_tmpfs
        self.gen = 0
        self.proc: subprocess.Popen | None = None
        cfg = work / "ts.toml"
        cfg.write_text(textwrap.dedent("""
            [daemon]
            drain_timeout_s = 2.0
            [store]
            slot_bytes = 4096
            [dram]
            capacity_blocks = 256
            [nvme]
            capacity_blocks = 2048
            file_slots = 64
            [metrics]
            enabled = true
            host = "127.0.0.1"
            port = 0
            """))
        self.cfg = cfg

    def set_plan(self, plan: dict, seed: int) -> None:
        self.gen += 1
        tmp = self.plan.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(plan, gen=self.gen, seed=seed + self.gen)))
        os.replace(tmp, self.plan)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:   # the daemon applied it (its poller logs the gen)
            if any(json.loads(ln).get("plan") == self.gen for ln in self._lines()):
                return
            time.sleep(0.02)
        raise RuntimeError(f"the daemon did not apply fault plan {self.gen}")

    def _lines(self) -> list[str]:
        try:
            return [ln for ln in self.log.read_text().splitlines() if ln.strip()]
        except FileNotFoundError:
            return []

    def injected(self) -> Counter:
        out: Counter = Counter()
        for ln in self._lines():
            rec = json.loads(ln)
            if "op" in rec:
                out[(rec["op"], rec["error"])] += 1
        return out

    def start(self) -> None:
        from tierstore.client.remote import RemoteClient
        from tierstore.errors import DaemonUnreachable

        self.meta.mkdir(parents=True, exist_ok=True)
        self.plan.write_text(json.dumps({"gen": 0}))
        cmd = [sys.executable, str(ROOT / "tools" / "fault_inject.py"), "--plan", str(self.plan),
               "--log", str(self.log), "--meta-dir", str(self.meta), "--",
               "--data-dir", str(self.data), "--socket", str(self.sock), "--config", str(self.cfg),
               "--log-level", "error"]
        if self.meta_tmpfs:
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f'mount -t tmpfs -o size={META_TMPFS} tmpfs "$0" && exec "$@"', str(self.meta),
                   *cmd]
        errf = open(self.work / "daemon.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=errf, stderr=errf, env=ENV, cwd=str(ROOT))
        errf.close()
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_tail()}")
            try:
                c = RemoteClient.connect(self.sock, timeout_s=1.0)
                c.close()
                return
            except DaemonUnreachable:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not answer: {self.log_tail()}") from None
                time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            return (self.work / "daemon.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        from tierstore.daemon.server import shm_prefix

        prefix = shm_prefix(self.data)
        for name in os.listdir("/dev/shm"):
            if name.startswith(prefix):
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except OSError:
                    pass


class Tally:
    """What the clients saw (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c: Counter = Counter()
        self.unexpected: list[str] = []

    def add(self, **kw: int) -> None:
        with self.lock:
            self.c.update(kw)


def worker(sock: Path, prompts: list[list[bytes]], ns, budget: list[int], tally: Tally,
           seed: int, tid: int) -> None:
    from tierstore.client import open_client
    from tierstore.errors import TierStoreError
    from tierstore.types import BlockStatus

    rng = random.Random(seed)
    c = open_client(socket=sock)
    req_n = 0
    try:
        while True:
            with tally.lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            keys = prompts[rng.randrange(len(prompts))]
            n = rng.randint(1, len(keys))
            keys = keys[:n]
            op = rng.choices(["put", "get", "pinned", "partial", "evict", "flush", "lookup"],
                             [28, 24, 16, 10, 8, 4, 10])[0]
            try:
                if op == "put":
                    st = c.put(keys, ns, [content(k) for k in keys], wait_s=1.0)
                    tally.add(**{f"put_{s.value}": 1 for s in st})
                elif op == "get":
                    got = c.get(keys)
                    _verify(keys, got, tally)
                elif op == "pinned":
                    req_n += 1
                    req = f"t{tid}-r{req_n}"
                    r = c.lookup(keys, ns, pin=True, ttl_s=60, request=req)
                    hit = r.num_blocks
                    if hit:
                        job = c.prepare_load(keys[:hit], wait=False)
                        if not job.ready:
                            job = c.wait_load(job.job_id, 20) or job
                        got = [bytes(c.slot_view(s)[:size]) for s, size
                               in zip(job.slots, job.sizes)] if job.ready else []
                        _verify(keys, got, tally)
                        c.complete_load(job.job_id)
                    released = (c.unpin(keys[:hit], request=req) if hit and rng.random() < 0.5
                                else c.release(req))
                    if released != hit:
                        tally.add(pin_release_mismatch=1)
                    tally.add(pinned_reads=1)
                elif op == "partial":
                    job = c.prepare_store(keys, ns, SLOT)
                    oks = []
                    for k, s, st in zip(keys, job.slots, job.status):
                        if st is not BlockStatus.OK:
                            oks.append(True)
                            continue
                        good = rng.random() < 0.7
                        c.slot_view(s)[:SLOT] = content(k) if good else rng.randbytes(SLOT)
                        oks.append(good)
                    out = c.complete_store(job.job_id, oks)
                    failed = sum(s is BlockStatus.FAILED for s in out)
                    tally.add(partial_failed_blocks=failed)
                    if failed and not any(oks):
                        tally.add(worker_aborted_jobs=1)
                elif op == "evict":
                    r = c.evict(keys, tier="dram")
                    tally.add(evicted_dram=r.get("evicted", 0))
                elif op == "flush":
                    tally.add(flush_ok=int(bool(c.flush(timeout_s=2.0))), flushes=1)
                else:
                    c.lookup(keys, ns)
                tally.add(ops=1, **{f"op_{op}": 1})
            except TierStoreError as e:   # expected refusals (RetryLater, RejectedError, ...)
                tally.add(ops=1, **{f"error_{type(e).__name__}": 1})
            except Exception as e:   # noqa: BLE001 - anything else is a finding
                with tally.lock:
                    tally.unexpected.append(f"{op}: {type(e).__name__}: {e}")
                tally.add(ops=1)
    finally:
        c.close()


def _verify(keys: list[bytes], got: list[bytes], tally: Tally) -> None:
    wrong_blocks = wrong_bytes = 0
    for k, b in zip(keys, got):
        want = content(k)
        if b != want:
            wrong_blocks += 1
            wrong_bytes += sum(x != y for x, y in zip(b, want)) + abs(len(b) - len(want))
    tally.add(served_blocks=len(got), wrong_blocks=wrong_blocks, wrong_bytes=wrong_bytes)


def kill_mid_save(sock: Path, base: int) -> int:
    """A client that prepared a store and wrote half of it is killed with SIGKILL. Returns the
    slots its job held (-1: it never got that far)."""
    p = subprocess.Popen([sys.executable, "-u", "-c", KILLED_SAVER, str(sock), str(base)],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=str(ROOT))
    try:
        line = p.stdout.readline().strip()
        held = int(line.split()[1]) if line.startswith("READY") else -1
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    return held


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for ln in text.splitlines():
        m = re.match(r"^(tierstore_[a-z_]+(?:\{[^}]*\})?) (\S+)$", ln)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def run(ops: int = 10_000, *, threads: int = 2, seed: int = 1, work: Path | None = None,
        meta_tmpfs: bool | None = None, log=print) -> dict:
    """One fault-injection run; returns the summary (``summary["ok"]``: every check held)."""
    from tierstore.client import open_client
    from tierstore.keys import Namespace

    own = work is None
    work = Path(tempfile.mkdtemp(prefix="tierstore-faultrun-")) if own else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if meta_tmpfs is None:
        meta_tmpfs = can_mount_private()
    # no real full filesystem here: every LMDB commit is refused instead
    phases = [p if meta_tmpfs or p[0] != "meta_full" else ("meta_full", {"meta": 1.0})
              for p in PHASES]
    d = Daemon(work, meta_tmpfs)
    tally = Tally()
    summary: dict = {"ops_target": ops, "threads": threads, "seed": seed,
                     "metadata_full": "tmpfs" if meta_tmpfs else "injected"}
    t0 = time.monotonic()
    d.start()
    try:
        admin = open_client(socket=d.sock)
        ns = Namespace("faultrun", B)
        keyer = admin.keyer(ns)
        prompts = [keyer.chain(list(range(p * 10_000, p * 10_000 + B * BLOCKS)))
                   for p in range(PROMPTS)]
        kills = kills_holding = 0
        phase_counters = {}
        # the first (clean) phase stays short whatever --ops says: the metadata must still be
        # growing (NVMe not yet full) when its filesystem fills up in the next phase
        first = min(1000, max(1, ops // len(phases)))
        per_phase = max(1, (ops - first) // (len(phases) - 1))
        budgets = [first] + [per_phase] * (len(phases) - 2)
        budgets.append(ops - sum(budgets))
        def snapshot() -> dict:   # a barrier: every write accepted so far has ended
            admin.flush(timeout_s=30)
            return admin.stats()["counters"]

        for i, (name, plan) in enumerate(phases):
            if i == 0:
                d.set_plan(plan, seed)
                before = snapshot()
            budget = [budgets[i]]
            ws = [threading.Thread(target=worker, args=(d.sock, prompts, ns, budget, tally,
                                                        seed * 1000 + i * 10 + t, t))
                  for t in range(threads)]
            for w in ws:
                w.start()
            held = kill_mid_save(d.sock, 50_000_000 + i * 100_000)
            kills += held >= 0
            kills_holding += held > 0   # a job that holds slots is counted when aborted
            for w in ws:
                w.join()
            # the next plan (or none) is in force before the phase's counters are read
            d.set_plan(phases[i + 1][1] if i + 1 < len(phases) else {}, seed)
            after = snapshot()
            phase_counters[name] = {k: after.get(k, 0) - before.get(k, 0) for k in
                                    ("nvme_meta_errors", "nvme_io_errors", "nvme_enospc",
                                     "nvme_store_skipped", "stores_aborted")
                                    if after.get(k, 0) - before.get(k, 0)}
            before = after
            log(f"phase {name:13s} done: {json.dumps(phase_counters[name])}")
        summary["phases"] = phase_counters
        # recovery: fresh blocks written and flushed clear the tier's health; check settles
        fresh = keyer.chain(list(range(90_000_000, 90_000_000 + B * 64)))
        admin.put(fresh, ns, [content(k) for k in fresh])
        flushed = any(admin.flush(timeout_s=30) for _ in range(3))
        problems = admin.check()
        # every resident block of every prompt, byte by byte
        for keys in prompts + [fresh]:
            _verify(keys, admin.get(keys), tally)
        admin.close()
        with open_client(socket=d.sock) as c:   # every worker connection is gone now
            st = c.stats()
            problems_after = c.check()
            metrics = scrape(st["daemon"]["metrics"]) if st["daemon"].get("metrics") else {}
        injected = d.injected()
        failures = st["health"]["tiers"]["nvme"]["failures"]
        counters = st["counters"]
        seen = {f"{op}_{err}": failures.get(f"{op}_{err}", 0) for (op, err) in injected
                if op != "meta"}
        inj = {f"{op}_{err}": n for (op, err), n in sorted(injected.items())}
        meta_injected = injected.get(("meta", "meta"), 0)
        meta_real = phase_counters.get("meta_full", {}).get("nvme_meta_errors", 0) \
            if meta_tmpfs else 0
        prom_fail = {k: v for k, v in metrics.items() if k.startswith("tierstore_tier_io_failures")}
        prom_match = all(
            prom_fail.get(f'tierstore_tier_io_failures_total{{error="{name.partition("_")[2]}",'
                          f'op="{name.partition("_")[0]}",tier="nvme"}}', -1) == n
            for name, n in failures.items())
        expected_aborts = kills_holding + tally.c["worker_aborted_jobs"]
        dram = next(t for t in st["tiers"] if t["tier"] == "dram")
        checks = {
            "ops >= target": tally.c["ops"] >= ops,
            "no unexpected exceptions": not tally.unexpected,
            "0 wrong bytes served": tally.c["wrong_bytes"] == 0 and tally.c["wrong_blocks"] == 0,
            "every pinned request released exactly its pins": tally.c["pin_release_mismatch"] == 0,
            "0 pins left": st["pins"] == 0 and st["pinned_blocks"] == 0,
            "0 pending jobs": st["pending_stores"] == 0 and st["pending_loads"] == 0,
            "check clean": problems == [] and problems_after == [],
            "health ok after the faults": st["health"]["status"] == "ok",
            "flush succeeds after the faults": flushed,
            "dram slots = dram blocks": dram["used_slots"] == dram["blocks"],
            "every injected disk fault counted (tier failures by op and error)":
                all(seen[k] == n for k, n in inj.items() if not k.startswith("meta")),
            "every injected LMDB failure counted": counters.get("nvme_meta_errors", 0)
                == meta_injected + meta_real,
            "full metadata filesystem counted": phase_counters.get("meta_full", {}).get(
                "nvme_meta_errors", 0) > 0,
            "every killed client's save aborted": counters.get("stores_aborted", 0)
                == expected_aborts and kills == len(phases),
            "Prometheus equals stats": prom_match and bool(prom_fail),
        }
        summary.update({
            "operations": tally.c["ops"],
            "ops_by_kind": {k[3:]: v for k, v in sorted(tally.c.items()) if k.startswith("op_")},
            "refusals": {k[6:]: v for k, v in sorted(tally.c.items()) if k.startswith("error_")},
            "unexpected": tally.unexpected[:10],
            "blocks_served": tally.c["served_blocks"], "wrong_blocks": tally.c["wrong_blocks"],
            "wrong_bytes": tally.c["wrong_bytes"],
            "store_answers": {k[4:]: v for k, v in sorted(tally.c.items()) if k.startswith("put_")},
            "partial_store_failed_blocks": tally.c["partial_failed_blocks"],
            "faults_injected": dict(inj, clients_killed_mid_save=kills,
                                    metadata_full_commits_failed=meta_real),
            "faults_counted": dict(seen, nvme_meta_errors=counters.get("nvme_meta_errors", 0),
                                   stores_aborted=counters.get("stores_aborted", 0)),
            "tier_failures": failures,
            "counters": {k: counters.get(k, 0) for k in (
                "nvme_write_eio", "nvme_write_enospc", "nvme_write_einval", "nvme_write_meta",
                "nvme_store_skipped", "nvme_read_errors", "nvme_meta_errors", "nvme_io_errors",
                "store_skipped", "store_skipped_write_queue", "stores_aborted",
                "store_blocks_failed", "evictions_nvme", "nvme_flush_errors", "load_hits_dram",
                "load_hits_nvme", "checksum_failures", "loads_failed")},
            "after": {"pins": st["pins"], "pinned_blocks": st["pinned_blocks"],
                      "pending_stores": st["pending_stores"], "pending_loads": st["pending_loads"],
                      "blocks": st["blocks"], "check": problems_after,
                      "health": st["health"]["status"],
                      "dram_used_slots": dram["used_slots"], "dram_blocks": dram["blocks"]},
            "checks": checks, "ok": all(checks.values()),
            "seconds": round(time.monotonic() - t0, 1),
        })
        return summary
    finally:
        d.stop()
        if own:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    a = p.parse_args(argv)
    s = run(a.ops, threads=a.threads, seed=a.seed,
            log=(lambda *_: None) if a.json else (lambda m: print(m, flush=True)))
    if a.json:
        print(json.dumps(s))
    else:
        for k in ("operations", "seconds", "metadata_full", "ops_by_kind", "refusals",
                  "blocks_served", "wrong_blocks", "wrong_bytes", "store_answers",
                  "faults_injected", "faults_counted", "tier_failures", "counters", "after"):
            print(f"{k:>20}: {json.dumps(s[k])}")
        for name, ok in s["checks"].items():
            print(f"{'ok' if ok else 'FAILED':>20}: {name}")
        if s["unexpected"]:
            print("unexpected:", *s["unexpected"], sep="\n  ")
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
