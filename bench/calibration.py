"""What the engine does alone, and how much it can do, for a given workload:
the isolated TTFT and TPOT that relative SLOs (`tpot:1.5x`) multiply, and the
capacity that relative rates (`50%`) are a share of.

Capacity is the decode throughput of `REF_BATCH` concurrent sequences at the
workload's mean context, divided by the mean output tokens of a program: the
program rate at which the workload's decode demand equals that throughput. On
a machine k times slower every step is k times longer, so isolated latencies
and capacity scale by k, and the same relative SLOs and rates describe the same
experiment (tool delays aside). Both engines are calibrated the same way: the
live one by measurement (bench/live.py), the simulated one from its cost model.
"""

from __future__ import annotations

import statistics

import numpy as np

from bench.workload import Program, decode_tokens

REF_BATCH = 32  # sequences decoding together when capacity is measured


def mean_context(programs: list[Program]) -> int:
    """Mean prompt tokens of a program (the context its requests decode over)."""
    return max(1, round(statistics.fmean(p.context_tokens() for p in programs)))


def mean_decode_tokens(programs: list[Program]) -> float:
    return statistics.fmean(decode_tokens(p) for p in programs)


def capacity(calibration: dict, programs: list[Program]) -> float:
    """Programs per second at 100% load."""
    return calibration["tokens_per_s"] / mean_decode_tokens(programs)


def from_cost(cost, context: int) -> dict:
    """The simulated engine's calibration, from its cost model (seconds)."""
    gap = getattr(cost, "gap", 0.0)
    step = cost.decode(REF_BATCH, REF_BATCH * context) + gap
    return {"source": cost.name, "context": context,
            "ttft_s": cost.prefill(context, 1, context) + gap,
            "tpot_s": cost.decode(1, context) + gap,
            "tokens_per_s": REF_BATCH / step, "batch": REF_BATCH}


def isolated_at(calibration: dict, cost=None):
    """context -> (TTFT, TPOT) seconds of a lone request with that many prompt
    tokens: from `cost` (the simulator's model, as `from_cost`), else from the
    live calibration's linear fit (bench/live.py `fit_cost`: TPOT a + b + c*ctx,
    TTFT a + e + f*ctx, through the two contexts it measured)."""
    if cost is not None:
        gap = getattr(cost, "gap", 0.0)
        return lambda ctx: (cost.prefill(ctx, 1, ctx) + gap, cost.decode(1, ctx) + gap)
    f = calibration.get("fit")
    if f is None:
        raise ValueError("SLOs per context need a step-time fit; this calibration has none")
    return lambda ctx: (f["a"] + f["e"] + f["f"] * ctx, f["a"] + f["b"] + f["c"] * ctx)


def spread(values: list[float]) -> dict:
    """Median and spread of calibration samples (seconds)."""
    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "min": float(a.min()), "max": float(a.max()),
            "rel_spread": float((np.percentile(a, 90) - np.percentile(a, 10)) / np.median(a)),
            "n": len(a)}
