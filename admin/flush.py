"""``tierstore flush``: wait until every block stored so far has its NVMe copy.

The store writes NVMe copies behind the caller (tierstore/writebehind.py); ``flush`` returns once
every block accepted before it has its record written, synced and committed, through the daemon
(``--socket``) or on a data dir opened in this process (``--data-dir``; its DRAM starts empty, so
there is nothing to wait for). Exit 0 when every copy is written (also: no NVMe tier, nothing to
do); 1 when a write failed or ``--timeout`` ran out (``write_behind`` in the output says how many
blocks wait and how many failed); 2 usage; 3 no daemon answers.

With ``blocks evict --all --tier dram`` after it, a benchmark starts from NVMe only.
"""

from __future__ import annotations

import time
from typing import Optional

import typer

from tierstore_admin.datadir import data_dir_option, open_client, socket_option
from tierstore_admin.output import EXIT_FAILED, EXIT_OK, JSON_HELP, emit, fail, user_errors


def flush_cmd(data_dir: Optional[str] = data_dir_option(),
              socket: Optional[str] = socket_option(),
              timeout_s: Optional[float] = typer.Option(
                  None, "--timeout", help="Seconds to wait at most (default: until done)."),
              as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Wait until every stored block has its NVMe copy (write-behind drained)."""
    if timeout_s is not None and timeout_s < 0:
        fail("--timeout must not be negative")
    with open_client(data_dir, socket) as client, user_errors():
        t0 = time.monotonic()
        done = client.flush(timeout_s)
        waited = time.monotonic() - t0
        st = client.stats()
    has_nvme = any(t["tier"] == "nvme" for t in st.get("tiers", []))
    wb = st.get("write_behind") or {}
    result = {"store": socket or data_dir, "done": bool(done), "nvme": has_nvme,
              "waited_s": round(waited, 3), "write_behind": wb}
    emit(result, as_json=as_json, human=_human, code=EXIT_OK if done else EXIT_FAILED)


def _human(console, r: dict) -> None:
    if not r["nvme"]:
        console.print(f"{r['store']}: no NVMe tier, nothing to flush")
        return
    wb = r["write_behind"]
    if r["done"]:
        console.print(f"{r['store']}: every stored block has its NVMe copy "
                      f"(waited {r['waited_s']:.2f} s)")
    else:
        console.print(f"{r['store']}: not flushed after {r['waited_s']:.2f} s: "
                      f"{wb.get('queued_blocks', '?')} block(s) still queued, "
                      f"{wb.get('failed_blocks', '?')} write(s) failed so far")
