"""Pin (``cudaHostRegister``) the DRAM slab once at start, in chunks, all or nothing (MEM-22).

What it owns: the registration of one host region with CUDA, and the rollback when part of it
fails. Policy here, mechanism behind the :class:`Registrar` protocol::

    HostPinning(registrar, max_chunk_bytes=64 GiB).pin(ptr, size, slot_bytes) -> PinResult
        chunks = plan_chunks(size, slot_bytes, max_chunk_bytes)   # slot-aligned, <= max each
        for each chunk: registrar.register(ptr + off, n)
        on failure of chunk k: unregister chunks 0..k-1 (once each), registrar.clear_error(),
                               PinResult(pinned=False, error=...)   -> the tier runs unpinned
    decide_across_ranks([rank results], policy) -> PINNED | UNPINNED | REFUSE
        every TP rank applies the same decision (apply_decision unpins where needed)

Why chunks: a single ``cudaHostRegister`` call above a driver limit (observed: 512 GiB) fails for
a 600 GB slab; chunks of <= 64 GiB on slot boundaries work, and no block spans two chunks, so every
copy source or target lies inside one registration. Why clear the error: a failed runtime call
leaves the error in the thread's last-error slot, and the next unrelated CUDA call (an allocation
in vLLM) would report it. Why one decision for all ranks: TP ranks that disagree (one pinned, one
not) run at different speeds and fail differently.

Registrars: :class:`CudaRegistrar` (``torch.cuda.cudart()``, last error cleared through the loaded
libcudart), :class:`NoopRegistrar` (no CUDA: registering does nothing, the tier runs unpinned).
Tests pass hand-written fakes. :func:`map_shared_slab` is the client side: a local process maps the
daemon's shared slab and registers its own mapping the same way.

Single-threaded; called at start and close only, never on the hot path.
"""

from __future__ import annotations

import ctypes
import enum
import mmap
import os
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from tierstore.errors import ConfigError, RejectedError

GiB = 1 << 30
MAX_CHUNK_BYTES = 64 * GiB

# cudaHostRegisterPortable: the pinning counts for every CUDA context of the process.
CUDA_HOST_REGISTER_PORTABLE = 0x01


class RegistrationFailed(Exception):
    """Raised by a registrar when one register call fails (message: the driver's words)."""


class Registrar(Protocol):
    """Registers host memory with a device runtime. Contract:

    - ``register(ptr, size)`` pins ``[ptr, ptr+size)`` or raises :class:`RegistrationFailed`
      (and then nothing of that call stays registered);
    - ``unregister(ptr)`` undoes one successful ``register`` whose range starts at ``ptr``;
    - ``clear_error()`` resets the runtime's last-error state after a failure.
    """

    pinned: bool   # False for a registrar that does nothing (no CUDA)

    def register(self, ptr: int, size: int) -> None: ...

    def unregister(self, ptr: int) -> None: ...

    def clear_error(self) -> None: ...


class NoopRegistrar:
    """No CUDA: nothing to pin; the tier runs unpinned."""

    pinned = False

    def register(self, ptr: int, size: int) -> None:
        pass

    def unregister(self, ptr: int) -> None:
        pass

    def clear_error(self) -> None:
        pass


