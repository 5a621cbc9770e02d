"""Two daemons in this process, peers over loopback (127.0.0.1 only): the daemon-side peer
wiring without network namespaces, so it runs on any CI box. The multi-node acceptance test is
test_daemon_peers_netns.py."""

from __future__ import annotations

import json
import socket
import textwrap
import time

import pytest
from typer.testing import CliRunner

from tierstore.client.remote import RemoteClient
from tierstore.daemon.server import DaemonServer
from tierstore.keys import Namespace
from tierstore.settings import load_settings

pytestmark = pytest.mark.timeout(120)

SECRET = "3c" * 32
NS = Namespace(model="m", block_size=16)
SLOT = 16384


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(tmp, name, port, peers, *, dram, nvme=0, enabled=True):
    cfg = tmp / f"{name}.toml"
    text = f"""
        [daemon]
        drain_timeout_s = 1.0
        [store]
        slot_bytes = {SLOT}
        [dram]
        capacity_blocks = {dram}
        [metrics]
        enabled = false
        [peers]
        enabled = {str(enabled).lower()}
        node = "{name}"
        host = "127.0.0.1"
        port = {port}
        peers = {json.dumps(peers)}
        timeout_s = 2.0
        connect_timeout_s = 1.0
        retry_s = 0.2
        """
    if nvme:
        text += f"""
        [nvme]
        capacity_blocks = {nvme}
        write_through = true
        file_slots = 64
        """
    cfg.write_text(textwrap.dedent(text))
    st = load_settings(cfg, env={}, data_dir=str(tmp / name), socket=str(tmp / f"{name}.sock"))
    d = DaemonServer(st)
    d.start()
    d.run_in_thread()
    return d


