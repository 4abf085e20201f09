"""`taper bench`: the live benchmark, a workload on a real server under each policy.

Without --sweep (the main job): a short calibration on a fresh server fits the
engine's step-time model; the simulator replays the same workload on that
model and finds every policy's highest rate at >= 95% SLO attainment; then
off, eager, the simulator's best cap and taper run live, each on a fresh
server, at a share of the measured capacity where the live sweep found the
policies apart. Live and simulated figures are printed side by side.

With --sweep auto (or a list of rates): each policy's highest rate at >= 95%
attainment is found live, by bisection, on its own fresh server, per seed.
With --interleave as well, every policy's server is up at once (idle ones
asleep: SGLang's --sleep-on-idle) and the policies' probes take turns, so that
they see the same stretch of a host whose speed drifts.

With --base-url: the running server, or `taper router` in front of several,
as it is (its own policy, no simulation): calibrated, then the workload at
--request-rate (or the sweep), each program's requests under one routing key.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from bench import options, report
from bench.calibration import capacity, mean_context
from bench.sweep import SweepSpec, aggregate, same_as_eager, sweep_interleaved, sweep_one
from bench.workload import at_rate, save_jsonl

SWEEP_POLICIES = "off,eager,cap:2,cap:4,cap:8,cap:16,taper"
HEADLINE = "headline"  # --policies default: off, eager, the simulator's best cap, taper
# The main job's live load: where the live sweep (bench/results/live-sweep) found
# taper at 100% SLO attainment on both seeds (it held 95% up to 49% and 40% of
# capacity) and eager and cap:4 below 95% on both (they held it to 16-30% and
# 23-32%).
HEADLINE_LOAD = "35%"
# The CPU engine replays the GPU-sized preset at a quarter of its lengths (contexts
# of 256-1024 tokens, branches of 32-128) under a TPOT SLO of 3x isolated, where a
# critical request's slack pays for about as many extra branches as 1.5x does on
# the H200 model (bench/README.md says why the effect holds).
LIVE_LENGTH_SCALE = 0.25
LIVE_GOODPUT = ("ttft:10x", "tpot:3x")


def _log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def records_path(result_dir: str | Path, policy: str, seed: int, rate: float) -> Path:
    """Where --save-records writes a run's program records (JSONL)."""
    return Path(result_dir) / f"records-{policy.replace(':', '')}-s{seed}-r{rate:.4g}.jsonl"


