"""Batched block copies between a paged KV cache (vLLM's, or the hbm slab) and a slot slab.

What it owns: the mapping from a paged KV layout to tierstore's block byte format, one pair of
staging buffers on the KV's device, two CUDA streams, and a small ring of per-job index buffers.
Everything is allocated in :class:`CopyEngine`'s constructor; a submit allocates no device or
host memory (tests/core/io/test_copy.py counts).

Threading: single-threaded (the caller serialises submits and polls); no hidden threads. On CUDA
the work runs on the engine's own two streams; the host never calls a device-wide synchronize.

Block byte format (one block = ``block_size`` tokens, all layers, this rank's heads)
-----------------------------------------------------------------------------------
The format is independent of the physical ``KVCacheLayout``: a block written from an ``LBHNC``
cache loads into a ``BLHNC`` or ``LBNHC`` cache of the same model unchanged. It is the C-order
of vLLM's *logical* per-layer shape ``[H, N, C]`` (C = K then V elements on the last axis; MLA:
H = 1, C = kv_lora_rank + rope dims), layers in order:

==============================  =====================  ==========================================
offset (bytes)                  size (bytes)           content
==============================  =====================  ==========================================
``l * page``                    ``page = H*N*Cb``      layer ``l``'s page, C-order ``[H, N, Cb]``
``(l*H + h)*N*Cb + n*Cb``       ``Cb = C * itemsize``  head ``h``, token ``n`` of layer ``l``
``L * page`` .. ``slot_bytes``  slack                  untouched (slots are rounded up to 4096)
==============================  =====================  ==========================================

No header: identity, length and checksum live in the index (and in the NVMe record header). The
dtype is part of the namespace, so bytes are copied, never converted.

Data path (offload; onload is the mirror image: runs H2D, then scatter)::

    compute stream --wait--> gather stream: index_select per layer group ---> staging[k % 2]
                                                                  | event ready[k]
                             copy stream: one async copy per run of consecutive slots
                                          staging rows ---> slab[slot .. slot+run)   (pinned)

- Gather: one ``index_select`` per layer for layer-major layouts (``L`` outermost: each layer's
  page of a block is one ``[H,N,C]`` run), one for all layers for block-major layouts (``B``
  outermost), on the widest integer dtype the strides allow. Never one copy per block.
- Copy: destination slots of a job are usually consecutive (the DRAM free list hands out runs),
  so a job is one async copy per direction; scattered slots cost one copy per run (>= one block,
  2 MiB for Llama-3-8B, not 64 KiB layer slices).
- Jobs larger than a staging buffer are cut into chunks that alternate between two staging
  buffers, so the gather of chunk k+1 overlaps the copy of chunk k (``chunk_blocks``).
- ``submit_*`` returns a job id; ``poll(job_id)`` says whether it finished (CUDA event query);
  ``wait_stream(job_id, stream)`` makes a compute stream wait without blocking the host.
- On the CPU device the same calls run synchronously; ``poll`` is then always true. A chunk
  whose slots are one run is gathered into (scattered from) the slab's own rows, one copy
  instead of two; other chunks go through staging, whose copies to and from the slab run in the
  host copy kernel (tierstore/io/hostcopy.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch

from tierstore.errors import ConfigError, JobError, TransferFailed
from tierstore.io.hostcopy import host_copy_

ORDERS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
_WIDTHS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


@dataclass(frozen=True)
class KVLayout:
    """Shape of a paged KV cache in one flat buffer (vLLM's ``KVCacheLayout`` + spec).

    Logical array ``[L, B, H, N, C]``; ``order`` is its physical order, outermost first.
    ``entry_bytes`` = C * itemsize (K and V concatenated; MLA: lora + rope, ``num_heads=1``).
    ``page_bytes`` > H*N*Cb pads each page (only for orders ending in a page: ``..HNC``/``..NHC``).
    """

    num_layers: int
    num_blocks: int
    num_heads: int
    block_size: int
    entry_bytes: int
    order: str = "LBHNC"
    page_bytes: int = 0

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ConfigError(f"unknown KV layout {self.order!r}; expected one of {ORDERS}")
        if min(self.num_layers, self.num_blocks, self.num_heads, self.block_size,
               self.entry_bytes) <= 0:
            raise ConfigError("KV layout dimensions must be positive")
        if self.page_bytes and (self.page_bytes < self.unpadded_page_bytes
                                or self.order[2:] not in ("HNC", "NHC")):
            raise ConfigError(f"page_bytes {self.page_bytes} invalid for {self.order}")

    @property
    def unpadded_page_bytes(self) -> int:
        return self.num_heads * self.block_size * self.entry_bytes

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in tierstore's format (table in the module docstring)."""
        return self.num_layers * self.unpadded_page_bytes

    def byte_strides(self) -> tuple[int, int, int, int, int]:
        """Strides in bytes of logical dims (L, B, H, N, C)."""
        size = {"L": self.num_layers, "B": self.num_blocks, "H": self.num_heads,
                "N": self.block_size, "C": self.entry_bytes}
        stride: dict[str, int] = {}
        acc = 1
        for i, d in enumerate(reversed(self.order)):
            stride[d] = 1 if d == "C" else acc
            acc = stride[d] * size[d]
            if i == 2 and self.page_bytes:       # the three innermost dims form one page
                acc = self.page_bytes
        return tuple(stride[d] for d in "LBHNC")  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        s = self.byte_strides()
        size = (self.num_layers, self.num_blocks, self.num_heads, self.block_size, self.entry_bytes)
        return 1 + sum((n - 1) * st for n, st in zip(size, s))


class PagedKV:
    """A paged KV cache seen as logical bytes ``[L, B, H, N, Cb]`` over one storage.

    Build with :meth:`from_layer_views` (the per-layer tensors ``register_kv_caches`` receives),
    :meth:`from_buffer` (flat buffer + :class:`KVLayout`) or :meth:`from_slab` (a slot slab such
    as the hbm tier's, ``[num_slots, slot_bytes]``: one layer, one entry per block).
    """

    def __init__(self, base: torch.Tensor, shape: tuple[int, int, int, int, int],
                 byte_strides: tuple[int, int, int, int, int], offset_bytes: int) -> None:
        if base.dtype != torch.uint8 or base.dim() != 1:
            raise ConfigError("PagedKV base must be a flat uint8 tensor over the whole storage")
        self.base = base
        self.shape = shape
        self.byte_strides = byte_strides
        self.offset_bytes = offset_bytes
        L, B, H, N, Cb = shape
        last = offset_bytes + sum((n - 1) * s for n, s in zip(shape, byte_strides))
        if offset_bytes < 0 or last >= base.numel():
            raise ConfigError(f"KV view ends at byte {last}, past its buffer ({base.numel()})")
        self.width, self.wdtype = next(
            (w, dt) for w, dt in _WIDTHS
            if Cb % w == 0 and offset_bytes % w == 0 and base.numel() % w == 0
            and all(s % w == 0 for s in byte_strides[:4]) and (base.data_ptr() % w == 0))

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_buffer(cls, buffer: torch.Tensor, layout: KVLayout, offset_bytes: int = 0) -> "PagedKV":
        if not buffer.is_contiguous():
            raise ConfigError("the flat KV buffer must be contiguous")
        base = buffer.reshape(-1).view(torch.uint8)
        shape = (layout.num_layers, layout.num_blocks, layout.num_heads, layout.block_size,
                 layout.entry_bytes)
        return cls(base, shape, layout.byte_strides(), offset_bytes)

    @classmethod
    def from_layer_views(cls, views: Sequence[torch.Tensor]) -> "PagedKV":
        """Per-layer ``[num_blocks, H, N, C]`` views of one storage, equally spaced (vLLM)."""
        if not views:
            raise ConfigError("no KV layers")
        v0 = views[0]
        item = v0.element_size()
        storage = v0.untyped_storage()
        if v0.dim() != 4 or v0.stride(3) != 1:
            raise ConfigError("each KV layer must be [num_blocks, H, N, C] with a unit last stride")
        for v in views:
            if (v.untyped_storage().data_ptr() != storage.data_ptr() or v.shape != v0.shape
                    or v.stride() != v0.stride() or v.dtype != v0.dtype):
                raise ConfigError("KV layers must be same-shaped views of one storage")
        offs = [v.storage_offset() * item for v in views]
        s_l = offs[1] - offs[0] if len(offs) > 1 else v0.shape[0] * v0.stride(0) * item
        if s_l <= 0 or any(o != offs[0] + i * s_l for i, o in enumerate(offs)):
            raise ConfigError("KV layers are not equally spaced in their storage (dedupe shared "
                              "layers before registering)")
        B, H, N, C = v0.shape
        base = torch.empty(0, dtype=torch.uint8, device=v0.device).set_(storage)
        sb, sh, sn, _ = (s * item for s in v0.stride())
        return cls(base, (len(views), B, H, N, C * item), (s_l, sb, sh, sn, 1), offs[0])

    @classmethod
    def from_slab(cls, slab: torch.Tensor) -> "PagedKV":
        if slab.dim() != 2 or slab.dtype != torch.uint8 or not slab.is_contiguous():
            raise ConfigError("a slab is a contiguous uint8 [num_slots, slot_bytes] tensor")
        S, sb = slab.shape
        return cls(slab.view(-1), (1, S, 1, 1, sb), (S * sb, sb, sb, sb, 1), 0)

    # ---------------------------------------------------------------- derived
    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def num_blocks(self) -> int:
        return self.shape[1]

    @property
    def block_bytes(self) -> int:
        L, _, H, N, Cb = self.shape
        return L * H * N * Cb

    @property
    def block_outermost(self) -> bool:
        """True when B is outside L (vLLM's cross-layer layouts): one gather for all layers."""
        return self.shape[0] == 1 or self.byte_strides[1] > self.byte_strides[0]

    def logical(self) -> torch.Tensor:
        """``[L, B, H, N, Cb // width]`` view in ``self.wdtype`` elements."""
        w = self.width
        L, B, H, N, Cb = self.shape
        base = self.base.view(self.wdtype)
        strides = tuple(s // w for s in self.byte_strides[:4]) + (1,)
        return base.as_strided((L, B, H, N, Cb // w), strides, self.offset_bytes // w)


def slab_tensor(buffer: memoryview, num_slots: int, slot_bytes: int) -> torch.Tensor:
    """``[num_slots, slot_bytes]`` uint8 tensor over a slab (e.g. ``DramTier.buffer``), no copy.

    The tensor holds a buffer export: drop it (and every engine using it) before closing the tier.
    """
    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=num_slots * slot_bytes)
    return flat.view(num_slots, slot_bytes)


class _Staging:
    __slots__ = ("rows", "ready", "free")

    def __init__(self, rows: torch.Tensor, cuda: bool) -> None:
        self.rows = rows
        self.ready = torch.cuda.Event() if cuda else None
        self.free = torch.cuda.Event() if cuda else None


class _Ring:
    """Per-job index buffers; reused once the job that used them finished."""

    __slots__ = ("idx_host", "idx_np", "idx_dev", "done", "job_id")

    def __init__(self, n: int, device: torch.device, cuda: bool) -> None:
        self.idx_host = torch.empty(n, dtype=torch.int64, pin_memory=cuda)
        self.idx_np = self.idx_host.numpy()
        self.idx_dev = torch.empty(n, dtype=torch.int64, device=device) if cuda else self.idx_host
        self.done = torch.cuda.Event() if cuda else None
        self.job_id = 0


@dataclass
class _Job:
    ring: _Ring
    kind: str
    num_blocks: int
    num_bytes: int
    finished: bool = False   # set when its ring entry was reclaimed (event known complete)


class CopyEngine:
    """Moves blocks between a :class:`PagedKV` and a slot slab ``[num_slots, slot_bytes]``.

    ``slab`` is the DRAM slab (pinned host memory; see tiers/pinning.py) or another device
    tensor. ``chunk_blocks`` sets the staging buffer size (two of them are allocated on the KV's
    device); ``max_job_blocks`` bounds one job; ``max_inflight`` jobs may be outstanding before a
    submit waits for the oldest.
    """

    def __init__(self, kv: PagedKV, slab: torch.Tensor, *, chunk_blocks: int = 64,
                 max_job_blocks: int | None = None, max_inflight: int = 8) -> None:
        if slab.dim() != 2 or slab.dtype != torch.uint8 or not slab.is_contiguous():
            raise ConfigError("slab must be a contiguous uint8 [num_slots, slot_bytes] tensor")
        self.kv = kv
        self.slab = slab
        self.block_bytes = kv.block_bytes
        self.num_slots, self.slot_bytes = slab.shape
        if self.slot_bytes < self.block_bytes:
            raise ConfigError(f"slot of {self.slot_bytes} B cannot hold a {self.block_bytes} B block")
        self.device = kv.device
        self.cuda = self.device.type == "cuda"
        if self.cuda and slab.device.type == "cpu" and not slab.is_pinned():
            import warnings
            warnings.warn("DRAM slab is not pinned: host copies will be synchronous and slow",
                          RuntimeWarning, stacklevel=2)
        self.max_job_blocks = max_job_blocks or kv.num_blocks
        self.chunk_blocks = max(1, min(chunk_blocks, self.max_job_blocks))
        self._merge_runs = self.slot_bytes == self.block_bytes
        L, _, H, N, Cb = kv.shape
        self._cw = Cb // kv.width
        lg = kv.logical()
        self._src_all = lg.transpose(0, 1)            # [B, L, H, N, Cw]
        self._src_layers = [lg[i] for i in range(L)]  # [B, H, N, Cw] each
        self._single = kv.block_outermost
        with torch.no_grad():
            self._staging = [
                _Staging(torch.empty(self.chunk_blocks, self.block_bytes, dtype=torch.uint8,
                                     device=self.device), self.cuda) for _ in range(2)]
            self._ring = [_Ring(self.max_job_blocks, self.device, self.cuda)
                          for _ in range(max(1, max_inflight))]
        if self.cuda:
            self._gather_stream = torch.cuda.Stream(self.device)
            self._copy_stream = torch.cuda.Stream(self.device)
        self._next_ring = 0
        self._chunk_no = 0
        self._ids = itertools.count(1)
        self._jobs: dict[int, _Job] = {}
        # copies: staging <-> slab copies; direct: CPU chunks gathered / scattered in the slab
        self.stats = {"jobs": 0, "blocks": 0, "bytes": 0, "copies": 0, "direct": 0,
                      "ring_waits": 0}

    # ---------------------------------------------------------------- public API
    def submit_offload(self, block_ids: Sequence[int], slots: Sequence[int]) -> int:
        """Copy KV blocks ``block_ids`` into slab ``slots`` (same length); returns a job id."""
        return self._submit("offload", block_ids, slots)

    def submit_onload(self, slots: Sequence[int], block_ids: Sequence[int]) -> int:
        """Copy slab ``slots`` into KV blocks ``block_ids`` (same length); returns a job id."""
        return self._submit("onload", block_ids, slots)

    def poll(self, job_id: int) -> bool:
        """True once the job finished (its bytes are in place); the id is then retired."""
        job = self._job(job_id)
        if job.ring.done is not None and not job.finished:
            try:
                if not job.ring.done.query():
                    return False
            except RuntimeError as e:  # an asynchronous CUDA error surfaces here
                del self._jobs[job_id]
                raise TransferFailed(f"copy job {job_id} failed: {e}") from e
        del self._jobs[job_id]
        return True

    def wait(self, job_id: int) -> None:
        """Block the host until the job finished (tests, benchmarks, shutdown; not the hot path)."""
        job = self._job(job_id)
        if job.ring.done is not None and not job.finished:
            job.ring.done.synchronize()
        self.poll(job_id)

    def wait_stream(self, job_id: int, stream=None) -> None:
        """Make ``stream`` (default: current) wait for the job on the device; host not blocked."""
        job = self._job(job_id)
        if job.ring.done is not None and not job.finished:
            (stream or torch.cuda.current_stream(self.device)).wait_event(job.ring.done)

    def pending(self) -> int:
        return len(self._jobs)

    def close(self) -> None:
        for jid in list(self._jobs):
            self.wait(jid)
        self._src_all = self._src_layers = None  # type: ignore[assignment]
        self.kv = self.slab = None  # type: ignore[assignment]
        self._staging = []
        self._ring = []

    # ---------------------------------------------------------------- internals
    def _job(self, job_id: int) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobError(f"unknown or finished copy job {job_id}") from None

    def _check(self, block_ids: Sequence[int], slots: Sequence[int]) -> int:
        n = len(block_ids)
        if n != len(slots):
            raise ConfigError(f"{n} block ids but {len(slots)} slots")
        if n > self.max_job_blocks:
            raise ConfigError(f"job of {n} blocks exceeds max_job_blocks={self.max_job_blocks}")
        if n and (min(block_ids) < 0 or max(block_ids) >= self.kv.num_blocks
                  or min(slots) < 0 or max(slots) >= self.num_slots):
            raise ConfigError("block id or slot out of range")
        if len(set(block_ids)) != n or len(set(slots)) != n:
            raise ConfigError("block ids and slots of one job must be unique")
        return n

    def _take_ring(self) -> _Ring:
        r = self._ring[self._next_ring]
        self._next_ring = (self._next_ring + 1) % len(self._ring)
        old = self._jobs.get(r.job_id)
        if old is not None and not old.finished:   # oldest job not yet polled: wait for it
            self.stats["ring_waits"] += 1
            if r.done is not None:
                r.done.synchronize()
            old.finished = True                      # its poll() still reports it, once
        return r

    def _submit(self, kind: str, block_ids: Sequence[int], slots: Sequence[int]) -> int:
        n = self._check(block_ids, slots)
        r = self._take_ring()
        job_id = next(self._ids)
        r.job_id = job_id
        r.idx_np[:n] = block_ids
        try:
            with torch.no_grad():
                if self.cuda:
                    self._submit_cuda(kind, r, n, slots)
                else:
                    self._submit_cpu(kind, r, n, slots)
        except RuntimeError as e:
            raise TransferFailed(f"{kind} of {n} blocks failed to launch: {e}") from e
        self._jobs[job_id] = _Job(r, kind, n, n * self.block_bytes)
        st = self.stats
        st["jobs"] += 1
        st["blocks"] += n
        st["bytes"] += n * self.block_bytes
        return job_id

    def _chunks(self, n: int):
        for i in range(0, n, self.chunk_blocks):
            buf = self._staging[self._chunk_no % 2]
            self._chunk_no += 1
            yield i, min(n, i + self.chunk_blocks), buf

    def _runs(self, slots: Sequence[int], lo: int, hi: int):
        """(staging row, first slot, count) for runs of consecutive slots in slots[lo:hi]."""
        if not self._merge_runs:
            for i in range(lo, hi):
                yield i - lo, slots[i], 1
            return
        start = lo
        for i in range(lo + 1, hi + 1):
            if i == hi or slots[i] != slots[i - 1] + 1:
                yield start - lo, slots[start], i - start
                start = i

    def _copy_out(self, buf: _Staging, slots: Sequence[int], lo: int, hi: int) -> None:
        bb = self.block_bytes
        for row, s, k in self._runs(slots, lo, hi):
            dst = self.slab[s:s + k] if self._merge_runs else self.slab[s, :bb]
            src = buf.rows[row:row + k] if self._merge_runs else buf.rows[row]
            self._copy(dst, src)

    def _copy_in(self, buf: _Staging, slots: Sequence[int], lo: int, hi: int) -> None:
        bb = self.block_bytes
        for row, s, k in self._runs(slots, lo, hi):
            src = self.slab[s:s + k] if self._merge_runs else self.slab[s, :bb]
            dst = buf.rows[row:row + k] if self._merge_runs else buf.rows[row]
            self._copy(dst, src)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """One staging <-> slab copy: asynchronous on the copy stream (CUDA), the host copy
        kernel on the CPU (tierstore/io/hostcopy.py: streaming stores, several threads)."""
        if self.cuda:
            dst.copy_(src, non_blocking=True)
        else:
            host_copy_(dst, src)
        self.stats["copies"] += 1

    def _rows5(self, rows: torch.Tensor, m: int) -> torch.Tensor:
        L, _, H, N, _ = self.kv.shape
        return rows[:m].view(self.kv.wdtype).view(m, L, H, N, self._cw)

    def _gather(self, idx: torch.Tensor, rows: torch.Tensor, m: int) -> None:
        out = self._rows5(rows, m)
        if self._single:
            torch.index_select(self._src_all, 0, idx, out=out)
        else:
            for layer, src in enumerate(self._src_layers):
                torch.index_select(src, 0, idx, out=out[:, layer])

    def _scatter(self, idx: torch.Tensor, rows: torch.Tensor, m: int) -> None:
        rows = self._rows5(rows, m)
        if self._single:
            self._src_all.index_copy_(0, idx, rows)
        else:
            for layer, dst in enumerate(self._src_layers):
                dst.index_copy_(0, idx, rows[:, layer])

    def _submit_cpu(self, kind: str, r: _Ring, n: int, slots: Sequence[int]) -> None:
        for lo, hi, buf in self._chunks(n):
            idx = r.idx_dev[lo:hi]
            rows = self._slab_run(slots, lo, hi)
            if rows is not None:   # one run of slots: gather into / scatter from the slab itself
                if kind == "offload":
                    self._gather(idx, rows, hi - lo)
                else:
                    self._scatter(idx, rows, hi - lo)
                self.stats["direct"] += 1
            elif kind == "offload":
                self._gather(idx, buf.rows, hi - lo)
                self._copy_out(buf, slots, lo, hi)
            else:
                self._copy_in(buf, slots, lo, hi)
                self._scatter(idx, buf.rows, hi - lo)

    def _slab_run(self, slots: Sequence[int], lo: int, hi: int) -> torch.Tensor | None:
        """The slab rows of ``slots[lo:hi]`` when :meth:`_runs` finds them one run of slots of
        exactly one block each (CPU only: the gather can write the slab directly, saving the
        staging copy)."""
        if not self._merge_runs:
            return None
        runs = self._runs(slots, lo, hi)
        _, s0, k = next(runs)
        return None if next(runs, None) is not None else self.slab[s0:s0 + k]

    def _submit_cuda(self, kind: str, r: _Ring, n: int, slots: Sequence[int]) -> None:
        g, c = self._gather_stream, self._copy_stream
        g.wait_stream(torch.cuda.current_stream(self.device))  # KV writes (or reads) done first
        with torch.cuda.stream(g):
            r.idx_dev[:n].copy_(r.idx_host[:n], non_blocking=True)
        last = g
        for lo, hi, buf in self._chunks(n):
            idx = r.idx_dev[lo:hi]
            if kind == "offload":
                with torch.cuda.stream(g):
                    g.wait_event(buf.free)
                    self._gather(idx, buf.rows, hi - lo)
                    buf.ready.record(g)
                with torch.cuda.stream(c):
                    c.wait_event(buf.ready)
                    self._copy_out(buf, slots, lo, hi)
                    buf.free.record(c)
                last = c
            else:
                with torch.cuda.stream(c):
                    c.wait_event(buf.free)
                    self._copy_in(buf, slots, lo, hi)
                    buf.ready.record(c)
                with torch.cuda.stream(g):
                    g.wait_event(buf.ready)
                    self._scatter(idx, buf.rows, hi - lo)
                    buf.free.record(g)
                last = g
        if last is c:
            g.wait_stream(c)
        r.done.record(g)
