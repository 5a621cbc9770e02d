"""SEC-26: the daemon's admin surface: who can reach it, what another uid can do through it, what
its replies and logs give away, and whether any input path can run code.

The daemon runs as its own process (``python -m tierstore.daemon``, as the test's uid). The
"second uid" is ``nobody`` (65534) through ``setpriv``; those tests need root and setpriv and
are skipped with the reason otherwise. Every TCP listener here is on 127.0.0.1 in the test's own
namespace and every connection is made to it; nothing else is dialled.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import daemon_support  # noqa: E402
from daemon_support import ENV, ROOT, DaemonProc  # noqa: E402

from tierstore.client.remote import RemoteClient  # noqa: E402
from tierstore.keys import Namespace  # noqa: E402

pytestmark = pytest.mark.timeout(120)

NOBODY = 65534
SECRET_HEX = "5e" * 8 + "c0ffee11" * 6           # 32 bytes, hex: the cluster secret (KEY-04)
CANARIES = {"AWS_SECRET_ACCESS_KEY": "awsCanary0SEC26xyz",    # credentials a node may hold in
            "ETCDCTL_PASSWORD": "etcdCanary0SEC26xyz",        # its environment; nothing of the
            "ETCD_PASSWORD": "etcdCanary1SEC26xyz"}           # daemon may echo them
NS = Namespace(model="m", block_size=16)
SLOT = 4096


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(path: Path, *, metrics: bool = False, peer_port: int = 0) -> Path:
    text = f"""
    [daemon]
    drain_timeout_s = 1.0
    [store]
    slot_bytes = {SLOT}
    [dram]
    capacity_blocks = 64
    """
    if metrics:
        text += """
    [metrics]
    enabled = true
    host = "127.0.0.1"
    port = 0
    """
    if peer_port:
        text += f"""
    [peers]
    enabled = true
    node = "self"
    host = "127.0.0.1"
    port = {peer_port}
    peers = ["other=127.0.0.1:{_free_port()}"]
    timeout_s = 1.0
    connect_timeout_s = 0.5
    retry_s = 0.2
    """
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def daemon(tmp_path):
    """Starts a daemon process; its socket lives in a fresh 0700 directory under /tmp (not
    under pytest's tmp_path, whose parents are 0700: uid 65534 could never reach it, which
    would make the widened-socket test vacuous)."""
    import tempfile

    procs = []
    sock_dir = Path(tempfile.mkdtemp(prefix="tierstore-sec26-"))

    def start(*, env: dict | None = None, **cfg) -> DaemonProc:
        d = DaemonProc(tmp_path / "data", sock_dir / "d.sock",
                       _config(tmp_path / "d.toml", **cfg))
        procs.append(d)
        if env:
            old = dict(daemon_support.ENV)
            daemon_support.ENV.update(env)
            try:
                d.start()
            finally:
                daemon_support.ENV.clear()
                daemon_support.ENV.update(old)
        else:
            d.start()
        return d
    yield start
    for d in procs:
        d.kill()
    shutil.rmtree(sock_dir, ignore_errors=True)


def _sockets(pid: int) -> tuple[list[tuple[str, str, str]], list[tuple[str, bool]]]:
    """The sockets process ``pid`` holds: inet ``(proto, local address, state hex)`` and unix
    ``(path, listening)``, read from /proc (its own network namespace's tables)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    inet = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/{pid}/net/{proto}") as f:
            for line in f.readlines()[1:]:
                p = line.split()
                if int(p[9]) in inodes:
                    inet.append((proto, _addr(p[1]), p[3]))
    unix = []
    with open(f"/proc/{pid}/net/unix") as f:
        for line in f.readlines()[1:]:
            p = line.split()
            if int(p[6]) in inodes:
                unix.append((p[7] if len(p) > 7 else "", bool(int(p[3], 16) & 0x10000)))
    return inet, unix


def _addr(hexaddr: str) -> str:
    host, port = hexaddr.split(":")
    if len(host) == 8:
        ip = socket.inet_ntop(socket.AF_INET, bytes.fromhex(host)[::-1])
    else:
        raw = bytes.fromhex(host)
        ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return f"{ip}:{int(port, 16)}"


def _loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0]
    return host.startswith("127.") or host == "::1"


# ----------------------------------------------------------------------------- (a) listeners
def test_sec26_default_daemon_listens_only_on_its_0600_unix_socket(daemon):
    """SEC-26 (a): a daemon with the default settings holds no TCP or UDP socket at all; its one
    listener is the Unix socket it was given, mode 0600 in a 0700 directory."""
    d = daemon()
    inet, unix = _sockets(d.proc.pid)
    assert inet == [], f"the default daemon holds inet sockets: {inet}"
    listening = [p for p, lst in unix if lst]
    assert listening == [str(d.socket)], unix
    assert d.socket.stat().st_mode & 0o777 == 0o600
    assert d.socket.parent.stat().st_mode & 0o777 == 0o700


