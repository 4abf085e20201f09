"""Run a workload through the simulator under a policy."""

from __future__ import annotations

import numpy as np

from bench.sim.cost import CostModel
from bench.sim.engine import SimConfig, Simulator
from bench.workload import Program
from controller import Controller, StepTimeModel, TaperConfig
from controller.policies import Candidates
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


def oracle(cost: CostModel, gap: float) -> Controller:
    """A clairvoyant controller: TAPER's mechanism with the true cost model, no
    margin and no prediction error. Each step it admits the largest prefix of
    the extras (same priority order) whose true step time fits the true slack,
    i.e. the widest decision that still meets every critical deadline."""

    def admit(c: Candidates) -> np.ndarray:
        m = len(c.extras)
        mask = np.zeros(m, dtype=bool)
        if np.isinf(c.slack):
            mask[:] = True
            return mask
        cum = np.cumsum(c.kv_own)

        def fits(k: int) -> bool:
            kv = c.base_kv + (cum[k - 1] if k else 0.0)
            return cost.decode(c.base_n + k, kv) <= c.slack

        lo, hi = 0, m  # largest k in [0, m] with fits(k); fits is monotone in k
        if not fits(0):
            return mask
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        mask[:lo] = True
        return mask

    ctl = Controller(TaperConfig(policy="taper", margin=0.0), policy=admit, name="oracle")
    ctl.gap = gap
    return ctl


def make_controller(policy: str, cost: CostModel, gap: float, base: TaperConfig) -> Controller:
    if policy == "oracle":
        return oracle(cost, gap)
    cfg = TaperConfig(**{**{f: getattr(base, f) for f in base.__slots__}, "policy": policy,
                         "profile": None})
    return Controller(cfg, model=warm_start(cost))


def simulate(programs: list[Program], cost: CostModel, policy: str,
             base: TaperConfig | None = None, sim: SimConfig | None = None) -> dict:
    sim = sim or SimConfig()
    gap = sim.gap if sim.gap is not None else getattr(cost, "gap", 0.0)
    ctl = make_controller(policy, cost, gap, base or TaperConfig())
    s = Simulator(programs, cost, ctl, sim)
    records = s.run()
    return {"records": records,
            "server": {"mean_width": s.branch_steps / max(1, s.steps["decode"]),
                       "held_branch_steps": s.held_steps, "decode_steps": s.steps["decode"],
                       "prefill_steps": s.steps["prefill"], "decode_time_s": s.decode_time,
                       "sim_end_s": s.t}}
