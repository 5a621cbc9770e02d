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
    write_through: bool = False   # True: every stored block also goes to NVMe (survives restart)
    direct_io: str = "auto"
    compression: str = "none"
    file_slots: int = 64          # slots per slab file

    def __post_init__(self) -> None:
        if self.capacity_blocks < 0:
            raise ConfigError("nvme capacity must not be negative")
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
    ``exclusive``: a block lives in one tier; DRAM victims demote to NVMe, NVMe hits promote.
    """

    slot_bytes: int
    dram: DramConfig = field(default_factory=DramConfig)
    nvme: NvmeConfig | None = None
    exclusive: bool = True
    hbm: HbmConfig | None = None

    def __post_init__(self) -> None:
        if self.slot_bytes <= 0:
            raise ConfigError(f"slot_bytes must be positive, got {self.slot_bytes}")
