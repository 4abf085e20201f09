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
    # the one decode step a decode step follows without idling: launch to launch
    # (12 ms) against the model's step and gap there (4 sequences, 404 tokens)
    assert got["decode_measured_over_model"]["n"] == 1
    assert got["decode_measured_over_model"]["p50"] == pytest.approx(
        0.012 / (0.002 + 0.004 + 404e-5))


def test_windows_read_together(tmp_path):
    path = tmp_path / "steps.csv"
    path.write_text("kind,launch,end,size,count\n" + "".join(
        f"d,{t}.0,{t}.01,1,10\n" for t in (5, 1, 3, 9, 7)))
    tr = Trace.read_windows(path, [(6.0, 10.0), (0.0, 2.0)])
    assert list(tr.launch) == [1.0, 7.0, 9.0]  # launch order, whichever window
    assert list(Trace.read(path, 3.0, 7.0).launch) == [3.0, 5.0]  # [t0, t1)


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
    """fit_linear on steps made by a known model, with a scheduler gap that
    grows with the batch just decoded (1 ms + 50 us a sequence, as live): its
    coefficients back, the per-sequence gap in the decode's `b` (the cycle a
    running request sees), the prefill's term for cached context included,
    and the constant gap (the one after a prefill) as the model's gap."""
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
            t += 50e-6 * n
        t += dt + 0.001
    path = tmp_path / "steps.csv"
    path.write_text("\n".join(lines) + "\n")
    got = fit_linear(Trace.read(path))
    assert got.b == pytest.approx(true.b + 50e-6, rel=1e-3)
    for k in "acefgh":
        assert getattr(got, k) == pytest.approx(getattr(true, k), rel=1e-3, abs=1e-9), k
    assert got.gap == pytest.approx(0.001, abs=1e-5) and got.noise < 1e-3
    from bench.sim import cost as costs  # `taper sim --cost-model trace:PATH`: the same fit

    loaded = costs.load(f"trace:{path}")
    assert {**loaded.describe(), "name": None} == {**got.describe(), "name": None}
    assert loaded.name == "trace:steps.csv"
    with pytest.raises(ValueError, match="too few steps"):
        fit_linear(Trace.read(path, 0.0, 10.02))


def test_a_stored_live_run_simulates_again(tmp_path):
    """fidelity --resim's path on the committed Mooncake case: its step trace
    fitted around, between and during the two live runs, each run's programs
    simulated on every model, the runs taken apart; deterministic, so the
    figures the results README quotes come back."""
    import json
    import shutil
    from pathlib import Path

    from bench.sim import fidelity

    src = Path(__file__).resolve().parents[1] / "bench/results/fidelity"
    case = next(c for c in json.loads((src / "result.json").read_text())["cases"]
                if c["case"] == "mooncake")
    shutil.copytree(src / "mooncake", tmp_path / "mooncake")
    out = fidelity.simulate_case(case, tmp_path / "mooncake")
    assert len(out["runs"]) == 2
    for run in out["runs"]:
        assert set(run["models"]) == {key for key, _ in fidelity.MODELS}
        assert len(run["host_speed"][0]) == len(run["host_speed"][1]) > 1
    rows = [{r["figure"]: r["rel_diff"] for r in run["models"]["bracket_speed"]["rows"]}
            for run in out["runs"]]
    assert rows[0]["TPOT p50"] == pytest.approx(-0.049, abs=0.002)  # README: -4.9%
    assert rows[1]["TPOT p99"] == pytest.approx(0.087, abs=0.002)  # README: +8.7%
    assert out["repeat"][2]["rel_diff"] == pytest.approx(-0.138, abs=0.002)  # live vs live
    # bracket_hook and bracket_load read the *other* run only (out of sample)
    from bench.sim.cost import load as load_cost
    from bench.sim.steptrace import load_slowdown

    for i, run in enumerate(out["runs"]):
        other = out["runs"][1 - i]
        assert run["hook_s_other"] == fidelity.hook_per_regulated_step(other["live_server"])
        assert run["hook_s_other"] != fidelity.hook_per_regulated_step(run["live_server"])
        bracket = load_cost(f"linear:{tmp_path}/mooncake/run{i + 1}_bracket_cost_model.json")
        o0, o1 = other["window"]
        want = load_slowdown(Trace.read(tmp_path / "mooncake/steps.csv", o0, o1), bracket, o0)
        assert tuple(run["load_other"][:2]) == pytest.approx(want)
    assert fidelity.hook_per_regulated_step({"overhead": {"hook_seconds": 1.0},
                                             "regulated_steps": 0}) is None
    assert fidelity.hook_per_regulated_step({}) is None
    parts_ = out["runs"][0]["models"]["bracket"]["live_steps"]
    assert parts_["decode_steps"] == 2205 and parts_["prefill_steps"] == 73
    assert 0.0 < parts_["client_cpu_share"] < 0.1
    md = fidelity.markdown({"policy": "taper", "seed": 0, "cases": [out]})
    assert md.count("| sim on ") == len(fidelity.MODELS)
    assert "| bracket_speed | 8 of 8 | 8 of 8 |" in md  # within 10%, both runs
    # bracket_drift: the median of its draws, which lies within them
    import statistics

    moved = False
    for run in out["runs"]:
        drift = run["models"]["bracket_drift"]
        for row in drift["rows"]:
            d = drift["draws"][row["figure"]]
            assert d["n"] == len(d["figures"]) == fidelity.DRIFT_DRAWS
            assert row["sim"] == pytest.approx(statistics.median(d["figures"]))
            moved |= len(set(d["figures"])) > 1
    assert moved  # where the slow stretches fall moves some figure
    assert "bracket_drift over its 9 draws, sim/live - 1 from p10 to p90" in md
    assert f"programs/s = {out['load']} of capacity;" in md
    absolute = fidelity.markdown({"policy": "taper", "seed": 0, "cases": [{**out, "load": "0.4"}]})
    assert "programs/s (an absolute rate);" in absolute  # --load CASE=0.4


