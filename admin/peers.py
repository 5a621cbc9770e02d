"""``tierstore peers ls|ping``: the daemon's view of the other nodes (through ``--socket``).

- ``ls``: per peer its name, address, the transport in use (tcp / rdma; case XFER-15), state
  (``up``, ``down`` with the last error, ``idle`` = not contacted yet), control RPC latency,
  bytes and blocks pulled, failures. By default every peer that is idle or down is dialled
  first (a peer that came up a moment ago shows ``up``, not the ``down`` of a dial that failed
  before it listened); ``--no-probe`` shows only what the daemon already knows, without any
  network traffic.
- ``ping NAME|HOST:PORT``: one authenticated round trip from the daemon to that peer;
  exit 1 when it fails (refused, wrong cluster secret, no common transport); a name that is not
  a peer of the daemon is a usage error (exit 2) that lists the known names.

Exit codes: 0 ok, 1 failed, 2 usage (also: peers not enabled on that daemon), 3 no daemon.
A thin shell: parse, one client call, one output call (tierstore_admin.output).
"""

from __future__ import annotations

import difflib
from typing import Optional

import typer

from tierstore.errors import TierStoreError
from tierstore.units import format_bytes
from tierstore_admin.datadir import socket_option
from tierstore_admin.output import JSON_HELP, emit, fail, kv_table, table, user_errors

app = typer.Typer(help="Other nodes' daemons (ls, ping).", no_args_is_help=True)


def _client(socket: Optional[str]):
    if not socket:
        fail("peers are a daemon feature: pass --socket or set TIERSTORE_SOCKET")
    from tierstore.client import open_client

    with user_errors():
        return open_client(socket=socket, timeout_s=5.0)


@app.command("ls")
def ls_cmd(socket: Optional[str] = socket_option(),
           probe: bool = typer.Option(True, "--probe/--no-probe",
                                      help="Dial peers that are idle or down first."),
           as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Peers of the daemon: transport, state, latency, bytes moved, failures."""
    client = _client(socket)
    with client, user_errors():
        r = client.peers(probe=probe)
        if probe:   # the daemon skips a peer that failed within retry_s: dial those again now
            down = [p["name"] for p in r.get("peers", []) if p["state"] == "down"]
            for name in down:
                try:
                    client.peer_ping(name)
                except TierStoreError:
                    pass   # still down: its state says why
            if down:
                r = client.peers(probe=False)
    emit(r, as_json=as_json, human=_human_ls)


@app.command("ping")
def ping_cmd(peer: str = typer.Argument(..., metavar="NAME|HOST:PORT",
                                        help="A peer's name or address."),
             socket: Optional[str] = socket_option(),
             as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """One authenticated round trip from the daemon to a peer."""
    client = _client(socket)
    with client, user_errors():
        if ":" not in peer:   # a name: it must be one of the daemon's peers
            names = [p["name"] for p in client.peers(probe=False).get("peers", [])]
            if peer not in names:
                close = difflib.get_close_matches(peer, names, n=1)
                fail(f"unknown peer {peer!r}" + (f" (did you mean {close[0]}?)" if close else "")
                     + (f"; peers of this daemon: {', '.join(names)}" if names
                        else "; this daemon has no peers")
                     + "; or give host:port")
        r = client.peer_ping(peer)
    emit(r, as_json=as_json, human=_human_ping)


def _human_ls(console, r: dict) -> None:
    console.print(kv_table(f"node {r['node']}", [
        ("listen", r.get("listen")), ("membership", r.get("membership")),
        ("transports offered", r.get("transports")),
        ("inbound sessions", len(r.get("serving", [])))]))
    console.print(table("peers", ["peer", "address", "transport", "state", "rpc ms", "bytes read",
                                  "blocks", "failures", "last error"],
                        [(p["name"], p["address"], p["transport"] or "-", p["state"],
                          p["avg_rpc_ms"], format_bytes(p["bytes_read"]), p["blocks_read"],
                          p["failures"], (p["last_error"] if p["state"] != "up" else None) or "-")
                         for p in r.get("peers", [])]))


def _human_ping(console, r: dict) -> None:
    console.print(f"{r['name']} ({r['address']}, node {r['node']}) via {r['transport']}: "
                  f"{r['rtt_ms']:.3f} ms")