class LiveBench:
    """State of one `taper bench` invocation."""

    def __init__(self, ns) -> None:
        self.ns = ns
        self.spec = options.slo_spec(ns)
        self.seeds = options.seeds(ns)
        loaded = {s: options.load_programs(ns, s) for s in self.seeds}
        self.programs = {s: progs for s, (progs, _) in loaded.items()}
        self.trace = loaded[self.seeds[0]][1]  # what a trace dataset is, else None
        options.apply_time_scale(ns, self.trace)
        if self.trace:
            _log(f"trace {self.trace['format']}:{self.trace['path']}: "
                 f"{self.trace['requests']} requests, native rate "
                 f"{self.trace['native_rate'] or float('inf'):.3g}/s, predicted prefix-cache "
                 f"hit rate {100 * self.trace['predicted_hit_rate']:.1f}%")
        if ns.save_trace:
            save_jsonl(self.programs[self.seeds[0]], ns.save_trace)
        self.context = mean_context(self.programs[self.seeds[0]])
        self.calibrations: list[dict] = []
        self.calibration: dict | None = None
        self.slo: tuple[float, float] | None = None
        self.result: dict = {"kind": "live", "config": _config(ns),
                             "workload": asdict(options.workload_config(ns)),
                             "versions": report.versions(), "runs": []}
        if self.trace:
            self.result["trace"] = self.trace

    # ----------------------------------------------------------- servers

    def server(self, policy: str, sleep_on_idle: bool = False):
        from bench.live import ExternalServer, LiveServer

        if self.ns.base_url:
            return ExternalServer(self.ns.base_url, self.context,
                                  samples=self.ns.calibration_samples)

        # The controller orders branches by the same stage deadline the SLO uses.
        args = ["--taper-branch-stretch", str(self.spec.stretch), *self.ns.serve_args]
        if sleep_on_idle and "--sleep-on-idle" not in args:
            args.append("--sleep-on-idle")  # an idle scheduler otherwise polls a core
        return LiveServer(policy, args, Path(self.ns.result_dir), self.context,
                          samples=self.ns.calibration_samples)

    def calibrated(self, srv) -> None:
        """Record a fresh server's calibration; the first one sets the run's SLOs."""
        cal = {k: v for k, v in srv.calibration.items() if k != "points"}
        cal.update(policy=srv.policy, server_start_s=srv.start_s)
        self.calibrations.append(cal)
        _log(f"{srv.policy}: server ready in {srv.start_s:.1f} s; isolated TTFT "
             f"{1e3 * cal['ttft_s']:.1f} ms, TPOT {1e3 * cal['tpot_s']:.2f} ms "
             f"(p10-p90 spread {100 * cal['tpot_spread']['rel_spread']:.0f}%)")
        if self.calibration is None:
            self.calibration = srv.calibration
            self.slo = options.slo_seconds(options.goodput(self.ns), cal)
            self.slo_programs = {s: options.program_slos(self.ns, p, srv.calibration)
                                 for s, p in self.programs.items()}
            spec = self.spec
            self.result.update(
                calibration=cal,
                capacity_programs_per_s={s: capacity(cal, p) for s, p in self.programs.items()},
                slo={"ttft_s": self.slo[0], "tpot_s": self.slo[1],
                     "basis": options.slo_basis(self.ns), "mode": spec.mode,
                     "branch_stretch": spec.branch_stretch,
                     "program_multiple": spec.program_multiple, "drain_s": spec.drain})
        self.result["calibrations"] = self.calibrations

    def probe(self, srv, seed: int, rate: float) -> dict:
        from tqdm import tqdm

        progs = at_rate(self.slo_programs[seed], 1.0, rate)
        bar = tqdm(total=len(progs), desc=f"{srv.policy} seed {seed} @ {rate:.3g}/s",
                   unit="prog", file=sys.stderr, leave=False, mininterval=2.0)
        out = srv.run(progs, self.spec, self.ns.drain, progress=bar)
        bar.close()
        records = out.pop("records")
        if self.ns.save_records:
            path = records_path(self.ns.result_dir, srv.policy, seed, rate)
            path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
        cap = self.result["capacity_programs_per_s"][seed]
        run = {"policy": srv.policy, "seed": seed, "rate": rate, "load": rate / cap,
               "tpot_slo": self.slo[1], "ttft_slo": self.slo[0], **out}
        s = run["summary"]
        _log(f"{srv.policy} seed {seed} @ {rate:.3g}/s ({100 * run['load']:.0f}% of capacity): "
             f"attainment {100 * s['slo_attainment']:.1f}%, goodput {s['goodput']:.3f}/s, "
             f"mean width {report._fmt(out['server'].get('mean_width'))}, "
             f"errors {s['errors']}")
        if self.ns.output_file:
            Path(self.ns.output_file).parent.mkdir(parents=True, exist_ok=True)
            with open(self.ns.output_file, "a") as f:
                f.write(json.dumps(report._jsonable(
                    {k: v for k, v in run.items() if k not in ("tpots_ms", "width_series")}))
                    + "\n")
        return run

    # -------------------------------------------------------------- modes

    def sweep(self, policies: list[str]) -> None:
        """Each policy's max rate, live, on its own fresh server, per seed."""
        sweep = options.parse_sweep(self.ns.sweep)
        widest = max(st.width for ps in self.programs.values() for p in ps for st in p.stages)
        same_as = same_as_eager(policies, widest)
        run = [p for p in policies if p not in same_as]
        if self.ns.interleave:  # (result["config"] records it)
            self._interleaved(run, sweep)
        else:
            for policy in run:
                with self.server(policy) as srv:
                    self.calibrated(srv)
                    for seed in self.seeds:
                        self.result["runs"] += sweep_one(
                            lambda rate, srv=srv, seed=seed: self.probe(srv, seed, rate),
                            self._spec(sweep, seed))
        self.result["sweep"] = aggregate(self.result["runs"], same_as=same_as)

    def _spec(self, sweep, seed: int) -> SweepSpec:
        cap = self.result["capacity_programs_per_s"][seed]
        if sweep == "auto":
            first = self.ns.request_rate or options.DEFAULT_RATE
            return SweepSpec(start=options.parse_rate(first).resolve(cap))
        return SweepSpec(grid=tuple(r.resolve(cap) for r in sweep))

    def _interleaved(self, policies: list[str], sweep) -> None:
        """--interleave: every policy's server up at once, idle ones asleep, and
        per seed the policies' searches taking turns probe by probe
        (bench.sweep.sweep_interleaved); the first server's calibration sets
        the SLOs, as in a sequential sweep."""
        with ExitStack() as stack:
            servers = []
            for policy in policies:
                srv = stack.enter_context(self.server(policy, sleep_on_idle=True))
                self.calibrated(srv)
                servers.append(srv)
            for seed in self.seeds:
                probes = [lambda rate, srv=srv, seed=seed: self.probe(srv, seed, rate)
                          for srv in servers]
                spec = self._spec(sweep, seed)
                for runs in sweep_interleaved(probes, [spec] * len(probes)):
                    self.result["runs"] += runs

    def external(self) -> None:
        """--base-url: the running server (or router) at one rate, or swept, per seed."""
        sweep = options.parse_sweep(self.ns.sweep)
        with self.server("external") as srv:
            self.calibrated(srv)
            for seed in self.seeds:
                cap = self.result["capacity_programs_per_s"][seed]
                if sweep is None:
                    rate = options.parse_rate(self.ns.request_rate or HEADLINE_LOAD).resolve(cap)
                    self.result["runs"].append(self.probe(srv, seed, rate))
                    continue
                start = options.parse_rate(self.ns.request_rate
                                           or options.DEFAULT_RATE).resolve(cap)
                spec = (SweepSpec(start=start) if sweep == "auto"
                        else SweepSpec(grid=tuple(r.resolve(cap) for r in sweep)))
                self.result["runs"] += sweep_one(
                    lambda rate, seed=seed: self.probe(srv, seed, rate), spec)
        if sweep is not None:
            self.result["sweep"] = aggregate(self.result["runs"])

    def headline(self, policies: list[str] | None) -> None:
        """Calibrate, simulate the max rates on the live-fitted model, then run the
        policies live at one load (a share of the measured capacity)."""
        with self.server("taper") as srv:
            self.calibrated(srv)
        fit_path = Path(self.ns.result_dir) / "live_cost_model.json"
        fit_path.write_text(json.dumps(self.calibration["fit"], indent=1))
        _log(f"live-fitted step-time model: {fit_path}; simulating max rates ...")
        sim = self.simulate(fit_path)
        self.result["sim"] = {k: sim[k] for k in ("sweep", "calibration", "slo",
                                                  "cost_model", "capacity_programs_per_s")}
        self.result["sim_runs"] = [{k: v for k, v in r.items() if k != "tpots_ms"}
                                   for r in sim["runs"]]
        seed = self.seeds[0]
        best_cap = sim["sweep"].get("best_cap", {}).get(seed, "cap:4")
        if policies is None:  # a best cap that never holds (wider than any group) is eager
            policies = ["off", "eager"] + (
                [] if best_cap in sim["sweep"]["same_as"] else [best_cap]) + ["taper"]
        cap = self.result["capacity_programs_per_s"][seed]
        rate = options.parse_rate(self.ns.request_rate or HEADLINE_LOAD).resolve(cap)
        self.result["headline_rate"] = {
            "rate": rate, "load": rate / cap,
            "source": ("--time-scale" if getattr(self.ns, "time_scale", None) else
                       "--request-rate") if self.ns.request_rate else
            f"default: {HEADLINE_LOAD} of capacity, where the policies separate live"}
        _log(f"live runs at {rate:.3g} programs/s: {', '.join(policies)}")
        for policy in policies:
            with self.server(policy) as srv:
                self.calibrated(srv)
                for s in self.seeds:
                    self.result["runs"].append(self.probe(srv, s, rate))
        self.result["at_rate_ratios"] = at_rate_ratios(self.result["runs"])

    def simulate(self, fit_path: Path) -> dict:
        """The simulator's max-rate sweep of this workload on the live-fitted model:
        the same command-line workload, SLOs and seeds, every simulator policy."""
        from bench.sim.cli import DEFAULT_SIM_POLICIES, run_sim

        sim_ns = argparse.Namespace(**{
            **vars(self.ns), "cost_model": f"linear:{fit_path}", "sweep": "auto",
            "request_rate": self.ns.request_rate or options.DEFAULT_RATE,
            "policies": DEFAULT_SIM_POLICIES, "kv_capacity": 65536, "workers": None,
            "quiet": True, "save_trace": None, "seeds": self.seeds, "controller": []})
        # The live figures, not the fit's, set the simulated run's SLOs and capacity.
        return run_sim(sim_ns, calibration=sim_calibration(self.calibration))


