"""Two client processes and the CLI against one daemon (issue 3 acceptance, first bullet)."""

from __future__ import annotations

import json
import os
import sys
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from daemon_support import BLOCK_CODE, DaemonProc, config_toml, python  # noqa: E402

pytestmark = pytest.mark.timeout(120)

N_BLOCKS = 1000
SIZE = 2000

WRITER = BLOCK_CODE + """
import sys
from tierstore.client import open_client
from tierstore.keys import Namespace
ns = Namespace("itest-model", 16, num_layers=2, num_kv_heads=2, head_size=8)
with open_client(socket=sys.argv[1]) as c:
    keys = c.keyer(ns).chain(list(range(16 * %(n)d)))
    stored = 0
    for i in range(0, len(keys), 100):
        st = c.put(keys[i:i + 100], ns, [block_bytes(j, %(size)d) for j in range(i, i + 100)],
                   parent=keys[i - 1] if i else None)
        stored += sum(s.value == "ok" for s in st)
    print(stored)
""" % {"n": N_BLOCKS, "size": SIZE}

READER = BLOCK_CODE + """
import json, sys
from tierstore.client import open_client
from tierstore.keys import Namespace
ns = Namespace("itest-model", 16, num_layers=2, num_kv_heads=2, head_size=8)
evicted = set(json.loads(sys.argv[2]))
with open_client(socket=sys.argv[1]) as c:
    keys = c.keyer(ns).chain(list(range(16 * %(n)d)))
    if not evicted:
        r = c.lookup(keys, ns, pin=True, ttl_s=30)
        job = c.prepare_load(keys)
        exact = all(bytes(c.slot_view(s)[:n]) == block_bytes(i, %(size)d)
                    for i, (s, n) in enumerate(zip(job.slots, job.sizes)))
        c.complete_load(job.job_id)
        pins = c.stats()["pins"]
        c.unpin(list(r.keys))
        print(json.dumps({"hit": r.num_blocks, "loaded": job.num_ready, "exact": exact,
                          "tiers": sorted({t.label for t in r.tiers}), "pins": pins}))
    else:
        missed = [i for i, k in enumerate(keys) if c.lookup([k], ns).num_blocks == 0]
        print(json.dumps({"missed": missed}))
""" % {"n": N_BLOCKS, "size": SIZE}


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProc(tmp_path / "data", tmp_path / "data" / "ts.sock",
                   config_toml(tmp_path / "ts.toml", slot_bytes=SIZE, dram_blocks=1500, metrics=True))
    d.start()
    yield d
    d.kill()


def test_writer_and_reader_processes_share_blocks_through_the_daemon(daemon):
    """A stores 1,000 blocks; B finds and loads them byte-exact through shared memory; the
    block listing shows them; evicting some makes B miss exactly those."""
    from tierstore.client import open_client

    a = python(WRITER, str(daemon.socket))
    assert a.returncode == 0, a.stderr
    assert int(a.stdout.strip()) == N_BLOCKS

    b = python(READER, str(daemon.socket), "[]")
    assert b.returncode == 0, b.stderr
    out = json.loads(b.stdout)
    assert out == {"hit": N_BLOCKS, "loaded": N_BLOCKS, "exact": True, "tiers": ["dram"],
                   "pins": N_BLOCKS}

    with open_client(socket=daemon.socket) as c:
        listed = c.blocks()
        assert len(listed) == N_BLOCKS
        assert {b["namespace"]["model"] for b in listed} == {"itest-model"}
        assert c.stats()["pins"] == 0          # B unpinned, and its connection is gone
        # the CLI lists them too once `blocks ls` goes through --socket
        cli = _cli_blocks_ls(daemon.socket)
        if cli is not None:
            assert len(cli) == N_BLOCKS
        keys_by_index = _keys(c)
        evict = list(range(3, N_BLOCKS, 7))
        r = c.evict([keys_by_index[i] for i in evict])
        assert r == {"evicted": len(evict)}
        assert c.check() == []

    b2 = python(READER, str(daemon.socket), json.dumps(evict))
    assert b2.returncode == 0, b2.stderr
    assert json.loads(b2.stdout)["missed"] == evict

    with open_client(socket=daemon.socket) as c:
        url = c.stats()["daemon"]["metrics"]
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'tierstore_tier_capacity_bytes{tier="dram"}' in text
    assert 'tierstore_request_seconds_bucket{le="0.001",op="lookup"}' in text
    assert "tierstore_lookup_hit_blocks_total" in text
    assert 'tierstore_evictions_total{tier="dram"}' in text


def _keys(c):
    from tierstore.keys import Namespace

    ns = Namespace("itest-model", 16, num_layers=2, num_kv_heads=2, head_size=8)
    return c.keyer(ns).chain(list(range(16 * N_BLOCKS)))


def _cli_blocks_ls(socket):
    """`tierstore blocks ls --socket S --json` when the CLI supports it, else None."""
    try:
        from typer.testing import CliRunner

        from tierstore_admin.app import app
    except ImportError:
        return None
    runner = CliRunner()
    if "--socket" not in runner.invoke(app, ["blocks", "ls", "--help"]).output:
        return None
    r = runner.invoke(app, ["blocks", "ls", "--socket", str(socket), "--json", "--limit", "100000"])
    if r.exit_code != 0:
        r = runner.invoke(app, ["blocks", "ls", "--socket", str(socket), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    return data["blocks"] if isinstance(data, dict) else data
