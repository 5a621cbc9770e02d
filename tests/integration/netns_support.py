"""Helpers for the multi-node tests in network namespaces (test_peers_netns.py,
test_daemon_peers_netns.py, tests/plugins/test_vllm_pd_netns.py).

The network rules these helpers keep: every namespace is made here under a caller's unique tag
and deleted on exit (also when the test fails); addresses (169.254.<net>.x) exist only inside
those namespaces; both ends of every connection run inside them (``in_netns``). Without
iproute2 or root the test is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from daemon_support import ROOT, stop_daemon, stop_process

__all__ = ["ROOT", "NetnsDaemon", "bridged_nodes", "etcd_or_skip", "in_netns", "ip",
           "netns_env", "paired_nodes", "start_etcd", "stop_process"]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def in_netns(ns: str, *cmd: str) -> list[str]:
    """``cmd`` run inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *cmd]


def netns_env(secret: str, **extra: str) -> dict:
    """Environment for a process of these tests: this checkout on PYTHONPATH, the cluster secret
    ``secret``, no secret file or config file inherited from the caller."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TIERSTORE_SECRET=secret, **extra)
    for k in ("TIERSTORE_SECRET_FILE", "TIERSTORE_CONFIG"):
        env.pop(k, None)
    return env


@contextlib.contextmanager
def _namespaces(names: list[str]):
    """Make namespaces ``names``; delete every one made on exit. Skips without iproute2/root."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 missing")
    if ip("netns", "add", names[0], check=False).returncode != 0:
        pytest.skip("cannot create network namespaces (need root)")
    made = [names[0]]
    try:
        for ns in names[1:]:
            ip("netns", "add", ns)
            made.append(ns)
        yield
    finally:
        for ns in made:
            ip("netns", "del", ns, check=False)


def _address(ns: str, dev: str, addr: str, *, mtu: int | None = None) -> None:
    ip("-n", ns, "addr", "add", addr, "dev", dev)
    if mtu is not None:
        ip("-n", ns, "link", "set", dev, "mtu", str(mtu))
    ip("-n", ns, "link", "set", dev, "up")
    ip("-n", ns, "link", "set", "lo", "up")


