"""CLI conventions (issue 14 item 8): --version, no wrapping off a terminal, NO_COLOR, help that
offers only what works and names each environment variable once, peers errors and states, trace
errors that point at the fault, a progress bar with an ETA. Every test runs the real `tierstore`
entry point in a subprocess."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from cli_support import SMALL_DAEMON, clean_env, tierstore_argv  # noqa: E402

from tierstore import __version__  # noqa: E402

pytestmark = pytest.mark.timeout(180)
ESC = "\x1b["


def test_version(ts):
    r = ts("--version")
    assert r.code == 0 and r.stdout.strip() == f"tierstore {__version__}", r


def test_piped_output_is_never_wrapped(ts, tmp_path):
    """Found by trying it: piped output was wrapped at 80 columns ("addres/s", an error over 9
    lines). A long value stays on one line of its table row, and there is no ANSI code."""
    long_name = tmp_path / ("a-rather-long-directory-name-" * 4) / "trace.jsonl"
    long_name.parent.mkdir()
    long_name.write_text(json.dumps({"timestamp": 0, "input_length": 600, "output_length": 1,
                                     "hash_ids": [1, 2]}) + "\n")
    r = ts("replay", long_name, "--capacity", "100blocks", "--baseline", "none",
           env=clean_env(COLUMNS="60"))
    assert r.code == 0, r
    assert any(str(long_name) in line for line in r.stdout.splitlines()), r.stdout
    assert ESC not in r.stdout and ESC not in r.stderr


def _run_on_a_terminal(args, env) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal; returns (exit code, everything shown)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([*tierstore_argv(), *args], stdin=subprocess.DEVNULL, stdout=slave,
                         stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    os.close(master)
    return p.wait(30), b"".join(chunks).decode(errors="replace")


def test_no_color_means_no_ansi_attribute_at_all(tmp_path):
    """Found by trying it: NO_COLOR left bold and italic. On a terminal with NO_COLOR set, the
    tables and the help have no escape sequence; without it, they do."""
    args = ["replay", "--capacity", "100blocks", "--requests", "30", "--baseline", "none", "-q"]
    code, plain = _run_on_a_terminal(args, clean_env(NO_COLOR="1", TERM="xterm-256color"))
    assert code == 0, plain
    assert ESC not in plain and "block_hit_ratio" in plain
    code, coloured = _run_on_a_terminal(args, clean_env(TERM="xterm-256color"))
    assert code == 0 and ESC in coloured
    code, helptext = _run_on_a_terminal(["blocks", "ls", "--help"],
                                        clean_env(NO_COLOR="1", TERM="xterm-256color"))
    assert code == 0 and "--socket" in helptext and ESC not in helptext


def test_replay_progress_bar_has_an_eta(tmp_path):
    """Issue 14 item 8: the replay's progress bar (on a terminal) shows the time left."""
    code, shown = _run_on_a_terminal(["replay", "--capacity", "3M", "--requests", "3000",
                                      "--baseline", "none", "--json"],
                                     clean_env(TERM="xterm-256color"))
    assert code == 0, shown
    assert "eta" in shown and re.search(r"\d:\d\d:\d\d", shown), shown[-2000:]


def test_help_offers_only_what_works_and_names_each_env_var_once(ts):
    """`blocks pin --help` offered --data-dir, which is always refused; every option's help
    named its environment variable twice."""
    pin = ts("blocks", "pin", "--help")
    assert pin.code == 0 and "--data-dir" not in pin.stdout and "--socket" in pin.stdout
    for cmd in (["blocks", "ls"], ["flush"], ["daemon", "start"]):
        h = ts(*cmd, "--help", env=clean_env(COLUMNS="200"))
        assert h.code == 0, h
        for var in ("TIERSTORE_SOCKET", "TIERSTORE_DATA_DIR"):
            assert h.stdout.count(var) <= 1, (cmd, var, h.stdout)
        assert "Exit codes" in h.stdout and "130" in h.stdout
    # given anyway, --data-dir gets the reason, not "no such option"
    r = ts("blocks", "pin", "ab" * 32, "--ttl", "1m", "--data-dir", "/tmp")
    assert r.code == 2 and "--socket" in r.stderr and "with this command" in r.stderr, r


