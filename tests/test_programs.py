"""Every program in programs/ against the real server, through TaperEndpoint."""

from __future__ import annotations

import pytest

from tests.conftest import get_json

pytestmark = pytest.mark.live


def _cases():
    from programs.agentic_tools import TOOLS, agentic_tools, run_tool
    from programs.parallel_reasoning import parallel_reasoning
    from programs.self_consistency import self_consistency, vote
    from programs.skeleton_of_thought import skeleton_of_thought
    from programs.tree_of_thought import nested_fork, tree_of_thought

    def check_pr(r):
        assert len(r["paths"]) == 5 and all(r["paths"]) and r["answer"]

    def check_sc(r):
        assert len(r["answers"]) == 4 and r["vote"] == vote(r["answers"]) and r["why"]

    def check_sot(r):
        assert len(r["points"]) == 3 and all(r["points"]) and r["conclusion"]

    def check_tools(r):
        assert len(r["readings"]) == 3 and all(r["readings"]) and r["answer"]
        assert run_tool(TOOLS[0], "x", 0) == run_tool(TOOLS[0], "x", 0)  # deterministic

    def check_tot(r):
        assert len(r["path"]) == 2 and r["solution"]

    def check_nested(r):
        assert len(r) == 2 and all(" | " in text for _, text in r)

    return {
        "parallel_reasoning": (lambda be: parallel_reasoning.run(
            question="q", width=5, path_tokens=12, backend=be), check_pr, 1),
        "self_consistency": (lambda be: self_consistency.run(
            problem="p", width=4, answer_tokens=12, backend=be), check_sc, 1),
        "skeleton_of_thought": (lambda be: skeleton_of_thought.run(
            topic="t", points=3, point_tokens=12, backend=be), check_sot, 1),
        "agentic_tools": (lambda be: agentic_tools.run(
            task="x", calls=3, tool_delay=0.01, backend=be), check_tools, 1),
        "tree_of_thought": (lambda be: tree_of_thought.run(
            problem="y", depth=2, breadth=3, backend=be), check_tot, 2),
        "nested_fork": (lambda be: nested_fork.run(question="z", outer=2, inner=3, backend=be),
                        check_nested, 3),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_program_runs_and_its_branches_are_regulated(taper_server, name):
    from sglang_taper import TaperEndpoint

    run, check, groups = _cases()[name]
    before = get_json(taper_server.url + "/taper/stats")
    state = run(TaperEndpoint(taper_server.url, ttft=2.0, tpot=0.1))
    check(state.ret_value)
    after = get_json(taper_server.url + "/taper/stats")
    # The branches reached the scheduler as groups: it decided on their steps.
    assert after["regulated_steps"] > before["regulated_steps"]
    assert after["branch_steps"] - before["branch_steps"] >= groups * 4
