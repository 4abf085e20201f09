"""Trace replay (`--dataset mooncake:PATH`, `azure:PATH`, `burstgpt:PATH`): the
parsers, the shared prompt text, the predicted hit rate, the programs, the
options, `taper sim` end to end, and the live server's prefix cache against
the prediction."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from bench import options, traces
from bench.traces import TraceRequest, load, predicted_hit_rate, prompt_text, tick, to_programs
from bench.workload import KINDS, WorkloadConfig, at_rate

SAMPLE = Path(__file__).parent.parent / "bench" / "data" / "mooncake_conversation_sample.jsonl"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def mooncake_line(t: int, n_in: int, n_out: int, ids: list[int]) -> str:
    return json.dumps({"timestamp": t, "input_length": n_in, "output_length": n_out,
                       "hash_ids": ids}) + "\n"


# ----------------------------------------------------------------- parsers


def test_mooncake_lines_become_requests_in_seconds(tmp_path):
    path = write(tmp_path, "t.jsonl", mooncake_line(1500, 600, 7, [3, 4])
                 + "\n" + mooncake_line(1000, 512, 0, [3]) + mooncake_line(4000, 20, 1, [9]))
    reqs = load("mooncake", path)
    # Sorted by arrival, relative to the first, in seconds.
    assert reqs == [TraceRequest(0.0, 512, 0, (3,)), TraceRequest(0.5, 600, 7, (3, 4)),
                    TraceRequest(3.0, 20, 1, (9,))]


def test_the_sample_is_the_real_mooncake_conversation_trace():
    reqs = load("mooncake", SAMPLE)
    assert len(reqs) == 3000 and SAMPLE.stat().st_size <= 1_000_000
    assert reqs[0] == TraceRequest(0.0, 6758, 500, tuple(range(14)))
    assert reqs[-1].arrival == 987.0
    assert traces.native_rate(reqs) == pytest.approx(2999 / 987.0)


@pytest.mark.parametrize("line, error", [
    ("{not json", "2: not JSON"),
    ('{"timestamp": 1, "input_length": 5}', "2: expected an object"),
    (mooncake_line(-1, 5, 1, [1]), "2: timestamp must be"),
    (mooncake_line(0, 0, 1, []), "2: input_length must be an integer >= 1"),
    (mooncake_line(0, 5, -2, [1]), "2: output_length"),
    (mooncake_line(0, 513, 1, [1]), "2: input_length 513 is 2 blocks of 512 tokens, "
                                    "but hash_ids has 1"),
    (mooncake_line(0, 5, 1, ["a"]), "2: hash_ids must be a list"),
])
def test_a_bad_mooncake_line_is_named(tmp_path, line, error):
    path = write(tmp_path, "t.jsonl", mooncake_line(0, 5, 1, [1]) + line.rstrip("\n") + "\n")
    with pytest.raises(ValueError) as e:
        load("mooncake", path)
    assert str(e.value).startswith(f"{path}:{error}") and "\n" not in str(e.value)


AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,4808,10
2023-11-16 18:15:50.1805900,3180,8
2023-11-16 18:16:46.6805900,100,0
"""


def test_azure_timestamps_parse_to_relative_seconds(tmp_path):
    reqs = load("azure", write(tmp_path, "a.csv", AZURE))
    assert [r.arrival for r in reqs] == pytest.approx([0.0, 3.5, 60.0], abs=1e-6)
    assert [(r.input_tokens, r.output_tokens, r.hash_ids) for r in reqs] == [
        (4808, 10, ()), (3180, 8, ()), (100, 0, ())]
    # Seven fractional digits, an offset, a T: all one instant apart as written.
    assert traces.parse_timestamp("2024-05-10 00:00:01.0000001+02:00") - traces.parse_timestamp(
        "2024-05-09T22:00:00Z") == pytest.approx(1.0000001, abs=1e-6)


