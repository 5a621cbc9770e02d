"""``tierstore replay --policy a,b --capacity x,y``: the sweep table, its reference rows, --plot."""

from __future__ import annotations

import json
import sys

import pytest

CAPS = "60blocks,120blocks,250blocks"
POLICIES = "lru,prefix-lhd,s3fifo,prefix-gdsf"


@pytest.fixture
def small_trace(tmp_path, make_trace):
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in make_trace(400, seed=3)))
    return p


def test_sweep_json_bounds_policies_by_belady_and_infinite(cli, small_trace):
    """Every policy x capacity cell is a real replay; 0 <= policy <= Belady <= infinite at every
    capacity, for block and token hit ratios; the list has one entry per cell."""
    r = cli("replay", small_trace, "--policy", POLICIES, "--capacity", CAPS, "--json", "-q")
    assert r.code == 0, r.stderr
    d = r.json()
    assert "block_hit_ratio" not in d          # a sweep is a list of results, not one run
    caps = CAPS.split(",")
    assert [c["capacity"] for c in d["capacities"]] == caps
    assert [c["capacity_blocks"] for c in d["capacities"]] == [60, 120, 250]
    assert [(x["policy"], x["capacity"]) for x in d["results"]] == \
        [(p, c) for p in POLICIES.split(",") for c in caps]
    ref = {(x["policy"], x["capacity"]): x for x in d["references"]}
    assert set(ref) == {(p, c) for p in ("belady", "infinite") for c in caps}
    for x in d["results"]:
        for f in ("block_hit_ratio", "token_hit_ratio"):
            bel, inf = ref[("belady", x["capacity"])][f], ref[("infinite", x["capacity"])][f]
            assert 0 <= x[f] <= bel <= inf <= 1, (x, f)
        assert x["wall_s"] >= 0
    assert len({ref[("infinite", c)]["block_hit_ratio"] for c in caps}) == 1
    assert d["requests"] == 400 and d["payload"] == "none"


def test_sweep_matches_single_replays(cli, small_trace):
    """A sweep cell equals the single replay of the same policy and capacity."""
    d = cli("replay", small_trace, "--policy", "lru,prefix-lhd", "--capacity", "120blocks",
            "--json", "-q").json()
    for x in d["results"]:
        one = cli("replay", small_trace, "--policy", x["policy"], "--capacity", "120blocks",
                  "--json", "-q")
        assert one.code == 0, one.stderr
        assert one.json()["block_hit_ratio"] == x["block_hit_ratio"]


def test_one_policy_one_capacity_keeps_the_single_run_object(cli, small_trace):
    r = cli("replay", small_trace, "--policy", "lru", "--capacity", "60blocks", "--json", "-q")
    assert r.code == 0, r.stderr
    d = r.json()
    assert 0 < d["block_hit_ratio"] < 1 and "results" not in d and d["policy"] == "lru"


def test_sweep_human_table_has_a_row_per_policy_and_reference(cli, small_trace):
    r = cli("replay", small_trace, "--policy", "lru,s3fifo", "--capacity", "60blocks,250blocks", "-q")
    assert r.code == 0, r.stderr
    lines = r.stdout.splitlines()
    for title in ("block_hit_ratio", "token_hit_ratio"):
        assert any(line.startswith(title) for line in lines), r.stdout
    header = [line for line in lines if "policy" in line and "60blocks" in line]
    assert len(header) == 2 and all("250blocks" in h for h in header)
    for name in ("lru", "s3fifo", "belady", "infinite"):   # one row per table
        assert sum(1 for line in lines if line.startswith(f"│ {name} ")) == 2, name


def test_plot_writes_a_png(cli, small_trace, tmp_path):
    """With matplotlib (the 'plot' extra): a PNG; without it: one clean error line, exit 2."""
    out = tmp_path / "hit.png"
    r = cli("replay", small_trace, "--policy", "lru,prefix-lhd", "--capacity", CAPS, "--plot", out,
            "--json", "-q")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.code == 2 and "matplotlib" in r.stderr and not out.exists()
        return
    assert r.code == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.json()["plot"] == str(out)


def test_plot_without_matplotlib_is_one_clean_error_before_any_replay(cli, small_trace, tmp_path,
                                                                     monkeypatch):
    """Scenario: the 'plot' extra is not installed (import fails): exit 2, one stderr line that
    names the extra, nothing on stdout, no file."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "hit.png"
    r = cli("replay", small_trace, "--policy", "lru,s3fifo", "--capacity", CAPS, "--plot", out)
    assert r.code == 2
    assert r.stderr.count("\n") == 1 and "pip install matplotlib" in r.stderr
    assert r.stdout == "" and not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--policy", "lru,nope", "--capacity", CAPS], "nope"),
    (["--policy", "lru,s3fifo", "--capacity", "60blocks,lots"], "lots"),
    (["--policy", "lru,s3fifo", "--payload", "bytes", "--capacity", "60blocks"], "payload none"),
])
def test_sweep_bad_input_is_exit_2(cli, small_trace, args, words):
    r = cli("replay", small_trace, *args, "-q")
    assert r.code == 2 and words in r.stderr and r.stderr.startswith("error: ")


def test_nodes_reports_each_route_beside_the_pooled_cache_and_plots_it(cli, small_trace, tmp_path):
    """``--nodes 3 --route round-robin,prefix-aware --capacity C``: one result with a row per
    route (cluster hit ratios, requests per node, the router index exact) and the pooled cache
    of 3 x C; ``--plot`` draws the bars (PNG) when matplotlib is there."""
    out = tmp_path / "routes.png"
    try:
        import matplotlib  # noqa: F401
        plot = ["--plot", out]
    except ImportError:
        plot = []
    r = cli("replay", small_trace, "--nodes", 3, "--route", "round-robin,prefix-aware",
            "--capacity", "60blocks", "--json", "-q", *plot)
    assert r.code == 0, r.stderr
    res = r.json()
    assert [x["route"] for x in res["routes"]] == ["round-robin", "prefix-aware"]
    assert res["pooled"]["capacity_blocks_per_node"] == 180 == res["pooled_capacity_blocks"]
    for x in res["routes"] + [res["pooled"]]:
        assert 0 <= x["block_hit_ratio"] <= 1 and x["router_exact"] is True
        assert sum(x["requests_per_node"]) == 400
    if plot:
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res["plot"] == str(out)
    human = cli("replay", small_trace, "--nodes", 2, "--route", "prefix-aware", "--capacity",
                "60blocks", "-q")
    assert human.code == 0 and "pooled" in human.stdout and "prefix-aware" in human.stdout
    bad = cli("replay", small_trace, "--nodes", 2, "--route", "nearest", "--capacity", "60blocks")
    assert bad.code == 2 and "nearest" in bad.stderr
    # --route without --nodes routes nothing: refused, not silently ignored (a fresh-clone user
    # ran `--route bogus` through a full byte replay that exited 0)
    alone = cli("replay", small_trace, "--route", "prefix-aware", "--capacity", "60blocks")
    assert alone.code == 2 and "--route needs --nodes" in alone.stderr
