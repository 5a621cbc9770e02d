"""One exit-code table for every command, JSON errors, Ctrl-C, idempotent stop (issue 14 item
7), and the CLI half of issue 12: `tierstore flush` and `tierstore blocks evict --tier dram`.
Every test runs the real `tierstore` entry point in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from cli_support import clean_env, tierstore_argv  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def _fill(ts, d, n: int = 40):
    """Store blocks through the daemon (the replay writes and verifies real bytes)."""
    r = ts("replay", "--socket", d.socket, "--requests", n, "-q", "--json")
    assert r.code == 0, r
    return r.json()


def _keys(ts, d, *args) -> list[str]:
    r = ts("blocks", "ls", "--socket", d.socket, "--limit", "0", "--json", *args)
    assert r.code == 0, r
    return [b["key"] for b in r.json()["blocks"]]


def test_flush_then_evict_dram_copies_leaves_nvme_only(ts, cli_daemon):
    """Issue 12 (CLI): `tierstore flush` returns 0 once every stored block has its NVMe copy;
    `blocks evict --all --tier dram` then drops every DRAM copy (exit 0) and NVMe still holds
    every block, which loads back byte-exact (the replay verifies every loaded block)."""
    d = cli_daemon()
    _fill(ts, d)
    f = ts("flush", "--socket", d.socket, "--json")
    assert f.code == 0, f
    assert f.json()["done"] and f.json()["write_behind"]["queued_blocks"] == 0
    everything = _keys(ts, d)
    in_dram = _keys(ts, d, "--tier", "dram")
    assert in_dram
    e = ts("blocks", "evict", "--all", "--tier", "dram", "--yes", "--socket", d.socket, "--json")
    assert e.code == 0 and e.json()["evicted"] == len(in_dram), e
    assert _keys(ts, d, "--tier", "dram") == []
    assert sorted(_keys(ts, d, "--tier", "nvme")) == sorted(everything)
    again = _fill(ts, d)                      # the same requests: hits come from NVMe, verified
    assert again["verify_failures"] == 0 and again["hits"]["nvme"] > 0


def test_exit_codes_on_a_data_dir(ts, fast_dir, trace_file):
    """Issue 14 item 7 (quick form, in-process on a data dir): `blocks evict` of a missing block
    exits 1 like `blocks show` of one; `--tier dram` of a block that is only on NVMe is not
    evicted (exit 1); with --json every outcome, errors included, is one JSON object on stdout."""
    d = fast_dir / "store"
    r = ts("replay", trace_file, "--dram-capacity", "16blocks", "--nvme-capacity", "200blocks",
           "--block-bytes", "16KiB", "--data-dir", d, "--limit", "10", "--json", "--baseline", "none")
    assert r.code == 0, r
    missing = "ab" * 32
    for args in (["blocks", "evict", missing, "--yes"], ["blocks", "show", missing]):
        r = ts(*args, "--data-dir", d, "--json")
        assert r.code == 1, (args, r)
        json.loads(r.stdout)
    key = ts("blocks", "ls", "--data-dir", d, "--limit", "1", "--json").json()["blocks"][0]["key"]
    r = ts("blocks", "evict", key, "--tier", "dram", "--yes", "--data-dir", d, "--json")
    assert r.code == 1 and r.json()["not_in_tier"] == 1, r   # reopened: DRAM starts empty
    r = ts("blocks", "show", "zz", "--data-dir", d, "--json")
    assert r.code == 2 and r.json() == {"error": {"code": 2, "kind": "usage",
                                                  "message": "not a hex key: 'zz'"}}, r
    r = ts("blocks", "show", "--data-dir", d, "--json")      # a click usage error
    assert r.code == 2 and r.json()["error"]["kind"] == "usage", r


@pytest.mark.slow
def test_exit_codes_agree_across_commands(ts, cli_daemon):
    """Issue 14 item 7: a block that is missing, pinned or not in the tier makes `blocks evict`
    exit 1, like `blocks show` of a missing key and `unpin` of an unpinned block; --json errors
    are one JSON object on stdout."""
    d = cli_daemon()
    _fill(ts, d, 20)
    key = _keys(ts, d)[0]
    missing = "ab" * 32
    for args in (["blocks", "evict", missing, "--yes"], ["blocks", "show", missing],
                 ["blocks", "unpin", key]):
        r = ts(*args, "--socket", d.socket, "--json")
        assert r.code == 1, (args, r)
        json.loads(r.stdout)                   # a result or an error object: JSON either way
    pin = ts("blocks", "pin", key, "--ttl", "5m", "--session", "t", "--socket", d.socket, "--json")
    assert pin.code == 0, pin
    r = ts("blocks", "evict", key, "--yes", "--socket", d.socket, "--json")
    assert r.code == 1 and r.json()["pinned"] == 1, r
    ts("blocks", "unpin", key, "--session", "t", "--socket", d.socket)
    r = ts("blocks", "evict", key, "--yes", "--socket", d.socket, "--json")
    assert r.code == 0 and r.json()["evicted"] == 1, r
    r = ts("blocks", "show", "zz", "--socket", d.socket, "--json")
    assert r.code == 2 and r.json() == {"error": {"code": 2, "kind": "usage",
                                                  "message": "not a hex key: 'zz'"}}, r
    r = ts("blocks", "show", "--socket", d.socket, "--json")     # a click usage error
    assert r.code == 2 and r.json()["error"]["kind"] == "usage", r


def test_stop_status_for_scripts(ts, cli_daemon):
    """Issue 14 item 7: `daemon status --json` of a stopped daemon prints {"running": false}
    (exit 3); `daemon stop` of a stopped daemon exits 3, `--if-running` makes it 0."""
    d = cli_daemon()
    r = ts("daemon", "status", "--socket", d.socket, "--json")
    assert r.code == 0 and r.json()["running"] is True and r.json()["policies"], r
    assert ts("daemon", "stop", "--socket", d.socket).code == 0
    r = ts("daemon", "status", "--socket", d.socket, "--json")
    assert r.code == 3 and r.json()["running"] is False, r
    r = ts("daemon", "stop", "--socket", d.socket, "--json")
    assert r.code == 3 and r.json()["error"]["kind"] == "unreachable", r
    r = ts("daemon", "stop", "--socket", d.socket, "--if-running", "--json")
    assert r.code == 0 and r.json()["running"] is False, r


def test_ctrl_c_exits_130(tmp_path):
    """Issue 14 item 7: Ctrl-C exited 0. SIGINT in the middle of a replay: exit 130, one line
    ("interrupted"), with --json also the error object; the replay's temp dir is removed."""
    p = subprocess.Popen([*tierstore_argv(), "replay", "-q", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=clean_env(TMPDIR=str(tmp_path)))
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob("tierstore-replay-*")) and time.monotonic() < deadline:
        time.sleep(0.05)                       # the replay has started its stores
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "error: interrupted", err
    assert json.loads(out)["error"]["kind"] == "interrupted"
    assert not list(tmp_path.glob("tierstore-replay-*"))


@pytest.mark.slow
def test_check_fix_that_fixed_everything_exits_0(ts, tmp_path, trace_file):
    """Issue 14 item 7: `check --fix` exited 1 after fixing everything ("0 remaining"). (The quick
    in-process form: test_datadir_cli.test_check_clean_then_corrupt_record_then_fix.)"""
    d = tmp_path / "store"
    r = ts("replay", trace_file, "--dram-capacity", "16blocks", "--nvme-capacity", "200blocks",
           "--block-bytes", "16KiB", "--data-dir", d, "--limit", "20", "--json", "--baseline", "none")
    assert r.code == 0, r
    (d / "nvme" / "slabs" / "stray.dat").write_bytes(b"x" * 100)   # an unknown file: a problem
    found = ts("check", "--data-dir", d, "--json")
    fixed = ts("check", "--data-dir", d, "--fix", "--json")
    if found.code == 0:
        pytest.skip("this NVMe tier does not report stray files")
    assert found.code == 1 and found.json()["problems"], found
    assert fixed.code == 0 and fixed.json()["remaining"] == [], fixed
    assert ts("check", "--data-dir", d).code == 0
