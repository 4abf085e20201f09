"""The shared sweep: bisection to the highest rate at >= 95% attainment, and the
ratios over seeds (no server, no simulator: synthetic attainment curves)."""

from __future__ import annotations

import math

import pytest

from bench.sweep import (
    SweepSpec,
    aggregate,
    max_rate,
    same_as_eager,
    sweep_interleaved,
    sweep_one,
)


def curve(threshold: float):
    """A probe whose attainment is 100% up to `threshold` programs/s and 90% above."""

    def probe(rate: float) -> dict:
        att = 1.0 if rate <= threshold else 0.9
        return {"rate": rate, "summary": {"slo_attainment": att}}

    return probe


@pytest.mark.parametrize("threshold, start", [(1.0, 0.3), (1.0, 5.0), (0.37, 0.37), (2.9, 1.0)])
def test_bisection_finds_the_highest_passing_rate_within_5_percent(threshold, start):
    spec = SweepSpec(start=start)
    runs = sweep_one(curve(threshold), spec)
    best = max_rate(runs)
    assert best["rate"] <= threshold and best["bounded"]
    assert best["fail_above"] / best["rate"] <= 1.05
    assert best["rate"] >= threshold / 1.05 * 0.999
    assert len(runs) <= spec.max_probes
    assert [r["probe"] for r in runs] == list(range(len(runs)))


def test_a_policy_that_never_attains_has_no_max_rate():
    """Attainment that lower rates do not improve is not load: the search stops."""
    runs = sweep_one(lambda r: {"rate": r, "summary": {"slo_attainment": 0.5}},
                     SweepSpec(start=1.0))
    assert max_rate(runs) == {"rate": None, "fail_above": min(r["rate"] for r in runs),
                              "bounded": True}
    assert len(runs) == 2
    # While lower rates still help, it keeps going down, to the floor at most.
    runs = sweep_one(lambda r: {"rate": r, "summary": {"slo_attainment": 0.9 - r / 2}},
                     SweepSpec(start=1.0, floor=1 / 8))
    assert max_rate(runs)["rate"] is None and min(r["rate"] for r in runs) >= 1 / 8
    assert len(runs) == 5


def test_grid_runs_every_rate_in_order():
    runs = sweep_one(curve(1.5), SweepSpec(grid=(0.5, 1.0, 2.0)))
    assert [r["rate"] for r in runs] == [0.5, 1.0, 2.0]
    assert max_rate(runs)["rate"] == 1.0


def test_interleaved_searches_take_turns_and_probe_as_alone():
    """Probes alternate between the searches, one each per round, and each search
    tries the same rates as on its own; a search that ends leaves the rotation."""
    order = []

    def logged(name, probe):
        def run(rate):
            order.append(name)
            return probe(rate)
        return run

    specs = [SweepSpec(start=0.5), SweepSpec(start=0.5), SweepSpec(grid=(0.5, 1.0))]
    curves = [curve(1.0), curve(2.9), curve(1.5)]
    together = sweep_interleaved([logged(n, c) for n, c in zip("abc", curves)], specs)
    alone = [sweep_one(c, s) for c, s in zip(curves, specs)]
    assert [[r["rate"] for r in runs] for runs in together] == \
        [[r["rate"] for r in runs] for runs in alone]
    assert [[r["passed"] for r in runs] for runs in together] == \
        [[r["passed"] for r in runs] for runs in alone]
    n = [len(runs) for runs in together]
    assert n[2] == 2 and n[0] != n[1]
    rounds = max(n)
    expect = [name for k in range(rounds) for name, m in zip("abc", n) if k < m]
    assert order == expect
    assert order[:3] == ["a", "b", "c"]


def _runs(policy: str, seed: int, threshold: float | None) -> list[dict]:
    probe = curve(threshold) if threshold else (
        lambda r: {"rate": r, "summary": {"slo_attainment": 0.0}})
    out = sweep_one(probe, SweepSpec(start=1.0))
    for r in out:
        r.update(policy=policy, seed=seed)
    return out


def test_ratios_with_spread_best_cap_and_hindsight():
    runs = []
    maxima = {"off": (None, None), "eager": (1.0, 1.2), "cap:2": (1.5, 1.1),
              "cap:4": (1.2, 1.9), "taper": (2.0, 2.0), "clairvoyant": (2.5, 2.5)}
    for policy, per_seed in maxima.items():
        for seed, m in enumerate(per_seed):
            runs += _runs(policy, seed, m)
    agg = aggregate(runs, upper_bound={0: 10.0, 1: 12.0})
    taper = [agg["max_rate"]["taper"]["per_seed"][s] for s in (0, 1)]
    assert all(1.9 <= t <= 2.0 for t in taper)
    r = agg["ratios"]
    assert r["taper/off"]["per_seed"] == {0: math.inf, 1: math.inf} and r["taper/off"]["counts"]
    eager = r["taper/eager"]
    assert eager["min"] > 1.5 and eager["counts"]
    # Best cap per seed: cap:2 in seed 0, cap:4 in seed 1.
    assert agg["best_cap"] == {0: "cap:2", 1: "cap:4"}
    assert r["taper/best cap"]["min"] == pytest.approx(
        min(taper[0] / agg["max_rate"]["cap:2"]["per_seed"][0],
            taper[1] / agg["max_rate"]["cap:4"]["per_seed"][1]))
    # Hindsight takes the best deployable policy (taper here), never clairvoyant.
    assert r["taper/best in hindsight"]["per_seed"] == {0: 1.0, 1: 1.0}
    assert not r["taper/best in hindsight"]["counts"]
    assert r["taper/clairvoyant"]["max"] < 1 and r["taper/clairvoyant"]["counts"]
    assert r["taper/upper bound"]["max"] < 0.25


