"""Counter names: the one table of every counter the store and its tiers keep (issue 16 item 5).

What it owns: the name and one line of meaning of each counter in ``Store.counters`` (kept by
the store, its mover in tierstore/moves.py, the flusher in tierstore/writebehind.py and
retention in tierstore/retention.py) and in a tier's ``counters`` (the NVMe tier's; the store
shows them as ``<tier>_<name>``). ``tierstore stats --json`` prints these names and the daemon's
Prometheus exporter (tierstore/metrics.py) reads them from there; code names a counter only
through this module, never by a string of its own::

    COUNTERS        fixed name        -> meaning          (Store.counters)
    FAMILIES        "evictions_{tier}" -> meaning         one counter per tier / error / outcome,
                                                          with its names prebuilt where hot
                                                          (``EVICTIONS_OF[Tier.DRAM]``)
    TIER_COUNTERS   tier-local name   -> meaning          (NvmeTier.counters)

A plain table: no I/O, no state beyond the dicts built at import; it imports only
tierstore.types, so every layer may read it.
"""

from __future__ import annotations

from tierstore.types import Tier

COUNTERS: dict[str, str] = {}
FAMILIES: dict[str, str] = {}
TIER_COUNTERS: dict[str, str] = {}


def _name(name: str, meaning: str) -> str:
    COUNTERS[name] = meaning
    return name


def _family(pattern: str, meaning: str) -> str:
    FAMILIES[pattern] = meaning
    return pattern


def _tier(name: str, meaning: str) -> str:
    TIER_COUNTERS[name] = meaning
    return name


def per_tier(pattern: str) -> dict[Tier, str]:
    """``pattern`` (a family with a ``{tier}`` field) named for every tier."""
    return {t: pattern.format(tier=t.label) for t in Tier}


# ---------------------------------------------------------------- lookups and pins (store.py)
LOOKUPS = _name("lookups", "lookup calls")
LOOKUP_HIT_BLOCKS = _name("lookup_hit_blocks", "blocks lookups found")
LOOKUP_MISS_BLOCKS = _name("lookup_miss_blocks", "blocks lookups did not find (all after the "
                           "first miss)")
PINS_EXPIRED = _name("pins_expired", "pins whose TTL ran out")

# ---------------------------------------------------------------- stores (store.py)
STORED_BLOCKS = _name("stored_blocks", "blocks published by complete_store")
STORE_SKIPPED = _name("store_skipped", "blocks a store answered SKIPPED: no slot (every "
                      "victim pinned)")
STORE_SKIPPED_WRITE_QUEUE = _name("store_skipped_write_queue", "blocks a store answered "
                                  "SKIPPED: the NVMe write-behind queue was full")
STORES_ABORTED = _name("stores_aborted", "store jobs aborted (ok=False for all, client gone, "
                       "shutdown)")
STORE_BLOCKS_FAILED = _name("store_blocks_failed", "blocks of a store job answered not ok")
NVME_ADMISSION_REJECTS = _name("nvme_admission_rejects", "stored DRAM blocks NVMe's admission "
                               "policy refused a copy")
BYTES_WRITTEN = _family("{tier}_bytes_written", "payload bytes written into the tier (dram: "
                        "by stores; nvme: by the flusher)")
BYTES_WRITTEN_OF = per_tier(BYTES_WRITTEN)

# ---------------------------------------------------------------- loads (store.py, moves.py)
LOADED_BLOCKS = _name("loaded_blocks", "blocks handed to loads")
LOAD_BYTES = _name("load_bytes", "payload bytes handed to loads")
LOAD_SHORT_BLOCKS = _name("load_short_blocks", "blocks a load pinned but could not stage")
LOADS_ASYNC = _name("loads_async", "loads staged by the loader thread")
LOADS_FAILED = _name("loads_failed", "loads that failed or were aborted")
LOAD_STAGING_FAILED = _name("load_staging_failed", "NVMe blocks a load found no DRAM slot for")
LOAD_HITS = _family("load_hits_{tier}", "blocks loaded, by the tier they came from")
LOAD_HITS_OF = per_tier(LOAD_HITS)
PROMOTIONS = _name("promotions", "blocks read from NVMe into DRAM")
CHECKSUM_FAILURES = _name("checksum_failures", "NVMe records that failed verification on a load")
NVME_READ_ERRORS = _name("nvme_read_errors", "NVMe reads that failed (not a checksum)")
NVME_BYTES_READ = _name("nvme_bytes_read", "payload bytes read from NVMe")

# ---------------------------------------------------------------- moves (moves.py)
EVICTIONS = _family("evictions_{tier}", "blocks evicted from the tier")
EVICTIONS_OF = per_tier(EVICTIONS)
EVICTIONS_KEPT_PINNED = _family("evictions_{tier}_kept_pinned", "victims pinned meanwhile, "
                                "kept")
