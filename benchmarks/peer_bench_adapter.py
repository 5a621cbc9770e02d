"""tierstore behind ``../shared/tools/peer_bench`` (issue 12's acceptance), public API only.

Run (README of the harness; the LMCache venv, tierstore and this folder on PYTHONPATH)::

    PYTHONPATH=<checkout>:<checkout>/benchmarks:<tierstore deps> /tmp/lmc_venv/bin/python \\
        ../shared/tools/peer_bench/lmcache_bench.py \\
        --stores lmcache,lmcache_odirect,tierstore=peer_bench_adapter:PeerBenchAdapter

Calls used, all from :class:`tierstore.client.Client`: ``embedded``, ``keyer``, ``slab``,
``prepare_store``/``complete_store``, ``prepare_load``/``complete_load``, ``flush``,
``evict(tier="dram")``, ``stats``, ``close``. No private attribute of the store is touched.

What a serving engine does with tierstore, mapped onto the harness's six calls:

* **keys** -- the harness's 16-byte digests become ``chunk_tokens`` token ids each (SHAKE-128 of
  the digest, exactly as the LMCache adapter and the reference adapter do), and ``Keyer.chain``
  turns the tokens into 32-byte block keys. That is what the vLLM connector does
  (plugins/vllm/scheduler_side.py keys a request with ``Keyer.chain(tokens, extras)``), and it
  is the same work LMCache does inside ``store``/``retrieve`` (hash the tokens), so the chain is
  computed inside the timed calls (~1.2 us a block: under 1 ms for 512 blocks). The digests are
  not used as block ids (``chain_from_block_ids``): no engine hands tierstore such ids, and the
  8-byte id form would drop half of each digest.
* **store** (phases a, c) -- the engine's save path, one job per 128 blocks (2,048 tokens: what
  a connector saves per step of a chunked prefill): ``prepare_store(keys, wait_s=0)`` (never
  waits for the disk: a full write-behind queue would answer SKIPPED), one copy of the chunks
  into the DRAM slots, ``complete_store(ok=True)``; the NVMe copies are written behind the call
  by the store's flusher, which starts on the first part while the next one is copied. Every
  status must be OK (or PRESENT): anything SKIPPED or FAILED raises, so a number is never bought
  by dropping blocks.
* **load** (phases b, d) -- ``prepare_loads(parts, wait=False)`` with parts of 128 blocks: each
  part's resident prefix is pinned at once; parts whose blocks are on NVMe only are read into
  DRAM slots by the store's loader thread (checksums verified; the NVMe record stays), and this
  thread copies part k out of its slots (``wait_load``) while the loader reads part k+1; then
  ``complete_loads``. Returns the prefix length served (it stops at the first short part). A
  load of at most 128 blocks is one ``prepare_load`` (it stages at once).
* **drop_memory_tier** -- ``evict(keys, tier="dram")``: the DRAM copies go, NVMe keeps its
  records; checked through ``stats()`` (DRAM empty, NVMe holds every block).
* **flush** -- ``client.flush()`` (True: every block has its NVMe record, fdatasync'd and
  committed), then the same ``stats()`` check.
* **reset** -- forget everything and delete the files (the README's contract): close the store,
  delete its data directory (slab files, LMDB), open a new one. The memory-only instance is
  closed and opened anew too (no files), so every phase starts from a new, empty store.

Sizing (untimed choices, stated because they differ from LMCache's):

* DRAM of the memory+disk instance is **twice** the harness's ``memory_bytes``, and
  ``nvme.write_queue_bytes`` is ``memory_bytes``: the store admits at most half of its DRAM as
  bytes still waiting for their NVMe copy (so that loads always find slots), and a phase stores
  1 GiB in one call with ``wait_s=0``; with DRAM = ``memory_bytes`` (1.31 GiB) the last ~35 % of
  the blocks would be SKIPPED. The memory-only instance has ``memory_bytes`` of DRAM, as LMCache.
* NVMe: ``direct_io="on"`` (O_DIRECT; the store refuses to open if the file system does not
  allow it), capacity ``disk_bytes``.

Copies: a batch of chunks that are equally spaced views of one engine buffer (the harness's
case: ``[2, L, T, H*D]`` slices of ``[2, L, N*T, H*D]``) and land in consecutive DRAM slots moves
with one ``copy_`` per run of consecutive slots, a strided view over the engine buffer against a
``[n, 2, L, T, H*D]`` view of the slab (DESIGN §5: one copy per request, not one per block);
anything else falls back to one ``copy_`` per chunk. Every copy is tierstore's host copy
(``tierstore.io.hostcopy.host_copy_``, the copy the vLLM connector's CPU path makes: several
threads, streaming stores for large copies) on the caller's thread; ``host_copy=False`` makes
them torch ``copy_`` calls, as LMCache's.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tierstore.client import Client
from tierstore.config import DramConfig, NvmeConfig, StoreConfig
from tierstore.io.hostcopy import host_copy_
from tierstore.keys import Namespace
from tierstore.types import BlockStatus

VOCAB = 128_000   # as the harness's LMCacheAdapter
_STORED = (BlockStatus.OK, BlockStatus.PRESENT)


class PeerBenchAdapter:
    """tierstore ``Client.embedded`` (the Store in this process) behind the peer_bench contract.

    Constructor as the harness wants it: ``(layout, tiers, instance)``; keyword options for side
    checks: ``dram_factor`` (DRAM of the disk instance in units of ``memory_bytes``, default 2,
    see the module docstring), ``batched_copy`` (False: one ``copy_`` per chunk),
    ``store_blocks`` / ``load_blocks`` (blocks per store / load job; 0: one job per call),
    ``host_copy`` (False: torch ``copy_`` instead of tierstore's host copy).
    """

    def __init__(self, layout, tiers, instance: str, *, dram_factor: float = 2.0,
                 batched_copy: bool = True, store_blocks: int = 128, load_blocks: int = 128,
                 host_copy: bool = True):
        self.layout, self.tiers, self.instance = layout, tiers, instance
        self.batched_copy = batched_copy
        self._copy = host_copy_ if host_copy else (lambda dst, src: dst.copy_(src))
        self.store_blocks, self.load_blocks = store_blocks, load_blocks
        self.chunk_bytes = layout.chunk_bytes
        dtype = str(layout.dtype).replace("torch.", "")
        self.ns = Namespace(model="peer-bench", block_size=layout.chunk_tokens, kv_dtype=dtype,
                            num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                            head_size=layout.head_dim)
        assert self.ns.block_bytes == self.chunk_bytes, (self.ns.block_bytes, self.chunk_bytes)
        mem_slots = max(1, tiers.memory_bytes // self.chunk_bytes)
        self.data_dir: Optional[str] = None
        nvme = None
        if tiers.disk_dir is not None:
            self.data_dir = os.path.join(tiers.disk_dir, "ts")
            nvme = NvmeConfig(path="", capacity_blocks=max(1, tiers.disk_bytes // self.chunk_bytes),
                              direct_io="on", write_queue_bytes=mem_slots * self.chunk_bytes)
            mem_slots = int(mem_slots * dram_factor)
        self.config = StoreConfig(slot_bytes=self.chunk_bytes,
                                  dram=DramConfig(capacity_blocks=mem_slots), nvme=nvme)
        self.secret = secrets.token_bytes(32)      # one cluster secret for the adapter's life
        self._tokens_cache: Dict[Tuple[bytes, ...], List[int]] = {}
        self._stored: Dict[bytes, None] = {}        # block keys stored since the last reset
        self.client: Optional[Client] = None
        self._open()

    # ------------------------------------------------------------------ open / close
    def _open(self) -> None:
        self.client = Client.embedded(self.data_dir, self.config, secret=self.secret)
        self.keyer = self.client.keyer(self.ns)
        buf, self.num_slots, self.slot_stride = self.client.slab()
        slab = torch.frombuffer(buf, dtype=torch.uint8)
        L = self.layout
        if self.slot_stride % L.dtype.itemsize == 0:
            # [num_slots, 2, L, T, H*D]: slot s's chunk is self._slots[s]
            strides, n = [], 1
            for d in reversed(L.chunk_shape):
                strides.insert(0, n)
                n *= d
            self._slots = torch.as_strided(slab.view(L.dtype), (self.num_slots, *L.chunk_shape),
                                           (self.slot_stride // L.dtype.itemsize, *strides))
        else:   # pragma: no cover - slots are page multiples
            raise RuntimeError(f"slot stride {self.slot_stride} is not a multiple of the dtype")

    def _shut(self) -> None:
        self._slots = None   # torch views point into the slab's mmap: drop them first
        if self.client is not None:
            self.client.close()
            self.client = None

    # ------------------------------------------------------------------ keys
    def _keys(self, keys: Sequence[bytes]) -> List[bytes]:
        k = tuple(keys)
        t = self._tokens_cache.get(k)
        if t is None:   # the token ids stand for the request: made once, outside the timing
            n = self.layout.chunk_tokens
            t = []
            for key in k:
                raw = hashlib.shake_128(key).digest(4 * n)
                t.extend(int.from_bytes(raw[4 * i:4 * i + 4], "little") % VOCAB for i in range(n))
            self._tokens_cache[k] = t
        return self.keyer.chain(t)

    # ------------------------------------------------------------------ copies
    def _runs(self, chunks: Sequence[torch.Tensor], slots: Sequence[int]):
        """Split ``zip(chunks, slots)`` into ``(chunk view [n, 2, L, T, HD], slot view)`` pairs:
        one per run of consecutive slots whose chunks are equally spaced views of one buffer."""
        n = len(slots)
        i = 0
        while i < n:
            c0, s0 = chunks[i], slots[i]
            j = i + 1
            if self.batched_copy:
                p0 = c0.data_ptr()
                step = None
                while j < n and slots[j] == s0 + (j - i):
                    c = chunks[j]
                    if c.stride() != c0.stride() or c.shape != c0.shape or \
                            c.untyped_storage().data_ptr() != c0.untyped_storage().data_ptr():
                        break
                    d = c.data_ptr() - p0
                    if step is None:
                        if d <= 0 or d % c0.element_size():
                            break
                        step = d
                    elif d != step * (j - i):
                        break
                    j += 1
            if j - i == 1:
                yield c0, self._slots[s0]
            else:
                src = torch.as_strided(c0, (j - i, *c0.shape),
                                       (step // c0.element_size(), *c0.stride()))
                yield src, self._slots[s0:s0 + (j - i)]
            i = j

    # ------------------------------------------------------------------ the contract
    def store(self, keys, tensors) -> None:
        tk = self._keys(keys)
        step = self.store_blocks if self.store_blocks > 0 else len(tk)
        for a in range(0, len(tk), step):   # each part's NVMe copy starts behind its complete
            self._store_part(tk[a:a + step], tensors[a:a + step])
        self._stored.update(dict.fromkeys(tk))

    def _store_part(self, tk, tensors) -> None:
        c = self.client
        job = c.prepare_store(tk, self.ns, self.chunk_bytes, wait_s=0)
        ok = False
        try:
            idx = [i for i, s in enumerate(job.slots) if s is not None]
            for src, dst in self._runs([tensors[i] for i in idx], [job.slots[i] for i in idx]):
                self._copy(dst, src)
            ok = True
        finally:
            status = c.complete_store(job.job_id, ok=ok)
        bad = [st for st in status if st not in _STORED]
        if bad:
            raise RuntimeError(f"tierstore stored {len(tk) - len(bad)} of {len(tk)} blocks: "
                               f"{sorted({b.name for b in bad})} (stats: {c.stats()['counters']})")

    def load(self, keys, out) -> int:
        c = self.client
        tk = self._keys(keys)
        if self.load_blocks <= 0 or len(tk) <= self.load_blocks:
            job = c.prepare_load(tk)
            ok = False
            try:
                n = job.num_ready
                for dst, src in self._runs(out[:n], job.slots[:n]):
                    self._copy(dst, src)
                ok = True
            finally:
                c.complete_load(job.job_id, ok=ok)
            return n
        # pipelined: the store's loader thread reads part k+1 from NVMe while this thread copies
        # part k out of its DRAM slots (parts already in DRAM are ready at once)
        step = self.load_blocks
        cuts = list(range(0, len(tk), step))
        jobs = c.prepare_loads([tk[a:a + step] for a in cuts], wait=False)
        served = 0
        ok = False
        try:
            for a, job in zip(cuts, jobs):
                if not job.ready:
                    job = c.wait_load(job.job_id)
                m = job.num_ready
                for dst, src in self._runs(out[a:a + m], job.slots[:m]):
                    self._copy(dst, src)
                served = a + m
                if m < len(job.keys):
                    break
            ok = True
        finally:
            c.complete_loads([j.job_id for j in jobs], ok=ok)
        return served

    def drop_memory_tier(self) -> None:
        if self.data_dir is None:
            self.reset()
            return
        r = self.client.evict(list(self._stored), tier="dram")
        if r.get("evicted", 0) != len(self._stored):
            raise RuntimeError(f"drop_memory_tier: evict returned {r} for {len(self._stored)}")
        self._check_tiers(dram_expected=0)

    def flush(self) -> None:
        if self.data_dir is None:
            return
        if not self.client.flush():
            raise RuntimeError(f"flush: an NVMe write failed ({self.client.stats()['write_behind']})")
        self._check_tiers()

    def _check_tiers(self, dram_expected: Optional[int] = None) -> None:
        blocks = {t["tier"]: t["blocks"] for t in self.client.stats()["tiers"]}
        n = len(self._stored)
        if blocks.get("nvme", 0) < n:
            raise RuntimeError(f"NVMe holds {blocks.get('nvme', 0)} of {n} blocks")
        if dram_expected is not None and blocks["dram"] != dram_expected:
            raise RuntimeError(f"drop_memory_tier: DRAM still holds {blocks['dram']} blocks")

    def reset(self) -> None:
        self._shut()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self._open()
        self._stored.clear()

    def close(self) -> None:
        self._shut()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class TorchCopyAdapter(PeerBenchAdapter):
    """The same adapter with torch ``copy_`` for every copy (``host_copy=False``): a side check
    of what the host copy kernel earns, run as ``--stores ...,tierstore_torch=
    peer_bench_adapter:TorchCopyAdapter`` (the harness passes no options through a spec)."""

    def __init__(self, layout, tiers, instance: str, **opts):
        super().__init__(layout, tiers, instance, host_copy=False, **opts)