def sim_calibration(calibration: dict) -> dict:
    """What of a live calibration a simulated run of the same workload takes:
    the isolated figures and capacity, and the fit (per-context SLOs of a
    trace are taken from it, as live)."""
    return {k: v for k, v in calibration.items()
            if k in ("ttft_s", "tpot_s", "tokens_per_s", "batch", "context", "fit")}


def at_rate_ratios(runs: list[dict]) -> dict[str, float]:
    """taper's per-rate goodput over the others' (first seed, first rate): a
    secondary figure; at a rate all policies sustain it is an attainment ratio."""
    if not runs:
        return {}
    seed, rate = runs[0].get("seed", 0), runs[0]["rate"]
    g = {r["policy"]: r["summary"]["goodput"] for r in runs
         if r.get("seed", 0) == seed and r["rate"] == rate}
    out = {}
    if "taper" in g:
        for other, v in g.items():
            if other != "taper" and v:
                out[f"taper/{other}"] = g["taper"] / v
    return out


def _config(ns) -> dict:
    return {k: v for k, v in vars(ns).items() if k not in ("func",)}


def run_bench(ns) -> dict:
    bench = LiveBench(ns)
    chosen = options.policies(ns) if ns.policies != HEADLINE else None
    if ns.base_url:
        bench.external()
    elif ns.sweep:
        bench.sweep(chosen or options.policies(argparse.Namespace(policies=SWEEP_POLICIES)))
    else:
        bench.headline(chosen)
    return bench.result


