"""Peer transfer benchmark: ratios from one run, between two network namespaces.

    sudo PYTHONPATH=. python3 benchmarks/bench_peer.py [--blocks 128] [--reps 3]

1. TCP peer read of 2 MiB blocks (PeerClient.fetch: lookup+lease RPC, recv_into the DRAM slab)
   vs a raw socket transfer of the same bytes (one sendall / recv_into loop) between the same
   two namespaces. Goal >= 0.9x.
2. Batched lookup of an 8,192-block chain on a peer (one RPC): p50 ms. Goal < 5 ms.

Creates namespaces tsb<pid>a/b joined by one veth (169.254.x.1/.2, MTU 9000), runs both ends
inside them, deletes them at the end. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PID = os.getpid()
NET = 1 + (PID + 7) % 250

NODE = textwrap.dedent(r'''
    import json, socket, statistics, sys, time
    from tierstore.config import DramConfig, StoreConfig
    from tierstore.keys import Keyer, Namespace, load_secret
    from tierstore.store import Store
    from tierstore.transfer import PeerClient, PeerServer, PeerSettings
    a = json.loads(sys.argv[1])
    NS = Namespace(model="m", block_size=16)
    SEC = load_secret()
    MiB = 1 << 20
    nb, slot = a["blocks"], 2 * MiB
    st = PeerSettings(transports=("tcp",), timeout_s=10, streams=a.get("streams", 2))
    big = Store.open(StoreConfig(slot_bytes=slot, dram=DramConfig(capacity_blocks=nb)))
    small = Store.open(StoreConfig(slot_bytes=4096, dram=DramConfig(capacity_blocks=8192)))
    kb = Keyer(NS, SEC)
    big_keys = kb.chain(list(range(16 * nb)))
    chain = kb.chain(list(range(10**6, 10**6 + 16 * 8192)))
    if a["mode"] == "serve":
        big.put(big_keys, NS, [bytes([i % 251]) * slot for i in range(nb)])
        small.put(chain, NS, [b"x" * 64] * len(chain))
        s1 = PeerServer(big, SEC, node="A", host=a["host"], port=7800, settings=st); s1.start()
        s2 = PeerServer(small, SEC, node="A2", host=a["host"], port=7801, settings=st); s2.start()
        ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((a["host"], 7802)); ls.listen(4)
        print("READY", flush=True)
        buf = memoryview(big.tiers[list(big.tiers)[0]].buffer)[: nb * slot]
        for _ in range(a["reps"]):
            c, _ = ls.accept()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            c.sendall(buf); c.close()
        time.sleep(a.get("life", 60)); sys.exit(0)
    res = {"raw": [], "peer": [], "lookup_ms": []}
    dst = memoryview(big.tiers[list(big.tiers)[0]].buffer)[: nb * slot]
    for _ in range(a["reps"]):
        s = socket.create_connection((a["peer"], 7802))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        t0 = time.perf_counter(); got = 0
        while got < len(dst):
            k = s.recv_into(dst[got:])
            if not k: break
            got += k
        res["raw"].append(got / (time.perf_counter() - t0) / 2**30); s.close()
    c = PeerClient(big, SEC, node="B", settings=st)
    for _ in range(a["reps"]):
        big.evict(big_keys)
        t0 = time.perf_counter(); n = c.fetch((a["peer"], 7800), big_keys, NS)
        res["peer"].append(n * slot / (time.perf_counter() - t0) / 2**30)
    c2 = PeerClient(small, SEC, node="B2", settings=st)
    for _ in range(60):
        t0 = time.perf_counter(); n = c2.lookup((a["peer"], 7801), chain, NS)
        res["lookup_ms"].append((time.perf_counter() - t0) * 1e3)
    res["lookup_hit"] = n
    res["lookup_ms"] = res["lookup_ms"][10:]
    print("RESULT " + json.dumps(res), flush=True)
''')


def ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--streams", type=int, default=2)
    o = ap.parse_args()
    na, nb = f"tsb{PID}a", f"tsb{PID}b"
    addr_a, addr_b = f"169.254.{NET}.1", f"169.254.{NET}.2"
    made = []
    env = dict(os.environ, PYTHONPATH=str(ROOT), TIERSTORE_SECRET="cd" * 32)
    procs = []
    try:
        for n in (na, nb):
            ip("netns", "add", n)
            made.append(n)
        ip("link", "add", f"tsbv{PID % 100000}a", "type", "veth", "peer", "name", f"tsbv{PID % 100000}b")
        for n, dev, ad in ((na, f"tsbv{PID % 100000}a", addr_a), (nb, f"tsbv{PID % 100000}b", addr_b)):
            ip("link", "set", dev, "netns", n)
            ip("-n", n, "addr", "add", f"{ad}/30", "dev", dev)
            ip("-n", n, "link", "set", dev, "mtu", "9000")
            ip("-n", n, "link", "set", dev, "up")
            ip("-n", n, "link", "set", "lo", "up")
        args = {"blocks": o.blocks, "reps": o.reps, "streams": o.streams}

        def spawn(ns, extra):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", NODE,
                                  json.dumps({**args, **extra})], stdout=subprocess.PIPE,
                                 text=True, env=env)
            procs.append(p)
            return p

        srv = spawn(na, {"mode": "serve", "host": addr_a})
        assert srv.stdout.readline().startswith("READY")
        cl = spawn(nb, {"mode": "fetch", "peer": addr_a})
        line = ""
        while not line.startswith("RESULT"):
            line = cl.stdout.readline()
            if not line:
                raise SystemExit("client failed")
        r = json.loads(line[len("RESULT "):])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        for n in made:
            ip("netns", "del", n, check=False)
    import statistics as S
    raw, peer = S.median(r["raw"]), S.median(r["peer"])
    p50 = S.median(r["lookup_ms"])
    rows = [
        ("raw socket, 2 MiB blocks x %d (GiB/s, median of %d)" % (o.blocks, o.reps), f"{raw:.2f}", ""),
        ("TCP peer read, same bytes (GiB/s)", f"{peer:.2f}", ""),
        ("  ratio peer / raw", f"{peer / raw:.2f}x", "goal >= 0.9x"),
        ("batched lookup, 8,192-block chain, p50 ms (hit %d)" % r["lookup_hit"], f"{p50:.2f}",
         "goal < 5 ms"),
        ("  p90 ms", f"{sorted(r['lookup_ms'])[int(len(r['lookup_ms']) * 0.9)]:.2f}", ""),
    ]
    w = max(len(a) for a, _, _ in rows)
    print(f"{'measure'.ljust(w)}  {'value':>8}  note")
    for a, b, c in rows:
        print(f"{a.ljust(w)}  {b:>8}  {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
