#!/bin/sh
# Guest entry point (PID 1 after switch_root; read from the source share at every boot, so it is
# not part of the image key). Brings up Soft-RoCE on a dummy netdev and runs $tsmode:
#   test   the transfer contract suite's rdma cases on the real device (TIERSTORE_RDMA_DEVICE=rxe0,
#          see tests/core/transfer/conftest.py), the verbs tests, the rdma negotiation case
#          (XFER-15), the two-node block fetch (guest/test_rxe_two_node.py) and the two-daemon
#          one (guest/test_rxe_two_daemons.py: real `python3 -m tierstore.daemon` processes,
#          daemon logs to /out), one pytest run;
#          loopback/TCP cases are left to the host (under TCG their timing-based cases, e.g.
#          XFER-12's 0.3 s lease, do not hold)
#   bench  benchmarks/bench_rdma_guest.py (RDMA READ vs TCP, same transfer, same guest)
#   smoke  device listing only
# Writes /out/summary.json (+ logs) and prints "SOFTROCE-SUMMARY: ..." on the console, then
# powers off (minbase has no poweroff: sysrq).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp LC_ALL=C.UTF-8 PYTHONPATH=/src PYTHONPYCACHEPREFIX=/tmp/pycache
export PYTHONUNBUFFERED=1 HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
# bytecode cache kept by the host between boots (compiling /src under TCG takes tens of seconds)
mkdir -p /tmp/pycache
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 pycache /tmp/pycache 2>/dev/null \
  || echo "softroce guest: no pycache share; compiling from scratch"
MODE=${tsmode:-test}
OUT=/out
t0=$(cut -d' ' -f1 /proc/uptime)

finish() {   # finish RC: power off (the host reads /out/summary.json)
  sync
  echo "softroce guest: done (rc $1) at uptime $(cut -d' ' -f1 /proc/uptime) s"
  echo o > /proc/sysrq-trigger
  sleep 30
}
fatal() {
  echo "SOFTROCE-FATAL: $*"
  printf '{"mode": "%s", "passed": 0, "failed": 1, "fatal": "%s"}\n' "$MODE" "$*" > $OUT/summary.json
  finish 1
}

ip link set lo up
modprobe rdma_rxe || fatal "modprobe rdma_rxe failed"
modprobe ib_uverbs || fatal "modprobe ib_uverbs failed"
ip link add tsdummy0 type dummy || fatal "no dummy netdev"
ip link set tsdummy0 mtu 4200       # rxe's active MTU follows the netdev: 4096 here
ip addr add 10.99.0.1/24 dev tsdummy0
ip link set tsdummy0 up
rdma link add rxe0 type rxe netdev tsdummy0 || fatal "rdma link add rxe0 failed"
ibv_devinfo -d rxe0 | grep -E 'state|active_mtu|hca_id' 
t1=$(cut -d' ' -f1 /proc/uptime)
echo "softroce guest: rxe0 up (boot ${t0} s, setup until ${t1} s)"

up() { echo "softroce guest: $* at uptime $(cut -d' ' -f1 /proc/uptime) s"; }
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1   # no hypothesis plugin import: seconds under TCG
cd /src
case "$MODE" in
  test)
    up "pytest starts"
    TIERSTORE_RDMA_DEVICE=rxe0 TIERSTORE_SOFTROCE_LOGS=$OUT python3 -m pytest -p no:cacheprovider -q -o addopts="" \
      --import-mode=importlib -rfE --durations=8 --junitxml=$OUT/junit.xml \
      -k "rdma or test_verbs or xfer15 or two_node or two_daemons or rxe_verbs" \
      tests/core/transfer/test_contract.py tests/core/transfer/test_verbs.py \
      tests/core/transfer/test_cases.py tools/softroce/guest/test_rxe_verbs.py \
      tools/softroce/guest/test_rxe_two_node.py tools/softroce/guest/test_rxe_two_daemons.py \
      2>&1 | tee $OUT/pytest.log
    up "pytest done"
    python3 tools/softroce/guest/summarize.py $OUT/junit.xml $OUT/summary.json test \
      || fatal "no pytest results"
    ;;
  bench)
    python3 benchmarks/bench_rdma_guest.py --json $OUT/bench.json 2>&1 | tee $OUT/bench.log
    python3 - <<'PY' || fatal "benchmark failed"
import json
b = json.load(open("/out/bench.json"))
s = {"mode": "bench", "passed": 1, "failed": 0, "bench": b}
json.dump(s, open("/out/summary.json", "w"))
print("SOFTROCE-SUMMARY: 1 passed, 0 failed")
PY
    ;;
  smoke)
    for c in "pass" "import pytest" "import tierstore.transfer.rdma, pyverbs.qp"; do
      a=$(cut -d' ' -f1 /proc/uptime); python3 -c "$c"; b=$(cut -d' ' -f1 /proc/uptime)
      echo "softroce guest: python3 -c '$c': $a -> $b s"
    done
    python3 -c "from tierstore.transfer import verbs; print(verbs.probe())"
    python3 -c "from tierstore.transfer import verbs; ok, why = verbs.probe(); raise SystemExit(0 if ok else 1)" \
      && echo '{"mode": "smoke", "passed": 1, "failed": 0}' > $OUT/summary.json \
      || fatal "probe failed"
    echo "SOFTROCE-SUMMARY: 1 passed, 0 failed"
    ;;
  *) fatal "unknown mode $MODE" ;;
esac
finish 0
