"""``tierstore tiers usage``, ``blocks ls|show|evict`` and ``check [--fix]`` on a data dir that a
replay filled (its blocks survive the replay's close in the NVMe tier)."""

from __future__ import annotations

import pytest

from tierstore.client import Client

BLOCK = 16 * 1024
RECORD = 4096 + BLOCK          # tiers/nvme.py: 4096-byte header + payload rounded to 4096
FILE_SLOTS = 64                # NvmeConfig.file_slots default


@pytest.fixture
def data_dir(cli, trace_file, tmp_path):
    pytest.importorskip("tierstore.tiers.nvme")
    d = tmp_path / "store"
    r = cli("replay", trace_file, "--payload", "bytes", "--dram-capacity", "64blocks",
            "--nvme-capacity", "1000blocks", "--block-bytes", "16KiB",
            "--data-dir", d, "--limit", "40", "--json")
    assert r.code == 0, r.stderr
    return d


def _keys(cli, d) -> list[dict]:
    r = cli("blocks", "ls", "--data-dir", d, "--limit", "0", "--json")
    assert r.code == 0, r.stderr
    return r.json()["blocks"]


def test_tiers_usage(cli, data_dir):
    r = cli("tiers", "usage", "--data-dir", data_dir, "--json")
    assert r.code == 0, r.stderr
    tiers = {t["tier"]: t for t in r.json()["tiers"]}
    assert tiers["dram"]["slots"] == 64 and tiers["nvme"]["slots"] == 1000
    assert tiers["nvme"]["used_slots"] > 0
    human = cli("tiers", "usage", "--data-dir", data_dir)
    assert human.code == 0 and "nvme" in human.stdout


def test_blocks_ls_and_show(cli, data_dir, monkeypatch):
    blocks = _keys(cli, data_dir)
    assert blocks and all("nvme" in b["tiers"] for b in blocks)
    assert all(b["size_bytes"] == BLOCK for b in blocks)
    r = cli("blocks", "ls", "--data-dir", data_dir, "--limit", "3", "--json")
    assert r.json()["count"] == 3 and r.json()["truncated"]
    key = blocks[0]["key"]
    monkeypatch.setenv("TIERSTORE_DATA_DIR", str(data_dir))       # env instead of --data-dir
    shown = cli("blocks", "show", key[:12], "--json")
    assert shown.code == 0, shown.stderr
    assert shown.json()["key"] == key and shown.json()["namespace"]["model"] == "llama3-8b"
    assert cli("blocks", "show", "ff" * 32).code == 1
    assert cli("blocks", "show", "xyz").code == 2


def test_blocks_evict_dry_run_confirmation_and_yes(cli, data_dir):
    blocks = _keys(cli, data_dir)
    key = blocks[0]["key"]
    dry = cli("blocks", "evict", key, "--dry-run", "--data-dir", data_dir, "--json")
    assert dry.code == 0, dry.stderr
    assert dry.json()["would_evict"] == 1 and len(_keys(cli, data_dir)) == len(blocks)
    refused = cli("blocks", "evict", key, "--data-dir", data_dir)   # no tty, no --yes
    assert refused.code == 2 and "--yes" in refused.stderr
    done = cli("blocks", "evict", key, "--yes", "--data-dir", data_dir, "--json")
    assert done.code == 0 and done.json()["evicted"] == 1
    assert cli("blocks", "show", key, "--data-dir", data_dir).code == 1
    assert len(_keys(cli, data_dir)) == len(blocks) - 1            # gone after reopen too
    everything = cli("blocks", "evict", "--all", "--yes", "--data-dir", data_dir, "--json")
    assert everything.json()["evicted"] == len(blocks) - 1 and _keys(cli, data_dir) == []
    assert cli("check", "--data-dir", data_dir).code == 0


