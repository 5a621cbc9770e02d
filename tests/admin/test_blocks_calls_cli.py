"""A thin CLI (issue 16 item 7): `tierstore blocks show|evict --dry-run|pin|unpin` make one store
call for their keys whatever their number, plus one `resolve` when a key is a prefix (before:
a prefix downloaded every block, --dry-run asked once per key, unpin looped over the keys).
Counted on the daemon's side (stats -> daemon.requests) around the real `tierstore` entry point
in a subprocess; the outputs are the ones the CLI gave before."""

from __future__ import annotations

import os

import pytest

from tierstore.client import open_client
from tierstore.keys import Namespace

pytestmark = pytest.mark.timeout(180)

N = 10
SIZE = 4096


def _calls(client, before: dict) -> dict:
    """Requests by op since ``before`` (the CLI's hello and our own stats left out)."""
    now = client.stats()["daemon"]["requests"]
    return {op: n - before.get(op, 0) for op, n in now.items()
            if op not in ("hello", "stats") and n != before.get(op, 0)}


def test_blocks_verbs_make_one_store_call_whatever_the_number_of_keys(ts, cli_daemon):
    d = cli_daemon()
    sock = str(d.socket)
    ns = Namespace("calls", 16)
    twins = [b"\xaa" * 4 + os.urandom(28) for _ in range(2)]        # share 8 hex digits
    keys = [os.urandom(32) for _ in range(N)]
    missing = "cd" * 32
    with open_client(socket=sock) as c:
        c.put(keys + twins, ns, [bytes([i + 1]) * SIZE for i in range(N + 2)])
        assert c.flush(30)

        def run(*args):
            before = c.stats()["daemon"]["requests"]
            r = ts("blocks", *args, "--socket", sock)
            return r, _calls(c, before)

        prefixes = [k.hex()[:12] for k in keys]

        r, calls = run("show", keys[3].hex()[:9].upper(), "--json")
        assert r.code == 0 and r.json()["key"] == keys[3].hex(), r
        assert calls == {"resolve": 1, "block": 1}

        r, calls = run("show", "aaaaaaaa")
        assert r.code == 2 and "key prefix 'aaaaaaaa' is ambiguous (2 blocks)" in r.stderr, r
        assert calls == {"resolve": 1}
        r, calls = run("evict", "aaaaaaaa", "abc", "--dry-run")   # the first problem first
        assert r.code == 2 and "ambiguous" in r.stderr and calls == {"resolve": 1}, r
        r, calls = run("evict", "abc", "aaaaaaaa", "--dry-run")
        assert r.code == 2 and "'abc' too short" in r.stderr and calls == {}, r
        r, calls = run("show", "abc")
        assert r.code == 2 and "too short" in r.stderr and calls == {}, r

        r, calls = run("evict", *prefixes, missing, "--dry-run", "--json")
        assert r.code == 1, r
        out = r.json()
        assert (out["would_evict"], out["missing"], out["pinned"]) == (N, 1, 0)
        assert out["keys"] == [{"key": k.hex(), "state": "would_evict"} for k in keys] + \
            [{"key": missing, "state": "missing"}]
        assert calls == {"resolve": 1, "evict_dry_run": 1}
        assert all(c.block(k) is not None for k in keys)           # nothing changed

        r, calls = run("evict", *[k.hex() for k in keys], "--tier", "dram", "--dry-run")
        assert r.code == 0 and f"dry run: would evict {N} from dram" in r.stdout, r
        assert calls == {"evict_dry_run": 1}                      # whole keys: no resolve

        r, calls = run("pin", *[k.hex() for k in keys], "--ttl", "1h", "--session", "calls",
                       "--json")
        assert r.code == 0 and r.json()["pinned"] == N, r
        assert calls == {"pin": 1}

        r, calls = run("unpin", *prefixes, missing, "--session", "calls", "--json")
        assert r.code == 1, r
        assert r.json() == {"session": "calls", "unpinned": N, "not_pinned": 1,
                            "keys": [{"key": k.hex(), "state": "unpinned"} for k in keys]
                            + [{"key": missing, "state": "not_pinned"}]}
        assert calls == {"resolve": 1, "unpin_each": 1}
        assert c.stats()["pins"] == 0

        r, calls = run("unpin", *[k.hex() for k in keys[:3]], "--session", "calls")
        assert r.code == 1 and "unpinned 0, 3 held no pin of this session" in r.stdout, r
        assert calls == {"unpin_each": 1}
