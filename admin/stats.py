"""``tierstore stats [--watch]``: counters and per-tier use, once or as a live view."""

from __future__ import annotations

from typing import Optional

import typer

from tierstore_admin.daemon import _health_line, watch_stats
from tierstore_admin.datadir import data_dir_option, open_client, socket_option
from tierstore_admin.output import JSON_HELP, emit, kv_table, table, user_errors


def stats_cmd(data_dir: Optional[str] = data_dir_option(),
              socket: Optional[str] = socket_option(),
              watch: bool = typer.Option(False, "--watch", help="Live view, refreshed every --interval."),
              interval_s: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between refreshes."),
              as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Store statistics: blocks, pins, per-tier use, counters."""
    with open_client(data_dir, socket) as client, user_errors():
        if watch:
            watch_stats(client.stats, interval_s=interval_s, as_json=as_json)
            return
        st = client.stats()
    emit({"store": socket or data_dir, **st}, as_json=as_json, human=_human)


def _human(console, r: dict) -> None:
    console.print(kv_table(f"stats of {r['store']}", [
        ("health", _health_line(r.get("health"))), ("blocks", r.get("blocks")), ("pinned blocks", r.get("pinned_blocks")),
        ("pins", r.get("pins")), ("pending stores", r.get("pending_stores")),
        ("pending loads", r.get("pending_loads"))]))
    console.print(table("tiers", ["tier", "slots", "used", "slot bytes"],
                        [(t["tier"], t["slots"], t["used_slots"], t["slot_bytes"]) for t in r["tiers"]]))
    console.print(table("counters", ["counter", "value"], sorted(r.get("counters", {}).items())))
