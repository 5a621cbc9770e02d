"""The fault-injection run through the daemon (issue 13 acceptance): tools/fault_run.py.

10,000 operations against a real daemon whose NVMe writes fail with EIO, ENOSPC and EINVAL,
whose reads, fsyncs and header writes fail, whose metadata filesystem fills up (a real tmpfs when
this runs as root, else LMDB commits refused) and whose LMDB commits fail, while a client is
killed in the middle of a save in every phase. ``python tools/fault_run.py`` runs the long
version (100,000 operations) and prints the same summary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import fault_run  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def test_fault_injection_run_through_the_daemon(tmp_path):
    """Issue 13 acceptance, fault-injection run: at least 10,000 operations through the daemon
    with every fault kind on in turn (EIO, ENOSPC, EINVAL on writes, read/fsync/header-write
    EIO, a full metadata filesystem, failing LMDB commits, a client killed mid-save per phase):
    0 wrong bytes served, 0 pins or pending jobs left, check clean, the tier healthy again, every
    injected fault in a counter (tier failures by op and error equal the injected counts, LMDB
    failures equal nvme_meta_errors, killed saves equal stores_aborted) and Prometheus equals
    stats."""
    s = fault_run.run(10_000, threads=2, seed=7, work=tmp_path / "run", log=lambda m: None)
    failed = [name for name, ok in s["checks"].items() if not ok]
    assert not failed, json.dumps({k: s[k] for k in ("checks", "unexpected", "faults_injected",
                                                     "faults_counted", "after")}, indent=1)
    assert s["operations"] >= 10_000 and s["wrong_bytes"] == 0
    inj = s["faults_injected"]
    for kind in ("write_eio", "write_enospc", "write_einval", "read_eio", "meta_meta"):
        assert inj.get(kind, 0) > 0, inj                  # every kind was really exercised
    assert inj["clients_killed_mid_save"] == 8
    assert s["counters"]["load_hits_nvme"] > 0             # reads came from NVMe too


def test_fault_run_script_prints_the_summary(tmp_path):
    """The long version's script runs end to end (here with few operations) and prints one JSON
    summary whose checks all hold."""
    import subprocess

    r = subprocess.run([sys.executable, str(ROOT / "tools" / "fault_run.py"), "--ops", "1200",
                        "--json"], capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["ok"] and s["operations"] >= 1200