def test_sec26_prometheus_is_opt_in_loopback_and_read_only(daemon):
    """SEC-26 (a): with ``[metrics] enabled`` the only inet listener is the metrics port on
    127.0.0.1; it answers GET with the exposition and refuses POST/PUT/DELETE (501), which
    change nothing (the daemon keeps serving, its blocks stay)."""
    d = daemon(metrics=True)
    c = RemoteClient.connect(d.socket)
    try:
        keys = c.keyer(NS).chain(list(range(32)))
        c.put(keys, NS, [b"x" * 100] * 2)
        url = c.stats()["daemon"]["metrics"]
        inet, _ = _sockets(d.proc.pid)
        listen = [a for proto, a, st in inet if proto.startswith("tcp") and st == "0A"]
        assert len(listen) == 1 and _loopback(listen[0]), inet
        assert not [x for x in inet if x[0].startswith("udp")], inet
        with urllib.request.urlopen(url, timeout=5) as r:
            assert b"tierstore_" in r.read()
        for method in ("POST", "PUT", "DELETE"):
            req = urllib.request.Request(url, data=b"evict=all", method=method)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=5)
            assert e.value.code in (405, 501), (method, e.value.code)
        assert c.lookup(keys, NS).num_blocks == 2 and d.alive()
    finally:
        c.close()


# ----------------------------------------------------------------------------- (b) another uid
_OTHER_UID_CLIENT = r"""
import json, socket, sys
from tierstore.protocol.codec import MsgType, encode_frame, read_frame, decode_body, FLAG_ERROR, pack_keys

path, port, verbs, keys_hex = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
keys = [bytes.fromhex(k) for k in keys_hex]
ns = {"model": "m", "block_size": 16}
bodies = {
    "LOOKUP": {"keys": pack_keys(keys), "ns": ns, "pin": True, "ttl_s": 600},
    "PIN": {"keys": pack_keys(keys), "ttl_s": 600, "session": "evil"},
    "UNPIN": {"keys": pack_keys(keys)},
    "EVICT": {"keys": pack_keys(keys)},
    "PREPARE_STORE": {"keys": pack_keys(keys), "ns": ns, "size": 10},
    "PREPARE_STORES": {"specs": [{"keys": pack_keys(keys), "ns": ns, "size": 10}]},
    "COMPLETE_STORE": {"job": 1, "ok": True},
    "COMPLETE_STORES": {"answers": [[1, True]]},
    "PREPARE_LOAD": {"keys": pack_keys(keys)},
    "PREPARE_LOADS": {"chains": [pack_keys(keys)]},
    "COMPLETE_LOAD": {"job": 1, "ok": True}, "COMPLETE_LOADS": {"jobs": [1], "ok": True},
    "POLL_LOADS": {"jobs": [1]}, "WAIT_LOAD": {"job": 1, "timeout_s": 0},
    "FETCH_REMOTE": {"keys": pack_keys(keys), "ns": ns},
    "FLUSH": {"timeout_s": 0}, "RELEASE": {"request": "r"}, "CHECK": {"fix": True},
    "BLOCKS": {"limit": 10}, "BLOCK": {"key": keys[0]}, "PEER_PING": {"peer": "127.0.0.1:1"},
    "PEERS": {"probe": True},
}
out = {"connect": None, "replies": {}}
def dial():
    if port:
        return socket.create_connection(("127.0.0.1", port), timeout=5)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(5); s.connect(path)
    return s
try:
    s = dial()
except OSError as e:
    out["connect"] = type(e).__name__
    print(json.dumps(out)); sys.exit(0)
for i, name in enumerate(verbs, 1):
    if port and i > 1:   # the peer port closes an unauthenticated connection after one reply
        s.close()
        s = dial()
    try:
        s.sendall(encode_frame(MsgType[name], i, bodies.get(name, {})))
        got = read_frame(s, 1 << 20)
    except OSError:
        got = None
    if got is None:
        out["replies"][name] = "closed"
        s.close()
        s = dial()
        continue
    hdr, raw = got
    body = decode_body(raw)
    out["replies"][name] = body.get("error", "?") if hdr.flags & FLAG_ERROR else "ok"
print(json.dumps(out))
"""


