"""SEC-28: a request's ``kv_transfer_params`` cannot steer tierstore's outbound connections.

Peers are dialled only by the node's daemon, at its membership's addresses, after the
cluster-secret handshake. The connector's P/D params are a ticket MACed by the producer under
the cluster secret and bound to the prompt (backend.ticket_mac); params that are not a genuine
ticket for the prompt are dropped before anything is looked up or fetched for them
(``pd_tickets_rejected``) and the request is served as one without them.

The first tests run the consumer's scheduler side on an embedded store with a recording fake
side client (no network). The last one runs a real daemon and the consumer inside a network
namespace the test creates, with canary listeners on 169.254.169.254:80, 127.0.0.1:2379 and on
the one static peer's address, and a Python audit hook that records every ``connect`` and
``getaddrinfo`` of that process; nothing is dialled from the root namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tierstore.client import Client
from tierstore.config import DramConfig, StoreConfig
from tierstore.store import Store
from tierstore_plugins.vllm.backend import Geometry, ticket_mac
from tierstore_plugins.vllm.metadata import PluginSettings
from tierstore_plugins.vllm.scheduler_side import PeerFetcher, SchedulerSide

ROOT = Path(__file__).resolve().parents[2]
BS = 16
GEO = Geometry(model="m", revision="", kv_dtype="bfloat16", num_layers=2, num_kv_heads=2,
               head_size=16, use_mla=False, block_size=BS, tp_size=1, pp_size=1)
SECRET = bytes.fromhex("28" * 32)
TOKENS = list(range(1, 3 * BS + 6))          # 3 full blocks + a 5-token tail


@dataclass
class Req:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: object = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class RecordingSideClient:
    """The consumer's side connection to its daemon: records every fetch; fetches nothing."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def fetch_remote(self, keys, ns, **kw):
        self.calls.append("fetch_remote")
        return {"n": 0, "fetched": 0, "sources": {}, "errors": [], "promised": 0,
                "failed": False}

    def unpin(self, keys, **kw):
        self.calls.append("unpin")

    def close(self):
        self.calls.append("close")


def _consumer(full_blocks_local: bool = True):
    cfg = StoreConfig(slot_bytes=GEO.namespace(0).block_bytes, dram=DramConfig(capacity_blocks=64))
    client = Client(Store.open(cfg), secret=SECRET)
    side = SchedulerSide(client, GEO, PluginSettings(socket="/unused", fetch_from_peers=True,
                                                     peer_fetch_timeout_s=1.0),
                         role="kv_consumer", engine_id="c")
    fake = RecordingSideClient()
    side.fetcher = PeerFetcher(lambda: fake, ttl_s=60.0)
    if full_blocks_local:
        ns = GEO.namespace(0)
        keys = client.keyer(ns).chain(TOKENS)
        client.put(keys[:3], ns, [bytes([i]) * ns.block_bytes for i in range(3)])
    return side, fake, client


def genuine(side: SchedulerSide, tokens=TOKENS, secret: bytes = SECRET, **over) -> dict:
    """Params as a producer holding ``secret`` issues them for a prompt of ``tokens``."""
    p = {"version": 2, "transfer_id": "prod/r1", "namespace": side.ns_digest, "block_size": BS,
         "num_prompt_tokens": len(tokens), "tail_tokens": len(tokens) % BS}
    p.update(over)
    return dict(p, mac=ticket_mac(secret, p, tokens))


def forged_params(side: SchedulerSide) -> dict[str, object]:
    """kv_transfer_params a client may send; none of them is a genuine ticket for TOKENS."""
    g = genuine(side)
    addr = {"remote_host": "169.254.169.254", "remote_port": 80}
    return {
        "metadata service in tierstore's params": {"tierstore": dict(g, **addr)},
        "etcd as a peer": {"tierstore": dict(g, peer="127.0.0.1:2379",
                                             peers=["127.0.0.1:2379"])},
        "unknown host": {"tierstore": dict(g, remote_host="canary-unknown.invalid",
                                           remote_port=7470)},
        "genuine peer, forged mac": {"tierstore": dict(g, transfer_id="genuine/r9",
                                                       mac=uuid.uuid4().hex * 2)},
        "no mac": {"tierstore": {k: v for k, v in g.items() if k != "mac"}},
        "another secret": {"tierstore": genuine(side, secret=b"x" * 32)},
        "ticket of another prompt": {"tierstore": genuine(side, tokens=TOKENS[:-1] + [999],
                                                          num_prompt_tokens=len(TOKENS))},
        "altered after signing": {"tierstore": dict(g, tail_tokens=4)},
        "poisoning a producer": {"tierstore": dict(g, version=99)},
        "not a map": {"tierstore": ["169.254.169.254", 80]},
    }


