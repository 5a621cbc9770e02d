"""Fixtures for the vLLM connector tests: a tiny random-weight Llama made locally (no hub) and a
helper that runs one vLLM engine in a fresh process (tests/plugins/vllm_e2e_runner.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("vllm_e2e_runner.py")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    pytest.importorskip("vllm")
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([sys.executable, str(RUNNER), "make-model", str(d)], check=True,
                   capture_output=True, timeout=300)
    return str(d)
