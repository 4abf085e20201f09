"""A discrete-event simulator of a continuous-batching engine (SGLang-like).

Each scheduling pass runs one step: a prefill step when waiting requests fit
in KV (prefill first, as SGLang), otherwise a decode step over the running
sequences, for which the controller decides who decodes, exactly as the live
hook: the same `Controller`, views with the same fields. Programs advance
through their stages as their requests finish (fork: k branch requests;
join: when all are done; tools: a timed wait between two generations).
Output records have the replay's format, so metrics and reports are shared.

Determinism: one seeded RNG (step-time noise only); events are ordered by
(time, kind, id); every counter belongs to the simulation instance.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from bench.replay import ProgramRecord, RequestRecord, StageRecord
from bench.sim.cost import CostModel
from bench.workload import Program
from controller import Controller, StepResult, StepView
from controller.view import NO_GROUP

_TOOL, _ARRIVAL = 0, 1  # event kinds, in tie-break order
_BRANCH_PROMPT = 4  # tokens a branch adds to the shared context ("Branch i:")
_DIGEST = 10  # tokens the join appends per branch
_CHARS_PER_TOKEN = 4


@dataclass(slots=True)
class SimConfig:
    kv_capacity: int = 65536  # tokens
    max_prefill_tokens: int = 16384  # new tokens per prefill step
    max_running: int = 4096  # sequences
    gap: float | None = None  # seconds between steps (default: the cost model's)
    seed: int = 0


@dataclass(slots=True, eq=False)
class _Req:
    rid: int
    prog: _Prog
    stage: int
    branch: int  # -1 serial
    role: str
    new_tokens: int  # prompt tokens not in cache, prefilled
    context: int  # prompt tokens in all
    max_new: int
    start: float
    group: int = NO_GROUP
    width: int = 1
    arrival_group: float = 0.0
    first_token: float = math.nan
    generated: int = 0
    token_times: list[float] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Prog:
    spec: Program
    rec: ProgramRecord
    context: int  # tokens of context so far
    stage: int = -1
    outstanding: int = 0
    stage_start: float = 0.0
    group: int = NO_GROUP  # the current parallel stage's group code
    done: bool = False


class Simulator:
    def __init__(self, programs: list[Program], cost: CostModel, controller: Controller,
                 config: SimConfig | None = None) -> None:
        self.cfg = config or SimConfig()
        self.cost = cost
        self.ctl = controller
        self.rng = np.random.default_rng(self.cfg.seed)
        self.gap = self.cfg.gap if self.cfg.gap is not None else getattr(cost, "gap", 0.0)
        self.t = 0.0
        self.events: list[tuple] = []  # (time, kind, id, payload)
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []
        self.kv_used = 0
        self.records: list[ProgramRecord] = []
        self._next_rid = 0
        self._next_group = 0
        self._eid = 0
        self.steps = {"prefill": 0, "decode": 0}
        self.branch_steps = 0
        self.held_steps = 0
        self.decode_time = 0.0
        for p in programs:
            self._push(p.arrival, _ARRIVAL, p)

    # ----------------------------------------------------------------- events

    def _push(self, t: float, kind: int, payload) -> None:
        self._eid += 1
        heapq.heappush(self.events, (t, kind, self._eid, payload))

    def _fire_due(self) -> None:
        while self.events and self.events[0][0] <= self.t:
            t, kind, _, payload = heapq.heappop(self.events)
            if kind == _ARRIVAL:
                self._arrive(payload, t)
            else:
                self._issue(*payload, at=t)

    def _arrive(self, spec: Program, t: float) -> None:
        rec = ProgramRecord(spec.pid, spec.kind, spec.arrival, t, t, spec.ttft_slo,
                            spec.tpot_slo)
        self.records.append(rec)
        prog = _Prog(spec, rec, context=max(1, len(spec.prompt) // _CHARS_PER_TOKEN))
        self._advance(prog, t, uncached=prog.context)

    # --------------------------------------------------------------- programs

    def _advance(self, prog: _Prog, t: float, uncached: int) -> None:
        """Start the program's next stage, or finish it."""
        prog.stage += 1
        if prog.stage >= len(prog.spec.stages):
            prog.done = True
            prog.rec.end = t
            return
        stage = prog.spec.stages[prog.stage]
        prog.stage_start = t
        if stage.kind == "serial":
            prog.outstanding = 1
            self._issue(prog, prog.stage, -1, "serial", uncached, stage.tokens[0], at=t)
            return
        group = self._next_group
        self._next_group += 1
        prog.group = group
        prog.outstanding = stage.width
        for b in range(stage.width):
            self._issue(prog, prog.stage, b, "branch", uncached + _BRANCH_PROMPT,
                        stage.tokens[b], at=t, group=group)

    def _issue(self, prog: _Prog, stage: int, branch: int, role: str, uncached: int,
               max_new: int, at: float, group: int = NO_GROUP) -> _Req:
        self._next_rid += 1
        if group == NO_GROUP and branch >= 0:  # a tool branch's second generation
            group = prog.group
        r = _Req(self._next_rid, prog, stage, branch, role, max(1, uncached),
                 prog.context + (_BRANCH_PROMPT if branch >= 0 else 0), max_new, at, group,
                 prog.spec.stages[stage].width if branch >= 0 else 1, prog.stage_start)
        self.waiting.append(r)
        return r

    def _finish(self, r: _Req, t: float) -> None:
        prog = r.prog
        prog.rec.requests.append(RequestRecord(
            stage=r.stage, branch=r.branch, role=r.role, start=r.start,
            first_token=r.first_token, end=t, token_times=r.token_times,
            output_tokens=r.generated, cached_tokens=r.context - r.new_tokens, error=None))
        stage = prog.spec.stages[r.stage]
        if stage.kind == "tools" and r.role == "branch":
            # The tool call: the branch waits, then reads the result.
            self._push(t + stage.tool_delay, _TOOL,
                       (prog, r.stage, r.branch, "read", 8 + r.generated,
                        stage.read_tokens[r.branch]))
            return
        prog.outstanding -= 1
        if prog.outstanding:
            return
        if stage.kind == "serial":
            prog.rec.stages.append(StageRecord(r.stage, "serial", prog.stage_start, t, 1,
                                               stage.tokens[0], 0.0))
            prog.context += r.generated
            self._advance(prog, t, uncached=0)
            return
        longest = max(tk + (stage.read_tokens[i] if stage.read_tokens else 0)
                      for i, tk in enumerate(stage.tokens))
        prog.rec.stages.append(StageRecord(r.stage, stage.kind, prog.stage_start, t,
                                           stage.width, longest, stage.tool_delay))
        digest = _DIGEST * stage.width
        prog.context += digest
        self._advance(prog, t, uncached=digest)

    # ------------------------------------------------------------------ steps

    def _kv_of(self, r: _Req) -> int:
        return r.context + r.generated

    def _prefill(self) -> bool:
        """Admit what fits from the waiting queue (FIFO) into one prefill step."""
        batch, tokens = [], 0
        budget = self.cfg.kv_capacity - self.kv_used
        while self.waiting and len(self.running) + len(batch) < self.cfg.max_running:
            r = self.waiting[0]
            need = r.new_tokens + r.max_new  # reserve its output too, as SGLang does
            if batch and tokens + r.new_tokens > self.cfg.max_prefill_tokens:
                break
            if need > budget:
                break
            self.waiting.pop(0)
            batch.append(r)
            tokens += r.new_tokens
            budget -= need
        if not batch:
            return False
        dt = self.cost.prefill(tokens, len(batch)) + self.gap
        self.t += dt
        self.steps["prefill"] += 1
        for r in batch:
            self.kv_used += r.new_tokens + r.max_new
            r.first_token = self.t
            r.generated = 1
            r.token_times.append(self.t)
            if r.generated >= r.max_new:
                self._release(r)
                self._finish(r, self.t)
            else:
                self.running.append(r)
        return True

    def _release(self, r: _Req) -> None:
        self.kv_used -= r.new_tokens + r.max_new

    def _view(self, now: float) -> StepView:
        rs = self.running
        n = len(rs)
        f = np.fromiter
        group = f((r.group for r in rs), np.int64, n)
        crit = group < 0
        tpot = f((r.prog.spec.tpot_slo for r in rs), np.float64, n)
        return StepView(
            ids=[r.rid for r in rs], group=group,
            branch=f((max(r.branch, 0) for r in rs), np.int64, n),
            width=f((r.width for r in rs), np.int64, n),
            kv_len=f((r.context + r.generated for r in rs), np.int64, n),
            shared_len=f((r.prog.context if r.group >= 0 else 0 for r in rs), np.int64, n),
            ttft_slo=f((r.prog.spec.ttft_slo for r in rs), np.float64, n), tpot_slo=tpot,
            arrival=f((r.arrival_group if r.group >= 0 else r.start for r in rs), np.float64,
                      n),
            first_token=f((r.first_token for r in rs), np.float64, n),
            generated=f((r.generated for r in rs), np.int64, n), critical=crit,
            max_new=f((r.max_new for r in rs), np.int64, n), now=now,
            waiting=len(self.waiting))

    def _decode(self) -> None:
        view = self._view(self.t)
        d = self.ctl.decide(view)
        keep = d.keep
        kept = [self.running[i] for i in keep]
        g = view.group[keep]
        in_group = g >= 0
        kv = float(view.kv_len[keep].sum())
        shared = view.shared_len[keep]
        uniq = 0.0
        if in_group.any():
            codes, first = np.unique(g[in_group], return_index=True)
            uniq = float(shared[in_group][first].sum())
        cascade = getattr(self.ctl.config, "cascade", False)
        kv_eff = kv - float(shared[in_group].sum()) if cascade else kv
        dt = self.cost.decode(len(kept), kv_eff, uniq, cascade)
        if self.cost.step_noise:
            dt *= max(0.2, 1.0 + self.cost.step_noise * self.rng.standard_normal())
        start = self.t + self.gap
        self.t = start + dt
        self.steps["decode"] += 1
        self.decode_time += dt
        self.branch_steps += int(in_group.sum())
        self.held_steps += len(d.held)
        self.ctl.observe(StepResult(d, step_time=dt, end=self.t))
        done = []
        for r in kept:
            r.generated += 1
            r.token_times.append(self.t)
            if r.generated >= r.max_new:
                done.append(r)
        if done:
            gone = set(id(r) for r in done)
            self.running = [r for r in self.running if id(r) not in gone]
            for r in done:
                self._release(r)
                self._finish(r, self.t)

    def run(self, max_steps: int = 50_000_000) -> list[ProgramRecord]:
        for _ in range(max_steps):
            self._fire_due()
            if self.waiting and self._prefill():
                continue
            if self.running:
                self._decode()
                continue
            if not self.events:
                break
            self.t = max(self.t, self.events[0][0])
        self.records.sort(key=lambda r: r.pid)
        return self.records
