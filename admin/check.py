"""``tierstore check [--fix]``: verify a data directory (index, pins, every NVMe record).

Exit 0 when clean, or when ``--fix`` repaired every problem it found (the output lists what was
found and ``remaining``: none); 1 when problems are left (found without ``--fix``, or still there
after it).
"""

from __future__ import annotations

from typing import Optional

import typer

from tierstore_admin.datadir import data_dir_option, open_client, socket_option
from tierstore_admin.output import EXIT_FAILED, EXIT_OK, JSON_HELP, emit, user_errors


def check_cmd(data_dir: Optional[str] = data_dir_option(),
              socket: Optional[str] = socket_option(),
              fix: bool = typer.Option(False, "--fix", help="Repair what can be repaired "
                                       "(drop bad records, free orphans)."),
              as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Check the store's invariants and every record's header and checksum."""
    with open_client(data_dir, socket) as client, user_errors():
        problems = client.check(fix=fix)
        remaining = client.check(fix=False) if fix and problems else problems
    result = {"store": socket or data_dir, "clean": not problems, "problems": problems,
              "fixed": bool(fix and problems), "remaining": remaining}
    emit(result, as_json=as_json, human=_human, code=EXIT_FAILED if remaining else EXIT_OK)


def _human(console, r: dict) -> None:
    if r["clean"]:
        console.print(f"{r['store']}: clean")
        return
    console.print(f"{r['store']}: {len(r['problems'])} problem(s)")
    for p in r["problems"]:
        console.print(f"  - {p}", markup=False, highlight=False)
    if r["fixed"]:
        console.print(f"after --fix: {len(r['remaining'])} remaining")
        for p in r["remaining"]:
            console.print(f"  - {p}", markup=False, highlight=False)
