"""N replicas behind a router in the simulator (bench/sim/replicas.py)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import pytest

from bench.metrics import SLOSpec, summarize
from bench.sim import cost as costs
from bench.sim.engine import SimConfig
from bench.sim.replicas import ROUTINGS, Cluster, GroupAffine, LeastLoaded, simulate_replicas
from bench.sim.run import make_controller, simulate
from bench.workload import at_rate
from tests.test_sim_speed_identity import MEASURED, NOISY, programs

COST = costs.load(MEASURED)


def _plain(out: dict) -> tuple[list, dict]:
    server = {k: v for k, v in out["server"].items() if k != "routing"}
    return [dataclasses.asdict(r) for r in out["records"]], server


def _cluster(progs, policy: str, n: int, routing: str, cost=COST) -> Cluster:
    c = Cluster(progs, cost, [make_controller(policy, cost) for _ in range(n)], routing,
                SimConfig(seed=3))
    c.run()
    return c


def _requests(p) -> int:
    return sum(1 if s.kind == "serial" else s.width * (2 if s.kind == "tools" else 1)
               for s in p.stages)


@pytest.mark.parametrize("routing,cost_spec", [(r, MEASURED) for r in ROUTINGS]
                         + [("round_robin", NOISY)])
def test_one_replica_is_the_single_engine_bit_for_bit(routing, cost_spec):
    cost = costs.load(cost_spec)
    progs = programs(40)
    one = simulate(progs, cost, "taper", sim=SimConfig(seed=3))
    many = simulate_replicas(progs, cost, "taper", 1, routing, sim=SimConfig(seed=3))
    assert _plain(many) == _plain(one)
    assert many["server"]["routing"]["extra_prefill_tokens"] == [0]


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_every_request_completes_exactly_once(routing):
    progs = at_rate(programs(60), 1.0, 2.0)
    c = _cluster(progs, "taper", 3, routing)
    assert [r.pid for r in c.records] == sorted(p.pid for p in progs)
    for spec, rec in zip(sorted(progs, key=lambda p: p.pid), c.records):
        assert len(rec.requests) == _requests(spec) and rec.end >= rec.start
        assert [s.kind for s in rec.stages] == [s.kind for s in spec.stages]
        keys = [(q.stage, q.branch, q.role) for q in rec.requests]
        assert len(set(keys)) == len(keys)  # none twice
        assert all(len(q.token_times) == q.output_tokens >= 1 for q in rec.requests)
        # Causal: no replica starts a request before it was issued (a request issued
        # by one replica's step reaches another only when that step ends).
        assert all(q.first_token > q.start for q in rec.requests)
    assert sum(c.requests) == sum(_requests(p) for p in progs)
    assert c.load == [0, 0, 0] and not c.events
    for e in c.replicas:
        assert not e.waiting and not len(e.running) and e.kv_used == 0 and not e._live


def test_group_affine_keeps_a_program_on_one_replica():
    c = _cluster(at_rate(programs(60), 1.0, 2.0), "taper", 4, "group_affine")
    assert all(len(w.replicas) == 1 for w in c.placements.values())
    assert len({w.home for w in c.placements.values()}) == 4  # all replicas used
    fig = c.figures()
    assert fig["split_groups"] == 0 and fig["group_parts"] == fig["groups"] > 0
    assert fig["extra_prefill_tokens"] == [0, 0, 0, 0] and fig["moved_reads"] == 0


def test_round_robin_splits_groups_and_prefills_the_context_again():
    progs = at_rate(programs(60), 1.0, 2.0)
    rr = _cluster(progs, "taper", 4, "round_robin").figures()
    ga = _cluster(progs, "taper", 4, "group_affine").figures()
    # A fork's branches take consecutive turns: a group of width w lands on min(w, 4).
    widths = [s.width for p in progs for s in p.stages if s.kind != "serial"]
    assert rr["groups"] == len(widths) and rr["split_groups"] == len(widths)
    assert rr["group_parts"] == sum(min(w, 4) for w in widths)
    assert all(x > 0 for x in rr["extra_prefill_tokens"]) and rr["moved_reads"] > 0
    # What routing adds is all that differs: the rest is what one engine prefills.
    assert sum(rr["prefill_tokens"]) - sum(rr["extra_prefill_tokens"]) \
        == sum(ga["prefill_tokens"])
    # Every part of a split group but the first lacks at least the program's prompt.
    prompts = sum(p.prompt_tokens * (min(s.width, 4) - 1) for p in progs for s in p.stages
                  if s.kind != "serial")
    assert sum(rr["extra_prefill_tokens"]) >= prompts


def _overlapping_branches(records) -> int:
    """Pairs of branches of one fork that decoded at the same time."""
    pairs = 0
    for rec in records:
        for stage in {q.stage for q in rec.requests if q.role == "branch"}:
            spans = sorted((q.token_times[1], q.token_times[-1]) for q in rec.requests
                           if q.stage == stage and q.role == "branch"
                           and len(q.token_times) > 1)
            pairs += sum(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    return pairs


def test_a_partial_group_has_its_own_base_branch():
    """`off` runs one branch of a group at a time, per replica: on one replica a
    fork's branches never overlap; split over four, they do."""
    progs = at_rate(programs(16), 1.0, 3.0)
    assert _overlapping_branches(_cluster(progs, "off", 4, "group_affine").records) == 0
    assert _overlapping_branches(_cluster(progs, "off", 4, "round_robin").records) > 10


