"""``tierstore replay [TRACE]``: parse flags, one call to the engine, one output.

The main job. With no arguments it shows the product: the built-in workload through a real DRAM
slab over a real NVMe tier (in a temporary directory), every loaded block verified, hits and
bytes per tier, and the default eviction policy beside LRU on the same trace
(:func:`tierstore.sim.replay.replay` with a ``baseline``). Several policies or capacities
(``--policy a,b --capacity 1M,3M``), or ``--plot``, call :func:`tierstore.sim.sweep.sweep` instead
(payload none): one result with a ``results`` list and the Belady / infinite ``references``.
``--nodes N`` calls :func:`tierstore.sim.cluster_replay.cluster_replay`: N simulated nodes behind a router
that routes by their KV events (``--route``), beside one pooled cache of N x ``--capacity``.
The engines define every result field.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.console import Group

from tierstore.sim import replay as engine
from tierstore.sim import sweep as sweep_engine
from tierstore.policy import DEFAULT_EVICTION
from tierstore.units import format_bytes
from tierstore_admin.output import (JSON_HELP, emit, fail, kv_table, message, stderr_console, table,
                                    user_errors)

PAYLOAD_HELP = ("bytes: real bytes through a DRAM slab (--dram-capacity) over an NVMe tier "
                "(--nvme-capacity), every loaded block verified; none: index + policy only, one "
                "cache of --capacity (fast; sweeps).")
CAPACITY_GRAMMAR = ("a unit is required: 3M = 3,000,000 tokens (512 per block), 64GiB = bytes, "
                    "256blocks = blocks")


def replay_cmd(
    trace: Optional[str] = typer.Argument(
        None, help="Mooncake JSONL trace (timestamp, input_length, output_length, hash_ids). "
                   "Default: the built-in generated workload (seed 0)."),
    payload: Optional[str] = typer.Option(None, "--payload", help=PAYLOAD_HELP + " Default: bytes; "
                                          "none when only --capacity is given, and for sweeps."),
    capacity: Optional[str] = typer.Option(
        None, "--capacity", help="Payload none: the whole cache (default 3M); a comma list "
                                 f"(1M,3M,10M) sweeps. {CAPACITY_GRAMMAR}."),
    dram_capacity: Optional[str] = typer.Option(
        None, "--dram-capacity", help=f"Payload bytes: DRAM tier size (default "
                                      f"{engine.DEFAULT_DRAM_CAPACITY} tokens)."),
    nvme_capacity: Optional[str] = typer.Option(
        None, "--nvme-capacity", help=f"Payload bytes: NVMe tier size (default "
                                      f"{engine.DEFAULT_NVME_CAPACITY} tokens; 0: no NVMe tier)."),
    block_bytes: Optional[str] = typer.Option(
        None, "--block-bytes",
        help="Bytes per 512-token block. Default: the model's (llama3-8b: 64 MiB) for payload none; "
             "64KiB for payload bytes, since a model-sized block would not fit in RAM."),
    model: str = typer.Option(engine.DEFAULT_MODEL, "--model",
                              help=f"KV geometry preset: {', '.join(engine.MODELS)}."),
    policy: str = typer.Option(DEFAULT_EVICTION, "--policy", help="Eviction policy of every tier "
                               "(registry name such as prefix-lhd or lru, or module:Class); a "
                               "comma list (lru,s3fifo,prefix-lhd) sweeps."),
    baseline: str = typer.Option(engine.DEFAULT_BASELINE, "--baseline",
                                 help="Also replay the same trace with this policy, shown beside "
                                      "(none: no baseline; not through a daemon)."),
    data_dir: Optional[str] = typer.Option(
        None, "--data-dir", help="Payload bytes: store directory (NVMe tier); a temp dir if omitted."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Replay only the first N requests."),
    requests: int = typer.Option(engine.DEFAULT_GENERATED_REQUESTS, "--requests", min=1,
                                 help="Size of the generated workload when no TRACE is given."),
    socket: Optional[str] = typer.Option(
        None, "--socket", envvar="TIERSTORE_SOCKET",
        help="Replay through the daemon on this socket (its tiers, capacities and policy)."),
    plot: Optional[str] = typer.Option(
        None, "--plot", help="Also draw block hit ratio against capacity into this file (PNG); "
                             "runs a sweep. Needs the extra 'plot' (matplotlib)."),
    save_trace: Optional[str] = typer.Option(
        None, "--save-trace", help="Write the requests this run replays (the generated "
                                   "workload, or TRACE cut by --limit) to this file as a JSONL "
                                   "trace, then replay them as usual: the replay still runs "
                                   "(add --payload none to make it quick). `tierstore replay "
                                   "FILE` replays the file again."),
    nodes: Optional[int] = typer.Option(
        None, "--nodes", min=1, help="Simulate N nodes of --capacity each (payload none) behind "
                                     "a router that knows only their KV events; reported beside "
                                     "one pooled cache of N x --capacity."),
    route: Optional[str] = typer.Option(
        None, "--route",
        help="With --nodes: round-robin, prefix-aware (longest prefix in the router's event "
             "index, within a load bound), or a comma list of both (default: both)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Replay a trace through the real store as a prefill node would; report hit ratios.

    A comma list of policies or capacities runs a sweep (payload none), with Belady's
    offline optimum and the infinite cache as reference rows."""
    # empty items are dropped and repeats kept once, in order ("lru,,lru" is one policy)
    policies = list(dict.fromkeys(p.strip() for p in policy.split(",") if p.strip()))
    capacities = list(dict.fromkeys(c.strip() for c in capacity.split(",") if c.strip())) \
        if capacity else []
    if plot is not None and not Path(plot).suffix:
        plot += ".png"   # the file matplotlib writes, and the name reported
    if plot is not None and not os.access(Path(plot).resolve().parent, os.W_OK):
        fail(f"cannot write plot {plot}: its directory is missing or not writable")
    opts = engine.ReplayOptions(
        trace=trace, payload=payload.lower() if payload else None,
        capacity=capacities[0] if len(capacities) == 1 else capacity,
        dram_capacity=dram_capacity,
        nvme_capacity=nvme_capacity, block_bytes=block_bytes, model=model,
        policy=policies[0] if len(policies) == 1 else policy,
        data_dir=data_dir, limit=limit, num_requests=requests,
        socket=socket, baseline=None if baseline.strip().lower() == "none" else baseline.strip())
    if nodes is not None:
        _cluster(opts, nodes, route or "round-robin,prefix-aware", capacities, policies, plot,
                 quiet, as_json)
        return
    if route is not None:
        fail("--route needs --nodes N (it picks how the simulated nodes are routed to)")
    is_sweep = len(policies) > 1 or len(capacities) > 1 or plot is not None
    if is_sweep:
        from dataclasses import replace
        opts = replace(opts, baseline=None)   # a sweep has its reference rows
    show_progress = not quiet and sys.stderr.isatty()
    with user_errors():
        if plot is not None:
            from tierstore_admin.plot import require_matplotlib
            require_matplotlib()
        if save_trace is not None:
            n = engine.write_trace(save_trace, engine.load_requests(opts)[0])
            message(f"wrote {n:,} requests to {save_trace}")
        with _progress(show_progress, "sweep" if is_sweep else "replay") as progress:
            if is_sweep:
                result = sweep_engine.sweep(opts, policies, capacities or [engine.DEFAULT_CAPACITY],
                                            progress=progress)
            else:
                result = engine.replay(opts, progress=progress)
        if plot is not None:
            from tierstore_admin.plot import plot_sweep
            plot_sweep(result, plot)
            result["plot"] = plot
    for w in result.get("warnings", []):
        message("warning: " + w)
    emit(result, as_json=as_json, human=_human_sweep if is_sweep else _human)


