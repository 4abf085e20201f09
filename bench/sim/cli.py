"""`taper sim`: the workload in the simulator under each policy.

A discrete-event engine driven by the real controller, with a step-time cost
model; the same sweep, metrics and report as `taper bench`. With `--replicas N`,
N such engines behind a router (`--routing`, bench/sim/replicas.py); rates and
capacity are then the whole deployment's."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from bench import options, report
from bench.calibration import capacity, from_cost, mean_context
from bench.metrics import allowance, request_tpot, summarize
from bench.sweep import SweepSpec, aggregate, same_as_eager, sweep_one
from bench.workload import at_rate, save_jsonl

DEFAULT_SIM_POLICIES = "off,eager,cap:2,cap:4,cap:8,cap:16,taper,clairvoyant"
DEFAULT_COST = "measured:bench/sim/profiles/h200_qwen3_32b_full.json"


def _setup(ns, seed: int) -> dict:
    """Everything a probe of this seed needs, computed once per process. The
    engine's isolated figures and capacity come from the cost model, unless the
    run was given measured ones (`ns.calibration`: a live run's)."""
    from bench.sim import cost as costs
    from bench.sim.engine import SimConfig

    cost = costs.load(ns.cost_model)
    progs, trace = options.load_programs(ns, seed)
    given = getattr(ns, "calibration", None)
    cal = given or from_cost(cost, mean_context(progs))
    ttft, tpot = options.slo_seconds(options.goodput(ns), cal)
    # A live calibration's fit sets per-context SLOs as live; one computed from a
    # cost model (scaleout's and plan's one-replica figures) has no fit: the model.
    progs = options.program_slos(ns, progs, cal, None if given and "fit" in given else cost)
    return {"cost": cost, "programs": progs, "calibration": cal,
            "trace": trace,
            "capacity": capacity(cal, progs) * _replicas(ns), "ttft": ttft, "tpot": tpot,
            "sim": SimConfig(kv_capacity=ns.kv_capacity, seed=seed,
                             speed=getattr(ns, "host_speed", None),
                             hook_s=getattr(ns, "hook_s", None) or 0.0,
                             load=getattr(ns, "host_load", None))}


def _replicas(ns) -> int:
    return getattr(ns, "replicas", 1)


_CACHE: dict = {}


def _setup_key(ns, seed: int) -> tuple[str, int]:
    return json.dumps(vars(ns), sort_keys=True, default=str), seed


def _probe(ns, seed: int, policy: str, rate: float) -> dict:
    from bench.sim.run import simulate
    from controller import TaperConfig

    key = _setup_key(ns, seed)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _setup(ns, seed)
    st = _CACHE[key]
    spec = options.slo_spec(ns)
    t0 = time.monotonic()
    base = TaperConfig(branch_stretch=spec.stretch).updated(ns.controller)
    progs = at_rate(st["programs"], 1.0, rate)
    if _replicas(ns) > 1:
        from bench.sim.replicas import simulate_replicas

        out = simulate_replicas(progs, st["cost"], policy, ns.replicas, ns.routing, base,
                                st["sim"])
    else:
        out = simulate(progs, st["cost"], policy, base, st["sim"])
    summary = summarize(out["records"], spec)
    return {"policy": policy, "seed": seed, "rate": rate, "load": rate / st["capacity"],
            "tpot_slo": st["tpot"], "ttft_slo": st["ttft"], "summary": summary,
            "server": out["server"], "wall_s": time.monotonic() - t0,
            "tpots_ms": [round(1e3 * t, 4) for p in out["records"] for r in p.requests
                         if r.role == "serial" and (t := request_tpot(r.token_times))
                         is not None]}


def _task(args) -> list[dict]:
    """One (policy, seed): its bisection or one rate of its grid (in a worker
    process)."""
    ns, seed, policy, spec = args
    log = None
    if not ns.quiet:
        def log(msg: str) -> None:
            print(f"[sim] {policy:11s} seed {seed}: {msg}", file=sys.stderr, flush=True)
    return sweep_one(lambda rate: _probe(ns, seed, policy, rate), spec, log)


class _Serial:
    """ProcessPoolExecutor's `map`, in this process."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc) -> None:
        pass

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def sweep_spec(ns, cap: float) -> SweepSpec:
    """Rates in programs/s from the command line, relative ones against `cap`."""
    sweep = options.parse_sweep(ns.sweep)
    start = options.parse_rate(ns.request_rate).resolve(cap)
    if sweep is None:
        return SweepSpec(grid=(start,))
    if sweep == "auto":
        return SweepSpec(start=start)
    return SweepSpec(grid=tuple(r.resolve(cap) for r in sweep))


def resolve_cost_model(ns) -> None:
    """The cost model of --gpu NAME (its profile), else --cost-model, else the
    default; both given: which one is meant is unclear, an error."""
    if getattr(ns, "gpu", None) is None:
        ns.cost_model = ns.cost_model or DEFAULT_COST
        return
    if ns.cost_model is not None:
        raise ValueError("give --gpu or --cost-model, not both")
    from bench.sim.cost import gpu_profiles

    ns.cost_model = f"measured:{gpu_profiles()[ns.gpu][0]}"


def default_kv_capacity(ns) -> None:
    """--kv-capacity when not given: what a measured GPU profile says the card
    held beside the weights (kv_capacity_tokens), else 65536 tokens for a
    linear (CPU) model and 400000 for another."""
    if ns.kv_capacity is None:
        from bench.sim import cost as costs

        model = costs.load(ns.cost_model)
        measured = getattr(model, "kv_capacity", None)
        ns.kv_capacity = int(measured) if measured else \
            65536 if model.name.startswith("linear") else 400_000


def run_sim(ns, calibration: dict | None = None) -> dict:
    """Every (policy, seed) of the command line, in parallel worker processes.
    `calibration`: measured isolated figures and capacity to use instead of the
    cost model's (see `_setup`). `ns.host_speed`, where set (bench.sim.fidelity
    sets it, the command line does not): the host's speed over a live run
    replayed (`SimConfig.speed`); `ns.hook_s` and `ns.host_load` likewise,
    TAPER's hook time per decode step with a branch (`SimConfig.hook_s`) and
    the host's slowdown with its traffic (`SimConfig.load`)."""
    from bench.sim.bound import max_rate_bound

    ns.calibration = calibration
    default_kv_capacity(ns)
    seeds = options.seeds(ns)
    policies = options.policies(ns)
    spec_slo = options.slo_spec(ns)
    firsts = {s: _setup(ns, s) for s in seeds}
    first = firsts[seeds[0]]
    options.apply_time_scale(ns, first["trace"])  # before the rates resolve
    if ns.save_trace:
        save_jsonl(first["programs"], ns.save_trace)
    # Probes here and in forked workers reuse these (each seed's workload is
    # generated once, not again per process); `_setup` does not read the rate.
    _CACHE.update({_setup_key(ns, s): f for s, f in firsts.items()})
    specs = {s: sweep_spec(ns, firsts[s]["capacity"]) for s in seeds}
    widest = max(st.width for f in firsts.values() for p in f["programs"] for st in p.stages)
    same_as = same_as_eager(policies, widest)
    # A grid's rates are independent probes, one task each, so that a grid of one
    # policy uses every core too; a bisection is one task (each probe depends on
    # the last). Runs come back in the order one process would make them.
    tasks = [(ns, s, p, part) for s in seeds for p in policies if p not in same_as
             for part in ([specs[s]] if specs[s].auto
                          else [replace(specs[s], grid=(r,)) for r in specs[s].grid])]
    workers = max(1, min(ns.workers or os.cpu_count() or 1, len(tasks)))
    runs: list[dict] = []
    probes: dict[tuple[int, str], int] = {}  # a grid's probes, numbered per (seed, policy)
    with ProcessPoolExecutor(workers) if workers > 1 else _Serial() as pool:
        for (_, s, p, _), out in zip(tasks, pool.map(_task, tasks)):
            for run in out:
                run["probe"] = probes[(s, p)] = probes.get((s, p), -1) + 1
            runs += out
    longest = {s: max(allowance(p, spec_slo) for p in firsts[s]["programs"]) for s in seeds}
    # N engines do N times the work in the same window: the relaxation scales.
    bound = {s: _replicas(ns) * max_rate_bound(firsts[s]["programs"], firsts[s]["cost"],
                                               firsts[s]["sim"], longest[s]) for s in seeds}
    return {
        "kind": "sim",
        "config": {k: v for k, v in vars(ns).items() if k != "func"},
        "workload": asdict(options.workload_config(ns)),
        "cost_model": first["cost"].describe(),
        "calibration": first["calibration"],
        "capacity_programs_per_s": {s: f["capacity"] for s, f in firsts.items()},
        "slo": {"ttft_s": first["ttft"], "tpot_s": first["tpot"],
                "basis": options.slo_basis(ns), "mode": spec_slo.mode,
                "branch_stretch": spec_slo.branch_stretch,
                "program_multiple": spec_slo.program_multiple, "drain_s": spec_slo.drain},
        "versions": report.versions(),
        "runs": runs,
        "sweep": aggregate(runs, upper_bound=bound, same_as=same_as),
        **({"trace": first["trace"]} if first["trace"] else {}),
    }


