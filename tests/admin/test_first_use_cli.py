"""What a new user found confusing on a first run of the README's CLI cheat-sheet, each through
the real `tierstore` entry point in a subprocess (a daemon started with `daemon start --detach`
where a command needs one)."""

from __future__ import annotations

import os

import pytest

from tierstore.client import open_client
from tierstore.keys import Namespace

pytestmark = pytest.mark.timeout(180)

N = 512
DRAM_ONLY = """
    [store]
    slot_bytes = "64KiB"
    [dram]
    capacity = "600blocks"
    """


def _dram_only_daemon(cli_daemon, n: int = N):
    """A daemon with no NVMe tier holding ``n`` blocks: DRAM has the only copy of each."""
    d = cli_daemon(DRAM_ONLY)
    keys = [os.urandom(32) for _ in range(n)]
    with open_client(socket=str(d.socket)) as c:
        c.put(keys, Namespace("first-use", 16), [bytes([i % 251 + 1]) * 4096 for i in range(n)])
        assert c.stats()["blocks"] == n
    return d, keys


def test_evict_says_what_only_copy_means_and_dry_run_keys_follow_limit(ts, cli_daemon):
    """`blocks evict --all --tier dram` on a store without NVMe said "only copy 512": now
    "512 block(s) kept: dram holds their only copy (no other tier has them)", dry run and real
    run alike (exit 1: nothing evicted). The dry run's --json listed every key (about 50 KB for
    512 blocks): its "keys" now follow blocks ls's --limit (default 100, 0 = all) with
    "truncated"; the counts still cover every block. --limit without --dry-run is refused: it
    does not cap what evict removes."""
    d, keys = _dram_only_daemon(cli_daemon)
    sock = d.socket
    kept = f"{N} block(s) kept: dram holds their only copy (no other tier has them)"

    r = ts("blocks", "evict", "--all", "--tier", "dram", "--dry-run", "--socket", sock)
    assert r.code == 1, r
    assert r.stdout.strip() == f"dry run: would evict 0 from dram; {kept}", r
    assert "only copy 512" not in r.stdout

    r = ts("blocks", "evict", "--all", "--tier", "dram", "--dry-run", "--socket", sock, "--json")
    assert r.code == 1, r
    out = r.json()
    assert (out["only_copy"], out["would_evict"], out["truncated"]) == (N, 0, True), out
    assert len(out["keys"]) == 100
    assert all(k["state"] == "only_copy" for k in out["keys"])
    assert len(r.stdout) < 15_000

    r = ts("blocks", "evict", "--all", "--tier", "dram", "--dry-run", "--limit", "3", "--socket",
           sock, "--json")
    assert r.code == 1 and len(r.json()["keys"]) == 3 and r.json()["only_copy"] == N, r
    r = ts("blocks", "evict", "--all", "--tier", "dram", "--dry-run", "--limit", "0", "--socket",
           sock, "--json")
    assert r.code == 1 and not r.json()["truncated"], r
    assert sorted(k["key"] for k in r.json()["keys"]) == sorted(k.hex() for k in keys)
    r = ts("blocks", "evict", keys[0].hex(), "--tier", "dram", "--dry-run", "--socket", sock,
           "--json")
    assert r.code == 1 and r.json()["keys"] == [{"key": keys[0].hex(), "state": "only_copy"}]
    assert r.json()["truncated"] is False, r

    r = ts("blocks", "evict", "--all", "--tier", "dram", "--limit", "5", "--yes", "--socket", sock)
    assert r.code == 2 and "does not limit what evict removes" in r.stderr, r

    r = ts("blocks", "evict", "--all", "--tier", "dram", "--yes", "--socket", sock)
    assert r.code == 1, r
    assert r.stdout.strip() == f"evicted 0 from dram; {kept}", r
    r = ts("blocks", "evict", keys[0].hex(), "ab" * 32, "--tier", "dram", "--yes", "--socket",
           sock)
    assert r.code == 1, r
    assert r.stdout.strip() == ("evicted 0 from dram; not evicted: 1 missing; 1 block(s) kept: "
                                "dram holds their only copy (no other tier has them)"), r
    with open_client(socket=str(sock)) as c:
        assert c.stats()["blocks"] == N                          # nothing was evicted
