#!/bin/bash
# CI block for issue 8: the RDMA transport on real verbs (Soft-RoCE in a qemu guest).
# Called from .ci/run. Installs what it needs, runs `pytest -m softroce`, and says plainly when
# it skips (no root for apt/debootstrap, no qemu, no network to the Debian mirror...).
# The guest image is cached in $TIERSTORE_SOFTROCE_CACHE (default ~/.cache/tierstore-softroce):
# first run ~1 min of build + the guest run; later runs only the guest run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
echo "== softroce: RDMA transport on real verbs (rdma_rxe in a qemu TCG guest)"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  for t in qemu-system-x86_64:qemu-system-x86 debootstrap:debootstrap depmod:kmod cpio:cpio \
           file:file; do
    command -v "${t%%:*}" >/dev/null || missing="$missing ${t#*:}"
  done
  file -L /bin/busybox 2>/dev/null | grep -q static || missing="$missing busybox-static"
  if [ -n "$missing" ]; then
    echo "softroce: apt-get install$missing"
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing) >/dev/null 2>&1 \
      || echo "softroce: apt-get install failed; the test will say what is missing"
  fi
fi
if ! why=$($PY tools/softroce/softroce.py check 2>&1); then
  echo "softroce: SKIPPED: $why"
  exit 0
fi
echo "$why"
out=$($PY -m pytest -m softroce -q -rs tests/integration/test_softroce.py 2>&1); rc=$?
echo "$out" | tail -25
if echo "$out" | grep -q "skipped" && ! echo "$out" | grep -q "passed"; then
  echo "softroce: SKIPPED (reason above)"
  exit 0
fi
exit $rc
