"""Results as data first (JSON), then a markdown report and PNG plots rendered
from that JSON. The report leads with the field's goodput (each policy's
highest rate at >= 95% attainment, and taper's ratios over the others); the
per-rate table follows."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("sglang", "torch", "numpy", "sglang-taper"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _fmt(x, scale: float = 1.0, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, str) or math.isinf(x):
        return "inf"
    return f"{x * scale:.{digits}f}"


def _ratio_row(name: str, r: dict) -> str:
    per = ", ".join(_fmt(v) for v in r["per_seed"].values())
    verdict = "yes" if r.get("counts") else "no"
    return (f"| {name} | {_fmt(r['mean'])}x | {_fmt(r['min'])} - {_fmt(r['max'])} | {per} | "
            f"{verdict} |")


def goodput_tables(result: dict) -> str:
    """Max-rate ratios (with spread over seeds), then each policy's max rate."""
    sw = result.get("sweep") or {}
    if not sw.get("max_rate"):
        return ""
    lines = []
    if sw.get("ratios"):
        lines += ["| ratio of max rates | mean | spread over seeds | per seed | counts |",
                  "|---|---|---|---|---|"]
        lines += [_ratio_row(k, v) for k, v in sw["ratios"].items()]
        lines.append("")
    cap = result.get("capacity_programs_per_s") or {}
    lines += ["| policy | max rate (prog/s), per seed | mean | as load (% of capacity) |",
              "|---|---|---|---|"]
    for p, v in sw["max_rate"].items():
        per = ", ".join(_fmt(x, digits=3) for x in v["per_seed"].values())
        loads = [100 * x / cap[s] for s, x in v["per_seed"].items()
                 if x is not None and math.isfinite(x) and cap.get(s)]
        load = _fmt(sum(loads) / len(loads), digits=0) + "%" if loads else "-"
        lines.append(f"| {p} | {per} | {_fmt(v['mean'], digits=3)} | {load} |")
    if sw.get("same_as"):
        lines.append("\nNot run, as they behave exactly as eager here (no group is wider): "
                     + ", ".join(sw["same_as"]) + ".")
    if sw.get("best_cap"):
        lines.append("\nBest cap per seed: " + ", ".join(f"seed {s}: {p}"
                                                          for s, p in sw["best_cap"].items()))
    return "\n".join(lines) + "\n"


