"""The simulator's results do not change when its implementation is made faster.

Each case runs a fixed set of programs through the simulator and hashes every
record field bit for bit with the simulator's counters. The expected digests
live in tests/fixtures/sim_identity.json, written by the code from before a
speed-up (`python -m tests.test_sim_speed_identity --write` run in a checkout
of that revision, e.g. `git worktree add /tmp/before REV`): a speed-up must
leave every digest as it is. The cases cover every deployable policy, the
starvation, urgency and cascade paths of taper's decisions, step noise (the
RNG), and two replicas behind a router. A digest also moves when the
controller, `warm_start` or a cost profile changes what the run does: a change
to what the simulator models rewrites the fixture on purpose, with the code
from before the change (proving the speed-up alone changed nothing) and then
with the new one; say which in the commit. The fixture was written by commit
d15325a, before the simulator and the controller were made faster (issue 15);
its two original cases kept their earlier digests.

History of the two original digests (taper and cap:4 on 120 programs):
recomputed once when the engine took a program's prompt length from the
workload and counted a tool branch's call and result in its context; taper's
again when it began to gate prefills (controller/prefill.py) and for two
changes of what it decides (issue 11: the predictor's prior scales with the
data, its weights have a floor, outliers are not learnt from; a queued
latency-critical request's TTFT budgets the step). cap:4's did not move.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.sim import cost as costs
from bench.sim.engine import SimConfig, Simulator
from bench.sim.run import warm_start
from bench.workload import Program, Stage
from controller import Controller, TaperConfig

MEASURED = "measured:bench/sim/profiles/h200_qwen3_32b_decode.json"
NOISY = "linear:bench/sim/profiles/cpu_tiny_llama.json"  # step noise: exercises the RNG
FIXTURE = Path(__file__).parent / "fixtures" / "sim_identity.json"
# The record fields hashed, in their order of the fixture's time: a field added to
# the records since (as `prompt_tokens`, which the simulator leaves at 0) is not.
PROGRAM_FIELDS = ("pid", "kind", "arrival", "start", "end", "ttft_slo", "tpot_slo", "stages",
                  "requests", "error")
STAGE_FIELDS = ("index", "kind", "start", "end", "width", "longest", "tool_delay")
REQUEST_FIELDS = ("stage", "branch", "role", "start", "first_token", "end", "token_times",
                  "output_tokens", "cached_tokens", "error")

# name -> (policy, cost model, TaperConfig overrides, replicas, routing)
CASES: dict[str, tuple[str, str, dict, int, str]] = {
    "taper": ("taper", MEASURED, {}, 1, ""),
    "cap:4 noisy": ("cap:4", NOISY, {}, 1, ""),
    "cap:2": ("cap:2", MEASURED, {}, 1, ""),
    "off": ("off", MEASURED, {}, 1, ""),
    "eager noisy": ("eager", NOISY, {}, 1, ""),
    "taper noisy": ("taper", NOISY, {}, 1, ""),
    # short starvation, urgency and cascade: the dynamic mandatory sets
    "taper starve urgent cascade": ("taper", MEASURED, {"max_hold_steps": 6,
                                                        "urgent_paces": 3.0,
                                                        "cascade": True}, 1, ""),
    "taper 2 replicas": ("taper", MEASURED, {}, 2, "round_robin"),
}


def _plain(x):
    """JSON-ready, floats as repr (exact), so that the digest sees every bit."""
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def programs(n: int = 120, seed: int = 1) -> list[Program]:
    """A fixed mix of chat, fork-join, tool and tree programs, built here rather
    than by `bench.workload.generate` so that a change of the workload presets
    does not move the digests. Prompt lengths are given in tokens."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0, n))
    out = []
    for i, t in enumerate(arrivals):
        kind = ("chat", "chat", "parallel", "tools", "tree")[int(rng.integers(5))]

        def toks(lo: int, hi: int, size: int) -> list[int]:
            return rng.integers(lo, hi + 1, size=size).tolist()

        def fork(width: int) -> Stage:
            return Stage("parallel", toks(128, 512, width))

        serial = Stage("serial", toks(32, 128, 1))
        width = int(rng.integers(4, 17))
        if kind == "chat":
            stages = [Stage("serial", toks(64, 256, 1))]
        elif kind == "parallel":
            stages = [serial, fork(width), Stage("serial", toks(32, 128, 1))]
        elif kind == "tools":
            stages = [serial, Stage("tools", toks(64, 256, width), float(rng.uniform(0.05, 0.3)),
                                    toks(64, 256, width))]
        else:
            stages = [serial, fork(width), Stage("serial", toks(32, 128, 1)), fork(width)]
        n_prompt = int(rng.integers(24, 1024))
        out.append(Program(f"p{i:05d}", kind, float(t), "x" * (4 * n_prompt), 2.0, 0.03, stages,
                           prompt_tokens=n_prompt))
    return out


def _fields(obj, names: tuple[str, ...]) -> dict:
    return {k: getattr(obj, k) for k in names}


def _record(p) -> dict:
    """A program record as `dataclasses.asdict` gave it with PROGRAM_FIELDS."""
    out = _fields(p, PROGRAM_FIELDS)
    out["stages"] = [_fields(s, STAGE_FIELDS) for s in p.stages]
    out["requests"] = [_fields(r, REQUEST_FIELDS) for r in p.requests]
    return out


def run_case(name: str) -> dict:
    """One case's digest (sha256 of every record field and the counters) and a
    few figures that say what moved when the digest does."""
    policy, cost_spec, overrides, replicas, routing = CASES[name]
    cost = costs.load(cost_spec)
    cfg = TaperConfig(policy=policy, **overrides)
    sim_cfg = SimConfig(seed=3)
    if replicas > 1:
        from bench.sim.replicas import Cluster

        ctls = [Controller(cfg, model=warm_start(cost)) for _ in range(replicas)]
        sim = Cluster(programs(), cost, ctls, routing, sim_cfg)
        engines = sim.replicas
    else:
        sim = Simulator(programs(), cost, Controller(cfg, model=warm_start(cost)), sim_cfg)
        engines = [sim]
    records = sim.run()
    out = {"records": [_record(r) for r in records],
           "server": [[e.steps, e.branch_steps, e.held_steps, e.decode_time, e.t]
                      for e in engines]}
    if replicas == 1:  # the original digests' layout
        out["server"] = out["server"][0]
    return {"digest": hashlib.sha256(json.dumps(_plain(out)).encode()).hexdigest(),
            "decode_steps": sum(e.steps["decode"] for e in engines),
            "held_steps": sum(e.held_steps for e in engines),
            "end_s": repr(max(e.t for e in engines))}


@pytest.mark.parametrize("name", list(CASES))
def test_results_identical_to_the_reference(name):
    expected = json.loads(FIXTURE.read_text())[name]
    assert run_case(name) == expected


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_sim_speed_identity --write")
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({n: run_case(n) for n in CASES}, indent=1) + "\n")
    print(f"wrote {FIXTURE}")
