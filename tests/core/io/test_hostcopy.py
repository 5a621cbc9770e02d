"""Host copies (tierstore.io.hostcopy): the C kernel gives torch's ``copy_`` result byte for byte,
over random shapes, strides, dtypes, thread counts and with and without streaming stores, and
everything it does not handle goes to torch (inference tensors, vmap, ZeroTensor, bool and
nested tensors included); autograd sees its writes (the version counter); the C entry point
refuses malformed arguments with an exception, never a crash.

The reference is always ``torch.Tensor.copy_`` on a clone of the destination.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierstore.io import hostcopy
from tierstore.io.hostcopy import host_copy_

DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int64)


@pytest.fixture
def small(monkeypatch):
    """Let small tensors through the kernel (the production floors are MiB), many threads."""
    monkeypatch.setattr(hostcopy, "MIN_BYTES", 0)
    monkeypatch.setattr(hostcopy, "MIN_ROW_BYTES", 1)
    monkeypatch.setattr(hostcopy, "THREAD_MIN_BYTES", 1)


def test_kernel_is_built():
    """The install (README, CI) compiles tierstore/io/_hostcopy.c; a silent build failure would
    leave every copy on torch's slower path, so it fails here."""
    assert hostcopy.available(), "tierstore.io._hostcopy did not build: see setup.py"


def _random_view(draw, base_shape, dtype):
    """A tensor of ``base_shape`` whose storage is larger, sliced and permuted at random."""
    perm = draw(st.permutations(range(len(base_shape))))
    pad = [draw(st.integers(0, 2)) for _ in base_shape]
    phys_shape = [base_shape[p] + pad[i] for i, p in enumerate(perm)]
    buf = torch.randint(0, 120, phys_shape, dtype=torch.int64).to(dtype)
    view = buf[tuple(slice(0, base_shape[p]) for p in perm)]
    inv = [list(perm).index(i) for i in range(len(base_shape))]
    return view.permute(inv)


@st.composite
def pairs(draw):
    nd = draw(st.integers(1, 5))
    shape = [draw(st.integers(1, 6)) for _ in range(nd - 1)] + [draw(st.integers(1, 300))]
    dtype = draw(st.sampled_from(DTYPES))
    src = _random_view(draw, shape, dtype)
    if draw(st.booleans()):
        dst = torch.zeros(shape, dtype=dtype)           # the usual case: into a slot
    else:
        dst = _random_view(draw, shape, dtype)
    return dst, src


