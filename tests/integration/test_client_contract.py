"""One contract suite over both clients (issue 16 item 1): ``Client.embedded`` (a Store in this
process) and ``RemoteClient`` (a real daemon this module starts, as the other integration tests
do). Every test runs against both and asserts the same outcome: the rules of
:mod:`tierstore.client.contract`."""

from __future__ import annotations

import inspect
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from daemon_support import DaemonProc, config_toml  # noqa: E402

from tierstore.config import DramConfig, NvmeConfig, StoreConfig  # noqa: E402
from tierstore.client.contract import StoreClient  # noqa: E402
from tierstore.errors import (ConfigError, JobError, KeyPrefixError, PinError,  # noqa: E402
                              RejectedError, RetryLater, TierStoreError, TransferFailed)
from tierstore.keys import Namespace  # noqa: E402
from tierstore.types import BlockStatus, Tier  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SIZE = 4096
DRAM_BLOCKS = 64
NVME_BLOCKS = 128


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    d = DaemonProc(tmp / "data", tmp / "data" / "ts.sock",
                   config_toml(tmp / "ts.toml", slot_bytes=SIZE, dram_blocks=DRAM_BLOCKS,
                               nvme_blocks=NVME_BLOCKS))
    d.start()
    yield d
    d.kill()


@pytest.fixture(params=["embedded", "daemon"])
def client(request, tmp_path):
    from tierstore.client import Client, open_client

    if request.param == "embedded":
        cfg = StoreConfig(slot_bytes=SIZE, dram=DramConfig(capacity_blocks=DRAM_BLOCKS),
                          nvme=NvmeConfig(path="nvme", capacity_blocks=NVME_BLOCKS, file_slots=64))
        c = Client.embedded(tmp_path / "data", cfg)
    else:
        c = open_client(socket=request.getfixturevalue("daemon").socket)
    yield c
    c.close()


@pytest.fixture
def ns(request):
    """A namespace of this test alone: the daemon is shared by the module's tests."""
    return Namespace(f"contract-{request.node.name}", 16)


def _chain(c, ns, n, first=0):
    return c.keyer(ns).chain_from_block_ids(list(range(first, first + n)))


def _blocks(n, size=SIZE):
    return [bytes([i % 251 + 1]) * size for i in range(n)]


def _used_dram(c) -> int:
    return next(t["used_slots"] for t in c.stats()["tiers"] if t["tier"] == "dram")


def test_both_clients_implement_the_protocol_with_the_same_parameters(client):
    """The Protocol is the one contract: every method it names exists on both clients with the
    same parameters and defaults (a backend may add keyword arguments of its own)."""
    assert isinstance(client, StoreClient)
    for name, proto in inspect.getmembers(StoreClient, inspect.isfunction):
        if name.startswith("_"):
            continue
        mine = inspect.signature(getattr(type(client), name)).parameters
        for p in inspect.signature(proto).parameters.values():
            assert p.name in mine, (type(client).__name__, name, p.name)
            assert mine[p.name].default == p.default, (type(client).__name__, name, p.name)


def test_put_then_get_and_lookup(client, ns):
    keys = _chain(client, ns, 5)
    blocks = _blocks(5)
    assert client.put(keys, ns, blocks) == [BlockStatus.OK] * 5
    assert client.put(keys, ns, blocks) == [BlockStatus.PRESENT] * 5
    r = client.lookup(keys, ns)
    assert r.num_blocks == 5 and set(r.tiers) == {Tier.DRAM}
    assert client.get(keys) == blocks
    assert client.stats()["pending_stores"] == 0 and client.stats()["pending_loads"] == 0


def test_a_put_whose_copy_fails_publishes_nothing_and_re_raises(client, ns):
    """The failed-put case: the second block has the wrong size, so its copy raises; the job is
    aborted (no block visible, every reserved slot free again) and the copy's error reaches the
    caller. The same keys can be stored afterwards."""
    keys = _chain(client, ns, 4)
    used = _used_dram(client)
    bad = _blocks(4)
    bad[1] = bad[1][:100]
    with pytest.raises(ValueError):
        client.put(keys, ns, bad)
    assert client.lookup(keys, ns).num_blocks == 0
    assert all(client.block(k) is None for k in keys)
    assert _used_dram(client) == used
    assert client.stats()["pending_stores"] == 0
    assert client.put(keys, ns, _blocks(4)) == [BlockStatus.OK] * 4
    assert client.get(keys) == _blocks(4)


