"""Simulated vs live, workload by workload (CPU engine): `python -m bench.sim.fidelity`.

    .venv/bin/python -m bench.sim.fidelity [--cases default,parallel-reasoning,mooncake]
        [--policy taper] [--seed 0] [--repeats 2] [--scale 1] [--load CASE=RATE,...]
        [--result-dir DIR (default results/fidelity)]

Per case (a `taper bench` workload and a load, `CASES`): a fresh `taper serve`
with its step trace on is calibrated (its isolated TTFT/TPOT set the SLOs),
then the workload runs live at the case's load `--repeats` times, each run
followed by the same calibration again (from a clean slate). The simulator
replays each run's programs, at the same rate and SLOs, on cost models fitted
to that very server (MODELS): the first calibration's client-side TPOT, the
server's steps before the first run, the calibrations just before and after
the run (bracketing it in time, out of sample; with the host's speed over the
run; with TAPER's hook time per step that the other run's server reported;
slowed with the traffic as the other run was; with the other run's wandering
host speed, the median of several draws),
the other live run's steps
(the same workload minutes apart, out of sample) and the run's own steps
(in-sample). Goodput, SLO attainment and TPOT p50/p99 are compared with
sim/live - 1 (target, issue 15: within 10% on each), beside the live runs'
own difference from each other: how far the same run moves when repeated
(with three runs or more, each figure's median over the runs too).
Writes result.json and result.md to --result-dir, and per case the step
trace and each live run's program records (run{i}_records.jsonl.gz).

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
# name -> (taper bench's workload flags, programs per live run at --scale 1,
# load: a share of the measured capacity)
CASES: dict[str, tuple[list[str], int, str]] = {
    "default": ([], 40, "35%"),
    "parallel-reasoning": (["--workload", "parallel-reasoning", "--length-scale", "1",
                            "--branch-tokens", "64,256"], 20, "30%"),
    "mooncake": (["--dataset", MOONCAKE, "--length-scale", "0.1",
                  "--max-prompt-tokens", "6000", "--branch-tokens", "320,1280"], 40, "2.5%"),
}


def case_flags(name: str, scale: int = 1) -> list[str]:
    """The case's workload flags with its programs times `scale` (a trace: its
    first N requests)."""
    flags, programs, _ = CASES[name]
    return [*flags, "--num-prompts", str(programs * scale)]


def compare(live: dict, sim: dict) -> list[dict]:
    """Each figure live and simulated, with sim/live - 1 (None where live is 0
    or either has no such figure)."""
    rows = []
    for name, get in FIELDS:
        a, b = get(live), get(sim)
        rows.append({"figure": name, "live": a, "sim": b,
                     "rel_diff": (b / a - 1) if a and b is not None else None})
    return rows


def case_ns(name: str, policy: str, seed: int, out: Path, scale: int = 1,
            load: str | None = None) -> argparse.Namespace:
    """The case's `taper bench` options, validated (ValueError: a bad one); `load`
    instead of the case's own (a share of capacity, or programs/s)."""
    from bench import cli as bench_cli
    from bench import options

    load = load or CASES[name][2]
    ns = bench_cli.parse([*case_flags(name, scale), "--policies", policy, "--seed", str(seed),
                          "--request-rate", load, "--result-dir", str(out / name),
                          "--no-plots", "--save-records"])
    options.validate(ns, live=True)
    return ns


# Decode batches (sequences, context tokens each) run after every calibration, so
# that the steps the trace models are fitted to reach the runs' contexts per
# sequence (1-6K; the calibration's batches stop at 1K, the tiny model holds 8K)
# and their KV (up to 32K tokens).
SHAPES = ((1, 4096), (4, 4096), (8, 4096), (2, 6000))

TAIL_REQUESTS = 8  # the slowest serial requests whose steps are read against the middle half
LOAD_WINDOW_S = 5.0  # bracket_load's window: the 5-s bins its line is fitted over

