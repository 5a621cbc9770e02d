"""Durability by reopening: kill -9 a writer at random moments, reopen, check the books.

The writer stores chains of blocks (NVMe copies written behind, tierstore/writebehind.py) and
appends the ids of chains to a journal (fsynced) only after ``flush()`` (or a clean ``close()``)
returned: that is what the store promises survives. Kills land while writes are queued, while a
flush waits, and while a close drains. After every kill the store is reopened: ``check()`` must
find nothing, every journaled chain must hit with the right bytes, and no block may ever come
back with wrong bytes (issue 2 acceptance: >= 20 rounds; issue 12: crash tests for the flusher).
"""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("tierstore.tiers.nvme")

from tierstore.client import Client  # noqa: E402
from tierstore.config import DramConfig, NvmeConfig, StoreConfig  # noqa: E402
from tierstore.keys import Namespace  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SLOT = 16384
NS = Namespace("durability", 16, num_layers=1, num_kv_heads=1, head_size=8)
CHAIN = 4

WRITER = textwrap.dedent("""
    import os, sys
    from tierstore.client import Client
    from tierstore.keys import Namespace
    data_dir, journal, start, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    ns = Namespace("durability", 16, num_layers=1, num_kv_heads=1, head_size=8)
    c = Client.embedded(data_dir)
    keyer = c.keyer(ns)
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    print("ready", flush=True)
    i, done = start, []
    while True:
        keys = keyer.chain(list(range(i * 1000, i * 1000 + 16 * %(chain)d)))
        st = c.put(keys, ns, [k * (%(slot)d // 32) for k in keys])
        if all(s.value in ("ok", "present") for s in st):
            done.append(i)
        i += 1
        if len(done) >= 8 or (mode == "close" and done):
            if mode == "close":      # a clean close drains the write-behind queue
                c.close()
            elif not c.flush():
                continue
            os.write(fd, "".join(f"{x}\\n" for x in done).encode()); os.fsync(fd)
            done = []
            if mode == "close":
                c = Client.embedded(data_dir)
""") % {"chain": CHAIN, "slot": SLOT}


def _config(tmp: Path) -> StoreConfig:
    return StoreConfig(slot_bytes=SLOT, dram=DramConfig(capacity_blocks=16),
                       nvme=NvmeConfig(path=str(tmp / "d" / "nvme"), capacity_blocks=200_000,
                                       file_slots=256))


def _verify(data_dir: Path, journal: Path) -> int:
    committed = [int(x) for x in journal.read_text().split()] if journal.exists() else []
    with Client.embedded(data_dir) as c:
        assert c.check() == []
        keyer = c.keyer(NS)
        for i in committed:
            keys = keyer.chain(list(range(i * 1000, i * 1000 + 16 * CHAIN)))
            assert c.lookup(keys, NS).num_blocks == CHAIN, f"chain {i} lost"
            got = c.get(keys)
            assert got == [k * (SLOT // 32) for k in keys], f"chain {i} wrong bytes"
        # blocks that are not journaled may exist (killed before the journal write); any
        # block that is returned must carry its own bytes
        for b in c.blocks(limit=200):
            key = bytes.fromhex(b["key"])
            got = c.get([key])
            assert not got or got[0] == key * (SLOT // 32)
    return len(committed)


@pytest.mark.slow
@pytest.mark.parametrize("mode,rounds", [("flush", 20), ("close", 8)])
def test_kill9_and_reopen_loop(tmp_path, mode, rounds):
    """Restart acceptance: ``rounds`` kills -9 at random moments on the same data dir (the
    writer journals chains after ``flush()``, or after a clean ``close()``, so kills land during
    queued writes, flushes and closes); after each, check() finds 0 problems, no read returns
    wrong bytes, and every chain journaled before the crashes is a hit. (NVMe capacity is far
    above what 20 rounds write, so LRU never evicts a journaled chain.)"""
    data_dir = tmp_path / "d"
    journal = tmp_path / "journal"
    Client.embedded(data_dir, _config(tmp_path)).close()
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = 0
    committed = 0
    for rnd in range(rounds):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(data_dir), str(journal), str(start),
                              mode],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        assert line.strip() == "ready", p.stderr.read()
        time.sleep(rng.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        committed = _verify(data_dir, journal)
        start += 10_000
    assert committed >= rounds   # the writers made progress worth checking