def test_host_speed_is_the_run_against_the_model_per_bin(tmp_path):
    """Decode cycles at twice the model for the first 5 s, as the model after,
    a bin with too few cycles keeping the last factor."""
    from bench.sim.steptrace import host_speed

    cost = LinearCost(a=0.004, b=0.001, c=0.0, e=0.0, f=0.0, gap=0.001)
    lines, t = ["kind,launch,end,size,count"], 100.0
    while t < 110.0:
        k = 2.0 if t < 105.0 else 1.0
        step = k * (0.004 + 0.001 * 3)
        lines.append(f"d,{t:.6f},{t + step:.6f},3,300")
        t += step + k * 0.001
    lines.append(f"d,{t + 6:.6f},{t + 6.01:.6f},3,300")  # after an idle stretch, alone
    path = tmp_path / "steps.csv"
    path.write_text("\n".join(lines) + "\n")
    times, factors = host_speed(Trace.read(path), cost, 100.0)
    assert times == (0.0, 5.0)
    assert factors == pytest.approx((2.0, 1.0), rel=1e-3)
    assert host_speed(Trace.read(path, 0.0, 1.0), cost, 0.0) == ((0.0,), (1.0,))
    # every cycle before the run's start: one factor, their median, from time 0
    times, factors = host_speed(Trace.read(path), cost, 200.0)
    assert times == (0.0,) and factors[0] == pytest.approx(1.0, rel=1e-3)  # most ran at 1x


def test_load_slowdown_is_the_line_of_speed_against_tokens_per_second(tmp_path):
    """Bins of 5 s whose cycles run at alpha + slope x the tokens decoded per
    second in the bin: the line comes back; a falling one reads as flat."""
    import math

    from bench.sim.steptrace import load_slowdown

    cost = LinearCost(a=0.004, b=0.001, c=0.0, e=0.0, f=0.0, gap=0.001)
    alpha, slope = 1.1, 0.002

    def trace(ks_for) -> Trace:
        lines, t = ["kind,launch,end,size,count"], 100.0
        for j, n in enumerate((1, 4, 8, 16, 2, 12)):
            m = cost.decode(n, 100.0 * n) + cost.gap
            k = ks_for(n, m)
            while t < 100.0 + 5.0 * (j + 1) - 1e-9:
                lines.append(f"d,{t:.6f},{t + k * (m - cost.gap):.6f},{n},{100 * n}")
                t += k * m
        path = tmp_path / "steps.csv"
        path.write_text("\n".join(lines) + "\n")
        return Trace.read(path)

    # k = alpha + slope n / (k m): the tokens/s a bin decodes at its own speed
    rising = trace(lambda n, m: (alpha + math.sqrt(alpha ** 2 + 4 * slope * n / m)) / 2)
    a, b = load_slowdown(rising, cost, 100.0)
    assert a == pytest.approx(alpha, rel=0.03) and b == pytest.approx(slope, rel=0.05)
    falling = trace(lambda n, m: 2.0 - 0.05 * n)
    a, b = load_slowdown(falling, cost, 100.0)
    assert b == 0.0 and 1.0 < a < 2.0
    assert load_slowdown(Trace.read(tmp_path / "steps.csv", 0.0, 1.0), cost, 0.0) == (1.0, 0.0)