# The cost models each run is simulated on: (key, what it is fitted to).
MODELS = (
    ("calibration", "the first calibration's client-side TPOT (gap included)"),
    ("trace_before", "the server's own steps before the first run (warm-up, calibration "
                     "and SHAPES, step trace), with their gap"),
    ("bracket", "the server's steps in the calibrations (and SHAPES) just before and just "
                "after the run (before the first run: everything before it; out of sample, "
                "bracketing the run in time)"),
    ("bracket_speed", "the bracket model, its step times scaled every 5 s by the median "
                      "ratio of the run's own decode cycles to it (the host's speed during "
                      "the run, measured from the run: what nothing fitted ahead of time "
                      "knows)"),
    ("bracket_hook", "the bracket model, each decode step with a branch in it also paying "
                     "TAPER's hook time per such step that the other live run's server "
                     "reported (/taper/stats overhead; out of sample: calibrations have no "
                     "branches, so no fitted model sees the hooks' cost)"),
    ("bracket_load", "the bracket model, every step slowed with the traffic: alpha + slope x "
                     "the tokens decoded per second over the last 5 s, the line fitted to the "
                     "other live run's 5-s speed against the bracket model (out of sample: "
                     "the same workload minutes apart; calibrations stream too little to "
                     "show it)"),
    ("bracket_drift", "the bracket model, its step times scaled every 5 s as the other live "
                      "run's were (bracket_speed's factors of the other run, replayed on this "
                      "run's clock: how far and how long the host's speed strays, out of "
                      "sample; the two runs' factors hardly correlate in time, so this is a "
                      "draw of the host's wandering, not its replay): the series as it ran "
                      "and rotated, each figure the median of the simulations (DRIFT_DRAWS)"),
    ("other_run", "the other live run's steps (the same workload minutes apart, out of "
                  "sample)"),
    ("trace_run", "the run's own steps (in-sample: tests the simulator's scheduling, not "
                  "the cost model's transfer from calibration to run)"),
)


def run_case(name: str, policy: str, seed: int, out: Path, repeats: int = 2,
             scale: int = 1, load: str | None = None) -> dict:
    """The live half of a case: a traced server, calibrated, then `repeats`
    times the workload at the case's load and the calibration again
    (`simulate_case` is the other half). Times are the client's monotonic
    clock, which is the step trace's."""
    from bench import cli as bench_cli
    from bench import options
    from sglang_taper.adapter.runtime import ENV_TRACE

    load = load or CASES[name][2]
    case_dir = out / name
    case_dir.mkdir(parents=True, exist_ok=True)
    ns = case_ns(name, policy, seed, out, scale, load)
    bench = bench_cli.LiveBench(ns)
    trace_path = case_dir / "steps.csv"
    trace_path.unlink(missing_ok=True)
    (case_dir / "steps.csv.gz").unlink(missing_ok=True)
    before = os.environ.get(ENV_TRACE)
    os.environ[ENV_TRACE] = str(trace_path.resolve())  # the server inherits it
    runs = []
    try:
        with bench.server(policy) as srv:
            bench.calibrated(srv)
            srv.decode_at(SHAPES)
            cap = bench.result["capacity_programs_per_s"][seed]
            rate = options.parse_rate(load).resolve(cap)
            server_pid = srv.proc.proc.pid
            for i in range(repeats):
                t0, cpu0, srv0 = time.monotonic(), _cpu_self(), _cpu_tree(server_pid)
                live = bench.probe(srv, seed, rate)
                t1, cpu1, srv1 = time.monotonic(), _cpu_self(), _cpu_tree(server_pid)
                cal = srv.calibrate_again()
                srv.decode_at(SHAPES)
                t2 = time.monotonic()
                print(f"[fidelity] {name} run {i + 1} of {repeats}: calibration after it: "
                      f"isolated TPOT {1e3 * cal['tpot_s']:.2f} ms (first: "
                      f"{1e3 * bench.result['calibration']['tpot_s']:.2f} ms)", flush=True)
                runs.append({
                    "live": live["summary"], "live_server": live["server"],
                    "window": [t0, t1], "calibration_after": [t1, t2],
                    "tpot_after_s": cal["tpot_s"], "fit_after": cal["fit"],
                    "client_cpu_share": (cpu1 - cpu0) / (t1 - t0),  # of one core
                    "server_cpu_share": None if srv0 is None or srv1 is None else
                    (srv1 - srv0) / (t1 - t0)})
                _keep_records(case_dir, policy, seed, rate, i)
    finally:
        if before is None:
            os.environ.pop(ENV_TRACE, None)
        else:
            os.environ[ENV_TRACE] = before
    _gzip_trace(trace_path)
    return {"case": name, "flags": case_flags(name, scale), "scale": scale, "load": load,
            "rate": rate, "policy": policy, "seed": seed,
            "calibration": bench.result["calibration"], "slo": bench.result["slo"], "runs": runs}


