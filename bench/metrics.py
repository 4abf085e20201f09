"""SLO attainment, goodput and latency figures from replay records.

What meeting the SLO means (see bench/README.md for the why):
- a serial request (a chat request, or a program's serial stage) meets it when
  its TTFT, from the moment the program issued it, is at most the TTFT SLO and
  its mean TPOT over its own tokens is at most the TPOT SLO;
- a parallel (or tools) stage meets it when it finishes, from the moment the
  program forked it, within  TTFT + (L - 1) * TPOT * stretch + tool delay,
  where L is its longest branch's output tokens (both generations of a tool
  branch) and `stretch` the branch stretch factor;
- a program meets its SLO when every serial request and every parallel stage
  of it does, and no request failed.

Goodput: programs that met their SLO per second of the run (first arrival to
last completion). Units: seconds, programs per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bench.replay import ProgramRecord


@dataclass(frozen=True, slots=True)
class SLOSpec:
    branch_stretch: float = 2.0  # parallel stages may run this much slower than serial pace


def _pcts(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": len(a)}


def request_tpot(token_times: list[float]) -> float | None:
    if len(token_times) < 2:
        return None
    return (token_times[-1] - token_times[0]) / (len(token_times) - 1)


def failures(p: ProgramRecord, spec: SLOSpec) -> list[str]:
    """Why a program missed its SLO: "error", "serial_ttft", "serial_tpot",
    "stage_deadline" (each at most once); empty if it met it."""
    out = []
    if p.error:
        out.append("error")
    for r in p.requests:
        if r.role != "serial":
            continue
        if r.first_token is None or r.first_token - r.start > p.ttft_slo:
            out.append("serial_ttft")
        tpot = request_tpot(r.token_times)
        if tpot is not None and tpot > p.tpot_slo:
            out.append("serial_tpot")
    for s in p.stages:
        if s.kind == "serial":
            continue
        deadline = p.ttft_slo + (s.longest - 1) * p.tpot_slo * spec.branch_stretch + s.tool_delay
        if s.end - s.start > deadline:
            out.append("stage_deadline")
    return sorted(set(out))


def program_met(p: ProgramRecord, spec: SLOSpec) -> bool:
    return not failures(p, spec)


def summarize(records: list[ProgramRecord], spec: SLOSpec) -> dict:
    """All figures of one run."""
    if not records:
        return {"programs": 0}
    met = [program_met(p, spec) for p in records]
    t_first = min(p.arrival for p in records)
    t_last = max(p.end for p in records)
    duration = max(1e-9, t_last - t_first)
    serial = [r for p in records for r in p.requests if r.role == "serial" and not r.error]
    ttft = [r.first_token - r.start for r in serial if r.first_token is not None]
    tpot = [t for r in serial if (t := request_tpot(r.token_times)) is not None]
    itl = [b - a for r in serial for a, b in zip(r.token_times, r.token_times[1:])]
    e2e = [p.end - p.start for p in records if not p.error]
    stages = [(p, s) for p in records for s in p.stages if s.kind != "serial"]
    stage_ratio = [(s.end - s.start) / (p.ttft_slo + (s.longest - 1) * p.tpot_slo
                                        * spec.branch_stretch + s.tool_delay)
                   for p, s in stages]
    by_kind: dict[str, dict] = {}
    for p, m in zip(records, met):
        k = by_kind.setdefault(p.kind, {"n": 0, "met": 0, "e2e": []})
        k["n"] += 1
        k["met"] += m
        k["e2e"].append(p.end - p.start)
    chat_met = [m for p, m in zip(records, met) if p.kind == "chat"]
    prog_met = [m for p, m in zip(records, met) if p.kind != "chat"]
    widths = [s.width for _, s in stages]
    reasons: dict[str, int] = {}
    for p in records:
        for f in failures(p, spec):
            reasons[f] = reasons.get(f, 0) + 1
    return {
        "programs": len(records),
        "errors": sum(1 for p in records if p.error),
        "duration_s": duration,
        "slo_attainment": sum(met) / len(met),
        "chat_attainment": sum(chat_met) / len(chat_met) if chat_met else None,
        "program_attainment": sum(prog_met) / len(prog_met) if prog_met else None,
        "goodput": sum(met) / duration,
        "throughput": len(records) / duration,
        "output_tokens_per_s": sum(r.output_tokens for p in records for r in p.requests)
        / duration,
        "ttft_s": _pcts(ttft),
        "tpot_s": _pcts(tpot),
        "itl_s": _pcts(itl),
        "e2e_s": _pcts(e2e),
        "parallel_stage_vs_deadline": _pcts(stage_ratio),
        "branch_width": _pcts([float(w) for w in widths]),
        "failures": reasons,
        "error_samples": sorted({p.error for p in records if p.error})[:5],
        "by_kind": {k: {"n": v["n"], "attainment": v["met"] / v["n"],
                        "completion_s": _pcts(v["e2e"])} for k, v in sorted(by_kind.items())},
    }


def max_rate_at(points: list[tuple[float, float]], target: float = 0.95) -> float | None:
    """Highest tested rate whose attainment is >= target, from (rate, attainment)
    points; None if none meets it."""
    ok = [r for r, a in points if a >= target and not math.isnan(a)]
    return max(ok) if ok else None
