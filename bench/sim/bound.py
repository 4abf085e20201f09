"""An upper bound on any policy's goodput: a throughput relaxation.

Whatever the admission policy, the engine has to do the work of every program
that meets its SLO, one step at a time. Relax everything else (queueing, SLOs
of the steps, which programs run together) and keep only that:

- a decode step of n sequences of context c costs at least T(n, n c) / n per
  token, so a token of a request with context c costs at least
  min over feasible n of T(n, n c) / n (n bounded by the running-sequence limit
  and by what fits in KV);
- a prefill token costs at least a full prefill step's time per token;
- a program's work W_i is the sum over its tokens; meeting 95% of N programs
  means doing the cheapest 95% of the work, all of it between the first
  arrival and the last arrival plus the longest time a program may take:

      sum_{cheapest 95%} W_i  <=  (N - 1) / r  +  D_max      =>
      r  <=  (N - 1) / (sum_{cheapest 95%} W_i - D_max)

No policy can sustain more. It ignores every SLO but the completion window, so
it is far above what any policy reaches under tight TPOT SLOs: a ceiling, not
a target.
"""

from __future__ import annotations

import math

from bench.sim.engine import SimConfig
from bench.workload import Program

_BRANCH_PROMPT = 4  # as the simulator: tokens a branch adds to the shared context


def _per_token(cost, context: float, sim: SimConfig, cache: dict) -> float:
    key = int(context) // 64
    if key in cache:
        return cache[key]
    n_max = max(1, min(sim.max_running, int(sim.kv_capacity // max(1.0, context))))
    candidates = {n_max, *[n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if n < n_max]}
    best = min(cost.decode(n, n * context) / n for n in candidates)
    cache[key] = best
    return best


def program_work(p: Program, cost, sim: SimConfig, cache: dict) -> float:
    """Least engine seconds the program's decode and prefill can take."""
    per_prefill = cost.prefill(sim.max_prefill_tokens, 1) / sim.max_prefill_tokens
    ctx = p.context_tokens()
    work = ctx * per_prefill
    for s in p.stages:
        if s.kind == "serial":
            work += s.tokens[0] * _per_token(cost, ctx + s.tokens[0] / 2, sim, cache)
            ctx += s.tokens[0]
            continue
        for i, t in enumerate(s.tokens):
            t += s.read_tokens[i] if s.read_tokens else 0
            work += t * _per_token(cost, ctx + _BRANCH_PROMPT + t / 2, sim, cache)
        ctx += 10 * s.width  # the join's digest, as the simulator appends
    return work


def max_rate_bound(programs: list[Program], cost, sim: SimConfig, longest: float,
                   target: float = 0.95) -> float:
    """Programs per second no policy can sustain at `target` attainment, for
    these programs (their arrival order and spacing aside). `longest`: seconds
    the slowest-allowed program may take from arrival (its SLO)."""
    cache: dict = {}
    work = sorted(program_work(p, cost, sim, cache) for p in programs)
    need = math.ceil(target * len(work))
    total = sum(work[:need])
    room = total - longest
    if room <= 0:
        return math.inf
    return (len(work) - 1) / room
