#!/usr/bin/env python3
"""Issue 12's peer_bench acceptance rows from one run's JSON (``lmcache_bench.py --out``).

The harness's table pairs each store with one peer (``--versus``, default the first store);
the acceptance line compares tierstore with both ``lmcache`` and ``lmcache_odirect``. This script
pairs them the harness's way: per repetition, tierstore GB/s ÷ the peer's GB/s in the same
repetition, then the median over repetitions (``Results.paired`` in lmcache_bench.py).

    python benchmarks/peer_bench_verdict.py RUN.json [RUN2.json ...] [--markdown]

Prints one line per acceptance row: the paired ratio, the target, pass/fail, and the load
average at the end of the run (from the JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

# (row key in the JSON, label, peer, target)
TARGETS = [
    ("a_store_mem", "a memory store", "lmcache", 1.2),
    ("a_store_mem", "a memory store", "lmcache_odirect", 1.2),
    ("b_load_mem", "b memory load", "lmcache", 1.2),
    ("b_load_mem", "b memory load", "lmcache_odirect", 1.2),
    ("c_store_disk_sync", "c+sync disk store on device", "lmcache_odirect", 1.0),
    ("c_store_disk_sync", "c+sync disk store on device", "lmcache", 2.0),
    ("d_load_disk_cold", "d cold disk load", "lmcache_odirect", 1.0),
    ("c_store_call", "c store() call only", "lmcache", 1.0),
]


def paired(results: dict, row: str, who: str, peer: str) -> tuple[float | None, list[float]]:
    a = results.get(row, {}).get(who)
    b = results.get(row, {}).get(peer)
    if not a or not b:
        return None, []
    pairs = [x / y for x, y in zip(a["gbps"], b["gbps"]) if x is not None and y]
    return (statistics.median(pairs) if pairs else None), pairs


def verdict(report: dict, who: str = "tierstore") -> list[dict]:
    res = report["results"]
    out = []
    for row, label, peer, target in TARGETS:
        med, pairs = paired(res, row, who, peer)
        mine = res.get(row, {}).get(who) or {}
        theirs = res.get(row, {}).get(peer) or {}
        out.append({"row": row, "label": label, "peer": peer, "target": target,
                    "ratio": med, "per_rep": pairs, "pass": med is not None and med >= target,
                    "gbps": mine.get("median_gbps"), "peer_gbps": theirs.get("median_gbps")})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--who", default="tierstore")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    fails = 0
    for path in a.runs:
        with open(path) as f:
            rep = json.load(f)
        la = rep["machine"].get("loadavg_at_end")
        print(f"{path}: {rep['date']}, load average at end {la}, "
              f"page cache dropped {rep['machine']['page_cache_dropped']}")
        if a.markdown:
            print("| row | tierstore GB/s | peer | peer GB/s | tierstore ÷ peer (per rep) | target | |")
            print("|---|---|---|---|---|---|---|")
        for v in verdict(rep, a.who):
            fails += not v["pass"]
            r = "n/a" if v["ratio"] is None else f"{v['ratio']:.2f}"
            reps = ", ".join(f"{x:.2f}" for x in v["per_rep"])
            ok = "pass" if v["pass"] else "FAIL"
            if a.markdown:
                print(f"| {v['label']} | {v['gbps']:.2f} | {v['peer']} | {v['peer_gbps']:.2f} | "
                      f"**{r}** ({reps}) | ≥ {v['target']:g} | {ok} |")
            else:
                print(f"  {v['label']:<30} vs {v['peer']:<16} {r:>6}  target >= {v['target']:<4g}"
                      f" {ok}   per rep: {reps}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
