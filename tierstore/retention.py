"""Retention hints: session pins a request asks for, bounded per tenant (issue 15 item 5).

An agent's multi-turn context is worth keeping: a request may carry a *session id*, a *TTL* and
a *priority* (vLLM's ``kv_transfer_params``, read by plugins/vllm/scheduler_side.py), and the
store then pins the session's blocks (:meth:`tierstore.store.Store.retain`) so that cache
pressure does not evict them before the TTL ends. Pinned blocks are never evicted (the store's
invariant 2), so hints are bounded, in the spirit of case TEN-39 (multi-tenant isolation and
quotas) applied to pins:

* **Tenant.** The tenant is the request's cache salt (vLLM's ``cache_salt``; no salt: the
  default tenant, ``""``). A hint's pins belong to the owner ``retain:<tenant label>/<session>``
  (:func:`tenant_label`: ``default``, or ``t-`` + 12 hex digits of a hash of the salt, so the
  salt never shows in ``blocks show`` or the stats). Two tenants with the same session id are
  two sessions; nothing one tenant sends ever refreshes, releases or displaces another
  tenant's pins (TEN-39: "T1's overflow evicts only T1's blocks").
* **Caps, in blocks** (one block of one TP/PP rank = one store slot). A tenant's sessions hold
  at most its cap of distinct blocks (a block held by two of its sessions counts once): its
  entry in ``tenants``, else ``tenant_blocks`` (default: a tenth of the DRAM tier, at least one:
  a tenant without an entry gets a documented default, never a silent zero, TEN-39). All
  tenants together hold at most ``total_blocks`` (default: half the DRAM tier), so no number of
  tenants pins the whole cache. A cap larger than the total, or a total larger than the DRAM
  tier, is refused (ConfigError); tenant caps that add up to more than the total (TEN-39's
  10 + 10 on 15) are accepted with an explicit warning (:meth:`RetentionConfig.check`): the
  tenants then compete for the total, first come first served.
* **Never blocking, never failing.** A hint over a cap pins the blocks that fit, in the order
  given (the connector lists a prompt's blocks first to last, so a prefix is what stays), and
  refuses the rest: counters ``retention_hints_refused`` / ``retention_blocks_refused``, per
  tenant as well (:meth:`Retention.stats`). The request itself is served either way. Every
  decision costs the hint's keys plus the tenant's own sessions: no global scan.
* **TTL.** One deadline per session: every hint of a session re-pins everything the session
  holds with the new TTL (a later request of the session refreshes it) and adds its new
  blocks. TTLs above ``max_ttl_s`` are clamped to it (``retention_ttl_clamped``). A TTL of 0
  ends the session now (its pins go). After the deadline the pins expire (the PinBook's TTL)
  and the blocks are evictable again.
* **Priority** (an integer, default 0) matters only inside one tenant at its cap (or when the
  total is full): a hint whose blocks do not fit releases that tenant's own sessions of
  strictly lower priority, lowest first (then the one that would expire first), until they
  fit (``retention_sessions_displaced``); equal or lower priority never displaces anything, it
  is refused. Priority never touches another tenant's pins and never lets a pin exceed a cap.

Single-threaded: the store calls every method under its lock.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from tierstore import counter_names as cn
from tierstore.errors import ConfigError, PinError
from tierstore.index.residency import MAX_PIN_TTL_S, PinBook, Residency
from tierstore.types import BlockKey

log = logging.getLogger(__name__)

OWNER_PREFIX = "retain:"
SESSION_ID_MAX = 128
PRIORITY_MAX = 1_000_000
DEFAULT_MAX_TTL_S = 3600.0


def tenant_label(tenant: str) -> str:
    """How a tenant (a cache salt; ``""`` = none) is named in owners, stats and logs: the salt
    is a secret of sorts (it keeps tenants' prefixes apart), so never the salt itself."""
    if not tenant:
        return "default"
    return "t-" + hashlib.blake2b(tenant.encode(), digest_size=6).hexdigest()


def check_session_id(session: str) -> str:
    """1-128 printable characters, no spaces. Raises PinError."""
    if not isinstance(session, str) or not 0 < len(session) <= SESSION_ID_MAX \
            or not session.isprintable() or any(c.isspace() for c in session):
        raise PinError(f"bad session id {session!r}: 1-{SESSION_ID_MAX} printable characters, "
                       "no spaces")
    return session


def check_priority(priority) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) \
            or not -PRIORITY_MAX <= priority <= PRIORITY_MAX:
        raise PinError(f"a retention priority is an integer in [-{PRIORITY_MAX}, {PRIORITY_MAX}], "
                       f"got {priority!r}")
    return priority