def test_a_case_stored_with_one_run_simulates_as_one(tmp_path):
    """A result stored before runs were repeated (one live run, no calibration
    after it) resimulates on the models it has the windows for."""
    import json
    import shutil
    from pathlib import Path

    from bench.sim import fidelity

    src = Path(__file__).resolve().parents[1] / "bench/results/fidelity"
    case = next(c for c in json.loads((src / "result.json").read_text())["cases"]
                if c["case"] == "mooncake")
    run = case.pop("runs")[0]
    old = {**case, **{k: run[k] for k in ("live", "live_server", "window")}}
    old.pop("repeat")
    shutil.copytree(src / "mooncake", tmp_path / "mooncake")
    out = fidelity.simulate_case(old, tmp_path / "mooncake")
    assert len(out["runs"]) == 1 and out["repeat"] is None
    assert set(out["runs"][0]["models"]) == {"calibration", "trace_before", "trace_run"}
    assert "| trace_run | " in fidelity.markdown({"policy": "taper", "seed": 0, "cases": [out]})


def test_drift_draws_are_the_other_runs_speed_rotated():
    from bench.sim import fidelity

    speed = ((0.0, 5.0, 10.0, 15.0), (1.0, 1.5, 0.8, 1.2))
    draws = fidelity.drift_draws(speed, 5)
    assert len(draws) == 5 and draws[0] == speed  # as it ran, first
    for times, factors in draws[1:]:
        assert times == speed[0] and sorted(factors) == sorted(speed[1])
        k = factors.index(1.0)
        assert factors == speed[1][-k:] + speed[1][:-k]  # a rotation, by 1-3
        assert k != 0
    assert fidelity.drift_draws(speed, 5) == draws  # seeded
    assert fidelity.drift_draws(((0.0,), (1.3,)), 3) == [((0.0,), (1.3,))] * 3


def test_medians_over_draws_and_runs():
    from bench.sim import fidelity

    def summary(goodput, p99):
        return {"goodput": goodput, "slo_attainment": goodput / 2,
                "tpot_s": {"p50": 0.005, "p99": p99}}

    sims = [summary(0.2, 0.010), summary(0.3, 0.030), summary(0.25, 0.012)]
    med = fidelity.median_summary(sims)
    assert med == summary(0.25, 0.012)
    spread = fidelity.draw_spread(summary(0.25, 0.010), sims)
    assert spread["goodput"]["min"] == pytest.approx(-0.2)
    assert spread["goodput"]["max"] == pytest.approx(0.2)
    assert spread["TPOT p99"]["p90"] == pytest.approx(1.64)  # 0.2 + 0.8 x (2.0 - 0.2)
    assert fidelity.draw_spread(summary(0.0, 0.010), sims)["goodput"] is None
    # a run without a serial request of two tokens has no TPOT figures: left out, not a crash
    none = {"goodput": 0.1, "slo_attainment": 0.5, "tpot_s": {"p50": None, "p99": None}}
    assert fidelity.median_summary([none, none])["tpot_s"] == {"p50": None, "p99": None}
    assert fidelity.median_summary([none, sims[0]])["tpot_s"]["p99"] == 0.010
    assert fidelity.draw_spread(summary(0.25, 0.010), [none, none])["TPOT p99"] is None
    assert fidelity.compare(summary(0.25, 0.010), none)[3]["rel_diff"] is None
    # three runs: each figure's median over the live runs against the simulations'
    runs = [{"live": summary(g, 0.01), "models": {"bracket": {"sim": summary(1.1 * g, 0.011)}}}
            for g in (0.2, 0.3, 0.4)]
    runs[2]["models"]["other_run"] = {"sim": summary(0.4, 0.01)}  # not in every run: left out
    got = fidelity.medians_over_runs(runs)
    assert list(got) == ["bracket"]
    assert [round(r["rel_diff"], 6) for r in got["bracket"]] == [0.1, 0.1, 0.0, 0.1]
    md = fidelity.median_rows({"runs": runs, "median_over_runs": got})
    assert md[0] == "Each figure's median over the 3 runs, sim/live - 1:"
    assert "| bracket | +10.0% | +10.0% | +0.0% | +10.0% |" in md
    assert fidelity.median_rows({"runs": runs[:2], "median_over_runs": None}) == []


