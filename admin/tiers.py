"""``tierstore tiers usage``: slots and bytes used per tier of a data directory."""

from __future__ import annotations

from typing import Optional

import typer

from tierstore.units import format_bytes
from tierstore_admin.datadir import data_dir_option, open_client, socket_option
from tierstore_admin.output import JSON_HELP, emit, table, user_errors

app = typer.Typer(help="Tiers of a store (dram, nvme).", no_args_is_help=True)


@app.command("usage")
def usage(data_dir: Optional[str] = data_dir_option(),
          socket: Optional[str] = socket_option(),
          as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Capacity and use of every tier."""
    with open_client(data_dir, socket) as client, user_errors():
        tiers = client.usage()
    emit({"store": socket or data_dir, "tiers": tiers}, as_json=as_json, human=_human)


def _human(console, r: dict) -> None:
    console.print(table(f"tiers of {r['store']}",
                        ["tier", "blocks", "slots used / total", "slot", "used", "capacity"],
                        [(t["tier"], t.get("blocks"), f"{t['used_slots']:,} / {t['slots']:,}",
                          format_bytes(t["slot_bytes"]), format_bytes(t["used_bytes"]),
                          format_bytes(t["capacity_bytes"])) for t in r["tiers"]]))
