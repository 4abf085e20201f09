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

Data layout, for speed (a sweep runs thousands of simulations): a request is a
`_Req` object while it waits and once it finishes, but while it decodes, what
changes every step (tokens generated, token times) and what the controller's
view shows live as numpy columns in a `RunningSet` (bench/sim/state.py), in the
same order a list of running requests would have. The per-step work is then a
few array operations over the batch, and Python work is per request admitted or
finished, not per request per step. `_live` maps a running request's id back to
its object for when it finishes.

Two halves, so that several engines can serve one set of programs
(bench/sim/replicas.py): `Programs` is the programs' side (arrivals, stages,
fork and join, tool waits, records), which hands each request it issues to
`_submit`; `Engine` is one server's side (its waiting queue, running set, KV,
clock, controller), which reports each request it finishes to `_finish`.
`Simulator` is one of each: it submits to its own queue.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from bench.records import ProgramRecord, RequestRecord, StageRecord
from bench.sim.cost import CostModel
from bench.sim.state import RunningSet, WaitingQueue
from bench.workload import Program
from controller import Controller, PrefillView, StepResult, StepView
from controller.view import NO_GROUP

_TOOL, _ARRIVAL = 0, 1  # event kinds, in tie-break order
_BRANCH_PROMPT = 4  # tokens a branch adds to the shared context ("Branch i:")
_DIGEST = 10  # tokens the join appends per branch
_TOOL_RESULT = 8  # tokens of a tool's result, appended before a branch reads it


@dataclass(slots=True)
class SimConfig:
    kv_capacity: int = 65536  # tokens
    max_prefill_tokens: int = 16384  # new tokens per prefill step
    max_running: int = 4096  # sequences
    gap: float | None = None  # seconds between steps (default: the cost model's)
    seed: int = 0
    # The host's speed over time, for replaying a live run: (times, factors), every
    # step from times[i] on takes factors[i] x the cost model's time, gap included
    # (before times[0]: factors[0]). None: the cost model's times as they are.
    speed: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    # Seconds a decode step with a branch in it spends in TAPER's scheduler hooks
    # (building the view, splitting off and merging back the held part, learning
    # from the step, the stats), added to its gap: the live server reports its own
    # (/taper/stats overhead.hook_seconds per regulated step). 0: not modelled.
    hook_s: float = 0.0
    # The host slowing with the traffic it serves (a CPU engine whose frontend
    # shares the cores): (alpha, slope, window_s), every step and gap taking
    # alpha + slope x (tokens decoded over the last window_s seconds) / window_s
    # times the cost model's (times SimConfig.speed's factor, where both are set).
    # None: not modelled.
    load: tuple[float, float, float] | None = None


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
    generated: int = 0  # set on admission and on finishing; the running set counts between


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


