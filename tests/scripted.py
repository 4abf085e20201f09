"""A scripted decode loop over the controller, for CPU tests.

Sequences decode one token per step they are admitted to; the step takes a
synthetic time `step_model(n_seqs, kv_tokens)`; time advances by the step plus
a fixed gap. No prefill, no arrivals after the start: a test harness, not the
simulator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from controller import Controller, Seq, StepResult, StepView


@dataclass
class Script:
    seqs: list[Seq]
    target: dict[str, int]  # output tokens each sequence generates before it finishes
    step_model: Callable[[int, int], float]  # (seqs, kv tokens) -> seconds
    gap: float = 0.0005  # seconds between steps
    noise: float = 0.0  # relative std of step-time noise
    seed: int = 0
    token_times: dict[str, list[float]] = field(default_factory=dict)
    widths: list[dict[int, int]] = field(default_factory=list)  # per step: group -> kept
    max_held_run: dict[str, int] = field(default_factory=dict)

    def run(self, ctl: Controller, now: float = 0.0, max_steps: int = 100_000) -> float:
        rng = np.random.default_rng(self.seed)
        live = {s.sid: s for s in self.seqs}
        held_run: dict[str, int] = {}
        for s in self.seqs:
            self.token_times[s.sid] = [s.first_token] if s.first_token is not None else []
        for _ in range(max_steps):
            if not live:
                return now
            seqs = list(live.values())
            now += self.gap
            view = StepView.from_seqs(seqs, now=now)
            d = ctl.decide(view)
            kept = [seqs[i] for i in d.keep]
            t = self.step_model(len(kept), sum(s.kv_len for s in kept))
            t *= max(0.1, 1.0 + self.noise * rng.standard_normal())
            now += t
            width: dict[int, int] = {}
            for s in kept:
                s.generated += 1
                s.kv_len += 1
                self.token_times[s.sid].append(now)
                held_run[s.sid] = 0
                if s.group >= 0:
                    width[s.group] = width.get(s.group, 0) + 1
                if s.generated >= self.target[s.sid]:
                    del live[s.sid]
            for i in d.held:
                sid = seqs[i].sid
                held_run[sid] = held_run.get(sid, 0) + 1
                self.max_held_run[sid] = max(self.max_held_run.get(sid, 0), held_run[sid])
            self.widths.append(width)
            ctl.observe(StepResult(d, step_time=t, end=now))
        raise AssertionError("script did not finish")

    def mean_tpot(self, sid: str) -> float:
        times = self.token_times[sid]
        return (times[-1] - times[0]) / (len(times) - 1)
