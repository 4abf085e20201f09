"""One sweep loop for `taper bench` (live) and `taper sim`: rates x policies x
seeds, and the field's goodput from it.

Goodput, as DistServe and vLLM's `--goodput` define it and as TAPER's paper
reports it, is the highest request rate a policy sustains with at least 95% of
programs meeting their SLO. `--sweep auto` finds it per (policy, seed) by
bracketing and then bisecting the rate geometrically until the highest passing
and the lowest failing rate are within 5% of each other; `--sweep R1,R2,...`
tests a fixed grid (the highest passing grid rate counts).

Ratios (taper over each other policy) are taken per seed and reported as their
mean and spread over seeds; a ratio counts only where its whole spread lies on
one side of 1. "Best cap" is, per seed, the best of the `cap:K` policies run;
"best in hindsight" the best of every deployable policy run (taper included),
the practical ceiling. `clairvoyant` (simulator only) is a per-step greedy with
the true step time, not an upper bound; `upper_bound` is one: a throughput
relaxation no policy can beat (bench/sim/bound.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

TARGET = 0.95  # SLO attainment a rate must reach to count as sustained


@dataclass(frozen=True, slots=True)
class SweepSpec:
    """How rates are chosen for one (policy, seed)."""

    grid: tuple[float, ...] = ()  # programs/s to test; empty: bisect (auto)
    start: float = 1.0  # auto: programs/s of the first probe
    tolerance: float = 0.05  # auto: stop when highest pass and lowest fail are this close
    factor: float = 1.6  # auto: bracketing step (x or / per probe)
    max_probes: int = 12  # auto: at most this many probes per (policy, seed)
    floor: float = 1 / 16  # auto: give up below start * floor (the policy never attains)
    # auto, going down: give up when, far below target (by `far`), a 1/factor lower
    # rate gains less attainment than `flat`: the misses hardly come from load (e.g.
    # off under stage deadlines that serial branches cannot meet), and each lower
    # probe takes factor times as long
    flat: float = 0.05
    far: float = 0.1
    target: float = TARGET

    def __post_init__(self) -> None:
        if any(not r > 0 for r in self.grid):
            raise ValueError(f"sweep rates must be > 0, got {self.grid}")
        if not self.start > 0:
            raise ValueError(f"sweep start rate must be > 0, got {self.start}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"sweep tolerance must be in (0, 1), got {self.tolerance}")

    @property
    def auto(self) -> bool:
        return not self.grid


def attainment(run: dict) -> float:
    return run["summary"]["slo_attainment"]


def search(spec: SweepSpec) -> Generator[float, dict, None]:
    """The rates one (policy, seed) probes, in order: each `yield rate` is
    answered (`send`) with that probe's run dict, its "passed" set. The grid's
    rates, or a bracketing-then-bisection search for the highest rate at >=
    target."""
    runs: list[dict] = []
    if not spec.auto:
        for rate in spec.grid:
            runs.append((yield rate))
        return
    lo = hi = None
    rate = spec.start
    runs.append((yield rate))
    if runs[-1]["passed"]:
        lo = rate
        while hi is None and len(runs) < spec.max_probes:
            rate *= spec.factor
            runs.append((yield rate))
            if runs[-1]["passed"]:
                lo = rate
            else:
                hi = rate
    else:
        hi = rate
        while lo is None and len(runs) < spec.max_probes:
            rate /= spec.factor
            if rate < spec.start * spec.floor:
                break
            runs.append((yield rate))
            if runs[-1]["passed"]:
                lo = rate
            else:
                hi = rate
                a, before = attainment(runs[-1]), attainment(runs[-2])
                if a < spec.target - spec.far and a - before < spec.flat:
                    break
    while lo is not None and hi is not None and hi / lo > 1 + spec.tolerance \
            and len(runs) < spec.max_probes:
        mid = math.sqrt(lo * hi)
        runs.append((yield mid))
        if runs[-1]["passed"]:
            lo = mid
        else:
            hi = mid


def _answer(rate: float, run: dict, runs: list[dict], spec: SweepSpec,
            log: Callable[[str], None] | None) -> dict:
    run["probe"] = len(runs)
    run["passed"] = attainment(run) >= spec.target
    runs.append(run)
    if log is not None:
        log(f"rate {rate:.4g}/s: attainment {100 * attainment(run):.1f}%"
            f" ({'pass' if run['passed'] else 'fail'})")
    return run


def sweep_one(probe: Callable[[float], dict], spec: SweepSpec,
              log: Callable[[str], None] | None = None) -> list[dict]:
    """Every probe of one (policy, seed), in the order run (`search`). Each run
    dict gets "probe": its index, and "passed"."""
    return sweep_interleaved([probe], [spec], log)[0]


def sweep_interleaved(probes: list[Callable[[float], dict]], specs: list[SweepSpec],
                      log: Callable[[str], None] | None = None) -> list[list[dict]]:
    """Several (policy, seed) searches whose probes take turns, one probe each
    per round, until every search is done: the policies see the same stretch
    of a host whose speed drifts. Each search is `search(spec)`, the same
    rates as alone; the probes' runs per search, in its order."""
    out: list[list[dict]] = [[] for _ in probes]
    active = []
    for i, spec in enumerate(specs):
        gen = search(spec)
        active.append((i, gen, next(gen)))
    while active:
        still = []
        for i, gen, rate in active:
            run = _answer(rate, probes[i](rate), out[i], specs[i], log)
            try:
                still.append((i, gen, gen.send(run)))
            except StopIteration:
                pass
        active = still
    return out


