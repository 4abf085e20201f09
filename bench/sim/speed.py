"""How fast the simulator runs: `python -m bench.sim.speed [--num-prompts N]`.

Alone, it times one fixed simulation in this process (by default taper on the
measured H200 profile, 2000 programs at 1 program/s) and prints programs/s,
the wall and CPU time and how the CPU time splits between the controller's
calls (decide, observe, ...), the cost model and the engine's own bookkeeping
(CPU time: other processes on the machine do not move it; the clock read per
call, about 1 us, is counted in the parts).

`--before PATH` compares this checkout with another one at PATH (e.g. one made
by `git worktree add /tmp/before REV`): it runs the standard `taper sim`
command (`--cli-args`, by default the issue's 10,000-program taper run) in
each, alternately, `--repeat` times each, in fresh processes, and prints each
run's wall and CPU seconds, the medians, their ratio and whether the two
trees' results are the same (every run's figures but its wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

MEASURED = "measured:bench/sim/profiles/h200_qwen3_32b_decode.json"
CLI_ARGS = (f"--cost-model {MEASURED} --policies taper --num-prompts 10000 --request-rate 1.0 "
            "--workers 1 --quiet --no-plots")
_RUN_CLI = "import sys; from bench.sim.cli import main; sys.exit(main(sys.argv[1:]))"


class _Timed:
    """Forwards to `inner`, adding the CPU seconds spent in each of `methods` to
    `spent[name]`."""

    def __init__(self, inner, methods: tuple[str, ...]) -> None:
        self._inner = inner
        self.spent = dict.fromkeys(methods, 0.0)
        for name in methods:
            setattr(self, name, self._wrap(name, getattr(inner, name)))

    def _wrap(self, name: str, fn):
        spent = self.spent

        clock = time.process_time

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += clock() - t0
        return timed

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def time_here(ns) -> None:
    """One simulation in this process, with the CPU time split by part."""
    from bench.sim import cost as costs
    from bench.sim.engine import SimConfig, Simulator
    from bench.sim.run import make_controller
    from bench.workload import WorkloadConfig, generate

    # The workload is pinned field by field so that preset changes do not move it.
    progs = generate(WorkloadConfig(
        num_programs=ns.num_prompts, rate=ns.request_rate, seed=ns.seed,
        prompt_tokens=(1024, 4096), chat_tokens=(64, 256), serial_tokens=(32, 128),
        width=(4, 16), branch_tokens=(128, 512)))
    progs = [replace(q, ttft_slo=2.0, tpot_slo=0.03) for q in progs]
    cost = _Timed(costs.load(ns.cost_model), ("decode", "prefill"))
    ctl = _Timed(make_controller(ns.policy, cost._inner),
                 ("decide", "observe", "admit_prefill", "observe_prefill"))
    sim = Simulator(progs, cost, ctl, SimConfig(kv_capacity=ns.kv_capacity))
    t0, c0 = time.perf_counter(), time.process_time()
    sim.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = sim.steps["decode"] + sim.steps["prefill"]
    print(f"{ns.num_prompts} programs, {ns.policy}, {cost.name}, rate {ns.request_rate}/s, "
          f"KV {ns.kv_capacity} tokens")
    print(f"wall {wall:.2f} s (CPU {cpu:.2f} s)   {ns.num_prompts / wall:.1f} programs/s   "
          f"{steps / wall:.0f} steps/s ({sim.steps['decode']} decode, "
          f"{sim.steps['prefill']} prefill)")
    parts = {f"ctl.{k}": v for k, v in ctl.spent.items()}
    parts["cost model"] = sum(cost.spent.values())
    parts["engine"] = cpu - sum(parts.values())
    for name, s in parts.items():
        print(f"  {name:<20}{s:7.2f} s CPU  {s / cpu:4.0%}  {s / max(1, steps) * 1e6:6.1f} us/step")


def _run_cli(tree: Path, args: list[str], out: Path) -> tuple[float, float]:
    """`taper sim ARGS` in `tree`, results under `out`: (wall, CPU) seconds of the
    child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _RUN_CLI, *args, "--result-dir", str(out)],
                   cwd=tree, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(tree)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _figures(out: Path) -> list[dict]:
    """A result's runs without what may differ between two identical simulations."""
    runs = json.loads((out / "result.json").read_text())["runs"]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in runs]


def compare(ns) -> None:
    """This tree against `ns.before`, interleaved (see the module docstring)."""
    trees = {"before": Path(ns.before).resolve(), "after": Path.cwd()}
    args = shlex.split(ns.cli_args)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ns.repeat):
            for name, tree in trees.items():
                wall, cpu = _run_cli(tree, args, Path(tmp) / f"{name}{i}")
                times[name].append((wall, cpu))
                print(f"run {i + 1} {name:<6} wall {wall:7.1f} s  CPU {cpu:7.1f} s", flush=True)
        same = all(_figures(Path(tmp) / f"before{i}") == _figures(Path(tmp) / f"after{i}")
                   for i in range(ns.repeat))
    med = {k: [statistics.median(t[j] for t in v) for j in (0, 1)] for k, v in times.items()}
    print(f"taper sim {ns.cli_args}")
    for k, (wall, cpu) in med.items():
        print(f"  {k:<6} median wall {wall:7.1f} s  CPU {cpu:7.1f} s  ({trees[k]})")
    print(f"  speed-up: wall {med['before'][0] / med['after'][0]:.2f}x, "
          f"CPU {med['before'][1] / med['after'][1]:.2f}x; results identical: "
          f"{'yes' if same else 'NO'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=2000, help="programs to simulate")
    p.add_argument("--request-rate", type=float, default=1.0, help="programs per second")
    p.add_argument("--policy", default="taper")
    p.add_argument("--cost-model", default=MEASURED)
    p.add_argument("--seed", type=int, default=1, help="the workload's seed")
    p.add_argument("--kv-capacity", type=int, default=400_000,
                   help="KV tokens (taper sim's default for a measured or analytic model)")
    p.add_argument("--before", default=None, metavar="PATH",
                   help="a checkout to compare with, run for run (see above)")
    p.add_argument("--cli-args", default=CLI_ARGS, help="with --before: the taper sim flags")
    p.add_argument("--repeat", type=int, default=3, help="with --before: runs per tree")
    ns = p.parse_args(argv)
    if ns.before:
        compare(ns)
    else:
        time_here(ns)


if __name__ == "__main__":
    main()
