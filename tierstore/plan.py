"""Load planning: which blocks of a prefix hit the engine should load (case BLK-05).

Rules, in tokens with ``block_size`` = tokens per block:

- only full blocks are loaded; a partial tail never comes from the prefix index;
- at least one prompt token is always left for the engine to compute (it needs the logits of the
  last prompt token), so a hit covering the whole prompt is cut back by one block;
- blocks the engine already holds (``num_computed_tokens``, from its own prefix cache) are never
  written: the plan starts at the first block past them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoadPlan:
    """Blocks ``[first_block, end_block)`` of the request's chain are to be loaded."""

    first_block: int
    end_block: int
    block_size: int

    @property
    def num_blocks(self) -> int:
        return max(0, self.end_block - self.first_block)

    @property
    def num_tokens(self) -> int:
        """External tokens the engine gains (what vLLM's get_num_new_matched_tokens returns)."""
        return self.num_blocks * self.block_size

    @property
    def token_range(self) -> tuple[int, int]:
        return self.first_block * self.block_size, max(self.first_block, self.end_block) * self.block_size


def plan_load(num_prompt_tokens: int, hit_blocks: int, num_computed_tokens: int,
              block_size: int) -> LoadPlan:
    """Plan a load of a prefix hit of ``hit_blocks`` full blocks.

    ``num_computed_tokens`` must be a multiple of ``block_size`` (the engine's own prefix hits are
    whole blocks); raises ValueError otherwise or for negative inputs.
    """
    if min(num_prompt_tokens, hit_blocks, num_computed_tokens) < 0 or block_size <= 0:
        raise ValueError("negative token or block counts")
    if num_computed_tokens % block_size:
        raise ValueError("num_computed_tokens must be a whole number of blocks")
    max_blocks = max(0, (num_prompt_tokens - 1) // block_size)   # leave >= 1 token to compute
    end = min(hit_blocks, max_blocks)
    first = num_computed_tokens // block_size
    return LoadPlan(first, max(first, end), block_size)