def _copy_on(threads: int, dst: torch.Tensor, src: torch.Tensor) -> None:
    """``host_copy_(dst, src)`` with torch set to ``threads`` threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        host_copy_(dst, src)
    finally:
        torch.set_num_threads(before)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=pairs(), stream=st.booleans(), threads=st.integers(1, 4))
def test_same_bytes_as_torch(small, monkeypatch, p, stream, threads):
    dst, src = p
    monkeypatch.setattr(hostcopy, "STREAM_MIN_BYTES", 0 if stream else 1 << 62)
    want = dst.clone()
    want.copy_(src)
    _copy_on(threads, dst, src)
    assert torch.equal(dst, want)


def test_kv_gather_runs_in_the_kernel(small):
    """The copy a store does: n blocks of [2, L, T, HD] sliced from [2, L, n*T, HD] into n
    consecutive slots (and back). One kernel call, 64-row blocks, both directions exact."""
    n, L, T, HD = 8, 4, 16, 128
    eng = torch.randn(2, L, n * T, HD).to(torch.float16)
    slots = torch.zeros(n, 2, L, T, HD, dtype=torch.float16)
    blocks = torch.as_strided(eng, (n, 2, L, T, HD), (T * HD, *eng.stride()))
    plan = hostcopy._plan(slots, blocks)
    assert plan is not None
    assert plan[2] == (n, 2 * L) and plan[5] == T * HD * 2   # rows of one token run each
    host_copy_(slots, blocks)
    for i in range(n):
        assert torch.equal(slots[i], eng[:, :, i * T:(i + 1) * T])
    back = torch.zeros_like(eng)
    host_copy_(torch.as_strided(back, blocks.shape, blocks.stride()), slots)
    assert torch.equal(back, eng)


@pytest.mark.parametrize("offset", [1, 2, 3, 15, 17])
def test_unaligned_destination_with_streaming(small, monkeypatch, offset):
    """Streaming stores need 16-byte aligned lines: the head and tail of each row are copied
    plainly. Rows of odd lengths at odd offsets, several rows."""
    monkeypatch.setattr(hostcopy, "STREAM_MIN_BYTES", 0)
    src = torch.randint(0, 255, (7, 1000), dtype=torch.uint8)
    big = torch.zeros(7 * 1000 + 64, dtype=torch.uint8)
    dst = big[offset:offset + 7000].view(7, 1000)
    host_copy_(dst, src)
    assert torch.equal(dst, src)
    assert big[:offset].eq(0).all() and big[offset + 7000:].eq(0).all()   # nothing outside


def test_large_copy_uses_kernel_with_production_floors():
    """Above MIN_BYTES with the production constants: planned for the kernel, streaming, and
    as many threads as torch has (capped by THREAD_MIN_BYTES)."""
    n = hostcopy.STREAM_MIN_BYTES // 4096
    src = torch.randint(0, 255, (n, 4096), dtype=torch.uint8)
    dst = torch.empty_like(src)
    plan = hostcopy._plan(dst, src)
    assert plan is not None and plan[7] is True
    assert plan[6] == max(1, min(torch.get_num_threads(), src.numel() // hostcopy.THREAD_MIN_BYTES))
    host_copy_(dst, src)
    assert torch.equal(dst, src)


def test_one_contiguous_run_is_shared_by_the_threads(small, monkeypatch):
    """A contiguous copy is one row: the plan cuts it so every thread gets a piece."""
    monkeypatch.setattr(hostcopy, "STREAM_MIN_BYTES", 0)
    src = torch.randint(0, 255, (3, 1 << 16), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plan = hostcopy._plan(dst, src)
        host_copy_(dst, src)
    finally:
        torch.set_num_threads(before)
    sizes, row_bytes, threads = plan[2], plan[5], plan[6]
    assert threads == 2 and sizes == (8,) and row_bytes == 3 * (1 << 16) // 8
    assert torch.equal(dst, src)


def _fallback_cases():
    a = torch.randn(64, 64)
    yield "dtype conversion", torch.zeros(64, 64, dtype=torch.float64), a
    yield "broadcast", torch.zeros(64, 64), torch.randn(64)
    yield "innermost not contiguous", torch.zeros(64, 64), a.t()
    yield "requires grad", torch.zeros(64, 64), torch.randn(64, 64, requires_grad=True)
    yield "conjugate view", torch.zeros(64, 64, dtype=torch.complex64), \
        torch.randn(64, 64, dtype=torch.complex64).conj()


@pytest.mark.parametrize("name,dst,src", list(_fallback_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_what_the_kernel_leaves_to_torch(small, name, dst, src):
    assert hostcopy._plan(dst, src) is None, name
    want = dst.clone()
    want.copy_(src.detach() if src.requires_grad else src)
    got = host_copy_(dst, src.detach() if name == "requires grad" else src)
    assert torch.equal(got, want)


def test_overlap_is_torch_s_to_refuse(small):
    """Source and destination sharing bytes: the kernel never sees it; torch raises."""
    a = torch.randn(64, 64)
    assert hostcopy._plan(a[1:], a[:-1]) is None
    with pytest.raises(RuntimeError, match="single memory location"):
        host_copy_(a[1:], a[:-1])


def test_small_copies_stay_on_torch():
    """Below MIN_BYTES the planning would cost more than it saves."""
    src = torch.randn(16, 16)
    assert hostcopy._plan(torch.empty_like(src), src) is None


def test_shape_mismatch_raises_as_torch(small):
    with pytest.raises(RuntimeError):
        host_copy_(torch.zeros(4, 5), torch.zeros(4, 6))


def test_without_the_kernel_torch_does_everything(monkeypatch):
    monkeypatch.setattr(hostcopy, "_hostcopy", None)
    assert not hostcopy.available()
    src = torch.randn(1 << 19)
    dst = torch.zeros_like(src)
    assert hostcopy._plan(dst, src) is None
    host_copy_(dst, src)
    assert torch.equal(dst, src)


@pytest.mark.skipif(not hostcopy.available(), reason="kernel not built")
def test_kernel_rejects_malformed_arguments():
    k = hostcopy._hostcopy
    buf = torch.zeros(64, dtype=torch.uint8)
    p = buf.data_ptr()
    with pytest.raises(ValueError):
        k.copy_rows(p, p + 32, (2,), (16,), (16, 0), 16, 1, False)   # tuple lengths differ
    with pytest.raises(ValueError):
        k.copy_rows(p, p + 32, (2,), (-16,), (16,), 16, 1, False)    # negative stride
    with pytest.raises(ValueError):
        k.copy_rows(0, p, (), (), (), 16, 1, False)                   # null address
    with pytest.raises(ValueError):
        k.copy_rows(p, p, (1,) * 9, (0,) * 9, (0,) * 9, 1, 1, False)  # too many dims
    k.copy_rows(p, p + 32, (0,), (16,), (16,), 16, 2, True)          # zero rows: nothing
    assert buf.eq(0).all()


# --- adversarial review: each test below failed before its fix ---------------------------------


def test_autograd_sees_the_in_place_write(small):
    """A kernel copy used to leave ``dst._version`` alone: autograd, which saved ``dst`` for a
    backward pass, then computed a silently wrong gradient from the overwritten values where
    ``dst.copy_(src)`` makes backward raise."""
    w = torch.ones(4, 256, requires_grad=True)
    a = torch.zeros(4, 256)
    y = (a * w).sum()                        # saves a for the gradient of w
    src = torch.full((4, 256), 3.0)
    assert hostcopy._plan(a, src) is not None or not hostcopy.available()
    v = a._version
    host_copy_(a, src)
    assert a._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_inference_tensor_outside_inference_mode_raises_as_torch(small):
    """torch raises for an in-place write to an inference tensor outside inference mode (after
    the write: the check is its version counter bump); the kernel wrote without a word. Inside
    inference mode the kernel still does the copy."""
    with torch.inference_mode():
        t = torch.zeros(4, 256)
    src = torch.ones(4, 256)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        host_copy_(t, src)
    with torch.inference_mode():
        assert hostcopy._plan(t, src) is not None or not hostcopy.available()
        host_copy_(t, src)
    assert torch.equal(t, src)


def test_zero_tensor_source_copies_zeros(small):
    """A ZeroTensor (forward-mode AD's efficient zeros) has no data (data_ptr 0): the kernel
    raised ValueError('null address') where ``copy_`` writes zeros."""
    z = torch._efficientzerotensor(4, 256)
    dst = torch.full((4, 256), 7.0)
    host_copy_(dst, z)
    assert dst.eq(0).all()


def test_empty_tensors_with_the_floor_lowered(small):
    """With MIN_BYTES lowered (as here) a 0-element tensor whose dims do not merge into one
    reached the kernel with data_ptr 0: ValueError('null address') instead of copy_'s no-op."""
    dst = torch.zeros(0, 6, 64)[:, ::2]     # rows of 64, a gap between them
    src = torch.ones(0, 3, 64)
    assert dst.numel() == 0 and dst.data_ptr() == 0
    assert host_copy_(dst, src) is dst


def test_under_vmap_as_torch(small):
    """Inside torch.vmap (and torch.func transforms) tensors are wrappers without storage:
    ``data_ptr()`` raised in the planning where ``copy_`` works."""
    dst, src = torch.zeros(3, 4, 256), torch.randn(3, 4, 256)
    torch.vmap(host_copy_)(dst, src)
    assert torch.equal(dst, src)


def test_nested_tensor_as_torch(small):
    """A nested tensor (strided layout) has no ``shape``: the planning raised RuntimeError
    where ``copy_`` copies it."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # "nested tensors are a prototype"
        src = torch.nested.nested_tensor([torch.randn(3, 200), torch.randn(5, 200)])
        dst = torch.nested.nested_tensor([torch.zeros(3, 200), torch.zeros(5, 200)])
    host_copy_(dst, src)
    assert all(torch.equal(a, b) for a, b in zip(dst.unbind(), src.unbind()))


def test_bool_bytes_are_normalized_as_torch(small):
    """torch's copy_ of a bool tensor writes 0/1 even when a source byte holds another value
    (a bool view of uint8 bytes); the kernel copied the raw bytes (2 stayed 2)."""
    src = torch.full((4, 256), 2, dtype=torch.uint8).view(torch.bool)
    dst = torch.zeros(4, 256, dtype=torch.bool)
    want = dst.clone().copy_(src)
    host_copy_(dst, src)
    assert torch.equal(dst.view(torch.uint8), want.view(torch.uint8))


def test_dtypes_torch_cannot_copy_raise_as_torch(small):
    """The sub-byte shell dtypes (uint4, int4, ...) have no copy kernel in torch; host_copy_
    copied their bytes instead of raising torch's error."""
    dst = torch.zeros(4, 512, dtype=torch.uint8).view(torch.uint4)
    src = torch.ones(4, 512, dtype=torch.uint8).view(torch.uint4)
    with pytest.raises(NotImplementedError):
        host_copy_(dst, src)


def _survives(code: str) -> str:
    """Runs ``code`` (with k = the kernel module, p = the address of a 64-byte zeroed buffer)
    in a child interpreter, so that a crash fails the test instead of ending the run; returns
    the exception type name the code raised, or 'returned'."""
    import subprocess
    import sys
    prog = ("import torch\nfrom tierstore.io import _hostcopy as k\n"
            "b = torch.zeros(64, dtype=torch.uint8)\np = b.data_ptr()\n"
            f"try:\n    {code}\n    print('returned')\nexcept Exception as e:\n"
            "    print(type(e).__name__)\n")
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"crashed (rc {r.returncode}): {r.stderr[-300:]}"
    return r.stdout.strip()


@pytest.mark.skipif(not hostcopy.available(), reason="kernel not built")
@pytest.mark.parametrize("call", [
    "k.copy_rows(p, p + 32, (), (), (), -1, 1, False)",          # 'K' made it 2**64 - 1
    "k.copy_rows(p, p + 32, (), (), (), 1 << 70, 1, False)",     # 'K' masked it to 0: a no-op
    "k.copy_rows(-p, p + 32, (), (), (), 16, 1, False)",         # a wrapped address
    "k.copy_rows(p, -p, (), (), (), 16, 1, False)",
])
def test_kernel_rejects_ints_out_of_range(call):
    """'K' converts any int modulo 2**64: a negative row_bytes became a huge memcpy (heap
    corruption), a negative address a wild pointer, and too large a row_bytes a silent no-op.
    Each is now an error."""
    assert _survives(call) in ("ValueError", "OverflowError")


@pytest.mark.skipif(not hostcopy.available(), reason="kernel not built")
@pytest.mark.parametrize("sizes", [(1 << 62, 4), (1 << 62, 2), (1 << 40, 1 << 40)])
def test_kernel_rejects_a_row_count_that_overflows(sizes):
    """prod(sizes) overflowed Py_ssize_t: the row count came out 0 or negative, no part was set
    up and the caller's thread copied an uninitialized part (a crash). Now a ValueError."""
    assert _survives(f"k.copy_rows(p, p + 32, {sizes}, (0, 0), (0, 0), 16, 2, False)") \
        == "ValueError"


@st.composite
def strided_pairs(draw):
    """dst, src (of one random-byte dtype) as ``as_strided`` views: up to 12 dims, size-1 dims
    with odd strides, gaps between outer dims, zero strides in the source (expand), storage
    offsets; dst inside a buffer with guard bytes on both sides. Returns (dst_buffer, dst, src)."""
    nd = draw(st.integers(1, 12))
    shape = [draw(st.sampled_from((1, 1, 2, 3, 4))) for _ in range(nd - 1)]
    shape.append(draw(st.sampled_from((1, 8, 33, 64, 200))))
    dtype = draw(st.sampled_from(DTYPES + (torch.complex64, torch.float8_e4m3fn)))

    def strides(zero_ok):
        out, span = [0] * nd, 1
        for d in reversed(range(nd)):
            if d == nd - 1 and draw(st.integers(0, 9)):
                out[d], span = 1, shape[d] + draw(st.sampled_from((0, 0, 1, 5)))
            elif shape[d] == 1:
                out[d] = draw(st.sampled_from((0, 1, 7, 99991)))
            elif zero_ok and draw(st.integers(0, 6)) == 0:
                out[d] = 0
            else:
                out[d] = span
                span = span * shape[d] + draw(st.sampled_from((0, 0, 0, 1, 64)))
        return out

    def extent(st_):
        return 1 + sum((n - 1) * s for n, s in zip(shape, st_))

    isz = torch.empty(0, dtype=dtype).element_size()
    ds, ss = strides(False), strides(True)
    guard, off = 64, draw(st.integers(0, 7))
    dbuf = torch.randint(0, 256, ((extent(ds) + 2 * guard + 8) * isz,), dtype=torch.uint8)
    sbuf = torch.randint(0, 256, ((extent(ss) + 8) * isz,), dtype=torch.uint8)
    dst = dbuf.view(dtype).as_strided(shape, ds, guard + off)
    src = sbuf.view(dtype).as_strided(shape, ss, draw(st.integers(0, 7)))
    return dbuf, dst, src


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=strided_pairs(), stream=st.booleans(), threads=st.sampled_from((1, 2, 3, 8, 100)))
def test_strided_layouts_same_bytes_nothing_outside(small, monkeypatch, p, stream, threads):
    """Byte for byte torch's copy_, over the whole destination buffer (guard bytes included),
    for layouts the first property test does not draw (random bytes, NaN patterns included)."""
    dbuf, dst, src = p
    monkeypatch.setattr(hostcopy, "STREAM_MIN_BYTES", 0 if stream else 1 << 62)
    want = dbuf.clone()
    want.view(dst.dtype).as_strided(dst.shape, dst.stride(), dst.storage_offset()).copy_(src)
    _copy_on(threads, dst, src)
    assert torch.equal(dbuf, want)


