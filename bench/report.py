"""Results as data first (JSON), then a markdown table and PNG plots rendered
from that JSON."""

from __future__ import annotations

import json
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
    return "-" if x is None else f"{x * scale:.{digits}f}"


def markdown(result: dict) -> str:
    """One row per (policy, rate): goodput, attainment, latencies, widths."""
    rows = ["| policy | rate (prog/s) | goodput (prog/s) | SLO attain. | chat attain. | "
            "program attain. | TTFT p50/p99 (ms) | TPOT p50/p99 (ms) | E2E p50 (s) | "
            "mean width |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        s = run["summary"]
        rows.append(
            f"| {run['policy']} | {run['rate']:.2f} | {s['goodput']:.3f} | "
            f"{100 * s['slo_attainment']:.1f}% | {_fmt(s['chat_attainment'], 100, 1)}% | "
            f"{_fmt(s['program_attainment'], 100, 1)}% | "
            f"{_fmt(s['ttft_s']['p50'], 1e3, 0)}/{_fmt(s['ttft_s']['p99'], 1e3, 0)} | "
            f"{_fmt(s['tpot_s']['p50'], 1e3)}/{_fmt(s['tpot_s']['p99'], 1e3)} | "
            f"{_fmt(s['e2e_s']['p50'])} | {_fmt(run.get('server', {}).get('mean_width'))} |")
    lines = ["\n".join(rows)]
    if result.get("max_rate"):
        lines.append("\nHighest rate with SLO attainment >= 95%: " + ", ".join(
            f"{p}: {'-' if r is None else f'{r:.2f}'}" for p, r in result["max_rate"].items()))
    if result.get("ratios"):
        lines.append("\n" + ", ".join(
            f"{k}: {v:.2f}x" if isinstance(v, float) else f"{k}: {v}"
            for k, v in result["ratios"].items()))
    return "\n".join(lines) + "\n"


def plots(result: dict, out_dir: Path) -> list[Path]:
    """attainment vs rate per policy, TPOT CDF, branch width over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    by_policy: dict[str, list] = {}
    for run in result["runs"]:
        by_policy.setdefault(run["policy"], []).append(run)

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, runs in by_policy.items():
        runs = sorted(runs, key=lambda r: r["rate"])
        ax.plot([r["rate"] for r in runs], [100 * r["summary"]["slo_attainment"] for r in runs],
                marker="o", label=policy)
    ax.axhline(95, color="gray", ls="--", lw=0.8)
    paths.append(_save(plt, fig, ax, out_dir / "attainment_vs_rate.png",
                       xlabel="request rate (programs/s)", ylabel="SLO attainment (%)",
                       title="SLO attainment vs rate"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, runs in by_policy.items():
        tpots = sorted(runs[-1].get("tpots_ms", []))
        if tpots:
            ax.plot(tpots, [(i + 1) / len(tpots) for i in range(len(tpots))], label=policy)
    if result["runs"]:
        ax.axvline(1e3 * result["runs"][0]["tpot_slo"], color="gray", ls="--", lw=0.8)
    paths.append(_save(plt, fig, ax, out_dir / "tpot_cdf.png",
                       xlabel="TPOT of serial requests (ms)", ylabel="CDF",
                       title="TPOT CDF (highest rate)"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, runs in by_policy.items():
        samples = runs[-1].get("width_series", [])
        if samples:
            ax.plot([s[0] for s in samples], [s[1] for s in samples], label=policy)
    paths.append(_save(plt, fig, ax, out_dir / "width_over_time.png", xlabel="time (s)",
                       ylabel="branches decoding per step",
                       title="Admitted branch width over time (highest rate)"))
    return paths


def _save(plt, fig, ax, path: Path, **labels) -> Path:
    ax.set(**labels)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(result: dict, out_dir: Path, render_plots: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "result.json", "markdown": out_dir / "result.md"}
    files["json"].write_text(json.dumps(result, indent=2))
    files["markdown"].write_text(markdown(result))
    if render_plots:
        for p in plots(result, out_dir):
            files[p.stem] = p
    return files
