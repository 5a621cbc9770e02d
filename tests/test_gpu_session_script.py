"""The GPU device session's one script, run here on the CPU device (issue 5).

A device session has 15 minutes in all, so ``benchmarks/gpu_session.sh`` must work the first time
there. This runs it as that session would, with two differences: ``BENCH_DEVICE=cpu`` (shrunken
shapes) and a small ``--blocks``. lmdb, zstandard and xxhash are made unimportable, as on the GPU
machine, so a new import of one of them on the benchmark's or tests/gpu's path fails here first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Each run of the script takes 10-35 s on 2 cores: out of the README's quick command, in CI's.
pytestmark = pytest.mark.slow
ABSENT_THERE = ("lmdb", "zstandard", "xxhash")


def run_script(tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    hide = tmp_path / "absent"
    hide.mkdir()
    for mod in ABSENT_THERE:
        (hide / f"{mod}.py").write_text(
            f"raise ImportError('{mod} is not installed on the GPU machine')\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(hide), "PYTHON": sys.executable,
           "BENCH_DEVICE": "cpu", "BENCH_ARGS": "--blocks 24 --iters 1 --chunks 8,24",
           **env_extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], env=env,
                          capture_output=True, text=True, timeout=300)


def test_gpu_session_script_runs_without_lmdb_zstandard_xxhash(tmp_path):
    p = run_script(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    assert "torch" in (out / "env.txt").read_text()
    data = json.loads((out / "bench_copy.json").read_text())
    rows = data["rows"]
    # every shape x layout x slot kind x chunk, both directions, bytes checked
    seen = {(r["shape"], r["layout"], r["slots"], r["chunk"], r["dir"]) for r in rows}
    assert len(seen) == len(rows) == 5 * 2 * 2 * 2
    assert all(r["bytes_ok"] and r["hot_allocs"] == 0 and r["blocks"] == 24 for r in rows)
    assert {r["dir"] for r in rows} == {"offload", "onload"}
    tests_txt = (out / "gpu_tests.txt").read_text()
    # collected (imports fine without the three modules) and skipped without CUDA
    assert "skipped" in tests_txt and "error" not in tests_txt.lower(), tests_txt


def test_gpu_session_script_fails_when_the_benchmark_fails(tmp_path):
    """A benchmark that dies (here: a bad argument) makes the script exit non-zero."""
    p = run_script(tmp_path, BENCH_ARGS="--chunks eight")
    assert p.returncode != 0
    assert "bench_copy exit status" in p.stdout


def test_gpu_session_script_refuses_to_pass_without_cuda(tmp_path):
    """On the GPU machine an all-skipped run must not look green: without CUDA and without
    BENCH_DEVICE=cpu the script exits 3 before running anything."""
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has CUDA")
    p = run_script(tmp_path, BENCH_DEVICE="auto")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "not a GPU run" in p.stderr
    assert not (tmp_path / "out" / "bench_copy.json").exists()
