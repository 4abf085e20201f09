"""How fast the simulator runs: `python -m bench.sim.speed [--num-prompts N]`.

Times one fixed simulation (by default taper on the measured H200 profile,
2000 programs at 1 program/s) and prints programs/s, the wall time and how it
splits between the controller (decide + observe), the cost model and the
engine's own bookkeeping. `--engine PATH` times another engine file with the
same interface instead (e.g. an older one: `git show REV:bench/sim/engine.py >
/tmp/engine_old.py`), so a before/after comparison is two commands.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import replace
from types import ModuleType

from bench.sim import cost as costs
from bench.sim.run import make_controller
from bench.workload import WorkloadConfig, generate

MEASURED = "measured:bench/sim/profiles/h200_qwen3_32b_decode.json"


class _Timed:
    """Forwards to `inner`, adding the seconds spent in `methods` to `spent`."""

    def __init__(self, inner, methods: tuple[str, ...]) -> None:
        self._inner, self.spent = inner, 0.0
        for name in methods:
            setattr(self, name, self._wrap(getattr(inner, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent += time.perf_counter() - t0
        return timed

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def _engine(path: str | None) -> ModuleType:
    if path is None:
        from bench.sim import engine
        return engine
    spec = importlib.util.spec_from_file_location("_timed_engine", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while being built
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=2000, help="programs to simulate")
    p.add_argument("--request-rate", type=float, default=1.0, help="programs per second")
    p.add_argument("--policy", default="taper")
    p.add_argument("--cost-model", default=MEASURED)
    p.add_argument("--seed", type=int, default=1, help="the workload's seed")
    p.add_argument("--engine", default=None, help="path of an engine module to time instead")
    ns = p.parse_args(argv)

    # The workload is pinned field by field so that preset changes do not move it.
    progs = generate(WorkloadConfig(
        num_programs=ns.num_prompts, rate=ns.request_rate, seed=ns.seed,
        prompt_tokens=(1024, 4096), chat_tokens=(64, 256), serial_tokens=(32, 128),
        width=(4, 16), branch_tokens=(128, 512)))
    progs = [replace(q, ttft_slo=2.0, tpot_slo=0.03) for q in progs]
    engine = _engine(ns.engine)
    cost = _Timed(costs.load(ns.cost_model), ("decode", "prefill"))
    ctl = _Timed(make_controller(ns.policy, cost._inner), ("decide", "observe"))
    sim = engine.Simulator(progs, cost, ctl, engine.SimConfig())
    t0 = time.perf_counter()
    sim.run()
    wall = time.perf_counter() - t0
    steps = sim.steps["decode"] + sim.steps["prefill"]
    own = wall - ctl.spent - cost.spent
    print(f"engine {ns.engine or 'bench.sim.engine'}: {ns.num_prompts} programs, {ns.policy}, "
          f"{cost.name}, rate {ns.request_rate}/s")
    print(f"wall {wall:.2f} s   {ns.num_prompts / wall:.1f} programs/s   "
          f"{steps / wall:.0f} steps/s ({sim.steps['decode']} decode, "
          f"{sim.steps['prefill']} prefill)")
    for name, s in (("controller", ctl.spent), ("cost model", cost.spent), ("engine", own)):
        print(f"  {name:<11}{s:7.2f} s  {s / wall:4.0%}  {s / max(1, steps) * 1e6:6.1f} us/step")


if __name__ == "__main__":
    main()