@pytest.mark.parametrize("gap", [0, 16, 64])
def test_source_at_every_offset_around_the_destination(small, gap):
    """dst and src: 4 rows of 64 bytes, ``gap`` bytes apart, in one buffer; src starts at
    every byte offset from before dst's first byte to past its last. Byte for byte torch's
    result (or torch's error where the two overlap): the overlap test has no off-by-one."""
    rows, width = 4, 64
    shape, stride = (rows, width), (width + gap, 1)
    extent = (rows - 1) * (width + gap) + width
    base = 2 * extent
    for delta in range(-extent - 1, extent + 2):
        buf = torch.randint(0, 256, (5 * extent,), dtype=torch.uint8)
        want = buf.clone()
        try:
            want.as_strided(shape, stride, base).copy_(want.as_strided(shape, stride, base + delta))
            err = None
        except RuntimeError as e:
            err = e
        dst, src = buf.as_strided(shape, stride, base), buf.as_strided(shape, stride, base + delta)
        if err is not None:
            with pytest.raises(RuntimeError):
                host_copy_(dst, src)
        else:
            host_copy_(dst, src)
            assert torch.equal(buf, want), delta
        if abs(delta) >= extent:
            assert hostcopy._plan(dst, src) is not None or not hostcopy.available(), delta


def test_destination_overlapping_itself_goes_to_torch(small):
    """A destination whose rows overlap each other with non-zero strides (here each row starts
    half a row after the previous one) passed the self-overlap check, which only looked for
    zero strides: the threads wrote the shared bytes in a race, a different result from torch's
    copy_ from run to run. Now torch's copy_ does it."""
    rows, width = 64, 1 << 12
    src = torch.arange(rows, dtype=torch.uint8).repeat_interleave(width).view(rows, width)
    buf = torch.zeros(rows * width // 2 + width, dtype=torch.uint8)
    dst = buf.as_strided((rows, width), (width // 2, 1))
    assert hostcopy._plan(dst, src) is None
    want = buf.clone()
    want.as_strided((rows, width), (width // 2, 1)).copy_(src)
    host_copy_(dst, src)
    assert torch.equal(buf, want)
