"""A small stand-in for vLLM's scheduler and model runner, to drive the connector's two halves
(plugins/vllm/scheduler_side.py, worker_side.py) without vLLM: the same hooks, in the order
vLLM 0.32/0.33 calls them (docs: ../shared/docs/VLLM.md §1), over a real embedded store and a
paged KV cache of CPU tensors.

The "model" writes each token's KV as a function of the token and of the KV of the token before
it (a chain), so a block computed on top of wrong or missing KV differs from the right one: what
makes the failed-load rule observable (issue 12). Only what the connector can see is modelled:
one KV cache group, prefix-cache off (vLLM's own cache never hits), greedy admission, prompts
computed in chunks of at most ``chunk`` tokens, then ``max_tokens`` decode steps.

``async_sched=True`` models vLLM's async scheduling (cases ABT-32, CHK-34): step N+1 is scheduled
(its connector metadata built) before step N ran on the worker and before its output came back;
the scheduler output carries each request's position like vLLM's ``scheduled_new_reqs`` /
``scheduled_cached_reqs``, while the request's own ``num_computed_tokens`` lags (it advances
when a step's output is processed). ``steps`` gives a request's prefill step sizes; ``preempt``
frees a running request's blocks as vLLM's preemption does (the request starts over);
``abort`` ignores requests that already finished, as vLLM's ``finish_requests`` does.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from tierstore.tiers.slot_tier import DiskResult
from tierstore_plugins.vllm.backend import Geometry, acquire_client, release_client
from tierstore_plugins.vllm.metadata import PluginSettings, TierStoreWorkerMeta
from tierstore_plugins.vllm.scheduler_side import SchedulerSide
from tierstore_plugins.vllm.worker_side import WorkerSide

LAYERS, HEADS, HEAD = 2, 2, 16


def token_kv(token: int, prev: int) -> int:
    """The model: a token's KV 'seed' from its id and the previous token's seed."""
    h = hashlib.blake2b(f"{token}:{prev}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF


def kv_values(seed: int) -> torch.Tensor:
    """``[LAYERS, HEADS, 2*HEAD]`` bf16 values of one token's KV."""
    base = torch.arange(LAYERS * HEADS * 2 * HEAD, dtype=torch.float32)
    return ((base * 0.013 + (seed % 9973) * 0.1) % 7.0).to(torch.bfloat16).view(
        LAYERS, HEADS, 2 * HEAD)


@dataclass
class Req:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int = 1
    kv_transfer_params: dict | None = None
    cache_salt: str | None = None
    lora_request: object = None
    mm_features: object = None
    num_computed_tokens: int = 0
    output: list[int] = field(default_factory=list)
    status: str = "waiting"          # waiting | loading | running | finished
    block_ids: list[int] = field(default_factory=list)
    loaded_tokens: int = 0           # external tokens vLLM accepted
    delayed: bool = False
    scheduled: int = 0               # async: tokens scheduled (vLLM's num_computed_tokens)
    prefill_steps: int = 0           # async: prefill steps scheduled (index into ``steps``)
    epoch: int = 0                   # async: preemptions so far (stale in-flight output)
    decodes: int = 0                 # async: decode tokens scheduled

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class _Blocks:
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return (list(self.ids),)


@dataclass
class NewReqData:
    req_id: str
    num_computed_tokens: int


@dataclass
class CachedReqData:
    req_ids: list = field(default_factory=list)
    num_computed_tokens: list = field(default_factory=list)
    resumed_req_ids: set = field(default_factory=set)


@dataclass
class SchedOut:
    num_scheduled_tokens: dict
    preempted_req_ids: set = field(default_factory=set)
    finished_req_ids: set = field(default_factory=set)
    scheduled_new_reqs: list | None = None
    scheduled_cached_reqs: CachedReqData | None = None


@dataclass
class _Planned:
    """An async step scheduled but not run yet: what the worker gets and what the forward does."""
    out: SchedOut
    meta: object
    work: list          # (request, first token, n tokens, block ids at schedule, epoch)


@dataclass
class ConnOut:
    kv_connector_worker_meta: TierStoreWorkerMeta | None = None
    finished_sending: set | None = None
    finished_recving: set | None = None
    invalid_block_ids: set = field(default_factory=set)