@pytest.fixture
def pair(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERSTORE_SECRET", SECRET)
    pa, pb = _free_port(), _free_port()
    a = _daemon(tmp_path, "A", pa, [f"B=127.0.0.1:{pb}"], dram=64, nvme=256)
    b = _daemon(tmp_path, "B", pb, [f"A=127.0.0.1:{pa}"], dram=256)
    ca, cb = RemoteClient.connect(a.socket_path), RemoteClient.connect(b.socket_path)
    yield a, b, ca, cb
    for c in (ca, cb):
        c.close()
    for d in (a, b):
        d.request_stop()
        assert d.wait(15)


def _data(k) -> bytes:
    return (bytes(k) * (SLOT // 32 + 1))[:SLOT]


def test_nearest_tier_lookup_and_fetch_including_peer_nvme(pair):
    """A holds 100 blocks, the oldest only on its NVMe (DRAM of 64); B has the first 5. B's
    lookup reports local dram, then peer:A/nvme, then peer:A/dram; fetch_remote stages A's NVMe
    blocks through A's DRAM and B reads all 100 byte-exact from its own daemon."""
    a, b, ca, cb = pair
    keys = ca.keyer(NS).chain(list(range(16 * 100)))
    for j in range(0, 100, 20):
        ca.put(keys[j:j + 20], NS, [_data(k) for k in keys[j:j + 20]])
        assert ca.flush(timeout_s=30)   # NVMe copies written: DRAM victims are clean
    cb.put(keys[:5], NS, [_data(k) for k in keys[:5]])
    r = cb.lookup(keys, NS, peers=True)
    assert r.num_blocks == 100 and r.local_blocks == 5 and r.by_peer() == {"A": 95}
    labels = [loc.label for loc in r.locations]
    assert labels[:5] == ["dram"] * 5
    assert "peer:A/nvme" in labels and labels[-1] == "peer:A/dram"
    assert r.tiers[5].label == "peer" and r.hit_tokens == 1600
    got = cb.fetch_remote(keys, NS, detail=True)
    assert got["n"] == 100 and got["fetched"] == 95 and got["errors"] == []
    assert cb.get(keys) == [_data(k) for k in keys]
    assert cb.lookup(keys, NS, peers=True).local_blocks == 100
    # nothing is left pinned on A by B's leases
    assert ca.stats()["pins"] == 0
    # pin=True holds the local prefix for this connection
    got = cb.fetch_remote(keys, NS, pin=True, detail=True)
    assert got["n"] == 100 and got["fetched"] == 0 and got["pinned"] == 100
    assert cb.unpin(keys) == 100


def test_peers_ls_ping_and_metrics(pair):
    """The CLI shows A with its transport; ping works by name and by address; an unknown name
    is a usage error; per-peer metrics carry the transport label (XFER-15)."""
    from tierstore_admin.app import app

    a, b, ca, cb = pair
    runner = CliRunner()
    r = runner.invoke(app, ["peers", "ls", "--socket", b.socket_path, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    p = out["peers"][0]
    assert (p["name"], p["transport"], p["state"], p["node"]) == ("A", "tcp", "up", "A")
    r = runner.invoke(app, ["peers", "ping", "A", "--socket", b.socket_path, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rtt_ms"] > 0
    addr = out["peers"][0]["address"]
    r = runner.invoke(app, ["peers", "ping", addr, "--socket", b.socket_path])
    assert r.exit_code == 0 and "tcp" in r.stdout
    r = runner.invoke(app, ["peers", "ping", "nobody", "--socket", b.socket_path])
    assert r.exit_code == 2
    text = b.metrics.render().decode()
    assert 'tierstore_peer_up{address="%s",peer="A",transport="tcp"} 1.0' % addr in text


def test_a_stopped_peer_is_marked_down_and_missed(pair):
    """After A stops, B's lookups miss A's blocks (no error), fetch_remote returns the local
    prefix, and peers ls shows A down."""
    a, b, ca, cb = pair
    keys = ca.keyer(NS).chain(list(range(16 * 10)))
    ca.put(keys, NS, [_data(k) for k in keys])
    assert cb.lookup(keys, NS, peers=True).by_peer() == {"A": 10}
    a.request_stop()
    assert a.wait(15)
    r = cb.lookup(keys, NS, peers=True)
    assert r.num_blocks == 0
    assert cb.fetch_remote(keys, NS) == 0
    p = cb.peers()["peers"][0]
    assert p["state"] == "down" and p["failures"] >= 1


def test_without_peers_the_calls_answer_locally(tmp_path, monkeypatch):
    """[peers] disabled: lookup(peers=True) and fetch_remote answer from the local store;
    peers ls is a usage error (exit 2)."""
    from tierstore_admin.app import app

    monkeypatch.setenv("TIERSTORE_SECRET", SECRET)
    d = _daemon(tmp_path, "solo", 7470, [], dram=32, enabled=False)
    try:
        c = RemoteClient.connect(d.socket_path)
        keys = c.keyer(NS).chain(list(range(16 * 4)))
        c.put(keys[:2], NS, [_data(k) for k in keys[:2]])
        r = c.lookup(keys, NS, peers=True)
        assert (r.num_blocks, r.local_blocks, r.by_peer()) == (2, 2, {})
        assert c.fetch_remote(keys, NS) == 2
        c.close()
        r = CliRunner().invoke(app, ["peers", "ls", "--socket", d.socket_path])
        assert r.exit_code == 2 and "not enabled" in r.output
    finally:
        d.request_stop()
        assert d.wait(15)


def test_a_node_listed_as_its_own_peer_is_skipped(tmp_path, monkeypatch):
    """Adversarial finding: a member that is this node under another name ("me=localhost:PORT")
    was asked on every lookup. The proved node name gives it away: it shows as "self" and is
    never asked again, while a real peer keeps serving."""
    monkeypatch.setenv("TIERSTORE_SECRET", SECRET)
    pa, pb = _free_port(), _free_port()
    a = _daemon(tmp_path, "A", pa, [], dram=64)
    b = _daemon(tmp_path, "B", pb, [f"A=127.0.0.1:{pa}", f"me=localhost:{pb}"], dram=64)
    ca, cb = RemoteClient.connect(a.socket_path), RemoteClient.connect(b.socket_path)
    try:
        keys = ca.keyer(NS).chain(list(range(16 * 4)))
        ca.put(keys, NS, [_data(k) for k in keys])
        assert cb.lookup(keys, NS, peers=True).by_peer() == {"A": 4}
        assert cb.lookup(keys, NS, peers=True).by_peer() == {"A": 4}
        states = {p["name"]: p for p in cb.peers()["peers"]}
        assert states["me"]["state"] == "self" and states["me"]["failures"] == 0
        assert states["A"]["state"] == "up"
    finally:
        for c in (ca, cb):
            c.close()
        for d in (a, b):
            d.request_stop()
            assert d.wait(15)


def test_issue13_item2_a_fetch_failing_at_block_5_keeps_blocks_0_to_4(pair):
    """Issue 13 item 2 through the daemons: A's read of block 5 of 8 fails mid-transfer. B's
    plain fetch_remote raises TransferFailed, but blocks 0-4 arrived whole and stay on B (a
    lookup hits 80 tokens, byte-exact); ``partial=True`` answers the failure instead
    (``failed``, ``n`` 5 of ``promised`` 8) and pins the 5 for the caller. ``peers ls`` shows
    the failure and the kept blocks."""
    from tierstore.errors import TransferFailed
    from tierstore.transfer.peer_server import ServeHooks

    a, b, ca, cb = pair
    keys = ca.keyer(NS).chain(list(range(7000, 7000 + 16 * 8)))
    ca.put(keys, NS, [_data(k) for k in keys])
    job = a.store.prepare_load(keys[5:6])
    slot5 = job.slots[0]
    a.store.complete_load(job.job_id)

    class FailAt5(ServeHooks):
        def before_block(self, sess, index, slot):
            if slot == slot5:
                raise OSError("read error on A (test)")

    a.peers.server.hooks = FailAt5()
    with pytest.raises(TransferFailed, match="block 5 of 8"):
        cb.fetch_remote(keys, NS)
    assert cb.lookup(keys, NS).hit_tokens == 80
    assert cb.get(keys) == [_data(k) for k in keys[:5]]
    ls = cb.peers()
    assert ls["peers"][0]["blocks_kept_after_failure"] == 5
    assert ls["fetching"]["fetch_failed"] == 1 and ls["fetching"]["fetch_blocks_kept"] == 5
    assert ls["fetching"]["aborted_pending"] == 0
    # the same through partial=True (A is asked again once its retry_s has passed)
    time.sleep(0.3)
    got = cb.fetch_remote(keys, NS, partial=True, pin=True, detail=True)
    assert got["failed"] is True and got["n"] == 5 and got["promised"] == 8, got
    assert got["pinned"] == 5 and got["errors"]
    assert cb.unpin(keys[:5]) == 5
    assert ca.stats()["pins"] == 0 and cb.check() == []
