"""``[peers]`` in the daemon settings (tierstore/settings.py): file, environment, validation."""

from __future__ import annotations

import textwrap

import pytest

from tierstore.errors import ConfigError
from tierstore.settings import PeerEntry, PeersSettings, load_settings


def _load(tmp_path, text: str, env: dict | None = None):
    p = tmp_path / "ts.toml"
    p.write_text(textwrap.dedent(text))
    return load_settings(p, env=env or {}, data_dir=str(tmp_path / "d"))


def test_defaults_are_off_and_loopback(tmp_path):
    s = load_settings(None, env={}, data_dir=str(tmp_path)).peers
    assert s == PeersSettings()
    assert not s.enabled and s.host == "127.0.0.1" and s.peers == () and s.etcd == ()
    assert s.transports == ("tcp",) and not s.require_rdma and s.verify_checksums


def test_full_section_is_parsed(tmp_path):
    s = _load(tmp_path, """
        [peers]
        enabled = true
        node = "a"
        host = "169.254.3.1"
        port = 7471
        advertise_host = "169.254.3.1"
        peers = ["b=169.254.3.2:7471", "169.254.3.3:7471", "v6=[fe80::1]:7000"]
        etcd = ["169.254.3.9:2379"]
        etcd_prefix = "/x/"
        lease_ttl_s = 3
        transports = ["rdma", "tcp"]
        require_rdma = false
        streams = 4
        timeout_s = 1.5
        connect_timeout_s = 0.5
        retry_s = 0.25
        verify_checksums = false
        """).peers
    assert s.enabled and s.node == "a" and s.node_name() == "a"
    assert (s.host, s.port, s.advertise_host) == ("169.254.3.1", 7471, "169.254.3.1")
    assert s.peers == (PeerEntry("b", "169.254.3.2", 7471),
                       PeerEntry("169.254.3.3:7471", "169.254.3.3", 7471),
                       PeerEntry("v6", "fe80::1", 7000))
    assert s.etcd == (("169.254.3.9", 2379),) and s.etcd_prefix == "/x/" and s.lease_ttl_s == 3
    assert s.transports == ("rdma", "tcp") and s.streams == 4
    assert (s.timeout_s, s.connect_timeout_s, s.retry_s) == (1.5, 0.5, 0.25)
    assert s.verify_checksums is False


def test_environment_overrides_lists_comma_separated(tmp_path):
    s = _load(tmp_path, """
        [peers]
        peers = ["b=169.254.3.2:7471"]
        """, env={"TIERSTORE_PEERS_ENABLED": "1",
                  "TIERSTORE_PEERS_PEERS": "x=169.254.4.2:1, y=169.254.4.3:2",
                  "TIERSTORE_PEERS_TIMEOUT_S": "0.75"}).peers
    assert s.enabled and s.timeout_s == 0.75
    assert [p.name for p in s.peers] == ["x", "y"] and s.peers[1].address == ("169.254.4.3", 2)


@pytest.mark.parametrize("body, needle", [
    ('peers = ["b=nohost"]', "host:port"),
    ('peers = ["b=h:0"]', "host:port"),
    ('peers = ["b=h:70000"]', "host:port"),
    ('peers = ["b=h:1", "b=h:2"]', "duplicate"),
    ('peers = "b=h:1"', None),            # a TOML string is split like the environment
    ('peers = [1, 2]', "list of strings"),
    ('etcd = ["nope"]', "etcd"),
    ('transports = ["udp"]', "transports"),
    ('transports = []', "transports"),
    ('require_rdma = true', "require_rdma"),
    ('port = 70000', "out of range"),
    ('enabled = true\nport = 0', "etcd"),
    ('lease_ttl_s = 0', "lease_ttl_s"),
    ('streams = 0', "streams"),
    ('timeout_s = 0', "timeouts"),
    ('node = "a b"', "node"),
    ('colour = "red"', "unknown setting"),
])
def test_bad_values_are_one_line_config_errors(tmp_path, body, needle):
    text = "[peers]\n" + body + "\n"
    if needle is None:
        s = _load(tmp_path, text).peers
        assert s.peers == (PeerEntry("b", "h", 1),)
        return
    with pytest.raises(ConfigError, match=needle):
        _load(tmp_path, text)


def test_port_0_is_allowed_with_etcd(tmp_path):
    s = _load(tmp_path, """
        [peers]
        enabled = true
        port = 0
        etcd = ["169.254.3.9:2379"]
        """).peers
    assert s.port == 0 and s.etcd
