"""``tierstore replay``: hit accounting against an independent LRU model, payload bytes through
DRAM + NVMe, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict

import pytest


def lru_prefix_hit_ratio(trace: list[dict], capacity_blocks: int) -> float:
    """Reference model: hit = leading cached blocks; then every block of the request is touched
    or inserted in order, evicting the least recently used beyond the capacity."""
    cache: OrderedDict[int, None] = OrderedDict()
    hit = total = 0
    for r in trace:
        ids = r["hash_ids"]
        n = 0
        for x in ids:
            if x not in cache:
                break
            n += 1
        hit += n
        total += len(ids)
        for x in ids:
            if x in cache:
                cache.move_to_end(x)
            else:
                cache[x] = None
                if len(cache) > capacity_blocks:
                    cache.popitem(last=False)
    return hit / total


def test_replay_json_on_generated_default_is_sane(cli):
    """No TRACE: the embedded generated workload through DRAM over NVMe (payload bytes, a temp
    dir), every load verified, the LRU baseline beside; --json prints one object."""
    pytest.importorskip("tierstore.sim.workload")
    r = cli("replay", "--requests", "200", "--json", "-q")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["requests"] == 200 and d["payload"] == "bytes"
    assert 0 < d["block_hit_ratio"] < 1
    assert 0 <= d["token_hit_ratio"] <= 1
    assert d["hit_blocks"] <= d["referenced_blocks"]
    assert sum(d["hits"].values()) == d["hit_blocks"] == d["verified_blocks"]
    assert d["verify_failures"] == 0
    assert d["capacity_blocks"] == {"dram": 256_000 // 512, "nvme": 1_000_000 // 512}
    assert d["policies"] == {"dram": "prefix-lhd", "nvme": "prefix-lhd"}
    assert d["baseline"]["policies"] == {"dram": "lru", "nvme": "lru"}
    assert d["load_ms"]["p50"] is not None and d["store_ms"]["p99"] >= d["store_ms"]["p50"]
    assert d["throughput"]["requests_per_s"] > 0


def test_save_trace_writes_what_replays_the_same(cli, tmp_path, trace_file):
    """--save-trace writes the generated workload (or TRACE cut by --limit) as JSONL; replaying
    that file gives the same result, request for request."""
    pytest.importorskip("tierstore.sim.workload")
    gen = tmp_path / "gen.jsonl"
    a = cli("replay", "--requests", "300", "--capacity", "3M", "--save-trace", gen, "--json", "-q")
    assert a.code == 0, a.stderr
    lines = gen.read_text().splitlines()
    assert len(lines) == 300 and "wrote 300 requests" in a.stderr
    b = cli("replay", gen, "--capacity", "3M", "--json", "-q")
    assert b.code == 0, b.stderr
    for f in ("block_hit_ratio", "hit_blocks", "referenced_blocks", "token_hit_ratio"):
        assert a.json()[f] == b.json()[f]
    cut = tmp_path / "cut.jsonl"
    c = cli("replay", trace_file, "--limit", "7", "--save-trace", cut, "--json", "-q")
    assert c.code == 0, c.stderr
    original = trace_file.read_text().splitlines()[:7]
    assert [json.loads(x)["hash_ids"] for x in cut.read_text().splitlines()] == \
        [json.loads(x)["hash_ids"] for x in original]
    _one_line_error(cli("replay", "--requests", "5", "--save-trace", tmp_path / "no" / "x.jsonl"),
                    "cannot write trace")


@pytest.mark.parametrize("cap", [60, 120, 250])
def test_payload_none_matches_reference_lru(cli, tmp_path, make_trace, cap):
    """The store's prefix hits under LRU equal an independent LRU model of the same capacity
    (capacities at least the longest request, 51 blocks: a request is staged whole)."""
    trace = make_trace(400, seed=1)
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in trace))
    r = cli("replay", p, "--capacity", f"{cap}blocks", "--policy", "lru", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["block_hit_ratio"] == pytest.approx(lru_prefix_hit_ratio(trace, cap), abs=1e-6)
    assert d["referenced_blocks"] == sum(len(x["hash_ids"]) for x in trace)
    hit_tokens = d["hit_tokens"]
    assert hit_tokens <= d["input_tokens"] and d["token_hit_ratio"] == pytest.approx(
        hit_tokens / d["input_tokens"], abs=1e-6)


def test_capacity_units(cli, trace_file):
    """3M tokens = floor(3e6/512) blocks; bytes divide by the block size; 'blocks' counts blocks."""
    caps = {}
    for text in ("3M", "1GiB", "77blocks"):
        r = cli("replay", trace_file, "--capacity", text, "--block-bytes", "1MiB", "--json", "--limit", "5")
        assert r.code == 0, r.stderr
        caps[text] = r.json()["capacity_blocks"]["dram"]
    assert caps == {"3M": 5859, "1GiB": 1024, "77blocks": 77}


def test_payload_bytes_dram_only_verifies_and_matches_none(cli, trace_file):
    """Real bytes through the DRAM slab: same hits as payload none, every loaded block verified."""
    none = cli("replay", trace_file, "--capacity", "60blocks", "--json").json()
    r = cli("replay", trace_file, "--payload", "bytes", "--dram-capacity", "60blocks",
            "--nvme-capacity", "0", "--block-bytes", "16KiB", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["block_hit_ratio"] == none["block_hit_ratio"]
    assert d["verify_failures"] == 0
    assert d["verified_blocks"] == d["hit_blocks"] > 0
    assert d["block_bytes"] == 16 * 1024
    assert d["tiers"]["dram"]["written_bytes"] == d["stored_blocks"] * 16 * 1024


def test_payload_bytes_dram_nvme_sits_between_one_lru_of_nvme_and_of_the_sum(cli, trace_file,
                                                                            fast_dir):
    """DRAM over NVMe with clean copies (NVMe holds every block it was given, its LRU order
    follows every hit, DRAM keeps the most recent subset) hits at least as often as one LRU of
    the NVMe capacity and at most as often as one LRU of DRAM + NVMe (the exclusive tiers'
    capacity); no loaded block is wrong, both tiers serve hits."""
    pytest.importorskip("tierstore.tiers.nvme")
    nvme, dram = 120, 60    # DRAM holds the longest request (49 blocks): it stages whole requests
    lo = cli("replay", trace_file, "--capacity", f"{nvme}blocks", "--policy", "lru", "--json").json()
    hi = cli("replay", trace_file, "--capacity", f"{nvme + dram}blocks", "--policy", "lru",
             "--json").json()
    r = cli("replay", trace_file, "--payload", "bytes", "--policy", "lru", "--dram-capacity", f"{dram}blocks",
            "--nvme-capacity", f"{nvme}blocks", "--block-bytes", "16KiB",
            "--data-dir", fast_dir / "d", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["capacity_blocks"] == {"dram": dram, "nvme": nvme}
    assert d["warnings"] == [] and d["skipped_blocks"] == 0
    assert lo["block_hit_ratio"] - 0.002 <= d["block_hit_ratio"] <= hi["block_hit_ratio"] + 0.002
    assert d["verify_failures"] == 0
    assert d["hits"]["nvme"] > 0 and d["hits"]["dram"] + d["hits"]["nvme"] == d["hit_blocks"]
    assert d["tiers"]["nvme"]["written_bytes"] > 0 and d["tiers"]["nvme"]["read_bytes"] > 0


def test_replay_into_a_data_dir_survives_reopen(cli, trace_file, tmp_path):
    """Blocks a replay stored into a data dir (NVMe copies written behind, drained by the clean
    close) are hits (and verify) after the store is closed and the same replay runs again on the
    same dir."""
    pytest.importorskip("tierstore.tiers.nvme")
    args = ("replay", trace_file, "--payload", "bytes", "--dram-capacity", "16blocks",
            "--nvme-capacity", "2000blocks", "--block-bytes", "16KiB",
            "--data-dir", tmp_path / "d", "--limit", "50", "--json")
    first = cli(*args)
    assert first.code == 0, first.stderr
    again = cli(*args)
    assert again.code == 0, again.stderr
    d = again.json()
    assert d["verify_failures"] == 0
    assert d["hits"]["nvme"] > 0
    assert d["block_hit_ratio"] > first.json()["block_hit_ratio"]


def _one_line_error(r, *needles: str) -> None:
    assert r.code == 2, (r.code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in r.stderr and r.stdout == ""
    for n in needles:
        assert n in lines[0]


@pytest.mark.parametrize("bad, why", [
    ('{"timestamp": 0, "input_length": 10, "hash_ids": [1, 2', "not valid JSON"),
    ('{"timestamp": 0, "input_length": 10}', "hash_ids"),
    ('{"timestamp": 0, "input_length": 10, "hash_ids": [1, "x"]}', "hash_ids"),
    ('{"timestamp": 0, "input_length": -5, "hash_ids": [1]}', "input_length"),
    ('[1, 2, 3]', "JSON object"),
])
def test_malformed_trace_line_is_one_line_exit_2(cli, tmp_path, bad, why):
    """A malformed line anywhere in the trace: exit 2, one stderr line naming file:line."""
    p = tmp_path / "bad.jsonl"
    good = json.dumps({"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1]})
    p.write_text(good + "\n\n" + bad + "\n" + good + "\n")
    _one_line_error(cli("replay", p, "--json"), f"{p}:3:", why)


@pytest.mark.parametrize("args, needle", [
    (("--capacity", "3X"), "3X"),
    (("--capacity", "lots"), "lots"),
    (("--payload", "bytes", "--dram-capacity", "1.5blocks"), "1.5blocks"),
    (("--block-bytes", "big"), "big"),
    (("--model", "gpt-9"), "gpt-9"),
    (("--policy", "nope"), "nope"),
    (("--payload", "sometimes"), "payload"),
])
def test_bad_option_value_is_one_line_exit_2(cli, trace_file, args, needle):
    """Capacity strings that do not parse and other bad values: exit 2, one line, no traceback."""
    _one_line_error(cli("replay", trace_file, *args), needle)


def test_missing_trace_is_exit_2(cli, tmp_path):
    _one_line_error(cli("replay", tmp_path / "nope.jsonl"), "does not exist")


def test_unknown_flag_through_console_entry_is_one_line_exit_2():
    """click's own usage errors also end as one line and exit 2 through ``main``."""
    p = subprocess.run([sys.executable, "-m", "tierstore_admin.app", "replay", "--bogus"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "--bogus" in p.stderr, p.stderr


@pytest.mark.parametrize("model, per_token", [
    ("llama3-8b", 128 * 1024),       # 2 x 32 layers x 8 heads x 128 x 2 bytes
    ("llama3-70b", 320 * 1024),      # 2 x 80 x 8 x 128 x 2
    ("qwen2-7b", 56 * 1024),         # 2 x 28 x 4 x 128 x 2
    ("deepseek-v3", 61 * 576 * 2),   # MLA: one 576-wide latent per layer
])
def test_model_presets_set_block_bytes(cli, trace_file, model, per_token):
    """Payload none defaults to the model's block: bytes/token x 512; --model is in the result."""
    r = cli("replay", trace_file, "--model", model, "--limit", "3", "--payload", "none", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["model"] == model and d["bytes_per_token"] == per_token
    assert d["block_bytes"] == per_token * 512


def test_progress_callback_reaches_total(trace_file):
    from tierstore.sim.replay import ReplayOptions, replay

    seen = []
    replay(ReplayOptions(trace=str(trace_file), limit=50), progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1] == (50, 50) and all(t == 50 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_long_request_warning(cli, trace_file):
    """A DRAM tier smaller than the longest request is reported (stderr and JSON warnings)."""
    r = cli("replay", trace_file, "--capacity", "10blocks", "--json")
    assert r.code == 0
    assert r.json()["warnings"] and "warning: the longest request" in r.stderr
