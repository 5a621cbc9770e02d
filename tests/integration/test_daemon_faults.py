"""Failures through the real daemon: visible NVMe write failures, aborted copies, clean restarts,
per-request pins, slab views after close, a small /dev/shm, refused starts (issue 13 items 10, 12,
13, 14, 15, 17, 18).

Faults are injected into the daemon process by tools/fault_inject.py (the daemon unchanged, its
disk calls wrapped per a plan file); a small /dev/shm is a tmpfs in a private mount namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from typer.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))
from daemon_support import (BLOCK_CODE, ENV, ROOT, DaemonProc, config_toml, python,  # noqa: E402
                            stop_daemon)

pytestmark = pytest.mark.timeout(180)

NS_ARGS = ("faults", 16)


def ns():
    from tierstore.keys import Namespace
    return Namespace(*NS_ARGS)


def blocks_for(keys, size=4096):
    exec(BLOCK_CODE, g := {})
    return [g["block_bytes"](int.from_bytes(k[:4], "little"), size) for k in keys]


class FaultyDaemon(DaemonProc):
    """A daemon started through tools/fault_inject.py; ``plan(...)`` changes what fails."""

    def start(self, timeout_s: float = 20.0) -> "FaultyDaemon":
        from tierstore.client.remote import RemoteClient
        from tierstore.errors import DaemonUnreachable

        self.plan_file = self.data_dir.parent / "plan.json"
        self.fault_log = self.data_dir.parent / "faults.jsonl"
        self.plan_file.write_text(json.dumps({"gen": 0}))
        self.gen = 0
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tools" / "fault_inject.py"), "--plan", str(self.plan_file),
             "--log", str(self.fault_log), "--", "--data-dir", str(self.data_dir),
             "--socket", str(self.socket), "--config", str(self.config)],
            stdout=logf, stderr=logf, env=ENV, cwd=str(ROOT))
        logf.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_text()}")
            try:
                c = RemoteClient.connect(self.socket, timeout_s=1.0)
                c.close()
                return self
            except DaemonUnreachable:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"daemon did not answer: {self.log_text()}") from None
                time.sleep(0.05)

    def plan(self, **plan) -> None:
        self.gen += 1
        tmp = self.plan_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(plan, gen=self.gen, seed=1)))
        os.replace(tmp, self.plan_file)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.fault_log.exists() and f'"plan": {self.gen}}}' in self.fault_log.read_text():
                return
            time.sleep(0.02)
        raise AssertionError("the daemon did not apply the fault plan")


def cli(*args):
    from tierstore_admin.app import app
    return CliRunner().invoke(app, list(args))


def scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=5).read().decode()


def test_nvme_writes_failing_are_visible_in_status_check_stats_and_metrics(tmp_path):
    """Issue 13 item 10, through the daemon: every NVMe write fails with EINVAL (on the flusher
    thread). Puts still answer ok (DRAM), but flush says False; ``daemon status`` says degraded
    and exits 1; ``check`` exits 1; ``stats --json`` has the health and the failures by error;
    Prometheus has tier_degraded 1 and tier_io_failures_total. After the disk heals: check exit
    0 at once, and status ok after good writes."""
    from tierstore.client import open_client

    d = FaultyDaemon(tmp_path / "data", tmp_path / "data" / "ts.sock",
                     config_toml(tmp_path / "ts.toml", slot_bytes=4096, dram_blocks=256,
                                 nvme_blocks=512, metrics=True)).start()
    try:
        d.plan(write={"einval": 1.0})
        with open_client(socket=d.socket) as c:
            keys = c.keyer(ns()).chain(list(range(16 * 8)))
            assert all(s.value == "ok" for s in c.put(keys, ns(), blocks_for(keys)))
            assert c.flush(timeout_s=30) is False
            st = c.stats()
            assert st["health"]["status"] == "degraded"
            assert st["health"]["tiers"]["nvme"]["failures"] == {"write_einval": 8}
            assert st["counters"]["nvme_write_einval"] == 8
            text = scrape(st["daemon"]["metrics"])
            assert 'tierstore_tier_degraded{tier="nvme"} 1.0' in text
            assert ('tierstore_tier_io_failures_total{error="einval",op="write",tier="nvme"} 8.0'
                    in text)
            assert c.get(keys) == blocks_for(keys)            # still served, from DRAM
        r = cli("daemon", "status", "--socket", str(d.socket), "--json")
        assert r.exit_code == 1, r.output
        assert json.loads(r.stdout)["health"].startswith("degraded: nvme: ")
        r = cli("daemon", "status", "--socket", str(d.socket))
        assert r.exit_code == 1 and "degraded" in r.stdout
        r = cli("check", "--socket", str(d.socket), "--json")
        assert r.exit_code == 1 and "nvme: failing" in r.stdout, r.output
        r = cli("stats", "--socket", str(d.socket))
        assert r.exit_code == 0 and "degraded" in r.stdout

        d.plan()                                              # the disk heals
        r = cli("check", "--socket", str(d.socket))
        assert r.exit_code == 0, r.output                     # its probe write works
        with open_client(socket=d.socket) as c:
            for i in range(1, 6):
                more = c.keyer(ns()).chain(list(range(i * 1000, i * 1000 + 16 * 8)))
                c.put(more, ns(), blocks_for(more))
                assert c.flush(timeout_s=30)
        r = cli("daemon", "status", "--socket", str(d.socket), "--json")
        assert r.exit_code == 0 and json.loads(r.stdout)["health"] == "ok", r.output
    finally:
        d.kill()


def test_a_remote_put_whose_copy_fails_is_aborted(tmp_path):
    """Issue 13 item 12, daemon path: RemoteClient.put whose copy into the shared slab raises
    aborts its job: nothing pending, the keys are not PRESENT to the next store, lookups miss,
    check is clean."""
    from tierstore.client import open_client
    from tierstore.types import BlockStatus

    d = DaemonProc(tmp_path / "data", tmp_path / "data" / "ts.sock",
                   config_toml(tmp_path / "ts.toml", slot_bytes=4096, dram_blocks=64)).start()
    try:
        with open_client(socket=d.socket) as c:
            keys = c.keyer(ns()).chain(list(range(16 * 4)))
            data = blocks_for(keys)
            data[1] = data[1][:10]                            # the copy of block 1 raises
            with pytest.raises(ValueError):
                c.put(keys, ns(), data)
            st = c.stats()
            assert st["pending_stores"] == 0 and st["counters"]["stores_aborted"] == 1
            assert c.lookup(keys, ns()).num_blocks == 0
            job = c.prepare_store(keys, ns(), 4096)
            assert job.status == [BlockStatus.OK] * 4
            c.complete_store(job.job_id, ok=False)
            assert c.check() == []
    finally:
        d.kill()


WRITER = BLOCK_CODE + """
import sys
from tierstore.client import open_client
from tierstore.keys import Namespace
c = open_client(socket=sys.argv[1])
ns = Namespace("faults", 16)
n = int(sys.argv[2])
keys = c.keyer(ns).chain(list(range(16 * n)))
stored = 0
for b in range(0, n, 32):
    st = c.put(keys[b:b + 32], ns, [block_bytes(i, 4096) for i in range(b, min(b + 32, n))])
    stored += sum(s.value == "ok" for s in st)
