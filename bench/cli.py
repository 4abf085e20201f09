"""`taper bench`: run a workload against the live server under each policy."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from bench import report
from bench.metrics import SLOSpec, max_rate_at, request_tpot, summarize
from bench.workload import WorkloadConfig, generate, load_jsonl, save_jsonl

DEFAULT_POLICIES = "off,eager,cap:8,taper"


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """Workload flags shared by `taper bench` and `taper sim` (named after
    `python -m sglang.bench_serving` and vLLM's --goodput where they overlap)."""
    d = WorkloadConfig()
    p.add_argument("--num-prompts", type=int, default=d.num_programs,
                   help="programs (chat requests and branch programs) in the trace")
    p.add_argument("--request-rate", type=float, default=d.rate, help="programs per second")
    p.add_argument("--burstiness", type=float, default=d.burstiness,
                   help="Gamma shape of the arrival gaps; 1.0 is Poisson, < 1 burstier")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--chat-fraction", type=float, default=d.chat_fraction)
    p.add_argument("--width", type=_range(int), default=d.width, help="branch width LO,HI")
    p.add_argument("--branch-tokens", type=_range(int), default=d.branch_tokens,
                   help="output tokens per branch LO,HI")
    p.add_argument("--chat-tokens", type=_range(int), default=d.chat_tokens)
    p.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:3x"],
                   metavar="KEY:VALUE", help="SLOs: ttft:MS tpot:MS, or KEY:Nx for N times "
                   "the isolated value measured on the server (default ttft:1000 tpot:3x)")
    p.add_argument("--branch-stretch", type=float, default=SLOSpec().branch_stretch,
                   help="a parallel stage may take this much longer than serial pace "
                   "over its longest branch")
    p.add_argument("--dataset", help="replay this trace (JSONL) instead of generating one")
    p.add_argument("--save-trace", help="write the generated trace (JSONL) here")
    p.add_argument("--sweep", type=_floats, help="rates to sweep, e.g. 0.5,1,1.5,2")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help=f"comma-separated (default {DEFAULT_POLICIES})")
    p.add_argument("--result-dir", default="results/bench",
                   help="result.json, result.md and PNG plots go here")
    p.add_argument("--output-file", help="append one JSON line per run here (JSONL)")


def _range(kind):
    def parse(text: str):
        parts = text.split(",")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}")
        return (kind(parts[0]), kind(parts[1]))

    return parse


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.5,1,2, got {text!r}") from None


def parse_goodput(items: list[str]) -> dict[str, tuple[float, bool]]:
    """{'ttft': (value, relative), 'tpot': ...}; value in seconds, or a multiple."""
    out = {}
    for item in items:
        m = re.fullmatch(r"(ttft|tpot):([0-9.]+)(x?)", item.strip())
        if not m:
            raise ValueError(f"--goodput: expected ttft:MS or tpot:MS (or :Nx), got {item!r}")
        value, rel = float(m.group(2)), bool(m.group(3))
        if value <= 0:
            raise ValueError(f"--goodput: {item!r} must be > 0")
        out[m.group(1)] = (value if rel else value / 1e3, rel)
    for key in ("ttft", "tpot"):
        out.setdefault(key, (1.0, False) if key == "ttft" else (3.0, True))
    return out


def workload_config(ns) -> WorkloadConfig:
    return WorkloadConfig(num_programs=ns.num_prompts, rate=ns.request_rate,
                          arrival="gamma" if ns.burstiness != 1.0 else "poisson",
                          burstiness=ns.burstiness, chat_fraction=ns.chat_fraction,
                          width=ns.width, branch_tokens=ns.branch_tokens,
                          chat_tokens=ns.chat_tokens, seed=ns.seed)


def at_rate(programs, base_rate: float, rate: float):
    """The same programs, arrivals scaled to another rate."""
    k = base_rate / rate
    return [replace(p, arrival=p.arrival * k) for p in programs]