def test_two_phase_store_publishes_only_what_was_answered_ok(client, ns):
    keys = _chain(client, ns, 3)
    job = client.prepare_store(keys, ns, SIZE)
    assert job.status == [BlockStatus.OK] * 3 and client.lookup(keys, ns).num_blocks == 0
    for s, b in zip(job.slots, _blocks(3)):
        client.slot_view(s)[:SIZE] = b
    assert client.complete_store(job.job_id, ok=[True, True, False]) == \
        [BlockStatus.OK, BlockStatus.OK, BlockStatus.FAILED]
    assert client.lookup(keys, ns).num_blocks == 2
    job = client.prepare_store(keys[2:], ns, SIZE, parent=keys[1])
    assert client.complete_store(job.job_id, ok=False) == [BlockStatus.FAILED]
    assert client.lookup(keys, ns).num_blocks == 2

    jobs = client.prepare_stores([(keys[2:], ns, SIZE, keys[1])])
    for s in jobs[0].slots:
        client.slot_view(s)[:SIZE] = _blocks(3)[2]
    assert client.complete_stores([(jobs[0].job_id, True)]) == [[BlockStatus.OK]]
    assert client.get(keys) == _blocks(3)


def test_refusals_raise_the_same_classes(client, ns):
    keys = _chain(client, ns, 2)
    client.put(keys, ns, _blocks(2))
    assert client.flush(30)                                  # no write-behind pins left
    with pytest.raises(JobError):
        client.complete_store(987654, ok=True)
    with pytest.raises(JobError):
        client.complete_load(987654)
    with pytest.raises(RejectedError):
        client.prepare_store(_chain(client, ns, 1, first=50), ns, SIZE + 1)
    with pytest.raises(PinError):
        client.unpin(keys)                                   # no pin held
    with pytest.raises(PinError):
        client.pin(keys, session="s")                        # a session pin needs a TTL
    with pytest.raises(PinError):
        client.pin(keys, ttl_s=5, session="s", request="r")  # a session or a request, not both
    with pytest.raises(PinError):
        client.unpin(keys, session="s", request="r")
    assert client.stats()["pins"] == 0


def test_pins_by_client_request_and_session(client, ns):
    keys = _chain(client, ns, 3)
    client.put(keys, ns, _blocks(3))
    assert client.flush(30)                                  # no write-behind pins left
    r = client.lookup(keys, ns, pin=True, request="r1")
    assert r.num_blocks == 3 and r.pinned
    assert client.pin(keys[:2]) == 2
    assert client.block(keys[0])["pins"] == 2
    with pytest.raises(PinError):
        client.unpin(keys)                                   # all or nothing: keys[2] unpinned
    assert client.block(keys[0])["pins"] == 2
    assert client.unpin(keys[:2]) == 2
    assert client.release("r1") == 3
    assert client.pin(keys, ttl_s=60, session="contract") == 3
    assert client.unpin(keys, session="contract") == 3
    assert client.stats()["pins"] == 0


def test_loads_from_nvme_staged_asynchronously(client, ns):
    keys = _chain(client, ns, 4)
    blocks = _blocks(4)
    client.put(keys, ns, blocks)
    assert client.flush(30) is True
    out = client.evict(keys, tier="dram")
    assert out["evicted"] == 4
    assert set(client.lookup(keys, ns).tiers) == {Tier.NVME}
    jobs = client.prepare_loads([keys])
    job = jobs[0] if jobs[0].ready else client.wait_load(jobs[0].job_id, timeout_s=30)
    assert job is not None and job.num_ready == 4
    assert [bytes(client.slot_view(s)[:n]) for s, n in zip(job.slots, job.sizes)] == blocks
    client.complete_loads([job.job_id])
    with pytest.raises(JobError):                            # completed: no longer this client's
        client.poll_loads([job.job_id])
    assert client.stats()["pending_loads"] == 0


def test_evict_and_inspection_answer_alike(client, ns):
    keys = _chain(client, ns, 3)
    client.put(keys, ns, _blocks(3))
    assert client.flush(30)
    b = client.block(keys[0])
    assert b is not None and b["key"] == keys[0].hex()
    assert {"pins", "tiers"} <= set(b)
    assert len(client.blocks(limit=2)) == 2
    client.pin(keys[:1])
    out = client.evict(keys + [b"\0" * 32])
    assert (out["evicted"], out["pinned"], out["missing"]) == (2, 1, 1)
    client.unpin(keys[:1])
    assert client.evict(keys[:1], tier=Tier.NVME)["evicted"] == 1
    assert client.evict(keys[:1], tier="dram")["only_copy"] == 1
    assert client.check() == []
    assert client.usage() == client.stats()["tiers"]


def test_resolve_answers_prefixes_in_one_call(client, ns):
    """Hex key prefixes (any case, odd lengths, whole keys) resolve to the resident key, one per
    prefix in order; an unknown prefix is a KeyPrefixError, or None with ``unknown_ok``; an
    ambiguous one is a KeyPrefixError naming how many blocks share it; not hex: ConfigError."""
    keys = _chain(client, ns, 17)
    client.put(keys, ns, _blocks(17))
    h = [k.hex() for k in keys]
    assert client.resolve([h[0][:10], h[1].upper()[:11], h[2], f" {h[3][:9]} "]) == keys[:4]
    assert client.resolve([]) == []
    unknown = "00" * 32
    assert client.resolve([h[0][:12], unknown, "0" * 15], unknown_ok=True) == [keys[0], None, None]
    with pytest.raises(KeyPrefixError, match="no resident block has key prefix '0000"):
        client.resolve([h[0][:12], unknown])
    # 17 resident blocks of this test and 16 hex digits: some first digit is shared
    resident = [b["key"] for b in client.blocks()]
    digit = next(d for d in "0123456789abcdef" if sum(x.startswith(d) for x in h) > 1)
    n = sum(x.startswith(digit) for x in resident)
    with pytest.raises(KeyPrefixError, match=rf"key prefix '{digit}' is ambiguous \({n} blocks\)"):
        client.resolve([h[0], digit])
    with pytest.raises(ConfigError, match="not a hex key"):
        client.resolve(["xyz12345"])
    assert issubclass(KeyPrefixError, ConfigError)


