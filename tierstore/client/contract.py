"""The client contract: what every backend of the client API promises, written once.

Two classes implement it: :class:`tierstore.client.Client` (``Client.embedded``: a Store in this
process) and :class:`tierstore.client.remote.RemoteClient` (``Client.connect``: the per-node
daemon over its Unix socket, bytes through its shared-memory slab). admin/ and plugins/ code
against :class:`StoreClient`, never against one of them; ``open_client`` returns either.
tests/integration/test_client_contract.py runs one suite over both.

Rules every method follows (the daemon keeps them across its socket):

- **Errors by class.** A refusal raises a :mod:`tierstore.errors` class, the same one from both
  backends: JobError (unknown or completed job), PinError (unpin without a pin, a session pin
  without a TTL), RejectedError (block larger than a slot, ...), ConfigError (no such tier),
  RetryLater (transient; ``after_s`` is the server's hint and arrives unchanged over the wire),
  KeyPrefixError (``resolve``: a key prefix that is ambiguous or unknown).
  The daemon backend adds DaemonUnreachable (connection lost: its pins and unfinished jobs were
  released).
- **Two-phase writes.** ``prepare_store`` reserves slots (invisible to lookups); the caller
  writes the bytes into ``slot_view(slot)``; ``complete_store(job, ok)`` publishes the blocks
  whose answer is true and frees the others. ``put`` is the convenience over the three: a copy
  that fails aborts the job (nothing published, its slots free again) and re-raises the copy's
  error.
- **Pins.** A pin keeps a block resident. ``lookup(pin=True)`` and ``pin`` pin for this client
  (gone with it), for one ``request`` of it, or (``pin(session=, ttl_s=)``) for a named session
  that outlives it. ``unpin`` is all or nothing; ``unpin_each`` answers per key.
- **Loads.** ``prepare_load``/``prepare_loads`` pin the hit prefix and stage it into DRAM slots;
  a job that is not ``ready`` is finished by ``poll_loads`` or ``wait_load``; ``complete_load``
  releases it. ``get`` is the convenience over the three.

Besides the Protocol, this module holds the one argument rule both clients check before they act
(:func:`check_pin_owner`); it imports nothing else at run time but tierstore.errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

from tierstore.errors import PinError

if TYPE_CHECKING:   # value types only: the contract sits below both backends
    from tierstore.keys import Keyer, Namespace
    from tierstore.types import BlockKey, BlockStatus, LoadJob, LookupResult, StoreJob, Tier


@runtime_checkable
class StoreClient(Protocol):
    """One node's store as a client sees it (see the module docstring for the shared rules)."""

    @property
    def secret(self) -> bytes:
        """The cluster secret keys are computed under (never sent anywhere)."""

    @property
    def owner(self) -> str:
        """The pin and job owner this client acts as."""

    def keyer(self, namespace: Namespace) -> Keyer:
        """A Keyer for ``namespace`` under this client's secret."""

    # ------------------------------------------------------------------ lookups and pins
    def lookup(self, keys: Sequence[BlockKey], namespace: Namespace, *, pin: bool = False,
               ttl_s: float | None = None, request: str | None = None) -> LookupResult:
        """Longest resident prefix of ``keys`` (a chain), nearest tier per block; with ``pin``
        the prefix is pinned for this client or its ``request`` (for ``ttl_s`` seconds when
        given)."""

    def pin(self, keys: Sequence[BlockKey], ttl_s: float | None = None,
            session: str | None = None, request: str | None = None) -> int:
        """Pin the resident ``keys``; returns how many were pinned. ``session`` pins need
        ``ttl_s`` (PinError without); ``session`` and ``request`` together are a PinError."""

    def unpin(self, keys: Sequence[BlockKey], session: str | None = None,
              request: str | None = None) -> int:
        """Release one pin per key of the owner; PinError (and nothing released) when the owner
        holds no pin on one of them."""

    def unpin_each(self, keys: Sequence[BlockKey], session: str | None = None,
                   request: str | None = None) -> list[bool]:
        """The batched, per-key unpin (one call for any number of keys): release one pin of the
        owner (as for ``unpin``) on each key that holds one; one bool per key, in order, False
        where the owner held none (never a PinError for that; ``session`` and ``request``
        together still are)."""

    def release(self, request: str) -> int:
        """Release every pin ``request`` still holds; returns how many."""

    # ------------------------------------------------------------------ writes
    def prepare_store(self, keys: Sequence[BlockKey], namespace: Namespace, size_bytes: int,
                      parent: BlockKey | None = None, wait_s: float = 0.0,
                      engine: Sequence[bytes | None] | None = None) -> StoreJob:
        """Reserve one slot per key that is not resident yet (status per key: OK with a slot,
        EXISTS, SKIPPED); waits up to ``wait_s`` for room in the NVMe write-behind queue."""

    def complete_store(self, job_id: int, ok: bool | Sequence[bool] = True) -> list[BlockStatus]:
        """Publish the job's blocks whose answer is true, free the others; JobError for an
        unknown or completed job."""

    def prepare_stores(self, specs: Sequence[tuple]) -> list[StoreJob]:
        """Several ``(keys, namespace, size_bytes, parent[, engine])`` jobs in one call."""

    def complete_stores(self, answers: Sequence[tuple]) -> list[list[BlockStatus]]:
        """Several ``(job_id, ok)`` answers in one call."""

    def put(self, keys: Sequence[BlockKey], namespace: Namespace,
            blocks: Sequence[bytes | memoryview], parent: BlockKey | None = None,
            wait_s: float = 60.0) -> list[BlockStatus]:
        """prepare_store + copy + complete_store for equally sized blocks. A copy that fails
        aborts the job (nothing is published, the slots are free again) and re-raises."""

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every block stored so far has its NVMe copy; False on a failed write or
        when ``timeout_s`` ran out."""

    # ------------------------------------------------------------------ reads
    def prepare_load(self, keys: Sequence[BlockKey], wait: bool = True) -> LoadJob:
        """Pin the loadable prefix of ``keys`` and stage it in DRAM slots (``wait``: until
        staged; else a job that is not ``ready`` yet)."""

    def prepare_loads(self, chains: Sequence[Sequence[BlockKey]],
                      wait: bool = False) -> list[LoadJob]:
        """Several chains in one call; by default never waits for the disk."""

    def poll_loads(self, job_ids: Sequence[int]) -> dict[int, LoadJob]:
        """The jobs among ``job_ids`` that are staged now (never waits)."""

    def wait_load(self, job_id: int, timeout_s: float | None = None) -> LoadJob | None:
        """Wait until the job is staged; None when ``timeout_s`` ran out first."""

    def complete_load(self, job_id: int, ok: bool = True) -> None:
        """Release the job's pins and staging slots; JobError for an unknown job."""

    def complete_loads(self, job_ids: Sequence[int], ok: bool = True) -> None:
        """complete_load for several jobs in one call."""

    def get(self, keys: Sequence[BlockKey]) -> list[bytes]:
        """Bytes of the longest loadable prefix of ``keys`` (copies)."""

    def slot_view(self, slot: int) -> memoryview:
        """Writable view of DRAM slot ``slot`` (valid while its job's pin or reservation
        holds)."""

    def slab(self) -> tuple[memoryview, int, int]:
        """``(buffer, num_slots, slot_bytes)`` of the DRAM slab."""

    # ------------------------------------------------------------------ admin
    def evict(self, keys: Sequence[BlockKey], tier: Tier | str | None = None,
              dry_run: bool = False) -> dict:
        """Drop unpinned ``keys`` (or only ``tier``'s copies); returns counts by outcome
        (``evicted``, ``pinned``, ``missing``, ``not_in_tier``, ``only_copy``; absent when 0).
        ``dry_run``: nothing changes, the counts are what an evict would answer now and
        ``outcomes`` names one of them per key, in order (one call for any number of keys)."""

    def resolve(self, prefixes: Sequence[str], unknown_ok: bool = False) -> list[BlockKey | None]:
        """Full keys of resident blocks for hex key ``prefixes`` (1-64 digits), one per prefix,
        in one call; ``unknown_ok``: None for a prefix no resident block has. ConfigError for a
        prefix that is not hex; KeyPrefixError (a ConfigError) for an ambiguous prefix, or an
        unknown one without ``unknown_ok``."""

    def blocks(self, limit: int | None = None, tier: Tier | str | None = None) -> list[dict]:
        """One dict per resident block (``limit`` at most, ``tier`` only)."""

    def block(self, key: BlockKey) -> dict | None:
        """One block's residency, pins and metadata; None when it is not resident."""

    def stats(self) -> dict:
        """The store's counters and per-tier usage (the daemon adds a ``daemon`` section)."""

    def check(self, fix: bool = False) -> list[str]:
        """Invariant violations, one line each (``fix``: repair what can be repaired)."""

    def usage(self) -> list[dict]:
        """``stats()["tiers"]``."""

    def close(self) -> None:
        """Close this client. The daemon backend drops its connection (the daemon then releases
        its pins and unfinished jobs); the embedded one closes its store and its data dir's
        lock. Either way, views handed out stay valid memory."""

    def __enter__(self) -> StoreClient:
        ...

    def __exit__(self, *exc: object) -> None:
        ...


def check_pin_owner(session: str | None, request: str | None) -> None:
    """A pin belongs to a session or to a request of the client, never both: PinError."""
    if session is not None and request is not None:
        raise PinError("a pin belongs to a session or to a request, not both")


__all__ = ["StoreClient", "check_pin_owner"]