def test_a_ratio_whose_spread_straddles_one_does_not_count():
    runs = _runs("taper", 0, 1.0) + _runs("taper", 1, 1.0)
    runs += _runs("eager", 0, 0.8) + _runs("eager", 1, 1.3)
    ratio = aggregate(runs)["ratios"]["taper/eager"]
    assert ratio["min"] < 1 < ratio["max"] and not ratio["counts"]


def test_a_cap_no_group_can_reach_is_eager():
    assert same_as_eager(["eager", "cap:4", "cap:16", "taper"], widest=16) == {"cap:16": "eager"}
    assert same_as_eager(["cap:16", "taper"], widest=16) == {}  # no eager to stand in
    runs = _runs("eager", 0, 1.5) + _runs("cap:4", 0, 1.0) + _runs("taper", 0, 2.0)
    agg = aggregate(runs, same_as={"cap:16": "eager"})
    assert agg["max_rate"]["cap:16"] == agg["max_rate"]["eager"]
    assert agg["best_cap"] == {0: "cap:16"}
    assert agg["ratios"]["taper/best cap"]["per_seed"][0] == pytest.approx(
        agg["ratios"]["taper/eager"]["per_seed"][0])


def test_the_sensitivity_axes_grid_is_the_centre_and_each_axis_alone():
    from bench.sim import sensitivity as sens

    full, axes = sens.grid_cells("full"), sens.grid_cells("axes")
    assert len(full) == 4 * 4 * 3 * 3 and set(axes) <= set(full)
    assert sens.CENTRE in axes
    # Each axis contributes all of its values, with the others at the centre.
    for i, values in enumerate((sens.TPOT_SCALES, sens.STRETCHES, sens.WIDTHS, sens.CONTEXTS)):
        assert {c[i] for c in axes if all(c[j] == sens.CENTRE[j] for j in range(4) if j != i)} \
            == set(values)
    assert len(axes) == 1 + sum(len(v) - 1 for v in (sens.TPOT_SCALES, sens.STRETCHES,
                                                       sens.WIDTHS, sens.CONTEXTS))
    results = [{"cell": c, "policy": p, "max_rate": r}
               for c in axes for p, r in (("off", None), ("eager", 0.5), ("cap:2", 0.8),
                                          ("taper", 1.0))]
    rows = sens.summarize_cells(results)
    assert all(r["taper/eager"] == 2.0 and r["taper/best cap"] == 1.25 for r in rows)
    md = sens.markdown(rows, {"num_prompts": 10, "seed": 0, "cost_model": "x"})
    assert md.count("| 2.00 | 1.25 |") == len(axes)


def test_a_sensitivity_run_resumes_only_searches_of_its_own_setup(tmp_path):
    """partial.jsonl lines of another cost model (its file's content) or other
    options are dropped, not mixed into the table."""
    import argparse
    import json

    from bench.sim import sensitivity as sens

    model = tmp_path / "m.json"
    model.write_text('{"a": 1}')
    ns = argparse.Namespace(cost_model=f"measured:{model}", workload="long-context",
                            num_prompts=150, seed=0, ttft_x=10.0, start=0.25, kv_capacity=9)
    mine = sens.setup(ns)
    partial = tmp_path / "partial.jsonl"
    cell = [1.5, 2.0, [4, 8], 2048]
    lines = [{"cell": cell, "policy": "taper", "max_rate": 1.0, "setup": mine},
             {"cell": cell, "policy": "eager", "max_rate": 0.5},  # stored before setups
             {"cell": cell, "policy": "off", "max_rate": 0.2,
              "setup": {**mine, "num_prompts": 10}}]
    partial.write_text("".join(json.dumps(x) + "\n" for x in lines))
    done, stale = sens.resume(partial, mine)
    assert stale == 2 and list(done) == [((1.5, 2.0, (4, 8), 2048), "taper")]
    assert len(partial.read_text().splitlines()) == 1  # the file keeps what is reused
    model.write_text('{"a": 2}')  # the same path, another profile
    assert sens.resume(partial, sens.setup(ns)) == ({}, 1)
    bare = argparse.Namespace(**{**vars(ns), "cost_model": str(model)})  # a bare path
    assert sens.setup(bare)["cost_sha1"] == sens.setup(ns)["cost_sha1"] is not None