def per_rate_table(result: dict) -> str:
    rows = ["| policy | seed | rate (prog/s) | load | goodput (prog/s) | SLO attain. | "
            "chat attain. | program attain. | TTFT p50/p99 (ms) | TPOT p50/p99 (ms) | "
            "mean width | held branch-steps |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in sorted(result["runs"], key=lambda r: (r.get("seed", 0), r["policy"], r["rate"])):
        s = run["summary"]
        srv = run.get("server", {})
        rows.append(
            f"| {run['policy']} | {run.get('seed', 0)} | {run['rate']:.3f} | "
            f"{_fmt(run.get('load'), 100, 0)}% | {s['goodput']:.3f} | "
            f"{100 * s['slo_attainment']:.1f}% | {_fmt(s['chat_attainment'], 100, 1)}% | "
            f"{_fmt(s['program_attainment'], 100, 1)}% | "
            f"{_fmt(s['ttft_s']['p50'], 1e3, 0)}/{_fmt(s['ttft_s']['p99'], 1e3, 0)} | "
            f"{_fmt(s['tpot_s']['p50'], 1e3)}/{_fmt(s['tpot_s']['p99'], 1e3)} | "
            f"{_fmt(srv.get('mean_width'))} | {srv.get('held_branch_steps', '-')} |")
    return "\n".join(rows) + "\n"


def markdown(result: dict) -> str:
    out = []
    slo = result.get("slo", {})
    cal = result.get("calibration", {})
    cost = result.get("cost_model") or {}
    if cost:
        out.append(f"Cost model: {cost.get('name')}"
                   + (f" ({cost['label']})" if cost.get("label") else "") + "\n")
    if slo:
        mode = (f"stage deadline, stretch {slo['branch_stretch']:g}" if slo["mode"] == "stage"
                else f"program deadline, {slo['program_multiple']:g}x its critical path")
        basis = (" (per program, at its own context; shown here at the mean context)"
                 if slo.get("basis") == "context" else "")
        out.append(f"SLOs{basis}: TTFT {_fmt(slo['ttft_s'], 1e3, 1)} ms, TPOT "
                   f"{_fmt(slo['tpot_s'], 1e3, 2)} ms ({mode}); isolated TTFT "
                   f"{_fmt(cal.get('ttft_s'), 1e3, 1)} ms, TPOT {_fmt(cal.get('tpot_s'), 1e3, 2)}"
                   f" ms, capacity {_fmt(cal.get('tokens_per_s'), 1, 0)} tokens/s at batch "
                   f"{cal.get('batch', '-')}\n")
    tables = goodput_tables(result)
    if tables:
        out.append("### Goodput: each policy's highest rate at >= 95% SLO attainment\n")
        out.append(tables)
    if result.get("sim"):
        sim = result["sim"]
        out.append("### Simulated on this machine's live-fitted step-time model\n")
        head = result["headline_rate"]
        out.append(f"Each policy's highest rate at >= 95% SLO attainment in the simulator "
                   f"({sim['cost_model'].get('name', '')}: a linear fit of this machine's "
                   f"calibration; quote it as the simulator's, not as live). "
                   f"The live runs below are at {head['rate']:.3g} programs/s, "
                   f"{100 * head['load']:.0f}% of capacity ({head['source']}).\n")
        out.append(goodput_tables(sim))
    if result.get("at_rate_ratios"):
        out.append("Live, per-rate goodput ratios at that one rate: " + ", ".join(
            f"{k}: {_fmt(v)}x" for k, v in result["at_rate_ratios"].items()) + "\n")
    out.append("### Every run\n")
    out.append(per_rate_table(result))
    return "\n".join(out)


def plots(result: dict, out_dir: Path) -> list[Path]:
    """Attainment vs rate (one line per policy and seed, the 95% line), the TPOT
    CDF of serial requests, and the admitted width over time (live runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    by_policy: dict[str, list] = {}
    for run in result["runs"]:
        by_policy.setdefault(run["policy"], []).append(run)
    colors = {p: f"C{i}" for i, p in enumerate(by_policy)}

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for policy, runs in by_policy.items():
        for i, seed in enumerate(sorted({r.get("seed", 0) for r in runs})):
            rs = sorted((r for r in runs if r.get("seed", 0) == seed), key=lambda r: r["rate"])
            ax.plot([r["rate"] for r in rs], [100 * r["summary"]["slo_attainment"] for r in rs],
                    marker="o", ms=3, color=colors[policy], label=policy if i == 0 else None)
    ax.axhline(95, color="gray", ls="--", lw=0.8)
    paths.append(_save(plt, fig, ax, out_dir / "attainment_vs_rate.png",
                       xlabel="request rate (programs/s)", ylabel="SLO attainment (%)",
                       title="SLO attainment vs rate (95% line)"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, runs in by_policy.items():
        run = _cdf_run(runs)
        tpots = sorted(run.get("tpots_ms", [])) if run else []
        if tpots:
            ax.plot(tpots, [(i + 1) / len(tpots) for i in range(len(tpots))],
                    color=colors[policy], label=f"{policy} @ {run['rate']:.2f}/s")
    if result["runs"]:
        ax.axvline(1e3 * result["runs"][0]["tpot_slo"], color="gray", ls="--", lw=0.8)
    paths.append(_save(plt, fig, ax, out_dir / "tpot_cdf.png",
                       xlabel="TPOT of serial requests (ms)", ylabel="CDF",
                       title="TPOT CDF (each policy's highest passing rate)"))

    series = {p: _cdf_run(runs).get("width_series") for p, runs in by_policy.items()
              if _cdf_run(runs)}
    if any(series.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy, samples in series.items():
            if samples:
                ax.plot([s[0] for s in samples], [s[1] for s in samples],
                        color=colors[policy], label=policy)
        paths.append(_save(plt, fig, ax, out_dir / "width_over_time.png", xlabel="time (s)",
                           ylabel="branches decoding per step",
                           title="Admitted branch width over time"))
    return paths


def _cdf_run(runs: list[dict]) -> dict:
    """The run a policy is pictured by: its highest passing rate (first seed),
    else its lowest rate."""
    seed = min(r.get("seed", 0) for r in runs)
    mine = [r for r in runs if r.get("seed", 0) == seed]
    passed = [r for r in mine if r["summary"]["slo_attainment"] >= 0.95]
    if passed:
        return max(passed, key=lambda r: r["rate"])
    return min(mine, key=lambda r: r["rate"]) if mine else {}


def _save(plt, fig, ax, path: Path, **labels) -> Path:
    ax.set(**labels)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _jsonable(x):
    """inf/nan as strings: JSON has no such numbers."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write(result: dict, out_dir: Path, render_plots: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "result.json", "markdown": out_dir / "result.md"}
    files["json"].write_text(json.dumps(_jsonable(result), indent=1))
    files["markdown"].write_text(markdown(result))
    if render_plots:
        for p in plots(result, out_dir):
            files[p.stem] = p
    return files


def write_tables(result: dict, md: str, out_dir: Path, tag: str) -> None:
    """A script's result.json and result.md (its own tables, `md`) in `out_dir`;
    prints the tables and where they went, with the wall time, after `[tag]`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(_jsonable(result), indent=1, default=str))
    (out_dir / "result.md").write_text(md)
    print(md)
    extra = f", {result['cpu_s']:.0f} s CPU in the searches" if "cpu_s" in result else ""
    print(f"[{tag}] {result['wall_s']:.0f} s wall{extra}; results in {out_dir}")