@dataclass(frozen=True)
class RetentionConfig:
    """Bounds on retention hints. ``tenants``: cache salt -> cap in blocks (``""``: requests
    without a salt). ``tenant_blocks``: cap of a tenant without an entry; ``total_blocks``: all
    tenants together; None: a tenth / half of the DRAM tier (:meth:`resolve`)."""

    max_ttl_s: float = DEFAULT_MAX_TTL_S
    tenant_blocks: int | None = None
    total_blocks: int | None = None
    tenants: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.max_ttl_s, bool) or not 0 < float(self.max_ttl_s) <= MAX_PIN_TTL_S:
            raise ConfigError(f"retention max_ttl_s must be in (0, {MAX_PIN_TTL_S:.0f}] s, got "
                              f"{self.max_ttl_s!r}")
        for what, v in (("tenant_blocks", self.tenant_blocks), ("total_blocks", self.total_blocks),
                        *((f"the cap of tenant {tenant_label(t)}", c)
                          for t, c in dict(self.tenants).items())):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"retention {what} must be a whole number of blocks >= 0, "
                                  f"got {v!r}")

    def resolve(self, capacity_blocks: int) -> tuple[int, int]:
        """``(default tenant cap, total cap)`` for a DRAM tier of ``capacity_blocks``."""
        total = capacity_blocks // 2 if self.total_blocks is None else self.total_blocks
        if self.tenant_blocks is not None:
            return self.tenant_blocks, total
        return min(max(1, capacity_blocks // 10), total), total

    def check(self, capacity_blocks: int) -> list[str]:
        """Validate against the DRAM tier: raises ConfigError for a cap that can never hold
        (a total above the tier, a tenant cap above the total); returns warnings for
        oversubscription (tenant caps adding up to more than the total; TEN-39)."""
        default, total = self.resolve(capacity_blocks)
        if total > capacity_blocks:
            raise ConfigError(f"retention total_blocks {total} is more than the DRAM tier holds "
                              f"({capacity_blocks} blocks): pinned sessions would starve every "
                              "other request")
        for who, cap in (("tenant_blocks (the default cap)", default),
                         *((f"the cap of tenant {tenant_label(t)}", c)
                           for t, c in dict(self.tenants).items())):
            if cap > total:
                raise ConfigError(f"retention {who} is {cap} blocks, more than total_blocks "
                                  f"({total}): it can never be reached; lower it")
        explicit = sum(dict(self.tenants).values())
        if explicit > total:
            return [f"retention caps are oversubscribed: the tenants' caps add up to {explicit} "
                    f"blocks but all tenants together may pin {total} (DRAM {capacity_blocks}); "
                    "tenants compete for the total (over it hints are refused, "
                    "retention_blocks_refused)"]
        return []


@dataclass
class _Session:
    owner: str
    label: str
    priority: int
    deadline: float
    keys: set[BlockKey] = field(default_factory=set)


MIN_SESSIONS = 64
"""Sessions a tenant may hold at once: ``max(MIN_SESSIONS, its cap in blocks)``; a hint that
would open one more is refused (``retention_sessions_refused``)."""

MAX_TENANT_STATS = 1024
"""Per-tenant statistics kept (and exported): beyond this many tenant labels, those with no
session and no configured cap are forgotten (their series end)."""


class Retention:
    """The ledger of hinted sessions over the store's PinBook (module docstring)."""

    def __init__(self, pins: PinBook, res: Residency, capacity_blocks: int,
                 counters: Counter, config: RetentionConfig | None = None) -> None:
        self._pins = pins
        self._res = res
        self.capacity = capacity_blocks
        self.counters = counters
        self._sessions: dict[str, _Session] = {}               # owner -> session
        self._by_tenant: dict[str, dict[str, _Session]] = {}   # label -> owner -> session
        self._use: dict[str, Counter] = {}                     # label -> key -> sessions holding it
        self._total = 0                                        # sum of len(_use[label])
        self._expiry: list[tuple[float, int, str]] = []        # (deadline, seq, owner), lazy
        self._seq = 0
        self._tstats: dict[str, Counter] = {}
        self.warnings: list[str] = []
        self.configure(config or RetentionConfig())

    def _prune_tstats(self) -> None:
        """Forget the statistics of tenants with no session and no configured cap."""
        for label in [lb for lb in self._tstats
                      if lb not in self._by_tenant and lb not in self._caps]:
            del self._tstats[label]

    def configure(self, config: RetentionConfig) -> list[str]:
        """Apply ``config`` (raises ConfigError, changing nothing, when it cannot hold); returns
        its warnings (also logged). Pins already held stay; new caps apply to new hints."""
        warnings = config.check(self.capacity)
        self.config = config
        self._default, self._total_cap = config.resolve(self.capacity)
        self._caps = {tenant_label(t): c for t, c in dict(config.tenants).items()}
        self.warnings = warnings
        for w in warnings:
            log.warning("%s", w)
        return warnings

    def cap(self, tenant: str) -> int:
        return self._caps.get(tenant_label(tenant), self._default)

    # ---------------------------------------------------------------- bookkeeping
    def _add(self, s: _Session, key: BlockKey) -> None:
        s.keys.add(key)
        use = self._use.setdefault(s.label, Counter())
        if not use[key]:
            self._total += 1
        use[key] += 1

    def _drop(self, s: _Session, key: BlockKey) -> None:
        s.keys.discard(key)
        use = self._use[s.label]
        use[key] -= 1
        if use[key] <= 0:
            del use[key]
            self._total -= 1

    def _forget(self, s: _Session) -> None:
        for k in list(s.keys):
            self._drop(s, k)
        self._sessions.pop(s.owner, None)
        t = self._by_tenant.get(s.label)
        if t is not None:
            t.pop(s.owner, None)
            if not t:
                del self._by_tenant[s.label]
                self._use.pop(s.label, None)

    def _release(self, s: _Session) -> int:
        n = self._pins.release_owner(s.owner)
        self._forget(s)
        return n

    def expire(self) -> int:
        """Forget sessions whose deadline passed (the PinBook expires their pins itself, on the
        same clock); returns how many."""
        now = self._pins.now()
        n = 0
        while self._expiry and self._expiry[0][0] <= now:
            d, _, owner = heapq.heappop(self._expiry)
            s = self._sessions.get(owner)
            if s is not None and s.deadline == d:
                self._pins.release_owner(owner)   # normally gone already (same deadline)
                self._forget(s)
                n += 1
        if n:
            self.counters[cn.RETENTION_SESSIONS_EXPIRED] += n
        return n

    # ---------------------------------------------------------------- hints
    def hint(self, keys: Iterable[BlockKey], *, session: str, tenant: str = "",
             ttl_s: float, priority: int = 0) -> dict:
        """Pin the resident ``keys`` for ``session`` of ``tenant`` until ``ttl_s`` from now,
        refreshing what the session already holds (module docstring for the rules). Returns
        ``{pinned (new pins), refused, held (blocks the session holds now), displaced (own
        lower-priority sessions released), ttl_s (as applied), cap, tenant (label)}``. Raises
        PinError for a bad session id, TTL or priority (nothing changes)."""
        check_session_id(session)
        priority = check_priority(priority)
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s >= 0:
            raise PinError(f"a retention TTL is a number of seconds >= 0, got {ttl_s!r}")
        try:
            ttl = float(ttl_s)
        except OverflowError:   # an int beyond a float: longer than any maximum
            ttl = float("inf")
        if ttl > self.config.max_ttl_s:
            ttl = float(self.config.max_ttl_s)
            self.counters[cn.RETENTION_TTL_CLAMPED] += 1
        self.expire()
        label = tenant_label(tenant)
        owner = f"{OWNER_PREFIX}{label}/{session}"
        cap = self._caps.get(label, self._default)
        if label not in self._tstats and len(self._tstats) >= MAX_TENANT_STATS:
            self._prune_tstats()
        ts = self._tstats.setdefault(label, Counter())
        self.counters[cn.RETENTION_HINTS] += 1
        ts["hints"] += 1
        s = self._sessions.get(owner)
        out = {"pinned": 0, "refused": 0, "held": 0, "displaced": 0, "ttl_s": ttl, "cap": cap,
               "tenant": label}
        if ttl == 0:   # the session ends now
            if s is not None:
                self._release(s)
                self.counters[cn.RETENTION_SESSIONS_ENDED] += 1
            return out
        now = self._pins.now()
        if s is not None:   # refresh: every pin of the session takes the new deadline
            held = self._pins.held(owner)
            for k in list(s.keys):
                if held.get(k):
                    self._pins.unpin(owner, k)
                    self._pins.pin(owner, k, ttl)
                else:                       # dropped under it (a block that failed its checksum)
                    self._drop(s, k)
            s.priority = priority
        want = [k for k in dict.fromkeys(keys) if k in self._res and (s is None or k not in s.keys)]
        use = self._use.get(label, Counter())

        def room() -> int:
            return min(cap - len(self._use.get(label, ())), self._total_cap - self._total)

        extra = sum(1 for k in want if not use[k])
        displaced = 0
        if extra > room():   # own lower-priority sessions make room, lowest and oldest first
            victims = sorted((v for v in self._by_tenant.get(label, {}).values()
                              if v.owner != owner and v.priority < priority),
                             key=lambda v: (v.priority, v.deadline))
            for v in victims:
                if extra <= room():
                    break
                self._release(v)
                displaced += 1
                use = self._use.get(label, Counter())
                extra = sum(1 for k in want if not use[k])
        if s is None and want and len(self._by_tenant.get(label, ())) >= max(MIN_SESSIONS, cap):
            # a new session beyond the tenant's session bound: refused (sessions that share
            # blocks cost no cap, so the cap alone would not bound them)
            self.counters[cn.RETENTION_SESSIONS_REFUSED] += 1
            ts["sessions_refused"] += 1
            want = []
        budget = max(0, room())
        if want and s is None:
            s = _Session(owner, label, priority, 0.0)
        pinned = refused = 0
        for k in want:
            if use[k]:
                pass                        # counted for this tenant already: costs nothing
            elif budget > 0:
                budget -= 1
            else:
                refused += 1
                continue
            self._pins.pin(owner, k, ttl)
            self._add(s, k)
            use = self._use[label]
            pinned += 1
        if s is not None and s.keys:
            s.deadline = now + ttl
            self._sessions[owner] = s
            self._by_tenant.setdefault(label, {})[owner] = s
            self._seq += 1
            heapq.heappush(self._expiry, (s.deadline, self._seq, owner))
            if len(self._expiry) > 64 and len(self._expiry) > 4 * len(self._sessions):
                self._expiry = [e for e in self._expiry
                                if e[2] in self._sessions and self._sessions[e[2]].deadline == e[0]]
                heapq.heapify(self._expiry)
        elif s is not None and owner in self._sessions:
            self._forget(s)
        self.counters[cn.RETENTION_BLOCKS_PINNED] += pinned
        if displaced:
            self.counters[cn.RETENTION_SESSIONS_DISPLACED] += displaced
            ts["sessions_displaced"] += displaced
        if refused:
            self.counters[cn.RETENTION_HINTS_REFUSED] += 1
            self.counters[cn.RETENTION_BLOCKS_REFUSED] += refused
            ts["hints_refused"] += 1
            ts["blocks_refused"] += refused
        out.update(pinned=pinned, refused=refused, displaced=displaced,
                   held=len(s.keys) if s is not None else 0)
        return out

    def stats(self) -> dict:
        """``{max_ttl_s, total_blocks, pinned_blocks, default_tenant_blocks, warnings,
        tenants: {label: {cap, pinned_blocks, sessions, hints, hints_refused, blocks_refused,
        sessions_displaced}}}`` (tenants that hold pins or sent hints)."""
        self.expire()
        tenants = {}
        for label in sorted(set(self._tstats) | set(self._by_tenant)):
            tenants[label] = {"cap": self._caps.get(label, self._default),
                              "pinned_blocks": len(self._use.get(label, ())),
                              "sessions": len(self._by_tenant.get(label, ())),
                              **{k: int(self._tstats.get(label, Counter())[k])
                                 for k in ("hints", "hints_refused", "blocks_refused",
                                           "sessions_displaced")}}
        return {"max_ttl_s": float(self.config.max_ttl_s), "total_blocks": self._total_cap,
                "pinned_blocks": self._total, "default_tenant_blocks": self._default,
                "warnings": list(self.warnings), "tenants": tenants}


def parse_tenant_caps(items: Iterable[str] | Mapping[str, int]) -> dict[str, int]:
    """``["salt=blocks", ...]`` (the daemon's ``[retention] tenants``; ``=blocks`` alone is the
    tenant without a salt) or a mapping, as ``{salt: blocks}``. Raises ConfigError."""
    if isinstance(items, Mapping):
        out = dict(items)
    else:
        out = {}
        for item in items:
            salt, sep, n = str(item).rpartition("=")
            if not sep or not n.strip().isdigit():
                raise ConfigError(f"retention tenants: {item!r} is not \"<cache salt>=<blocks>\"")
            if salt in out:
                raise ConfigError(f"retention tenants: tenant {tenant_label(salt)} is listed twice")
            out[salt] = int(n)
    for salt, n in out.items():
        if not isinstance(salt, str) or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"retention tenants: cap {n!r} of {tenant_label(str(salt))} must be "
                              "a whole number of blocks >= 0")
    return out


__all__ = ["OWNER_PREFIX", "Retention", "RetentionConfig", "check_priority", "check_session_id",
           "parse_tenant_caps", "tenant_label"]
