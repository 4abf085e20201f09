"""Workload traces, metrics, options and report rendering (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.metrics import SLOSpec, failures, program_met, summarize
from bench.options import parse_goodput, parse_rate
from bench.records import ProgramRecord, RequestRecord, StageRecord
from bench.workload import (
    PRESETS,
    WorkloadConfig,
    at_rate,
    decode_tokens,
    generate,
    load_jsonl,
    save_jsonl,
)


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
    # A parallel stage: deadline = 1.0 + (101 - 1) * 0.01 * 2 = 3.0 s
    ok = StageRecord(1, "parallel", 1.0, 1.0 + 2.95, 8, 101, 0.0)
    late = StageRecord(1, "parallel", 1.0, 1.0 + 3.05, 8, 101, 0.0)
    reqs = [serial(0, 0.2, 0.005)]
    assert program_met(program(reqs, [ok], kind="parallel_reasoning"), spec)
    assert failures(program(reqs, [late], kind="parallel_reasoning"), spec) == ["stage_deadline"]


def test_a_tool_stage_has_two_ttfts():
    """A tool branch generates twice (the call, then the reading), and each
    generation waits for its own first token: deadline =
    2 * 1.0 + (101 - 2) * 0.01 * 2 + 0.1 (tool delay) = 4.08 s."""
    spec = SLOSpec(branch_stretch=2.0)
    reqs = [serial(0, 0.2, 0.005)]
    ok = StageRecord(1, "tools", 1.0, 1.0 + 4.05, 8, 101, 0.1)
    late = StageRecord(1, "tools", 1.0, 1.0 + 4.11, 8, 101, 0.1)
    assert program_met(program(reqs, [ok], kind="agentic_tools"), spec)
    assert not program_met(program(reqs, [late], kind="agentic_tools"), spec)


def test_program_mode_judges_the_program_end_to_end():
    """Program mode: the whole program within multiple x its critical path at
    serial pace (+ tool delays); a slow stage alone does not fail it."""
    spec = SLOSpec(mode="program", program_multiple=4.0)
    first = serial(0, 0.2, 0.005, n=11)
    stages = [StageRecord(0, "serial", 0.0, 0.3, 1, 11, 0.0),  # path 1.0 + 10 * 0.01
              StageRecord(1, "parallel", 0.3, 9.3, 8, 101, 0.0)]  # path 1.0 + 100 * 0.01
    # deadline = 4 * (1.1 + 2.0) = 12.4 s; the stage alone took 9 s (stage mode: 3 s)
    rec = program([first], stages, kind="parallel_reasoning")
    rec.end = 12.3
    assert program_met(rec, spec)
    assert failures(rec, SLOSpec()) == ["stage_deadline"]
    rec.end = 12.5
    assert failures(rec, spec) == ["program_deadline"]


def test_summary_goodput_over_a_fixed_window_and_percentiles():
    recs = [program([serial(i, 0.1, 0.005 if i % 2 else 0.02)], []) for i in range(10)]
    for i, r in enumerate(recs):
        r.pid, r.arrival, r.start = f"p{i}", float(i), float(i)
    spec = SLOSpec(drain=5.0)
    s = summarize(recs, spec)
    assert s["slo_attainment"] == 0.5
    # window: first arrival 0 to last arrival 9, plus the drain: 14 s for every policy
    assert s["window_s"] == 14.0 and s["goodput"] == pytest.approx(5 / 14.0)
    assert s["tpot_s"]["p50"] == pytest.approx(0.0125, rel=0.5)
    assert s["ttft_s"]["p99"] == pytest.approx(0.1)
    # A program still running when the window closes is cut off, counted once.
    recs[1].end = 20.0
    s = summarize(recs, spec)
    assert s["slo_attainment"] == 0.4 and s["failures"]["timeout"] == 1
    assert s["window_s"] == 14.0


def test_goodput_flags_and_rates():
    assert parse_goodput(["ttft:500", "tpot:20"]) == {"ttft": (0.5, False),
                                                      "tpot": (0.02, False)}
    assert parse_goodput(["tpot:3x"]) == {"ttft": (10.0, True), "tpot": (3.0, True)}
    with pytest.raises(ValueError, match="ttft:MS"):
        parse_goodput(["e2e:5"])
    assert parse_rate("0.6").resolve(10.0) == 0.6
    assert parse_rate("40%").resolve(2.0) == pytest.approx(0.8)
    for bad in ("fast", "-1", "0%"):
        with pytest.raises(ValueError, match="rate"):
            parse_rate(bad)


def test_presets_and_length_scale():
    long, mixed = PRESETS["long-context"], PRESETS["mixed"]
    assert long.prompt_tokens[0] >= 1024 and mixed.prompt_tokens[1] < 128
    progs = generate(long)
    short = generate(WorkloadConfig(length_scale=0.25))
    assert [p.kind for p in short] == [p.kind for p in progs]  # same draws, scaled
    ratio = sum(decode_tokens(p) for p in short) / sum(decode_tokens(p) for p in progs)
    assert 0.2 < ratio < 0.3
    assert all(256 <= p.prompt_tokens <= 1024 for p in short)


def test_rate_scaling():
    progs = generate(WorkloadConfig(num_programs=10, rate=1.0))
    fast = at_rate(progs, 1.0, 2.0)
    assert fast[-1].arrival == pytest.approx(progs[-1].arrival / 2)


def test_report_renders(tmp_path):
    from bench import report

    recs = [program([serial(0, 0.1, 0.005)], [])]
    run = {"policy": "taper", "seed": 0, "rate": 1.0, "tpot_slo": 0.01,
           "summary": summarize(recs, SLOSpec()), "server": {"mean_width": 3.0},
           "tpots_ms": [5.0], "width_series": [(1.0, 3.0), (2.0, 4.0)]}
    files = report.write({"runs": [run]}, tmp_path)
    assert json.loads(files["json"].read_text())["runs"][0]["policy"] == "taper"
    assert "| taper | 0 | 1.000 |" in files["markdown"].read_text()
    for name in ("attainment_vs_rate", "tpot_cdf", "width_over_time"):
        assert files[name].stat().st_size > 1000


def test_paired_overhead_reads_the_pairs_and_their_spread():
    from bench.scheduler_bench import paired_overhead

    same = paired_overhead([100.0, 90.0, 110.0], [100.0, 90.0, 110.0])
    assert same["overhead"] == 0.0 and same["overhead_ci95"] == [0.0, 0.0]
    # 2% slower in every pair, whatever the host's speed that minute
    slow = paired_overhead([98.0, 88.2, 107.8], [100.0, 90.0, 110.0])
    assert abs(slow["overhead"] - 0.02) < 1e-12
    lo, hi = slow["overhead_ci95"]
    assert abs(lo - 0.02) < 1e-12 and abs(hi - 0.02) < 1e-12
    noisy = paired_overhead([99.0, 97.0, 100.0, 96.0], [100.0, 100.0, 100.0, 100.0])
    lo, hi = noisy["overhead_ci95"]
    assert lo < noisy["overhead"] < hi and hi > 0.02


def test_a_live_variant_is_a_policy_on_a_server_with_more_flags():
    import argparse

    import pytest

    from bench import options

    assert options.live_variant("taper+cascade") == ("taper", ["--taper-cascade"])
    assert options.live_variant("taper+nogate") == ("taper", ["--no-taper-prefill-gate"])
    assert options.live_variant("cap:4") == ("cap:4", [])
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        options.live_variant("taper+fast")
    p = argparse.ArgumentParser()
    options.add_workload_args(p, "off,taper", "results/x")
    ns = p.parse_args(["--policies", "taper,taper+cascade"])
    options.validate(ns, live=True)
    with pytest.raises(ValueError, match="run live only"):
        options.validate(ns, live=False)


def test_fidelity_cases_parse_as_taper_bench_and_compare_figure_by_figure(capsys):
    from bench import cli as bench_cli
    from bench import options
    from bench.sim import fidelity

    for name, (_, programs, load) in fidelity.CASES.items():  # every case: a live command
        for scale in (1, 3):
            ns = bench_cli.parse([*fidelity.case_flags(name, scale), "--policies", "taper",
                                  "--request-rate", load])
            options.validate(ns, live=True)
            assert ns.num_prompts == programs * scale
    with pytest.raises(SystemExit):
        fidelity.main(["--scale", "0"])
    for repeats in ("0", "7"):  # 1 to 6 live runs a case
        with pytest.raises(SystemExit):
            fidelity.main(["--repeats", repeats])
    live = {"goodput": 0.5, "slo_attainment": 1.0, "tpot_s": {"p50": 0.01, "p99": 0.02}}
    sim = {"goodput": 0.55, "slo_attainment": 0.9, "tpot_s": {"p50": 0.01, "p99": 0.03}}
    rows = fidelity.compare(live, sim)
    assert [r["figure"] for r in rows] == ["goodput", "attainment", "TPOT p50", "TPOT p99"]
    assert [round(r["rel_diff"], 3) for r in rows] == [0.1, -0.1, 0.0, 0.5]
    assert fidelity.compare({**live, "goodput": 0.0}, sim)[0]["rel_diff"] is None
    assert fidelity.main(["--cases", "default,nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert fidelity.main(["--cases", "default", "--policy", "nonsense"]) == 2
    # --load: a case's own load replaced, checked before any server starts
    ns = fidelity.case_ns("default", "taper", 0, Path("/tmp"), 1, "20%")
    assert ns.request_rate == "20%"
    assert fidelity.case_ns("default", "taper", 0, Path("/tmp")).request_rate == \
        fidelity.CASES["default"][2]
    assert fidelity.main(["--cases", "default", "--load", "nonsense=5%"]) == 2
    assert fidelity.main(["--cases", "default", "--load", "default=0%"]) == 2
    with pytest.raises(SystemExit):
        fidelity.main(["--cases", "default", "--load", "default"])


def test_fidelity_keeps_each_live_runs_records_under_its_own_name(tmp_path):
    """Both live runs of a case share a rate, so --save-records writes them to one
    name: fidelity moves each away (gzipped) before the next run writes it."""
    import gzip

    from bench.cli import records_path
    from bench.sim import fidelity

    for i, text in enumerate(['{"pid": "p00000"}\n', '{"pid": "p00001"}\n']):
        records_path(tmp_path, "cap:2", 0, 0.38).write_text(text)
        fidelity._keep_records(tmp_path, "cap:2", 0, 0.38, i)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["run1_records.jsonl.gz",
                                                          "run2_records.jsonl.gz"]
    assert gzip.open(tmp_path / "run2_records.jsonl.gz", "rt").read() == '{"pid": "p00001"}\n'


def test_interleave_keeps_every_server_up_and_alternates_their_probes(monkeypatch):
    """taper bench --sweep --interleave, wired with stand-in servers: every server
    starts (with --sleep-on-idle) before the first probe and stops after the last,
    the first one's calibration sets the SLOs, and the probes take turns."""
    import json
    from contextlib import contextmanager
    from pathlib import Path

    import pytest

    from bench import cli

    cal = json.loads(Path("bench/results/cascade-live/result.json").read_text())["calibration"]
    events = []

    @contextmanager
    def server(self, policy, sleep_on_idle=False):
        events.append(("start", policy, sleep_on_idle))
        yield type("Srv", (), {"policy": policy, "calibration": dict(cal), "start_s": 1.0})()
        events.append(("stop", policy))

    def probe(self, srv, seed, rate):
        events.append(("probe", srv.policy))
        att = 1.0 if rate < (0.3 if srv.policy == "eager" else 0.6) else 0.5
        return {"policy": srv.policy, "seed": seed, "rate": rate,
                "summary": {"slo_attainment": att}}

    monkeypatch.setattr(cli.LiveBench, "server", server)
    monkeypatch.setattr(cli.LiveBench, "probe", probe)
    ns = cli.parse(["--sweep", "auto", "--interleave", "--policies", "eager,taper",
                    "--num-prompts", "4", "--request-rate", "0.2", "--no-plots"])
    result = cli.run_bench(ns)
    kinds = [e[0] for e in events]
    assert events[:2] == [("start", "eager", True), ("start", "taper", True)]
    assert kinds.count("stop") == 2 and "probe" not in kinds[kinds.index("stop"):]
    probes = [e[1] for e in events if e[0] == "probe"]
    n_eager = probes.count("eager")
    assert probes[: 2 * n_eager] == ["eager", "taper"] * n_eager  # turns while both search
    assert set(probes[2 * n_eager:]) <= {"taper"} and probes.count("taper") > n_eager
    assert result["calibration"]["policy"] == "eager"  # the first server's
    best = result["sweep"]["max_rate"]
    assert best["taper"]["per_seed"][0] > best["eager"]["per_seed"][0]
    assert cli.main(["--interleave", "--policies", "eager,taper"]) == 2  # needs --sweep
    with pytest.raises(SystemExit):
        cli.parse(["--interleave=yes"])
