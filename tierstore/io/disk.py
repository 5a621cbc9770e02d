"""Disk I/O engine of the NVMe tier: aligned vectored pread/pwrite, O_DIRECT detection, a small
thread pool.

What it owns:

- the system calls of the block path, behind module attributes that tests replace with
  recording or failing fakes: ``_sys_open``, ``_sys_pwritev``, ``_sys_preadv``,
  ``_sys_fallocate`` (every call goes through :func:`write_vec` / :func:`read_vec` /
  :func:`open_file` / :func:`write_zeroes`, never ``os.*`` directly);
- :func:`fallocate` (reserve space: unwritten extents) and :func:`write_zeroes` (turn a range into
  written zeros through the device's Write Zeroes command, Linux >= 6.17, where the filesystem and
  device offer it; the caller writes zero pages itself where they do not);
- :func:`resolve_direct_io`: ``"auto" | "on" | "off"`` -> whether files are opened with
  ``O_DIRECT``. "auto" probes the directory (open + one aligned 4096-byte write/read) and falls back
  to buffered I/O with **one** ``RuntimeWarning`` when the filesystem refuses; "on" makes a refusal
  a :class:`ConfigError`; "off" never tries;
- :func:`aligned_buffer`: page-aligned memory (anonymous mmap) for headers and bounce buffers;
  allocated once by the caller, never per I/O;
- :class:`IoPool`: the thread pool that issues a batch's I/Os concurrently (pread/pwrite release
  the GIL, so a batch keeps several requests in flight). **Owner:** one ``NvmeTier`` creates one
  pool and shuts it down in ``close()``; the pool is recreated lazily in a forked child (threads do
  not survive ``fork``). A batch of one runs inline on the caller's thread.

O_DIRECT rule: every buffer address, buffer length and file offset handed to a direct file is a
multiple of :data:`ALIGN` (4096, >= any logical block size we meet). :func:`write_vec` and
:func:`read_vec` assert it when ``direct`` is set, so a bug shows up as an error, not as EINVAL on
some filesystems only.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence, TypeVar

from tierstore.errors import ConfigError

ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)

FALLOC_FL_WRITE_ZEROES = 0x80   # linux/falloc.h, Linux 6.17: allocate as written zeros


_fallocate_fn = None   # libc's fallocate, looked up on first use


def _libc_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with a mode (os.posix_fallocate has none); OSError on failure."""
    global _fallocate_fn
    if _fallocate_fn is None:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        _fallocate_fn = fn
    if _fallocate_fn(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

# Replaceable system calls (tests install fakes here).
_sys_open = os.open
_sys_pwritev = os.pwritev
_sys_preadv = os.preadv
_sys_fallocate = _libc_fallocate

T = TypeVar("T")
R = TypeVar("R")


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def aligned_buffer(nbytes: int) -> memoryview:
    """Zeroed, page-aligned, writable memory of ``round_up(nbytes)`` bytes (at least one page)."""
    size = max(round_up(nbytes), ALIGN)
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


def address_of(buf: memoryview) -> int | None:
    """Address of a contiguous writable buffer, or None (read-only, empty or non-contiguous)."""
    if buf.readonly or not buf.contiguous or buf.nbytes == 0:
        return None
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (TypeError, ValueError):
        return None


def _check_aligned(bufs: Sequence, offset: int) -> None:
    if offset % ALIGN:
        raise ValueError(f"direct I/O offset {offset} not {ALIGN}-aligned")
    for b in bufs:
        n = memoryview(b).nbytes
        addr = address_of(memoryview(b))
        if n % ALIGN or addr is None or addr % ALIGN:
            raise ValueError(f"direct I/O buffer (len {n}, addr {addr}) not {ALIGN}-aligned")


def _advance(bufs: list[memoryview], done: int) -> list[memoryview]:
    out = []
    for b in bufs:
        if done >= b.nbytes:
            done -= b.nbytes
            continue
        out.append(b[done:] if done else b)
        done = 0
    return out


def _byte_views(bufs: Sequence, offset: int, direct: bool) -> tuple[list[memoryview], int]:
    """Byte views of ``bufs`` and their total size (alignment checked first for O_DIRECT)."""
    if direct:
        _check_aligned(bufs, offset)
    views = [memoryview(b).cast("B") for b in bufs]
    return views, sum(v.nbytes for v in views)


def write_vec(fd: int, bufs: Sequence, offset: int, *, direct: bool = False) -> None:
    """Write all of ``bufs`` at ``offset`` (retries short writes; OSError on failure)."""
    views, total = _byte_views(bufs, offset, direct)
    done = 0
    while done < total:
        n = _sys_pwritev(fd, views if done == 0 else _advance(views, done), offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        done += n


def read_vec(fd: int, bufs: Sequence, offset: int, *, direct: bool = False) -> int:
    """Read into ``bufs`` from ``offset``; returns bytes read (less than asked only at EOF)."""
    views, total = _byte_views(bufs, offset, direct)
    done = 0
    while done < total:
        n = _sys_preadv(fd, views if done == 0 else _advance(views, done), offset + done)
        if n <= 0:
            break
        done += n
        if direct and done % ALIGN:
            break  # a direct read that stops mid-block hit EOF
    return done


def open_file(path: str, *, direct: bool, create: bool = False) -> int:
    flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
    if create:
        flags |= os.O_CREAT
    if direct:
        flags |= O_DIRECT
    return _sys_open(path, flags, 0o644)


def fallocate(fd: int, offset: int, length: int) -> None:
    """Reserve ``[offset, offset+length)`` on disk (OSError ENOSPC when the filesystem is full).

    On ext4/xfs the range becomes *unwritten* extents: reads return zeros, and the first write
    into each extent pays a conversion (see :func:`write_zeroes` and ``NvmeTier.prepare``)."""
    if length > 0:
        os.posix_fallocate(fd, offset, length)


_WZ_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS, errno.ENODEV)


def write_zeroes(fd: int, offset: int, length: int) -> bool:
    """Make ``[offset, offset+length)`` written zeros without sending zero pages, through
    ``fallocate(FALLOC_FL_WRITE_ZEROES)`` (the device zeroes the range itself).

    Returns False when the kernel, filesystem or device does not offer it (the caller then writes
    zero pages); raises OSError for a real failure (EIO, ENOSPC)."""
    if length <= 0:
        return True
    try:
        _sys_fallocate(fd, FALLOC_FL_WRITE_ZEROES, offset, length)
    except OSError as e:
        if e.errno in _WZ_UNSUPPORTED:
            return False
        raise
    return True


def written_ranges(fd: int, end: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of ``[0, end)`` that hold written data, by ``SEEK_DATA`` /
    ``SEEK_HOLE``. Unwritten (fallocated, never written) extents count as holes on ext4 and xfs.
    Where the filesystem cannot tell, the whole range is reported written."""
    out: list[tuple[int, int]] = []
    off = 0
    try:
        while off < end:
            try:
                a = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:   # no data after off
                    break
                raise
            if a >= end:
                break
            b = min(os.lseek(fd, a, os.SEEK_HOLE), end)
            out.append((a, b))
            off = b
    except (OSError, AttributeError):
        return [(0, end)]
    return out


def probe_direct(directory: str) -> str | None:
    """Try O_DIRECT in ``directory``; returns None when it works, else the reason (one line)."""
    if not O_DIRECT:
        return "O_DIRECT is not available on this platform"
    path = os.path.join(directory, f".direct-probe-{os.getpid()}")   # nvme_recovery.PROBE_PREFIX
    buf = aligned_buffer(ALIGN)
    fd = -1
    try:
        fd = open_file(path, direct=True, create=True)
        write_vec(fd, [buf], 0, direct=True)
        read_vec(fd, [buf], 0, direct=True)
        return None
    except OSError as e:
        return f"{e.strerror or e} (errno {e.errno})"
    finally:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def resolve_direct_io(mode: str, directory: str) -> bool:
    """Decide O_DIRECT for files in ``directory``: one probe, at most one warning."""
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"direct_io must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off":
        return False
    why = probe_direct(directory)
    if why is None:
        return True
    if mode == "on":
        raise ConfigError(f"direct_io='on' but {directory} refuses O_DIRECT: {why}")
    warnings.warn(f"tierstore: {directory} refuses O_DIRECT ({why}); using buffered I/O",
                  RuntimeWarning, stacklevel=3)
    return False


class IoPool:
    """A few threads that run one batch's I/O functions concurrently; fork-aware.

    ``map(fn, items)`` returns results in order; exceptions propagate from ``fn`` unchanged
    (callers catch per item inside ``fn``). Single-owner: not for concurrent ``map`` calls.
    """

    def __init__(self, threads: int = 4) -> None:
        self.threads = max(1, threads)
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pid != os.getpid():
            # In a forked child the parent's worker threads do not exist: start fresh ones (the
            # inherited executor object is dropped without shutdown, which would wait forever).
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tierstore-disk")
            self._pid = os.getpid()
        return self._pool

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        items = list(items)
        if len(items) <= 1 or self.threads == 1:
            return [fn(x) for x in items]
        return list(self._executor().map(fn, items))

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=True)
        self._pool = None
