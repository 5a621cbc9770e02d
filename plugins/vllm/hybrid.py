"""Hybrid KV caches: what a model with several KV-cache groups stores and what counts as a hit
(issue 15 item 4, case HYB-33). Pure functions over block indices; no store, no vLLM.

vLLM's hybrid KV cache manager (HMA) splits the layers of a model such as gpt-oss or Gemma 2/3
into KV-cache groups, each with its own block table: full-attention groups keep the KV
of every token; a sliding-window group needs, to compute the token at position ``p``, only the
KV of ``[p - W + 1, p)`` (``W`` its window), and vLLM puts its null block in place of every
block that lies wholly before that (``get_num_skipped_tokens``). The connector stores each
group's block as its own object, under a namespace that names the group (``kv_group``), chained
over the same token blocks; a *lane* is one (group, rank) pair.

Resume points and the sliding-window save rule
----------------------------------------------
A request that resumes at block boundary ``k`` (tokens ``[0, k * B)`` come from the store)
needs every full-attention block ``[first, k)`` and, of each sliding-window group, only the
``wb = ceil((W - 1 + extra_retained_tokens) / B)`` blocks ``[k - wb, k)``: exactly the blocks
vLLM allocates for it (the others are its null block). Holding the window before *every*
boundary means holding every block, so a sliding-window group stores the windows before a
fixed set of **resume points** only:

- every multiple of ``every`` blocks up to the prompt's full blocks (setting
  ``swa_resume_every_tokens``; auto: 4 windows, so the group stores about a quarter of its
  blocks: a shared prefix (a system prompt) or the next turn of a conversation resumes at the
  last multiple it covers), and
- the prompt's last loadable boundary ``end`` (``min(full blocks, (prompt - 1) // B)``: the
  same prompt again resumes there).

``every = 1`` block stores every block (any boundary resumes, no saving). A hit is the largest
resume point ``k`` with ``first < k <= end`` such that every full-attention lane holds
``[first, k)`` and every sliding-window lane holds ``[max(first, k - wb), k)``: the minimum of
the coverage the groups give, never a point some group cannot resume from (case HYB-33 (a)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def resume_every_blocks(window_blocks: Sequence[int], block_size: int,
                        every_tokens: int | None) -> int:
    """Blocks between two resume points: ``every_tokens // block_size`` (a multiple of the block
    size, else ValueError), or, when None, 4 x the largest window (1 without a window group)."""
    if every_tokens is not None:
        if every_tokens <= 0 or every_tokens % block_size:
            raise ValueError(f"swa_resume_every_tokens={every_tokens} is not a positive multiple "
                             f"of the block size {block_size}")
        return every_tokens // block_size
    wb = max(window_blocks, default=0)
    return 4 * wb if wb else 1


def resume_points(first: int, end: int, every: int) -> list[int]:
    """Resume points ``k`` with ``first < k <= end``, largest first: multiples of ``every``
    and ``end`` itself."""
    if end <= first:
        return []
    pts = set(range(every * (first // every + 1), end + 1, every))
    pts.add(end)
    return sorted(pts, reverse=True)


def swa_save_positions(lo: int, hi: int, end: int, n_full: int, every: int,
                       window_blocks: int) -> list[int]:
    """Block indices in ``[lo, hi)`` a sliding-window group of ``window_blocks`` stores for a
    prompt of ``n_full`` full blocks whose last loadable boundary is ``end``: those inside the
    window before ``end`` or before a multiple of ``every`` up to ``n_full`` (a longer prompt
    that extends this one resumes there), ascending."""
    if window_blocks <= 0:
        return list(range(lo, hi))
    keep = set()
    for k in set(resume_points(0, n_full, every)) - {n_full} | {end} | (
            {n_full} if n_full % every == 0 else set()):
        keep.update(range(max(lo, k - window_blocks), min(hi, k)))
    return sorted(keep)


@dataclass(frozen=True)
class Chain:
    """One chain of a hybrid lookup: ``lane``'s keys of blocks ``[lo, hi)``; ``k`` is the
    resume point it checks (a sliding-window lane's window), None for a full-attention lane."""

    lane: int
    lo: int
    hi: int
    k: int | None


def lookup_chains(lane_windows: Sequence[int], first: int, end: int,
                  every: int) -> list[Chain]:
    """The chains of one hybrid lookup (one ``prepare_loads`` call): per full-attention lane
    (window 0) ``[first, end)``; per sliding-window lane and resume point ``k`` its window
    ``[max(first, k - wb), k)``."""
    out = [Chain(lane, first, end, None) for lane, wb in enumerate(lane_windows) if wb == 0]
    swa = [(lane, wb) for lane, wb in enumerate(lane_windows) if wb > 0]
    if swa:
        for k in resume_points(first, end, every):
            out.extend(Chain(lane, max(first, k - wb), k, k) for lane, wb in swa)
    return out


def pick_hit(chains: Sequence[Chain], held: Sequence[int], first: int) -> tuple[int, list[int]]:
    """``(k, chosen)``: the resume point of the hit (``first`` when none) and, per lane in lane
    order, the index into ``chains`` of the chain the load uses. ``held[i]`` is how many blocks
    of ``chains[i]`` the store holds from its start (prepare_loads' ``expected``)."""
    full = [i for i, c in enumerate(chains) if c.k is None]
    full_end = min((first + held[i] for i in full), default=None)
    by_k: dict[int, list[int]] = {}
    for i, c in enumerate(chains):
        if c.k is not None:
            by_k.setdefault(c.k, []).append(i)
    if not by_k:   # no sliding-window lane: the contiguous minimum
        if full_end is None or full_end <= first:
            return first, []
        return full_end, full
    for k in sorted(by_k, reverse=True):
        if full_end is not None and k > full_end:
            continue
        idx = by_k[k]
        if all(held[i] >= chains[i].hi - chains[i].lo for i in idx):
            chosen = sorted(full + idx, key=lambda i: chains[i].lane)
            return k, chosen
    return first, []
