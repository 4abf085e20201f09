"""`taper sim` and `taper profile`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import report
from bench.cli import (
    add_workload_args,
    at_rate,
    parse_goodput,
    ratios,
    with_slo,
    workload_config,
)
from bench.metrics import SLOSpec, max_rate_at, request_tpot, summarize
from bench.workload import generate, load_jsonl, save_jsonl

DEFAULT_SIM_POLICIES = "off,eager,cap:2,cap:4,cap:8,cap:16,taper,oracle"


def _isolated(cost, prompt: int = 64) -> dict:
    gap = getattr(cost, "gap", 0.0)
    return {"ttft_s": cost.prefill(prompt, 1) + gap,
            "tpot_s": cost.decode(1, prompt) + gap}


def _parse_widths(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.append((int(lo), int(hi or lo)))
    return out


def run_sim(ns) -> dict:
    from dataclasses import replace

    from bench.sim import cost as costs
    from bench.sim.engine import SimConfig
    from bench.sim.run import simulate
    from controller import TaperConfig

    cost = costs.load(ns.cost_model)
    costs.check(cost)
    base_cfg = workload_config(ns)
    iso = _isolated(cost)
    slo = parse_goodput(ns.goodput)
    spec = SLOSpec(branch_stretch=ns.branch_stretch)
    policies = [p.strip() for p in ns.policies.split(",")]
    sim_cfg = SimConfig(kv_capacity=ns.kv_capacity, seed=ns.seed)
    taper_cfg = TaperConfig(branch_stretch=ns.branch_stretch)
    result = {"config": {k: v for k, v in vars(ns).items() if k != "func"},
              "cost_model": cost.describe(), "calibration": iso,
              "versions": report.versions(), "runs": []}
    rates = ns.sweep or [ns.request_rate]
    scales = ns.slo_scales or [1.0]
    widths = ns.widths or [base_cfg.width]
    for width in widths:
        wcfg = replace(base_cfg, width=width)
        base_programs = load_jsonl(ns.dataset) if ns.dataset else generate(wcfg)
        if ns.save_trace:
            save_jsonl(base_programs, ns.save_trace)
        for scale in scales:
            ttft = scale * slo["ttft"][0] * (iso["ttft_s"] if slo["ttft"][1] else 1.0)
            tpot = scale * slo["tpot"][0] * (iso["tpot_s"] if slo["tpot"][1] else 1.0)
            for rate in rates:
                progs = with_slo(at_rate(base_programs, base_cfg.rate, rate), ttft, tpot)
                for policy in policies:
                    t0 = time.monotonic()
                    out = simulate(progs, cost, policy, taper_cfg, sim_cfg)
                    s = summarize(out["records"], spec)
                    result["runs"].append({
                        "policy": policy, "rate": rate, "slo_scale": scale,
                        "width": list(width), "tpot_slo": tpot, "ttft_slo": ttft,
                        "summary": s, "server": out["server"], "wall_s": time.monotonic() - t0,
                        "tpots_ms": sorted(1e3 * t for p in out["records"] for r in p.requests
                                           if r.role == "serial"
                                           and (t := request_tpot(r.token_times)) is not None),
                        "width_series": []})
                    print(f"[sim] {policy:7s} rate {rate:g} slo x{scale:g} width {width}: "
                          f"goodput {s['goodput']:.3f}, attainment "
                          f"{100 * s['slo_attainment']:.1f}% ({time.monotonic() - t0:.1f} s)",
                          file=sys.stderr, flush=True)
    if len(rates) > 1:
        pts: dict[str, list] = {}
        for r in result["runs"]:
            if r["slo_scale"] == scales[0] and tuple(r["width"]) == tuple(widths[0]):
                pts.setdefault(r["policy"], []).append((r["rate"], r["summary"]["slo_attainment"]))
        result["max_rate"] = {p: max_rate_at(v) for p, v in pts.items()}
    first = [r for r in result["runs"] if r["slo_scale"] == scales[0]
             and tuple(r["width"]) == tuple(widths[0])]
    result["ratios"] = ratios(first)
    taper = [r for r in first if r["policy"] == "taper" and r["rate"] == first[0]["rate"]]
    orc = [r for r in first if r["policy"] == "oracle" and r["rate"] == first[0]["rate"]]
    if taper and orc and orc[0]["summary"]["goodput"] > 0:
        result["ratios"]["taper/oracle"] = (taper[0]["summary"]["goodput"]
                                            / orc[0]["summary"]["goodput"])
    if result.get("max_rate"):
        from bench.cli import max_rate_ratios

        result["ratios"].update(max_rate_ratios(result["max_rate"]))
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="taper sim", description="Simulate a workload under "
                                "each policy with a step-time cost model.")
    add_workload_args(p)
    p.set_defaults(policies=DEFAULT_SIM_POLICIES, result_dir="results/sim")
    p.add_argument("--cost-model", default="analytic:qwen3-32b@h200",
                   help="linear:PATH (from taper profile), analytic:MODEL@GPU "
                   "(qwen3-8b|qwen3-32b @ h100|h200) or measured:PATH")
    p.add_argument("--kv-capacity", type=int, default=None,
                   help="KV tokens (default: 65536 for linear models, else from GPU memory)")
    p.add_argument("--slo-scales", type=lambda t: [float(x) for x in t.split(",")],
                   help="sweep: multiply both SLOs, e.g. 0.5,1,2")
    p.add_argument("--widths", type=_parse_widths, help="sweep: width ranges, e.g. 2-4,8-16")
    p.add_argument("--no-plots", action="store_true")
    ns = p.parse_args(argv)
    try:
        parse_goodput(ns.goodput)
        workload_config(ns)
        from bench.sim import cost as costs

        cost = costs.load(ns.cost_model)
    except (ValueError, OSError) as e:
        print(f"taper sim: error: {e}", file=sys.stderr)
        return 2
    if ns.kv_capacity is None:
        ns.kv_capacity = 65536 if cost.name.startswith("linear") else 400_000
    t0 = time.monotonic()
    result = run_sim(ns)
    result["wall_s"] = time.monotonic() - t0
    files = report.write(result, Path(ns.result_dir), render_plots=not ns.no_plots)
    print(report.markdown(result))
    print(f"[sim] {result['wall_s']:.0f} s; results in " + ", ".join(map(str, files.values())))
    return 0


def profile_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="taper profile", description="Fit the live engine's "
                                "step-time model from controlled batches (server must run "
                                "`taper serve --taper-policy eager`).")
    p.add_argument("--base-url", default=None, help="a running server (default: start one)")
    p.add_argument("--out", default="results/cpu_profile.json")
    ns = p.parse_args(argv)
    from bench.sim.profile import profile
    from sglang_taper.server import ServerProcess

    server = None
    url = ns.base_url
    if url is None:
        server = ServerProcess(["--taper-policy", "eager", "--log-level", "warning"]).start()
        url = server.url
    try:
        t0 = time.monotonic()
        model = profile(url.rstrip("/"))
        model.save(ns.out, fitted_s=time.monotonic() - t0)
        print(f"[profile] {model.describe()}\n[profile] wrote {ns.out}")
    finally:
        if server is not None:
            server.stop()
    return 0