def _gzip_move(src: Path, dst: Path) -> None:
    """`src` gzipped to `dst`, then removed."""
    import gzip

    dst.write_bytes(gzip.compress(src.read_bytes()))
    src.unlink()


def _gzip_trace(path: Path) -> None:
    """Store the server's finished step trace gzipped (a few MB of CSV at --scale 6
    and up, a quarter of that gzipped); `trace_file` finds either."""
    if path.exists():
        _gzip_move(path, path.with_suffix(".csv.gz"))


def trace_file(case_dir: Path) -> Path:
    """A case's step trace: steps.csv, or steps.csv.gz as run_case stores it."""
    plain = case_dir / "steps.csv"
    return plain if plain.exists() else case_dir / "steps.csv.gz"


def _keep_records(case_dir: Path, policy: str, seed: int, rate: float, i: int) -> None:
    """Keep the live run's program records (`taper bench --save-records` wrote
    them under a name both runs share) as run{i+1}_records.jsonl.gz: every
    request's token times, for reading a tail request by request."""
    from bench.cli import records_path

    try:
        _gzip_move(records_path(case_dir, policy, seed, rate),
                   case_dir / f"run{i + 1}_records.jsonl.gz")
    except OSError as e:  # the run's figures stay; only the request-by-request read is lost
        print(f"fidelity: run {i + 1}'s records not kept: {e}", file=sys.stderr)


def serial_spans(records_path: Path, run_trace) -> list[tuple[float, float, float]]:
    """(TPOT, first token, last token) of each serial request of a live run with
    two tokens or more, on the step trace's clock: the records count from the
    replay's start, which is placed at the run's first prefill launch less the
    first request's start (the request's trip to the scheduler, a few ms, put
    on the replay's start)."""
    import gzip

    programs = [json.loads(line) for line in gzip.open(records_path, "rt") if line.strip()]
    requests = [r for p in programs for r in p["requests"]]
    prefills = run_trace.launch[run_trace.kind == "p"]
    if not requests or not len(prefills):
        return []
    from bench.metrics import request_tpot

    offset = float(prefills[0]) - min(r["start"] for r in requests)
    return [(tpot, r["token_times"][0] + offset, r["token_times"][-1] + offset)
            for r in requests
            if r["role"] == "serial" and (tpot := request_tpot(r["token_times"])) is not None]


def windows(case: dict, i: int) -> dict[str, list[tuple[float, float]]]:
    """The step trace's windows each model of MODELS is fitted to, for run `i`
    (no entry: the model does not exist for this run: other_run with one run,
    bracket for a run stored without a calibration after it). Before the first
    run, bracket takes everything (warm-up, calibration, SHAPES)."""
    runs = case["runs"]
    first = runs[0]["window"][0]
    out = {"trace_before": [(-float("inf"), first)],
           "trace_run": [tuple(runs[i]["window"])]}
    if "calibration_after" in runs[i]:
        before = (-float("inf"), first) if i == 0 else tuple(runs[i - 1]["calibration_after"])
        out["bracket"] = [before, tuple(runs[i]["calibration_after"])]
    others = [tuple(r["window"]) for j, r in enumerate(runs) if j != i]
    if others:
        out["other_run"] = others
    return out


