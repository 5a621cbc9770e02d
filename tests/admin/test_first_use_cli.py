"""What a new user found confusing on a first run of the README's CLI cheat-sheet, each through
the real `tierstore` entry point in a subprocess (a daemon started with `daemon start --detach`
where a command needs one)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tierstore.client import open_client
from tierstore.keys import Namespace

sys.path.insert(0, os.path.dirname(__file__))
from cli_support import clean_env  # noqa: E402

pytestmark = pytest.mark.timeout(180)

README = Path(__file__).resolve().parents[2] / "README.md"

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


def test_blocks_ls_limit_says_how_many_blocks_there_are(ts, cli_daemon):
    """`blocks ls --limit 3` said "3 block(s) (truncated)" and its JSON "count": 3,
    "truncated": true, never how many blocks there are: now "3 of 512 block(s) shown" and
    "total": 512, from the counts the store keeps (no listing of every block), per tier too."""
    d, _ = _dram_only_daemon(cli_daemon)
    r = ts("blocks", "ls", "--socket", d.socket, "--limit", "3")
    assert r.code == 0, r
    assert r.stdout.splitlines()[0] == f"3 of {N} block(s) shown (--limit 3; --limit 0: all)", r
    r = ts("blocks", "ls", "--socket", d.socket, "--limit", "3", "--json")
    assert r.code == 0, r
    out = r.json()
    assert (out["count"], out["total"], out["truncated"], len(out["blocks"])) == (3, N, True, 3)
    r = ts("blocks", "ls", "--socket", d.socket, "--limit", "0", "--json")
    assert (r.json()["count"], r.json()["total"], r.json()["truncated"]) == (N, N, False), r
    r = ts("blocks", "ls", "--socket", d.socket, "--limit", "600")
    assert r.code == 0 and r.stdout.splitlines()[0] == f"{N} block(s)", r


def test_blocks_ls_total_per_tier(ts, cli_daemon):
    """With --tier the total is that tier's block count: DRAM (64 slots) holds fewer blocks than
    NVMe, which has a copy of each."""
    d = cli_daemon()                       # SMALL_DAEMON: 64 DRAM slots over 512 on NVMe
    with open_client(socket=str(d.socket)) as c:
        for _ in range(4):                 # a put goes through DRAM: 40 blocks at a time
            c.put([os.urandom(32) for _ in range(40)], Namespace("first-use", 16),
                  [b"\x07" * 4096] * 40)
            assert c.flush(30)
        assert [u["blocks"] for u in c.usage()] == [64, 160]
    for tier in ("dram", "nvme"):
        every = ts("blocks", "ls", "--socket", d.socket, "--tier", tier, "--limit", "0", "--json")
        assert every.code == 0, every
        n = every.json()["count"]
        r = ts("blocks", "ls", "--socket", d.socket, "--tier", tier, "--limit", "3", "--json")
        assert r.code == 0 and (r.json()["count"], r.json()["total"]) == (3, n), (tier, r)
        h = ts("blocks", "ls", "--socket", d.socket, "--tier", tier, "--limit", "3")
        assert h.stdout.splitlines()[0].startswith(f"3 of {n} block(s) in {tier} shown"), h
    assert ts("blocks", "ls", "--socket", d.socket, "--tier", "nvme", "--limit", "3",
              "--json").json()["total"] == 160


@pytest.mark.parametrize("newline", ["\n", "\r\n", ""])
def test_trace_line_cut_short_names_its_own_column(ts, tmp_path, newline):
    """A trace line cut short said "column 1" (Python's JSONDecodeError points past the line's
    end, at "line 2 column 1" of the one-line document): now the column after the line's last
    character, "at the end of the line"; a fault inside the line keeps its column."""
    cut = '{"timestamp": 1, "input_length": 10'
    p = tmp_path / "cut.jsonl"
    p.write_text(cut + newline)
    r = ts("replay", p)
    assert r.code == 2, r
    assert r.stderr.strip() == (f"error: {p}:1: column {len(cut) + 1}: not valid JSON "
                                f"(Expecting ',' delimiter at the end of the line)"), r
    inside = '{"timestamp": 1, "input_length": 10 "hash_ids": [1]}'
    p.write_text('{"timestamp": 0, "input_length": 1, "hash_ids": [1]}\n' + inside + newline)
    r = ts("replay", p)
    assert r.code == 2, r
    assert r.stderr.strip() == (f"error: {p}:2: column {len(cut) + 2}: not valid JSON "
                                f"(Expecting ',' delimiter)"), r


def test_save_trace_says_the_replay_still_runs(ts, tmp_path):
    """`replay --save-trace FILE` writes the trace and then replays it (a test relies on the
    replay: tests/admin/test_replay_cli.py::test_save_trace_writes_what_replays_the_same). The
    README read as if it only wrote the file; --help and the README now both say the replay
    still runs, and how to make it quick."""
    h = ts("replay", "--help", env=clean_env(COLUMNS="300"))
    assert h.code == 0, h
    assert "then replay them as usual: the replay still runs (add --payload none to make it " \
           "quick)" in " ".join(h.stdout.replace("│", " ").split()), h
    readme = " ".join(README.read_text().split())
    assert "--save-trace gen.jsonl` writes the built-in workload in this format (`--requests N` " \
           "for more) and then replays it as usual: the replay still runs" in readme
    assert "--save-trace: write the replayed requests as a trace, then replay (it still runs)" \
        in " ".join(line.strip() for line in README.read_text().splitlines())
    gen = tmp_path / "gen.jsonl"
    r = ts("replay", "--requests", "20", "--save-trace", gen, "--payload", "none", "--json")
    assert r.code == 0 and r.json()["requests"] == 20, r
    assert len(gen.read_text().splitlines()) == 20 and f"wrote 20 requests to {gen}" in r.stderr
