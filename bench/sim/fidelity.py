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
import os
import resource
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


# The cost models each case is simulated on: (key, what it is fitted to, where).
MODELS = (
    ("calibration", "the calibration's client-side TPOT (gap included)"),
    ("trace_before", "the server's own steps before the run (warm-up and calibration, "
                     "step trace), with their gap"),
    ("trace_run", "the run's own steps (in-sample: tests the simulator's scheduling, not "
                  "the cost model's transfer from calibration to run)"),
)


def run_case(name: str, policy: str, seed: int, out: Path) -> dict:
    """The live half of a case: a traced server, calibrated, the workload at the
    case's load (`simulate_case` is the other half)."""
    from bench import cli as bench_cli
    from bench import options
    from sglang_taper.adapter.runtime import ENV_TRACE

    flags, load = CASES[name]
    case_dir = out / name
    case_dir.mkdir(parents=True, exist_ok=True)
    ns = case_ns(name, policy, seed, out)
    bench = bench_cli.LiveBench(ns)
    trace_path = case_dir / "steps.csv"
    trace_path.unlink(missing_ok=True)
    before = os.environ.get(ENV_TRACE)
    os.environ[ENV_TRACE] = str(trace_path.resolve())  # the server inherits it
    try:
        with bench.server(policy) as srv:
            bench.calibrated(srv)
            cap = bench.result["capacity_programs_per_s"][seed]
            rate = options.parse_rate(load).resolve(cap)
            server_pid = srv.proc.proc.pid
            t0, cpu0, srv0 = time.monotonic(), _cpu_self(), _cpu_tree(server_pid)
            live = bench.probe(srv, seed, rate)
            t1, cpu1, srv1 = time.monotonic(), _cpu_self(), _cpu_tree(server_pid)
    finally:
        if before is None:
            os.environ.pop(ENV_TRACE, None)
        else:
            os.environ[ENV_TRACE] = before
    return {"case": name, "flags": flags, "load": load, "rate": rate, "policy": policy,
            "seed": seed, "calibration": bench.result["calibration"],
            "slo": bench.result["slo"], "live": live["summary"], "live_server": live["server"],
            "window": [t0, t1], "client_cpu_share": (cpu1 - cpu0) / (t1 - t0),  # of one core
            "server_cpu_share": None if srv0 is None or srv1 is None else
            (srv1 - srv0) / (t1 - t0)}


def simulate_case(case: dict, case_dir: Path) -> dict:
    """The simulated half of a case from what its live run left (the case's
    figures, its calibration and its step trace in `case_dir`): the same
    programs at the same rate and SLOs on each cost model of MODELS, each
    compared with live and with the trace taken apart against that model.
    Fills case["models"] and case["rows"] (the calibration model's, as before)."""
    from bench import cli as bench_cli
    from bench.sim import cost as costs
    from bench.sim.cli import run_sim
    from bench.sim.steptrace import Trace, fit_linear, parts

    name, (t0, t1) = case["case"], case["window"]
    ns = case_ns(name, case["policy"], case["seed"], case_dir.parent)
    trace_path = case_dir / "steps.csv"
    paths = {"calibration": case_dir / "live_cost_model.json",
             "trace_before": case_dir / "trace_cost_model.json",
             "trace_run": case_dir / "run_cost_model.json"}
    paths["calibration"].write_text(json.dumps(case["calibration"]["fit"], indent=1))
    run_trace = Trace.read(trace_path, t0, t1)
    fit_linear(Trace.read(trace_path, -float("inf"), t0)).save(
        paths["trace_before"], source="server step trace before the run (TAPER_STEP_TRACE)")
    fit_linear(run_trace).save(
        paths["trace_run"], source="server step trace of the run itself (in-sample)")
    case["models"] = {}
    for key, what in MODELS:
        sim_ns = argparse.Namespace(**{
            **vars(ns), "cost_model": f"linear:{paths[key]}", "sweep": None,
            "request_rate": repr(case["rate"]), "policies": case["policy"],
            "kv_capacity": 65536, "workers": 1, "quiet": True, "save_trace": None,
            "seeds": [case["seed"]], "controller": [], "replicas": 1})
        sim = run_sim(sim_ns, calibration=bench_cli.sim_calibration(case["calibration"]))
        sim_run = sim["runs"][0]
        model = costs.load(f"linear:{paths[key]}")
        made_of = parts(run_trace, model, t1 - t0)
        made_of["client_cpu_share"] = case.get("client_cpu_share")
        made_of["server_cpu_share"] = case.get("server_cpu_share")
        case["models"][key] = {"what": what, "model": model.describe(),
                               "rows": compare(case["live"], sim_run["summary"]),
                               "sim": sim_run["summary"], "sim_server": sim_run["server"],
                               "live_steps": made_of, "sim_gap_s": model.gap}
    case["rows"] = case["models"]["calibration"]["rows"]
    return case


