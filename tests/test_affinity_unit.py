"""Group-affine placement without a server: the placement table, the DP
controller hook driven with SGLang's own dispatch code, the per-rank figures'
aggregation, and the CPU core binding for several ranks."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from sglang_taper.affinity import Keys, Placement, keys_of
from sglang_taper.serve import cpu_binding
from sglang_taper.stats import aggregate_ranks


def test_a_group_stays_on_one_replica_whatever_the_load():
    p = Placement()
    first = p.place(Keys(group="g", width=4), [5, 0, 9], active=[0, 1, 2])
    assert first == 1  # least loaded
    for loads in ([0, 9, 0], [0, 100, 0]):
        assert p.place(Keys(group="g", width=4), loads, active=[0, 1, 2]) == 1


def test_new_groups_follow_program_then_parent():
    p = Placement()
    assert p.place(Keys(program="prog"), [0, 0], [0, 1]) == 0
    # the program's fork goes where the program is, though rank 0 is busier now
    assert p.place(Keys(program="prog", group="outer", width=2), [50, 0], [0, 1]) == 0
    # a nested group without program key follows its parent
    assert p.place(Keys(group="inner", parent="outer", width=3), [50, 0], [0, 1]) == 0
    # an unrelated group goes to the idle rank
    assert p.place(Keys(group="other", width=2), [50, 0], [0, 1]) == 1
    # a known group beats its program's placement (a group is never split)
    assert p.place(Keys(program="elsewhere", group="other"), [0, 50], [0, 1]) == 1


def test_no_keys_no_placement():
    p = Placement()
    assert p.place(Keys(), [0, 0], [0, 1]) is None
    assert keys_of(None) == Keys() and keys_of({"temperature": 1}) == Keys()
    assert keys_of({"taper_group": 7}) == Keys()  # bad metadata: the server answers 400
    assert keys_of({"taper_group": "g", "taper_width": 3, "taper_program": "p"}) == Keys(
        program="p", group="g", width=3)


def test_a_burst_of_groups_spreads_before_loads_are_reported():
    p = Placement()
    loads = [0.0, 0.0]
    where = [p.place(Keys(group=f"g{i}", width=4), loads, [0, 1]) for i in range(6)]
    assert where == [0, 1, 0, 1, 0, 1]
    # a fresh report of replica 0 replaces its pending load
    p.reported(0)
    assert p.place(Keys(group="g6", width=4), [0.0, 0.0], [0, 1]) == 0


def test_a_burst_of_new_programs_spreads_too():
    # Programs open with an untagged stage or a prefix commit: only the program key.
    p = Placement()
    where = [p.place(Keys(program=f"p{i}"), [0.0, 0.0], [0, 1]) for i in range(6)]
    assert where == [0, 1, 0, 1, 0, 1]


def test_a_replica_that_left_loses_its_groups():
    p = Placement()
    assert p.place(Keys(group="g"), [0, 1], [0, 1]) == 0
    assert p.place(Keys(group="g"), [0, 1], active=[1]) == 1
    assert p.place(Keys(group="g"), [0, 1], active=[0, 1]) == 1


def test_table_is_bounded():
    p = Placement(capacity=8)
    for i in range(100):
        p.place(Keys(group=f"g{i}"), [0, 0], [0, 1])
    assert len(p) == 8
    with pytest.raises(ValueError):
        Placement(capacity=0)


def test_random_streams_never_split_a_group():
    rng = random.Random(7)
    p = Placement(capacity=10_000)
    where: dict[str, int] = {}
    for _ in range(3000):
        g = f"g{rng.randrange(200)}"
        r = p.place(Keys(group=g, width=rng.randint(1, 8)),
                    [rng.random() * 10 for _ in range(4)], [0, 1, 2, 3])
        assert where.setdefault(g, r) == r
    assert len(set(where.values())) == 4


# ------------------------------------------------------- the DP controller hook


def _controller(ranks: int):
    """A DataParallelController with just what dispatch reads, using SGLang's own
    DPBudget and round-robin method."""
    from sglang.srt.managers.data_parallel_controller import (
        DataParallelController,
        DPBudget,
        LoadBalanceMethod,
    )

    ctl = DataParallelController.__new__(DataParallelController)
    ctl.load_balance_method = LoadBalanceMethod.ROUND_ROBIN
    ctl.sent = []
    ctl.workers = [SimpleNamespace(rank=i) for i in range(ranks)]
    ctl._active_workers = list(range(ranks))
    ctl.status = [True] * ranks
    ctl.round_robin_counter = 0
    ctl.dp_budget = DPBudget(ranks)
    ctl.snapshots = []
    ctl.load_snapshot_reader = SimpleNamespace(read_all=lambda: ctl.snapshots)
    return ctl


def _req(custom=None, routed=None):
    return SimpleNamespace(sampling_params=SimpleNamespace(custom_params=custom),
                           routed_dp_rank=routed, rid="r")


def test_dp_hook_routes_groups_through_sglangs_dispatch(monkeypatch):
    from sglang.srt.managers import data_parallel_controller as dpc

    from sglang_taper.adapter.dp import DPAffinity

    ctl = _controller(2)
    monkeypatch.setattr(dpc, "sock_send", lambda worker, req: ctl.sent.append(
        (worker.rank, req)))
    aff = DPAffinity()
    original = dpc.DataParallelController.maybe_external_dp_rank_routing

    def routed(self, req):
        aff.before_route(self, req)
        return original(self, req)

    monkeypatch.setattr(dpc.DataParallelController, "maybe_external_dp_rank_routing", routed)
    # a fresh load report: rank 0 busy
    ctl.snapshots = [SimpleNamespace(dp_rank=0, timestamp=1.0, num_running_reqs=6,
                                     num_waiting_reqs=0, num_total_tokens=0),
                     SimpleNamespace(dp_rank=1, timestamp=1.0, num_running_reqs=0,
                                     num_waiting_reqs=0, num_total_tokens=0)]
    for i in range(4):
        ctl.round_robin_scheduler(_req({"taper_group": "g", "taper_width": 4,
                                        "taper_branch": i}))
    assert [r for r, _ in ctl.sent] == [1, 1, 1, 1]
    # ordinary requests: SGLang's round robin, untouched
    ctl.sent.clear()
    for _ in range(4):
        ctl.round_robin_scheduler(_req())
    assert [r for r, _ in ctl.sent] == [0, 1, 0, 1]
    # a client's own routed_dp_rank wins
    ctl.sent.clear()
    ctl.round_robin_scheduler(_req({"taper_group": "g"}, routed=0))
    assert [r for r, _ in ctl.sent] == [0]


def test_dp_hook_leaves_pd_pairing_alone():
    from sglang.srt.managers.data_parallel_controller import LoadBalanceMethod

    from sglang_taper.adapter.dp import DPAffinity

    ctl = _controller(2)
    ctl.load_balance_method = LoadBalanceMethod.FOLLOW_BOOTSTRAP_ROOM
    req = _req({"taper_group": "g"})
    DPAffinity().before_route(ctl, req)
    assert req.routed_dp_rank is None


def test_dp_hook_failure_falls_back_to_sglang(monkeypatch):
    from sglang_taper.adapter.dp import DPAffinity

    ctl = _controller(2)
    ctl.load_snapshot_reader = SimpleNamespace(read_all=lambda: 1 / 0)
    aff = DPAffinity()
    req = _req({"taper_group": "g"})
    aff.before_route(ctl, req)
    assert req.routed_dp_rank is None and aff.failed


# ------------------------------------------------------- figures and launch


def test_aggregate_ranks_sums_and_keeps_each_rank():
    r0 = {"dp_rank": 0, "policy": "taper", "steps": 10, "regulated_steps": 4,
          "held_branch_steps": 3, "branch_steps": 8, "max_group_width": 3,
          "group_width_histogram": {"1": 2, "3": 1}, "groups_seen": {"a": 4},
          "degraded": False, "faults": 0, "requests_attached": 5, "regulating": True,
          "kv": {"capacity": 100, "available": 90, "held_reqs": 1}}
    r1 = {**r0, "dp_rank": 1, "steps": 5, "max_group_width": 5,
          "group_width_histogram": {"1": 1, "10": 2}, "groups_seen": {"b": 2},
          "degraded": True, "degraded_reason": "boom", "faults": 1, "regulating": False,
          "enabled": False}
    out = aggregate_ranks([r1, r0])
    assert [r["dp_rank"] for r in out["dp_ranks"]] == [0, 1]
    assert out["dp_size"] == 2 and out["steps"] == 15 and out["held_branch_steps"] == 6
    assert out["max_group_width"] == 5
    assert out["group_width_histogram"] == {"1": 3, "3": 1, "10": 2}
    assert out["groups_seen"] == {"a": 4, "b": 2}
    assert out["degraded"] and out["degraded_reason"] == "boom" and not out["regulating"]
    assert out["enabled"] is False  # switched off on one rank: not on for the server
    assert out["kv"] == {"capacity": 200, "available": 180, "held_reqs": 2}
    assert out["mean_branch_width"] == 2.0


@pytest.mark.parametrize("ranks,cores,want", [
    (2, [0, 1], "0|1"),
    (2, list(range(8)), "0-3|4-7"),
    (3, [0, 1], "0|1|0"),
    (2, [0, 2, 4, 6], "0,2|4,6"),
])
def test_cpu_binding(ranks, cores, want):
    assert cpu_binding(ranks, cores) == want
