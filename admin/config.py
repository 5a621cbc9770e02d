"""``tierstore config show``: every daemon setting's effective value and where it came from.

Reads what ``tierstore daemon start`` would read (``--config`` / ``$TIERSTORE_CONFIG``, the
``TIERSTORE_*`` environment, the ``--data-dir`` / ``--socket`` flags) and prints one row per key of
:data:`tierstore.settings.KEYS`: value, source (``default``, ``file``, ``env``, ``flag``, or
``data dir`` where an existing data dir's ``store.json`` decides) and the environment variable
that sets it. With an existing data dir it also says which explicit settings the daemon would
apply to it, or the refusal it would give (exit 2). Warnings (keys that cannot apply) go to
stderr. Exit 0, or 2 when the settings are invalid (the same one-line error as ``daemon start``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from tierstore.errors import ConfigError
from tierstore.settings import bytes_text as _bytes_text, describe, load_values, reconcile_store, settings_from
from tierstore_admin.output import (EXIT_OK, EXIT_USAGE, JSON_HELP, emit, fail, message, table)

app = typer.Typer(help="Daemon settings (show).", no_args_is_help=True)


@app.command("show")
def show(config: Optional[str] = typer.Option(None, "--config", envvar="TIERSTORE_CONFIG",
                                              help="TOML settings file."),
         data_dir: Optional[str] = typer.Option(None, "--data-dir", help="As for `daemon start` "
                                                "(also $TIERSTORE_DATA_DIR)."),
         socket: Optional[str] = typer.Option(None, "--socket", help="As for `daemon start` "
                                              "(also $TIERSTORE_SOCKET)."),
         as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Every setting: effective value, source (default, file, env, flag, data dir), env name."""
    try:
        loaded = load_values(config, flags={"data_dir": data_dir, "socket": socket})
        settings = settings_from(loaded)
    except ConfigError as e:
        fail(str(e), EXIT_USAGE)
    rows = describe(loaded)
    dd = _data_dir(settings, rows)
    for w in settings.warnings:
        message("warning: " + w)
    nvme_rows = [x for x in rows if x["section"] == "nvme" and x["key"] == "capacity"]
    nvme_tier = settings.store.nvme is not None or (
        bool(dd) and nvme_rows[0]["source"] == "data dir" and str(nvme_rows[0]["value"]) != "0")
    result = {"config_file": loaded.config_file, "keys": rows, "warnings": list(settings.warnings),
              "nvme_tier": nvme_tier, "data_dir": dd}
    code = EXIT_USAGE if dd and dd.get("refused") else EXIT_OK
    if code:
        message("error: " + dd["refused"])
    emit(result, as_json=as_json, human=_human, code=code)


def _data_dir(settings, rows: list[dict]) -> dict | None:
    """What an existing data dir's store.json decides, and what the daemon would change."""
    if not settings.data_dir:
        return None
    d = Path(settings.data_dir)
    f = d / "store.json"
    if not f.is_file():
        return {"path": str(d), "exists": False}
    from tierstore.datadir import config_from_json

    try:
        stored = config_from_json(json.loads(f.read_text()))
    except (ConfigError, ValueError, OSError) as e:
        return {"path": str(d), "exists": True, "refused": f"{f} cannot be read: {e}"}
    out: dict[str, Any] = {"path": str(d), "exists": True, "applied": [], "refused": None}
    try:
        cfg, out["applied"] = reconcile_store(stored, settings, d.absolute())
    except ConfigError as e:
        out["refused"] = str(e)
        cfg = stored
    eff = _store_values(cfg)
    for r in rows:   # store.json decides every store key that no file, env or flag sets
        dotted = f"{r['section']}.{r['key']}"
        if dotted in eff and r["source"] == "default":
            r["value"], r["source"], r["origin"] = eff[dotted], "data dir", str(f)
    return out


def _store_values(cfg) -> dict[str, Any]:
    """The settings keys a StoreConfig decides, as values of those keys."""
    v: dict[str, Any] = {"store.slot_bytes": cfg.slot_bytes, "store.exclusive": cfg.exclusive,
                         "dram.capacity": f"{cfg.dram.capacity_blocks}blocks",
                         "dram.policy": cfg.dram.policy}
    n = cfg.nvme
    v["nvme.capacity"] = f"{n.capacity_blocks}blocks" if n else 0
    if n is not None:
        v.update({"nvme.path": n.path, "nvme.policy": n.policy, "nvme.admission": n.admission,
                  "nvme.write_queue": n.write_queue_bytes, "nvme.direct_io": n.direct_io,
                  "nvme.compression": n.compression, "nvme.file_slots": n.file_slots})
    return v


def _value(v: Any, kind: str = "") -> str:
    if v is None or v == "":
        return "unset"
    if kind == "size" and isinstance(v, int) and not isinstance(v, bool):
        return _bytes_text(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return json.dumps(v)
    return str(v)


def _human(console, r: dict) -> None:
    def src(row: dict) -> str:
        return row["source"] if row["source"] == "default" else f"{row['source']} ({row['origin']})"

    console.print(table(f"settings (file: {r['config_file'] or 'none'})",
                        ["key", "value", "source", "environment"],
                        [(f"[{x['section']}] {x['key']}", _value(x["value"], x["kind"]), src(x),
                          x["env"])
                         for x in r["keys"]]))
    if not r["nvme_tier"]:   # CFG-35: say why the disk tier stays empty
        console.print("no NVMe tier: [nvme] capacity is 0, so blocks live in DRAM only "
                      "(set [nvme] capacity, e.g. \"512GiB\", for a disk tier)")
    dd = r["data_dir"]
    if dd and dd.get("exists"):
        if dd.get("applied"):
            console.print(f"data dir {dd['path']}: a start applies " + "; ".join(dd["applied"]))
        elif not dd.get("refused"):
            console.print(f"data dir {dd['path']}: store.json as it is")