@pytest.mark.parametrize("text, error", [
    ("TIME,ContextTokens,GeneratedTokens\n1,2,3\n", ":1: header lacks TIMESTAMP"),
    (AZURE + "2023-11-16 18:99:46.68,5,5\n", ":5: TIMESTAMP: not a valid date"),
    (AZURE + "yesterday,5,5\n", ":5: TIMESTAMP: not a date and time"),
    (AZURE + "2023-11-16 18:17:00.1,five,5\n", ":5: ContextTokens must be an integer"),
    (AZURE + "2023-11-16 18:17:00.1,5\n", ":5: expected 3 columns"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", ": no requests"),
])
def test_a_bad_azure_line_is_named(tmp_path, text, error):
    path = write(tmp_path, "a.csv", text)
    with pytest.raises(ValueError) as e:
        load("azure", path)
    assert str(e.value).startswith(f"{path}{error}")


BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5.0,ChatGPT,472,18,490,Conversation log
45.5,GPT-4,1087,0,1087,API log
7.25,ChatGPT,30,200,230,Conversation log
"""


def test_burstgpt_rows_become_requests(tmp_path):
    reqs = load("burstgpt", write(tmp_path, "b.csv", BURSTGPT))
    assert reqs == [TraceRequest(0.0, 472, 18), TraceRequest(2.25, 30, 200),
                    TraceRequest(40.5, 1087, 0)]
    with pytest.raises(ValueError, match=r"^.*b\.csv:3: Timestamp: must be seconds >= 0"):
        load("burstgpt", write(tmp_path, "b.csv", BURSTGPT.replace("45.5", "soon")))
    with pytest.raises(ValueError, match=r"b\.csv:1: header lacks Response tokens"):
        load("burstgpt", write(tmp_path, "b.csv", BURSTGPT.replace("Response", "Reply")))


def test_dataset_specs(tmp_path, monkeypatch):
    assert traces.parse_spec("mooncake:x/y.jsonl") == ("mooncake", Path("x/y.jsonl"))
    assert traces.parse_spec("programs.jsonl") is None
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "run:1.jsonl", "")  # a plain path with a colon in it
    assert traces.parse_spec("run:1.jsonl") is None
    with pytest.raises(ValueError, match="unknown trace format 'sharegpt'"):
        traces.parse_spec("sharegpt:x.json")
    with pytest.raises(ValueError, match="no such file: .*nothere.csv"):
        load("azure", tmp_path / "nothere.csv")


# ------------------------------------------------------------- prompt text


def test_shared_blocks_share_text_exactly_and_then_differ():
    a = TraceRequest(0.0, 1300, 5, (1, 2, 3))
    b = TraceRequest(1.0, 1100, 5, (1, 2, 4))
    pa, pb = prompt_text(a, 0, 0.1), prompt_text(b, 1, 0.1)
    shared = traces.block_text(1, 51) + traces.block_text(2, 51)  # blocks of 51.2 tokens
    assert pa.startswith(shared) and pb.startswith(shared)
    wa, wb, ws = pa.split(), pb.split(), shared.split()
    assert len(wa) == 130 and len(wb) == 110  # one word a token, lengths scaled
    assert wa[len(ws)] != wb[len(ws)]  # unrelated blocks differ at their first word
    # A partial last block is a prefix of the whole block: a radix cache finds it.
    assert traces.block_text(3, 51).startswith(traces.block_text(3, 28))
    # No hash ids: text of its own, not shared with the same-length request.
    c = TraceRequest(0.0, 300, 5)
    assert prompt_text(c, 0).split()[0] != prompt_text(c, 1).split()[0]


def test_block_words_are_one_token_each_for_the_tiny_tokenizer():
    from sglang_taper.cpu.assets import tiny_model_dir

    path = tiny_model_dir() / "tokenizer.json"
    if not path.exists():
        pytest.skip("the tiny model is not built here (any live test builds it)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    reqs = load("mooncake", SAMPLE)[:30]
    for i, r in enumerate(reqs):
        ids = tok.encode(prompt_text(r, i, 0.05)).ids
        assert len(ids) == traces.scaled(r.input_tokens, 0.05)
    # Blocks tokenize on their own: the token prefix two prompts share is exactly
    # their shared blocks (reqs 0 and 1 share block 0 only).
    a, b = (tok.encode(prompt_text(r, i, 0.05)).ids for i, r in enumerate(reqs[:2]))
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert reqs[0].hash_ids[0] == reqs[1].hash_ids[0] != reqs[1].hash_ids[1]
    assert common == traces.scaled_blocks(reqs[0], 0.05)[0] == 26


# ------------------------------------------------------------ hit rate


HAND = [TraceRequest(0, 1300, 1, (1, 2, 3)),  # blocks 512, 512, 276: nothing cached
        TraceRequest(1, 1200, 1, (1, 2, 4)),  # 1, 2 cached: 1024
        TraceRequest(2, 600, 1, (1, 5)),  # 1: 512
        TraceRequest(3, 1600, 1, (1, 2, 3, 6)),  # 1, 2 and 3 as held (276): 1300
        TraceRequest(4, 700, 1, (7, 2)),  # 2 was seen, but after 1: 0
        TraceRequest(5, 1300, 1, (1, 2, 3)),  # all again, less the last token: 1299
        TraceRequest(6, 900, 1)]  # no hash ids: 0


def test_predicted_hit_rate_by_hand():
    assert predicted_hit_rate(HAND) == pytest.approx(
        (1024 + 512 + 1300 + 1299) / (1300 + 1200 + 600 + 1600 + 700 + 1300 + 900))
    # Halved: blocks of 256; request 0's blocks 256, 256, 138.
    assert predicted_hit_rate(HAND, 0.5) == pytest.approx(
        (512 + 256 + 650 + 649) / (650 + 600 + 300 + 800 + 350 + 650 + 450))
    assert predicted_hit_rate(HAND[-1:]) == 0.0 and predicted_hit_rate([]) == 0.0


def test_predicted_hit_rate_of_the_sample():
    reqs = load("mooncake", SAMPLE)
    assert predicted_hit_rate(reqs) == pytest.approx(0.3197, abs=1e-3)
    assert predicted_hit_rate(reqs[:60]) == pytest.approx(0.0406, abs=1e-3)


# ------------------------------------------------------------- programs


def test_chat_requests_keep_the_trace_and_scale():
    reqs = load("mooncake", SAMPLE)[:50]
    progs, rate = to_programs(reqs, WorkloadConfig(length_scale=0.1, ttft_slo=2.0),
                              branch_fraction=0.0, spread_ticks=False)
    assert rate == pytest.approx(49 / reqs[-1].arrival)
    assert [p.pid for p in progs[:2]] == ["p00000", "p00001"]
    assert all(p.kind == "chat" and len(p.stages) == 1 and p.ttft_slo == 2.0 for p in progs)
    assert [p.prompt_tokens for p in progs] == [max(1, round(r.input_tokens / 10)) for r in reqs]
    assert [p.stages[0].tokens[0] for p in progs] == [max(1, round(r.output_tokens / 10))
                                                       for r in reqs]
    # Normalized to 1 program/s; at the native rate the trace's own arrivals return.
    assert progs[-1].arrival == pytest.approx(49.0)
    native = at_rate(progs, 1.0, rate)
    assert [p.arrival for p in native] == pytest.approx([r.arrival for r in reqs])
    later, _ = to_programs(reqs[10:30], WorkloadConfig(), branch_fraction=0.0,
                           spread_ticks=False)
    assert later[0].arrival == 0.0 and later[-1].arrival == pytest.approx(19.0)
    # A time scale K stretches the trace's pace K times.
    assert at_rate(progs, 1.0, rate / 4)[-1].arrival == pytest.approx(4 * reqs[-1].arrival)


def test_a_trace_stamped_in_ticks_is_spread_over_each_tick():
    reqs = load("mooncake", SAMPLE)[:300]
    assert tick(reqs) == 3.0  # about 9 requests share each 3 s stamp
    assert tick([TraceRequest(float(i), 10, 10) for i in range(20)]) == 0.0  # no ticks
    progs, rate = to_programs(reqs, WorkloadConfig(), branch_fraction=0.0)
    native = at_rate(progs, 1.0, rate)
    stamp = {f"p{i:05d}": r.arrival for i, r in enumerate(reqs)}
    # Each request arrives within its own tick, none at once, in arrival order.
    assert all(stamp[p.pid] <= p.arrival < stamp[p.pid] + 3.0 for p in native)
    assert len({p.arrival for p in progs}) == len(progs)
    assert [p.arrival for p in progs] == sorted(p.arrival for p in progs)
    again, _ = to_programs(reqs, WorkloadConfig(), branch_fraction=0.0)
    assert [p.arrival for p in again] == [p.arrival for p in progs]  # seeded


def test_branch_programs_at_the_stated_fraction_over_the_trace_prompt():
    reqs = [TraceRequest(float(i), 700, 40, (i % 7, 100 + i)) for i in range(1000)]
    cfg = WorkloadConfig(width=(3, 5), branch_tokens=(10, 20), length_scale=0.5,
                         kinds=("parallel_reasoning", "tree_of_thought"))
    progs, _ = to_programs(reqs, cfg, branch_fraction=0.3)
    branch = [p for p in progs if p.kind != "chat"]
    assert 0.25 < len(branch) / len(progs) < 0.35
    assert {p.kind for p in branch} == {"parallel_reasoning", "tree_of_thought"}
    for p in branch:
        i = int(p.pid[1:])
        assert p.prompt == prompt_text(reqs[i], i, 0.5) and p.prompt_tokens == 350
        assert all(3 <= s.width <= 5 and all(5 <= t <= 10 for t in s.tokens)
                   for s in p.stages if s.kind == "parallel")
    again, _ = to_programs(reqs, cfg, branch_fraction=0.3)
    assert [p.to_json() for p in again] == [p.to_json() for p in progs]
    other, _ = to_programs(reqs, replace(cfg, seed=1), branch_fraction=0.3)
    assert [p.kind for p in other] != [p.kind for p in progs]
    assert {p.kind for p in to_programs(reqs[:40], cfg, 0.0)[0]} == {"chat"}
    assert {p.kind for p in to_programs(reqs[:40], WorkloadConfig(), 1.0)[0]} <= set(KINDS)


def test_a_trace_arriving_at_once_has_no_native_rate():
    progs, rate = to_programs([TraceRequest(0.0, 10, 1)] * 3, WorkloadConfig())
    assert math.isinf(rate) and [p.arrival for p in progs] == [0.0] * 3


# -------------------------------------------------------------- options


def sim_ns(*argv: str) -> argparse.Namespace:
    from bench.sim.cli import add_sim_args

    p = argparse.ArgumentParser()
    add_sim_args(p)
    return p.parse_args(list(argv))


MOONCAKE = f"mooncake:{SAMPLE}"


def test_options_load_a_trace_and_resolve_its_time_scale():
    ns = sim_ns("--dataset", MOONCAKE, "--num-prompts", "100", "--time-scale", "2",
                "--length-scale", "0.1", "--branch-fraction", "0.5")
    options.validate(ns, live=False)
    progs, trace = options.load_programs(ns, 0)
    assert len(progs) == trace["requests"] == 100 and trace["branch_fraction"] == 0.5
    assert trace["predicted_hit_rate"] == pytest.approx(
        predicted_hit_rate(load("mooncake", SAMPLE)[:100], 0.1))
    options.apply_time_scale(ns, trace)
    assert float(ns.request_rate) == pytest.approx(trace["native_rate"] / 2)
    plain, none = options.load_programs(sim_ns("--num-prompts", "7"), 0)
    assert none is None and len(plain) == 7


@pytest.mark.parametrize("argv, error", [
    (["--dataset", "sharegpt:x.json"], "unknown trace format 'sharegpt'"),
    (["--dataset", "mooncake:nothere.jsonl"], "no such file: nothere.jsonl"),
    (["--dataset", "nothere.jsonl"], "no such file: nothere.jsonl"),
    (["--time-scale", "2"], "--time-scale applies to a trace dataset only"),
    (["--branch-fraction", "0.2"], "--branch-fraction applies to a trace dataset only"),
    (["--dataset", MOONCAKE, "--time-scale", "2", "--request-rate", "50%"],
     "give it or --request-rate, not both"),
    (["--dataset", MOONCAKE, "--time-scale", "0"], "--time-scale must be > 0"),
    (["--dataset", MOONCAKE, "--time-scale", "1", "--sweep", "1,2"], "--time-scale sets one"),
    (["--dataset", MOONCAKE, "--branch-fraction", "1.5"], r"--branch-fraction must be in \[0"),
    (["--dataset", MOONCAKE, "--num-prompts", "3", "--time-scale", "1"], "all arrive at once"),
])
def test_options_refuse_bad_trace_input(argv, error):
    with pytest.raises(ValueError, match=error):
        options.validate(sim_ns(*argv), live=False)


def test_a_bad_trace_line_stops_taper_sim_before_anything_runs(tmp_path, capsys):
    from bench.sim.cli import main

    bad = write(tmp_path, "t.jsonl", mooncake_line(0, 5, 1, [1]) + "{oops\n")
    assert main(["--dataset", f"mooncake:{bad}", "--result-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"taper sim: error: {bad}:2: not JSON: Expecting property name enclosed " \
                  "in double quotes: line 1 column 2 (char 1)"


def test_taper_bench_loads_a_trace_like_the_simulator(tmp_path, monkeypatch):
    """`taper bench` builds its programs, trace figures and rate from the same
    options; stopped before any server starts."""
    from bench import cli

    seen = []

    class Stop(Exception):
        pass

    def run_bench(ns):
        seen.append(cli.LiveBench(ns))
        raise Stop

    monkeypatch.setattr(cli, "run_bench", run_bench)
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)  # keep pytest's handlers
    with pytest.raises(Stop):
        cli.main(["--dataset", MOONCAKE, "--num-prompts", "40", "--time-scale", "0.5",
                  "--length-scale", "0.05", "--result-dir", str(tmp_path)])
    bench = seen[0]
    progs = bench.programs[0]
    assert len(progs) == 40 and bench.result["trace"]["requests"] == 40
    assert float(bench.ns.request_rate) == pytest.approx(2 * bench.trace["native_rate"])
    assert cli.main(["--dataset", MOONCAKE, "--time-scale", "1", "--request-rate", "1",
                     "--result-dir", str(tmp_path)]) == 2


# ------------------------------------------------------------- taper sim


def test_taper_sim_replays_the_mooncake_sample(tmp_path):
    from bench.sim.cli import main

    out = tmp_path / "sim"
    assert main(["--dataset", MOONCAKE, "--num-prompts", "60", "--policies", "taper,eager",
                 "--time-scale", "4", "--workers", "1", "--quiet", "--no-plots",
                 "--result-dir", str(out)]) == 0
    res = json.loads((out / "result.json").read_text())
    trace = res["trace"]
    assert trace["format"] == "mooncake" and trace["requests"] == 60
    assert trace["predicted_hit_rate"] == pytest.approx(0.0406, abs=1e-3)
    assert {r["policy"] for r in res["runs"]} == {"taper", "eager"}
    for r in res["runs"]:
        assert r["rate"] == pytest.approx(trace["native_rate"] / 4)
        assert r["summary"]["programs"] == 60


# ------------------------------------------------------------------ live


def _with_reuse(reqs: list[TraceRequest], n: int, max_input: int) -> list[TraceRequest]:
    """Up to `n` requests of the sample, in trace order: requests that extend an
    earlier one's first 3+ blocks, with that earlier one (a conversation's next
    turn comes minutes later, so consecutive requests share little)."""
    first_at: dict[tuple[int, ...], int] = {}
    chosen: set[int] = set()
    for j, r in enumerate(reqs):
        src = first_at.get(r.hash_ids[:3]) if len(r.hash_ids) >= 3 else None
        for i in range(1, len(r.hash_ids) + 1):
            first_at.setdefault(r.hash_ids[:i], j)
        if src is not None and max(r.input_tokens, reqs[src].input_tokens) <= max_input:
            chosen |= {src, j}
            if len(chosen) >= n:
                break
    return [reqs[i] for i in sorted(chosen)]


@pytest.mark.live
@pytest.mark.parametrize("which, length_scale", [("first", 0.05), ("with-reuse", 0.1)])
def test_the_live_prefix_cache_finds_what_the_trace_predicts(server_pool, which,
                                                            length_scale):
    """The server's cache hit rate (cached over prompt tokens, as it reports
    them) is the hash ids' prediction within 10%. The working set fits the KV
    pool (65536 tokens; contexts of tens to ~4K tokens), and the requests run
    one at a time in trace order (all arrive at once; at most one runs), so
    each finds every earlier prompt cached: the prediction's assumptions."""
    from bench.replay import replay
    from bench.server_stats import StatsClient

    sample = load("mooncake", SAMPLE)
    reqs = sample[:40] if which == "first" else _with_reuse(sample, 40, 20_000)
    predicted = predicted_hit_rate(reqs, length_scale)
    progs, _ = to_programs(reqs, WorkloadConfig(length_scale=length_scale), 0.0)
    working_set = sum(p.prompt_tokens + p.stages[0].tokens[0] for p in progs)
    assert working_set * (1 - predicted) < 60_000
    srv = server_pool.get(["--taper-policy", "off"])
    StatsClient(srv.url).clean_slate()
    records, _ = asyncio.run(replay(srv.url, [replace(p, arrival=0.0) for p in progs],
                                    max_concurrency=1, drain_timeout=600))
    done = [r for p in records for r in p.requests]
    assert len(done) == len(progs) and not [r.error for r in done if r.error]
    cached, prompt = sum(r.cached_tokens for r in done), sum(r.prompt_tokens for r in done)
    measured = cached / prompt
    print(f"{which}: {len(reqs)} requests at length scale {length_scale}: measured hit rate "
          f"{measured:.4f} ({cached}/{prompt} tokens), predicted {predicted:.4f}")
    assert prompt == pytest.approx(sum(p.prompt_tokens for p in progs), abs=len(progs))
    assert measured == pytest.approx(predicted, rel=0.10)


