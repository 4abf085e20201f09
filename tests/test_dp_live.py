"""Group-affine data parallelism on the real server: `taper serve --dp-size 2`
runs two scheduler processes on the CPU engine; every request of a branch group
(fork branches, n>1 samples with their warm-up, nested groups) goes to one rank,
both ranks regulate, and the greedy outputs are those of `--dp-size 1`. The
ranks' own figures (GET /taper/stats?groups=1, per rank under `dp_ranks`) say
where each group ran. A POST /taper/config reaches both ranks."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import get_json, post_json, wait_idle

pytestmark = pytest.mark.live

STRICT = {**os.environ, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
QUESTIONS = ["rivers", "mountains", "deserts", "forests", "glaciers"]


def _workload(url: str) -> dict:
    """Fork programs, a nested fork and an n>1 request, all at once."""
    from programs.fork_demo import fork_demo
    from programs.tree_of_thought import nested_fork
    from sglang_taper import TaperEndpoint

    def fork(q: str):
        state = fork_demo.run(question=q, width=4, branch_tokens=12,
                              backend=TaperEndpoint(url))
        return [t for t, _ in state.ret_value] + [state["summary"]]

    def nested():
        return nested_fork.run(question="lakes", outer=2, inner=3, tokens=8,
                               backend=TaperEndpoint(url)).ret_value

    def n_samples():
        return [o["output_ids"] for o in post_json(url + "/generate", {
            "text": "Sample three continuations of this shared prompt:",
            "sampling_params": {"n": 3, "max_new_tokens": 12, "temperature": 0,
                                "ignore_eos": True}})]

    jobs = {q: (fork, q) for q in QUESTIONS}
    jobs["nested"] = (nested,)
    jobs["n3"] = (n_samples,)
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(fn, *args) for name, (fn, *args) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def _change_config(url: str) -> dict:
    """POST /taper/config on a server with two ranks: a good change, a bad one."""
    def post(body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(url + "/taper/config", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    good = post({"policy": "cap:2", "margin": 0.25})
    bad = post({"margin": -1})
    ranks = get_json(url + "/taper/stats")["dp_ranks"]
    return {"good": good, "bad": bad, "get": get_json(url + "/taper/config"),
            "ranks": [(r["policy"], json.loads(r["config"])) for r in ranks]}


@pytest.fixture(scope="module")
def runs(server_pool, tmp_path_factory):
    out = {"trace": tmp_path_factory.mktemp("trace") / "steps.csv"}
    for dp in (1, 2):
        # two schedulers load the model side by side: a slower start
        # one rank is SGLang's default: the pool's plain `off` server, if kept;
        # the two-rank one writes a step trace per rank (TAPER_STEP_TRACE)
        env = STRICT if dp == 1 else {**STRICT, "TAPER_STEP_TRACE": str(out["trace"])}
        srv = server_pool.get(["--taper-policy", "off", *(["--dp-size", "2"] if dp == 2 else [])],
                              env=env, start_timeout=180.0 * dp)
        wait_idle(srv.url, timeout=60)
        before = get_json(srv.url + "/taper/stats?groups=1")
        outputs = _workload(srv.url)
        kv = wait_idle(srv.url, timeout=90)
        after = get_json(srv.url + "/taper/stats?groups=1")
        out[dp] = {"outputs": outputs, "before": before, "after": after, "kv": kv}
        if dp == 2:
            out["control"] = _change_config(srv.url)
            server_pool.stop(srv)  # two schedulers' memory: not kept
    return out


def test_outputs_equal_one_rank(runs):
    assert runs[2]["outputs"] == runs[1]["outputs"]


def _ranks(stats: dict) -> list[dict]:
    assert stats["dp_size"] == 2 and len(stats["dp_ranks"]) == 2
    return stats["dp_ranks"]


def test_every_group_on_one_rank(runs):
    before = {r["dp_rank"]: r for r in _ranks(runs[2]["before"])}
    after = {r["dp_rank"]: r for r in _ranks(runs[2]["after"])}
    assert sorted(after) == [0, 1]
    seen = {}
    for rank, r in after.items():
        for group, n in r["groups_seen"].items():
            new = n - before[rank]["groups_seen"].get(group, 0)
            if new:
                assert group not in seen, f"group {group} ran on ranks {seen[group]} and {rank}"
                seen[group] = rank
    forks = [g for g in seen if g.startswith("f-")]
    nsample = [g for g in seen if g.startswith("n-")]
    # 5 fork_demo groups, the nested fork's outer group and its 2 inner groups
    assert len(forks) == len(QUESTIONS) + 3, seen
    assert len(nsample) == 1
    # the n>1 warm-up (max_new_tokens 0) went with its 3 samples
    group = nsample[0]
    assert after[seen[group]]["groups_seen"][group] == 4
    # the nested fork (an outer group of 2, two inner groups of 3; the fork_demo
    # groups have 4 members) ran on one rank: its program and parent keys
    nested = {rank for g, rank in seen.items() if g.startswith("f-")
              and after[rank]["groups_seen"][g] in (2, 3)}
    assert len(nested) == 1, seen
    # both ranks got groups: new groups went to the less loaded rank
    assert set(seen.values()) == {0, 1}


def test_both_ranks_regulated(runs):
    before = {r["dp_rank"]: r for r in _ranks(runs[2]["before"])}
    for r in _ranks(runs[2]["after"]):
        held = r["held_branch_steps"] - before[r["dp_rank"]]["held_branch_steps"]
        assert held > 0, f"rank {r['dp_rank']} held no branch"
        assert not r["degraded"] and r["faults"] == 0


def test_aggregate_is_the_sum_of_ranks(runs):
    after = runs[2]["after"]
    for key in ("held_branch_steps", "regulated_steps", "steps", "requests_attached"):
        assert after[key] == sum(r[key] for r in after["dp_ranks"])
    assert after["max_group_width"] == max(r["max_group_width"] for r in after["dp_ranks"])
    # the same work on one rank: as many requests reached the schedulers in all
    one = runs[1]["after"]["requests_attached"] - runs[1]["before"]["requests_attached"]
    two = after["requests_attached"] - runs[2]["before"]["requests_attached"]
    assert one == two


def test_each_rank_traces_its_steps(runs):
    """TAPER_STEP_TRACE: every decode step a rank counted is a line of its trace
    (rank 1 writes PATH.tp0.dp1), and its prefills are there too."""
    from bench.sim.steptrace import Trace

    for r in _ranks(runs[2]["after"]):
        path = runs["trace"] if r["dp_rank"] == 0 else \
            runs["trace"].with_name(runs["trace"].name + ".tp0.dp1")
        tr = Trace.read(path)
        decode = tr.kind == "d"
        assert decode.sum() == r["steps"], (r["dp_rank"], decode.sum(), r["steps"])
        assert (~decode).sum() > 0 and tr.size[~decode].sum() > 0  # prefills, new tokens
        assert (tr.end >= tr.launch).all() and (tr.size[decode] >= 1).all()
        assert (tr.count[decode] >= tr.size[decode]).all()  # KV: at least a token each


def test_kv_back_at_idle(runs):
    for dp in (1, 2):
        kv = runs[dp]["kv"]
        assert kv["available"] + kv["evictable"] == kv["capacity"], (dp, kv)


def test_a_config_change_reaches_every_rank(runs):
    control = runs["control"]
    status, config = control["good"]
    assert status == 200 and config["policy"] == "cap:2" and config["margin"] == 0.25
    assert control["get"] == config
    assert len(control["ranks"]) == 2
    for policy, rank_config in control["ranks"]:
        assert policy == "cap:2" and rank_config == config
    status, answer = control["bad"]  # every rank refused it, with the same one line
    assert status == 400 and answer == {"error": "TaperConfig.margin must be in [0, 1), got -1.0"}
