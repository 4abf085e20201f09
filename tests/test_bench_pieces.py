"""Workload traces, metrics and report rendering (no server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.cli import at_rate, parse_goodput, ratios
from bench.metrics import SLOSpec, max_rate_at, program_met, summarize
from bench.replay import ProgramRecord, RequestRecord, StageRecord
from bench.workload import WorkloadConfig, generate, load_jsonl, save_jsonl


def test_trace_is_seeded_and_round_trips(tmp_path):
    cfg = WorkloadConfig(num_programs=40, seed=3)
    a, b = generate(cfg), generate(cfg)
    assert [p.to_json() for p in a] == [p.to_json() for p in b]
    assert generate(WorkloadConfig(num_programs=40, seed=4))[5].to_json() != a[5].to_json()
    path = tmp_path / "trace.jsonl"
    save_jsonl(a, path)
    assert [p.to_json() for p in load_jsonl(path)] == [p.to_json() for p in a]
    kinds = {p.kind for p in a}
    assert "chat" in kinds and len(kinds) >= 4


def test_trace_respects_its_distributions():
    cfg = WorkloadConfig(num_programs=400, rate=2.0, width=(3, 5), branch_tokens=(10, 20))
    progs = generate(cfg)
    gaps = np.diff([p.arrival for p in progs])
    assert abs(gaps.mean() - 0.5) < 0.08
    for p in progs:
        for s in p.stages:
            if s.kind == "parallel":
                assert 3 <= s.width <= 5 and all(10 <= t <= 20 for t in s.tokens)
    bursty = generate(WorkloadConfig(num_programs=400, rate=2.0, arrival="gamma",
                                     burstiness=0.3))
    assert np.diff([p.arrival for p in bursty]).std() > 1.5 * gaps.std()


@pytest.mark.parametrize("bad", [{"rate": 0}, {"width": (3, 2)}, {"arrival": "uniform"},
                                 {"chat_fraction": 1.5}])
def test_bad_workload_config_names_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        WorkloadConfig(**bad)


def test_bad_trace_line_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"pid": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_jsonl(path)


def serial(start, ttft, tpot, n=10):
    times = [start + ttft + i * tpot for i in range(n)]
    return RequestRecord(0, -1, "serial", start, times[0], times[-1], times, n, 0, None)


def program(requests, stages, ttft=1.0, tpot=0.01, kind="chat"):
    end = max(r.end for r in requests)
    return ProgramRecord("p", kind, 0.0, 0.0, end, ttft, tpot, stages, requests)


def test_serial_request_slo():
    spec = SLOSpec()
    assert program_met(program([serial(0, 0.5, 0.009)], []), spec)
    assert not program_met(program([serial(0, 1.2, 0.009)], []), spec)  # TTFT
    assert not program_met(program([serial(0, 0.5, 0.011)], []), spec)  # TPOT


def test_parallel_stage_deadline_from_longest_branch():
    spec = SLOSpec(branch_stretch=2.0)
    # deadline = 1.0 + (101 - 1) * 0.01 * 2 + 0.1 = 3.1 s
    ok = StageRecord(1, "tools", 1.0, 1.0 + 3.0, 8, 101, 0.1)
    late = StageRecord(1, "tools", 1.0, 1.0 + 3.2, 8, 101, 0.1)
    reqs = [serial(0, 0.2, 0.005)]
    assert program_met(program(reqs, [ok], kind="agentic_tools"), spec)
    assert not program_met(program(reqs, [late], kind="agentic_tools"), spec)


def test_summary_goodput_and_percentiles():
    recs = [program([serial(i, 0.1, 0.005 if i % 2 else 0.02)], []) for i in range(10)]
    for i, r in enumerate(recs):
        r.pid, r.arrival, r.start = f"p{i}", float(i), float(i)
    s = summarize(recs, SLOSpec())
    assert s["slo_attainment"] == 0.5
    assert s["goodput"] == pytest.approx(5 / (recs[-1].end - 0.0))
    assert s["tpot_s"]["p50"] == pytest.approx(0.0125, rel=0.5)
    assert s["ttft_s"]["p99"] == pytest.approx(0.1)


def test_goodput_flags():
    assert parse_goodput(["ttft:500", "tpot:20"]) == {"ttft": (0.5, False),
                                                      "tpot": (0.02, False)}
    assert parse_goodput(["tpot:3x"])["tpot"] == (3.0, True)
    with pytest.raises(ValueError, match="ttft:MS"):
        parse_goodput(["e2e:5"])


def test_rate_scaling_and_ratios():
    progs = generate(WorkloadConfig(num_programs=10, rate=1.0))
    fast = at_rate(progs, 1.0, 2.0)
    assert fast[-1].arrival == pytest.approx(progs[-1].arrival / 2)
    runs = [{"policy": p, "rate": 1.0, "summary": {"goodput": g}}
            for p, g in (("off", 1.0), ("eager", 2.0), ("cap:2", 2.5), ("taper", 3.0))]
    r = ratios(runs)
    assert r == {"taper/off": 3.0, "taper/eager": 1.5, "taper/best cap": 1.2}
    assert max_rate_at([(1.0, 0.99), (2.0, 0.96), (3.0, 0.8)]) == 2.0
    assert max_rate_at([(1.0, 0.5)]) is None


def test_report_renders(tmp_path):
    from bench import report

    recs = [program([serial(0, 0.1, 0.005)], [])]
    run = {"policy": "taper", "rate": 1.0, "tpot_slo": 0.01,
           "summary": summarize(recs, SLOSpec()), "server": {"mean_width": 3.0},
           "tpots_ms": [5.0], "width_series": [(1.0, 3.0), (2.0, 4.0)]}
    files = report.write({"runs": [run], "ratios": {}}, tmp_path)
    assert json.loads(files["json"].read_text())["runs"][0]["policy"] == "taper"
    assert "| taper | 1.00 |" in files["markdown"].read_text()
    for name in ("attainment_vs_rate", "tpot_cdf", "width_over_time"):
        assert files[name].stat().st_size > 1000