def with_slo(programs, ttft: float, tpot: float):
    return [replace(p, ttft_slo=ttft, tpot_slo=tpot) for p in programs]


def max_rate_ratios(max_rate: dict[str, float | None]) -> dict[str, float | str]:
    """taper's highest rate at >= 95% attainment over the others' (a policy that
    never reaches 95% on the sweep gives "inf")."""
    t = max_rate.get("taper")
    out: dict[str, float | str] = {}
    if not t:
        return out
    caps = {k: v for k, v in max_rate.items() if k.startswith("cap:")}
    for name, other in [("off", max_rate.get("off")), ("eager", max_rate.get("eager")),
                        ("best cap", max((v or 0) for v in caps.values()) if caps else None),
                        ("oracle", max_rate.get("oracle"))]:
        if name not in ("best cap",) and name not in max_rate:
            continue
        if name == "best cap" and other is None:
            continue
        out[f"max-rate taper/{name}"] = t / other if other else "inf"
    return out


def ratios(runs: list[dict]) -> dict[str, float]:
    """taper's goodput over the others', at the first rate."""
    rate = runs[0]["rate"]
    g = {r["policy"]: r["summary"]["goodput"] for r in runs if r["rate"] == rate}
    out = {}
    if "taper" in g:
        for other in ("off", "eager"):
            if g.get(other):
                out[f"taper/{other}"] = g["taper"] / g[other]
        caps = [v for k, v in g.items() if k.startswith("cap:")]
        if caps and max(caps) > 0:
            out["taper/best cap"] = g["taper"] / max(caps)
    return out


# --------------------------------------------------------------- live runs


async def _calibrate(url: str) -> dict:
    """Isolated TTFT and TPOT of one request on an idle server (seconds)."""
    import aiohttp

    from bench.client import generate as gen

    async with aiohttp.ClientSession() as s:
        await gen(s, url, "warm up", 16)
        cs = [await gen(s, url, f"Calibration request {i}:", 64) for i in range(3)]
    ttft = sorted(c.ttft for c in cs)[1]
    tpot = sorted(c.tpot for c in cs)[1]
    return {"ttft_s": ttft, "tpot_s": tpot}


def _width_series(samples: list[dict]) -> list[tuple[float, float]]:
    out = []
    for a, b in zip(samples, samples[1:]):
        steps = b["regulated_steps"] - a["regulated_steps"]
        if steps > 0:
            out.append((b["t"], (b["branch_steps"] - a["branch_steps"]) / steps))
    return out


def _server_stats(url: str) -> dict:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/taper/stats", timeout=10) as r:
            s = json.loads(r.read())
        return {"mean_width": s.get("mean_branch_width"), "max_width": s.get("max_group_width"),
                "held_branch_steps": s.get("held_branch_steps"),
                "regulated_steps": s.get("regulated_steps"),
                "prediction": s.get("prediction"), "overhead": s.get("overhead")}
    except OSError:
        return {}


