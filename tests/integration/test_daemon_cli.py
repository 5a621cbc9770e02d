"""`tierstore daemon start --detach` / stats / `daemon stop` / exit 3 afterwards (issue 3,
fourth acceptance bullet). Runs through the CLI entry point once `daemon` is wired into
tierstore_admin.app, else through the `daemon_app` sub-app itself."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
from typer.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))
from daemon_support import config_toml  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _cli():
    """(app, prefix) of the real CLI."""
    from tierstore_admin.app import app
    return app, ["daemon"]


def _stats_cmd(app, sock):
    return ["stats", "--socket", str(sock), "--json"]


def test_start_detach_stats_stop_then_unreachable(tmp_path):
    """start --detach returns once the socket answers (pid file written); stats prints JSON;
    a second daemon on the same data dir is refused; stop exits 0 and cleans up (socket, pid
    file, shared memory); afterwards stats/status exit 3."""
    app, pre = _cli()
    runner = CliRunner()
    data, sock = tmp_path / "d", tmp_path / "d" / "ts.sock"
    cfg = config_toml(tmp_path / "ts.toml", slot_bytes=4096, dram_blocks=64)
    pid = None
    try:
        r = runner.invoke(app, pre + ["start", "--data-dir", str(data), "--socket", str(sock),
                                      "--config", str(cfg), "--detach", "--json"])
        assert r.exit_code == 0, r.output
        started = json.loads(r.stdout)
        pid = started["pid"]
        assert (data / "daemon.pid").read_text().strip() == str(pid)
        assert oct(os.stat(sock).st_mode & 0o777) == oct(0o600)
        assert oct(os.stat(data).st_mode & 0o777) == oct(0o700)

        r = runner.invoke(app, _stats_cmd(app, sock))
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert "tiers" in out

        r = runner.invoke(app, pre + ["start", "--data-dir", str(data), "--socket",
                                      str(tmp_path / "other.sock"), "--config", str(cfg), "--detach"])
        assert r.exit_code == 2
        assert "in use" in r.output

        from tierstore.client import open_client
        with open_client(socket=sock) as c:
            shm = c.info["shm_name"]
        r = runner.invoke(app, pre + ["stop", "--socket", str(sock)])
        assert r.exit_code == 0, r.output
        assert not sock.exists() and not (data / "daemon.pid").exists()
        assert not os.path.exists("/dev/shm/" + shm)

        r = runner.invoke(app, _stats_cmd(app, sock))
        assert r.exit_code == 3, r.output
        r = runner.invoke(app, pre + ["status", "--socket", str(sock)])
        assert r.exit_code == 3
        r = runner.invoke(app, pre + ["stop", "--socket", str(sock)])
        assert r.exit_code == 3
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_sigterm_drains_an_in_flight_store_then_exits_cleanly(tmp_path):
    """SIGTERM while a client holds an unfinished store job: the daemon refuses new prepares
    (RetryLater), lets the job complete, then exits 0 and leaves a reopenable data dir."""
    from daemon_support import DaemonProc

    from tierstore.client import Client, open_client
    from tierstore.errors import DaemonUnreachable, RetryLater
    from tierstore.keys import Namespace

    cfg = config_toml(tmp_path / "ts.toml", slot_bytes=4096, dram_blocks=64, drain_timeout_s=10)
    d = DaemonProc(tmp_path / "d", tmp_path / "d" / "ts.sock", cfg).start()
    try:
        c = open_client(socket=d.socket)
        ns = Namespace("drain", 16)
        keys = c.keyer(ns).chain(list(range(16 * 4)))
        job = c.prepare_store(keys, ns, 4096)
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert d.alive()                                  # draining: waits for our job
        with pytest.raises(RetryLater) as ei:
            c.prepare_store(keys, ns, 4096)
        assert ei.value.after_s == 1.0                    # the daemon's hint, carried on the wire
        for s in job.slots:
            c.slot_view(s)[:] = b"x" * 4096
        c.complete_store(job.job_id)
        assert d.proc.wait(15) == 0
        with pytest.raises(DaemonUnreachable):
            c.stats()
        c.close()
        with Client.embedded(d.data_dir, create=False) as e:   # lock released, dir reopenable
            assert e.check() == []
    finally:
        d.kill()
