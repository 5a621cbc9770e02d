"""Prefix-aware Least Hit Density (``prefix-lhd``), after LHD (Beckmann et al., NSDI 2018).

Every resident block belongs to a *class* and has an *age* (block references since its last
touch). Online, per class and coarsened age, the policy counts how many blocks were hit at that
age and how many were evicted at it, and from those counts derives the *hit density* of a block
of that class and age: expected future hits divided by the expected cache space-time it will
still occupy (LHD's ``P(hit) / E[remaining lifetime]``)::

    density(c, a) = sum_{x>=a} hits[c][x] / sum_{x>=a} (x - a + 1) * (hits[c][x] + evictions[c][x])

The victim is the *leaf* of the prefix tree with the lowest density (ties: least recently
touched). Leaves only, because a lookup hits leading blocks only, so a parent is worth at least
as much as any child; orphans (parent not resident: they cannot be hit) go before everything.

Classes (14): reference count bucket (1, 2, 3, 4-5, 6-8, 9-15, 16+; counts survive a short
absence through a ghost table) x "was the last block of the request that last touched it". The
second bit is learned, not assumed: on the Mooncake trace the last block of a request is a
partial block and is almost never reused, and the statistics discover that by themselves.
The tail of a request is detected from the call order the store guarantees (a request's blocks
are accessed/inserted in chain order): when the next block's parent is not the previous block,
the previous block ended its request.

Density with a prior: each class's histograms are smoothed toward the pooled histogram of all
classes (empirical Bayes shrinkage): ``H'_c = H_c + PRIOR_EVENTS * H_all / N_all`` (and the same for
evictions), so a class with little evidence behaves like the average block of its age instead of
sitting at density 0, and a class only departs from the average once it has evidence.

Constants and why (none is fitted to a trace; docs/policies.md shows how results move with each):

- ``BUCKETS_PER_CAP = 1``: ages are counted in whole cache *turnovers* (``capacity`` block
  references): "how many times could the cache have replaced its contents since this block was
  last touched". Finer ages let LHD's feedback loop feed on itself (a class evicted young never
  shows hits at older ages, so its density there stays low: measured, finer buckets lose 0.01-0.03
  at 3M); coarser ones lose the ability to age out stale frequent blocks (10M drops by 0.02 at
  4 turnovers per bucket). One turnover is the natural unit between those two failure modes.
- ``HORIZON_CAPS = 64``: ages up to 64 turnovers are distinguished; older blocks share the last
  bucket (LHD's saturating age). Far beyond any reuse a cache of that size can act on.
- ``PRIOR_EVENTS = 1000``: the prior is worth 1000 observed lifetimes (hits + evictions). A hit
  rate estimated from n events has a relative standard error of about 1/sqrt(n); at n = 1000 that
  is ~3%, the point where a class's own histogram starts to outweigh the pooled one.
- Reconfiguration every ``max(4096, capacity)`` references with ``DECAY = 0.9``: statistics are
  rebuilt once per cache turnover (LHD reconfigures periodically) and old counts fade with a
  memory of about ten turnovers; 4096 keeps tiny caches from reconfiguring on noise.
- ``WARMUP``: until the statistics include one cache's worth of evictions, every density is 0,
  i.e. the policy is LRU among leaves: before the cache has turned over once the eviction ages
  are not observed yet and LHD's estimates are meaningless.
- ``GHOST_FACTOR = 4``: reference counts of the last ``4 x capacity`` evicted blocks are kept, so
  a block that returns after a few turnovers keeps its frequency class.

Cost: dictionaries for the tree and per-key state; a heap of leaf entries scored at push time,
rebuilt (O(leaves)) whenever the age bucket advances or the densities are recomputed, so every
operation is O(log n) amortized. ``victim`` may rebuild or drop dead heap entries (internal
cleanup, a function of the state only); it never changes residency, classes or ages. Only when
every leaf is unevictable does it fall back to a linear scan. Single-threaded.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Callable, Optional

from tierstore.policy.interface import EvictionPolicy, Key

REF_CLASSES = 7


def _ref_class(refs: int) -> int:
    """Log-ish buckets of the reference count: P(reuse) rises steeply over the first few."""
    if refs <= 3:
        return refs - 1
    if refs <= 5:
        return 3
    if refs <= 8:
        return 4
    if refs <= 15:
        return 5
    return 6


class PrefixLHD(EvictionPolicy):
    """Least hit density among leaves of the prefix tree; orphans first."""

    name = "prefix-lhd"

    BUCKETS_PER_CAP = 1
    HORIZON_CAPS = 64
    PRIOR_EVENTS = 1000.0
    DECAY = 0.9
    MIN_RECONF = 4096
    GHOST_FACTOR = 4
    WARMUP = True

    def __init__(self, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        cap = max(1, capacity_blocks)
        self._width = max(1, int(cap / self.BUCKETS_PER_CAP))
        self._nb = max(1, int(self.BUCKETS_PER_CAP * self.HORIZON_CAPS))
        self._ncls = REF_CLASSES * 2
        self._hits = [[0.0] * self._nb for _ in range(self._ncls)]
        self._evs = [[0.0] * self._nb for _ in range(self._ncls)]
        self._dens = [[0.0] * self._nb for _ in range(self._ncls)]
        self._dens_ver = 0
        self._parent: dict = {}
        self._kids: dict = {}
        self._last: dict = {}  # tick of the last touch
        self._refs: dict = {}
        self._tail: dict = {}  # True: the last block of the request that last touched it
        self._leaves: dict = {}  # non-orphan leaves (ordered set)
        self._orphans: dict = {}  # resident blocks whose parent is not resident (ordered set)
        self._orphans_of: dict = {}  # absent parent -> its resident orphans (ordered set)
        self._ghost: OrderedDict = OrderedDict()  # key -> reference count when evicted
        self._tick = 0
        self._nev = 0  # evictions observed (undecayed), for the warm-up
        self._prev = None
        self._reconf_every = max(self.MIN_RECONF, cap)
        self._next_reconf = self._reconf_every
        self._heap: list = []  # (density, last touch, class, key), lazily invalidated
        self._hcls: dict = {}  # key -> class of its newest heap entry
        self._heap_epoch = -1
        self._heap_ver = -1

    # -- statistics -------------------------------------------------------------------------------
    def _cls(self, key: Key) -> int:
        c = _ref_class(self._refs[key])
        return c + REF_CLASSES if self._tail[key] else c

    def _bucket(self, key: Key) -> int:
        b = (self._tick - self._last[key]) // self._width
        return b if b < self._nb else self._nb - 1

    def _observe(self, key: Key, parent: Optional[Key]) -> None:
        prev = self._prev
        if prev is not None and prev != parent and prev in self._tail and not self._tail[prev]:
            self._tail[prev] = True  # the next block does not continue prev's chain: prev ended it
            if prev in self._leaves:
                self._push_leaf(prev)
        self._prev = key
        self._tick += 1
        if self._tick >= self._next_reconf:
            self._reconfigure()

    def _reconfigure(self) -> None:
        self._next_reconf = self._tick + self._reconf_every
        self._dens_ver += 1
        warm = self.WARMUP and self._nev < self.capacity_blocks
        decay = self.DECAY
        nb = self._nb
        PH = [sum(self._hits[c][b] for c in range(self._ncls)) for b in range(nb)]
        PE = [sum(self._evs[c][b] for c in range(self._ncls)) for b in range(nb)]
        tot = sum(PH) + sum(PE)
        f = self.PRIOR_EVENTS / tot if tot > 0 else 0.0  # prior: PRIOR_EVENTS pooled events
        for c in range(self._ncls):
            H0, E0, d = self._hits[c], self._evs[c], self._dens[c]
            H = [H0[b] + f * PH[b] for b in range(nb)]
            E = [E0[b] + f * PE[b] for b in range(nb)]
            hits_above = events_above = life_above = 0.0
            for b in range(self._nb - 1, -1, -1):
                hits_above += H[b]
                events_above += H[b] + E[b]
                life_above += events_above
                d[b] = 0.0 if warm or life_above <= 0 else hits_above / life_above
                H0[b] *= decay
                E0[b] *= decay

    # -- protocol ---------------------------------------------------------------------------------
    def insert(self, key: Key, size_bytes: int, parent: Optional[Key] = None) -> None:
        if key in self._parent:
            self.access(key)
            return
        self._observe(key, parent)
        self._parent[key] = parent
        self._kids[key] = {}  # ordered set: deterministic across hash seeds
        self._last[key] = self._tick
        self._refs[key] = self._ghost.pop(key, 0) + 1
        self._tail[key] = False
        if parent is not None and parent not in self._parent:
            self._orphans[key] = None
            self._orphans_of.setdefault(parent, {})[key] = None
        else:
            if parent is not None:
                kids = self._kids[parent]
                if not kids:
                    self._leaves.pop(parent, None)
                kids[key] = None
            self._push_leaf(key)
        self._adopt(key)

    def _adopt(self, key: Key) -> None:
        """``key`` arrived: blocks stored before it that name it as their parent are its children
        now (a child stored before its parent is never left an orphan of a resident block)."""
        waiting = self._orphans_of.pop(key, None)
        if not waiting:
            return
        kids = self._kids[key]
        for child in waiting:
            self._orphans.pop(child, None)
            kids[child] = None
        self._leaves.pop(key, None)   # not a leaf any more (its heap entry dies lazily)
        if key in self._orphans:
            return                    # still unreachable: the orphan walk finds the subtree
        stack = list(waiting)
        seen = {key}                  # parent links a caller made circular end the walk
        while stack:                  # the subtree is reachable now: its leaves are leaves
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            if self._kids[k]:
                stack.extend(self._kids[k])
            else:
                self._push_leaf(k)

    def access(self, key: Key) -> None:
        if key not in self._parent:
            return
        parent = self._parent[key]
        self._observe(key, parent)
        self._hits[self._cls(key)][self._bucket(key)] += 1
        self._refs[key] += 1
        self._tail[key] = False
        self._last[key] = self._tick
        if key in self._orphans:
            if parent is None or parent in self._parent:  # the chain is whole again
                del self._orphans[key]
                self._drop_waiting(parent, key)
                if parent is not None:
                    pk = self._kids[parent]
                    if not pk:
                        self._leaves.pop(parent, None)
                    pk[key] = None
                if not self._kids[key]:
                    self._push_leaf(key)
        elif key in self._leaves:
            self._push_leaf(key)

    def remove(self, key: Key) -> None:
        if key not in self._parent:
            return
        c = self._cls(key)
        self._evs[c][self._bucket(key)] += 1
        self._nev += 1
        parent = self._parent.pop(key)
        for kid in self._kids.pop(key):  # a parent left before its children: orphan them
            self._leaves.pop(kid, None)
            self._orphans[kid] = None
            self._orphans_of.setdefault(key, {})[kid] = None
        self._leaves.pop(key, None)
        if self._orphans.pop(key, 0) is None:
            self._drop_waiting(parent, key)
        self._hcls.pop(key, None)
        if parent is not None and parent in self._kids:
            pk = self._kids[parent]
            if key in pk:
                del pk[key]
                if not pk and parent not in self._orphans:
                    self._push_leaf(parent)
        self._ghost[key] = self._refs.pop(key)
        if len(self._ghost) > self.GHOST_FACTOR * self.capacity_blocks:
            self._ghost.popitem(last=False)
        del self._last[key], self._tail[key]

    def _drop_waiting(self, parent: Optional[Key], key: Key) -> None:
        w = self._orphans_of.get(parent)
        if w is not None:
            w.pop(key, None)
            if not w:
                del self._orphans_of[parent]

    def victim(self, evictable: Callable[[Key], bool]) -> Optional[Key]:
        kids = self._kids
        for k in self._orphans:  # unreachable blocks first, deepest first (leaves before parents)
            seen = {k}
            while kids[k]:
                nxt = next(iter(kids[k]))
                if nxt in seen:      # circular parent links (a caller's keys): stop the descent
                    break
                seen.add(nxt)
                k = nxt
            if evictable(k):
                return k
        if self._tick // self._width != self._heap_epoch or self._heap_ver != self._dens_ver:
            self._rebuild()
        heap, leaves, last, hcls = self._heap, self._leaves, self._last, self._hcls
        while heap:
            _, t, c, k = heap[0]
            if k in leaves and last[k] == t and hcls.get(k) == c:
                break
            heapq.heappop(heap)  # dead entry (internal cleanup)
        if heap and evictable(heap[0][3]):
            return heap[0][3]
        # Rare path: the best leaf is pinned or in flight.
        best = min(((self._dens[self._cls(k)][self._bucket(k)], self._last[k], k)
                    for k in leaves if evictable(k)), default=None, key=lambda e: e[:2])
        if best is not None:
            return best[2]
        inner = [(self._last[k], k) for k in self._parent if evictable(k)]
        return min(inner, key=lambda e: e[0])[1] if inner else None

    def __len__(self) -> int:
        return len(self._parent)

    def __contains__(self, key: Key) -> bool:
        return key in self._parent

    # -- heap of leaves ---------------------------------------------------------------------------
    def _score(self, k: Key) -> tuple:
        c = self._cls(k)
        self._hcls[k] = c
        return (self._dens[c][self._bucket(k)], self._last[k], c, k)

    def _rebuild(self) -> None:
        self._heap_epoch = self._tick // self._width
        self._heap_ver = self._dens_ver
        self._hcls = {}
        self._heap = [self._score(k) for k in self._leaves]
        heapq.heapify(self._heap)

    def _push_leaf(self, k: Key) -> None:
        self._leaves[k] = None
        heapq.heappush(self._heap, self._score(k))