def _cluster(opts, nodes: int, route: str, capacities: list, policies: list, plot, quiet: bool,
             as_json: bool) -> None:
    from dataclasses import replace

    from tierstore.sim import cluster_replay as routing

    with user_errors():
        if len(capacities) > 1 or len(policies) > 1:
            from tierstore.errors import ConfigError
            raise ConfigError("--nodes takes one --capacity (per node) and one --policy")
        if plot is not None:
            from tierstore_admin.plot import require_matplotlib
            require_matplotlib()
        opts = replace(opts, baseline=None)
        with _progress(not quiet and sys.stderr.isatty(), "cluster") as progress:
            result = routing.cluster_replay(opts, nodes, route.split(","), progress=progress)
        if plot is not None:
            from tierstore_admin.plot import plot_routes
            plot_routes(result, plot)
            result["plot"] = plot
    emit(result, as_json=as_json, human=_human_cluster)


def _human_cluster(console, r: dict) -> None:
    rows = [(x["route"], x["nodes"], x["capacity_blocks_per_node"] * x["nodes"],
             x["block_hit_ratio"], x["token_hit_ratio"], " / ".join(map(str, x["requests_per_node"])),
             x["load_imbalance"], "yes" if x["router_exact"] else "NO", f"{x['wall_s']:.1f}")
            for x in r["routes"] + [r["pooled"]]]
    head = (f"{r['trace']}: {r['requests']:,} requests on {r['nodes']} nodes of {r['capacity']} "
            f"({r['capacity_blocks_per_node']:,} blocks) each, policy {r['policy']}, payload none; "
            f"pooled = one cache of {r['pooled_capacity_blocks']:,} blocks")
    parts = [head, table("cluster hit ratio by route (router fed by KV events only)",
                         ["route", "nodes", "blocks in all", "block hit ratio", "token hit ratio",
                          "requests per node", "max/mean load", "router index exact", "wall s"],
                         rows)]
    if r.get("plot"):
        parts.append(f"plot: {r['plot']}")
    console.print(Group(*parts))