def test_n_group_affine_replicas_serve_n_copies_of_a_trace_exactly():
    """N identical streams arriving together, one per replica: every copy runs
    exactly as the trace does on one replica (the replicas do not interfere)."""
    progs = at_rate(programs(40), 1.0, 1.5)
    one = simulate(progs, COST, "taper")["records"]
    copies = [replace(p, pid=f"{p.pid}.{k}") for p in progs for k in range(4)]
    many = simulate_replicas(copies, COST, "taper", 4, "group_affine")["records"]
    for k in range(4):
        mine = [dataclasses.asdict(replace(r, pid=r.pid.split(".")[0])) for r in many
                if r.pid.endswith(f".{k}")]
        assert mine == [dataclasses.asdict(r) for r in one]


def test_four_replicas_sustain_four_times_the_load_one_cannot():
    progs = at_rate(programs(120), 1.0, 1.0)
    spec = SLOSpec()
    one = summarize(simulate(at_rate(progs, 1.0, 2.5), COST, "taper")["records"], spec)
    four = summarize(simulate_replicas(at_rate(progs, 1.0, 2.5), COST, "taper", 4,
                                       "group_affine")["records"], spec)
    light = summarize(simulate(at_rate(progs[:30], 1.0, 2.5 / 4), COST, "taper")["records"],
                      spec)
    assert light["slo_attainment"] >= 0.95 and four["slo_attainment"] >= 0.95
    assert one["slo_attainment"] < 0.8


def test_routers_choose_as_documented():
    ll = LeastLoaded(3)
    assert ll.route(None, None, [2, 1, 1]) == 1 and ll.route(None, None, [0, 1, 0]) == 0

    class Where:
        home = -1

    ga, where = GroupAffine(3), Where()
    assert ga.route(None, where, [3, 0, 1]) == 1 and ga.route(None, where, [3, 9, 1]) == 1


def test_taper_sim_replicas_flag(tmp_path):
    from bench.sim import cli

    args = ["--policies", "taper", "--num-prompts", "8", "--request-rate", "0.6",
            "--quiet", "--no-plots", "--workers", "1", "--result-dir", str(tmp_path)]
    assert cli.main(args + ["--replicas", "0"]) == 2
    assert cli.main(args + ["--replicas", "2", "--routing", "round_robin"]) == 0
    run = json.loads((tmp_path / "result.json").read_text())["runs"][0]
    assert run["server"]["routing"]["replicas"] == 2
    assert run["server"]["routing"]["split_groups"] > 0