def _libcudart():
    """The libcudart this process already loaded (same last-error state as torch), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "libcudart" in ln}
    except OSError:
        paths = set()
    for p in sorted(paths):
        try:
            return ctypes.CDLL(p)
        except OSError:
            continue
    return None


class CudaRegistrar:
    """``cudaHostRegister`` through ``torch.cuda.cudart()``."""

    pinned = True

    def __init__(self, flags: int = CUDA_HOST_REGISTER_PORTABLE) -> None:
        import torch

        self._torch = torch
        self._rt = torch.cuda.cudart()
        self.flags = flags

    @staticmethod
    def _code(rc) -> int:
        return int(getattr(rc, "value", rc))

    def register(self, ptr: int, size: int) -> None:
        raw = self._rt.cudaHostRegister(ptr, size, self.flags)
        rc = self._code(raw)
        if rc != 0:
            try:
                text = self._rt.cudaGetErrorString(raw)
            except (TypeError, RuntimeError):
                text = "see cudaError_t"
            raise RegistrationFailed(f"cudaHostRegister({size} B) returned error {rc}: {text}")

    def unregister(self, ptr: int) -> None:
        self._rt.cudaHostUnregister(ptr)

    def clear_error(self) -> None:
        fn = getattr(self._rt, "cudaGetLastError", None)
        if fn is not None:
            fn()
            return
        lib = _libcudart()
        if lib is not None:
            lib.cudaGetLastError()


def default_registrar() -> Registrar:
    """CudaRegistrar when CUDA is usable, else NoopRegistrar."""
    try:
        import torch

        if torch.cuda.is_available():
            return CudaRegistrar()
    except ImportError:
        pass
    return NoopRegistrar()


def plan_chunks(size: int, slot_bytes: int, max_chunk_bytes: int = MAX_CHUNK_BYTES
                ) -> list[tuple[int, int]]:
    """(offset, length) chunks covering ``[0, size)``, each <= ``max_chunk_bytes`` and a whole
    number of slots (except a trailing partial slot, which stays in the last chunk)."""
    if slot_bytes <= 0 or size < 0:
        raise ConfigError("slot_bytes must be positive and size non-negative")
    per = max_chunk_bytes // slot_bytes * slot_bytes
    if per <= 0:
        raise ConfigError(f"chunk cap {max_chunk_bytes} B is smaller than one slot ({slot_bytes} B)")
    return [(off, min(per, size - off)) for off in range(0, size, per)]


@dataclass
class PinResult:
    """What :meth:`HostPinning.pin` did. ``pinned`` False means nothing is registered."""

    pinned: bool
    size_bytes: int
    chunks: list[tuple[int, int]] = field(default_factory=list)   # (ptr, length) registered
    failed_chunk: int | None = None
    error: str | None = None


class HostPinning:
    """Registers one host region in slot-aligned chunks, all or nothing; unpins on close."""

    def __init__(self, registrar: Registrar | None = None, *,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.registrar = registrar if registrar is not None else default_registrar()
        self.max_chunk_bytes = max_chunk_bytes
        self.result: PinResult | None = None

    def pin(self, ptr: int, size: int, slot_bytes: int) -> PinResult:
        if self.result is not None and self.result.pinned:
            raise ConfigError("region already pinned; unpin first")
        reg = self.registrar
        if not getattr(reg, "pinned", True):
            self.result = PinResult(False, size, error="no CUDA: running unpinned")
            return self.result
        done: list[tuple[int, int]] = []
        for k, (off, n) in enumerate(plan_chunks(size, slot_bytes, self.max_chunk_bytes)):
            try:
                reg.register(ptr + off, n)
            except RegistrationFailed as e:
                for p, _ in reversed(done):
                    reg.unregister(p)
                reg.clear_error()
                self.result = PinResult(False, size, [], k, f"chunk {k} (offset {off}, {n} B): {e}")
                return self.result
            done.append((ptr + off, n))
        self.result = PinResult(True, size, done)
        return self.result

    def unpin(self) -> None:
        """Unregister every chunk once; idempotent."""
        if self.result is None or not self.result.pinned:
            return
        for p, _ in reversed(self.result.chunks):
            self.registrar.unregister(p)
        self.result = PinResult(False, self.result.size_bytes)


class PinPolicy(enum.Enum):
    PREFER = "prefer"     # pin where every rank can; otherwise every rank runs unpinned
    REQUIRE = "require"   # pin on every rank, or every rank refuses to start


class PinDecision(enum.Enum):
    PINNED = "pinned"
    UNPINNED = "unpinned"
    REFUSE = "refuse"


def decide_across_ranks(rank_pinned: Sequence[bool | PinResult],
                        policy: PinPolicy = PinPolicy.PREFER) -> PinDecision:
    """One decision from every TP rank's outcome (gathered by the caller, e.g. all_gather_object).

    Pure: the same inputs give the same answer on every rank."""
    ok = [r.pinned if isinstance(r, PinResult) else bool(r) for r in rank_pinned]
    if ok and all(ok):
        return PinDecision.PINNED
    return PinDecision.REFUSE if policy is PinPolicy.REQUIRE else PinDecision.UNPINNED


def apply_decision(pinning: HostPinning, decision: PinDecision) -> None:
    """Make this rank follow the common decision: unpin unless PINNED; raise on REFUSE."""
    if decision is PinDecision.PINNED:
        if pinning.result is None or not pinning.result.pinned:
            raise ConfigError("decision PINNED but this rank is not pinned")
        return
    pinning.unpin()
    if decision is PinDecision.REFUSE:
        raise RejectedError("pinned DRAM is required but not every rank could pin its slab")


def buffer_address(buf) -> int:
    """Address of a writable buffer (memoryview, mmap, bytearray)."""
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c


def pin_buffer(pinning: HostPinning, buf: memoryview, size: int, slot_bytes: int) -> PinResult:
    """Pin the first ``size`` bytes of a writable buffer (e.g. ``DramTier.buffer``)."""
    if size > len(buf):
        raise ConfigError(f"cannot pin {size} B of a {len(buf)} B buffer")
    return pinning.pin(buffer_address(buf), size, slot_bytes)


class SharedSlab:
    """A client's mapping of the daemon's shared DRAM slab, pinned for its own CUDA context.

    ``tensor`` is ``[num_slots, slot_bytes]`` uint8 over the mapping (for a CopyEngine).
    Close it (drop every engine using ``tensor`` first) to unpin and unmap.
    """

    def __init__(self, shm_name: str, num_slots: int, slot_bytes: int, *,
                 registrar: Registrar | None = None, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        from tierstore.io.copy import slab_tensor

        size = num_slots * slot_bytes
        path = "/dev/shm/" + shm_name.lstrip("/")
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < size:
                raise ConfigError(f"shared slab {path} is smaller than {size} B")
            self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._buf = memoryview(self._mm)
        self.pinning = HostPinning(registrar, max_chunk_bytes=max_chunk_bytes)
        self.pin_result = pin_buffer(self.pinning, self._buf, size, slot_bytes)
        self.tensor = slab_tensor(self._buf, num_slots, slot_bytes)

    @property
    def pinned(self) -> bool:
        return self.pin_result.pinned

    def close(self) -> None:
        if self._buf is None:
            return
        self.pinning.unpin()
        self.tensor = None
        self._buf.release()
        self._buf = None
        self._mm.close()


def map_shared_slab(shm_name: str, num_slots: int, slot_bytes: int, *,
                    registrar: Registrar | None = None,
                    max_chunk_bytes: int = MAX_CHUNK_BYTES) -> SharedSlab:
    """Client side of daemon mode: map ``/dev/shm/<shm_name>`` and pin this process's mapping."""
    return SharedSlab(shm_name, num_slots, slot_bytes, registrar=registrar,
                      max_chunk_bytes=max_chunk_bytes)