print(stored, flush=True)
"""


def test_every_stored_block_survives_a_clean_stop(tmp_path):
    """Issue 13 item 13: 2,078 blocks stored through the daemon (DRAM holds 256, so most live
    only on NVMe; no flush asked for), a clean stop (SHUTDOWN: drain, then the store closes and
    writes what waits for NVMe), a restart: all 2,078 are back, byte-exact, check clean. A second
    round stops while another client still holds pins and an unfinished store job."""
    from tierstore.client import open_client

    n = 2078
    cfg = config_toml(tmp_path / "ts.toml", slot_bytes=4096, dram_blocks=256, nvme_blocks=4096)
    d = DaemonProc(tmp_path / "data", tmp_path / "data" / "ts.sock", cfg).start()
    try:
        r = python(WRITER, str(d.socket), str(n), timeout_s=120)
        assert r.returncode == 0 and int(r.stdout) == n, r.stderr
        holder = open_client(socket=d.socket)
        keys = holder.keyer(ns()).chain(list(range(16 * (n + 8))))
        assert holder.lookup(keys[:n], ns(), pin=True).num_blocks == n
        job = holder.prepare_store(keys[n:], ns(), 4096)      # never completed
        r = cli("daemon", "stop", "--socket", str(d.socket))
        assert r.exit_code == 0, r.output
        holder.close()
        d.proc.wait(30)
        d = DaemonProc(d.data_dir, d.socket, cfg).start()
        with open_client(socket=d.socket) as c:
            assert c.lookup(keys, ns()).num_blocks == n
            exec(BLOCK_CODE, g := {})
            for b in range(0, n, 256):
                assert c.get(keys[b:min(b + 256, n)]) == [g["block_bytes"](i, 4096)
                                                          for i in range(b, min(b + 256, n))]
            assert c.stats()["counters"]["nvme_recovered"] == n
            assert c.check() == []
        assert job.job_id > 0
    finally:
        d.kill()


def test_requests_on_one_connection_keep_their_own_pins(tmp_path):
    """Issue 13 item 14, as reported: requests A and B on one connection pin a shared prefix;
    A's lease runs out; releasing A (unpin of its keys: all or nothing now, or RELEASE) leaves
    B's pins whole (it used to leave B with 0); a foreign request cannot release them; the
    connection's close releases B."""
    from tierstore.client import open_client
    from tierstore.errors import PinError

    d = DaemonProc(tmp_path / "data", tmp_path / "data" / "ts.sock",
                   config_toml(tmp_path / "ts.toml", slot_bytes=4096, dram_blocks=64)).start()
    try:
        c = open_client(socket=d.socket)
        keys = c.keyer(ns()).chain(list(range(16 * 4)))
        c.put(keys, ns(), blocks_for(keys))
        assert c.lookup(keys, ns(), pin=True, ttl_s=0.3, request="A").num_blocks == 4
        assert c.lookup(keys[:3], ns(), pin=True, ttl_s=60, request="B").num_blocks == 3
        time.sleep(0.5)                                        # A's lease runs out
        with pytest.raises(PinError):
            c.unpin(keys, request="A")
        assert c.release("A") == 0
        with pytest.raises(PinError):
            c.unpin(keys[:3])                                  # the connection's own: none
        assert [c.block(k)["pins"] for k in keys] == [1, 1, 1, 0]
        owners = {o["owner"] for o in c.block(keys[0])["pin_owners"]}
        assert owners == {f"{c.owner}/req:B"}
        with open_client(socket=d.socket) as other:
            assert other.release("B") == 0                     # another connection's B
            with pytest.raises(PinError):
                other.unpin(keys[:3], request="B")
        assert c.unpin(keys[:2], request="B") == 2
        assert c.stats()["pins"] == 1
        c.close()                                              # B's last pin goes with it
        with open_client(socket=d.socket) as c2:
            deadline = time.monotonic() + 10
            while c2.stats()["pins"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c2.stats()["pins"] == 0 and c2.check() == []
    finally:
        d.kill()


VIEW_AFTER_CLOSE = """
import sys, torch
from tierstore.client import open_client
c = open_client(socket=sys.argv[1])
t = torch.frombuffer(c.slab()[0], dtype=torch.uint8)
v = c.slot_view(2)
c.close()
t[0] = 7
v[1] = 9
print(int(t[0]), v[1])
"""


def test_a_slab_view_used_after_close_does_not_kill_the_client(tmp_path):
    """Issue 13 item 15: ``t = torch.frombuffer(c.slab()[0]); c.close(); t[0]`` was SIGSEGV;
    the views keep the mapping alive now."""
    pytest.importorskip("torch")
    d = DaemonProc(tmp_path / "data", tmp_path / "data" / "ts.sock",
                   config_toml(tmp_path / "ts.toml", slot_bytes=4096, dram_blocks=16)).start()
    try:
        r = python(VIEW_AFTER_CLOSE, str(d.socket), timeout_s=120)
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
        assert r.stdout.split() == ["7", "9"]
    finally:
        d.kill()


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare (a private /dev/shm)")
def test_small_dev_shm_refuses_the_start_and_leaks_nothing(tmp_path):
    """Issue 13 items 17 and 18: /dev/shm of 64 MiB (a container's default), [dram] capacity
    256 MiB: the start is refused (exit 2) with a message naming /dev/shm (it started, and the
    first client died of SIGBUS); three refused starts leave nothing in /dev/shm (3 x 64 MiB
    were left). With room, the same daemon starts."""
    cfg = tmp_path / "ts.toml"
    cfg.write_text('[store]\nslot_bytes = "1MiB"\n[dram]\ncapacity = "256MiB"\n')
    small = tmp_path / "small.toml"
    small.write_text('[store]\nslot_bytes = "1MiB"\n[dram]\ncapacity = "16MiB"\n')
    script = textwrap.dedent(f"""
        mount -t tmpfs -o size=64m tmpfs /dev/shm || exit 99
        for i in 1 2 3; do
            "$0" -m tierstore.daemon --data-dir {tmp_path}/data --socket {tmp_path}/ts.sock \\
                --config {cfg} 2>>{tmp_path}/err.txt
            echo "rc=$?"
        done
        echo "left=$(ls -A /dev/shm | wc -l)"
        "$0" -m tierstore.daemon --data-dir {tmp_path}/data2 --socket {tmp_path}/ts2.sock \\
            --config {small} 2>>{tmp_path}/err2.txt &
        pid=$!
        for i in $(seq 100); do [ -S {tmp_path}/ts2.sock ] && break; sleep 0.1; done
        echo "running=$(ls -A /dev/shm | wc -l)"
        kill -TERM $pid; wait $pid; echo "stopped=$?"
        echo "after=$(ls -A /dev/shm | wc -l)"
        """)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                        sys.executable], capture_output=True, text=True, timeout=120, env=ENV,
                       cwd=str(ROOT))
    out = r.stdout.split()
    assert out[:3] == ["rc=2"] * 3, (r.stdout, r.stderr)
    assert "left=0" in out and "running=1" in out and "stopped=0" in out and "after=0" in out, out
    err = (tmp_path / "err.txt").read_text()
    assert err.count("/dev/shm") >= 3 and "256.0 MiB" in err and "64.0 MiB" in err, err
    assert "Traceback" not in err


