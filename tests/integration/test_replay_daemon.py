"""``tierstore replay --socket`` gives the same hit accounting through the daemon as in-process."""

import json
import os
import sys

import pytest
from typer.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))
from daemon_support import DaemonProc, config_toml  # noqa: E402

from tierstore.policy import DEFAULT_EVICTION  # noqa: E402
from tierstore_admin.app import app  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _replay(args):
    r = CliRunner().invoke(app, ["replay", "--requests", "400", "--quiet", "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_replay_through_daemon_matches_in_process(tmp_path):
    """Same trace, same capacity (256 blocks), same (default) policy: the same block_hit_ratio."""
    cfg = config_toml(tmp_path / "ts.toml", slot_bytes=4096, dram_blocks=256)
    d = DaemonProc(tmp_path / "d", tmp_path / "d" / "ts.sock", cfg).start()
    try:
        remote = _replay(["--socket", str(d.socket)])
        local = _replay(["--capacity", "256blocks"])
        assert remote["block_hit_ratio"] == local["block_hit_ratio"]
        assert remote["hit_blocks"] == local["hit_blocks"] > 0
        assert remote["capacity_blocks"]["dram"] == 256
        assert remote["policy"] == local["policy"] == DEFAULT_EVICTION
        assert remote["payload"] == "bytes" and remote["verify_failures"] == 0
        assert remote["verified_blocks"] > 0
        # flags that cannot apply to a running daemon are refused with exit 2
        r = CliRunner().invoke(app, ["replay", "--socket", str(d.socket), "--capacity", "1M"])
        assert r.exit_code == 2 and "daemon" in r.output
        # payload none through a daemon would publish unwritten slots (adversarial finding)
        r = CliRunner().invoke(app, ["replay", "--socket", str(d.socket), "--payload", "none"])
        assert r.exit_code == 2 and "never written" in r.output
    finally:
        d.kill()
    r = CliRunner().invoke(app, ["replay", "--socket", str(d.socket), "--quiet"])
    assert r.exit_code == 3