def test_plan_finds_the_fewest_replicas_by_doubling_then_bisection():
    from bench.sim.plan import fewest

    calls = []

    def attains(n):
        calls.append(n)
        return 0.99 if n >= 11 else 0.5

    n, tried = fewest(attains, 64)
    assert n == 11 and calls == [1, 2, 4, 8, 16, 12, 10, 11]
    assert tried[10] == 0.5 and tried[11] == 0.99
    assert fewest(lambda n: 0.9, 5)[0] is None  # 1, 2, 4, 5 all fail
    assert fewest(lambda n: 1.0, 5) == (1, {1: 1.0})


def test_gpu_choices_come_from_the_profiles(tmp_path):
    table = {"gpu": "NVIDIA H100 80GB HBM3", "model": "qwen3-8b", "label": "measured",
             "batches": [1, 2], "contexts": [512, 1024], "decode_s": [[1, 2], [3, 4]]}
    (tmp_path / "a.json").write_text(json.dumps(table))
    (tmp_path / "b.json").write_text(json.dumps({**table, "model": "qwen3-32b"}))
    (tmp_path / "c.json").write_text(json.dumps({**table, "gpu": "NVIDIA B200"}))
    (tmp_path / "linear.json").write_text(json.dumps({"kind": "linear", "a": 1}))
    found = costs.gpu_profiles(tmp_path)
    assert sorted(found) == ["b200", "h100-qwen3-32b", "h100-qwen3-8b"]
    assert found["b200"] == (tmp_path / "c.json", "qwen3-8b, measured")
    shipped = costs.gpu_profiles()
    assert shipped["h200"][0].name == "h200_qwen3_32b_full.json"
    assert "all 64 layers" in shipped["h200"][1]
    assert "extrapolated" in shipped["h200-extrapolated"][1]
    # an extrapolated table beside a measured one of the same GPU and model
    (tmp_path / "d.json").write_text(json.dumps({**table, "gpu": "NVIDIA B200",
                                                 "label": "extrapolated: 4 layers x 16"}))
    found = costs.gpu_profiles(tmp_path)
    assert found["b200"][0].name == "c.json" and found["b200-extrapolated"][0].name == "d.json"


def test_taper_sim_gpu_flag(tmp_path, capsys):
    from bench.sim import cli, plan

    args = ["--policies", "taper", "--num-prompts", "8", "--request-rate", "0.6",
            "--quiet", "--no-plots", "--workers", "1", "--result-dir", str(tmp_path)]
    assert cli.main(args + ["--gpu", "h200", "--cost-model", "analytic:qwen3-8b@h100"]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main(args + ["--gpu", "h200"]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["cost_model"]["name"] == "measured:h200_qwen3_32b_full.json"
    assert result["cost_model"]["prefill_model"] == \
        "measured cells (fresh prompts and over cached context)"
    assert plan.main(["--rate", "0", "--gpu", "h200"]) == 2


def test_plan_on_a_trace_takes_per_context_slos_from_the_cost_model(tmp_path):
    """plan and scaleout judge every N by one replica's figures computed from the
    cost model: with a trace's per-context SLOs they come from the model too."""
    from bench.sim import plan
    from tests.test_traces import MOONCAKE

    assert plan.main(["--rate", "0.5", "--dataset", MOONCAKE, "--num-prompts", "6",
                      "--length-scale", "0.05", "--policies", "taper", "--max-replicas", "2",
                      "--quiet", "--workers", "1", "--result-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["cells"][0]["tried"]
    assert plan.main(["--rate", "1", "--replicas", "2"]) == 2
    assert plan.main(["--rate", "1", "--controller", "margin=7"]) == 2


def test_scaleout_checks_its_options_as_taper_sim(capsys):
    from bench.sim import scaleout

    assert scaleout.main(["--controller", "margin=7"]) == 2
    assert "margin" in capsys.readouterr().err
    assert scaleout.main(["--cost-model", "linear:/no/such.json"]) == 2
    assert "scaleout: error:" in capsys.readouterr().err
