"""SLO attainment, goodput and latency figures from run records.

What meeting the SLO means (see bench/README.md for the why). In every mode a
serial request (a chat request, or a program's serial stage) meets it when its
TTFT, from the moment the program issued it, is at most the TTFT SLO and its
mean TPOT over its own tokens is at most the TPOT SLO. Parallel (and tools)
stages are judged by the mode:

- `stage`: each stage finishes, from the moment the program forked it, within
      g * TTFT + (L - g) * TPOT * stretch + tool delay
  where L is its longest branch's output tokens (all its generations), g the
  generations per branch (1; 2 for a tool branch: the call, then the reading,
  each waits for its own first token) and `stretch` the branch stretch.
- `program`: the program as a whole finishes within `multiple` times its
  critical path at serial pace plus its tool delays,
      multiple * sum over stages of (g * TTFT + (L - g) * TPOT) + tool delays,
  so that running the branches one after another is viable at low load when
  `multiple` is about the width.

A program meets its SLO when every serial request and every judged stage (or
the program as a whole) does, and no request failed.

Goodput: programs that met their SLO per second of a fixed window, the same
for every policy: from the first arrival to the last arrival plus the drain
allowance (a program not done by then is cut off and failed). Units: seconds,
programs per second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.records import ProgramRecord, StageRecord
from bench.workload import Program

SLO_MODES = ("stage", "program")


@dataclass(frozen=True, slots=True)
class SLOSpec:
    mode: str = "stage"  # how parallel stages are judged: "stage" | "program"
    branch_stretch: float = 2.0  # stage: parallel stages may run this much slower than serial
    program_multiple: float = 4.0  # program: deadline = multiple * critical path (+ tools)
    drain: float = 60.0  # seconds after the last arrival that count in the goodput window

    def __post_init__(self) -> None:
        if self.mode not in SLO_MODES:
            raise ValueError(f"SLO mode must be one of {SLO_MODES}, got {self.mode!r}")
        if not self.branch_stretch >= 1:
            raise ValueError(f"branch stretch must be >= 1, got {self.branch_stretch}")
        if not self.program_multiple >= 1:
            raise ValueError(f"program multiple must be >= 1, got {self.program_multiple}")
        if not self.drain > 0:
            raise ValueError(f"drain must be > 0 seconds, got {self.drain}")

    @property
    def stretch(self) -> float:
        """The stretch the controller should order branches by (its stage deadline)."""
        return self.branch_stretch if self.mode == "stage" else self.program_multiple


def _generations(s: StageRecord) -> int:
    return 2 if s.kind == "tools" else 1


def stage_path(s: StageRecord, ttft: float, tpot: float) -> float:
    """Seconds a stage's longest branch needs at serial pace, tool delay excluded."""
    g = _generations(s)
    return g * ttft + max(s.longest - g, 0) * tpot


def stage_deadline(s: StageRecord, ttft: float, tpot: float, spec: SLOSpec) -> float:
    """Stage mode: seconds from fork to join a parallel stage may take."""
    g = _generations(s)
    return g * ttft + max(s.longest - g, 0) * tpot * spec.branch_stretch + s.tool_delay


def program_deadline(p: ProgramRecord, spec: SLOSpec) -> float:
    """Program mode: seconds from arrival the whole program may take."""
    path = sum(stage_path(s, p.ttft_slo, p.tpot_slo) for s in p.stages)
    return spec.program_multiple * path + sum(s.tool_delay for s in p.stages)


def allowance(p: Program, spec: SLOSpec) -> float:
    """Seconds program `p` (a workload program, not yet run) may take from its
    arrival and still meet its SLO: the longest it is allowed."""
    stages = [StageRecord(i, s.kind, 0.0, 0.0, s.width,
                          max(t + (s.read_tokens[j] if s.read_tokens else 0)
                              for j, t in enumerate(s.tokens)), s.tool_delay)
              for i, s in enumerate(p.stages)]
    if spec.mode == "program":
        rec = ProgramRecord(p.pid, p.kind, 0.0, 0.0, 0.0, p.ttft_slo, p.tpot_slo, stages)
        return program_deadline(rec, spec)
    return sum(stage_deadline(s, p.ttft_slo, p.tpot_slo, spec) if s.kind != "serial"
               else stage_path(s, p.ttft_slo, p.tpot_slo) for s in stages)


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
    "stage_deadline" or "program_deadline" (each at most once); empty if met."""
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
    if spec.mode == "program":
        if p.stages and p.end - p.start > program_deadline(p, spec):
            out.append("program_deadline")
    else:
        for s in p.stages:
            if s.kind != "serial" and s.end - s.start > stage_deadline(s, p.ttft_slo,
                                                                       p.tpot_slo, spec):
                out.append("stage_deadline")
    return sorted(set(out))


def program_met(p: ProgramRecord, spec: SLOSpec) -> bool:
    return not failures(p, spec)


def summarize(records: list[ProgramRecord], spec: SLOSpec) -> dict:
    """All figures of one run."""
    if not records:
        return {"programs": 0}
    t_first = min(p.arrival for p in records)
    window = max(p.arrival for p in records) - t_first + spec.drain
    # A program still running when the window closes is cut off (the live replay
    # aborts it; the simulator lets it finish, so it is cut off here).
    late = [not p.error and p.end - t_first > window for p in records]
    met = [program_met(p, spec) and not cut for p, cut in zip(records, late)]
    duration = max(1e-9, max(p.end for p in records) - t_first)
    serial = [r for p in records for r in p.requests if r.role == "serial" and not r.error]
    ttft = [r.first_token - r.start for r in serial if r.first_token is not None]
    tpot = [t for r in serial if (t := request_tpot(r.token_times)) is not None]
    itl = [b - a for r in serial for a, b in zip(r.token_times, r.token_times[1:])]
    e2e = [p.end - p.start for p in records if not p.error]
    stages = [(p, s) for p in records for s in p.stages if s.kind != "serial"]
    stage_ratio = [(s.end - s.start) / stage_deadline(s, p.ttft_slo, p.tpot_slo, spec)
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
    missed = []
    for p, cut in zip(records, late):
        why = failures(p, spec) + (["timeout"] if cut else [])
        for f in why:
            reasons[f] = reasons.get(f, 0) + 1
        if why and len(missed) < 50:
            missed.append({"pid": p.pid, "kind": p.kind, "why": why})
    return {
        "programs": len(records),
        "errors": sum(1 for p in records if p.error),
        "duration_s": duration,
        "window_s": window,
        "slo_attainment": sum(met) / len(met),
        "chat_attainment": sum(chat_met) / len(chat_met) if chat_met else None,
        "program_attainment": sum(prog_met) / len(prog_met) if prog_met else None,
        "goodput": sum(met) / window,
        "throughput": len(records) / window,
        "output_tokens_per_s": sum(r.output_tokens for p in records for r in p.requests)
        / duration,
        "ttft_s": _pcts(ttft),
        "tpot_s": _pcts(tpot),
        "itl_s": _pcts(itl),
        "e2e_s": _pcts(e2e),
        "parallel_stage_vs_deadline": _pcts(stage_ratio),
        "branch_width": _pcts([float(w) for w in widths]),
        "failures": reasons,
        "missed": missed,  # the first 50 programs that missed, and why
        "error_samples": sorted({p.error for p in records if p.error})[:5],
        "by_kind": {k: {"n": v["n"], "attainment": v["met"] / v["n"],
                        "completion_s": _pcts(v["e2e"])} for k, v in sorted(by_kind.items())},
    }