def simulate_case(case: dict, case_dir: Path) -> dict:
    """The simulated half of a case from what its live runs left (their figures,
    the calibration and the step trace in `case_dir`): each run's programs at
    the same rate and SLOs on each cost model of MODELS, compared with live and
    with the run's steps taken apart against that model. Fills each run's
    "models", and the case's "repeat" (the second live run against the first)."""
    from bench import cli as bench_cli
    from bench.sim import cost as costs
    from bench.sim.cli import run_sim
    from bench.sim.steptrace import (
        Trace,
        fit_linear,
        host_speed,
        load_slowdown,
        parts,
        tail_windows,
    )

    name = case["case"]
    if "runs" not in case:  # stored before runs were repeated (f4c064f): one run
        case["runs"] = [{k: case.pop(k) for k in ("live", "live_server", "window",
                                                  "client_cpu_share", "server_cpu_share")
                         if k in case}]
        for k in ("models", "rows"):
            case.pop(k, None)
    ns = case_ns(name, case["policy"], case["seed"], case_dir.parent, case.get("scale", 1),
                 case.get("load"))
    trace_path = trace_file(case_dir)
    cal_path = case_dir / "live_cost_model.json"
    cal_path.write_text(json.dumps(case["calibration"]["fit"], indent=1))
    # Each run's host speed against its bracket model, first: bracket_drift replays
    # the other run's on this one
    run_traces = [Trace.read(trace_path, *run["window"]) for run in case["runs"]]
    brackets, speeds = {}, {}
    for j, run in enumerate(case["runs"]):
        wins = windows(case, j).get("bracket")
        if wins:
            brackets[j] = fit_linear(Trace.read_windows(trace_path, wins))
            speeds[j] = host_speed(run_traces[j], brackets[j], run["window"][0])
    for i, run in enumerate(case["runs"]):
        t0, t1 = run["window"]
        run_trace = run_traces[i]
        paths = {"calibration": cal_path}
        for key, wins in windows(case, i).items():
            paths[key] = case_dir / f"run{i + 1}_{key}_cost_model.json"
            fitted = brackets[i] if key == "bracket" else \
                fit_linear(Trace.read_windows(trace_path, wins))
            fitted.save(
                paths[key], source=f"server step trace (TAPER_STEP_TRACE), {key}: "
                                   f"windows {wins}")
        models = {key: costs.load(f"linear:{path}") for key, path in paths.items()}
        # The bracket model's variants: what each adds to the simulation (SimConfig)
        variants: dict[str, dict] = {}
        if "bracket" in paths:
            bracket = models["bracket"]
            run["host_speed"] = speeds[i]
            variants["bracket_speed"] = {"host_speed": run["host_speed"]}
            others = [r for j, r in enumerate(case["runs"]) if j != i]
            other_speed = [speeds[j] for j in range(len(case["runs"])) if j != i and j in speeds]
            if other_speed:  # the first other run's, as it ran and rotated
                variants["bracket_drift"] = {"host_speed": drift_draws(other_speed[0])}
            per_step = [hook_per_regulated_step(r.get("live_server") or {}) for r in others]
            per_step = [x for x in per_step if x is not None]
            if per_step:
                run["hook_s_other"] = float(sum(per_step) / len(per_step))
                variants["bracket_hook"] = {"hook_s": run["hook_s_other"]}
            if others:  # the line from the other run (the first, with more than two)
                o0, o1 = others[0]["window"]
                alpha, slope = load_slowdown(Trace.read(trace_path, o0, o1), bracket, o0)
                run["load_other"] = (alpha, slope, LOAD_WINDOW_S)
                variants["bracket_load"] = {"host_load": run["load_other"]}
            for key in variants:
                paths[key], models[key] = paths["bracket"], bracket
        def simulate(path: Path, extra: dict) -> dict:
            sim_ns = argparse.Namespace(**{
                **vars(ns), "cost_model": f"linear:{path}", "sweep": None,
                "request_rate": repr(case["rate"]), "policies": case["policy"],
                "kv_capacity": 65536, "workers": 1, "quiet": True, "save_trace": None,
                "seeds": [case["seed"]], "controller": [], "replicas": 1,
                "host_speed": None, "hook_s": None, "host_load": None, **extra})
            return run_sim(sim_ns, calibration=bench_cli.sim_calibration(
                case["calibration"]))["runs"][0]

        run["models"] = {}
        for key, what in MODELS:
            if key not in paths:
                continue
            model = models[key]
            made_of = parts(run_trace, model, t1 - t0)
            made_of["client_cpu_share"] = run.get("client_cpu_share")
            made_of["server_cpu_share"] = run.get("server_cpu_share")
            extra = variants.get(key, {})
            if key == "bracket_drift":  # one simulation per draw, the figures' median
                # (its server counters, sim_server, are the first draw's: the other run's
                # speed as it ran)
                sims = [simulate(paths[key], {"host_speed": d}) for d in extra["host_speed"]]
                sim_run, summary = sims[0], median_summary([x["summary"] for x in sims])
                spread = draw_spread(run["live"], [x["summary"] for x in sims])
            else:
                sim_run = simulate(paths[key], extra)
                summary, spread = sim_run["summary"], None
            run["models"][key] = {"what": what, "model": model.describe(),
                                  "rows": compare(run["live"], summary),
                                  "sim": summary, "sim_server": sim_run["server"],
                                  "live_steps": made_of, "sim_gap_s": model.gap}
            if spread:
                run["models"][key]["draws"] = spread
        records = case_dir / f"run{i + 1}_records.jsonl.gz"
        if records.exists() and "bracket" in models:  # the slowest requests' steps
            try:
                spans = serial_spans(records, run_trace)
            except (OSError, EOFError, ValueError, KeyError) as e:
                print(f"fidelity: {records}: not read: {e}", file=sys.stderr)
            else:
                run["tails"] = tail_windows(run_trace, models["bracket"], spans,
                                            TAIL_REQUESTS)
    runs = case["runs"]
    case["repeat"] = compare(runs[0]["live"], runs[1]["live"]) if len(runs) > 1 else None
    case["median_over_runs"] = medians_over_runs(runs) if len(runs) >= 3 else None
    return case