def test_tail_windows_read_the_slowest_requests_steps_against_the_middle(tmp_path):
    """Steps at the model for 5 s (2 sequences), then twice the model with a
    longer gap (4 sequences): the slowest requests, decoding in the second
    stretch, see cycles at 2x, the middle ones at 1x."""
    import gzip
    import json

    from bench.sim import fidelity
    from bench.sim.steptrace import tail_windows

    cost = LinearCost(a=0.004, b=0.001, c=0.0, e=0.0, f=0.0, gap=0.001)
    lines, t = ["kind,launch,end,size,count", "p,99.990000,99.995000,10,1,10"], 100.0
    while t < 110.0:
        n, k = (2, 1.0) if t < 105.0 else (4, 2.0)
        step = k * cost.decode(n, 0.0)
        lines.append(f"d,{t:.6f},{t + step:.6f},{n},300")
        t += step + k * 0.001
    path = tmp_path / "steps.csv"
    path.write_text("\n".join(lines) + "\n")
    tr = Trace.read(path)
    spans = [(0.004 + 1e-4 * i, 100.0 + 0.5 * i, 100.5 + 0.5 * i) for i in range(8)] + \
            [(0.012, 105.5, 106.5), (0.011, 107.0, 108.0)]
    got = tail_windows(tr, cost, spans, top=2)
    slow, middle = got["slowest"], got["middle"]
    assert slow["requests"] == 2 and middle["requests"] == 5  # by TPOT: [2, 7) of 10
    assert slow["tpot_s"] == [0.011, 0.012]
    assert slow["cycle_over_model"] == pytest.approx(2.0, rel=1e-3)
    assert slow["step_over_model"] == pytest.approx(2.0, rel=1e-3)
    assert slow["gap_s"] == pytest.approx(0.002, rel=1e-3) and slow["batch"] == 4.0
    assert middle["cycle_over_model"] == pytest.approx(1.0, rel=1e-3)
    # at 4 sequences the steps outside the slowest spans ran 2x too: the batch, not time
    assert slow["outside_same_batch"] == pytest.approx(2.0, rel=1e-3)
    assert middle["outside_same_batch"] == pytest.approx(1.0, rel=1e-3)
    assert middle["batch"] == 2.0
    assert tail_windows(tr, cost, [], top=2)["slowest"] == {"requests": 0, "n": 0}
    # a live run's records on the trace's clock: the replay starts at the first prefill
    rec = {"pid": "p0", "requests": [
        {"role": "serial", "start": 0.0, "token_times": [0.5, 0.51, 0.53]},
        {"role": "branch", "start": 0.6, "token_times": [0.7, 0.8]},
        {"role": "serial", "start": 0.9, "token_times": [1.0]}]}
    records = tmp_path / "run1_records.jsonl.gz"
    with gzip.open(records, "wt") as f:
        f.write(json.dumps(rec) + "\n")
    (tpot, a, b), = fidelity.serial_spans(records, tr)
    assert tpot == pytest.approx(0.015) and a == pytest.approx(100.49) \
        and b == pytest.approx(100.52)
    rows = fidelity.tail_rows({"runs": [{"tails": got}, {}]})
    assert rows[2].startswith("| run | requests |") and len(rows) == 4 + 2 + 1
    assert rows[4].startswith("| 1 | slowest, 2 | 11.0-12.0 | ")
    assert " | 2.00 | 2.00 | 2.00 | 2.00 | 4.0 |" in rows[4]  # cycle, same batch, step, gap


def test_a_gzipped_trace_reads_as_the_plain_one(tmp_path):
    """fidelity stores a finished case's step trace gzipped (steps.csv.gz); the
    reader and --resim take either."""
    from bench.sim import fidelity

    case = tmp_path / "case"
    case.mkdir()
    plain = case / "steps.csv"
    plain.write_text("kind,launch,end,size,count\nd,1.0,1.01,2,300\np,1.02,1.05,10,1,40\n")
    want = Trace.read(plain)
    assert fidelity.trace_file(case) == plain
    fidelity._gzip_trace(plain)
    assert not plain.exists() and fidelity.trace_file(case) == case / "steps.csv.gz"
    got = Trace.read(case / "steps.csv.gz")
    for k in ("kind", "launch", "end", "size", "count", "context"):
        assert list(getattr(got, k)) == list(getattr(want, k)), k