def test_tiers_has_ls_and_usage(ts, tmp_path, trace_file):
    """`tiers` was a noun with one verb: `tiers ls` says what each tier is (policy, slots,
    write-behind), `tiers usage` how full it is."""
    d = tmp_path / "store"
    r = ts("replay", trace_file, "--dram-capacity", "32blocks", "--nvme-capacity", "100blocks",
           "--block-bytes", "16KiB", "--data-dir", d, "--limit", "10", "--baseline", "none", "-q")
    assert r.code == 0, r
    ls = ts("tiers", "ls", "--data-dir", d, "--json")
    assert ls.code == 0, ls
    tiers = {t["tier"]: t for t in ls.json()["tiers"]}
    assert tiers["dram"]["slots"] == 32 and tiers["dram"]["policy"] == "prefix-lhd"
    assert tiers["nvme"]["write_behind"]["failed_blocks"] == 0


def test_trace_errors_point_at_the_fault(ts, tmp_path):
    """An empty trace replayed "successfully" with 0 requests; a malformed line reported column
    1 for a fault further right. Exit 2, `file:line: column N`."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    r = ts("replay", empty)
    assert r.code == 2 and "holds no request" in r.stderr, r
    r = ts("replay", "--requests", "5", "--limit", "0")
    assert r.code == 2 and "nothing to replay" in r.stderr, r
    head = '{"timestamp": 0, "input_length": 512, "output_length": 1, '
    cases = {head + '"hash_ids": [1, 2, x]}': len(head) + len('"hash_ids": [1, 2, ') + 1,
             head + '"hash_ids": [1, 2, -3]}': len(head) + 1,
             head + '"hash_ids": [1, 2]} 7': len(head) + len('"hash_ids": [1, 2]} ') + 1}
    for line, col in cases.items():
        p = tmp_path / "bad.jsonl"
        p.write_text(json.dumps({"timestamp": 0, "input_length": 1, "hash_ids": [1]}) + "\n" + line + "\n")
        r = ts("replay", p, "--capacity", "3M")
        assert r.code == 2, r
        assert f"{p}:2: column {col}:" in r.stderr, (line, col, r.stderr)
    p = tmp_path / "latin1.jsonl"
    before = head + '"hash_ids": [1], "m": "'
    p.write_bytes((before + '\xe9"}\n').encode("latin-1"))
    r = ts("replay", p, "--capacity", "3M")
    assert r.code == 2 and f"{p}:1: column {len(before) + 1}: not UTF-8" in r.stderr, r


@pytest.mark.slow
def test_peers_ping_unknown_name_and_ls_of_a_peer_that_just_started(ts, cli_daemon, tmp_path):
    """`peers ping zz` said "expected host:port" for a name that is not a peer: now "unknown
    peer" with the known names (exit 2). `peers ls` showed a peer that had just started "down"
    for retry_s; it dials down peers again, so the peer shows "up" at once."""
    import socket as so

    ports = []
    for _ in range(2):
        s = so.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()
    env = clean_env(TIERSTORE_SECRET="0123456789abcdef0123456789abcdef")
    conf = SMALL_DAEMON + """
    [peers]
    enabled = true
    node = "{me}"
    port = {port}
    peers = ["{other}=127.0.0.1:{other_port}"]
    retry_s = 60
    """
    a = cli_daemon(conf.format(me="a", port=ports[0], other="b", other_port=ports[1]), "a", env=env)
    r = ts("peers", "ping", "bb", "--socket", a.socket, "--json", env=env)
    assert r.code == 2 and "unknown peer 'bb'" in r.stderr and "did you mean b?" in r.stderr, r
    assert r.json()["error"]["kind"] == "usage"
    r = ts("peers", "ls", "--socket", a.socket, "--json", env=env)
    assert r.code == 0 and r.json()["peers"][0]["state"] == "down", r
    cli_daemon(conf.format(me="b", port=ports[1], other="a", other_port=ports[0]), "b", env=env)
    r = ts("peers", "ls", "--socket", a.socket, "--json", env=env)
    assert r.code == 0 and r.json()["peers"][0]["state"] == "up", r