def medians_over_runs(runs: list[dict]) -> dict[str, list[dict]]:
    """Per model that every run has: compare's rows of each figure's median over
    the runs' simulations against its median over the live runs."""
    live = median_summary([r["live"] for r in runs])
    return {key: compare(live, median_summary([r["models"][key]["sim"] for r in runs]))
            for key, _ in MODELS if all(key in r.get("models", {}) for r in runs)}


DRIFT_DRAWS = 9  # bracket_drift's simulations per run: the other run's speed, 8 rotations


def drift_draws(speed: tuple[tuple[float, ...], tuple[float, ...]], k: int = DRIFT_DRAWS,
                seed: int = 0) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """`k` host-speed series for SimConfig.speed from one run's (`host_speed`'s
    (times, factors)): the series as it ran, then `k - 1` circular rotations of
    its factors by seeded random offsets, on the same times. A rotation keeps
    how far and for how long the speed strays (its factors and their order but
    at one seam) and moves where the slow stretches fall."""
    import numpy as np

    times, factors = tuple(speed[0]), np.asarray(speed[1], dtype=float)
    rng = np.random.default_rng(seed)
    out = [(times, tuple(factors.tolist()))]
    for _ in range(k - 1):
        shift = int(rng.integers(1, len(factors))) if len(factors) > 1 else 0
        out.append((times, tuple(np.roll(factors, shift).tolist())))
    return out


