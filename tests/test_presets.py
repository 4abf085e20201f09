"""The named workload presets: each has the shape its name promises, runs in
the simulator under every policy, and runs live on the real server."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from bench.replay import replay
from bench.workload import PRESETS, WorkloadConfig, generate

from .conftest import wait_idle

REASONING = ("parallel-reasoning", "self-consistency", "agentic")


def _branch_programs(name: str, n: int = 200):
    progs = generate(replace(PRESETS[name], num_programs=n))
    return [p for p in progs if p.kind != "chat"]


def test_parallel_reasoning_is_a_few_long_branches_over_a_long_context():
    progs = _branch_programs("parallel-reasoning")
    assert progs and {p.kind for p in progs} == {"parallel_reasoning"}
    par = [s for p in progs for s in p.stages if s.kind == "parallel"]
    assert {s.width for s in par} <= set(range(4, 9)) and len({s.width for s in par}) > 2
    assert all(256 <= t <= 1024 for s in par for t in s.tokens)
    assert all(1024 <= p.prompt_tokens <= 4096 for p in progs)


def test_self_consistency_is_wide():
    progs = _branch_programs("self-consistency")
    assert {p.kind for p in progs} == {"self_consistency"}
    widths = [s.width for p in progs for s in p.stages if s.kind == "parallel"]
    assert min(widths) >= 16 and max(widths) <= 64 and max(widths) > 48


def test_agentic_has_two_or_three_rounds_of_timed_tool_calls():
    progs = _branch_programs("agentic")
    assert {p.kind for p in progs} == {"agentic_tools"}
    rounds = [sum(s.kind == "tools" for s in p.stages) for p in progs]
    assert set(rounds) == {2, 3}
    delays = [s.tool_delay for p in progs for s in p.stages if s.kind == "tools"]
    assert 0.1 <= min(delays) and max(delays) <= 1.0 and max(delays) - min(delays) > 0.5
    for p in progs:  # a serial step reads each round's results
        kinds = [s.kind for s in p.stages]
        assert kinds[0] == kinds[-1] == "serial"
        assert all(kinds[i + 1] == "serial" for i, k in enumerate(kinds) if k == "tools")


def test_a_config_names_only_known_kinds():
    with pytest.raises(ValueError, match="kinds must be"):
        WorkloadConfig(kinds=("chat",))
    with pytest.raises(ValueError, match="rounds"):
        WorkloadConfig(rounds=(0, 2))


@pytest.mark.parametrize("name", REASONING)
def test_every_preset_runs_in_the_simulator(name):
    from bench.sim import cost as costs
    from bench.sim.run import simulate
    from bench.workload import at_rate

    cost = costs.load("measured:bench/sim/profiles/h200_qwen3_32b_decode.json")
    progs = at_rate(generate(replace(PRESETS[name], num_programs=30)), 1.0, 0.2)
    for policy in ("off", "eager", "cap:4", "taper"):
        out = simulate(progs, cost, policy)
        recs = out["records"]
        assert len(recs) == 30 and not [r for r in recs if r.error], policy
        for p, r in zip(sorted(progs, key=lambda p: p.pid), sorted(recs, key=lambda r: r.pid)):
            assert len(r.stages) == len(p.stages), (policy, p.pid)


@pytest.mark.live
@pytest.mark.parametrize("name", REASONING)
def test_every_preset_runs_live(server_pool, name):
    srv = server_pool.get(["--taper-policy", "taper"])
    # Three branch programs and a chat, scaled to the tiny CPU model.
    progs = generate(replace(PRESETS[name], num_programs=12, length_scale=0.1, seed=1))
    progs = [p for p in progs if p.kind != "chat"][:3] + [
        p for p in progs if p.kind == "chat"][:1]
    progs = [replace(p, arrival=0.5 * i) for i, p in enumerate(progs)]
    records, _ = asyncio.run(replay(srv.url, progs, drain_timeout=300))
    assert len(records) == len(progs)
    for p, r in zip(sorted(progs, key=lambda p: p.pid), records):
        assert r.error is None, (p.pid, r.error)
        assert len(r.stages) == len(p.stages)
        branches = [q for q in r.requests if q.role == "branch"]
        assert len(branches) == sum(s.width for s in p.stages if s.kind != "serial")
        reads = [q for q in r.requests if q.role == "read"]
        assert len(reads) == sum(s.width for s in p.stages if s.kind == "tools")
        assert all(q.output_tokens == t for q, t in zip(
            sorted(branches, key=lambda q: (q.stage, q.branch)),
            [t for s in p.stages if s.kind != "serial" for t in s.tokens]))
    wait_idle(srv.url)
