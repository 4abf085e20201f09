"""Run a workload through the simulator under a policy."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bench.sim.cost import CostModel
from bench.sim.engine import Engine, SimConfig, Simulator
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
    # With cascade, the controller counts a prefix once only for the groups the
    # engine sends down the two-level path: the cost model's gate, where it has one.
    gate = cost.sharing()[2] if cfg.cascade else None
    extra = {"cascade_gate": gate} if gate is not None else {}
    if cfg.spec.entry.needs_cost:
        return Controller(replace(cfg, margin=0.0), cost=cost, **extra)
    return Controller(cfg, model=warm_start(cost), **extra)


def simulate(programs: list[Program], cost: CostModel, policy: str,
             base: TaperConfig | None = None, sim: SimConfig | None = None) -> dict:
    sim = sim or SimConfig()
    ctl = make_controller(policy, cost, base)
    s = Simulator(programs, cost, ctl, sim)
    records = s.run()
    return {"records": records, "server": server_figures([s], s.t)}


def server_figures(engines: list[Engine], end: float) -> dict:
    """The engines' step counters, summed (`mean_width`: branches per decode
    step with a branch in it, as the live server counts it, bench/server_stats.py;
    `sim_end_s`: seconds, when the last step ended)."""
    decode = sum(e.steps["decode"] for e in engines)
    regulated = sum(e.regulated_steps for e in engines)
    return {"mean_width": sum(e.branch_steps for e in engines) / max(1, regulated),
            "regulated_steps": regulated,
            "held_branch_steps": sum(e.held_steps for e in engines), "decode_steps": decode,
            "prefill_steps": sum(e.steps["prefill"] for e in engines),
            "deferred_prefills": sum(e.deferred_prefills for e in engines),
            "decode_time_s": sum(e.decode_time for e in engines),
            "prefill_time_s": sum(e.prefill_time for e in engines), "sim_end_s": end}
