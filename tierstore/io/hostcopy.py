"""Host copies of KV bytes: :func:`host_copy_` is ``dst.copy_(src)`` for CPU tensors, faster
when the copy is large.

A KV copy on the host is a gather or a scatter of rows: one row per layer and K/V of a block
(32 KiB for a Llama-3-8B block of 16 tokens), between a paged cache (or an engine buffer) and
the slot slab. torch's ``copy_`` moves rows with ordinary stores: each destination cache line
is read before it is written (read-for-ownership), three memory transfers per byte. This module
hands the rows to a small C kernel (``tierstore/io/_hostcopy.c``) that copies them on
``torch.get_num_threads()`` threads with streaming stores when the copy is larger than
:data:`STREAM_MIN_BYTES` (two transfers per byte, and the bytes do not push the engine's working
set out of the cache). Measured on the 2-core dev VM (``benchmarks/bench_hostcopy.py``): 1 GiB of
2 MiB blocks gathered from ``[2, L, N*T, HD]`` fp16 views into slots and back, in parts of 16-512
blocks, 1.14-1.41x torch's ``copy_`` (docs/benchmarks.md, "The host copy kernel").

What it does not do, and leaves to torch's ``copy_`` (same result, torch's speed): tensors not
on the CPU, different dtypes or shapes (no conversion, no broadcast), dtypes whose ``copy_`` is
not a copy of the bytes (bool: torch writes 0/1; quantized; the sub-byte shell dtypes, which
torch does not copy), autograd, conjugate or negative views, an inference tensor outside
inference mode (torch raises), non-strided layouts and nested tensors, tensors without storage
or data (torch.vmap, ZeroTensor), copies under :data:`MIN_BYTES`, rows (the contiguous innermost
run common to both tensors) under :data:`MIN_ROW_BYTES`, a destination that may overlap itself
(any stride short of the extent of the dimensions inside it) or the source, and every copy when
the extension is not built (:func:`available`).

Threading: the call blocks until the copy is done and releases the GIL meanwhile; it starts its
helper threads per call (a copy that takes it is >= :data:`MIN_BYTES`, milliseconds; a thread
start is ~20 us). Safe to call from several threads on disjoint destinations.
"""

from __future__ import annotations

import torch

try:
    from tierstore.io import _hostcopy
except ImportError:   # not built (no compiler at install time): torch's copy_ does every copy
    _hostcopy = None

MIN_BYTES = 8 << 20
"""Copies smaller than this (bytes) go to torch's ``copy_``. Below it the kernel's per-call costs
(planning ~10 us, a thread start per extra thread) outweigh what streaming stores save, and
torch's persistent thread pool wins: ``benchmarks/bench_hostcopy.py`` measured 2 MiB copies at
0.59x torch, 8 MiB at 1.07x, 32 MiB at 1.35x (docs/benchmarks.md)."""
MIN_ROW_BYTES = 512
"""Rows (contiguous runs common to source and destination) shorter than this go to torch."""
STREAM_MIN_BYTES = 8 << 20
"""Copies at least this large (bytes) use streaming stores; smaller ones likely stay in the
cache and are read soon (a few blocks of a decode step), where ordinary stores are faster.
Equal to :data:`MIN_BYTES` today, so every copy the kernel takes streams; the kernel's
ordinary-store path is kept for a lower ``MIN_BYTES`` (the tests run it that way)."""
THREAD_MIN_BYTES = 1 << 20
"""Each copy thread gets at least this many bytes."""

_MAX_DIMS = 8
_BYTE_INTS = frozenset((torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                        torch.uint16, torch.uint32, torch.uint64))


def _copies_bytes(dtype: torch.dtype) -> bool:
    """True where torch's ``copy_`` within ``dtype`` copies the bytes as they are: floating
    (NaN payloads too), complex and the full-width integers; not bool (torch writes 0 or 1 for
    any byte), quantized or the bits / sub-byte dtypes."""
    return dtype.is_floating_point or dtype.is_complex or dtype in _BYTE_INTS


def available() -> bool:
    """True when the C kernel is built and large CPU copies use it."""
    return _hostcopy is not None