def run_bench(ns) -> dict:
    from tqdm import tqdm

    from bench.replay import replay
    from sglang_taper.server import ServerProcess

    cfg = workload_config(ns)
    programs = load_jsonl(ns.dataset) if ns.dataset else generate(cfg)
    if ns.save_trace:
        save_jsonl(programs, ns.save_trace)
    rates = ns.sweep or [ns.request_rate]
    slo = parse_goodput(ns.goodput)
    spec = SLOSpec(branch_stretch=ns.branch_stretch)
    policies = ["external"] if ns.base_url else [p.strip() for p in ns.policies.split(",")]
    result = {"config": {**{k: v for k, v in vars(ns).items() if k != "func"},
                         "workload": asdict(cfg)},
              "versions": report.versions(), "runs": []}
    calibration = None
    for policy in policies:
        server = None
        if ns.base_url:
            url = ns.base_url.rstrip("/")
        else:
            t0 = time.monotonic()
            server = ServerProcess(["--taper-policy", policy, "--log-level", "warning",
                                    "--taper-branch-stretch", str(ns.branch_stretch),
                                    *ns.serve_args],
                                   log_path=Path(ns.result_dir) / f"server-{policy}.log")
            server.start()
            url = server.url
            print(f"[bench] {policy}: server ready in {time.monotonic() - t0:.1f} s",
                  flush=True)
        try:
            if calibration is None:
                calibration = asyncio.run(_calibrate(url))
                result["calibration"] = calibration
            ttft = slo["ttft"][0] * (calibration["ttft_s"] if slo["ttft"][1] else 1.0)
            tpot = slo["tpot"][0] * (calibration["tpot_s"] if slo["tpot"][1] else 1.0)
            result["slo"] = {"ttft_s": ttft, "tpot_s": tpot,
                             "branch_stretch": spec.branch_stretch}
            for rate in rates:
                progs = with_slo(at_rate(programs, cfg.rate, rate), ttft, tpot)
                bar = tqdm(total=len(progs), desc=f"{policy} @ {rate:g}/s", unit="prog",
                           file=sys.stderr, leave=False, mininterval=2.0)
                records, samples = asyncio.run(replay(url, progs, ns.max_concurrency, bar,
                                                      drain_timeout=ns.drain_timeout))
                bar.close()
                summary = summarize(records, spec)
                run = {"policy": policy, "rate": rate, "tpot_slo": tpot, "summary": summary,
                       "server": _server_stats(url),
                       "tpots_ms": sorted(1e3 * t for p in records for r in p.requests
                                          if r.role == "serial"
                                          and (t := request_tpot(r.token_times)) is not None),
                       "width_series": _width_series(samples)}
                result["runs"].append(run)
                print(f"[bench] {policy} @ {rate:g}/s: goodput {summary['goodput']:.3f} prog/s, "
                      f"attainment {100 * summary['slo_attainment']:.1f}%, "
                      f"errors {summary['errors']}", flush=True)
                if ns.output_file:
                    Path(ns.output_file).parent.mkdir(parents=True, exist_ok=True)
                    with open(ns.output_file, "a") as f:
                        f.write(json.dumps({k: v for k, v in run.items()
                                            if k not in ("tpots_ms", "width_series")}) + "\n")
        finally:
            if server is not None:
                server.stop()
    points: dict[str, list] = {}
    for run in result["runs"]:
        points.setdefault(run["policy"], []).append((run["rate"],
                                                     run["summary"]["slo_attainment"]))
    result["ratios"] = ratios(result["runs"])
    if len(rates) > 1:
        result["max_rate"] = {p: max_rate_at(pts) for p, pts in points.items()}
        result["ratios"].update(max_rate_ratios(result["max_rate"]))
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="taper bench", description=__doc__)
    add_workload_args(p)
    p.add_argument("--base-url", help="use this running server instead of starting one "
                   "per policy")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="programs in flight at most (default: unbounded)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds after the last arrival before unfinished programs are "
                   "cut off as failed (an overloaded policy must not stall the run)")
    p.add_argument("serve_args", nargs=argparse.REMAINDER,
                   help="after --, arguments for every `taper serve`")
    ns = p.parse_args(argv)
    if ns.serve_args and ns.serve_args[0] == "--":
        ns.serve_args = ns.serve_args[1:]
    try:
        parse_goodput(ns.goodput)
        workload_config(ns)
        if ns.dataset and not Path(ns.dataset).is_file():
            raise ValueError(f"--dataset: no such file: {ns.dataset}")
        from controller.config import parse_policy

        if not ns.base_url:
            for pol in ns.policies.split(","):
                parse_policy(pol)
    except ValueError as e:
        print(f"taper bench: error: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    result = run_bench(ns)
    result["wall_s"] = time.monotonic() - t0
    files = report.write(result, Path(ns.result_dir), render_plots=not ns.no_plots)
    print()
    print(report.markdown(result))
    print(f"[bench] {time.monotonic() - t0:.0f} s; results in "
          + ", ".join(str(f) for f in files.values()))
    return 0
