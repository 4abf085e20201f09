"""`taper bench` end to end against the real server: calibrated, clean, per-run
figures; the sweep and the main job's simulate-then-run path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.cli import HEADLINE_LOAD

pytestmark = pytest.mark.live


def bench(out, *args: str) -> dict:
    # The pool's servers sleep while idle (--sleep-on-idle): they stay.
    r = subprocess.run([sys.executable, "-m", "sglang_taper", "bench", "--num-prompts", "6",
                        "--drain", "30", "--no-plots", "--result-dir", str(out), *args],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_a_sweep_is_calibrated_and_each_rate_starts_clean(tmp_path):
    res = bench(tmp_path, "--policies", "off", "--sweep", "15%,30%")
    cal = res["calibration"]
    assert cal["samples"] >= 10 and cal["tpot_spread"]["n"] >= 10
    assert 0 < cal["tpot_spread"]["p10"] <= cal["tpot_s"] <= cal["tpot_spread"]["p90"]
    assert res["slo"]["tpot_s"] == pytest.approx(3 * cal["tpot_s"])  # the live default
    cap = res["capacity_programs_per_s"]["0"]
    runs = res["runs"]
    assert [r["rate"] for r in runs] == pytest.approx([0.15 * cap, 0.3 * cap])
    steps = [r["server"]["steps"] for r in runs]
    # The same programs at two rates: per-run figures, not cumulative ones.
    assert all(s > 0 for s in steps) and max(steps) < 1.5 * min(steps)
    for r in runs:
        assert set(r["server"]["group_width_histogram"]) == {"1"}  # off, whole run
        assert r["summary"]["programs"] == 6 and r["summary"]["errors"] == 0
    assert "off" in res["sweep"]["max_rate"]


def test_the_main_job_simulates_then_runs_live_at_its_load(tmp_path):
    res = bench(tmp_path, "--policies", "taper")
    fit = json.loads((tmp_path / "live_cost_model.json").read_text())
    assert fit["kind"] == "linear" and fit["a"] > 0 and fit["b"] > 0
    sim = res["sim"]["sweep"]["max_rate"]
    assert {"off", "eager", "cap:2", "taper", "clairvoyant"} <= set(sim)
    (run,) = res["runs"]
    head = res["headline_rate"]
    assert run["rate"] == head["rate"]
    assert head["load"] == pytest.approx(float(HEADLINE_LOAD.rstrip("%")) / 100)
    assert run["summary"]["programs"] == 6
    assert "Simulated on this machine's live-fitted step-time model" in (
        tmp_path / "result.md").read_text()