@contextlib.contextmanager
def bridged_nodes(tag: str, net: int, nodes: str = "abc", *, mtu: int | None = None):
    """One namespace ``<tag><n>`` per node n (address 169.254.<net>.<i>/24 on veth
    ``<tag>h<n>``), each linked to bridge br0 in namespace ``<tag>s``. Yields
    ``{"names": {n: ns} (with "s"), "addrs": {n: address}, "devs": {n: device}}``."""
    names = {n: f"{tag}{n}" for n in ("s", *nodes)}
    sw_ns = names["s"]
    with _namespaces(list(names.values())):
        ip("-n", sw_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", sw_ns, "link", "set", "br0", "up")
        addrs, devs = {}, {}
        for i, n in enumerate(nodes, start=1):
            host, sw = f"{tag}h{n}", f"{tag}w{n}"
            ip("link", "add", host, "type", "veth", "peer", "name", sw)
            ip("link", "set", host, "netns", names[n])
            ip("link", "set", sw, "netns", sw_ns)
            ip("-n", sw_ns, "link", "set", sw, "master", "br0")
            if mtu is not None:
                ip("-n", sw_ns, "link", "set", sw, "mtu", str(mtu))
            ip("-n", sw_ns, "link", "set", sw, "up")
            addrs[n], devs[n] = f"169.254.{net}.{i}", host
            _address(names[n], host, f"{addrs[n]}/24", mtu=mtu)
        yield {"names": names, "addrs": addrs, "devs": devs}


@contextlib.contextmanager
def paired_nodes(tag: str, net: int):
    """Namespaces ``<tag>a`` (169.254.<net>.1/30) and ``<tag>b`` (.2) joined by one veth pair
    (``<tag>va``, ``<tag>vb``). Yields like ``bridged_nodes`` (no "s")."""
    names = {n: f"{tag}{n}" for n in "ab"}
    with _namespaces(list(names.values())):
        devs = {"a": f"{tag}va", "b": f"{tag}vb"}
        ip("link", "add", devs["a"], "type", "veth", "peer", "name", devs["b"])
        addrs = {"a": f"169.254.{net}.1", "b": f"169.254.{net}.2"}
        for n in "ab":
            ip("link", "set", devs[n], "netns", names[n])
            _address(names[n], devs[n], f"{addrs[n]}/30")
        yield {"names": names, "addrs": addrs, "devs": devs}


def etcd_or_skip() -> str:
    """Path of the etcd server binary; skips the test without it or without etcd3gw."""
    etcd = shutil.which("etcd")
    if etcd is None:
        pytest.skip("etcd-server is not installed (apt-get install -y etcd-server)")
    try:
        import etcd3gw  # noqa: F401
    except ImportError:
        pytest.skip("etcd3gw is not installed (pip install etcd3gw)")
    return etcd


def start_etcd(etcd: str, ns: str, addr: str, name: str, data_dir: Path) -> subprocess.Popen:
    """A single-member etcd inside namespace ``ns``: clients on ``addr``:23790, its peer port
    on the namespace's loopback."""
    return subprocess.Popen(
        in_netns(ns, etcd, "--name", name, "--data-dir", str(data_dir),
                 "--listen-client-urls", f"http://{addr}:23790",
                 "--advertise-client-urls", f"http://{addr}:23790",
                 "--listen-peer-urls", "http://127.0.0.1:23800",
                 "--initial-advertise-peer-urls", "http://127.0.0.1:23800",
                 "--initial-cluster", f"{name}=http://127.0.0.1:23800"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class NetnsDaemon:
    """A tierstore daemon with peering on, inside namespace ``ns`` (``ip netns exec``), serving
    peers on ``addr``:``port`` and peered with ``peers`` (``NAME=host:port``). ``dram`` is the
    [dram] table (e.g. ``{"capacity_blocks": 100}``); ``extra`` TOML is appended to [peers]."""

    def __init__(self, name: str, ns: str, addr: str, tmp: Path, peers: list[str], *,
                 env: dict, port: int, slot_bytes: int | str, dram: dict, timeout_s: float,
                 connect_timeout_s: float, extra: str = "") -> None:
        self.name, self.ns, self.addr, self.env = name, ns, addr, env
        self.data_dir = tmp / f"data-{name}"
        self.socket = tmp / f"{name}.sock"
        self.log = tmp / f"daemon-{name}.log"
        self.config = tmp / f"{name}.toml"
        dram_toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in dram.items())
        self.config.write_text(textwrap.dedent(f"""
            [daemon]
            drain_timeout_s = 1.0
            [store]
            slot_bytes = {json.dumps(slot_bytes)}
            [dram]
            """) + dram_toml + textwrap.dedent(f"""
            [peers]
            enabled = true
            node = "{name}"
            host = "{addr}"
            port = {port}
            peers = {json.dumps(peers)}
            timeout_s = {timeout_s}
            connect_timeout_s = {connect_timeout_s}
            retry_s = 0.5
            """) + extra)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> "NetnsDaemon":
        """Start the daemon; returns once its log says it is ready (AssertionError otherwise)."""
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                in_netns(self.ns, sys.executable, "-m", "tierstore.daemon",
                         "--data-dir", str(self.data_dir), "--socket", str(self.socket),
                         "--config", str(self.config)),
                stdout=logf, stderr=logf, env=self.env, cwd=str(ROOT))
        deadline = time.monotonic() + timeout_s
        while "tierstore daemon ready" not in self.log_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"daemon {self.name} did not start: {self.log_text()}")
            time.sleep(0.05)
        return self

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 10 s), then remove its /dev/shm slab."""
        stop_daemon(self.proc, self.data_dir)
