"""``tierstore tiers ls|usage``: the tiers of a store.

- ``ls``: what each tier is: slots, slot size, capacity, eviction policy, and for NVMe the
  write-behind queue (blocks waiting for their copy, unwritten bytes and the bound, failed writes).
- ``usage``: how full each tier is: blocks, slots used, bytes used of the capacity.
"""

from __future__ import annotations

from typing import Optional

import typer

from tierstore.units import format_bytes
from tierstore_admin.datadir import data_dir_option, open_client, socket_option
from tierstore_admin.output import JSON_HELP, emit, table, user_errors

app = typer.Typer(help="Tiers of a store (dram, nvme): ls, usage.", no_args_is_help=True)


@app.command("ls")
def ls(data_dir: Optional[str] = data_dir_option(),
       socket: Optional[str] = socket_option(),
       as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Each tier: slots, slot size, capacity, eviction policy; NVMe's write-behind queue."""
    with open_client(data_dir, socket) as client, user_errors():
        st = client.stats()
    policies = st.get("policies", {})
    wb = st.get("write_behind")
    tiers = []
    for t in st["tiers"]:
        row = {"tier": t["tier"], "slots": t["slots"], "slot_bytes": t["slot_bytes"],
               "capacity_bytes": t["capacity_bytes"], "policy": policies.get(t["tier"])}
        if t["tier"] == "nvme":
            row.update(direct_io=t.get("direct_io"), compression=t.get("compression"),
                       write_behind=wb)
        tiers.append(row)
    emit({"store": socket or data_dir, "tiers": tiers}, as_json=as_json, human=_human_ls)


@app.command("usage")
def usage(data_dir: Optional[str] = data_dir_option(),
          socket: Optional[str] = socket_option(),
          as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Capacity and use of every tier."""
    with open_client(data_dir, socket) as client, user_errors():
        tiers = client.usage()
    emit({"store": socket or data_dir, "tiers": tiers}, as_json=as_json, human=_human)


def _wb_text(wb: Optional[dict]) -> str:
    if not wb:
        return "-"
    return (f"{wb['queued_blocks']:,} queued, {format_bytes(wb['unwritten_bytes'])} unwritten of "
            f"{format_bytes(wb['max_queue_bytes'])}, {wb['failed_blocks']:,} failed")


def _human_ls(console, r: dict) -> None:
    console.print(table(f"tiers of {r['store']}",
                        ["tier", "slots", "slot", "capacity", "policy", "write-behind"],
                        [(t["tier"], t["slots"], format_bytes(t["slot_bytes"]),
                          format_bytes(t["capacity_bytes"]), t["policy"],
                          _wb_text(t.get("write_behind")) if t["tier"] == "nvme" else "-")
                         for t in r["tiers"]]))


def _human(console, r: dict) -> None:
    console.print(table(f"tiers of {r['store']}",
                        ["tier", "blocks", "slots used / total", "slot", "used", "capacity"],
                        [(t["tier"], t.get("blocks"), f"{t['used_slots']:,} / {t['slots']:,}",
                          format_bytes(t["slot_bytes"]), format_bytes(t["used_bytes"]),
                          format_bytes(t["capacity_bytes"])) for t in r["tiers"]]))
