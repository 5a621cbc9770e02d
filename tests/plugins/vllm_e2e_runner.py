"""One vLLM process for the end-to-end tests and the TTFT benchmark (run as a script).

    python vllm_e2e_runner.py make-model DIR
    python vllm_e2e_runner.py run --model DIR --prompts P.json --out O.json [--connector JSON]
                                  [--no-prefix-caching] [--max-tokens N] [--params-in F]

``--connector`` is the ``kv_transfer_config`` dict (JSON) or absent for a plain engine.
``P.json`` is ``[{"tokens": [...], "salt": str|null}, ...]``; ``--params-in`` is a JSON list of
per-prompt ``kv_transfer_params`` (a P/D consumer gets the producer's). The output file holds,
per prompt, the generated token ids, ``num_cached_tokens`` and ``kv_transfer_params``, plus the
connector's counters when the engine runs in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def make_model(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      torch_dtype="bfloat16", tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    # larger weights than the default init: greedy outputs then depend visibly on every token
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    model.to(torch.bfloat16).save_pretrained(path)


def _connector(model_runner_engine):
    """The scheduler-side and worker-side connector instances (in-process engine only)."""
    sched = worker = None
    try:
        core = model_runner_engine.engine_core.engine_core
        sched = core.scheduler.connector
        from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

        worker = get_kv_transfer_group()
    except Exception:
        pass
    return sched, worker


def _drain(engine, timeout_s: float = 30.0) -> None:
    """Step the in-process engine until its scheduler holds no request. Offline ``generate``
    returns once a request's output is done, but a request whose connector save is still being
    copied keeps its blocks (``delay_free_blocks``) until a later step reports the copy; ``vllm
    serve`` keeps stepping for it (``Scheduler.has_requests``), an offline run must do it here,
    else the last prompt's saves are dropped at shutdown."""
    try:
        core = engine.engine_core.engine_core
        sched = core.scheduler
    except AttributeError:   # the engine runs in another process: nothing to drive from here
        return
    deadline = time.monotonic() + timeout_s
    while sched.has_requests() and time.monotonic() < deadline:
        core.step_fn()
        time.sleep(0.005)


def run(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.load(open(args.prompts))
    params_in = json.load(open(args.params_in)) if args.params_in else [None] * len(prompts)
    kw = {}
    if args.connector:
        kw["kv_transfer_config"] = json.loads(args.connector)
    t0 = time.perf_counter()
    llm = LLM(model=args.model, skip_tokenizer_init=True, block_size=32, enforce_eager=True,
              dtype="bfloat16", max_model_len=4096, max_num_batched_tokens=4096,
              enable_prefix_caching=not args.no_prefix_caching, seed=0, **kw)
    init_s = time.perf_counter() - t0
    results = []
    timings = []
    for i, (p, kvp) in enumerate(zip(prompts, params_in)):
        extra = {"kv_transfer_params": kvp} if kvp else None
        sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                            extra_args=extra)
        tp = TokensPrompt(prompt_token_ids=p["tokens"])
        if p.get("salt"):
            tp["cache_salt"] = p["salt"]
        t = time.perf_counter()
        out = llm.generate([tp], sp, use_tqdm=False)[0]
        timings.append(time.perf_counter() - t)
        results.append({"tokens": list(out.outputs[0].token_ids),
                        "num_cached_tokens": out.num_cached_tokens,
                        "kv_transfer_params": out.kv_transfer_params})
    _drain(llm.llm_engine)
    sched, worker = _connector(llm.llm_engine)
    counters = {}
    if sched is not None and getattr(sched, "scheduler_side", None) is not None:
        counters["scheduler"] = sched.scheduler_side.counters
        try:
            counters["store"] = dict(sched.scheduler_side.client.stats().get("counters", {}))
        except Exception:
            pass
    if worker is not None and getattr(worker, "worker_side", None) is not None:
        counters["worker"] = worker.worker_side.counters
    json.dump({"results": results, "timings_s": timings, "init_s": init_s,
               "counters": counters}, open(args.out, "w"), default=str)
    # close the store cleanly (flushes, releases the data dir lock)
    try:
        if sched is not None:
            sched.shutdown()
        if worker is not None:
            worker.shutdown()
    except Exception:
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("path")
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--prompts", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--connector")
    r.add_argument("--params-in")
    r.add_argument("--no-prefix-caching", action="store_true")
    r.add_argument("--max-tokens", type=int, default=8)
    a = ap.parse_args(argv)
    if a.cmd == "make-model":
        make_model(a.path)
    else:
        run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