class Programs:
    """The programs' side: arrival events, stages, forks and joins, tool waits
    and the records. A subclass says where a request goes (`_submit`)."""

    def __init__(self, programs: list[Program]) -> None:
        self.events: list[tuple] = []  # (time, kind, id, payload)
        self.records: list[ProgramRecord] = []
        self._next_rid = 0
        self._next_group = 0
        self._eid = 0
        for p in programs:
            self._push(p.arrival, _ARRIVAL, p)

    # ----------------------------------------------------------------- events

    def _push(self, t: float, kind: int, payload) -> None:
        self._eid += 1
        heapq.heappush(self.events, (t, kind, self._eid, payload))

    def _fire(self, t: float, kind: int, payload) -> None:
        if kind == _ARRIVAL:
            self._arrive(payload, t)
        else:
            *args, own = payload
            self._issue(*args, at=t, own=own)

    def _arrive(self, spec: Program, t: float) -> None:
        rec = ProgramRecord(spec.pid, spec.kind, spec.arrival, t, t, spec.ttft_slo,
                            spec.tpot_slo)
        self.records.append(rec)
        prog = _Prog(spec, rec, context=spec.context_tokens())
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
               max_new: int, at: float, group: int = NO_GROUP, own: int = 0) -> _Req:
        """Queue a request. `own`: tokens of its branch's earlier generation in its
        prompt (a tool branch reading its result)."""
        self._next_rid += 1
        if group == NO_GROUP and branch >= 0:  # a tool branch's second generation
            group = prog.group
        r = _Req(self._next_rid, prog, stage, branch, role, max(1, uncached),
                 prog.context + (_BRANCH_PROMPT if branch >= 0 else 0) + own, max_new, at,
                 group, prog.spec.stages[stage].width if branch >= 0 else 1, prog.stage_start)
        self._submit(r, uncached)
        return r

    def _submit(self, r: _Req, uncached: int) -> None:
        """Send an issued request to an engine's waiting queue. `uncached`: its
        prompt tokens in no engine's prefix cache (`r.new_tokens` is that, at
        least 1, for an engine that holds the rest)."""
        raise NotImplementedError

    def _finish(self, r: _Req, t: float, token_times: list[float]) -> None:
        prog = r.prog
        prog.rec.requests.append(RequestRecord(
            stage=r.stage, branch=r.branch, role=r.role, start=r.start,
            first_token=r.first_token, end=t, token_times=token_times,
            output_tokens=r.generated, cached_tokens=r.context - r.new_tokens, error=None))
        stage = prog.spec.stages[r.stage]
        if stage.kind == "tools" and r.role == "branch":
            # The tool call: the branch waits, then reads the result. Its call is in
            # the radix cache by then (all but the last token, never fed back).
            self._push(t + stage.tool_delay, _TOOL,
                       (prog, r.stage, r.branch, "read", _TOOL_RESULT + 1,
                        stage.read_tokens[r.branch], r.generated + _TOOL_RESULT))
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


