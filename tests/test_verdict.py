"""bench.verdict: the fitted max load of a sweep's probes and the A/B verdict."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import verdict
from bench.verdict import Probes, compare, crossing, fit, max_load, read_runs


def _probes(crossing_load: float, slope: float, loads, n: int, rng=None) -> Probes:
    """Probes of a known curve: attainment 0.95 at `crossing_load`; exact
    expected counts without `rng`, binomial draws with it."""
    loads = np.asarray(loads, dtype=float)
    a = math.log(0.95 / 0.05) - slope * math.log(crossing_load)
    p = 1 / (1 + np.exp(-(a + slope * np.log(loads))))
    met = n * p if rng is None else rng.binomial(n, p).astype(float)
    return Probes(loads, np.full(len(loads), float(n)), met)


def test_the_fit_recovers_a_known_curve():
    p = _probes(0.3, -8.0, np.linspace(0.1, 0.6, 9), 400)
    a, b = fit(p)
    assert b == pytest.approx(-8.0, rel=1e-3)
    assert max_load(p, 0.95) == pytest.approx(0.3, rel=1e-3)
    assert math.isnan(crossing(1.0, 0.5, 0.95))  # attainment rising with load: none


def test_a_clear_difference_gets_a_verdict_and_equal_curves_do_not():
    rng = np.random.default_rng(1)
    loads = np.linspace(0.1, 0.6, 8)
    a = _probes(0.2, -8.0, loads, 200, rng)
    b = _probes(0.4, -8.0, loads, 200, rng)
    out = compare(a, b, draws=300)
    assert out["verdict"] == "B beats A" and out["ci95"][0] > 1
    assert out["ratio"] == pytest.approx(2.0, rel=0.15)
    assert compare(b, a, draws=300)["verdict"] == "A beats B"
    same = compare(a, _probes(0.2, -8.0, loads, 200, rng), draws=300)
    assert same["verdict"] == "no verdict" and same["ci95"][0] < 1 < same["ci95"][1]


def test_forty_programs_a_probe_rarely_decide_a_ten_percent_gap():
    """The size of the live runs: 40 programs, 7 probes. A 10% difference stays
    'no verdict' most of the time, which is why the bisection's ratio alone misled."""
    rng = np.random.default_rng(0)
    loads = np.linspace(0.1, 0.5, 7)
    verdicts = [compare(_probes(0.25, -6.0, loads, 40, rng),
                        _probes(0.275, -6.0, loads, 40, rng), draws=200, seed=k)["verdict"]
                for k in range(10)]
    assert verdicts.count("no verdict") >= 6, verdicts


def test_a_crossing_outside_the_probed_loads_is_marked():
    loads = np.linspace(0.3, 0.5, 4)
    out = compare(_probes(0.2, -8.0, loads, 100), _probes(0.4, -8.0, loads, 100), draws=50)
    assert out["extrapolated"] == ["a"] and out["verdict"] == "no verdict (extrapolated)"


def test_runs_files_are_read_and_bad_input_is_one_line(tmp_path, capsys):
    runs = tmp_path / "runs.jsonl"
    rows = [{"policy": pol, "load": load, "summary": {"programs": 40,
                                                      "slo_attainment": att}}
            for pol, load, att in (("x", 0.1, 1.0), ("x", 0.3, 0.5), ("y", 0.2, 0.975))]
    runs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    probes = read_runs([runs])
    assert list(probes["x"].met) == [40.0, 20.0] and list(probes["y"].load) == [0.2]
    assert verdict.main([str(runs), "--a", "x", "--b", "z"]) == 2
    assert "no probes of 'z'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"policy": "x"}\n')
    assert verdict.main([str(bad), "--a", "x", "--b", "y"]) == 2
    assert "bad.jsonl:1: not a probe" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        verdict.main([str(runs), "--a", "x", "--b", "y", "--target", "1.5"])
