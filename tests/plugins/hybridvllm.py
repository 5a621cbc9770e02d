"""A small stand-in for vLLM with its hybrid KV cache manager on (several KV-cache groups), to
drive the connector's two halves without vLLM (issue 15 item 4, case HYB-33).

What it models, as vLLM 0.32-0.34 does it (single_type_kv_cache_manager.py, scheduler.py):

- one block table per group, all groups of one block size, block ids from one pool (block 0 is
  the null block);
- a sliding-window group of window ``W`` keeps, for a request that computed ``n`` tokens, only
  the blocks holding tokens ``>= n - W + 1``: the others are freed and replaced by the null
  block (``remove_skipped_blocks``), and an allocation for ``n`` external tokens pads the
  skipped blocks with the null block (``add_local_computed_blocks``);
- a connector's hit is loaded asynchronously (WAITING_FOR_REMOTE_KVS); a request in
  ``failed_recving`` starts again from 0 and vLLM asks the connector again
  (``_update_waiting_for_remote_kv``);
- the whole prompt is computed in one step, then one output token; prefix caching off;
- each step runs in ``torch.inference_mode()``, as vLLM's model runner does.

The "model": a token's KV in a full-attention group depends on its token and on the KV of the
token before it in that group's cache; in a sliding-window group on its token and on the KV of
every token of its window before it, read from that group's cache. The output token depends on
every group's last KV. So KV loaded wrong (or missing) in any group changes the output.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from tierstore_plugins.vllm.backend import Geometry, GroupGeo, acquire_client, release_client
from tierstore_plugins.vllm.metadata import PluginSettings
from tierstore_plugins.vllm.scheduler_side import SchedulerSide
from tierstore_plugins.vllm.worker_side import WorkerSide

HEADS, HEAD = 2, 16


@dataclass
class Group:
    """One KV-cache group: ``window`` tokens (0: full attention) and its layer count."""

    layers: int
    window: int = 0
    name: str = ""


@dataclass
class Req:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict | None = None
    cache_salt: str | None = None
    lora_request: object = None
    mm_features: object = None
    num_computed_tokens: int = 0
    status: str = "waiting"                     # waiting | loading | finished
    blocks: list[list[int]] = field(default_factory=list)   # per group
    output: int | None = None
    hits: list[int] = field(default_factory=list)   # external tokens each admission promised
    load_failures: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class _Blocks:
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return tuple(list(x) for x in self.ids)


class _SchedOut:
    def __init__(self, num_scheduled_tokens):
        self.num_scheduled_tokens = num_scheduled_tokens
        self.scheduled_new_reqs = []
        self.scheduled_cached_reqs = None
        self.preempted_req_ids = []


class _ConnOut:
    def __init__(self, wm, sending, recving):
        self.kv_connector_worker_meta = wm
        self.finished_sending = sending
        self.finished_recving = recving


def geometry(groups: list[Group], block_size: int, tp: int = 1) -> Geometry:
    gg = tuple(GroupGeo(kind="sliding_window" if g.window else "full",
                        window_blocks=-(-(g.window - 1) // block_size) if g.window else 0,
                        num_layers=g.layers, num_kv_heads=HEADS, head_size=HEAD,
                        use_mla=False, identity=f"{i}:{g.window}:{g.name or i}",
                        layer_names=tuple(f"g{i}.l{j}" for j in range(g.layers)))
               for i, g in enumerate(groups))
    return Geometry(model="hybrid-mini", revision="", kv_dtype="bfloat16",
                    num_layers=sum(g.layers for g in groups), num_kv_heads=HEADS,
                    head_size=HEAD, use_mla=False, block_size=block_size, tp_size=tp,
                    pp_size=1, groups=gg)


class HybridVLLM:
    """One engine (scheduler half + one worker) on an embedded store in ``data_dir``."""

    def __init__(self, data_dir, groups: list[Group], *, block_size: int = 16,
                 num_blocks: int = 256, connector: bool = True, tp: int = 1,
                 **settings) -> None:
        self.bs = block_size
        self.groups = groups
        self.tp = tp
        self.geo = geometry(groups, block_size, tp)
        # per TP rank, per group: [layers, blocks, H, N, K|V] (each rank its own heads' KV)
        self.kv_ranks = [[torch.zeros(g.layers, num_blocks, HEADS, block_size, 2 * HEAD,
                                      dtype=torch.bfloat16) for g in groups] for _ in range(tp)]
        self.kv = self.kv_ranks[0]
        self.free = list(range(1, num_blocks))   # block 0: the null block
        self.reqs: dict[str, Req] = {}
        self.null_block_id = 0
        self.connector = connector
        self.sched = self.worker = self.client = None
        self.workers: list[WorkerSide] = []
        if connector:
            bb = self.geo.max_block_bytes
            settings.setdefault("dram_bytes", 256 * bb)
            settings.setdefault("nvme_bytes", 1024 * bb)
            self.settings = PluginSettings(data_dir=str(data_dir), **settings)
            self.client = acquire_client(self.settings, bb)
            self.sched = SchedulerSide(self.client, self.geo, self.settings, role="kv_both",
                                       engine_id="hybrid-mini")
            self.sched.bind_kv_cache_manager(self)
            for rank in range(tp):
                w = WorkerSide(self.settings, self.geo, tp_rank=rank, pp_rank=0)
                w.register_kv_caches({f"g{i}.l{j}": self.kv_ranks[rank][i][j]
                                      for i, g in enumerate(groups) for j in range(g.layers)})
                self.workers.append(w)
            self.worker = self.workers[0]
        self._seen: dict[str, dict[str, int]] = {"sending": {}, "recving": {}}
        self.failed_recving: set[str] = set()
        self.finished_recving: set[str] = set()

    # ---------------------------------------------------------------- what the connector calls
    def get_block_ids(self, req_id: str):
        r = self.reqs.get(req_id)
        return tuple(list(b) for b in r.blocks) if r is not None else ()

    # ---------------------------------------------------------------- vLLM's block manager
    def _skipped(self, g: Group, n_computed: int) -> int:
        return max(0, n_computed - g.window + 1) // self.bs if g.window else 0

    def _alloc(self, r: Req, n_tokens: int, n_computed: int) -> None:
        """Blocks for ``n_tokens`` tokens of which ``n_computed`` are computed (external): a
        window group pads its skipped blocks with the null block."""
        if not r.blocks:
            r.blocks = [[] for _ in self.groups]
        for g, ids in zip(self.groups, r.blocks):
            while len(ids) < self._skipped(g, n_computed):
                ids.append(self.null_block_id)
            while len(ids) < -(-n_tokens // self.bs):
                ids.append(self.free.pop(0))

    def _remove_skipped(self, r: Req, n_computed: int) -> None:
        for g, ids in zip(self.groups, r.blocks):
            for i in range(min(self._skipped(g, n_computed), len(ids))):
                if ids[i] != self.null_block_id:
                    self.free.append(ids[i])
                    ids[i] = self.null_block_id

    def _free(self, r: Req) -> None:
        for ids in r.blocks:
            self.free.extend(b for b in ids if b != self.null_block_id)
        r.blocks = []

    # ---------------------------------------------------------------- the model
    def _slot(self, r: Req, g: int, p: int, rank: int = 0):
        b = r.blocks[g][p // self.bs]
        assert b != self.null_block_id, f"group {g} reads token {p} from the null block"
        return self.kv_ranks[rank][g][:, b, :, p % self.bs, :]

    def _digest(self, r: Req, g: int, lo: int, hi: int, rank: int = 0) -> int:
        h = hashlib.blake2b(digest_size=8)
        for p in range(lo, hi):
            h.update(self._slot(r, g, p, rank).contiguous().view(torch.uint8).numpy().tobytes())
        return int.from_bytes(h.digest(), "little")

    def _compute(self, r: Req, lo: int, hi: int) -> None:
        for p in range(lo, hi):
            tok = r.prompt_token_ids[p]
            for rank in range(self.tp):       # each rank its own heads: other values
                for g, grp in enumerate(self.groups):
                    span = (max(0, p - grp.window + 1) if grp.window else max(0, p - 1), p)
                    prev = self._digest(r, g, *span, rank=rank) if p else 0
                    seed = hashlib.blake2b(f"{rank}:{g}:{tok}:{prev}".encode(),
                                           digest_size=8).digest()
                    base = torch.arange(grp.layers * HEADS * 2 * HEAD, dtype=torch.float32)
                    v = (base * 0.013 + int.from_bytes(seed, "little") % 9973 * 0.1) % 7.0
                    self._slot(r, g, p, rank)[:] = v.to(torch.bfloat16).view(
                        grp.layers, HEADS, 2 * HEAD)

    def _output(self, r: Req) -> int:
        n = r.num_prompt_tokens
        return hash(tuple(self._digest(r, g, n - 1, n, rank) for rank in range(self.tp)
                          for g in range(len(self.groups)))) % 500

    # ---------------------------------------------------------------- the engine
    def add(self, req_id: str, tokens: list[int]) -> Req:
        r = Req(req_id, list(tokens))
        self.reqs[req_id] = r
        return r

    def step(self) -> None:
        # vLLM runs its model runner (and so the worker's hooks) in inference mode
        with torch.inference_mode():
            self._step()

    def _step(self) -> None:
        sched: dict[str, int] = {}
        for r in list(self.reqs.values()):
            if r.status == "loading" and r.request_id in self.finished_recving:
                self.finished_recving.discard(r.request_id)
                if r.request_id in self.failed_recving:   # vLLM: recompute, ask again
                    self.failed_recving.discard(r.request_id)
                    r.load_failures += 1
                    r.num_computed_tokens = 0
                    self._free(r)
                    r.status = "waiting"
                else:
                    r.status = "running"
            if r.status == "waiting":
                ext, is_async = (self.sched.get_num_new_matched_tokens(r, 0)
                                 if self.connector else (0, False))
                assert ext is not None
                r.hits.append(ext)
                self._alloc(r, ext if is_async else r.num_prompt_tokens, ext)
                if self.connector:
                    self.sched.update_state_after_alloc(r, _Blocks(r.blocks), ext)
                r.num_computed_tokens = ext
                if is_async:
                    assert ext > 0
                    r.status = "loading"
                    continue
                r.status = "running"
            if r.status == "running":
                self._remove_skipped(r, r.num_computed_tokens)
                self._alloc(r, r.num_prompt_tokens, r.num_computed_tokens)
                sched[r.request_id] = r.num_prompt_tokens - r.num_computed_tokens
        meta = self.sched.build_connector_meta(_SchedOut(sched)) if self.connector else None
        for w in self.workers:
            w.handle_preemptions(meta)
            w.bind(meta)
        for rid, n in sched.items():
            r = self.reqs[rid]
            self._compute(r, r.num_computed_tokens, r.num_computed_tokens + n)
        if not self.workers:
            for rid, n in sched.items():
                self._done(self.reqs[rid])
            return
        wm = None
        done: dict[str, set] = {"sending": set(), "recving": set()}
        for w in self.workers:
            w.start_load_kv(meta)        # asynchronous loads: after the forward
            w.wait_for_save(meta)
            sending, recving = w.get_finished(set())
            self.failed_recving |= w.take_failed_recving(recving)
            assert not w.get_block_ids_with_load_errors(), "per-block errors: vLLM would raise"
            m = w.build_connector_worker_meta()
            wm = m if wm is None else wm.aggregate(m)
            for kind, ids in (("sending", sending), ("recving", recving)):
                for rid in ids or ():   # vLLM: finished once every worker reported it
                    n = self._seen[kind][rid] = self._seen[kind].get(rid, 0) + 1
                    if n == self.tp:
                        del self._seen[kind][rid]
                        done[kind].add(rid)
        sending, recving = done["sending"], done["recving"]
        for rid in sched:
            self._done(self.reqs[rid])
        self.sched.update_connector_output(_ConnOut(wm, sending, recving))
        for rid in sending or ():
            self._free(self.reqs[rid])
        self.finished_recving |= set(recving or ())

    def _done(self, r: Req) -> None:
        r.num_computed_tokens = r.num_prompt_tokens
        r.output = self._output(r)
        r.status = "finished"
        delay = False
        if self.connector:
            delay, _ = self.sched.request_finished(r, tuple(r.blocks))
        if not delay:
            self._free(r)

    def run(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            busy = any(r.status != "finished" for r in self.reqs.values())
            if not busy and not (self.sched and self.sched.has_pending_work()):
                return
            self.step()
            time.sleep(0.002)   # an engine step takes time too (the store's loader runs)
        raise AssertionError("the engine did not settle")

    def close(self) -> None:
        if self.workers:
            for w in self.workers:
                w.shutdown()
            self.sched.shutdown()
            release_client(self.settings)
