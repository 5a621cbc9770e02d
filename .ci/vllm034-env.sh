#!/usr/bin/env bash
# The connector's API-level tests against vllm==0.34.0 (installed --no-deps over the CPU torch
# 2.13 wheel; 0.34 has no CPU build and pins torch 2.14.0, like 0.33). The recipe is
# .ci/vllm-api-env.sh.
#
#   bash .ci/vllm034-env.sh [pytest args...]
#
# The venv lives in $TIERSTORE_VLLM034_VENV (default /tmp/tierstore-vllm034-venv).
set -euo pipefail
export VLLM_API_VERSION=0.34.0
export VLLM_API_VENV=${TIERSTORE_VLLM034_VENV:-/tmp/tierstore-vllm034-venv}
exec bash "$(dirname "${BASH_SOURCE[0]}")/vllm-api-env.sh" "$@"