def max_rate(runs: list[dict], target: float = TARGET) -> dict:
    """The highest rate that passed among one (policy, seed)'s probes, with the
    lowest failing rate above it: {"rate": r or None, "fail_above": f or None,
    "bounded": whether a failing rate above was found}."""
    passed = [r["rate"] for r in runs if attainment(r) >= target]
    best = max(passed) if passed else None
    above = [r["rate"] for r in runs if attainment(r) < target
             and (best is None or r["rate"] > best)]
    return {"rate": best, "fail_above": min(above) if above else None, "bounded": bool(above)}


def _is_cap(policy: str) -> bool:
    return policy.startswith("cap:")


def same_as_eager(policies: list[str], widest: int) -> dict[str, str]:
    """The caps that can never hold a branch because no group is wider than K:
    they behave exactly as eager, so a sweep runs eager once and reports them
    as eager's figures."""
    return {p: "eager" for p in policies
            if _is_cap(p) and int(p.split(":")[1]) >= widest and "eager" in policies}


DEPLOYABLE_EXCLUDE = ("clairvoyant",)


def aggregate(runs: list[dict], target: float = TARGET,
              upper_bound: dict[int, float] | None = None,
              same_as: dict[str, str] | None = None) -> dict:
    """Max rates per policy and seed, taper's ratios over the others with their
    spread over seeds, best cap and best in hindsight. `upper_bound`: the
    relaxation's max rate per seed, if known. `same_as`: policies not run
    because they behave exactly as another (see same_as_eager)."""
    by: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        by.setdefault((r["policy"], r["seed"]), []).append(r)
    for alias, policy in (same_as or {}).items():
        for (p, seed), rs in list(by.items()):
            if p == policy:
                by[(alias, seed)] = rs
    policies = list(dict.fromkeys([r["policy"] for r in runs] + list(same_as or {})))
    seeds = sorted({r["seed"] for r in runs})
    rates = {p: {s: max_rate(by[(p, s)], target) for s in seeds if (p, s) in by}
             for p in policies}
    out: dict = {"target": target, "seeds": seeds, "max_rate": {}, "ratios": {},
                 "same_as": dict(same_as or {})}
    for p in policies:
        per = {s: v["rate"] for s, v in rates[p].items()}
        out["max_rate"][p] = {"per_seed": per, **_spread([v for v in per.values()])}
    caps = [p for p in policies if _is_cap(p)]
    deployable = [p for p in policies if p not in DEPLOYABLE_EXCLUDE]
    derived: dict[str, dict[int, float | None]] = {}
    if caps:
        derived["best cap"] = {s: _best([rates[p][s]["rate"] for p in caps if s in rates[p]])
                               for s in seeds}
        out["best_cap"] = {s: max(caps, key=lambda p, s=s: rates[p].get(s, {}).get("rate")
                                  or 0.0) for s in seeds}
    if deployable:
        derived["best in hindsight"] = {
            s: _best([rates[p][s]["rate"] for p in deployable if s in rates[p]])
            for s in seeds}
    if upper_bound:
        derived["upper bound"] = {s: upper_bound.get(s) for s in seeds}
    for name, per in derived.items():
        out["max_rate"][name] = {"per_seed": per, **_spread(list(per.values()))}
    if "taper" not in rates:
        return out
    others = [p for p in ("off", "eager") if p in rates] + list(derived)
    others += [p for p in policies if p not in ("off", "eager", "taper") and not _is_cap(p)]
    for other in others:
        per_seed = {}
        for s in seeds:
            t = rates["taper"].get(s, {}).get("rate")
            o = (derived[other][s] if other in derived else rates[other].get(s, {}).get("rate"))
            per_seed[s] = _ratio(t, o)
        out["ratios"][f"taper/{other}"] = {"per_seed": per_seed,
                                           **_spread(list(per_seed.values()), ratio=True)}
    return out


def _best(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _ratio(t: float | None, o: float | None) -> float | None:
    """taper's max rate over another's: inf when only taper sustains any rate
    tested, None when neither does."""
    if o is None or o == 0:
        return math.inf if t else None
    return (t or 0.0) / o


def _spread(values: list[float | None], ratio: bool = False) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "min": None, "max": None, "n": 0}
    finite = [v for v in vals if math.isfinite(v)]
    mean = sum(finite) / len(finite) if len(finite) == len(vals) else math.inf
    out = {"mean": mean, "min": min(vals), "max": max(vals), "n": len(vals)}
    if ratio:
        # A ratio counts when its spread over seeds excludes 1 (and every seed had one).
        out["counts"] = len(vals) == len(values) and (min(vals) > 1 or max(vals) < 1)
    return out