def median_summary(summaries: list[dict]) -> dict:
    """The figures FIELDS reads, each the median over several simulations' summaries."""
    import numpy as np

    def med(get) -> float | None:  # over the summaries that have the figure
        values = [v for v in map(get, summaries) if v is not None]
        return float(np.median(values)) if values else None

    return {"goodput": med(lambda s: s["goodput"]),
            "slo_attainment": med(lambda s: s["slo_attainment"]),
            "tpot_s": {"p50": med(lambda s: s["tpot_s"]["p50"]),
                       "p99": med(lambda s: s["tpot_s"]["p99"])}}


def draw_spread(live: dict, summaries: list[dict]) -> dict:
    """Per figure, sim/live - 1 over the draws: p10, p90, min, max, and each
    draw's figure (None where live is 0 or no draw has the figure)."""
    import numpy as np

    out = {}
    for name, get in FIELDS:
        base = get(live)
        values = [get(s) for s in summaries]
        rel = np.array([v / base - 1 for v in values if v is not None]) if base else []
        if not len(rel):
            out[name] = None
            continue
        out[name] = {"p10": float(np.percentile(rel, 10)), "p90": float(np.percentile(rel, 90)),
                     "min": float(rel.min()), "max": float(rel.max()), "n": len(rel),
                     "figures": values}
    return out


def hook_per_regulated_step(server: dict) -> float | None:
    """Seconds TAPER's hooks took per decode step with a branch in it, from a
    live run's server figures (None: not reported, or no such step)."""
    seconds = (server.get("overhead") or {}).get("hook_seconds")
    steps = server.get("regulated_steps")
    return seconds / steps if seconds is not None and steps else None


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
        f"| the model at the live steps' (seqs, KV), gap included, mean (ms) | "
        f"{ms(st['model_decode_s'].get('mean'))} | |",
        f"| live decode-to-decode cycle / model, p50 and p90 | {ratio.get('p50', 0):.2f}, "
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


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def model_rows(case: dict) -> list[str]:
    """A case's figures: the live runs, their difference, and per model
    sim/live - 1 for each run (cells "run 1 / run 2")."""
    runs = case["runs"]
    names = [name for name, _ in FIELDS]
    out = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    live = [[get(r["live"]) for _, get in FIELDS] for r in runs]
    out.append("| live, " + " / ".join(f"run {i + 1}" for i in range(len(runs))) + " | "
               + " | ".join(" / ".join(f"{v[k]:.4g}" for v in live)
                            for k in range(len(names))) + " |")
    if case.get("repeat"):
        out.append("| live run 2 / run 1 - 1 | "
                   + " | ".join(_pct(r["rel_diff"]) for r in case["repeat"]) + " |")
    for key, _ in MODELS:
        per_run = [r.get("models", {}).get(key) for r in runs]
        if not any(per_run):
            continue
        cells = [" / ".join("-" if m is None else _pct(m["rows"][k]["rel_diff"])
                            for m in per_run) for k in range(len(names))]
        out.append(f"| sim on {key} | " + " | ".join(cells) + " |")
    return out + [""]


def median_rows(case: dict) -> list[str]:
    """With three runs or more: each figure's median over the simulations
    against its median over the live runs (sim/live - 1)."""
    pooled = case.get("median_over_runs")
    if not pooled:
        return []
    names = [name for name, _ in FIELDS]
    return [f"Each figure's median over the {len(case['runs'])} runs, sim/live - 1:", "",
            "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
            *(f"| {key} | " + " | ".join(_pct(r["rel_diff"]) for r in rows) + " |"
              for key, rows in pooled.items()), ""]


