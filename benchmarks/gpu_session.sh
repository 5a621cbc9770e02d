#!/usr/bin/env bash
# The one script a GPU device session runs (issue 5; see benchmarks/GPU.md).
#
#   bash benchmarks/gpu_session.sh          # on the GPU machine, from the repository root
#
# Writes under $OUT (default: ./gpu-out): env.txt, bench_copy.txt/.json, gpu_tests.txt.
# Order: the benchmark first (the number the issue asks for), then tests/gpu. Each step has its
# own timeout so one hang cannot eat the whole device budget. Exit status: 3 when CUDA is not
# available (unless BENCH_DEVICE=cpu), 1 when the benchmark found wrong bytes or hot-path
# allocations or a GPU test failed, else 0.
#
# BENCH_DEVICE=cpu runs the same steps on the CPU device (tests/test_gpu_session_script.py does,
# so the script the device session depends on is exercised in CI).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
rc=0

{
    date -u '+%Y-%m-%d %H:%M:%S UTC'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null \
        || echo "nvidia-smi: not available"
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
          "available", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/env.txt"

# On the GPU machine a run without CUDA would skip every GPU test and exit 0: refuse instead.
if [ "${BENCH_DEVICE:-auto}" != cpu ] \
        && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "# CUDA is not available: this is not a GPU run (BENCH_DEVICE=cpu runs the CPU smoke test)" \
        | tee -a "$OUT/env.txt" >&2
    exit 3
fi

timeout "${BENCH_TIMEOUT_S:-240}" "$PY" benchmarks/bench_copy.py --device "${BENCH_DEVICE:-auto}" \
    --json "$OUT/bench_copy.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_copy.txt"
bench_rc=${PIPESTATUS[0]}
echo "# bench_copy exit status $bench_rc"
[ "$bench_rc" -eq 0 ] || rc=1

if "$PY" -c 'import pytest' 2>/dev/null; then
    timeout "${TESTS_TIMEOUT_S:-200}" "$PY" -m pytest tests/gpu -q -m gpu -p no:cacheprovider \
        2>&1 | tee "$OUT/gpu_tests.txt"
    tests_rc=${PIPESTATUS[0]}
    echo "# tests/gpu exit status $tests_rc"
    [ "$tests_rc" -eq 0 ] || rc=1
else
    echo "# pytest is not installed here: tests/gpu not run (carry a wheel, benchmarks/GPU.md)" \
        | tee "$OUT/gpu_tests.txt"
fi
exit "$rc"
