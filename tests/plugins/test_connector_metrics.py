"""The connector's token accounting (case MET-38, issue 15 item 2), driven by the vLLM stand-in
(tests/plugins/minivllm.py) over a real embedded store; disk faults are a wrapped NVMe
``read_batch`` (as tests/core/test_store_nvme.py). vLLM's own /metrics is read in
test_vllm_metrics.py (real vLLM)."""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tierstore.tiers.nvme")

sys.path.insert(0, os.path.dirname(__file__))
from minivllm import FailingReads, MiniVLLM, _Blocks  # noqa: E402

from tierstore.types import Tier  # noqa: E402

BS = 16
NB = 5                      # full blocks per prompt
PROMPT = NB * BS + 4        # 84 tokens: all 5 full blocks are loadable (>= 1 token left)
T = NB * BS                 # tokens a full hit delivers


def prompt(seed: int) -> list[int]:
    return [(seed * 131 + 7 * i) % 500 + 1 for i in range(PROMPT)]


class DecliningVLLM(MiniVLLM):
    """vLLM that declines the external tokens of the requests in ``decline`` (allocates no
    external blocks: ``update_state_after_alloc(..., 0)``) and computes them itself."""

    decline: set = set()

    def _admit(self, r):
        if r.request_id not in self.decline:
            return super()._admit(r)
        ext, _ = self.sched.get_num_new_matched_tokens(r, 0)
        assert ext == T
        self._alloc(r, r.num_prompt_tokens)
        self.sched.update_state_after_alloc(r, _Blocks(r.block_ids), 0)
        r.status = "running"
        return r.num_prompt_tokens


def _put(e, tokens):
    keys = e.sched.keyers[0].chain(tokens)
    ns = e.sched.namespaces[0]
    e.client.put(keys, ns, [bytes([i % 251]) * ns.block_bytes for i in range(len(keys))])
    return keys


def _prom(render: bytes) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    return {f.name: f for f in text_string_to_metric_families(render.decode())}


