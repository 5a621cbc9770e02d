"""The hbm tier: a slab of fixed-size slots in ONE torch uint8 tensor on ``cuda:N``.

Layout: ``slab[num_slots, slot_bytes]``; slot ``i`` is row ``i`` and holds one block in the byte
format of :mod:`tierstore.io.copy` (``slot_bytes`` >= the block's bytes). The slab is allocated
once in the constructor and never resized. Without a GPU the slab lives on the CPU device, so the
tier's logic (and the store's use of it) runs in CI unchanged.

Demotion and promotion against the DRAM tier go through one :class:`~tierstore.io.copy.CopyEngine`
(built by :meth:`HbmTier.attach_dram`, also at start): ``copy_to_dram(hbm_slots, dram_slots)`` and
``copy_from_dram(dram_slots, hbm_slots)`` return a job id; ``poll(job_id)`` says when the bytes are
in place. The store keeps the invariants around them::

    victims = policy.victims(hbm)                          # store, under its lock
    job = hbm.copy_to_dram(victim_slots, new_dram_slots)   # one gather + one copy per run
    ... poll(job) -> True: index moves victims hbm -> dram, hbm.free(victim_slots)

Single-threaded accounting (the store calls it under its lock).
"""

from __future__ import annotations

from typing import Sequence

import torch

from tierstore.errors import ConfigError
from tierstore.io.copy import CopyEngine, PagedKV, slab_tensor
from tierstore.tiers.slot_tier import MemoryTier, SlotTier
from tierstore.types import Tier


def default_device() -> torch.device:
    """``cuda:<current>`` when CUDA is available, else the CPU device."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class HbmTier(SlotTier):
    """``num_slots`` slots of ``slot_bytes`` bytes in one device tensor."""

    holds_bytes = True
    host_pinning = None   # a tiers.pinning.HostPinning of the DRAM slab (Store.open, CUDA only)

    def __init__(self, num_slots: int, slot_bytes: int, *, device: str | torch.device | None = None
                 ) -> None:
        if num_slots <= 0 or slot_bytes <= 0:
            raise ConfigError("hbm tier needs positive num_slots and slot_bytes")
        super().__init__(Tier.HBM, num_slots, slot_bytes)
        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.slab: torch.Tensor | None = torch.empty(
            (num_slots, slot_bytes), dtype=torch.uint8, device=self.device)
        self._rows = list(self.slab.unbind(0))    # views made once; tensor(slot) allocates nothing
        self._engine: CopyEngine | None = None

    # ---------------------------------------------------------------- bytes
    def tensor(self, slot: int) -> torch.Tensor:
        """The slot's ``[slot_bytes]`` uint8 view on the tier's device."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"hbm slot {slot} out of range")
        return self._rows[slot]

    def view(self, slot: int) -> memoryview:
        """Host ``memoryview`` of the slot: only on the CPU device (no GPU), for tests and replay."""
        if self.device.type != "cpu":
            raise RuntimeError("hbm slots on a GPU have no host memoryview; use tensor(slot)")
        return memoryview(self.tensor(slot).numpy())

    # ---------------------------------------------------------------- hbm <-> dram
    def attach_dram(self, dram: "MemoryTier | torch.Tensor", *, chunk_blocks: int = 64,
                    max_job_blocks: int | None = None, max_inflight: int = 8) -> CopyEngine:
        """Build the copy engine to a DRAM slab (a DramTier or a ``[slots, bytes]`` tensor).

        Call once at start, after the DRAM slab is pinned (tiers/pinning.py)."""
        if self._engine is not None:
            raise ConfigError("hbm tier already attached to a DRAM slab")
        if isinstance(dram, torch.Tensor):
            slab = dram
        else:
            slab = slab_tensor(dram.buffer, dram.num_slots, dram.slot_bytes)
        self._engine = CopyEngine(PagedKV.from_slab(self.slab), slab, chunk_blocks=chunk_blocks,
                                  max_job_blocks=max_job_blocks or self.num_slots,
                                  max_inflight=max_inflight)
        return self._engine

    @property
    def engine(self) -> CopyEngine:
        if self._engine is None:
            raise ConfigError("hbm tier has no DRAM slab attached (call attach_dram at start)")
        return self._engine

    def copy_to_dram(self, hbm_slots: Sequence[int], dram_slots: Sequence[int]) -> int:
        """Demote: hbm slots -> dram slots (pairwise); returns a copy job id for :meth:`poll`."""
        return self.engine.submit_offload(hbm_slots, dram_slots)

    def copy_from_dram(self, dram_slots: Sequence[int], hbm_slots: Sequence[int]) -> int:
        """Promote: dram slots -> hbm slots (pairwise); returns a copy job id for :meth:`poll`."""
        return self.engine.submit_onload(dram_slots, hbm_slots)

    def poll(self, job_id: int) -> bool:
        return self.engine.poll(job_id)

    def wait(self, job_id: int) -> None:
        self.engine.wait(job_id)

    def usage(self) -> dict:
        out = super().usage()
        out["device"] = str(self.device)
        return out

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self._rows = []
        self.slab = None
