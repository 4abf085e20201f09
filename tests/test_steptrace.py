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


def test_a_bad_line_is_one_error(tmp_path):
    path = tmp_path / "steps.csv"
    path.write_text("kind,launch,end,size,count\nx,1,2,3\n")
    with pytest.raises(ValueError, match="steps.csv:2: not a step line"):
        Trace.read(path)
    path.write_text("kind,launch,end,size,count\n")
    assert parts(Trace.read(path), LinearCost(a=0, b=0, c=0, e=0, f=0), 1.0)["decode_steps"] == 0