def test_a_trace_takes_its_relative_slos_at_each_programs_own_context():
    import argparse

    from bench import options
    from bench.calibration import from_cost, isolated_at
    from bench.sim import cost as costs

    p = argparse.ArgumentParser()
    options.add_workload_args(p, "taper", "/tmp/x")
    ns = p.parse_args(["--dataset", f"mooncake:{SAMPLE}", "--num-prompts", "40",
                       "--goodput", "ttft:10x", "tpot:1.5x"])
    assert options.slo_basis(ns) == "context"
    assert options.slo_basis(p.parse_args([])) == "mean"
    cost = costs.load("measured:bench/sim/profiles/h200_qwen3_32b_decode.json")
    progs, _ = options.load_programs(ns, 0)
    cal = from_cost(cost, 5000)
    out = options.program_slos(ns, progs, cal, cost)
    at = isolated_at(cal, cost)
    for q in out:
        ttft, tpot = at(q.context_tokens())
        assert q.ttft_slo == pytest.approx(10 * ttft) and q.tpot_slo == pytest.approx(1.5 * tpot)
    longest = max(out, key=lambda q: q.context_tokens())
    shortest = min(out, key=lambda q: q.context_tokens())
    assert longest.tpot_slo > shortest.tpot_slo and longest.ttft_slo > 5 * shortest.ttft_slo
    # Basis mean: one SLO for all, against the calibration at the mean context.
    ns.slo_basis = "mean"
    flat = options.program_slos(ns, progs, cal, cost)
    assert [q.tpot_slo for q in flat] == pytest.approx([1.5 * cal["tpot_s"]] * len(flat))


def test_max_prompt_tokens_leaves_out_what_the_engine_cannot_hold():
    import argparse

    from bench import options

    p = argparse.ArgumentParser()
    options.add_workload_args(p, "taper", "/tmp/x")
    ns = p.parse_args(["--dataset", f"mooncake:{SAMPLE}", "--num-prompts", "100",
                       "--length-scale", "0.1", "--max-prompt-tokens", "2000"])
    options.validate(ns, live=True)
    progs, info = options.load_programs(ns, 0)
    assert len(progs) == 100 and max(q.prompt_tokens for q in progs) <= 2000
    assert info["left_out_of_whole_trace"] == sum(
        round(r.input_tokens * 0.1) > 2000 for r in load("mooncake", SAMPLE)) > 0
    with pytest.raises(ValueError, match="trace dataset only"):
        options.validate(p.parse_args(["--max-prompt-tokens", "10"]), live=True)