def test_sec28_forged_params_are_rejected_counted_and_fetch_nothing():
    """SEC-28: every kind of client-made params (addresses inside tierstore's params, a peer or
    etcd endpoint, an unknown host, a forged/missing/foreign mac, a genuine ticket replayed on
    another prompt or altered) is rejected before anything is fetched: no fetch_remote,
    ``pd_tickets_rejected`` counts each, no producer is refused on their account, and the
    request is served from the local prefix like one without params (3 full blocks)."""
    side, fake, _ = _consumer()
    cases = forged_params(side)
    for i, (what, params) in enumerate(cases.items()):
        req = Req(f"r{i}", TOKENS, params)
        n, is_async = side.get_num_new_matched_tokens(req, 0)
        assert (n, is_async) == (3 * BS, False), what
        side.request_finished(req, [])
    assert side.counters["pd_tickets_rejected"] == len(cases)
    assert side.counters["peer_fetches"] == 0 and fake.calls == []
    assert side.refused_producers == {} and side.counters["pd_producers_refused"] == 0
    side.shutdown()


def test_sec28_top_level_addresses_are_never_read():
    """SEC-28: other connectors' topology fields at the top of kv_transfer_params (a NIXL-style
    remote_host/remote_port, here the metadata service) with no tierstore ticket: tierstore
    reads none of them; the request is a plain one (no fetch, its local prefix loads)."""
    side, fake, _ = _consumer()
    req = Req("t", TOKENS, {"remote_host": "169.254.169.254", "remote_port": 80,
                            "remote_engine_id": "x", "do_remote_prefill": True})
    assert side.get_num_new_matched_tokens(req, 0) == (3 * BS, False)
    assert fake.calls == [] and side.counters["pd_tickets_rejected"] == 0
    side.shutdown()


def test_sec28_a_genuine_ticket_is_accepted_and_drives_the_tail_fetch():
    """SEC-28, the control: the same consumer accepts a genuine ticket (the producer's own
    params from request_finished verify too) and only then asks its daemon to fetch the tail
    it lacks — which shows the rejections above are what kept the fetch from happening."""
    side, fake, client = _consumer()
    req = Req("g", TOKENS, {"tierstore": genuine(side)})
    assert side._pd_params(req) is not None
    import time
    deadline = time.monotonic() + 10
    while side.get_num_new_matched_tokens(req, 0)[0] is None and time.monotonic() < deadline:
        time.sleep(0.01)   # the fetch runs on the fetcher's thread
    assert "fetch_remote" in fake.calls and side.counters["pd_tickets_rejected"] == 0
    prod = SchedulerSide(client, GEO, PluginSettings(), role="kv_producer", engine_id="p")
    preq = Req("p1", TOKENS)
    prod._state(preq)
    _, params = prod.request_finished(preq, [])
    assert params and side._pd_params(Req("x", TOKENS, params)) is not None
    assert side._pd_params(Req("y", TOKENS[:-1] + [7], params)) is None   # another prompt
    side.shutdown()
    prod.shutdown()