def test_refused_starts_after_the_slab_exists_leave_no_slab(tmp_path):
    """Issue 13 item 18 (the kind): starts refused after the DRAM slab was created — the NVMe
    metadata is not ours (FormatError inside Store.open), the socket is served by another daemon
    — leave no slab of their own in /dev/shm, three times over."""
    from tierstore.daemon.server import shm_prefix

    data = tmp_path / "data"
    cfg = config_toml(tmp_path / "ts.toml", slot_bytes=4096, dram_blocks=64, nvme_blocks=64)
    meta = data / "nvme" / "meta"
    meta.mkdir(parents=True)
    import lmdb
    env = lmdb.open(str(meta))
    with env.begin(write=True) as t:
        t.put(b"someone", b"else's")
    env.close()
    prefix = shm_prefix(data)
    try:
        for _ in range(3):
            r = python(f"""
                import sys
                from tierstore.daemon.__main__ import main
                sys.exit(main(["--data-dir", {str(data)!r}, "--socket", {str(tmp_path / 'a.sock')!r},
                               "--config", {str(cfg)!r}]))""", timeout_s=60)
            assert r.returncode == 1 and "not a tierstore NVMe metadata env" in r.stderr, r.stderr
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]

        live = DaemonProc(tmp_path / "live", tmp_path / "b.sock",
                          config_toml(tmp_path / "live.toml", slot_bytes=4096, dram_blocks=16)).start()
        try:
            other = tmp_path / "other"
            for _ in range(3):
                r = python(f"""
                    import sys
                    from tierstore.daemon.__main__ import main
                    sys.exit(main(["--data-dir", {str(other)!r}, "--socket", {str(tmp_path / 'b.sock')!r},
                                   "--config", {str(cfg)!r}]))""", timeout_s=60)
                assert r.returncode == 2 and "served by another running daemon" in r.stderr, r.stderr
            assert not [n for n in os.listdir("/dev/shm") if n.startswith(shm_prefix(other))]
        finally:
            live.kill()
    finally:   # a failing run (the old code) must not leave its slabs behind
        stop_daemon(None, data)
        stop_daemon(None, tmp_path / "other")


def test_a_daemon_that_drops_the_connection_during_the_hello_is_unreachable(tmp_path):
    """Found by the full suite under load (a --detach start whose daemon failed on its metrics
    port after binding its socket): the CLI's wait loop got a ConnectionResetError traceback
    instead of the daemon's own error. A connection closed or reset before the hello's reply
    is DaemonUnreachable, the error callers already handle."""
    import socket as _socket
    import struct
    import threading

    from tierstore.client.remote import RemoteClient
    from tierstore.errors import DaemonUnreachable

    path = str(tmp_path / "s.sock")
    srv = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)

    def serve():
        for reset in (False, True):
            conn, _ = srv.accept()
            conn.recv(64)
            if reset:   # RST instead of FIN: linger 0
                conn.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        for _ in range(2):
            with pytest.raises(DaemonUnreachable, match="closed the connection"):
                RemoteClient.connect(path, timeout_s=2.0)
    finally:
        t.join(5)
        srv.close()