def tail_rows(case: dict) -> list[str]:
    """The slowest serial requests' decode cycles against the middle half's
    (live, against the bracket model), per run with records."""
    runs = [(i, r["tails"]) for i, r in enumerate(case["runs"]) if r.get("tails")]
    if not runs:
        return []
    out = [f"The {TAIL_REQUESTS} slowest serial requests (by TPOT) and the middle half: the live "
           "decode cycles launched inside their spans, against the bracket model:", "",
           "| run | requests | TPOT (ms) | cycles | cycle / model | the others at the same "
           "batch sizes | step / model | gap after (ms) | batch |", "|---" * 9 + "|"]
    for i, tails in runs:
        for name, g in tails.items():
            if not g.get("n"):
                out.append(f"| {i + 1} | {name}, {g.get('requests', 0)} | - | 0 | | | | | |")
                continue
            lo, hi = g["tpot_s"]
            same = g.get("outside_same_batch")
            out.append(f"| {i + 1} | {name}, {g['requests']} | {1e3 * lo:.1f}-{1e3 * hi:.1f} | "
                       f"{g['n']} | {g['cycle_over_model']:.2f} | "
                       f"{'-' if same is None else f'{same:.2f}'} | "
                       f"{g['step_over_model']:.2f} | {1e3 * g['gap_s']:.2f} | "
                       f"{g['batch']:.1f} |")
    return out + [""]


def drift_rows(case: dict) -> list[str]:
    """bracket_drift's draws: how far each figure moves with where the host's
    slow stretches fall (p10 to p90 of sim/live - 1 over the draws)."""
    per_run = [r.get("models", {}).get("bracket_drift", {}).get("draws") for r in case["runs"]]
    if not any(per_run):
        return []
    n = next(d for d in per_run if d)[FIELDS[0][0]]["n"]

    def cell(d: dict | None) -> str:
        return "-" if not d else f"{_pct(d['p10'])} to {_pct(d['p90'])}"

    return [f"bracket_drift over its {n} draws, sim/live - 1 from p10 to p90 (a cell per run): "
            + "; ".join(f"{name} " + " / ".join(cell((d or {}).get(name)) for d in per_run)
                        for name, _ in FIELDS), ""]


def coefficient_rows(case: dict) -> list[str]:
    out = ["| run | model | decode ms | ms/seq | us/KV token | prefill ms | us/token | "
           "ms/request | us/context token | gap ms |", "|---" * 10 + "|"]
    for i, run in enumerate(case["runs"]):
        for key, m in run.get("models", {}).items():
            d = m["model"]
            out.append(f"| {i + 1} | {key} | {1e3 * d['a']:.2f} | {1e3 * d['b']:.3f} | "
                       f"{1e6 * d['c']:.3f} | {1e3 * d['e']:.2f} | {1e6 * d['f']:.1f} | "
                       f"{1e3 * d['g']:.2f} | {1e6 * d.get('h', 0.0):.2f} | "
                       f"{1e3 * d['gap']:.2f} |")
    return out + [""]


def _spread(row: dict) -> float:
    """How far two live runs' figure differ, either one taken as the base."""
    a, b = row["live"], row["sim"]  # (compare's sim: the second run here)
    if not a or not b:
        return 0.0 if a == b else float("inf")
    return max(abs(b / a - 1), abs(a / b - 1))


def scores(result: dict) -> dict[str, tuple[int, int, int]]:
    """Per model: (figures within TARGET, figures within the larger of TARGET
    and the live runs' own difference on that figure, figures)."""
    out = {}
    for key, _ in MODELS:
        ok = ok_noise = n = 0
        for c in result["cases"]:
            floor = [_spread(r) for r in c["repeat"]] if c.get("repeat") \
                else [0.0] * len(FIELDS)
            for run in c["runs"]:
                m = run.get("models", {}).get(key)
                for k, r in enumerate(m["rows"] if m else []):
                    if r["rel_diff"] is None:
                        continue
                    n += 1
                    ok += abs(r["rel_diff"]) <= TARGET
                    ok_noise += abs(r["rel_diff"]) <= max(TARGET, floor[k])
        if n:
            out[key] = (ok, ok_noise, n)
    return out