def test_evict_dry_run_answers_per_key_and_changes_nothing(client, ns):
    """``evict(dry_run=True)`` gives the counts a real evict would give now plus one outcome per
    key, in one call, and leaves every block, tier and pin as it was."""
    keys = _chain(client, ns, 4)
    client.put(keys, ns, _blocks(4))
    assert client.flush(30)
    client.evict(keys[3:], tier="dram")                      # keys[3]: on NVMe only
    client.pin(keys[:1])
    missing = b"\0" * 32
    before = [client.block(k) for k in keys]
    dry = client.evict(keys + [missing, keys[1]], dry_run=True)
    assert dry["outcomes"] == ["pinned", "evicted", "evicted", "evicted", "missing", "evicted"]
    assert (dry["evicted"], dry["pinned"], dry["missing"]) == (4, 1, 1)
    dry = client.evict(keys + [missing], tier=Tier.DRAM, dry_run=True)
    assert dry["outcomes"] == ["pinned", "evicted", "evicted", "not_in_tier", "missing"]
    dry = client.evict(keys[3:], tier="nvme", dry_run=True)
    assert dry == {"only_copy": 1, "outcomes": ["only_copy"]}
    assert [client.block(k)["tiers"] for k in keys] == [b["tiers"] for b in before]
    assert [client.block(k)["pins"] for k in keys] == [1, 0, 0, 0]
    real = client.evict(keys + [missing], tier=Tier.DRAM)
    assert "outcomes" not in real
    assert (real["evicted"], real["pinned"], real["not_in_tier"], real["missing"]) == (2, 1, 1, 1)
    client.unpin(keys[:1])


def test_unpin_each_answers_per_key_in_one_call(client, ns):
    """The batched unpin: one pin of the owner released on each key that holds one, False where
    none is held (no PinError, unlike the all-or-nothing ``unpin``); a key listed twice releases
    two; session and request owners as for ``unpin``."""
    keys = _chain(client, ns, 3)
    client.put(keys, ns, _blocks(3))
    assert client.flush(30)
    assert client.pin(keys[:2], ttl_s=60, session="each") == 2
    assert client.pin(keys[:1], ttl_s=60, session="each") == 1
    assert client.unpin_each(keys + [b"\0" * 32], session="each") == [True, True, False, False]
    assert client.block(keys[0])["pins"] == 1
    assert client.unpin_each([keys[0], keys[0]], session="each") == [True, False]
    assert client.unpin_each(keys, session="other") == [False] * 3
    assert client.pin(keys, request="r") == 3
    assert client.unpin_each(keys[1:]) == [False, False]     # the client's own: none held
    assert client.unpin_each(keys[1:], request="r") == [True, True]
    assert client.release("r") == 1
    assert client.unpin_each([]) == []
    with pytest.raises(PinError):
        client.unpin_each(keys, session="s", request="r")
    assert client.stats()["pins"] == 0


def test_error_replies_are_read_by_one_rule():
    """The daemon's clients and the peer sessions read an error reply the same way: the class it
    names (tierstore.errors, plus the transfer's own), RetryLater with the sender's after_s
    (carried on the wire since this change; absent from an older sender: 0.0), any other name a
    TierStoreError that says which."""
    from tierstore.client.remote import _raise_remote
    from tierstore.protocol.codec import error_body
    from tierstore.transfer.transport import AuthFailed, raise_remote

    def both(body):
        got = []
        for reader in (_raise_remote, raise_remote):
            with pytest.raises(TierStoreError) as ei:
                reader(body)
            got.append(ei.value)
        assert type(got[0]) is type(got[1]) and str(got[0]) == str(got[1])
        return got[0]

    e = both(error_body(RetryLater("busy", after_s=2.5)))
    assert isinstance(e, RetryLater) and e.after_s == 2.5
    e = both({"error": "RetryLater", "message": "old daemon"})
    assert isinstance(e, RetryLater) and e.after_s == 0.0
    for exc in (PinError("p"), JobError("j"), ConfigError("c"), TransferFailed("t"),
                AuthFailed("a")):
        e = both(error_body(exc))
        assert type(e) is type(exc) and str(e) == str(exc)
    e = both(error_body(KeyError("x")))
    assert type(e) is TierStoreError and "KeyError" in str(e)
    e = both({"error": "os", "message": "a module attribute is not an error class"})
    assert type(e) is TierStoreError
