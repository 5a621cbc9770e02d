"""Shared helpers of the CLI tests: run the typer app in-process, write small Mooncake traces."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tierstore_admin.app import app


class Run:
    """Outcome of one CLI invocation: exit code, stdout, stderr."""

    def __init__(self, result) -> None:
        self.code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exception = result.exception

    def json(self) -> dict:
        return json.loads(self.stdout)


@pytest.fixture
def cli():
    runner = CliRunner()

    def run(*args: str, input: str | None = None) -> Run:
        return Run(runner.invoke(app, [str(a) for a in args], input=input))

    return run


def make_trace(num_requests: int = 300, seed: int = 0, num_sessions: int = 40) -> list[dict]:
    """Multi-turn sessions over a few shared system prompts: a trace with real prefix reuse."""
    rng = random.Random(seed)
    next_id = 1000
    prompts = [list(range(p * 10, p * 10 + rng.randint(1, 6))) for p in range(5)]
    sessions: list[list[int]] = []
    out = []
    for i in range(num_requests):
        if len(sessions) < num_sessions and (not sessions or rng.random() < 0.3):
            sessions.append(list(rng.choice(prompts)))
        s = rng.choice(sessions)
        for _ in range(rng.randint(1, 3)):
            s.append(next_id)
            next_id += 1
        tokens = len(s) * 512 + rng.randint(0, 511)
        out.append({"timestamp": i, "input_length": tokens, "output_length": rng.randint(1, 500),
                    "hash_ids": list(s)})
    return out


@pytest.fixture(name="make_trace")
def make_trace_fixture():
    return make_trace


@pytest.fixture
def trace_file(tmp_path):
    p = tmp_path / "trace.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in make_trace()))
    return p


@pytest.fixture
def fast_dir(tmp_path):
    """A directory on tmpfs when there is one: NVMe-tier semantics are the same there, but its
    fsyncs cost nothing, so a replay with thousands of demotions stays fast on a busy disk."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = tempfile.mkdtemp(prefix="tierstore-test-", dir="/dev/shm")
        yield Path(d)
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path



# The real entry point (issue 14): helpers in cli_support.py, fixtures here.
sys.path.insert(0, os.path.dirname(__file__))
from cli_support import CliDaemon, SMALL_DAEMON, run_tierstore  # noqa: E402


@pytest.fixture
def ts():
    """``ts(*args, env=..., cwd=...)``: run the real `tierstore` entry point in a subprocess."""
    return run_tierstore


@pytest.fixture
def cli_daemon(fast_dir):
    """Factory: ``cli_daemon(config_text=..., name=...)`` -> a daemon started with
    `tierstore daemon start --detach` on a tmpfs data dir (fast_dir), stopped in teardown."""
    started: list[CliDaemon] = []

    def make(config_text: str = SMALL_DAEMON, name: str = "d", env: dict | None = None) -> CliDaemon:
        d = CliDaemon(fast_dir, config_text, name)
        started.append(d)
        return d.start(env=env)

    yield make
    for d in started:
        d.stop()
