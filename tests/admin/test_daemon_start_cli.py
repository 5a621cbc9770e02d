"""`tierstore daemon start` cannot hurt a user's files or brick a data dir, and fails in one line
(issue 14 items 1, 2 and 5). Every test runs the real `tierstore` entry point in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

import sys

sys.path.insert(0, os.path.dirname(__file__))
from cli_support import SMALL_DAEMON, CliDaemon, clean_env, tierstore_argv, write_config  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def _one_line_error(r, *needles: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), r
    assert "Traceback" not in r.stderr, r
    for n in needles:
        assert n in lines[-1], r


def test_socket_path_that_is_a_users_file_is_never_replaced(ts, tmp_path):
    """Found by trying it (issue 14 item 1): `--socket f.txt` turned a user's file into a
    socket. A path that is not a socket is refused (exit 2), detached or not, and the file keeps
    its bytes; nothing is created in the data dir."""
    f = tmp_path / "f.txt"
    f.write_text("precious\n")
    for extra in (["--detach"], []):
        r = ts("daemon", "start", "--data-dir", tmp_path / "d", "--socket", f, *extra)
        assert r.code == 2, r
        _one_line_error(r, "not a socket", "refusing to replace")
        assert f.read_text() == "precious\n"
    # the daemon's own check (python -m tierstore.daemon) refuses it too
    cp = subprocess.run([sys.executable, "-m", "tierstore.daemon", "--data-dir", tmp_path / "d2",
                         "--socket", f], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert cp.returncode == 2 and "not a socket" in cp.stderr, cp.stderr
    assert f.read_text() == "precious\n"
    assert not (tmp_path / "d2" / "store.json").exists()


def test_a_socket_nobody_serves_is_replaced(cli_daemon, tmp_path):
    """A crashed daemon's leftover socket (bound, nobody listening) is replaced at start."""
    d = CliDaemon(tmp_path, SMALL_DAEMON, "left")
    d.data_dir.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(d.socket))
    s.close()
    try:
        d.start()
        assert d.socket.exists()
    finally:
        d.stop()


def test_a_typo_never_reaches_store_json(ts, fast_dir, cli_daemon):
    """Found by trying it (issue 14 item 2): `[dram] policy = "nosuch"` wrote store.json before
    failing, so every later start failed, with the corrected config or none. Now the start is
    refused before anything is written, and the corrected config starts."""
    d = fast_dir / "d"
    bad = write_config(fast_dir / "bad.toml", SMALL_DAEMON.replace(
        '[dram]\n    capacity = "64blocks"', '[dram]\n    capacity = "64blocks"\n    policy = "nosuch"'))
    r = ts("daemon", "start", "--data-dir", d, "--config", bad, "--detach")
    assert r.code == 2, r
    _one_line_error(r, "nosuch")
    assert not (d / "store.json").exists()
    good = cli_daemon(name="d")          # same data dir, corrected config: starts
    assert json.loads((good.data_dir / "store.json").read_text())["dram"]["policy"] == "prefix-lhd"


@pytest.mark.slow
def test_changes_to_an_existing_data_dir_are_applied_or_refused_with_how(ts, tmp_path, cli_daemon):
    """Issue 14 item 2: a changed capacity or policy was silently ignored. DRAM capacity and
    policy and a larger NVMe tier are applied (and kept in store.json); a new slot size or a
    smaller NVMe tier are refused, with the data dir's value and what to do."""
    d = cli_daemon(name="d")
    d.stop()
    grown = SMALL_DAEMON.replace('capacity = "64blocks"', 'capacity = "96blocks"\n    policy = "lru"') \
        .replace('capacity = "512blocks"', 'capacity = "1024blocks"')
    write_config(d.config, grown)
    d.start()
    r = ts("tiers", "ls", "--socket", d.socket, "--json")
    tiers = {t["tier"]: t for t in r.json()["tiers"]}
    assert tiers["dram"]["slots"] == 96 and tiers["dram"]["policy"] == "lru"
    assert tiers["nvme"]["slots"] == 1024
    d.stop()
    stored = json.loads((d.data_dir / "store.json").read_text())
    assert stored["dram"]["capacity_blocks"] == 96 and stored["nvme"]["capacity_blocks"] == 1024
    for text, needle in ((grown.replace('slot_bytes = "64KiB"', 'slot_bytes = "128KiB"'),
                          "slot_bytes = 64.0 KiB"),
                         (grown.replace('capacity = "1024blocks"', 'capacity = "100blocks"'),
                          "1024blocks or more")):
        write_config(d.config, text)
        r = ts("daemon", "start", "--data-dir", d.data_dir, "--config", d.config, "--detach")
        assert r.code == 2, r
        _one_line_error(r, needle, "new --data-dir")
        c = ts("config", "show", "--data-dir", d.data_dir, "--config", d.config)
        assert c.code == 2 and needle in c.stderr, c
    # keys left unset never override store.json: no config at all reopens it as it is
    r = ts("daemon", "start", "--data-dir", d.data_dir, "--detach", "--json")
    assert r.code == 0, r
    d.pid = r.json()["pid"]
    r = ts("tiers", "ls", "--socket", d.socket, "--json")
    assert {t["tier"]: t["slots"] for t in r.json()["tiers"]} == {"dram": 96, "nvme": 1024}


def test_detach_failures_are_one_line(ts, tmp_path):
    """Found by trying it (issue 14 item 5): `--detach` on a data dir under /proc, or one the
    user cannot write, gave a traceback. One line, exit 2."""
    r = ts("daemon", "start", "--data-dir", "/proc/tierstore-nope/d", "--detach")
    assert r.code == 2, r
    _one_line_error(r, "/proc")
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o755)
    if os.geteuid() != 0:
        locked.chmod(0o500)
        r = ts("daemon", "start", "--data-dir", locked / "d", "--detach")
    else:   # root writes anywhere: try it as nobody
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot try an unwritable data dir")
        os.chmod(tmp_path, 0o755)
        cp = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                             *tierstore_argv(),
                             "daemon", "start", "--data-dir", str(locked), "--detach"],
                            capture_output=True, text=True, env=clean_env(), timeout=60)
        if "Permission denied" in cp.stderr and "python" in cp.stderr.lower():
            pytest.skip("nobody cannot run this venv's python")
        r = type("R", (), {"code": cp.returncode, "stdout": cp.stdout, "stderr": cp.stderr})()
    assert r.code == 2, (r.code, r.stderr)
    _one_line_error(r)
    assert "not writable" in r.stderr or "Permission denied" in r.stderr, r.stderr


def test_failed_start_reports_this_runs_log_and_leaves_no_socket(ts, tmp_path):
    """Found by trying it (issue 14 item 5): a --detach failure quoted an earlier run's log
    lines, and a start that failed on its metrics port left its socket file behind."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cfg = write_config(tmp_path / "m.toml", SMALL_DAEMON + f"""
    [metrics]
    enabled = true
    port = {port}
    """)
        d = tmp_path / "d"
        d.mkdir(mode=0o700)
        (d / "daemon.log").write_text("an earlier run: error: something stale\n")
        r = ts("daemon", "start", "--data-dir", d, "--config", cfg, "--detach")
        assert r.code == 2, r
        _one_line_error(r, f"{port}", "in use")
        assert "stale" not in r.stderr
        assert not (d / "ts.sock").exists()
    finally:
        busy.close()
