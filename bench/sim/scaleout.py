"""Scale-out in the simulator: each policy's max rate on N replicas under each routing.

    python -m bench.sim.scaleout [--replica-counts 1,2,4,8,16]
        [--routings round_robin,least_loaded,group_affine] [--policies taper,eager]
        [--num-prompts PER_REPLICA] [--min-programs M] [taper sim's workload, SLO and
        cost-model flags]

Load scales with N: N replicas replay a trace of N times `--num-prompts`
programs (the same preset), so every replica sees about as many programs, over
about as long, as the one replica of N = 1. A small N is run on several seeds
(`--min-programs`: N = 1 on four traces of 40 by default) and a probe's
attainment pools the programs of all of them, so that no N is judged on a few
programs. For each (policy, routing, N) the sweep finds the highest rate at
>= 95% SLO attainment (bench/sweep.py); N = 1 is run once per policy (routing does not
matter there), and N > 1 starts its search at N times that rate, with a finer
step. SLOs and capacity are one replica's isolated figures, for every N.
Scaling efficiency is rate_N / (N * rate_1). At each highest passing rate it
also reports what splitting groups cost: prompt tokens prefilled again because
a replica lacked the program's context, and how many forks were split over
replicas. Writes result.json and result.md.
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
from bench.sim.replicas import ROUTINGS, check_routing
from bench.sweep import SweepSpec, max_rate, sweep_one

_FINE = 1.25  # N > 1: the bracketing step around the N-times-rate_1 start


def _ns(ns, replicas: int, routing: str) -> argparse.Namespace:
    """`taper sim`'s options for one deployment: N times the programs."""
    return argparse.Namespace(**{**vars(ns), "replicas": replicas, "routing": routing,
                                 "num_prompts": replicas * ns.num_prompts})


def _task(args) -> dict:
    """One (policy, routing, N): its max-rate search (in a worker process). A
    probe runs the trace of every seed at the rate and pools their programs."""
    ns, policy, routing, n, seeds, spec = args
    sub = _ns(ns, n, routing)
    t0 = time.process_time()

    def probe(rate: float) -> dict:
        runs = [cli._probe(sub, seed, policy, rate) for seed in seeds]
        att = [r["summary"]["slo_attainment"] for r in runs]  # the seeds' traces are as long
        return {"rate": rate, "summary": {"slo_attainment": sum(att) / len(att)},
                "per_seed": att, "wall_s": sum(r["wall_s"] for r in runs),
                "server": [r["server"] for r in runs]}

    def log(msg: str) -> None:
        print(f"[scaleout] {policy:6s} {routing:12s} N={n:<2d} {msg}", file=sys.stderr,
              flush=True)

    runs = sweep_one(probe, spec, log)
    return {"policy": policy, "routing": routing, "replicas": n, "seeds": seeds,
            **max_rate(runs), "probes": runs, "cpu_s": time.process_time() - t0}


def _pool(tasks: list, workers: int) -> list[dict]:
    if workers == 1 or len(tasks) == 1:
        return [_task(t) for t in tasks]
    with ProcessPoolExecutor(min(workers, len(tasks))) as pool:
        return list(pool.map(_task, tasks))


def splitting(cell: dict) -> dict | None:
    """What routing cost at the highest passing rate, over the seeds' traces:
    prompt tokens prefilled again per replica and their share of all prefilled
    tokens, the share of forks split over replicas, tool readings sent away
    from their call's replica (per trace)."""
    best = [p for p in cell["probes"] if p["passed"] and p["rate"] == cell["rate"]]
    if not best or "routing" not in best[0]["server"][0]:
        return None
    figs = [s["routing"] for s in best[0]["server"]]
    extra = sum(sum(f["extra_prefill_tokens"]) for f in figs)
    return {"extra_prefill_per_replica": extra / sum(f["replicas"] for f in figs),
            "extra_prefill_share": extra / max(1, sum(sum(f["prefill_tokens"]) for f in figs)),
            "split_groups": sum(f["split_groups"] for f in figs)
            / max(1, sum(f["groups"] for f in figs)),
            "moved_reads": sum(f["moved_reads"] for f in figs) / len(figs)}