def markdown(result: dict) -> str:
    lines = [f"Policy {result['policy']}, seed {result['seed']}; sim/live - 1, target within "
             f"{100 * TARGET:.0f}% on each figure; a cell per live run (run 1 / run 2 / ...).", ""]
    for c in result["cases"]:
        cal = c["calibration"]
        after = ", ".join(f"{1e3 * r['tpot_after_s']:.2f}" for r in c["runs"]
                          if "tpot_after_s" in r)
        after = f", {after} ms at the one after each run" if after else ""
        load = (f" = {c['load']} of capacity" if str(c["load"]).endswith("%")
                else " (an absolute rate)")
        lines += [f"**{c['case']}** (`{' '.join(c['flags']) or 'the default workload'}`, "
                  f"{c['rate']:.3g} programs/s{load}; isolated TPOT "
                  f"{1e3 * cal['tpot_s']:.2f} ms at the first calibration{after}; TTFT "
                  f"{1e3 * cal['ttft_s']:.1f} ms)", ""]
        if c.get("sim_error"):
            lines += [f"Not simulated: {c['sim_error']}", ""]
        lines += (model_rows(c) + drift_rows(c) + median_rows(c) + tail_rows(c)
                  + coefficient_rows(c))
        for i, run in enumerate(c["runs"]):
            m = run.get("models", {}).get("bracket")
            if m:
                lines += [f"Run {i + 1} taken apart against the bracket model:", ""] + makeup(m)
    lines += ["| model | figures within 10% | within the larger of 10% and the live runs' "
              "own difference |", "|---|---|---|"]
    for key, (ok, ok_noise, n) in scores(result).items():
        lines.append(f"| {key} | {ok} of {n} | {ok_noise} of {n} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.fidelity",
                                description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated, of {', '.join(CASES)} (default: all)")
    p.add_argument("--policy", default="taper")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, choices=range(1, 7), metavar="{1..6}",
                   help="live runs per case, each followed by a calibration (default 2: "
                        "the second run shows how far a repeat moves; more: the figures' "
                        "median over the runs is compared too)")
    p.add_argument("--scale", type=int, default=1,
                   help="programs per live run times this (default 1: 40, 20 and 40; a "
                        "p50/p99 of a few dozen programs hinges on a request or two)")
    p.add_argument("--load", default="", metavar="CASE=RATE,...",
                   help="a case's load instead of its own ("
                        + ", ".join(f"{k} {v[2]}" for k, v in CASES.items())
                        + "): a share of the capacity the calibration measures, or "
                          "programs/s; e.g. default=20%%,parallel-reasoning=15%%")
    p.add_argument("--result-dir", default="results/fidelity")
    p.add_argument("--resim", action="store_true",
                   help="no live runs: simulate again the cases stored in --result-dir "
                        "(result.json and each case's steps.csv or steps.csv.gz), e.g. after a "
                        "model change")
    ns = p.parse_args(argv)
    if ns.scale < 1:
        p.error(f"--scale must be >= 1, got {ns.scale}")
    if ns.resim:
        return resim(Path(ns.result_dir))
    cases = [c for c in ns.cases.split(",") if c]
    loads = dict(item.partition("=")[::2] for item in ns.load.split(",") if item)
    if not all(loads.values()):
        p.error(f"--load takes CASE=RATE,..., got {ns.load!r}")
    unknown = [c for c in [*cases, *loads] if c not in CASES]
    if unknown or not cases:
        print(f"fidelity: error: unknown case(s) {unknown}; choose from {', '.join(CASES)}",
              file=sys.stderr)
        return 2
    out = Path(ns.result_dir)
    try:  # every case's options before the first server starts
        for name in cases:
            case_ns(name, ns.policy, ns.seed, out, ns.scale, loads.get(name))
    except ValueError as e:
        print(f"fidelity: error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    result = {"kind": "fidelity", "argv": sys.argv[1:], "policy": ns.policy, "seed": ns.seed,
              "repeats": ns.repeats, "scale": ns.scale, "cases": []}
    for name in cases:
        case = run_case(name, ns.policy, ns.seed, out, ns.repeats, ns.scale, loads.get(name))
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
