"""``tierstore replay [TRACE]``: parse flags, one call to :func:`tierstore.replay.replay`, one output.

The engine and every definition of the result fields live in ``tierstore/replay.py``.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Optional

import typer
from rich.console import Group

from tierstore import replay as engine
from tierstore.policy import DEFAULT_EVICTION
from tierstore.units import format_bytes
from tierstore_admin.output import (JSON_HELP, emit, kv_table, message, stderr_console, table,
                                    user_errors)

PAYLOAD_HELP = ("none: index + policy only, one cache of --capacity (fast); bytes: real bytes "
                "through a DRAM slab (--dram-capacity) and an NVMe tier (--nvme-capacity), every "
                "loaded block verified.")
CAPACITY_GRAMMAR = "3M = 3,000,000 tokens (/512 per block), 64GiB = bytes, 256blocks = blocks"


def replay_cmd(
    trace: Optional[str] = typer.Argument(
        None, help="Mooncake JSONL trace (timestamp, input_length, output_length, hash_ids). "
                   "Default: the built-in generated workload (seed 0)."),
    payload: str = typer.Option("none", "--payload", help=PAYLOAD_HELP),
    capacity: Optional[str] = typer.Option(
        None, "--capacity", help=f"Payload none: the whole cache (default 3M). {CAPACITY_GRAMMAR}."),
    dram_capacity: Optional[str] = typer.Option(
        None, "--dram-capacity", help="Payload bytes: DRAM tier size (default 3M tokens)."),
    nvme_capacity: Optional[str] = typer.Option(
        None, "--nvme-capacity", help="Payload bytes: NVMe tier size (default: no NVMe tier)."),
    block_bytes: Optional[str] = typer.Option(
        None, "--block-bytes",
        help="Bytes per 512-token block. Default: the model's (llama3-8b: 64 MiB) for payload none; "
             "64KiB for payload bytes, since a model-sized block would not fit in RAM."),
    model: str = typer.Option(engine.DEFAULT_MODEL, "--model",
                              help=f"KV geometry preset: {', '.join(engine.MODELS)}."),
    policy: str = typer.Option(DEFAULT_EVICTION, "--policy", help="Eviction policy of every tier "
                               "(registry name such as prefix-lhd or lru, or module:Class)."),
    data_dir: Optional[str] = typer.Option(
        None, "--data-dir", help="Payload bytes: store directory (NVMe tier); a temp dir if omitted."),
    write_through: bool = typer.Option(False, "--write-through",
                                       help="Payload bytes: write every stored block to NVMe too."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Replay only the first N requests."),
    requests: int = typer.Option(engine.DEFAULT_GENERATED_REQUESTS, "--requests", min=1,
                                 help="Size of the generated workload when no TRACE is given."),
    socket: Optional[str] = typer.Option(
        None, "--socket", envvar="TIERSTORE_SOCKET",
        help="Replay through the daemon on this socket (its tiers, capacities and policy)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Replay a trace through the real store as a prefill node would; report hit ratios."""
    opts = engine.ReplayOptions(
        trace=trace, payload=payload.lower(), capacity=capacity, dram_capacity=dram_capacity,
        nvme_capacity=nvme_capacity, block_bytes=block_bytes, model=model, policy=policy,
        data_dir=data_dir, write_through=write_through, limit=limit, num_requests=requests,
        socket=socket)
    show_progress = not quiet and sys.stderr.isatty()
    with user_errors(), _progress(show_progress) as progress:
        result = engine.replay(opts, progress=progress)
    for w in result.get("warnings", []):
        message("warning: " + w)
    emit(result, as_json=as_json, human=_human)


class _Bar:
    def __init__(self) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        self._p = Progress(TextColumn("replay"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=stderr_console(), transient=True)
        self._task = None

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._p.add_task("replay", total=total)
        self._p.update(self._task, completed=done)


def _progress(on: bool):
    return _Bar() if on else nullcontext(None)


def _human(console, r: dict) -> None:
    nominal = " (nominal)" if r["bytes_nominal"] else ""
    summary = kv_table("replay", [
        ("trace", r["trace"]),
        ("payload / model / policy", f"{r['payload']} / {r['model']} / {r['policy']}"),
        ("block", f"{r['block_tokens']} tokens, {format_bytes(r['block_bytes'])}"),
        ("capacity (blocks)", r["capacity_blocks"]),
        ("requests", r["requests"]),
        ("block_hit_ratio", f"{r['block_hit_ratio']:.4f}  ({r['hit_blocks']:,} / {r['referenced_blocks']:,} blocks)"),
        ("token_hit_ratio", f"{r['token_hit_ratio']:.4f}  ({r['token_hit_definition']})"),
        ("verify", f"{r['verified_blocks']:,} blocks checked, {r['verify_failures']} failures"),
        ("wall", f"{r['wall_s']:.2f} s (+{r['setup_s']:.2f} s setup)"),
        ("throughput", f"{r['throughput']['requests_per_s']} req/s, {r['throughput']['blocks_per_s']} blocks/s"),
    ])
    tiers = table("tiers" + nominal, ["tier", "capacity blocks", "load hits", "read", "written"], [
        (t, r["capacity_blocks"].get(t), r["hits"].get(t, 0), format_bytes(v["read_bytes"]),
         format_bytes(v["written_bytes"])) for t, v in r["tiers"].items()])
    lat = table("per-request time (ms)", ["op", "requests", "p50", "p99", "mean"], [
        (op, r[f"{op}_ms"]["count"], r[f"{op}_ms"]["p50"], r[f"{op}_ms"]["p99"], r[f"{op}_ms"]["mean"])
        for op in ("load", "store")])
    console.print(Group(summary, tiers, lat))
