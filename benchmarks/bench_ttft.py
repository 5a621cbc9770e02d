"""Time to first token of a 2,048-token prompt: a full tierstore hit against recomputation.

    python benchmarks/bench_ttft.py [--model DIR] [--tokens 2048]

Needs vLLM (the venv of .ci/vllm-env.sh). One engine process (tiny random Llama on CPU unless
--model names another; block size 32; vLLM's own prefix cache off so that every hit comes from
tierstore): a warm-up prompt, then prompt A once cold (computed, its blocks saved to the
embedded store's DRAM tier), then A again (all full blocks loaded from tierstore, vLLM computes
the rest of the last block). TTFT = wall time of a generate() with max_tokens=1. The ratio is
from this one run.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[1] / "tests" / "plugins" / "vllm_e2e_runner.py"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model dir (default: a tiny random Llama made here)")
    ap.add_argument("--tokens", type=int, default=2048)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        t = Path(td)
        model = a.model
        if model is None:
            model = str(t / "model")
            subprocess.run([sys.executable, str(RUNNER), "make-model", model], check=True,
                           capture_output=True)
        rng = random.Random(3)
        warm = [rng.randrange(1, 500) for _ in range(a.tokens)]
        prompt = [rng.randrange(1, 500) for _ in range(a.tokens)]
        (t / "p.json").write_text(json.dumps([{"tokens": x} for x in (warm, prompt, prompt)]))
        conn = {"kv_connector": "TierStoreConnector",
                "kv_connector_module_path": "tierstore_plugins.vllm.connector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"data_dir": str(t / "store"),
                                              "dram_bytes": 256 << 20, "nvme_bytes": 0}}
        r = subprocess.run([sys.executable, str(RUNNER), "run", "--model", model, "--prompts",
                            str(t / "p.json"), "--out", str(t / "o.json"), "--max-tokens", "1",
                            "--no-prefix-caching", "--connector", json.dumps(conn)],
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
            return 1
        out = json.loads((t / "o.json").read_text())
    _, cold_s, hit_s = out["timings_s"]
    cold, hit = out["results"][1], out["results"][2]
    assert cold["tokens"] == hit["tokens"], "a hit must not change the output"
    print(f"TTFT, {a.tokens}-token prompt, block size 32, vLLM CPU, one run")
    print(f"{'case':<34}{'cached tokens':>14}{'TTFT ms':>10}")
    print(f"{'recompute (miss; blocks saved)':<34}{cold['num_cached_tokens']:>14}{cold_s * 1e3:>10.1f}")
    print(f"{'full hit (loaded from tierstore)':<34}{hit['num_cached_tokens']:>14}{hit_s * 1e3:>10.1f}")
    print(f"speed-up (recompute / hit): {cold_s / hit_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
