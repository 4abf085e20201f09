"""Reading a server's step trace (TAPER_STEP_TRACE) apart: cycles, gaps, idle,
prefill, the cost model at each step."""

from __future__ import annotations

import pytest

from bench.sim.cost import LinearCost
from bench.sim.steptrace import Trace, parts


def test_parts_of_a_known_trace(tmp_path):
    # decode 10 ms + 2 ms gap, a 30 ms prefill, 2 ms gap, decode, then 5 s idle, decode
    lines = ["kind,launch,end,size,count",
             "d,100.000,100.010,4,400",
             "p,100.012,100.042,512,2",
             "d,100.044,100.054,4,404",
             "d,100.056,100.066,6,600",
             "d,105.066,105.076,6,606",
             "d,200.000,200.010,1,10"]  # outside the window
    path = tmp_path / "steps.csv"
    path.write_text("\n".join(lines) + "\n")
    tr = Trace.read(path, 99.0, 150.0)
    assert list(tr.kind) == ["d", "p", "d", "d", "d"]
    cost = LinearCost(a=0.002, b=0.001, c=1e-5, e=0.01, f=1e-4)
    got = parts(tr, cost, 6.0)
    assert got["decode_steps"] == 4 and got["prefill_steps"] == 1
    assert got["decode_step_s"]["mean"] == pytest.approx(0.010)
    # cycles: 44 ms (across the prefill), 12 ms; the one across the idle is left out
    assert got["decode_cycle_s"]["n"] == 2
    assert got["decode_cycle_s"]["mean"] == pytest.approx((0.044 + 0.012) / 2)
    assert got["gap_s"]["n"] == 3 and got["gap_s"]["p50"] == pytest.approx(0.002)
    assert got["idle_s"] == pytest.approx(5.0)
    assert got["prefill_s"] == pytest.approx(0.030)
    assert got["model_prefill_s"] == pytest.approx(0.01 + 512e-4)
    assert got["model_decode_s"]["mean"] == pytest.approx(
        sum(0.002 + 0.001 * n + 1e-5 * kv for n, kv in ((4, 400), (4, 404), (6, 600), (6, 606)))
        / 4)


def test_a_restarted_servers_header_mid_file_is_skipped(tmp_path):
    path = tmp_path / "steps.csv"
    path.write_text("kind,launch,end,size,count,context\nd,1.0,1.01,2,20\n"
                    "kind,launch,end,size,count,context\np,5.0,5.02,30,1,30\n")
    tr = Trace.read(path)
    assert list(tr.kind) == ["d", "p"] and list(tr.context) == [0, 30]


def test_a_bad_line_is_one_error(tmp_path):
    path = tmp_path / "steps.csv"
    path.write_text("kind,launch,end,size,count\nx,1,2,3\n")
    with pytest.raises(ValueError, match="steps.csv:2: not a step line"):
        Trace.read(path)
    path.write_text("kind,launch,end,size,count\n")
    assert parts(Trace.read(path), LinearCost(a=0, b=0, c=0, e=0, f=0), 1.0)["decode_steps"] == 0


def test_fit_recovers_a_known_model(tmp_path):
    """fit_linear on steps made by a known model: its coefficients back, the
    prefill's term for cached context included, and the median gap."""
    import numpy as np

    from bench.sim.steptrace import fit_linear

    rng = np.random.default_rng(0)
    true = LinearCost(a=0.004, b=0.0002, c=3e-7, e=0.006, f=2e-5, g=0.003, h=4e-6)
    lines, t = ["kind,launch,end,size,count,context"], 10.0
    for i in range(300):
        if i % 5 == 0:
            tok, reqs = int(rng.integers(1, 900)), int(rng.integers(1, 6))
            ctx = tok + int(rng.integers(0, 3000))
            dt = true.prefill(tok, reqs, ctx)
            lines.append(f"p,{t:.6f},{t + dt:.6f},{tok},{reqs},{ctx}")
        else:
            n = int(rng.integers(1, 40))
            kv = n * int(rng.integers(50, 2000))
            dt = true.decode(n, kv)
            lines.append(f"d,{t:.6f},{t + dt:.6f},{n},{kv}")
        t += dt + 0.001
    path = tmp_path / "steps.csv"
    path.write_text("\n".join(lines) + "\n")
    got = fit_linear(Trace.read(path))
    for k in "abcefgh":
        assert getattr(got, k) == pytest.approx(getattr(true, k), rel=1e-3, abs=1e-9), k
    assert got.gap == pytest.approx(0.001, abs=1e-5) and got.noise < 1e-3
    with pytest.raises(ValueError, match="too few steps"):
        fit_linear(Trace.read(path, 0.0, 10.02))


def test_a_stored_live_run_simulates_again(tmp_path):
    """fidelity --resim's path on the committed Mooncake case: its step trace
    fitted before and during the run, the same programs simulated on each
    model, the live run taken apart; deterministic, so the figures the
    results README quotes come back."""
    import json
    import shutil
    from pathlib import Path

    from bench.sim import fidelity

    src = Path(__file__).resolve().parents[1] / "bench/results/fidelity"
    case = next(c for c in json.loads((src / "result.json").read_text())["cases"]
                if c["case"] == "mooncake")
    shutil.copytree(src / "mooncake", tmp_path / "mooncake")
    out = fidelity.simulate_case(case, tmp_path / "mooncake")
    assert set(out["models"]) == {key for key, _ in fidelity.MODELS}
    rows = {r["figure"]: r["rel_diff"] for r in out["models"]["trace_run"]["rows"]}
    assert rows["TPOT p50"] == pytest.approx(0.008, abs=0.002)  # README: +0.8%
    parts_ = out["models"]["trace_before"]["live_steps"]
    assert parts_["decode_steps"] == 2205 and parts_["prefill_steps"] == 78
    assert 0.0 < parts_["client_cpu_share"] < 0.1
    assert fidelity.markdown({"policy": "taper", "seed": 0, "cases": [out]}).count(
        "| TPOT p50 |") == 3
