"""Per-policy cost: µs per policy call, and replay wall time on the whole trace (payload none).

Two numbers per eviction policy, at one capacity (default 3M tokens):

- ``us_per_call``: the policy's own cost. The offline harness (benchmarks/policy_sim.py,
  ``order=store``: exactly the Store's calls) is run once through a recorder that logs every
  call (access / insert / victim / remove); the log is then replayed against a fresh instance of
  the policy and that loop alone is timed, so harness bookkeeping is not counted. Policies are
  deterministic, so the replayed victims are the recorded ones.
- ``replay_wall_s``: ``tierstore replay TRACE --payload none --policy P --capacity C`` through
  the real store (tierstore.sim.replay), wall time of the request loop (setup excluded).

Usage::

    python3 benchmarks/bench_policies.py [--trace PATH] [--capacity 3M] [--policies a,b]
        [--format table|json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from policy_sim import BLOCK_TOKENS, DEFAULT_TRACE, load_trace, parse_tokens, simulate  # noqa: E402

from tierstore.policy import EVICTION, make_eviction  # noqa: E402
from tierstore.sim.replay import ReplayOptions, replay  # noqa: E402


class Recorder:
    """Forwards to a policy and logs each call as (name, arg...)."""

    def __init__(self, policy) -> None:
        self._p = policy
        self.log: list[tuple] = []

    def access(self, k):
        self.log.append(("a", k))
        return self._p.access(k)

    def insert(self, k, size, parent):
        self.log.append(("i", k, size, parent))
        return self._p.insert(k, size, parent)

    def victim(self, evictable):
        self.log.append(("v",))
        return self._p.victim(evictable)

    def remove(self, k):
        self.log.append(("r", k))
        return self._p.remove(k)


def us_per_call(reqs, name: str, cap: int) -> tuple[float, int, float]:
    rec = Recorder(make_eviction(name, cap))
    hit = simulate(reqs, rec, cap)["block_hit_ratio"]
    p = make_eviction(name, cap)
    access, insert, victim, remove = p.access, p.insert, p.victim, p.remove
    everything = lambda _k: True  # noqa: E731
    t0 = time.perf_counter()
    for op in rec.log:
        c = op[0]
        if c == "a":
            access(op[1])
        elif c == "i":
            insert(op[1], op[2], op[3])
        elif c == "v":
            victim(everything)
        else:
            remove(op[1])
    dt = time.perf_counter() - t0
    # the dispatch loop itself, without policy calls, is subtracted
    t0 = time.perf_counter()
    for op in rec.log:
        c = op[0]
        if c == "a":
            pass
        elif c == "i":
            pass
        elif c == "v":
            pass
        else:
            pass
    loop = time.perf_counter() - t0
    return max(dt - loop, 0.0) / max(len(rec.log), 1) * 1e6, len(rec.log), hit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=DEFAULT_TRACE)
    ap.add_argument("--capacity", default="3M")
    ap.add_argument("--policies", default=",".join(EVICTION))
    ap.add_argument("--format", choices=["table", "json"], default="table")
    a = ap.parse_args(argv)
    reqs = load_trace(a.trace)
    cap = parse_tokens(a.capacity) // BLOCK_TOKENS
    rows = []
    for name in [p.strip() for p in a.policies.split(",") if p.strip()]:
        us, calls, hit = us_per_call(reqs, name, cap)
        r = replay(ReplayOptions(trace=a.trace, capacity=a.capacity, policy=name))
        rows.append({"policy": name, "capacity": a.capacity, "policy_calls": calls,
                     "us_per_call": round(us, 3), "harness_hit_ratio": round(hit, 4),
                     "replay_block_hit_ratio": r["block_hit_ratio"], "replay_wall_s": r["wall_s"],
                     "replay_requests_per_s": r["throughput"]["requests_per_s"]})
        print(f"{name}: done", file=sys.stderr, flush=True)
    if a.format == "json":
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{a.trace}: {len(reqs)} requests, {sum(map(len, reqs))} block refs, capacity {a.capacity}")
    print("| policy | policy calls | µs/call | replay wall s | replay req/s | block hit ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['policy_calls']:,} | {r['us_per_call']:.2f} | "
              f"{r['replay_wall_s']:.2f} | {r['replay_requests_per_s']:,.0f} | "
              f"{r['replay_block_hit_ratio']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