def add_sim_args(p: argparse.ArgumentParser) -> None:
    options.add_workload_args(p, DEFAULT_SIM_POLICIES, "results/sim")
    p.add_argument("--cost-model", default=None,
                   help="measured:PATH (a table of decode steps, bench/sim/profiles/), "
                   "linear:PATH (from taper profile or a live calibration), trace:PATH "
                   "(fitted to a server's TAPER_STEP_TRACE file, as it loads), or "
                   f"analytic:MODEL@GPU (qwen3-8b|qwen3-32b @ h100|h200); default {DEFAULT_COST}"
                   " (or --gpu's)")
    from bench.sim.cost import gpu_profiles

    gpus = gpu_profiles()
    p.add_argument("--gpu", choices=sorted(gpus), default=None,
                   help="the measured decode table of this GPU in bench/sim/profiles/ as the "
                   "cost model (instead of --cost-model): " + "; ".join(
                       f"{name}: {what}" for name, (_, what) in sorted(gpus.items())))
    p.add_argument("--kv-capacity", type=int, default=None,
                   help="KV tokens (default: a measured GPU profile's kv_capacity_tokens, what the "
                   "card held beside the weights; else 65536 for linear models, 400000 for "
                   "others)")
    p.add_argument("--controller", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="TaperConfig settings of the simulated controller (as taper serve's "
                   "--taper-* flags), e.g. prefill_gate=off margin=0.2")
    p.add_argument("--jobs", "--workers", dest="workers", type=int, default=None,
                   metavar="N", help="worker processes: (policy, seed) bisections and grid "
                   "rates run in parallel (default: one per CPU, os.cpu_count())")
    p.add_argument("--quiet", action="store_true", help="no line per probe")
    from bench.sim.replicas import ROUTINGS

    p.add_argument("--replicas", type=int, default=1,
                   help="servers behind a router, each with its own controller, KV and prefix "
                   "cache (default 1); --request-rate and capacity are then the deployment's")
    p.add_argument("--routing", default="group_affine", choices=list(ROUTINGS),
                   help="with --replicas > 1: round_robin (every request in turn), "
                   "least_loaded (every request to the fewest unfinished), group_affine "
                   "(a program to one replica, the least loaded; default)")


def check_options(ns) -> None:
    """The simulator's options checked before any work (ValueError/OSError with
    a one-line message): the workload's, the cost model (--gpu or
    --cost-model, resolved here), the controller's settings."""
    options.validate(ns, live=False)
    resolve_cost_model(ns)
    from controller import TaperConfig

    TaperConfig().updated(ns.controller)
    from bench.sim import cost as costs

    costs.check(costs.load(ns.cost_model))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="taper sim", description=__doc__)
    add_sim_args(p)
    ns = p.parse_args(argv)
    try:
        check_options(ns)
        if ns.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {ns.replicas}")
    except (ValueError, OSError) as e:
        print(f"taper sim: error: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    result = run_sim(ns)
    result["wall_s"] = time.monotonic() - t0
    files = report.write(result, Path(ns.result_dir), render_plots=not ns.no_plots)
    print(report.markdown(result))
    print(f"[sim] {result['wall_s']:.0f} s; results in " + ", ".join(map(str, files.values())))
    return 0