class _Bar:
    def __init__(self, label: str) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._p = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                           console=stderr_console(), transient=True)
        self._task = None

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._p.add_task("replay", total=total)
        self._p.update(self._task, completed=done, total=total)


def _progress(on: bool, label: str):
    return _Bar(label) if on else nullcontext(None)


def _human(console, r: dict) -> None:
    nominal = r["bytes_nominal"]
    base = r.get("baseline")
    policies = r.get("policies") or {}
    summary = kv_table("replay", [
        ("trace", r["trace"]),
        ("payload / model", f"{r['payload']} / {r['model']}"),
        ("block", f"{r['block_tokens']} tokens, {format_bytes(r['block_bytes'])}"
                  + (" nominal (payload none moves no bytes)" if nominal else " moved per block")),
        ("policy", ", ".join(f"{t} {p}" for t, p in policies.items()) or r["policy"]),
        ("capacity (blocks)", r["capacity_blocks"]),
        ("requests", r["requests"]),
        ("block_hit_ratio", f"{r['block_hit_ratio']:.4f}  ({r['hit_blocks']:,} / {r['referenced_blocks']:,} blocks)"),
        ("token_hit_ratio", f"{r['token_hit_ratio']:.4f}  ({r['token_hit_definition']})"),
        ("verify", "payload none: no bytes to check" if nominal else
                   f"{r['verified_blocks']:,} loaded blocks checked byte for byte, "
                   f"{r['verify_failures']} failures"),
        ("wall", f"{r['wall_s']:.2f} s (+{r['setup_s']:.2f} s setup"
                 + (f", +{r['flush_s']:.2f} s final NVMe flush"
                    if r.get("flush_s") and r["capacity_blocks"].get("nvme") else "") + ")"
                 + (" side by side with the baseline" if r.get("side_by_side") else "")),
        ("throughput", f"{r['throughput']['requests_per_s']} req/s, {r['throughput']['blocks_per_s']} blocks/s"),
    ])
    tiers = table("tiers" + (" (nominal bytes)" if nominal else ""),
                  ["tier", "capacity blocks", "load hits", "read", "written"], [
        (t, r["capacity_blocks"].get(t), r["hits"].get(t, 0), format_bytes(v["read_bytes"]),
         format_bytes(v["written_bytes"])) for t, v in r["tiers"].items()])
    parts = [summary, tiers]
    if base is not None:
        names = list(r["tiers"])
        cols = ["policy", "block hit ratio", "token hit ratio",
                *[f"{t} hits" for t in names], *[f"{t} written" for t in names],
                "verified", "failures", "wall s"]

        def row(x: dict):
            return (x["policy"], x["block_hit_ratio"], x["token_hit_ratio"],
                    *[x["hits"].get(t, 0) for t in names],
                    *[format_bytes(x["tiers"].get(t, {}).get("written_bytes", 0)) for t in names],
                    x["verified_blocks"], x["verify_failures"], f"{x['wall_s']:.2f}")

        parts.append(table("policies on the same trace and tiers"
                           + (" (run side by side)" if r.get("side_by_side") else ""),
                           cols, [row(r), row(base)]))
    parts.append(table("per-request time (ms)", ["op", "requests", "p50", "p99", "mean"], [
        (op, r[f"{op}_ms"]["count"], r[f"{op}_ms"]["p50"], r[f"{op}_ms"]["p99"], r[f"{op}_ms"]["mean"])
        for op in ("load", "store")]))
    console.print(Group(*parts))


def _human_sweep(console, r: dict) -> None:
    caps = [c["capacity"] for c in r["capacities"]]
    rows = r["results"] + r["references"]
    by = {(x["policy"], x["capacity"]): x for x in rows}
    names = list(dict.fromkeys(x["policy"] for x in rows))

    def grid(field: str, title: str):
        return table(title, ["policy", *caps, "total wall s"], [
            (n, *[by[(n, c)][field] for c in caps],
             round(sum(by[(n, c)]["wall_s"] for c in caps), 2) if n != "infinite"
             else by[(n, caps[0])]["wall_s"])
            for n in names])

    head = (f"{r['trace']}: {r['requests']:,} requests, {r['referenced_blocks']:,} block references "
            f"({r['block_tokens']}-token blocks), payload none, {r['wall_s']:.1f} s in all")
    parts = [head, grid("block_hit_ratio", "block_hit_ratio (belady = offline optimum, "
                                           "infinite = no eviction)"),
             grid("token_hit_ratio", "token_hit_ratio")]
    if r.get("plot"):
        parts.append(f"plot: {r['plot']}")
    console.print(Group(*parts))