def test_met38_token_outcomes_per_tier_and_stats_json_equals_prometheus(tmp_path, monkeypatch):
    """MET-38: 100 lookups — 40 full hits (DRAM), 20 partial (NVMe, EIO on block 3), 20 the
    engine declines, 20 misses — and one prefetch dropped for lack of DRAM room (every DRAM
    slot pinned). Promised, delivered, failed, declined and dropped tokens are separate
    counters per tier; per-tier delivered sums to the total delivered (and to what the worker
    copied); the hit ratio is delivered / looked up; the series are Prometheus counters and
    ``tierstore stats --json`` holds exactly the values of the daemon's Prometheus output."""
    bb = block_bytes()
    e = DecliningVLLM(tmp_path / "store", block_size=BS, dram_bytes=512 * bb,
                      nvme_bytes=2048 * bb)
    try:
        store = e.client.store
        full = [prompt(i) for i in range(40)]
        partial = [prompt(100 + i) for i in range(20)]
        declined = [prompt(200 + i) for i in range(20)]
        misses = [prompt(300 + i) for i in range(20)]
        dropped = prompt(400)
        for p in full + declined:
            _put(e, p)
        bad = []
        for p in partial + [dropped]:
            keys = _put(e, p)
            bad.append(keys[3])
        assert e.client.flush(timeout_s=60)
        for p in partial + [dropped]:
            keys = e.sched.keyers[0].chain(p)
            assert e.client.evict(keys, tier=Tier.DRAM)["evicted"] == NB   # NVMe only
        nvme = store.tiers[Tier.NVME]
        nvme.read_batch = FailingReads(nvme, bad[:20])

        e.decline = {f"decl{i}" for i in range(20)}
        reqs = ([(f"full{i}", p) for i, p in enumerate(full)]
                + [(f"part{i}", p) for i, p in enumerate(partial)]
                + [(f"decl{i}", p) for i, p in enumerate(declined)]
                + [(f"miss{i}", p) for i, p in enumerate(misses)])
        for rid, p in reqs:
            e.add(rid, p)
            e.run()
        assert e.sched.counters["lookups"] == 100

        # the dropped prefetch: every DRAM slot holds a pinned block, so the NVMe blocks of
        # `dropped` cannot be staged (store counter load_staging_failed)
        dram = store.tiers[Tier.DRAM]
        pinned: set = set()
        for i in range(200):
            resident = [k for k, h in store.res.handles()
                        if store.res.slot(h, Tier.DRAM) >= 0 and k not in pinned]
            assert e.client.pin(resident, ttl_s=300) == len(resident)
            pinned.update(resident)
            if dram.slots.free_count == 0:
                break
            _put(e, prompt(1000 + i))
        assert dram.slots.free_count == 0
        e.add("dropped", dropped)
        e.run()
        assert store.counters["load_staging_failed"] == 1

        want = {"lookup": 101 * T,
                "promised.dram": 40 * T, "delivered.dram": 40 * T,
                "promised.nvme": 20 * T + T, "delivered.nvme": 20 * 3 * BS,
                "failed.nvme": 20 * 2 * BS, "dropped.nvme": T,
                "declined.dram": 20 * T}
        assert e.sched.tokens == want
        delivered = want["delivered.dram"] + want["delivered.nvme"]
        assert e.sched.counters["delivered_tokens"] == delivered
        assert e.worker.counters["loaded_blocks"] * BS == delivered   # what was copied
        for tier in ("dram", "nvme"):   # every promised token has exactly one outcome
            assert want[f"promised.{tier}"] == sum(want.get(f"{o}.{tier}", 0) for o in
                                                   ("delivered", "failed", "dropped"))

        # the store's counters (what `tierstore stats` shows) got every report
        st = store.stats()
        c = st["counters"]
        tok = {k: v for k, v in c.items() if k.startswith("tokens_")}
        assert tok == {"tokens_" + k.replace(".", "_"): v for k, v in want.items()
                       if k != "lookup"}
        assert c["lookup_tokens"] == 101 * T
        assert sum(v for k, v in tok.items() if k.startswith("tokens_delivered_")) == delivered
        assert st["token_hit_ratio"] == round(delivered / (101 * T), 6)   # not promised

        # `tierstore stats --json` (the CLI's own code, on this store) vs Prometheus
        from typer.testing import CliRunner

        import tierstore_admin.stats as stats_cmd
        from tierstore.metrics import DaemonMetrics
        from tierstore_admin.app import app

        monkeypatch.setattr(stats_cmd, "open_client", lambda d, s: nullcontext(e.client))
        res = CliRunner().invoke(app, ["stats", "--json"])
        assert res.exit_code == 0, res.output
        js = json.loads(res.output)
        fams = _prom(DaemonMetrics(store.stats).render())
        tokens = fams["tierstore_tokens"]
        assert tokens.type == "counter" and fams["tierstore_lookup_tokens"].type == "counter"
        prom = {f"tokens_{s.labels['outcome']}_{s.labels['tier']}": s.value
                for s in tokens.samples if s.name == "tierstore_tokens_total"}
        assert prom == {k: v for k, v in js["counters"].items() if k.startswith("tokens_")}
        assert [s.value for s in fams["tierstore_lookup_tokens"].samples
                if s.name.endswith("_total")] == [js["counters"]["lookup_tokens"]]
        assert fams["tierstore_token_hit_ratio"].samples[0].value == js["token_hit_ratio"]
        hits = {s.labels["tier"]: s.value for s in fams["tierstore_load_hit_blocks"].samples
                if s.name.endswith("_total")}
        assert hits == {t["tier"]: js["counters"].get(f"load_hits_{t['tier']}", 0)
                        for t in js["tiers"]}
    finally:
        e.close()


def block_bytes() -> int:
    from minivllm import HEAD, HEADS, LAYERS

    from tierstore_plugins.vllm.backend import Geometry
    return Geometry(model="mini", revision="", kv_dtype="bfloat16", num_layers=LAYERS,
                    num_kv_heads=HEADS, head_size=HEAD, use_mla=False, block_size=BS,
                    tp_size=1, pp_size=1).namespace(0).block_bytes


def test_bad_token_report_is_rejected_and_jobs_still_complete(tmp_path):
    """A report with an unknown counter is refused (RejectedError), and the load jobs it came
    with are completed all the same (no pins left behind)."""
    from tierstore.errors import RejectedError

    e = MiniVLLM(tmp_path / "store", block_size=BS)
    try:
        keys = _put(e, prompt(1))
        assert e.client.flush(timeout_s=30)        # the flusher's own pins go
        job = e.client.prepare_loads([keys], wait=True)[0]
        assert e.client.store.pins.total() == NB
        with pytest.raises(RejectedError):
            e.client.complete_loads([job.job_id], tokens={"stolen.dram": 5})
        assert e.client.store.pins.total() == 0
        with pytest.raises(RejectedError):
            e.client.store.account_tokens({"delivered.dram": -1})
        assert not any(k.startswith("tokens_") for k in e.client.store.counters)
    finally:
        e.close()
