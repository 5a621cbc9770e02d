"""benchmarks/bench_lookup.py runs end to end on a small prompt (no LMCache, no git baseline)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_lookup_smoke():
    """Scenario: 64 blocks, one round; every tierstore row and the acceptance line are printed."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lookup.py"), "--tokens", "1024",
                          "--rounds", "1", "--per", "1", "--lmcache-chunks", "", "--baseline-rev", ""],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    for row in ("hash: chain(tokens)", "hash: engine keys", "first lookup: chain(tokens) + lookup",
                "repeated lookup: lookup(kept keys)", "acceptance (issue 12)"):
        assert row in out, out
