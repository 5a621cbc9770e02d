"""Session pins through the daemon (issue 6, item 3): ``tierstore blocks pin|unpin --session``.

A session pin belongs to ``session:<NAME>``, not to the connection that took it: it outlives the
CLI process, keeps its blocks through eviction pressure, and goes by its TTL or an explicit
unpin. A connection's own pins still go with the connection."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from typer.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))
from daemon_support import DaemonProc, config_toml  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SIZE = 1024
CAPACITY = 64


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProc(tmp_path / "data", tmp_path / "data" / "ts.sock",
                   config_toml(tmp_path / "ts.toml", slot_bytes=SIZE, dram_blocks=CAPACITY))
    d.start()
    yield d
    d.kill()


def _ns():
    from tierstore.keys import Namespace
    return Namespace("pin-model", 16, num_layers=2, num_kv_heads=2, head_size=8)


def _put_chain(sock, first_id: int, n: int) -> list[bytes]:
    """Store one chain of ``n`` blocks (ids first_id..first_id+n-1); returns its keys."""
    from tierstore.client import open_client
    ns = _ns()
    with open_client(socket=sock) as c:
        keys = c.keyer(ns).chain_from_block_ids(list(range(first_id, first_id + n)))
        c.put(keys, ns, [bytes([i % 251]) * SIZE for i in range(n)])
    return list(keys)


def _flood(sock, rounds: int = 6) -> None:
    """Store far more than the tier holds, in chains of 16, so every unpinned block can go."""
    for r in range(rounds):
        _put_chain(sock, 100_000 + r * 1000, 16)
        _put_chain(sock, 200_000 + r * 1000, 16)


def _cli(*args):
    from tierstore_admin.app import app
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _show(sock, key: bytes) -> dict | None:
    code, out, err = _cli("blocks", "show", key.hex(), "--socket", sock, "--json")
    if code == 1 and "no block" in err:
        return None
    assert code == 0, err
    return json.loads(out)


def test_session_pin_outlives_the_cli_and_survives_eviction_until_unpinned(daemon):
    """Pin 4 blocks for session s1 from the CLI (its connection then closes): the pins stay,
    `blocks show` names the session; flooding the tier evicts every other block of the chain
    but none of the pinned ones; unpin releases them, a second unpin is exit 1."""
    sock = daemon.socket
    keys = _put_chain(sock, 0, 8)
    pinned, free = keys[:4], keys[4:]
    code, out, err = _cli("blocks", "pin", *[k.hex() for k in pinned], "--ttl", "1h",
                          "--session", "s1", "--socket", sock, "--json")
    assert code == 0, err
    assert json.loads(out) == {"session": "s1", "ttl_s": 3600.0, "requested": 4, "pinned": 4,
                               "not_resident": 0}

    info = _show(sock, pinned[0])
    assert info["pins"] == 1
    [owner] = info["pin_owners"]
    assert owner["owner"] == "session:s1" and owner["pins"] == 1
    assert 3500 < owner["expires_in_s"] <= 3600

    _flood(sock)
    assert all(_show(sock, k)["pins"] == 1 for k in pinned)          # never evicted
    assert all(_show(sock, k) is None for k in free)                  # the rest went

    # another session's unpin does not touch s1's pins
    code, out, _ = _cli("blocks", "unpin", pinned[0].hex(), "--session", "other", "--socket", sock,
                        "--json")
    assert code == 1 and json.loads(out)["not_pinned"] == 1
    code, out, err = _cli("blocks", "unpin", *[k.hex() for k in pinned], "--session", "s1",
                          "--socket", sock, "--json")
    assert code == 0, err
    assert json.loads(out)["unpinned"] == 4
    assert all(_show(sock, k)["pins"] == 0 for k in pinned)
    code, out, _ = _cli("blocks", "unpin", pinned[0].hex(), "--session", "s1", "--socket", sock,
                        "--json")
    assert code == 1 and json.loads(out)["keys"] == [{"key": pinned[0].hex(), "state": "not_pinned"}]

    _flood(sock)
    assert all(_show(sock, k) is None for k in pinned)               # unpinned: evictable again


def test_session_pin_ttl_releases_the_blocks(daemon):
    """A 1 s session pin holds its blocks; after the TTL `blocks show` reports 0 pins and the
    blocks are evictable again (the daemon's stats count the expiry)."""
    sock = daemon.socket
    keys = _put_chain(sock, 0, 4)
    t0 = time.monotonic()
    code, _, err = _cli("blocks", "pin", *[k.hex() for k in keys], "--ttl", "1s", "--socket", sock)
    assert code == 0, err
    assert all(_show(sock, k)["pin_owners"][0]["owner"] == "session:default" for k in keys)
    # the daemon's store runs on its own monotonic clock (no fake clock crosses the process
    # boundary): wait for the expiry itself, then check it did not come before the TTL
    deadline = t0 + 10
    while _show(sock, keys[-1])["pins"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert time.monotonic() - t0 >= 1.0
    assert all(_show(sock, k)["pins"] == 0 for k in keys)
    from tierstore.client import open_client
    with open_client(socket=sock) as c:
        st = c.stats()
        assert st["pins"] == 0 and st["counters"]["pins_expired"] == 4
    _flood(sock)
    assert all(_show(sock, k) is None for k in keys)


def test_connection_pins_go_with_the_connection_session_pins_stay(daemon):
    """Through the API: a connection pin is released when its connection closes, a session pin
    on the same block is not; a session pin without a TTL is refused (PinError)."""
    from tierstore.client import open_client
    from tierstore.errors import PinError
    sock = daemon.socket
    keys = _put_chain(sock, 0, 2)
    with open_client(socket=sock) as c:
        assert c.pin(keys, ttl_s=60) == 2
        assert c.pin(keys, ttl_s=60, session="api") == 2
        with pytest.raises(PinError, match="TTL"):
            c.pin(keys, session="api")
        assert c.block(keys[0])["pins"] == 2
    deadline = time.monotonic() + 10
    while _show(sock, keys[0])["pins"] != 1:        # the daemon notices the close
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [o["owner"] for o in _show(sock, keys[0])["pin_owners"]] == ["session:api"]
    with open_client(socket=sock) as c:
        assert c.unpin(keys, session="api") == 2
        assert c.stats()["pins"] == 0


def test_pin_refusals(daemon, tmp_path):
    """In-process pins are refused with a hint at --socket (exit 2); --ttl is required and must
    parse; a bad session name is a clean error."""
    keys = _put_chain(daemon.socket, 0, 1)
    code, _, err = _cli("blocks", "pin", keys[0].hex(), "--ttl", "30m", "--data-dir", tmp_path)
    assert code == 2 and "--socket" in err and err.count("\n") == 1
    code, _, err = _cli("blocks", "unpin", keys[0].hex(), "--data-dir", tmp_path)
    assert code == 2 and "--socket" in err
    code, _, err = _cli("blocks", "pin", keys[0].hex(), "--socket", daemon.socket)
    assert code == 2 and "--ttl" in err
    code, _, err = _cli("blocks", "pin", keys[0].hex(), "--ttl", "soon", "--socket", daemon.socket)
    assert code == 2 and "duration" in err
    code, _, err = _cli("blocks", "pin", keys[0].hex(), "--ttl", "5m", "--session", "a b",
                        "--socket", daemon.socket)
    assert code == 1 and "session name" in err
    assert _show(daemon.socket, keys[0])["pins"] == 0