def parser() -> argparse.ArgumentParser:
    """`taper bench`'s command line (also what bench.sim.fidelity parses its cases with)."""
    p = argparse.ArgumentParser(prog="taper bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_workload_args(p, HEADLINE, "results/bench", LIVE_LENGTH_SCALE,
                              default_rate=None, default_goodput=LIVE_GOODPUT)
    p.set_defaults(policies=HEADLINE)
    for a in p._actions:  # the defaults that only this command has, spelled out
        if a.dest == "policies":
            a.help = (f"comma-separated; default {HEADLINE!r}: off, eager, the best cap of the "
                      f"simulator's sweep, taper (with --sweep: {SWEEP_POLICIES})")
        elif a.dest == "request_rate":
            a.help = ("programs/s (0.6) or a share of the engine's capacity (50%%); default: "
                      f"{HEADLINE_LOAD.replace('%', '%%')} of capacity, where the live sweep "
                      "found the policies apart (with --sweep auto: the first rate tried, "
                      f"default {options.DEFAULT_RATE.replace('%', '%%')})")
    p.set_defaults(length_scale=LIVE_LENGTH_SCALE)
    p.add_argument("--save-records", action="store_true",
                   help="write every run's program records (JSONL) to the result dir")
    p.add_argument("--calibration-samples", type=int, default=10,
                   help="lone requests timed on each fresh server (at least 10)")
    p.add_argument("--interleave", action="store_true",
                   help="with --sweep: every policy's server up at once (idle ones asleep, "
                   "--sleep-on-idle) and their probes taking turns, so that all see the same "
                   "stretch of a host whose speed drifts (compare policies this way on a "
                   "shared machine)")
    p.add_argument("--base-url", help="benchmark this running server, or a `taper router`, "
                   "as it is, instead of a fresh server per policy (--policies is ignored)")
    p.add_argument("serve_args", nargs=argparse.REMAINDER,
                   help="after --, arguments for every `taper serve`")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    ns = parser().parse_args(argv)
    if ns.serve_args and ns.serve_args[0] == "--":
        ns.serve_args = ns.serve_args[1:]
    return ns


def main(argv: list[str]) -> int:
    ns = parse(argv)
    try:
        if ns.calibration_samples < 10:
            raise ValueError(f"--calibration-samples must be >= 10, got "
                             f"{ns.calibration_samples}")
        if ns.policies != HEADLINE:
            options.validate(ns, live=True)
        else:
            options.validate(argparse.Namespace(**{**vars(ns), "policies": "taper"}), live=True)
        if ns.base_url and ns.serve_args:
            raise ValueError("--base-url uses a running server: no `taper serve` arguments")
        if ns.interleave and (not ns.sweep or ns.base_url):
            raise ValueError("--interleave takes turns between the policies' servers of a "
                             "--sweep: give --sweep, and no --base-url")
    except ValueError as e:
        print(f"taper bench: error: {e}", file=sys.stderr)
        return 2
    Path(ns.result_dir).mkdir(parents=True, exist_ok=True)
    # On SIGTERM unwind like on Ctrl-C, so that every server this run started stops
    # (each runs in its own session: a killed bench would leave it busy-polling a core).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    result = run_bench(ns)
    result["wall_s"] = time.monotonic() - t0
    files = report.write(result, Path(ns.result_dir), render_plots=not ns.no_plots)
    print()
    print(report.markdown(result))
    print(f"[bench] {time.monotonic() - t0:.0f} s; results in "
          + ", ".join(str(f) for f in files.values()))
    return 0