def _as_nobody(*args: str) -> dict:
    if os.geteuid() != 0:
        pytest.skip("switching to a second uid needs root (setpriv --reuid)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing: cannot run a client as another uid")
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
           sys.executable, "-c", _OTHER_UID_CLIENT, *args]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    if r.returncode != 0 and "Permission denied" in r.stderr and "import" in r.stderr.lower():
        pytest.skip(f"uid {NOBODY} cannot read this checkout or its Python: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


MUTATING = ["EVICT", "PIN", "UNPIN", "LOOKUP", "PREPARE_STORE", "PREPARE_STORES",
            "COMPLETE_STORE", "COMPLETE_STORES", "PREPARE_LOAD", "PREPARE_LOADS", "COMPLETE_LOAD",
            "COMPLETE_LOADS", "FETCH_REMOTE", "FLUSH", "RELEASE", "CHECK", "SHUTDOWN"]
READING = ["HELLO", "STATS", "BLOCKS", "BLOCK", "POLL_LOADS", "WAIT_LOAD", "PEERS", "PEER_PING"]


def test_sec26_another_uid_cannot_use_the_unix_socket_even_when_it_is_widened(daemon):
    """SEC-26 (b): uid 65534 cannot connect to the daemon's socket (mode 0600, directory
    0700). With both widened by hand (0666 / 0755, an operator's mistake) it connects, but the
    daemon checks the caller's uid (SO_PEERCRED): every verb but PING — evict, pin, unpin,
    pinning lookups, store and load jobs, fetch, flush, release, check --fix, shutdown, and
    the reads — is answered AccessDenied, counted (``daemon.refused.uid``) and has no effect:
    the blocks stay, nothing is pinned, the daemon keeps running."""
    d = daemon()
    c = RemoteClient.connect(d.socket)
    try:
        keys = c.keyer(NS).chain(list(range(64)))
        c.put(keys, NS, [bytes([i]) * 200 for i in range(4)])
        args = (str(d.socket), "0", json.dumps(MUTATING + READING + ["PING"]),
                json.dumps([k.hex() for k in keys]))
        assert _as_nobody(*args)["connect"] == "PermissionError"
        os.chmod(d.socket.parent, 0o755)
        os.chmod(d.socket, 0o666)
        got = _as_nobody(*args)
        assert got["connect"] is None
        replies = got["replies"]
        assert {v: replies[v] for v in MUTATING + READING} == \
            {v: "AccessDenied" for v in MUTATING + READING}, replies
        assert replies["PING"] == "ok"
        assert d.alive()
        st = c.stats()
        assert st["daemon"]["refused"]["uid"] == len(MUTATING + READING)
        assert c.lookup(keys, NS).num_blocks == 4
        assert st["pins"] == 0 and st["pinned_blocks"] == 0 and st["pending_stores"] == 0
    finally:
        c.close()
    log = d.log_text()
    assert log.count(f"from uid {NOBODY}") == 1, log   # one line per connection, not per request


def test_sec26_another_uid_on_the_peer_port_gets_no_daemon_verb(daemon):
    """SEC-26 (b), TCP: with ``[peers]`` on (127.0.0.1), daemon verbs sent to the peer port
    without the cluster secret's HMAC handshake are refused before any of them runs
    (``auth_refused`` counts them); the blocks stay and the daemon keeps running."""
    port = _free_port()
    d = daemon(peer_port=port, env={"TIERSTORE_SECRET": SECRET_HEX})
    c = RemoteClient.connect(d.socket, secret=bytes.fromhex(SECRET_HEX))
    try:
        keys = c.keyer(NS).chain(list(range(64)))
        c.put(keys, NS, [bytes([i]) * 200 for i in range(4)])
        verbs = ["EVICT", "PIN", "CHECK", "SHUTDOWN"]
        got = _as_nobody(str(d.socket), str(port), json.dumps(verbs),
                         json.dumps([k.hex() for k in keys]))
        assert got["connect"] is None
        assert all(r != "ok" for r in got["replies"].values()), got
        assert d.alive() and c.lookup(keys, NS).num_blocks == 4
        counters = c.peers()["counters"]
        assert counters["auth_refused"] >= len(verbs), counters
        assert counters.get("sessions", 0) == 0, counters
    finally:
        c.close()


# ----------------------------------------------------------------------------- (c) secrets
def test_sec26_no_reply_log_or_metric_carries_the_secret_or_credentials(daemon, tmp_path):
    """SEC-26 (c): a daemon with the cluster secret in ``$TIERSTORE_SECRET`` and credentials in
    its environment (AWS, etcd) answers HELLO, STATS, BLOCKS, BLOCK, CHECK, PEERS (probing),
    PEER_PING and the metrics endpoint, and ``tierstore config show --json`` runs in the same
    environment: none of them, nor the daemon's log, contains the secret (hex, raw or its
    base64) or any credential."""
    import base64

    port = _free_port()
    d = daemon(metrics=True, peer_port=port,
               env=dict(CANARIES, TIERSTORE_SECRET=SECRET_HEX, TIERSTORE_DAEMON_LOG_LEVEL="debug"))
    secret = bytes.fromhex(SECRET_HEX)
    c = RemoteClient.connect(d.socket, secret=secret)
    texts = []
    try:
        keys = c.keyer(NS).chain(list(range(32)))
        c.put(keys, NS, [b"y" * 100] * 2)
        texts.append(repr(c.info))
        texts.append(repr(c.stats()))
        texts.append(repr(c.blocks(limit=10)))
        texts.append(repr(c.block(keys[0])))
        texts.append(repr(c.check()))
        texts.append(repr(c.peers(probe=True)))
        try:
            texts.append(repr(c.peer_ping("other")))
        except Exception as e:   # the member is not running: the error text counts too
            texts.append(repr(e))
        with urllib.request.urlopen(c.stats()["daemon"]["metrics"], timeout=5) as r:
            texts.append(r.read().decode())
    finally:
        c.close()
    cli = subprocess.run([sys.executable, "-m", "tierstore_admin.app", "config", "show", "--json",
                          "--data-dir", str(d.data_dir), "--config", str(d.config)],
                         env=dict(ENV, **CANARIES, TIERSTORE_SECRET=SECRET_HEX),
                         capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    texts += [cli.stdout, cli.stderr]
    d.terminate()
    texts.append(d.log.read_text(errors="replace"))
    blob = "\n".join(texts)
    assert cli.returncode == 0, cli.stderr
    forbidden = {"secret hex": SECRET_HEX, "secret HEX": SECRET_HEX.upper(),
                 "secret b64": base64.b64encode(secret).decode(),
                 "secret raw": secret.decode("latin-1"), **CANARIES}
    leaked = [name for name, v in forbidden.items() if v in blob]
    assert not leaked, f"leaked into replies/logs: {leaked}"
    secret_file = d.data_dir / "secret"
    assert not secret_file.exists() or secret_file.stat().st_mode & 0o777 == 0o600


# ----------------------------------------------------------------------------- (d) code exec
PACKAGES = ("tierstore", "admin", "plugins")
_BANNED_CALLS = {"exec", "eval", "compile", "__import__"}
_BANNED_ATTRS = {("pickle", "loads"), ("pickle", "load"), ("pickle", "Unpickler"),
                 ("cPickle", "loads"), ("marshal", "loads"), ("marshal", "load"),
                 ("dill", "loads"), ("cloudpickle", "loads"), ("shelve", "open"),
                 ("yaml", "load"), ("yaml", "unsafe_load"), ("jsonpickle", "decode")}
_BANNED_METHODS = {"recv_pyobj", "recv_serialized", "loads_pyobj"}


def _code_exec_sites(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(
                node, ast.ImportFrom) and node.module else [])
            for n in names:
                if n.split(".")[0] in ("pickle", "cPickle", "marshal", "dill", "cloudpickle",
                                       "shelve", "jsonpickle"):
                    found.append(f"{path}:{node.lineno}: imports {n}")
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in _BANNED_CALLS:
            found.append(f"{path}:{node.lineno}: {f.id}()")
        elif isinstance(f, ast.Attribute):
            base = f.value.id if isinstance(f.value, ast.Name) else None
            if (base, f.attr) in _BANNED_ATTRS or f.attr in _BANNED_METHODS:
                found.append(f"{path}:{node.lineno}: {base}.{f.attr}()")
            if f.attr == "load" and base == "torch" and not any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                    and k.value.value is True for k in node.keywords):
                found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
            if base in ("msgpack",) and f.attr in ("unpackb", "Unpacker") and any(
                    k.arg in ("object_hook", "ext_hook", "list_hook") for k in node.keywords):
                found.append(f"{path}:{node.lineno}: msgpack with a decoding hook")
    return found


def test_sec26_no_code_execution_or_pickle_on_any_path():
    """SEC-26 (d): nothing in the shipped packages (tierstore/, admin/, plugins/) calls exec,
    eval, compile or __import__, imports pickle/marshal/dill/shelve, calls recv_pyobj, an
    unsafe yaml.load, torch.load without weights_only=True, or msgpack with decoding hooks:
    whatever reaches the daemon socket, the peer port, the events socket or the connector's
    kv_transfer_params is data, never code. (Custom policies load by ``module:Class`` from
    the operator's own settings, never from a request.)"""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found += _code_exec_sites(path)
    assert not found, "code-execution paths:\n" + "\n".join(found)


def test_sec26_the_source_scan_finds_what_it_bans(tmp_path):
    """SEC-26 (d): the scan above is not vacuous: each banned form in a sample file is found."""
    sample = tmp_path / "bad.py"
    sample.write_text(textwrap.dedent("""
        import pickle
        eval("1")
        exec("x = 1")
        pickle.loads(b"")
        sock.recv_pyobj()
        torch.load("f")
        torch.load("f", weights_only=True)
    """))
    found = _code_exec_sites(sample)
    assert len(found) == 6, found
