"""Settings a person can trust (issue 14 items 3 and 4, case CFG-35): unknown names are errors
with a did-you-mean, one type rule for TOML and the environment, one capacity grammar for the
CLI and the config, and `tierstore config show` says every key's value and where it came from.
Every test runs the real `tierstore` entry point in a subprocess."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from cli_support import clean_env, write_config  # noqa: E402

from tierstore.settings import KEYS  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _show(ts, tmp_path, toml: str | None = None, env: dict | None = None, *args):
    argv = ["config", "show", "--json"]
    if toml is not None:
        argv += ["--config", write_config(tmp_path / "ts.toml", toml)]
    return ts(*argv, *args, env=clean_env(**(env or {})))


def _error(r) -> str:
    assert r.code == 2, r
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r
    assert r.json()["error"]["code"] == 2       # --json: the error is a JSON object on stdout
    return lines[0]


@pytest.mark.parametrize("toml, env, needles", [
    ('[dram]\ncapacty = "1GiB"\n', None, ["unknown setting [dram] capacty", "did you mean capacity?"]),
    ('[drm]\ncapacity = "1GiB"\n', None, ["unknown section [drm]", "did you mean dram?"]),
    (None, {"TIERSTORE_DRAM_CAPACTY": "1GiB"},
     ["unknown environment variable TIERSTORE_DRAM_CAPACTY", "TIERSTORE_DRAM_CAPACITY"]),
    ('[dram]\npolicy = "lur"\n', None, ["unknown eviction policy 'lur'", "did you mean lru?"]),
    ('[daemon]\nlog_level = "loud"\n', None, ["log_level", "'loud' is not one of debug"]),
    ('[dram]\ncapacity = "4MiB"\ncapacity_blocks = 3\n', None, ["both set"]),
    ('[metrics]\nenabled = "yes"\n', None, ["[metrics] enabled must be true or false, got 'yes'"]),
    (None, {"TIERSTORE_METRICS_ENABLED": "yes"}, ["[metrics] enabled must be true or false, got 'yes'"]),
    (None, {"TIERSTORE_NVME_WRITE_THROUGH": "maybe"}, ["write_through must be true or false"]),
    ('[metrics]\nport = "x"\n', None, ["[metrics] port must be a whole number"]),
    ('[daemon]\nlog_level = 3\n', None, ["log_level must be a string"]),
    ('[dram]\ncapacity = "4194304"\n', None, ["no unit", "4194304B or 4MiB", "4194304blocks"]),
    ('[dram]\ncapacity = 4194304\n', None, ["no unit"]),
    ('[dram]\ncapacity = "3M"\n', None, ["counts tokens", "bytes", "blocks"]),
    ('[nvme]\ncapacity = "1TiB"\nwrite_through = false\n', None, ["write_through = false"]),
    ('[store]\nslot_bytes = "1B"\n', None, ["slot_bytes '1B' is smaller than a disk sector"]),
])
def test_bad_settings_are_one_line_errors(tmp_path, toml, env, needles):
    """CFG-35 (a misspelled key) and issue 14 item 3: values that used to be accepted, or
    silently ignored, are refused in one line; the file and the environment alike. (In-process,
    the rule; test_bad_settings_through_the_cli shows what the command line makes of it.)"""
    from tierstore.errors import ConfigError
    from tierstore.settings import load_settings

    path = write_config(tmp_path / "ts.toml", toml) if toml is not None else None
    with pytest.raises(ConfigError) as e:
        load_settings(path, env=env or {})
    line = str(e.value)
    assert "\n" not in line
    for n in needles:
        assert n in line, line


@pytest.mark.parametrize("toml, env, needle", [
    ('[dram]\ncapacty = "1GiB"\n', None, "did you mean capacity?"),
    (None, {"TIERSTORE_DRAM_CAPACTY": "1GiB"}, "did you mean TIERSTORE_DRAM_CAPACITY?"),
    ('[metrics]\nenabled = "yes"\n', None, "must be true or false"),
])
def test_bad_settings_through_the_cli(ts, tmp_path, toml, env, needle):
    """The same errors from `tierstore config show` (and `daemon start`): one stderr line, exit 2,
    with --json the error object on stdout."""
    assert needle in _error(_show(ts, tmp_path, toml, env))


def test_one_type_rule_for_file_and_environment(ts, tmp_path):
    """Text is read by the key's type wherever it comes from: "true" (a TOML string) and
    TIERSTORE_METRICS_ENABLED=true mean the same; a TOML string list is comma-separated like the
    environment."""
    a = _show(ts, tmp_path, '[metrics]\nenabled = "true"\nport = "9465"\n')
    b = _show(ts, tmp_path, None, {"TIERSTORE_METRICS_ENABLED": "true", "TIERSTORE_METRICS_PORT": "9465"})
    for r in (a, b):
        assert r.code == 0, r
        rows = {(x["section"], x["key"]): x for x in r.json()["keys"]}
        assert rows[("metrics", "enabled")]["value"] is True
        assert rows[("metrics", "port")]["value"] == 9465


def test_config_show_prints_every_key_with_its_source(ts, tmp_path):
    """CFG-35: `tierstore config show` prints the effective value of every key and where it came
    from: default, file, env, flag."""
    r = _show(ts, tmp_path, '[dram]\ncapacity = "8GiB"\n', {"TIERSTORE_DRAM_POLICY": "lru"},
              "--socket", tmp_path / "x.sock")
    assert r.code == 0, r
    rows = {(x["section"], x["key"]): x for x in r.json()["keys"]}
    assert set(rows) == {(k.section, k.name) for k in KEYS}
    assert rows[("dram", "capacity")]["source"] == "file" and rows[("dram", "capacity")]["value"] == "8GiB"
    assert rows[("dram", "policy")]["source"] == "env" and rows[("dram", "policy")]["value"] == "lru"
    assert rows[("daemon", "socket")]["source"] == "flag"
    assert rows[("nvme", "policy")]["source"] == "default"
    assert all(x["env"].startswith("TIERSTORE_") for x in rows.values())
    human = ts("config", "show", "--config", tmp_path / "ts.toml", env=clean_env())
    assert human.code == 0 and "[dram] capacity" in human.stdout and "8GiB" in human.stdout


def test_slot_size_that_wastes_dram_is_said(ts, tmp_path):
    """Issue 14 item 3: `slot_bytes` below a 4 KiB multiple silently took 4 KiB per slot; the
    warning says so, and a capacity in bytes counts the slots as they are."""
    r = _show(ts, tmp_path, '[store]\nslot_bytes = 5000\n[dram]\ncapacity = "80KiB"\n')
    assert r.code == 0, r
    assert "every slot takes 8.0 KiB of DRAM" in r.stderr, r
    from tierstore.settings import load_settings
    s = load_settings(tmp_path / "ts.toml", env={})
    assert s.store.dram.capacity_blocks == 10        # 80 KiB / 8 KiB slots, not / 5000 bytes


def test_inapplicable_keys_warn(ts, tmp_path):
    """CFG-35 ("one key valid for another mode"): an [nvme] key without an NVMe tier and a
    [peers] key with peers off are named in a warning (the daemon logs the same at start)."""
    r = _show(ts, tmp_path, '[nvme]\npolicy = "lru"\n[peers]\nstreams = 4\n')
    assert r.code == 0, r
    assert "warning: [nvme] policy set but there is no NVMe tier" in r.stderr
    assert "warning: [peers] streams set but peers are off" in r.stderr
    assert len(r.json()["warnings"]) == 2


def test_one_capacity_grammar_for_cli_and_config(ts, tmp_path):
    """Issue 14 item 4: a bare number is refused with the same message by the CLI and the
    config; with a unit, both read it the same way."""
    cli = ts("replay", "--capacity", "4194304", "--requests", "5")
    cfg = _show(ts, tmp_path, '[dram]\ncapacity = "4194304"\n')
    for r in (cli, cfg):
        assert r.code == 2 and "capacity '4194304' has no unit" in r.stderr, r
    ok = ts("replay", "--capacity", "4194304B", "--block-bytes", "64KiB", "--requests", "5", "--json",
            "--baseline", "none")
    assert ok.code == 0, ok
    assert ok.json()["capacity_blocks"]["dram"] == 64


# ------------------------------------------------------------------ data dirs (in-process, quick)
def _settings(tmp_path, toml: str):
    from tierstore.settings import load_settings
    return load_settings(write_config(tmp_path / "r.toml", toml), env={}, data_dir=str(tmp_path / "d"))


def test_reconcile_applies_safe_changes_and_refuses_the_rest_with_how(tmp_path):
    """Issue 14 item 2 (the rule itself; the CLI form is the slow
    test_changes_to_an_existing_data_dir_are_applied_or_refused_with_how): only keys that are
    set count; DRAM capacity/policy and a larger NVMe tier apply, a new slot size, a smaller NVMe
    tier or another NVMe path are refused with the data dir's value and what to do."""
    from tierstore.errors import ConfigError
    from tierstore.settings import reconcile_store

    base = '[store]\nslot_bytes = "64KiB"\n[dram]\ncapacity = "64blocks"\n[nvme]\ncapacity = "512blocks"\n'
    stored = _settings(tmp_path, base).store
    same, changes = reconcile_store(stored, _settings(tmp_path, ""), tmp_path / "d")
    assert same == stored and changes == []            # defaults never override store.json
    new, changes = reconcile_store(stored, _settings(tmp_path, base.replace(
        '"64blocks"', '"96blocks"\npolicy = "lru"').replace('"512blocks"', '"1024blocks"')), tmp_path / "d")
    assert (new.dram.capacity_blocks, new.dram.policy, new.nvme.capacity_blocks) == (96, "lru", 1024)
    assert len(changes) == 3
    for text, needle in ((base.replace('"64KiB"', '"128KiB"'), "slot_bytes = 64.0 KiB"),
                         (base.replace('"512blocks"', '"100blocks"'), "512blocks or more"),
                         (base + 'path = "/elsewhere"\n', "[nvme] path"),
                         (base.replace('"512blocks"', '"0"'), "NVMe tier")):
        with pytest.raises(ConfigError) as e:
            reconcile_store(stored, _settings(tmp_path, text), tmp_path / "d")
        assert needle in str(e.value) and "new --data-dir" in str(e.value), str(e.value)
