"""An A/B verdict on the max rate from every probe of a sweep, not from one.

A bisection's max rate is the highest probed rate that reached the target
attainment; with 40 programs a probe, one program is 2.5 points, so that rate
hinges on a program or two, and two variants' max rates can trade places from
seed to seed (bench/results/cascade-live-interleaved/, mooncake-nogate/). Here
each variant's probes (rate as a fraction of the measured capacity, programs
that met their SLO out of those run) are fitted together with one logistic
curve in log(load),

    P(met | load) = 1 / (1 + exp(-(a + b * log(load)))),

by maximum likelihood (Newton's method), and its max load is where the curve
crosses the target. Probes from several runs (seeds) pool into one fit. The
95% interval comes from a parametric bootstrap: every probe's count redrawn
from a binomial at its observed fraction, both variants refitted, the ratio
of their crossings taken. A verdict says "B beats A" or "A beats B" only when
that interval excludes 1 and both crossings lie within the loads their
variant was probed at; `extrapolated` names a variant whose crossing does not
(its figure is the curve's guess, not a measurement).

    python -m bench.verdict bench/results/cascade-live-interleaved/runs.jsonl \\
        bench/results/cascade-live-interleaved/seed-1/runs.jsonl --a taper --b taper+cascade
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Probes:
    """One variant's probes: load (fraction of capacity), programs run, programs met."""

    load: np.ndarray
    n: np.ndarray
    met: np.ndarray


def read_runs(paths: list[Path]) -> dict[str, Probes]:
    """The probes per policy of `taper bench` runs.jsonl files (one JSON per probe)."""
    rows: dict[str, list[tuple[float, int, int]]] = {}
    for path in paths:
        for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                n = int(r["summary"]["programs"])
                met = round(float(r["summary"]["slo_attainment"]) * n)
                load = float(r["load"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not a probe of taper bench ({e})") from e
            rows.setdefault(r["policy"], []).append((load, n, met))
    return {p: Probes(*(np.array(c, dtype=float) for c in zip(*v))) for p, v in rows.items()}


def fit(p: Probes, iters: int = 50) -> tuple[float, float]:
    """(a, b) of the logistic curve in log(load), by maximum likelihood; a small
    ridge keeps it finite when the probes separate perfectly."""
    x = np.log(p.load)
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    ridge = 1e-3
    for _ in range(iters):
        mu = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (p.met - p.n * mu) - ridge * w
        hess = (X * (p.n * mu * (1 - mu))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w + step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def crossing(a: float, b: float, target: float) -> float:
    """The load where the fitted attainment falls to `target` (nan if it does not
    fall with load)."""
    if b >= 0:
        return math.nan
    return math.exp((math.log(target / (1 - target)) - a) / b)


def max_load(p: Probes, target: float) -> float:
    return crossing(*fit(p), target)


def compare(a: Probes, b: Probes, target: float = 0.95, draws: int = 2000,
            seed: int = 0) -> dict:
    """Each variant's fitted max load, the ratio b/a, its 95% bootstrap interval
    and the verdict."""
    rng = np.random.default_rng(seed)
    la, lb = max_load(a, target), max_load(b, target)
    ratios = []
    for _ in range(draws):
        ra = Probes(a.load, a.n, rng.binomial(a.n.astype(int), a.met / a.n).astype(float))
        rb = Probes(b.load, b.n, rng.binomial(b.n.astype(int), b.met / b.n).astype(float))
        r = max_load(rb, target) / max_load(ra, target)
        if math.isfinite(r):
            ratios.append(r)
    lo, hi = (np.percentile(ratios, [2.5, 97.5]) if len(ratios) >= draws // 2
              else (math.nan, math.nan))
    # A crossing outside a variant's probed loads is an extrapolation of its curve
    # (all its probes met the target, or none did): no verdict rests on one.
    outside = [name for name, p, m in (("a", a, la), ("b", b, lb))
               if not (p.load.min() <= m <= p.load.max())]
    if outside:
        verdict = "no verdict (extrapolated)"
    elif lo > 1:
        verdict = "B beats A"
    elif hi < 1:
        verdict = "A beats B"
    else:
        verdict = "no verdict"
    return {"target": target, "max_load_a": la, "max_load_b": lb, "ratio": lb / la,
            "ci95": [float(lo), float(hi)], "draws_used": len(ratios), "verdict": verdict,
            "extrapolated": outside,
            "probes_a": int(len(a.load)), "probes_b": int(len(b.load))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.verdict", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="runs.jsonl files of taper bench")
    ap.add_argument("--a", required=True, help="policy A (the reference)")
    ap.add_argument("--b", required=True, help="policy B")
    ap.add_argument("--target", type=float, default=0.95, help="attainment (default 0.95)")
    ap.add_argument("--draws", type=int, default=2000, help="bootstrap draws (default 2000)")
    args = ap.parse_args(argv)
    if not 0 < args.target < 1:
        ap.error("--target must be in (0, 1)")
    try:
        probes = read_runs(args.runs)
    except (OSError, ValueError) as e:
        print(f"bench.verdict: {e}", file=sys.stderr)
        return 2
    for name in (args.a, args.b):
        if name not in probes:
            print(f"bench.verdict: no probes of {name!r}; the runs hold {sorted(probes)}",
                  file=sys.stderr)
            return 2
    out = compare(probes[args.a], probes[args.b], args.target, args.draws)
    print(json.dumps({"a": args.a, "b": args.b, **out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
