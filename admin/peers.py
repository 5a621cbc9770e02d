"""``tierstore peers ls|ping``: the daemon's view of the other nodes (through ``--socket``).

- ``ls``: per peer its name, address, the transport in use (tcp / rdma; case XFER-15), state
  (``up``, ``down`` with the last error, ``idle`` = not contacted yet), control RPC latency,
  bytes and blocks pulled, failures. By default idle and retry-due peers are dialled first
  (``--no-probe`` shows only what the daemon already knows, without any network traffic).
- ``ping NAME|HOST:PORT``: one authenticated round trip from the daemon to that peer;
  exit 1 when it fails (refused, wrong cluster secret, no common transport).

Exit codes: 0 ok, 1 failed, 2 usage (also: peers not enabled on that daemon), 3 no daemon.
A thin shell: parse, one client call, one output call (tierstore_admin.output).
"""

from __future__ import annotations

from typing import Optional

import typer

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
                                      help="Dial peers not contacted yet (or due a retry) first."),
           as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Peers of the daemon: transport, state, latency, bytes moved, failures."""
    client = _client(socket)
    with client, user_errors():
        r = client.peers(probe=probe)
    emit(r, as_json=as_json, human=_human_ls)


@app.command("ping")
def ping_cmd(peer: str = typer.Argument(..., metavar="NAME|HOST:PORT",
                                        help="A peer's name or address."),
             socket: Optional[str] = socket_option(),
             as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """One authenticated round trip from the daemon to a peer."""
    client = _client(socket)
    with client, user_errors():
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
                          p["failures"], p["last_error"] or "-") for p in r.get("peers", [])]))


def _human_ping(console, r: dict) -> None:
    console.print(f"{r['name']} ({r['address']}, node {r['node']}) via {r['transport']}: "
                  f"{r['rtt_ms']:.3f} ms")
