"""Run a workload through the simulator under a policy."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bench.sim.cost import CostModel
from bench.sim.engine import SimConfig, Simulator
from bench.workload import Program
from controller import Controller, StepTimeModel, TaperConfig
from controller.predictor import SCALE, features


def warm_start(cost: CostModel, cascade: bool = False) -> StepTimeModel:
    """The controller's linear predictor fitted to the cost model over a grid of
    batches, as `taper profile` fits it to the live engine."""
    xs, ys = [], []
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for ctx in (128, 512, 1024, 2048, 4096):
            xs.append(features(n, n * ctx, 0))
            ys.append(cost.decode(n, n * ctx))
    x, y = np.asarray(xs), np.asarray(ys)
    w = np.zeros(len(SCALE))
    cols = [0, 1, 2]
    sol, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
    w[cols] = sol
    w[3] = cost.prefill(1024, 1) - cost.prefill(0, 1) if hasattr(cost, "prefill") else 0.0
    return StepTimeModel(tuple(float(v) for v in w), source=f"fit:{cost.name}")


def make_controller(policy: str, cost: CostModel, base: TaperConfig | None = None
                    ) -> Controller:
    """The controller the simulator runs under `policy`, with `base`'s other
    settings. Its predictor is warm-started from the cost model, as a live
    server is from `taper profile`; `clairvoyant` gets the true cost model and
    no margin (it has no prediction error to hold back for)."""
    fields = (base or TaperConfig()).to_dict()
    fields.update(policy=policy, profile=None)
    cfg = TaperConfig(**fields)
    if cfg.spec.entry.needs_cost:
        return Controller(replace(cfg, margin=0.0), cost=cost)
    return Controller(cfg, model=warm_start(cost))


def simulate(programs: list[Program], cost: CostModel, policy: str,
             base: TaperConfig | None = None, sim: SimConfig | None = None) -> dict:
    sim = sim or SimConfig()
    ctl = make_controller(policy, cost, base)
    s = Simulator(programs, cost, ctl, sim)
    records = s.run()
    return {"records": records,
            "server": {"mean_width": s.branch_steps / max(1, s.steps["decode"]),
                       "held_branch_steps": s.held_steps, "decode_steps": s.steps["decode"],
                       "prefill_steps": s.steps["prefill"],
                       "deferred_prefills": s.deferred_prefills, "decode_time_s": s.decode_time,
                       "sim_end_s": s.t}}