def host_copy_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy ``src`` into ``dst`` (same shape and dtype, any strides); returns ``dst``.

    Same result as ``dst.copy_(src)``; for two CPU tensors of at least :data:`MIN_BYTES` whose
    innermost dimension (after merging dimensions that are contiguous in both) is contiguous in
    both, the copy runs in the C kernel (see the module docstring); anything else is
    ``dst.copy_(src)``, whose errors it raises (a shape mismatch: RuntimeError).
    """
    plan = _plan(dst, src)
    if plan is None:
        dst.copy_(src)
    else:
        _hostcopy.copy_rows(*plan)
        torch.autograd.graph.increment_version(dst)   # as copy_: autograd sees the write
    return dst


def _plan(dst: torch.Tensor, src: torch.Tensor):
    """The kernel's arguments, or None where torch's ``copy_`` must do the copy."""
    if _hostcopy is None or dst.device.type != "cpu" or src.device.type != "cpu":
        return None
    if dst.layout != torch.strided or src.layout != torch.strided or dst.is_nested \
            or src.is_nested:
        return None            # (a nested tensor can have the strided layout, but no shape)
    if dst.dtype != src.dtype or not _copies_bytes(dst.dtype) or dst.shape != src.shape:
        return None
    if dst.requires_grad or src.requires_grad or dst.is_conj() or src.is_conj() \
            or dst.is_neg() or src.is_neg() or dst.is_quantized:
        return None
    if dst.is_inference() and not torch.is_inference_mode_enabled():
        return None            # torch refuses this write (an inference tensor, outside the mode)
    isz = dst.element_size()
    nbytes = dst.numel() * isz
    if nbytes < MIN_BYTES:
        return None
    # (size, dst stride, src stride) in bytes, size-1 dims dropped, outermost first
    dims = [(n, ds * isz, ss * isz) for n, ds, ss in zip(dst.shape, dst.stride(), src.stride())
            if n != 1]
    merged: list[list[int]] = []
    for n, ds, ss in reversed(dims):   # innermost first: merge an outer dim into the one inside
        if merged and ds == merged[-1][0] * merged[-1][1] and ss == merged[-1][0] * merged[-1][2]:
            merged[-1][0] *= n
        else:
            merged.append([n, ds, ss])
    if not merged or merged[0][1] != isz or merged[0][2] != isz:
        return None            # the innermost run is not contiguous in both
    row_bytes = merged[0][0] * isz
    outer = merged[:0:-1]      # outermost first, without the row dim
    if row_bytes < MIN_ROW_BYTES or len(outer) > _MAX_DIMS:
        return None
    span = row_bytes           # by stride, each dst dim must clear the ones inside it
    for n, ds, _ in sorted(outer, key=lambda d: d[1]):
        if ds < span:
            return None        # a destination that (may) overlap itself: torch's copy_ decides
        span += (n - 1) * ds   # ends as dst's extent in bytes
    try:
        dptr, sptr = dst.data_ptr(), src.data_ptr()
    except RuntimeError:
        return None            # no storage: a wrapper (torch.vmap, torch.func) or a subclass
    if not dptr or not sptr:
        return None            # no data: an empty tensor, a ZeroTensor (copy_ writes zeros)
    dend = dptr + span
    send = sptr + row_bytes + sum((n - 1) * ss for n, _, ss in outer)
    if dptr < send and sptr < dend:
        return None            # source and destination share bytes: torch knows the rules
    threads = max(1, min(torch.get_num_threads(), nbytes // THREAD_MIN_BYTES))
    rows = nbytes // row_bytes
    if rows < threads and len(outer) < _MAX_DIMS:
        # fewer rows than threads (a contiguous copy is one row): cut each row in q pieces
        for q in (4 * threads, 2 * threads, threads):
            if row_bytes % (q * 64) == 0:
                outer.append([q, row_bytes // q, row_bytes // q])
                row_bytes //= q
                break
    return (dptr, sptr, tuple(n for n, _, _ in outer), tuple(ds for _, ds, _ in outer),
            tuple(ss for _, _, ss in outer), row_bytes, threads, nbytes >= STREAM_MIN_BYTES)
