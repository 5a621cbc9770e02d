"""Configuration: frozen dataclasses per layer, units in names, validated on construction.

Capacities here are in blocks (slots); people give tokens, bytes or blocks and
:mod:`tierstore.units` converts. ``slot_bytes`` is the largest block payload the store accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierstore.errors import ConfigError
from tierstore.policy import DEFAULT_EVICTION

DIRECT_IO_MODES = ("auto", "on", "off")
COMPRESSION = ("none", "zstd")


@dataclass(frozen=True)
class DramConfig:
    capacity_blocks: int = 1024
    policy: str = DEFAULT_EVICTION   # evidence in docs/policies.md
    shm_name: str | None = None  # POSIX shared-memory name in daemon mode
    payload: bool = True          # False: slot accounting only (trace replay --payload none)

    def __post_init__(self) -> None:
        if self.capacity_blocks < 0:
            raise ConfigError("dram capacity must not be negative")


@dataclass(frozen=True)
class NvmeConfig:
    path: str
    capacity_blocks: int = 4096
    policy: str = DEFAULT_EVICTION
    admission: str = "all"
    write_through: bool = True    # every stored DRAM block gets an NVMe copy (write-behind)
    direct_io: str = "auto"
    compression: str = "none"
    file_slots: int = 64          # slots per slab file
    write_queue_bytes: int = 1 << 30   # write-behind: bytes in DRAM awaiting NVMe, at most (and
                                       # at most half the DRAM tier); over it stores are SKIPPED
                                       # (writebehind.py)

    def __post_init__(self) -> None:
        if self.capacity_blocks < 0:
            raise ConfigError("nvme capacity must not be negative")
        if not self.write_through:
            raise ConfigError(
                "nvme write_through = false is no longer supported: NVMe keeps a clean copy of "
                "every DRAM block, written behind the caller (exclusive tiers rewrote a block at "
                "every demotion; measured in docs/benchmarks.md). Remove the key, or set it true")
        if self.write_queue_bytes <= 0:
            raise ConfigError("nvme write_queue_bytes must be positive")
        if self.direct_io not in DIRECT_IO_MODES:
            raise ConfigError(f"direct_io must be one of {DIRECT_IO_MODES}, got {self.direct_io!r}")
        if self.compression not in COMPRESSION:
            raise ConfigError(f"compression must be one of {COMPRESSION}, got {self.compression!r}")


@dataclass(frozen=True)
class HbmConfig:
    """A slab of slots in GPU memory (tiers/hbm.py); on the CPU device when there is no GPU."""

    capacity_blocks: int = 0
    device: str | None = None     # None: cuda:<current> when CUDA is available, else "cpu"
    policy: str = DEFAULT_EVICTION

    def __post_init__(self) -> None:
        if self.capacity_blocks < 0:
            raise ConfigError("hbm capacity must not be negative")


@dataclass(frozen=True)
class StoreConfig:
    """Everything a :class:`tierstore.store.Store` needs.

    ``slot_bytes``: fixed slot size of every tier (the largest block payload), bytes.
    ``exclusive``: between HBM and DRAM a block lives in one tier (HBM victims demote to DRAM,
    a load into HBM moves it up). NVMe always holds a clean copy of DRAM blocks (write-behind).
    """

    slot_bytes: int
    dram: DramConfig = field(default_factory=DramConfig)
    nvme: NvmeConfig | None = None
    exclusive: bool = True
    hbm: HbmConfig | None = None

    def __post_init__(self) -> None:
        if self.slot_bytes <= 0:
            raise ConfigError(f"slot_bytes must be positive, got {self.slot_bytes}")