def test_check_clean_then_corrupt_record_then_fix(cli, data_dir):
    """A clean dir checks 0; a payload byte flipped on disk is found (exit 1), --fix drops the
    record, and the dir is clean afterwards."""
    r = cli("check", "--data-dir", data_dir, "--json")
    assert r.code == 0, r.stdout + r.stderr
    assert r.json()["clean"] and r.json()["problems"] == []
    victim = _keys(cli, data_dir)[0]
    slot = victim["slots"]["nvme"]
    slab = data_dir / "nvme" / "slabs" / f"slab-{slot // FILE_SLOTS:05d}.dat"
    off = (slot % FILE_SLOTS) * RECORD + 4096 + 100
    with open(slab, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    bad = cli("check", "--data-dir", data_dir, "--json")
    assert bad.code == 1, bad.stdout + bad.stderr
    assert bad.json()["problems"] and not bad.json()["clean"]
    fixed = cli("check", "--fix", "--data-dir", data_dir, "--json")
    # issue 14 item 7: everything found was fixed ("0 remaining"): exit 0, not 1
    assert fixed.code == 0 and fixed.json()["fixed"] and fixed.json()["remaining"] == []
    assert cli("check", "--data-dir", data_dir).code == 0
    assert victim["key"] not in {b["key"] for b in _keys(cli, data_dir)}


def test_busy_and_missing_data_dir_are_exit_2(cli, data_dir, tmp_path):
    holder = Client.embedded(data_dir, create=False)
    try:
        for args in (("tiers", "usage"), ("blocks", "ls"), ("check",)):
            r = cli(*args, "--data-dir", data_dir)
            assert r.code == 2 and "in use" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        holder.close()
    r = cli("check", "--data-dir", tmp_path / "nothing-here")
    assert r.code == 2 and "not a tierstore data dir" in r.stderr
    r = cli("blocks", "ls")
    assert r.code == 2 and "TIERSTORE_DATA_DIR" in r.stderr


def test_dram_only_data_dir_is_empty_after_reopen(cli, trace_file, tmp_path):
    """Without NVMe nothing survives the replay: ls is empty and check is clean."""
    d = tmp_path / "dram-only"
    r = cli("replay", trace_file, "--payload", "bytes", "--dram-capacity", "64blocks",
            "--nvme-capacity", "0", "--block-bytes", "16KiB", "--data-dir", d, "--limit", "20",
            "--json")
    assert r.code == 0, r.stderr
    assert _keys(cli, d) == []
    assert cli("check", "--data-dir", d).code == 0


def test_listing_prints_client_strings_verbatim(cli, tmp_path):
    """Adversarial finding: a namespace model named "[/x]" (any client may choose it) crashed
    `blocks ls` with a rich MarkupError; strings print as themselves."""
    pytest.importorskip("tierstore.tiers.nvme")
    from tierstore.client import Client
    from tierstore.config import DramConfig, NvmeConfig, StoreConfig
    from tierstore.keys import Namespace

    d = tmp_path / "d"
    ns = Namespace("[/x] :b:", 16)
    with Client.embedded(d, StoreConfig(slot_bytes=4096, dram=DramConfig(capacity_blocks=4),
                                        nvme=NvmeConfig(path="", capacity_blocks=8,
                                                        write_through=True))) as c:
        keys = c.keyer(ns).chain(list(range(16)))
        c.put(keys, ns, [b"x" * 4096])
    r = cli("blocks", "ls", "--data-dir", d)
    assert r.code == 0, r.stderr
    assert "[/x] :b:" in r.stdout


def test_blocks_ls_of_a_tier_the_store_lacks_says_so(cli, trace_file, tmp_path):
    """``blocks ls --tier nvme`` on a store without an NVMe tier: one line saying so and exit 1
    ("not in that tier"), not "0 block(s)" as if the tier were empty (a fresh-clone finding)."""
    d = tmp_path / "dram-only"
    r = cli("replay", trace_file, "--payload", "bytes", "--dram-capacity", "64blocks",
            "--nvme-capacity", "0", "--block-bytes", "16KiB", "--data-dir", d, "--limit", "5",
            "--json")
    assert r.code == 0, r.stderr
    r = cli("blocks", "ls", "--data-dir", d, "--tier", "nvme")
    assert r.code == 1 and "no nvme tier" in r.stderr
    assert cli("blocks", "ls", "--data-dir", d, "--tier", "dram").code == 0
    # evict --tier of the missing tier answers the same (it said "would evict 0", exit 0)
    for extra in (["--dry-run"], ["--yes"]):
        r = cli("blocks", "evict", "--all", "--tier", "nvme", "--data-dir", d, *extra)
        assert r.code == 1 and "no nvme tier" in r.stderr, (extra, r.stdout, r.stderr)
    r = cli("blocks", "evict", "--all", "--tier", "dram", "--data-dir", d, "--dry-run")
    assert r.code in (0, 1) and "no dram tier" not in r.stderr