EVICTIONS_KEPT_PINNED_OF = per_tier(EVICTIONS_KEPT_PINNED)
STAGING_FAILED = _family("{tier}_staging_failed", "blocks an HBM<->DRAM move found no slot for")
STAGING_FAILED_OF = per_tier(STAGING_FAILED)
DEMOTIONS_HBM = _name("demotions_hbm", "blocks copied HBM -> DRAM")
PROMOTIONS_HBM = _name("promotions_hbm", "blocks copied DRAM -> HBM")
NVME_BYTES_WRITTEN = BYTES_WRITTEN_OF[Tier.NVME]
NVME_STORE_SKIPPED = _name("nvme_store_skipped", "blocks left without an NVMe copy (write failed "
                           "after its retry, or no NVMe slot)")
NVME_WRITE_ERROR = _family("nvme_write_{error}", "NVMe writes that failed, by DiskError "
                           "(tiers/slot_tier.py; 'error' when none was named)")


def nvme_write_error(error: str | None) -> str:
    """:data:`NVME_WRITE_ERROR` of ``error`` (a DiskError, or None)."""
    return NVME_WRITE_ERROR.format(error=error or "error")


# ---------------------------------------------------------------- write-behind (writebehind.py)
NVME_FLUSHED_BLOCKS = _name("nvme_flushed_blocks", "blocks the flusher wrote to NVMe")
NVME_FLUSH_BATCHES = _name("nvme_flush_batches", "write batches of the flusher")
NVME_FLUSH_ERRORS = _name("nvme_flush_errors", "flusher batches that raised")

# ---------------------------------------------------------------- recovery (store.py)
NVME_RECOVERED = _name("nvme_recovered", "blocks recovered from NVMe at open")
NVME_RECOVERY_DUPLICATES = _name("nvme_recovery_duplicates", "NVMe records of a key already "
                                 "recovered (deleted at open)")

# ---------------------------------------------------------------- engine tokens (case MET-38)
# promised = delivered + failed + dropped per load vLLM accepted; declined = offered, vLLM took
# none of it
TOKEN_OUTCOMES = ("promised", "delivered", "failed", "dropped", "declined")
TOKEN_TIERS = tuple(dict.fromkeys([t.label for t in Tier] + ["peer", "unknown"]))
LOOKUP_TOKENS = _name("lookup_tokens", "prompt tokens engines looked up past their own prefix")
TOKENS = _family("tokens_{outcome}_{tier}", "engine tokens by outcome (TOKEN_OUTCOMES) and tier "
                 "(TOKEN_TIERS)")
TOKENS_PREFIX = "tokens_"
TOKENS_DELIVERED_PREFIX = TOKENS_PREFIX + "delivered_"


def tokens(outcome: str, tier: str) -> str:
    """:data:`TOKENS` of ``outcome`` and tier label ``tier``."""
    return TOKENS.format(outcome=outcome, tier=tier)


# ---------------------------------------------------------------- retention (retention.py)
RETENTION_HINTS = _name("retention_hints", "retention hints received")
RETENTION_HINTS_REFUSED = _name("retention_hints_refused", "hints that could not pin every block")
RETENTION_BLOCKS_PINNED = _name("retention_blocks_pinned", "blocks hints pinned")
RETENTION_BLOCKS_REFUSED = _name("retention_blocks_refused", "blocks hints could not pin (over "
                                 "a cap)")
RETENTION_TTL_CLAMPED = _name("retention_ttl_clamped", "hints whose TTL was clamped")
RETENTION_SESSIONS_ENDED = _name("retention_sessions_ended", "sessions ended by a hint of TTL 0")
RETENTION_SESSIONS_EXPIRED = _name("retention_sessions_expired", "sessions whose TTL ran out")
RETENTION_SESSIONS_REFUSED = _name("retention_sessions_refused", "new sessions refused (too many)")
RETENTION_SESSIONS_DISPLACED = _name("retention_sessions_displaced", "sessions displaced by a "
                                     "higher priority")

# ---------------------------------------------------------------- a tier's own (tiers/nvme*.py)
TIER_COUNTER = _family("{tier}_{name}", "a tier's own counter (TIER_COUNTERS), as stats shows it")
T_WRITES = _tier("writes", "records written and committed")
T_READS = _tier("reads", "records read and verified")
T_DELETES = _tier("deletes", "records deleted")
T_CHECKSUM_FAILURES = _tier("checksum_failures", "reads whose payload checksum differed")
T_HEADER_FAILURES = _tier("header_failures", "reads whose header did not verify")
T_IO_ERRORS = _tier("io_errors", "failed I/Os (write, fsync, read, zero, grow)")
T_COMPRESS_ERRORS = _tier("compress_errors", "records the codec failed on")
T_ENOSPC = _tier("enospc", "writes and grows that found no space")
T_STORED_RAW_INCOMPRESSIBLE = _tier("stored_raw_incompressible", "records stored raw: zstd did "
                                    "not make them smaller")
T_META_ERRORS = _tier("meta_errors", "LMDB commits that failed")
T_PREPARED_BYTES = _tier("prepared_bytes", "bytes of free slots pre-written by prepare()")
NVME_META_ERRORS = TIER_COUNTER.format(tier=Tier.NVME.label, name=T_META_ERRORS)


def tier_counter(tier: str, name: str) -> str:
    """A tier's own counter ``name`` as ``Store.stats()`` shows it (tier label ``tier``)."""
    return TIER_COUNTER.format(tier=tier, name=name)