def seeds_for(n: int, ns) -> list[int]:
    """Seeds of N's traces: enough that N times --num-prompts times seeds is at
    least --min-programs (a small N alone would be judged on a few programs)."""
    k = max(1, -(-ns.min_programs // (n * ns.num_prompts)))
    return [ns.seed + i for i in range(k)]


def run(ns) -> dict:
    counts, routings, policies = ns.counts, ns.routing_list, options.policies(ns)
    workers = ns.workers or os.cpu_count() or 1
    setup = cli._setup(_ns(ns, 1, routings[0]), ns.seed)
    cap = setup["capacity"]  # programs/s of one replica at 100% load
    # Every N and seed is judged by one replica's isolated figures (its SLOs and
    # capacity), not by its own trace's mean context.
    ns.calibration = setup["calibration"]
    start = options.parse_rate(ns.request_rate).resolve(cap)
    cells = _pool([(ns, p, "-", 1, seeds_for(1, ns), SweepSpec(start=start))
                   for p in policies if 1 in counts], workers)
    one = {c["policy"]: c["rate"] for c in cells}
    tasks = []
    for n in sorted((n for n in counts if n > 1), reverse=True):  # the longest first
        for p in policies:
            r1 = one.get(p)
            spec = SweepSpec(start=n * r1, factor=_FINE) if r1 else SweepSpec(start=n * start)
            tasks += [(ns, p, routing, n, seeds_for(n, ns), spec) for routing in routings]
    cells += _pool(tasks, workers)
    for c in cells:
        r1, n = one.get(c["policy"]), c["replicas"]
        c["per_replica"] = c["rate"] / n if c["rate"] else None
        c["efficiency"] = c["rate"] / (n * r1) if c["rate"] and r1 else None
        c["load"] = c["rate"] / (n * cap) if c["rate"] else None
        c["splitting"] = splitting(c)
    return {"kind": "sim-scaleout", "argv": sys.argv[1:],
            "config": {k: v for k, v in vars(ns).items() if k != "func"},
            "cost_model": setup["cost"].describe(), "calibration": setup["calibration"],
            "capacity_per_replica": cap,
            "slo": {"ttft_s": setup["ttft"], "tpot_s": setup["tpot"], "mode": ns.slo_mode},
            "cells": cells}


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    cells = result["cells"]
    counts = sorted({c["replicas"] for c in cells})
    slo, cfg = result["slo"], result["config"]
    lines = [f"Cost model: {result['cost_model']['name']}; SLOs TTFT {1e3 * slo['ttft_s']:.0f} "
             f"ms, TPOT {1e3 * slo['tpot_s']:.2f} ms ({slo['mode']} deadlines); capacity of "
             f"one replica {result['capacity_per_replica']:.3f} programs/s; "
             f"{cfg['num_prompts']} programs per replica; seeds per N: " + ", ".join(
                 f"N={n}: {len(next(c for c in cells if c['replicas'] == n)['seeds'])}"
                 for n in counts) + ".", "",
             "Max rate at >= 95% SLO attainment (of the programs of all the seeds' traces), "
             "programs/s (scaling efficiency rate_N / (N rate_1)):", "",
             "| policy | routing | " + " | ".join(f"N={n}" for n in counts) + " |",
             "|---|---|" + "---|" * len(counts)]
    by = {(c["policy"], c["routing"], c["replicas"]): c for c in cells}
    one = {c["policy"]: c for c in cells if c["replicas"] == 1}
    routings = list(dict.fromkeys(c["routing"] for c in cells if c["replicas"] > 1)) or ["-"]
    for policy in dict.fromkeys(c["policy"] for c in cells):
        for routing in routings:
            row = []
            for n in counts:
                c = one.get(policy) if n == 1 else by.get((policy, routing, n))
                if c is None:
                    row.append("")
                elif c["rate"] is None:
                    row.append("-")
                else:
                    eff = c["efficiency"]
                    row.append(f"{c['rate']:.3g}" + ("" if eff is None else f" ({eff:.2f})"))
            lines.append(f"| {policy} | {routing} | " + " | ".join(row) + " |")
    lines += ["", "What routing costs at each max rate (over the seeds' traces): prompt tokens "
              "prefilled again per replica, their share of all prefilled tokens, the share "
              "of forks split over replicas, tool readings sent away from their call:", "",
              "| policy | routing | N | extra prefill tokens / replica | share | split forks "
              "| readings moved |", "|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["policy"], c["routing"], c["replicas"])):
        s = c["splitting"]
        if s is None:
            continue
        lines.append(f"| {c['policy']} | {c['routing']} | {c['replicas']} | "
                     f"{s['extra_prefill_per_replica']:.0f} | "
                     f"{100 * s['extra_prefill_share']:.0f}% | "
                     f"{100 * s['split_groups']:.0f}% | {s['moved_reads']:.0f} |")
    return "\n".join(lines) + "\n"


def _list(kind, check=None):
    def parse(text: str):
        vals = [kind(t) for t in text.split(",") if t.strip()]
        for v in vals:
            if check is not None:
                check(v)
        return vals

    return parse


def _count(n: int) -> None:
    if n < 1:
        raise ValueError(f"replica counts must be >= 1, got {n}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.scaleout",
                                description=__doc__.splitlines()[0])
    cli.add_sim_args(p)
    p.set_defaults(policies="taper,eager", result_dir="bench/results/scaleout-sim",
                   num_prompts=40)
    p.add_argument("--replica-counts", dest="counts", type=_list(int, _count),
                   default=[1, 2, 4, 8, 16], help="N to run (default 1,2,4,8,16)")
    p.add_argument("--routings", dest="routing_list", type=_list(str, check_routing),
                   default=list(ROUTINGS), help=f"default {','.join(ROUTINGS)}")
    p.add_argument("--min-programs", type=int, default=160,
                   help="each N runs enough seeds (from --seed on) that its traces hold at "
                   "least this many programs in all (default 160)")
    ns = p.parse_args(argv)
    try:
        cli.check_options(ns)  # as taper sim: workload, cost model, --controller settings
    except (ValueError, OSError) as e:
        print(f"scaleout: error: {e}", file=sys.stderr)
        return 2
    ns.calibration = None
    cli.default_kv_capacity(ns)
    t0 = time.monotonic()
    result = run(ns)
    result["wall_s"] = time.monotonic() - t0
    result["cpu_s"] = sum(c["cpu_s"] for c in result["cells"])
    report.write_tables(result, markdown(result), Path(ns.result_dir), "scaleout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