class MiniVLLM:
    """One engine (scheduler half + one worker) on an embedded store in ``data_dir``, or on a
    daemon's store with ``socket=`` (then ``data_dir`` is unused)."""

    def __init__(self, data_dir, *, block_size: int = 16, num_blocks: int = 128,
                 role: str = "kv_both", chunk: int = 10_000, async_sched: bool = False,
                 steps: list[int] | None = None, **settings) -> None:
        self.bs = block_size
        self.chunk = chunk
        self.async_sched = async_sched
        self.prefill_steps = list(steps) if steps else [chunk]
        self._inflight: list[_Planned] = []
        self._preempted: set[str] = set()
        self._finished_ids: set[str] = set()
        self.frees: dict[str, int] = {}          # request id -> times its blocks were freed
        self.geo = Geometry(model="mini", revision="", kv_dtype="bfloat16", num_layers=LAYERS,
                            num_kv_heads=HEADS, head_size=HEAD, use_mla=False,
                            block_size=block_size, tp_size=1, pp_size=1)
        settings.setdefault("dram_bytes", 64 * self.geo.namespace(0).block_bytes)
        settings.setdefault("nvme_bytes", 512 * self.geo.namespace(0).block_bytes)
        if settings.get("socket"):   # the node's daemon (data_dir unused)
            settings.pop("dram_bytes")
            settings.pop("nvme_bytes")
            self.settings = PluginSettings(**settings)
        else:
            self.settings = PluginSettings(data_dir=str(data_dir), **settings)
        self.client = acquire_client(self.settings, self.geo.namespace(0).block_bytes)
        self.sched = SchedulerSide(self.client, self.geo, self.settings, role=role,
                                   engine_id="mini")
        self.sched.bind_kv_cache_manager(self)
        self.worker = WorkerSide(self.settings, self.geo, tp_rank=0, pp_rank=0)
        self.kv = torch.zeros(LAYERS, num_blocks, HEADS, block_size, 2 * HEAD,
                              dtype=torch.bfloat16)
        self.worker.register_kv_caches({f"layers.{i}": self.kv[i] for i in range(LAYERS)})
        self.free = list(range(1, num_blocks))    # block 0 is vLLM's null block
        self.reqs: dict[str, Req] = {}
        self.finished_recving: set[str] = set()
        self.outputs: dict[str, dict] = {}
        self.steps = 0

    # ---------------------------------------------------------------- what the connector calls
    def get_block_ids(self, req_id: str):
        r = self.reqs.get(req_id)     # vLLM's manager: a request without blocks has none
        return (list(r.block_ids) if r is not None else [],)

    # ---------------------------------------------------------------- the model
    def _compute(self, r: Req, lo: int, hi: int, block_ids: list[int] | None = None) -> None:
        """Write the KV of tokens [lo, hi) of ``r``, each from its token and the KV bytes of the
        token before it (whatever is in the cache: loaded, computed, or garbage), into
        ``block_ids`` (default: the request's blocks now)."""
        ids = r.block_ids if block_ids is None else block_ids
        for p in range(lo, hi):
            if p == 0:
                prev = 0
            else:
                b, o = ids[(p - 1) // self.bs], (p - 1) % self.bs
                prev = int.from_bytes(hashlib.blake2b(
                    self.kv[:, b, :, o, :].contiguous().view(torch.uint8).numpy().tobytes(),
                    digest_size=4).digest(), "little")
            if p < r.num_prompt_tokens:
                tok = r.prompt_token_ids[p]
            else:
                i = p - r.num_prompt_tokens
                tok = r.output[i] if i < len(r.output) else 0
            b, o = ids[p // self.bs], p % self.bs
            self.kv[:, b, :, o, :] = kv_values(token_kv(tok, prev))

    def block_bytes(self, req: Req, i: int) -> torch.Tensor:
        """Block ``i`` of ``req`` as it sits in the KV cache, ``[LAYERS, HEADS, bs, 2*HEAD]``."""
        return self.kv[:, req.block_ids[i]].clone()

    # ---------------------------------------------------------------- the engine
    def add(self, req_id: str, tokens: list[int], **kw) -> Req:
        r = Req(req_id, list(tokens), **kw)
        self.reqs[req_id] = r
        return r

    def _alloc(self, r: Req, n_tokens: int) -> None:
        need = -(-n_tokens // self.bs) - len(r.block_ids)
        for _ in range(max(0, need)):
            r.block_ids.append(self.free.pop(0))

    def _admit(self, r: Req) -> int | None:
        """vLLM's admission: ask the connector, allocate, tell it. Returns tokens to compute
        now (0 while an async load runs), None when not admitted this step."""
        ext, is_async = self.sched.get_num_new_matched_tokens(r, 0)
        if ext is None:
            return None
        # async: blocks for the external tokens only (vLLM allocates the rest once they arrived)
        self._alloc(r, ext if is_async else min(r.num_prompt_tokens, ext + self.chunk))
        self.sched.update_state_after_alloc(r, _Blocks(r.block_ids), ext)
        r.loaded_tokens = ext
        r.num_computed_tokens = ext
        if is_async:
            r.status = "loading"
            return 0
        r.status = "running"
        return min(self.chunk, r.num_prompt_tokens - ext)

    def step(self) -> int:
        if self.async_sched:
            return self._step_async()
        return self._step_sync()

    def _step_sync(self) -> int:
        """One engine step: schedule, build metadata, run the worker hooks around a forward,
        process the output (invalid blocks, finished requests, connector output). Returns
        the number of requests that computed."""
        self.steps += 1
        sched: dict[str, int] = {}
        for r in self.reqs.values():
            if r.status == "loading" and r.request_id in self.finished_recving:
                self.finished_recving.discard(r.request_id)
                r.status = "running"
                self._alloc(r, r.num_prompt_tokens)
            if r.status == "waiting":
                n = self._admit(r)
                if n:
                    sched[r.request_id] = n
            elif r.status == "running":
                left = r.num_prompt_tokens - r.num_computed_tokens
                n = min(self.chunk, left) if left > 0 else 1
                self._alloc(r, r.num_computed_tokens + n)
                sched[r.request_id] = n
        out = SchedOut(sched)
        meta = self.sched.build_connector_meta(out)
        w = self.worker
        w.handle_preemptions(meta)
        w.bind(meta)
        sync = any(not s.is_async for s in meta.loads)
        if sync:
            w.start_load_kv(meta)
        for rid, n in sched.items():          # the forward
            r = self.reqs[rid]
            self._compute(r, r.num_computed_tokens, r.num_computed_tokens + n)
        if not sync:
            w.start_load_kv(meta)
        w.wait_for_save(meta)
        sending, recving = w.get_finished(set())
        invalid = w.get_block_ids_with_load_errors()
        wm = w.build_connector_worker_meta()
        # update_from_output: invalid blocks first (recompute from the first invalid block)
        failed = set()
        for r in self.reqs.values():
            bad = [i for i, b in enumerate(r.block_ids) if b in invalid]
            if bad and r.status in ("running", "loading"):
                lo = bad[0] * self.bs
                if r.num_computed_tokens - sched.get(r.request_id, 0) > lo or r.status == "loading":
                    failed.add(r.request_id)
                r.num_computed_tokens = min(r.num_computed_tokens, lo)
        for rid, n in sched.items():
            r = self.reqs[rid]
            if rid in failed:
                continue
            r.num_computed_tokens += n
            if r.num_computed_tokens >= r.num_prompt_tokens:
                r.output.append(token_kv(r.num_computed_tokens, 7) % 500)
                if len(r.output) >= r.max_tokens:
                    self._finish(r)
        self._deliver(wm, sending, recving, invalid)
        return len(sched)

    def _deliver(self, wm, sending, recving, invalid) -> None:
        """The step's connector output to the scheduler half, then free what it released."""
        self.sched.update_connector_output(ConnOut(wm, sending, recving, invalid))
        for rid in sending or ():
            self._free(self.reqs[rid])
        for rid in recving or ():
            r = self.reqs.get(rid)
            if r is not None and r.status == "finished":
                self._free(r)
            else:
                self.finished_recving.add(rid)

    # ---------------------------------------------------------------- async scheduling
    def _budget(self, r: Req) -> int:
        return self.prefill_steps[min(r.prefill_steps, len(self.prefill_steps) - 1)]

    def _schedule_async(self) -> _Planned:
        sched: dict[str, int] = {}
        work = []
        new, cached = [], CachedReqData()
        for r in list(self.reqs.values()):
            if r.status == "loading" and r.request_id in self.finished_recving:
                self.finished_recving.discard(r.request_id)
                r.status = "running"
            if r.status == "waiting":
                ext, is_async = self.sched.get_num_new_matched_tokens(r, 0)
                if ext is None:
                    continue
                n = 0 if is_async else min(self._budget(r), r.num_prompt_tokens - ext)
                need = -(-(ext + n) // self.bs)
                if need > len(self.free):     # no blocks: stays waiting (it has hashes, no blocks)
                    continue
                self._alloc(r, ext + n)
                self.sched.update_state_after_alloc(r, _Blocks(r.block_ids), ext)
                r.loaded_tokens = ext
                r.scheduled = ext
                r.num_computed_tokens = ext
                resumed = r.epoch > 0
                if is_async:
                    r.status = "loading"
                    continue
                r.status = "running"
                if resumed:
                    cached.resumed_req_ids.add(r.request_id)
                    cached.req_ids.append(r.request_id)
                    cached.num_computed_tokens.append(ext)
                else:
                    new.append(NewReqData(r.request_id, ext))
            elif r.status == "running":
                left = r.num_prompt_tokens - r.scheduled
                if left > 0:
                    n = min(self._budget(r), left)
                elif r.decodes + 1 < r.max_tokens:
                    n = 1
                    r.decodes += 1
                else:
                    continue
                if -(-(r.scheduled + n) // self.bs) - len(r.block_ids) > len(self.free):
                    continue
                self._alloc(r, r.scheduled + n)
                cached.req_ids.append(r.request_id)
                cached.num_computed_tokens.append(r.scheduled)
            else:
                continue
            sched[r.request_id] = n
            work.append((r, r.scheduled, n, list(r.block_ids), r.epoch))
            if r.scheduled < r.num_prompt_tokens:
                r.prefill_steps += 1
        out = SchedOut(sched, preempted_req_ids=set(self._preempted),
                       finished_req_ids=set(self._finished_ids), scheduled_new_reqs=new,
                       scheduled_cached_reqs=cached)
        self._preempted, self._finished_ids = set(), set()
        meta = self.sched.build_connector_meta(out)
        for r, lo, n, _, _ in work:          # vLLM's _update_after_schedule
            r.scheduled = lo + n
        return _Planned(out, meta, work)

    def _execute(self, p: _Planned) -> None:
        """Run one scheduled step on the worker, then process its output."""
        w, meta = self.worker, p.meta
        w.handle_preemptions(meta)
        w.bind(meta)
        sync = any(not s.is_async for s in meta.loads)
        if sync:
            w.start_load_kv(meta)
        for r, lo, n, ids, _ in p.work:      # the forward runs whatever was scheduled
            self._compute(r, lo, lo + n, ids)
        if not sync:
            w.start_load_kv(meta)
        w.wait_for_save(meta)
        sending, recving = w.get_finished(set(p.out.finished_req_ids))
        invalid = w.get_block_ids_with_load_errors()
        assert not invalid, f"load errors in an async run: {invalid}"
        wm = w.build_connector_worker_meta()
        for r, lo, n, _, epoch in p.work:
            if r.status == "finished" or epoch != r.epoch:
                continue                      # aborted or preempted since: stale output
            r.num_computed_tokens = max(r.num_computed_tokens, lo + n)   # lags: set here
            if lo + n >= r.num_prompt_tokens:
                r.output.append(token_kv(lo + n, 7) % 500)
                if len(r.output) >= r.max_tokens:
                    self._finish(r)
        self._deliver(wm, sending, recving, invalid)

    def _step_async(self) -> int:
        """Schedule step N+1, then run step N and process its output (vLLM's async
        scheduling: one step in flight while the next is scheduled)."""
        self.steps += 1
        p = self._schedule_async()
        self._inflight.append(p)
        if len(self._inflight) > 1:
            self._execute(self._inflight.pop(0))
        n = len(p.out.num_scheduled_tokens)
        if not n and self._inflight:          # nothing new: drain the step in flight
            self._execute(self._inflight.pop(0))
        return n

    def preempt(self, req_id: str) -> bool:
        """vLLM's preemption of a running request: its blocks are freed at once (the step in
        flight still writes them), it starts over from the waiting queue."""
        r = self.reqs.get(req_id)
        if r is None or r.status != "running":
            return False
        self.free.extend(r.block_ids)
        r.block_ids = []
        r.status = "waiting"
        r.num_computed_tokens = r.scheduled = r.decodes = 0
        r.output = []
        r.epoch += 1
        self._preempted.add(req_id)
        return True

    def _finish(self, r: Req) -> None:
        r.status = "finished"
        self._finished_ids.add(r.request_id)
        delay, params = self.sched.request_finished(r, list(r.block_ids))
        self.outputs[r.request_id] = {"params": params, "output": list(r.output),
                                      "loaded_tokens": r.loaded_tokens}
        if delay:
            r.delayed = True
        else:
            self._free(r)

    def abort(self, req_id: str) -> None:
        r = self.reqs.get(req_id)
        if r is None or r.status == "finished":
            return            # vLLM's finish_requests skips requests that already finished
        # vLLM keeps a WAITING_FOR_REMOTE_KVS request's blocks until the workers report it
        # received, unless they already did
        was_loading = r.status == "loading" and req_id not in self.finished_recving
        self.finished_recving.discard(req_id)
        r.status = "finished"
        self._finished_ids.add(req_id)
        delay, _ = self.sched.request_finished(r, list(r.block_ids))
        if not (delay or was_loading):
            self._free(r)

    def _free(self, r: Req) -> None:
        self.frees[r.request_id] = self.frees.get(r.request_id, 0) + 1
        assert not set(r.block_ids) & set(self.free), f"{r.request_id}: blocks freed twice"
        self.free.extend(r.block_ids)
        r.block_ids = []
        self.reqs.pop(r.request_id, None)

    def run(self, max_steps: int = 200) -> None:
        """Step until every request finished and was freed."""
        for _ in range(max_steps):
            if not self.reqs and not self._inflight:
                return
            if not self.step():
                time.sleep(0.002)   # an idle engine step takes time too (the loader runs)
        raise AssertionError(f"requests still running after {max_steps} steps: "
                             f"{[(r.request_id, r.status) for r in self.reqs.values()]}")

    def close(self) -> None:
        self.sched.shutdown()
        self.worker.shutdown()
        release_client(self.settings)


class MiniKV:
    """The model's KV of a prompt computed from scratch (the reference for byte checks)."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size

    def block(self, tokens: list[int], i: int) -> torch.Tensor:
        kv = torch.zeros(LAYERS, len(tokens), HEADS, 2 * HEAD, dtype=torch.bfloat16)
        for p in range((i + 1) * self.bs):
            prev = 0 if p == 0 else int.from_bytes(hashlib.blake2b(
                kv[:, p - 1].contiguous().view(torch.uint8).numpy().tobytes(),
                digest_size=4).digest(), "little")
            kv[:, p] = kv_values(token_kv(tokens[p], prev))
        return kv[:, i * self.bs:(i + 1) * self.bs].permute(0, 2, 1, 3).contiguous()


def prompt(seed: int, n: int) -> list[int]:
    """``n`` token ids of a test prompt (distinct per ``seed``, all in the model's vocabulary)."""
    return [(seed * 131 + 7 * i) % 500 + 1 for i in range(n)]


def stored_blocks_right(e: MiniVLLM, tokens: list[int]) -> int:
    """How many of ``tokens``' full blocks the store holds, each checked byte for byte against
    the KV computed from scratch (raises on a block holding anything else)."""
    keys = e.sched.keyers[0].chain(tokens)
    got = e.client.get(keys)
    ref = MiniKV(e.bs)
    for i, b in enumerate(got):
        want = ref.block(tokens, i).view(torch.uint8).reshape(-1).numpy().tobytes()
        assert b[:len(want)] == want, f"block {i} holds KV that was not computed from its prefix"
    return len(got)


class FailingReads:
    """The NVMe tier's read_batch, with EIO for the keys in ``bad`` (a failed NVMe read, for
    the connector tests that need one)."""

    def __init__(self, tier, bad):
        self.real, self.bad = tier.read_batch, set(bad)

    def __call__(self, items):
        out = self.real(items)
        return [DiskResult(False, error="eio") if it.key in self.bad else r
                for it, r in zip(items, out)]
