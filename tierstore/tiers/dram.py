"""The DRAM tier: one slab, allocated and pre-faulted once at start, fixed slots, a free list.

Layout: slot ``i`` occupies bytes ``[i * slot_bytes, (i + 1) * slot_bytes)`` of one mapping.
``slot_bytes`` is rounded up to 4096 so every slot is page aligned (O_DIRECT writes straight from
the slab). The mapping is anonymous (in-process store) or a POSIX shared-memory object
(``shm_name``, daemon mode: clients map the same pages and copy blocks in place; its memory is
reserved at start with ``posix_fallocate``, so a /dev/shm too small for it refuses the start
with a message instead of a client's SIGBUS later). Pre-faulting
touches every page at start: first touch costs ~8x a copy (MACHINE.md §4a), so it never happens
on the hot path. No allocation per put or get.

CUDA host registration (pinning) of the slab happens in tiers/pinning.py when CUDA exists.

Single-threaded accounting; byte copies into views may run on any thread that holds a pin.
"""

from __future__ import annotations

import errno
import mmap
import os

from tierstore.tiers.slot_tier import MemoryTier
from tierstore.types import Tier

PAGE = 4096
SHM_DIR = "/dev/shm"


def _reserve_shm(fd: int, size: int, path: str) -> None:
    """Give the shared-memory object ``size`` bytes of real memory now. ``ftruncate`` alone
    makes a sparse object: on a /dev/shm smaller than the slab the daemon started and the first
    client to touch an unbacked page died of SIGBUS (issue 13 item 17). ``posix_fallocate``
    reserves every page or fails (tmpfs undoes a partial reservation); a full /dev/shm becomes a
    ConfigError that names it."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT):
            raise
        from tierstore.errors import ConfigError
        from tierstore.units import format_bytes
        try:
            st = os.statvfs(os.path.dirname(path))
            room = (f"{format_bytes(st.f_bavail * st.f_frsize)} free of "
                    f"{format_bytes(st.f_blocks * st.f_frsize)}")
        except OSError:
            room = "size unknown"
        raise ConfigError(
            f"the DRAM slab needs {format_bytes(size)} of shared memory in "
            f"{os.path.dirname(path)}, which has {room} ({e.strerror}): enlarge "
            f"{os.path.dirname(path)} (a container's --shm-size, or mount -o remount,size=...) "
            "or lower [dram] capacity") from None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def round_up(n: int, align: int = PAGE) -> int:
    return (n + align - 1) // align * align


class DramTier(MemoryTier):
    """Slab of ``num_slots`` slots of ``slot_bytes`` (rounded up to 4096) bytes."""

    def __init__(self, num_slots: int, slot_bytes: int, *, shm_name: str | None = None,
                 prefault: bool = True) -> None:
        slot_bytes = round_up(slot_bytes)
        super().__init__(Tier.DRAM, num_slots, slot_bytes)
        self.shm_name = shm_name
        size = max(num_slots * slot_bytes, PAGE)
        self.size_bytes = size
        if shm_name:
            path = SHM_DIR + "/" + shm_name.lstrip("/")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _reserve_shm(fd, size, path)
                self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | self._populate(prefault))
            except BaseException:
                _unlink_quietly(path)   # a refused start leaves nothing in /dev/shm (item 18)
                raise
            finally:
                os.close(fd)
        else:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | self._populate(prefault)
            self._mm = mmap.mmap(-1, size, flags=flags)
        self._buf = memoryview(self._mm)
        if prefault and not self._populate(True):
            self._prefault()
        self._views = [self._buf[i * slot_bytes:(i + 1) * slot_bytes] for i in range(num_slots)]

    @staticmethod
    def _populate(prefault: bool) -> int:
        # MAP_POPULATE faults every page in at mmap time (kernel-side, ~1.3 GiB/s here).
        return getattr(mmap, "MAP_POPULATE", 0) if prefault else 0

    def _prefault(self) -> None:
        # Fallback where MAP_POPULATE is missing: touch one byte per page.
        zero = bytes(PAGE)
        for off in range(0, self.size_bytes, PAGE):
            self._buf[off:off + 1] = zero[:1]

    @property
    def buffer(self) -> memoryview:
        """The whole slab (for registration with CUDA or RDMA)."""
        return self._buf

    def view(self, slot: int) -> memoryview:
        """Writable view of one slot. Raises IndexError for a slot outside [0, num_slots): a
        negative index must never reach another slot's bytes."""
        if slot < 0:
            raise IndexError(f"dram slot {slot} out of range")
        return self._views[slot]

    def close(self) -> None:
        """Give the slab up: the shared-memory name is unlinked, and the mapping goes when the
        last view of it does. It is never unmapped under a live view: a caller's
        ``torch.frombuffer(buffer)`` tensor holds a reference to the buffer object but no buffer
        export, so an explicit ``munmap`` here would turn its next access into SIGSEGV (issue 13
        item 15)."""
        if self._buf is None:
            return
        self._views = []
        self._buf = None
        self._mm = None
        if self.shm_name:
            _unlink_quietly(SHM_DIR + "/" + self.shm_name.lstrip("/"))