# ---------------------------------------------------------------------------- canaries in a netns
_NETNS_SCRIPT = r"""
import json, socket, sys, threading, time
sys.path.insert(0, sys.argv[1] + "/tests/plugins")
events = []
def audit(name, args):
    if name == "socket.connect":
        addr = args[1]
        if isinstance(addr, tuple):
            events.append(["connect", str(addr[0]), int(addr[1])])
    elif name == "socket.getaddrinfo":
        events.append(["getaddrinfo", str(args[0]), str(args[1])])
sys.addaudithook(audit)

accepted = {}
def canary(host, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(16)
    key = f"{host}:{port}"; accepted[key] = 0
    def run():
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            accepted[key] += 1
            c.close()
    threading.Thread(target=run, daemon=True).start()
for h, p in (("169.254.169.254", 80), ("127.0.0.1", 2379), ("127.0.0.1", 7470)):
    canary(h, p)

import test_vllm_pd_tickets as T
from tierstore.daemon.server import DaemonServer
from tierstore.settings import load_settings
from tierstore.client.remote import RemoteClient
from tierstore_plugins.vllm.metadata import PluginSettings
from tierstore_plugins.vllm.scheduler_side import SchedulerSide

tmp = sys.argv[2]
cfg = tmp + "/d.toml"
open(cfg, "w").write('''
[daemon]
drain_timeout_s = 1.0
[store]
slot_bytes = %d
[dram]
capacity_blocks = 64
[peers]
enabled = true
node = "consumer"
host = "127.0.0.1"
port = 7471
peers = ["genuine=127.0.0.1:7470"]
timeout_s = 1.0
connect_timeout_s = 0.5
retry_s = 0.2
''' % T.GEO.namespace(0).block_bytes)
st = load_settings(cfg, env={}, data_dir=tmp + "/data", socket=tmp + "/d.sock")
d = DaemonServer(st); d.start(); d.run_in_thread()
client = RemoteClient.connect(tmp + "/d.sock")
ns = T.GEO.namespace(0)
keys = client.keyer(ns).chain(T.TOKENS)
client.put(keys[:3], ns, [bytes([i]) * ns.block_bytes for i in range(3)])
side = SchedulerSide(client, T.GEO, PluginSettings(socket=tmp + "/d.sock", fetch_from_peers=True,
                                                    peer_fetch_timeout_s=3.0),
                     role="kv_consumer", engine_id="c")

def ask(req):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        n, _ = side.get_num_new_matched_tokens(req, 0)
        if n is not None:
            side.request_finished(req, [])
            return n
        time.sleep(0.02)
    return None

out = {"answers": {}}
cases = T.forged_params(side)
for i, (what, params) in enumerate(cases.items()):
    out["answers"][what] = ask(T.Req(f"r{i}", T.TOKENS, params))
out["answers"]["top-level"] = ask(T.Req("t", T.TOKENS, {"remote_host": "169.254.169.254",
                                                         "remote_port": 80}))
time.sleep(0.3)
out["accepted"] = dict(accepted)
out["events"] = [e for e in events if not (e[0] == "connect" and e[1].startswith("/"))]
out["rejected"] = side.counters["pd_tickets_rejected"]
out["fetches"] = side.counters["peer_fetches"]
# the control: a genuine ticket whose tail is not local makes the daemon dial its member
out["control_answer"] = ask(T.Req("g", T.TOKENS, {"tierstore": T.genuine(side)}))
time.sleep(0.3)
out["control_accepted"] = dict(accepted)
out["control_events"] = events[len(out["events"]):]
side.shutdown(); client.close(); d.request_stop(); d.wait(10)
print("RESULT " + json.dumps(out))
"""


def test_sec28_canaries_see_no_connection_from_client_supplied_addresses(tmp_path):
    """SEC-28: a consumer (real daemon with one static peer, ``fetch_from_peers``) inside a
    network namespace made here, with canaries on 169.254.169.254:80, 127.0.0.1:2379 and the
    genuine peer's address 127.0.0.1:7470. Requests whose kv_transfer_params name the metadata
    service, etcd, an unknown host, or the genuine peer with a forged ticket (and the other
    forgeries above): every canary accepts 0 connections, the process connects to and resolves
    nothing on the network, each is rejected (``pd_tickets_rejected``) and served from the
    local prefix. Then a genuine ticket (tail not local) makes the daemon dial its member: the
    canary sees it, so the zero above is a real zero."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 missing: cannot make a network namespace for the canaries")
    ns = f"tsec28{os.getpid() % 100000}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        pytest.skip("cannot create network namespaces (needs root)")
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        subprocess.run(["ip", "-n", ns, "addr", "add", "169.254.169.254/32", "dev", "lo"],
                       check=True, timeout=10)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   TIERSTORE_SECRET=SECRET.hex())
        env.pop("TIERSTORE_SECRET_FILE", None)
        env.pop("TIERSTORE_CONFIG", None)
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                            textwrap.dedent(_NETNS_SCRIPT), str(ROOT), str(tmp_path)],
                           env=env, capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    out = json.loads(line[0][7:])
    assert out["accepted"] == {"169.254.169.254:80": 0, "127.0.0.1:2379": 0,
                               "127.0.0.1:7470": 0}, out
    assert out["events"] == [], out["events"]
    assert set(out["answers"].values()) == {3 * BS}, out["answers"]
    assert out["rejected"] == len(out["answers"]) - 1 and out["fetches"] == 0
    assert out["control_accepted"]["127.0.0.1:7470"] >= 1, out
    assert out["control_answer"] == 3 * BS   # the fetch failed (a canary is no peer): recompute
