"""kill -9 of a client, and of the daemon mid-write (issue 3 acceptance, second bullet)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from daemon_support import BLOCK_CODE, DaemonProc, config_toml, read_line, spawn_python  # noqa: E402

pytestmark = pytest.mark.timeout(120)

NS_CODE = """
from tierstore.keys import Namespace
ns = Namespace("crash-model", 16)
"""

HOLDER = BLOCK_CODE + NS_CODE + """
import sys, time
from tierstore.client import open_client
c = open_client(socket=sys.argv[1])
keys = c.keyer(ns).chain(list(range(16 * 70)))
c.put(keys[:50], ns, [block_bytes(i, 1000) for i in range(50)])
r = c.lookup(keys[:50], ns, pin=True)                 # 50 pins held by this connection
job = c.prepare_store(keys[50:], ns, 1000)            # 20 reserved slots, never completed
for i, s in enumerate(job.slots):
    c.slot_view(s)[:500] = block_bytes(50 + i, 1000)[:500]   # half-written
print("READY", r.num_blocks, sum(s is not None for s in job.slots), flush=True)
time.sleep(120)
"""


def _wait(pred, timeout_s=10.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProc(tmp_path / "data", tmp_path / "data" / "ts.sock",
                   config_toml(tmp_path / "ts.toml", slot_bytes=1000, dram_blocks=256))
    d.start()
    yield d
    d.kill()


def test_killed_client_releases_pins_and_aborts_unfinished_stores(daemon):
    """A client holding 50 pins and a half-written 20-block store job is killed with SIGKILL:
    the daemon releases the pins, frees the reserved slots, publishes none of the 20 blocks,
    passes check() and keeps serving."""
    from tierstore.client import open_client
    from tierstore.keys import Namespace

    holder = spawn_python(HOLDER, str(daemon.socket))
    try:
        assert read_line(holder) == "READY 50 20"
        with open_client(socket=daemon.socket) as c:
            st = c.stats()
            assert (st["pins"], st["pending_stores"]) == (50, 1)
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
            _wait(lambda: c.stats()["pins"] == 0 and c.stats()["pending_stores"] == 0,
                  what="pins released")
            ns = Namespace("crash-model", 16)
            keys = c.keyer(ns).chain(list(range(16 * 70)))
            assert c.lookup(keys, ns).num_blocks == 50      # the complete ones stay
            assert all(c.block(k) is None for k in keys[50:])
            assert all(c.lookup([k], ns).num_blocks == 0 for k in keys[50:])
            dram = next(t for t in c.usage() if t["tier"] == "dram")
            assert dram["used_slots"] == 50                  # reserved slots went back
            assert c.check() == []
            assert c.evict(keys[:50]) == {"evicted": 50}     # nothing is pinned any more
            # still healthy for others
            blocks = [bytes([i]) * 1000 for i in range(20)]
            c.put(keys[50:], ns, blocks)
            assert c.get(keys[50:]) == blocks
    finally:
        holder.kill()
        holder.wait(10)
    assert daemon.alive()


WRITER = BLOCK_CODE + NS_CODE + """
import sys
from tierstore.client import open_client
from tierstore.errors import DaemonUnreachable
c = open_client(socket=sys.argv[1])
keys = c.keyer(ns).chain(list(range(16 * 4000)))
try:
    for b in range(0, len(keys), 16):
        st = c.put(keys[b:b + 16], ns, [block_bytes(i, 4096) for i in range(b, b + 16)])
        assert all(s.value == "ok" for s in st), st
        if b % 64 == 48:                            # durable: the write-behind queue flushed
            assert c.flush()
            print(b + 16, flush=True)               # blocks acknowledged as durable so far
except DaemonUnreachable:
    print("GONE", flush=True)
"""


def test_daemon_killed_mid_write_recovers_nvme_and_clients_reconnect(tmp_path):
    """With NVMe, kill -9 the daemon while a client streams stores (flushing every 64 blocks:
    the write-behind promise); restart it on the same data dir: every block acknowledged as
    durable is back (from NVMe, byte-exact), check() finds
    0 problems, a stale shm slab and socket do not block the restart, and a client created
    before the crash reconnects by itself."""
    pytest.importorskip("lmdb")
    try:
        import tierstore.tiers.nvme  # noqa: F401
    except ImportError as e:
        pytest.skip(f"NVMe tier not importable: {e}")
    from tierstore.client import open_client
    from tierstore.keys import Namespace

    cfg = config_toml(tmp_path / "ts.toml", slot_bytes=4096, dram_blocks=128, nvme_blocks=8192)
    d = DaemonProc(tmp_path / "data", tmp_path / "data" / "ts.sock", cfg).start()
    writer = None
    try:
        survivor = open_client(socket=d.socket)
        writer = spawn_python(WRITER, str(d.socket))
        acked = 0
        while acked < 160:
            acked = int(read_line(writer))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        while True:                         # drain what the writer saw acknowledged
            line = read_line(writer)
            if line == "GONE":
                break
            acked = int(line)
        writer.wait(10)
        shm_before = [n for n in os.listdir("/dev/shm") if n == survivor.info["shm_name"]]
        assert shm_before, "a kill -9 leaves the old slab behind"

        d2 = DaemonProc(d.data_dir, d.socket, cfg).start()
        d = d2
        assert not os.path.exists("/dev/shm/" + survivor.info["shm_name"])  # stale slab removed
        st = survivor.stats()                                     # reconnects by itself
        assert st["daemon"]["pid"] == d.proc.pid
        assert survivor.check() == []
        ns = Namespace("crash-model", 16)
        keys = survivor.keyer(ns).chain(list(range(16 * 4000)))
        assert survivor.lookup(keys, ns).num_blocks >= acked
        exec(BLOCK_CODE, g := {})
        for b in range(0, acked, 64):
            end = min(b + 64, acked)
            assert survivor.get(keys[b:end]) == [g["block_bytes"](i, 4096) for i in range(b, end)]
        assert json.loads(json.dumps(st["counters"]))["nvme_recovered"] >= acked
        survivor.close()
    finally:
        if writer is not None:
            writer.kill()
            writer.wait(10)
        d.kill()
