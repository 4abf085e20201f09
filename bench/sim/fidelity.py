"""Simulated vs live, workload by workload (CPU engine): `python -m bench.sim.fidelity`.

    .venv/bin/python -m bench.sim.fidelity [--cases default,parallel-reasoning,mooncake]
        [--policy taper] [--seed 0] [--result-dir DIR (default results/fidelity)]

Per case (a `taper bench` workload and a load, `CASES`): a fresh `taper serve`
is calibrated (its isolated TTFT/TPOT set the SLOs, its step times fit a
linear cost model), the workload runs live at the case's load, then the
simulator replays the same programs, at the same rate and SLOs, on the model
fitted to that very server. Goodput, SLO attainment and TPOT p50/p99 are
printed side by side with sim/live - 1 (target, issue 15: within 10% on
each). Writes result.json and result.md to --result-dir.

The cases: today's default mix (the main job's: `long-context` at a quarter of
its lengths, TPOT SLO 3x), a reasoning preset with long branches
(`parallel-reasoning`, contexts of 1-4K tokens), and a bursty trace (the first
40 requests of Mooncake's conversation trace, 30% of them branch programs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

FIELDS = (("goodput", lambda s: s["goodput"]), ("attainment", lambda s: s["slo_attainment"]),
          ("TPOT p50", lambda s: s["tpot_s"]["p50"]), ("TPOT p99", lambda s: s["tpot_s"]["p99"]))
TARGET = 0.10  # |sim/live - 1| on every figure

MOONCAKE = "mooncake:bench/data/mooncake_conversation_sample.jsonl"
# name -> (taper bench's workload flags, load: a share of the measured capacity)
CASES: dict[str, tuple[list[str], str]] = {
    "default": ([], "35%"),
    "parallel-reasoning": (["--workload", "parallel-reasoning", "--length-scale", "1",
                            "--branch-tokens", "64,256", "--num-prompts", "20"], "30%"),
    "mooncake": (["--dataset", MOONCAKE, "--num-prompts", "40", "--length-scale", "0.1",
                  "--max-prompt-tokens", "6000", "--branch-tokens", "320,1280"], "2.5%"),
}


def compare(live: dict, sim: dict) -> list[dict]:
    """Each figure live and simulated, with sim/live - 1 (None where live is 0)."""
    rows = []
    for name, get in FIELDS:
        a, b = get(live), get(sim)
        rows.append({"figure": name, "live": a, "sim": b,
                     "rel_diff": (b / a - 1) if a else None})
    return rows


def case_ns(name: str, policy: str, seed: int, out: Path) -> argparse.Namespace:
    """The case's `taper bench` options, validated (ValueError: a bad one)."""
    from bench import cli as bench_cli
    from bench import options

    flags, load = CASES[name]
    ns = bench_cli.parse([*flags, "--policies", policy, "--seed", str(seed),
                          "--request-rate", load, "--result-dir", str(out / name),
                          "--no-plots"])
    options.validate(ns, live=True)
    return ns


def run_case(name: str, policy: str, seed: int, out: Path) -> dict:
    from bench import cli as bench_cli
    from bench import options
    from bench.sim.cli import run_sim

    flags, load = CASES[name]
    case_dir = out / name
    case_dir.mkdir(parents=True, exist_ok=True)
    ns = case_ns(name, policy, seed, out)
    bench = bench_cli.LiveBench(ns)
    with bench.server(policy) as srv:
        bench.calibrated(srv)
        cap = bench.result["capacity_programs_per_s"][seed]
        rate = options.parse_rate(load).resolve(cap)
        live = bench.probe(srv, seed, rate)
    fit_path = case_dir / "live_cost_model.json"
    fit_path.write_text(json.dumps(bench.calibration["fit"], indent=1))
    sim_ns = argparse.Namespace(**{
        **vars(ns), "cost_model": f"linear:{fit_path}", "sweep": None,
        "request_rate": repr(rate), "policies": policy, "kv_capacity": 65536, "workers": 1,
        "quiet": True, "save_trace": None, "seeds": [seed], "controller": [],
        "replicas": 1})
    sim = run_sim(sim_ns, calibration=bench_cli.sim_calibration(bench.calibration))
    sim_run = sim["runs"][0]
    return {"case": name, "flags": flags, "load": load, "rate": rate, "policy": policy,
            "seed": seed, "calibration": bench.result["calibration"], "slo": bench.result["slo"],
            "rows": compare(live["summary"], sim_run["summary"]),
            "live": live["summary"], "sim": sim_run["summary"],
            "live_server": live["server"], "sim_server": sim_run["server"]}


def markdown(result: dict) -> str:
    lines = [f"Policy {result['policy']}, seed {result['seed']}; sim/live - 1, target within "
             f"{100 * TARGET:.0f}% on each figure.", ""]
    for c in result["cases"]:
        cal = c["calibration"]
        lines += [f"**{c['case']}** (`{' '.join(c['flags']) or 'the default workload'}`, "
                  f"{c['rate']:.3g} programs/s = {c['load']} of capacity; isolated TPOT "
                  f"{1e3 * cal['tpot_s']:.2f} ms, TTFT {1e3 * cal['ttft_s']:.1f} ms)", "",
                  "| figure | live | sim | sim/live - 1 |", "|---|---|---|---|"]
        for r in c["rows"]:
            rel = "-" if r["rel_diff"] is None else f"{100 * r['rel_diff']:+.1f}%"
            lines.append(f"| {r['figure']} | {r['live']:.4g} | {r['sim']:.4g} | {rel} |")
        lines.append("")
    within = [abs(r["rel_diff"]) <= TARGET for c in result["cases"] for r in c["rows"]
              if r["rel_diff"] is not None]
    lines.append(f"{sum(within)} of {len(within)} figures within {100 * TARGET:.0f}%.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.fidelity",
                                description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated, of {', '.join(CASES)} (default: all)")
    p.add_argument("--policy", default="taper")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-dir", default="results/fidelity")
    ns = p.parse_args(argv)
    cases = [c for c in ns.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        print(f"fidelity: error: unknown case(s) {unknown}; choose from {', '.join(CASES)}",
              file=sys.stderr)
        return 2
    out = Path(ns.result_dir)
    try:  # every case's options before the first server starts
        for name in cases:
            case_ns(name, ns.policy, ns.seed, out)
    except ValueError as e:
        print(f"fidelity: error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    result = {"kind": "fidelity", "argv": sys.argv[1:], "policy": ns.policy, "seed": ns.seed,
              "cases": []}
    for name in cases:
        result["cases"].append(run_case(name, ns.policy, ns.seed, out))
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    result["wall_s"] = time.monotonic() - t0
    from bench import report

    report.write_tables(result, markdown(result), out, "fidelity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
