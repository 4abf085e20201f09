"""How many replicas a load needs, per policy: `python -m bench.sim.plan`.

    python -m bench.sim.plan --rate 2 [--gpu h200] [--policies eager,taper]
        [--max-replicas 64] [taper sim's workload, SLO, routing and cost flags]

For each policy, the fewest replicas (engines behind the router, `--routing`,
as `taper sim --replicas N`) that serve `--rate` programs/s, the whole
deployment's, at >= 95% SLO attainment in the simulator. The SLOs are one
replica's isolated figures (as bench.sim.scaleout judges every N), so they
do not move with N. Attainment is taken to grow with N: N doubles from 1
until a deployment passes, then a bisection between the last failing and the
first passing N finds the fewest. `--num-prompts` programs are replayed at
`--rate` whatever N (default 400: 200 s of arrivals at 2 programs/s).
Writes result.json and result.md to `--result-dir`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench import options, report
from bench.sim import cli
from bench.sweep import TARGET


def _ns(ns, replicas: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(ns), "replicas": replicas})


def fewest(attains, max_n: int, log=None) -> tuple[int | None, dict[int, float]]:
    """The fewest N in 1..max_n with attains(N) >= TARGET (None if even max_n
    fails), and every N tried with its attainment: doubling, then bisection."""
    tried: dict[int, float] = {}

    def ok(n: int) -> bool:
        if n not in tried:
            tried[n] = attains(n)
            if log:
                log(f"N={n}: attainment {100 * tried[n]:.1f}%")
        return tried[n] >= TARGET

    lo, hi = 0, 1  # lo fails (0 replicas serve nothing), hi is the next to try
    while not ok(hi):
        if hi >= max_n:
            return None, tried
        lo, hi = hi, min(2 * hi, max_n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi, tried


def _task(args) -> dict:
    """One policy's search (in a worker process)."""
    ns, policy = args
    t0 = time.process_time()

    def attains(n: int) -> float:
        run = cli._probe(_ns(ns, n), ns.seed, policy, ns.rate)
        runs[n] = run["summary"]
        return run["summary"]["slo_attainment"]

    def log(msg: str) -> None:
        if not ns.quiet:
            print(f"[plan] {policy:11s} {msg}", file=sys.stderr, flush=True)

    runs: dict[int, dict] = {}
    n, tried = fewest(attains, ns.max_replicas, log)
    return {"policy": policy, "replicas": n, "tried": tried,
            "at_fewest": runs.get(n) if n else None, "cpu_s": time.process_time() - t0}


def run(ns) -> dict:
    setup = cli._setup(_ns(ns, 1), ns.seed)
    ns.calibration = setup["calibration"]  # one replica's isolated figures, for every N
    policies = options.policies(ns)
    tasks = [(ns, p) for p in policies]
    workers = max(1, min(ns.workers or os.cpu_count() or 1, len(tasks)))
    if workers == 1:
        cells = [_task(t) for t in tasks]
    else:
        with ProcessPoolExecutor(workers) as pool:
            cells = list(pool.map(_task, tasks))
    return {"kind": "sim-plan", "argv": sys.argv[1:], "rate": ns.rate,
            "config": {k: v for k, v in vars(ns).items() if k != "func"},
            "cost_model": setup["cost"].describe(), "calibration": setup["calibration"],
            "capacity_per_replica": setup["capacity"],
            "slo": {"ttft_s": setup["ttft"], "tpot_s": setup["tpot"], "mode": ns.slo_mode},
            "cells": cells}


def markdown(result: dict) -> str:
    slo, cfg = result["slo"], result["config"]
    lines = [f"{result['rate']:g} programs/s of `{cfg['workload']}` "
             f"({cfg['num_prompts']} programs, seed {cfg['seed']}), routing "
             f"{cfg['routing']}; cost model {result['cost_model']['name']}; SLOs TTFT "
             f"{1e3 * slo['ttft_s']:.0f} ms, TPOT {1e3 * slo['tpot_s']:.2f} ms "
             f"({slo['mode']} deadlines); one replica's capacity "
             f"{result['capacity_per_replica']:.3f} programs/s.", "",
             "| policy | fewest replicas at >= 95% attainment | attainment there | "
             "each N tried (attainment) |", "|---|---|---|---|"]
    for c in result["cells"]:
        tried = ", ".join(f"{n}: {100 * a:.1f}%" for n, a in sorted(c["tried"].items()))
        n = c["replicas"]
        there = "-" if n is None else f"{100 * c['tried'][n]:.1f}%"
        need = n if n else f"> {cfg['max_replicas']}"
        lines.append(f"| {c['policy']} | {need} | {there} | {tried} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.plan",
                                description=__doc__.splitlines()[0])
    cli.add_sim_args(p)
    p.set_defaults(policies="eager,taper", result_dir="results/plan", num_prompts=400)
    p.add_argument("--rate", type=float, required=True,
                   help="programs/s the whole deployment must serve")
    p.add_argument("--max-replicas", type=int, default=64,
                   help="give up past this many replicas (default 64)")
    ns = p.parse_args(argv)
    try:
        cli.check_options(ns)
        if ns.sweep or ns.seeds or ns.replicas != 1:
            raise ValueError("the rate is --rate, the replicas are what plan finds, one seed "
                             "(--seed): no --sweep, --seeds or --replicas")
        if not ns.rate > 0:
            raise ValueError(f"--rate must be > 0 programs/s, got {ns.rate}")
        if ns.max_replicas < 1:
            raise ValueError(f"--max-replicas must be >= 1, got {ns.max_replicas}")
    except (ValueError, OSError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    cli.default_kv_capacity(ns)
    t0 = time.monotonic()
    result = run(ns)
    result["wall_s"] = time.monotonic() - t0
    report.write_tables(result, markdown(result), Path(ns.result_dir), "plan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
