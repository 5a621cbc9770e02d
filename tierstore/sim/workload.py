"""Synthetic prefix-cache workload: multi-turn sessions over Zipf-distributed shared prefixes.

``generate_trace`` returns Mooncake-format requests (``timestamp`` in ms, ``input_length``,
``output_length``, ``hash_ids`` of 512-token blocks), deterministic for a given seed. It is the
second workload the eviction policies are judged on (docs/policies.md) and the embedded default
trace of ``tierstore replay``. It differs from the Mooncake conversation trace on purpose:

- many shared prefixes (system prompts / documents) with Zipf popularity, not one root block;
- sessions arrive as a Poisson process whose rate swings over a period (a day compressed), with
  exponential think time between turns, instead of the trace's batched arrivals;
- each turn appends the previous answer and a new question to the session's history.

Block ids follow vLLM-style hashing of full blocks: a full block keeps its id for the rest of the
session; the trailing partial block gets a fresh id every turn (its content changes). Pure Python,
no I/O, single-threaded.
"""

from __future__ import annotations

import heapq
import math
import random

BLOCK_TOKENS = 512  # Mooncake hash_ids are per 512-token block

# Every constant below describes the synthetic workload, not a policy; they are chosen to look
# like a chat/RAG service and to differ in shape from the Mooncake trace.
NUM_PREFIXES = 400  # distinct system prompts / documents in the catalogue
ZIPF_S = 1.0  # classic Zipf exponent for content popularity
PREFIX_TOKENS = (256, 16384)  # log-uniform prefix length: short prompts to long documents
MEAN_TURNS = 4.0  # geometric number of turns per session (chat sessions are short on average)
MEAN_THINK_S = 90.0  # exponential time between a reply and the next question
MEAN_SESSION_GAP_S = 0.6  # mean time between new sessions at the average rate
RATE_SWING = 0.8  # arrival rate = mean * (1 + swing*sin(2*pi*t/period)): busy and quiet hours
RATE_PERIOD_S = 3600.0  # one compressed "day"
QUESTION_TOKENS = (32, 4096)  # log-uniform new user input per turn
ANSWER_TOKENS = (16, 1024)  # log-uniform model output per turn


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _zipf_cdf(n: int, s: float) -> list[float]:
    w = [1.0 / (i + 1) ** s for i in range(n)]
    total = sum(w)
    acc, out = 0.0, []
    for x in w:
        acc += x / total
        out.append(acc)
    return out


def generate_trace(num_requests: int = 2000, seed: int = 0, *, num_prefixes: int = NUM_PREFIXES,
                   zipf_s: float = ZIPF_S, mean_turns: float = MEAN_TURNS,
                   mean_think_s: float = MEAN_THINK_S) -> list[dict]:
    """Return ``num_requests`` Mooncake-format request dicts sorted by timestamp (ms)."""
    rng = random.Random(seed)
    next_id = 0

    def fresh() -> int:
        nonlocal next_id
        next_id += 1
        return next_id - 1

    cdf = _zipf_cdf(num_prefixes, zipf_s)
    # Each shared prefix: its token length and the ids of its full blocks.
    prefixes = []
    for _ in range(num_prefixes):
        tokens = _log_uniform(rng, *PREFIX_TOKENS)
        prefixes.append((tokens, [fresh() for _ in range(tokens // BLOCK_TOKENS)]))

    def pick_prefix() -> int:
        u = rng.random()
        lo, hi = 0, len(cdf) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cdf[mid] < u:
                lo = mid + 1
            else:
                hi = mid
        return lo

    # Event queue of (time_s, seq, session); a session is [tokens, full_ids, turns_left].
    events: list[tuple] = []
    seq = 0
    t_new = 0.0
    out: list[dict] = []
    p_continue = 1.0 - 1.0 / mean_turns  # geometric turns with the given mean
    while len(out) < num_requests:
        # Next new-session arrival: thinning of a sinusoidally modulated Poisson process.
        peak = (1.0 + RATE_SWING) / MEAN_SESSION_GAP_S
        while True:
            t_new += rng.expovariate(peak)
            rate = (1.0 + RATE_SWING * math.sin(2 * math.pi * t_new / RATE_PERIOD_S)) / MEAN_SESSION_GAP_S
            if rng.random() * peak <= rate:
                break
        p = prefixes[pick_prefix()]
        heapq.heappush(events, (t_new, seq, [p[0], list(p[1])]))
        seq += 1
        # Serve every turn due before the next new session could arrive.
        while events and events[0][0] <= t_new and len(out) < num_requests:
            t, _, sess = heapq.heappop(events)
            tokens, full = sess
            tokens += _log_uniform(rng, *QUESTION_TOKENS)
            while len(full) < tokens // BLOCK_TOKENS:
                full.append(fresh())
            ids = list(full)
            if tokens % BLOCK_TOKENS:
                ids.append(fresh())  # the partial last block: new content every turn
            answer = _log_uniform(rng, *ANSWER_TOKENS)
            out.append({"timestamp": int(t * 1000), "input_length": tokens,
                        "output_length": answer, "hash_ids": ids})
            if rng.random() < p_continue:
                sess[0] = tokens + answer
                heapq.heappush(events, (t + rng.expovariate(1.0 / mean_think_s), seq, sess))
                seq += 1
    return out