class Engine:
    """One server's side: its waiting queue, running set, KV, clock and
    controller, one scheduling pass at a time (`step`). A subclass is told of
    each request it finishes (`_finish`, at `self.t`, seconds)."""

    def __init__(self, cost: CostModel, controller: Controller,
                 config: SimConfig | None = None) -> None:
        self.cfg = config or SimConfig()
        self.cost = cost
        self.ctl = controller
        self.rng = np.random.default_rng(self.cfg.seed)
        self.gap = self.cfg.gap if self.cfg.gap is not None else getattr(cost, "gap", 0.0)
        self._speed = None
        if self.cfg.speed is not None:
            times, factors = (np.asarray(x, dtype=float) for x in self.cfg.speed)
            if not len(times) or len(times) != len(factors) or np.any(np.diff(times) < 0) \
                    or np.any(factors <= 0):
                raise ValueError("SimConfig.speed: (times, factors) of one length, at least "
                                 "one, times ascending, factors above 0")
            self._speed = (times, factors)
        self._load = None
        if self.cfg.load is not None:
            alpha, slope, window = (float(x) for x in self.cfg.load)
            if alpha <= 0 or slope < 0 or window <= 0:
                raise ValueError("SimConfig.load: (alpha > 0, slope >= 0, window_s > 0)")
            self._load = (alpha, slope, window)
            self._window: deque[tuple[float, int]] = deque()  # (step end, tokens)
            self._window_tokens = 0
        self.t = 0.0
        self.waiting = WaitingQueue()  # FIFO: admission pops from the left (`queue` appends)
        self._queued: tuple[tuple[int, int], PrefillView] | None = None  # (tokens, version)
        self._plan: tuple[tuple, tuple[int, int]] = ((), (0, 0))  # _plan_prefill's last
        self.running = RunningSet()
        self._live: dict[int, _Req] = {}  # rid -> request, for those in `running`
        # Only with cascade attention does a step's cost read the groups' shared
        # prefixes (the cost models ignore `shared_unique` otherwise).
        self._cascade = bool(getattr(controller.config, "cascade", False))
        self._reread, self._two_level_s, self._gate = cost.sharing()
        self._plain_sharing = self._reread != 1.0  # plain attention's prefix reads are cheaper
        self.kv_used = 0
        self.steps = {"prefill": 0, "decode": 0}
        self.branch_steps = 0
        self.regulated_steps = 0  # decode steps with a branch in them (the live counter's)
        self.held_steps = 0
        self.deferred_prefills = 0  # passes where the controller chose decode over prefill
        self._gated = controller.gates_prefill
        self.decode_time = 0.0
        self.prefill_time = 0.0

    def _finish(self, r: _Req, t: float, token_times: list[float]) -> None:
        raise NotImplementedError

    def queue(self, r: _Req) -> None:
        """Put `r` last in the waiting queue."""
        self.waiting.append(r, r.group < 0, r.start, r.prog.spec.ttft_slo)

    def step(self) -> bool:
        """One scheduling pass: a prefill step if one is admitted, else a decode
        step; False when there is nothing to run."""
        n, tokens = self._plan_prefill() if self.waiting else (0, 0)
        view = None
        if n:
            if not (self._gated and len(self.running)):
                self._prefill(n, tokens)
                return True
            # Ask a prefill-gating controller whether to prefill now or decode first;
            # if it defers, the same view decodes.
            view = self._view(tokens)
            if self.ctl.admit_prefill(view, view.queued):
                self._prefill(n, tokens)
                return True
            self.deferred_prefills += 1
        if self.running:
            self._decode(view or self._view(tokens))
            return True
        return False

    def _plan_prefill(self) -> tuple[int, int]:
        """How many waiting requests (FIFO) the next prefill step takes, and the
        tokens it computes (the last answer while the queue, the KV in use and the
        running count are as they were)."""
        state = (self.waiting.version, self.kv_used, len(self.running))
        if self._plan[0] == state:
            return self._plan[1]
        n, tokens = 0, 0
        budget = self.cfg.kv_capacity - self.kv_used
        room = self.cfg.max_running - len(self.running)
        for r in self.waiting:
            need = r.new_tokens + r.max_new  # reserve its output too, as SGLang does
            if n >= room or (n and tokens + r.new_tokens > self.cfg.max_prefill_tokens) \
                    or need > budget:
                break
            n += 1
            tokens += r.new_tokens
            budget -= need
        self._plan = (state, (n, tokens))
        return n, tokens

    def _view(self, tokens: int) -> StepView:
        """The running sequences' view now. A queued critical request's TTFT budgets
        the step too (controller/slack.py): `queued` is the prefill of `tokens`
        tokens the next prefill step would take, and the latency-critical
        requests waiting for it (None when none waits)."""
        queued = None
        if self.waiting:  # the same object while neither the queue nor the tokens change
            if self._queued is None or self._queued[0] != (tokens, self.waiting.version):
                self._queued = ((tokens, self.waiting.version),
                                PrefillView(tokens, *self.waiting.critical()))
            queued = self._queued[1]
        return self.running.view(self.t, len(self.waiting), queued)

    def _prefill(self, n: int, tokens: int) -> None:
        """One prefill step of the first `n` waiting requests, `tokens` tokens."""
        batch = [self.waiting.popleft() for _ in range(n)]
        context = cached_new = 0
        for r in batch:
            context += r.context
            cached_new += max(0, r.context - r.new_tokens) * r.new_tokens
        t_prefill, gap = self._at_speed(
            self.cost.prefill(tokens, len(batch), context, cached_new))
        self.ctl.observe_prefill(tokens, t_prefill)
        self.t += t_prefill + gap
        self.steps["prefill"] += 1
        self.prefill_time += t_prefill
        t = self.t
        for r in batch:
            self.kv_used += r.new_tokens + r.max_new
            r.first_token = t
            r.generated = 1
            if r.generated >= r.max_new:
                self._release(r)
                self._finish(r, t, [t])
                continue
            self._live[r.rid] = r
            # The view's fields. A program's context changes only when its stage
            # ends, when none of its requests runs, so `shared` is taken once here.
            grouped = r.group >= 0
            spec = r.prog.spec
            self.running.add(r.rid, r.group, max(r.branch, 0), r.width,
                             r.prog.context if grouped else 0, r.max_new, r.context,
                             spec.ttft_slo, spec.tpot_slo,
                             r.arrival_group if grouped else r.start, t)

    def _shared_reads(self, g, shared, in_group, kv: float):
        """(shared_unique, kv, extra seconds, two-level?) of a step whose branch
        groups share prefixes: groups the gate passes (every group without one)
        read their prefix once, plus the cost model's two-level compute per
        prefix token a branch reads; the others read it per branch in plain
        attention, re-reads at the cost model's `reread` of a fresh read."""
        shared = shared[in_group]
        if not self._cascade:  # plain attention: every group re-reads (members share one prefix)
            _, first = np.unique(g[in_group], return_index=True)
            rereads = float(shared.sum() - shared[first].sum())
            return 0.0, kv - (1.0 - self._reread) * rereads, 0.0, False
        _, first, inverse, width = np.unique(g[in_group], return_index=True,
                                             return_inverse=True, return_counts=True)
        prefix = shared[first]
        two = np.ones(len(first), bool) if self._gate is None else \
            self._gate.pays_many(width, prefix)
        reads = np.bincount(inverse, weights=shared)  # prefix tokens its branches read
        plain_rereads = float((reads - prefix)[~two].sum())
        two_reads = float(reads[two].sum())
        kv_eff = kv - two_reads - (1.0 - self._reread) * plain_rereads
        return (float(prefix[two].sum()), kv_eff, self._two_level_s * two_reads,
                bool(two.any()))

    def _at_speed(self, dt: float, gap: float | None = None) -> tuple[float, float]:
        """A step of `dt` seconds and the gap before or after it (default the
        cost model's) at the host's speed now (SimConfig.speed; as they are
        without one)."""
        gap = self.gap if gap is None else gap
        if self._speed is None and self._load is None:
            return dt, gap
        k = 1.0
        if self._speed is not None:
            times, factors = self._speed
            k = float(factors[max(0, int(np.searchsorted(times, self.t, side="right")) - 1)])
        if self._load is not None:
            alpha, slope, window = self._load
            while self._window and self._window[0][0] < self.t - window:
                self._window_tokens -= self._window.popleft()[1]
            k *= alpha + slope * self._window_tokens / window
        return dt * k, gap * k

    def _release(self, r: _Req) -> None:
        self.kv_used -= r.new_tokens + r.max_new

    def _decode(self, view: StepView) -> None:
        d = self.ctl.decide(view)
        keep = d.keep
        g = view.group[keep]
        in_group = g >= 0
        kv = float(view.kv_len[keep].sum())
        uniq, kv_eff, extra, two_level = 0.0, kv, 0.0, self._cascade
        if (self._cascade or self._plain_sharing) and in_group.any():
            uniq, kv_eff, extra, two_level = self._shared_reads(g, view.shared_len[keep],
                                                                in_group, kv)
        elif self._cascade:
            kv_eff = kv - float(view.shared_len[keep][in_group].sum())
        dt = self.cost.decode(len(keep), kv_eff, uniq, two_level) + extra
        if self.cost.step_noise:
            dt *= max(0.2, 1.0 + self.cost.step_noise * self.rng.standard_normal())
        branches = int(np.count_nonzero(in_group))
        dt, gap = self._at_speed(dt, self.gap + self.cfg.hook_s if branches else None)
        start = self.t + gap
        self.t = start + dt
        self.steps["decode"] += 1
        self.decode_time += dt
        self.branch_steps += branches
        self.regulated_steps += branches > 0
        self.held_steps += len(d.held)
        self.ctl.observe(StepResult(d, step_time=dt, end=self.t))
        if self._load is not None:
            self._window.append((self.t, len(keep)))
            self._window_tokens += len(keep)
        done = self.running.advance(keep, self.t)
        if len(done):
            # All leave the running set before any finishes: finishing may admit
            # the program's next requests to the waiting queue.
            for rid, generated, token_times in self.running.pop(done):
                r = self._live.pop(rid)
                r.generated = generated
                self._release(r)
                self._finish(r, self.t, token_times)


class Simulator(Programs, Engine):
    """One engine serving the programs: every request goes to its own queue."""

    def __init__(self, programs: list[Program], cost: CostModel, controller: Controller,
                 config: SimConfig | None = None) -> None:
        Engine.__init__(self, cost, controller, config)
        Programs.__init__(self, programs)

    def _submit(self, r: _Req, uncached: int) -> None:
        self.queue(r)

    def run(self, max_steps: int = 50_000_000) -> list[ProgramRecord]:
        for _ in range(max_steps):
            while self.events and self.events[0][0] <= self.t:
                t, kind, _, payload = heapq.heappop(self.events)
                self._fire(t, kind, payload)
            if self.step():
                continue
            if not self.events:
                break
            self.t = max(self.t, self.events[0][0])
        self.records.sort(key=lambda r: r.pid)
        return self.records