def _cpu_self() -> float:
    """CPU seconds of this process (the client), every thread."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_tree(pid: int) -> float | None:
    """CPU seconds of a process and its descendants (the server), or None."""
    try:
        import psutil

        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
        return sum(sum(p.cpu_times()[:2]) for p in procs)
    except Exception:  # psutil missing or a process gone: no figure, not a failed run
        return None


def rows_table(rows: list[dict]) -> list[str]:
    out = ["| figure | live | sim | sim/live - 1 |", "|---|---|---|---|"]
    for r in rows:
        rel = "-" if r["rel_diff"] is None else f"{100 * r['rel_diff']:+.1f}%"
        out.append(f"| {r['figure']} | {r['live']:.4g} | {r['sim']:.4g} | {rel} |")
    return out


def makeup(c: dict) -> list[str]:
    """A case's time per token taken apart, live (the server's step trace)
    against the simulator's run of the same programs (`c`: one of a case's
    models)."""
    st, sim = c.get("live_steps"), c["sim_server"]
    if not st:
        return []
    ms = lambda x: "-" if x is None else f"{1e3 * x:.2f}"  # noqa: E731
    sim_steps = sim.get("decode_steps") or 0
    sim_step = sim["decode_time_s"] / sim_steps if sim_steps else None
    gap = c.get("sim_gap_s", 0.0)
    sim_cycle = None if not sim_steps else \
        (sim["decode_time_s"] + sim.get("prefill_time_s", 0.0)
         + gap * (sim_steps + sim.get("prefill_steps", 0))) / sim_steps
    ratio = st["decode_measured_over_model"]
    share = st.get("server_cpu_share")
    return [
        "| part | live | sim |", "|---|---|---|",
        f"| decode steps | {st['decode_steps']} | {sim_steps} |",
        f"| prefill steps | {st['prefill_steps']} | {sim.get('prefill_steps', '-')} |",
        f"| decode step, mean (ms) | {ms(st['decode_step_s'].get('mean'))} | {ms(sim_step)} |",
        f"| the model at the live steps' (seqs, KV), mean (ms) | "
        f"{ms(st['model_decode_s'].get('mean'))} | |",
        f"| live step / model, p50 and p90 | {ratio.get('p50', 0):.2f}, "
        f"{ratio.get('p90', 0):.2f} | |",
        f"| decode cycle (launch to next launch), mean (ms) | "
        f"{ms(st['decode_cycle_s'].get('mean'))} | {ms(sim_cycle)} |",
        f"| scheduler gap between steps, p50 (ms) | {ms(st['gap_s'].get('p50'))} | "
        f"{ms(gap)} |",
        f"| prefill, total (s) | {st['prefill_s']:.2f} (model at these: "
        f"{st['model_prefill_s']:.2f}) | {sim.get('prefill_time_s', 0.0):.2f} |",
        f"| mean batch (seqs), KV tokens | {st['mean_batch']:.1f}, {st['mean_kv']:.0f} | |",
        f"| client CPU, share of one core | {st.get('client_cpu_share') or 0.0:.2f} | |",
        f"| server CPU, share of one core | "
        f"{'-' if share is None else f'{share:.2f}'} | |", ""]


def markdown(result: dict) -> str:
    lines = [f"Policy {result['policy']}, seed {result['seed']}; sim/live - 1, target within "
             f"{100 * TARGET:.0f}% on each figure.", ""]
    for c in result["cases"]:
        cal = c["calibration"]
        lines += [f"**{c['case']}** (`{' '.join(c['flags']) or 'the default workload'}`, "
                  f"{c['rate']:.3g} programs/s = {c['load']} of capacity; isolated TPOT "
                  f"{1e3 * cal['tpot_s']:.2f} ms, TTFT {1e3 * cal['ttft_s']:.1f} ms)", "",
                  ""]
        if c.get("sim_error"):
            lines += [f"Not simulated: {c['sim_error']}", ""]
        for key, _ in MODELS:
            m = c.get("models", {}).get(key)
            if m is None:
                continue
            d = m["model"]
            lines += [f"Cost model fitted to {m['what']}: decode {1e3 * d['a']:.2f} ms + "
                      f"{1e3 * d['b']:.3f} ms/seq + {1e6 * d['c']:.3f} us/KV token; prefill "
                      f"{1e3 * d['e']:.2f} ms + {1e6 * d['f']:.1f} us/token + "
                      f"{1e3 * d['g']:.2f} ms/request + {1e6 * d.get('h', 0.0):.2f} us/context "
                      f"token; gap {1e3 * d['gap']:.2f} ms", ""]
            lines += rows_table(m["rows"]) + [""] + makeup(m)
    for key, what in MODELS:
        within = [abs(r["rel_diff"]) <= TARGET for c in result["cases"]
                  for r in c.get("models", {}).get(key, {}).get("rows", [])
                  if r["rel_diff"] is not None]
        if within:
            lines.append(f"- {key} ({what.split(' (')[0]}): {sum(within)} of {len(within)} "
                         f"figures within {100 * TARGET:.0f}%.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.fidelity",
                                description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated, of {', '.join(CASES)} (default: all)")
    p.add_argument("--policy", default="taper")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-dir", default="results/fidelity")
    p.add_argument("--resim", action="store_true",
                   help="no live runs: simulate again the cases stored in --result-dir "
                        "(result.json and each case's steps.csv), e.g. after a model change")
    ns = p.parse_args(argv)
    if ns.resim:
        return resim(Path(ns.result_dir))
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
        case = run_case(name, ns.policy, ns.seed, out)
        result["cases"].append(case)  # the live run is kept even if simulating it fails
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
        _simulate_or_note(case, out / name)
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    result["wall_s"] = time.monotonic() - t0
    from bench import report

    report.write_tables(result, markdown(result), out, "fidelity")
    return 0


def _simulate_or_note(case: dict, case_dir: Path) -> None:
    """simulate_case, or the reason it could not (a trace too short to fit, say)
    in case["sim_error"], printed: the live figures stay, and --resim can retry."""
    case.pop("sim_error", None)
    try:
        simulate_case(case, case_dir)
    except (OSError, ValueError, KeyError) as e:
        case["sim_error"] = f"{type(e).__name__}: {e}"
        print(f"fidelity: {case['case']}: not simulated: {case['sim_error']}", file=sys.stderr)


def resim(out: Path) -> int:
    from bench import report

    try:
        result = json.loads((out / "result.json").read_text())
        for c in result["cases"]:
            _simulate_or_note(c, out / c["case"])
    except (OSError, ValueError, KeyError) as e:
        print(f"fidelity: error: {out}: {e}", file=sys.stderr)
        return 2
    result["resimulated"] = True
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    report.write_tables(result, markdown(result), out, "fidelity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
