"""Single functions of the SGLang adapter, without a server: the TP agreement on
what runs, group codes, fault injection, and queued critical work in the budget."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from controller import Controller, PrefillView, TaperConfig
from sglang_taper.adapter.reqmeta import GroupCodes
from sglang_taper.adapter.runtime import FAULT_POINTS, _parse_fault, agree_on_keep
from tests.conftest import group_seqs, make_view, ordinary


class _Group:
    """Two TP ranks' broadcast: rank 0's payload reaches both (a barrier, so that a
    rank that skipped the call would hang the test, as it would hang SGLang)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=5)
        self.payload = None

    def broadcast(self, rank: int):
        def send(payload: list) -> list:
            if rank == 0:
                self.payload = payload
            self.barrier.wait()
            return list(self.payload)
        return send


def _two_ranks(decide0, degrade0=None) -> list:
    group, out = _Group(), [None, None]

    def rank(r: int) -> None:
        def follower_decide():
            raise AssertionError("a follower never decides")
        out[r] = agree_on_keep(r == 0, decide0 if r == 0 else follower_decide,
                               group.broadcast(r), degrade0 if r == 0 else None)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_every_tp_rank_applies_rank0s_decision():
    (k0, r0), (k1, r1) = _two_ranks(lambda: np.array([0, 2, 3]))
    assert k0.tolist() == k1.tolist() == [0, 2, 3] and r0 is r1 is None


def test_a_failed_decision_on_rank0_means_keep_all_and_degrade_on_every_rank():
    def boom():
        raise RuntimeError("bad fit")
    (k0, r0), (k1, r1) = _two_ranks(boom)
    assert k0 is None and k1 is None
    assert r0 == r1 and "RuntimeError: bad fit" in r0


def test_an_earlier_fault_on_rank0_is_announced_without_deciding():
    def never():
        raise AssertionError("rank 0 must not decide once it degraded")
    (k0, r0), (k1, r1) = _two_ranks(never, degrade0="observe: ValueError: x")
    assert k0 is None and k1 is None and r0 == r1 == "observe: ValueError: x"


def test_pruning_group_codes_keeps_live_groups_whole():
    """A live group keeps its code and its member numbering: pruning must never
    split one group into two, each with a mandatory base branch."""
    g = GroupCodes()
    live = g.code("live")
    assert [g.next_member("live") for _ in range(2)] == [0, 1]
    g.code("done")
    g.next_member("done")
    assert g.prune({"live"}) == 1
    assert g.code("live") == live and g.next_member("live") == 2
    assert g.code("done") > live  # a new group after the prune: a new, younger code
    assert g.names[live] == "live" and len(g) == 2


def test_fault_spec():
    assert _parse_fault(None) == (None, 0)
    assert _parse_fault("decide") == ("decide", 1)
    assert _parse_fault("observe@40") == ("observe", 40)
    assert set(FAULT_POINTS) >= {"decide", "split", "observe", "stats"}
    with pytest.raises(ValueError, match="nowhere"):
        _parse_fault("nowhere")
    assert _parse_fault("later") == (None, 0)
    for bad in ("decide@0", "decide@x", "decide@-1"):
        with pytest.raises(ValueError, match="integer >= 1"):
            _parse_fault(bad)


def _runtime(fault: str | None, **args):
    from types import SimpleNamespace

    from sglang_taper.adapter.runtime import SchedulerRuntime

    sched = SimpleNamespace(server_args=SimpleNamespace(**args), tp_size=1,
                            spec_algorithm=SimpleNamespace(is_none=lambda: True))
    return SchedulerRuntime(sched, TaperConfig(policy="off"), fault)


def test_run_time_faults_need_the_launch_variable_and_a_rearm_spends_them():
    """POST /taper/fault and /taper/rearm's scheduler side (SchedulerRuntime.inject,
    .rearm): refused on a server launched without TAPER_INJECT_FAULT; injected,
    they raise from the N-th call counted from now; a re-arm clears the degraded
    state with a fresh controller and spends the fault."""
    from sglang_taper.adapter.runtime import InjectedFault

    with pytest.raises(ValueError, match="TAPER_INJECT_FAULT=later"):
        _runtime(None).inject("decide")
    rt = _runtime("later")
    rt._inject("decide")  # none at launch
    for bad in ("nowhere", "later", "decide@0"):
        with pytest.raises(ValueError, match="fault"):
            rt.inject(bad)
    rt.inject("decide@2")
    rt._inject("decide")
    with pytest.raises(InjectedFault, match="call 2"):
        rt._inject("decide")
    assert rt.rearm() is False  # not degraded: nothing to re-arm
    before = rt.controller
    rt.degrade("decide", RuntimeError("boom"))
    assert rt.stats.degraded and rt.disabled.startswith("degraded")
    assert rt.rearm() is True
    assert rt.stats.degraded is None and rt.disabled is None and rt.stats.faults == 1
    assert rt.controller is not before
    rt._inject("decide")  # spent
    # off for a reason a re-arm cannot mend: refused, still off
    off = _runtime("later", enable_pdmux=True)
    with pytest.raises(ValueError, match="another reason"):
        off.rearm()
    assert "pdmux" in off.disabled


def _branches_and_budget(queued: PrefillView | None, now: float = 1.0):
    ctl = Controller(TaperConfig(policy="taper"))
    view = make_view(group_seqs(0, 8), now=now, waiting=0 if queued is None else 1,
                     queued=queued)
    return ctl.decide(view)


def test_a_queued_critical_request_budgets_the_step():
    """No critical request runs: the budget is unbounded and every branch runs,
    unless a latency-critical request waits for its prefill; then its TTFT
    deadline (less the prefill's time) bounds the step."""
    free = _branches_and_budget(None)
    assert math.isinf(free.budget) and len(free.keep) == 8
    roomy = _branches_and_budget(PrefillView(64, np.array([0.9]), np.array([30.0])))
    assert math.isfinite(roomy.budget) and len(roomy.keep) == 8
    due = _branches_and_budget(PrefillView(64, np.array([0.9]), np.array([0.11])))
    assert due.budget < 0 and len(due.keep) == 1  # only the group's base branch
    # A queued request that is not latency-critical (no arrival listed) costs nothing.
    none = _branches_and_budget(PrefillView(64, np.zeros(0), np.zeros(0)))
    assert math.isinf(none.budget) and len(none.keep) == 8


def test_a_running_critical_request_and_a_queued_one_the_tighter_wins():
    ctl = Controller(TaperConfig(policy="taper"))
    seqs = group_seqs(0, 4) + [ordinary("c", tpot=10.0, generated=1, first_token=1.0)]
    loose = ctl.decide(make_view(seqs, now=1.0))
    tight = ctl.decide(make_view(seqs, now=1.0, waiting=1, queued=PrefillView(
        16, np.array([0.95]), np.array([0.2]))))
    assert tight.budget < loose.budget


def test_pd_multiplexing_is_refused_like_the_other_unsplittable_modes():
    from types import SimpleNamespace

    from sglang_taper.adapter.batch import unsupported

    def sched(**args):
        return SimpleNamespace(server_args=SimpleNamespace(**args),
                               spec_algorithm=SimpleNamespace(is_none=lambda: True))

    assert unsupported(sched()) is None
    assert "pdmux" in unsupported(sched(enable_pdmux=True))
    assert "mixed-chunk" in unsupported(sched(enable_mixed_chunk=True))


@pytest.mark.parametrize("policy,slo", [("taper", 6.0), ("taper", 20.0), ("cap:2", 20.0),
                                        ("off", 20.0)])
def test_kept_view_rows_decide_as_views_stacked_afresh(policy, slo):
    """The scheduler's per-step path (bench.hook_path: SchedulerRuntime's hooks over
    stand-in requests whose batch surgery selects lists) decides the same, step
    by step, whether LiveViews keeps the fixed rows (reused whole, reordered
    after a split, gathered when requests join and leave) or stacks every view
    afresh; and every way was taken."""
    import argparse

    from bench import hook_path

    ns = argparse.Namespace(steps=600, critical=8, groups=5, width=8, tokens=120, slo=slo)
    kept = hook_path.run(policy, ns, record=True)
    fresh = hook_path.run(policy, ns, record=True, fresh_views=True)
    assert kept["faults"] == fresh["faults"] == 0
    assert kept["decisions"] == fresh["decisions"]
    assert kept["stats"]["group_width_histogram"] == fresh["stats"]["group_width_histogram"]
    assert kept["mean_held"] > 1
    views = kept["views"]
    assert views["reused"] > 300 and views["gathered"] > 10, views
    assert fresh["views"]["reused"] == fresh["views"]["gathered"] == 0


def test_a_row_is_restacked_until_its_request_has_its_first_token():
    """LiveViews keeps a request's row only once its first token is stamped (the
    stamp, and the prefix it shares, are fixed from then on)."""
    from types import SimpleNamespace

    from sglang_taper.adapter.reqmeta import LiveViews, ReqMeta

    def req(i: int, out: list) -> SimpleNamespace:
        r = SimpleNamespace(rid=f"r{i}", output_ids=out, cached_tokens=30, to_finish=None,
                            grammar=None, beam_group=None)
        r._taper = ReqMeta(group="g", code=0, branch=i, width=2, ttft=1.0, tpot=0.1,
                           arrival=0.0, critical=False, prompt=40, max_new=8, uid=10 + i)
        return r

    stamped = []

    def metas(reqs, now):
        for r in reqs:
            r._taper.stamp_first_token(r, now)
        stamped.append([r.rid for r in reqs])
        return [r._taper for r in reqs]

    a, b = req(0, [5]), req(1, [])
    views = LiveViews()
    v = views.build([a, b], metas, 1.0, 0, None)
    assert math.isnan(v.first_token[1]) and v.shared_len[1] == 0
    assert v.ids.tolist() == [10, 11] and v.generated.tolist() == [1, 0]
    b.output_ids.append(7)  # b's first token
    v = views.build([a, b], metas, 2.0, 0, None)
    assert stamped == [["r0", "r1"], ["r1"]]  # a's row was kept, b's stacked again
    assert v.first_token.tolist() == [1.0, 2.0] and v.shared_len.tolist() == [30, 30]
    a.output_ids.append(6)
    a.to_finish = "abort"
    v2 = views.build([a, b], metas, 3.0, 0, None)
    assert len(stamped) == 2 and v2.ids is v.ids  # reused whole
    assert v2.generated.tolist() == [2, 1] and v2.pinned.tolist() == [True, False]
    # b ran, a was held: a comes back at the batch's end; the view keeps its order
    views.reorder(np.array([1]), np.array([0]))
    v3 = views.build([b, a], metas, 4.0, 0, None)
    assert len(stamped) == 2 and v3.ids is v.ids and v3.generated.tolist() == [2, 1]
    assert views.to_batch(np.array([0])).tolist() == [1]  # a is the batch's row 1
    assert views.to_batch(np.array([0, 1])).tolist() == [0, 1]
    # under TP the view follows the batch's order
    tp = LiveViews(canonical=False)
    tp.build([a, b], metas, 4.0, 0, None)
    tp.reorder(np.array([1]), np.array([0]))
    v4 = tp.build([b, a], metas, 5.0, 0, None)
    assert v4.ids.tolist() == [11, 10] and v4.branch.tolist() == [1, 0]
    assert v4.generated.tolist() == [1, 2] and tp.to_batch(np.array([0])).tolist() == [0]
    assert tp.reused == 1


def test_step_record_counts_each_groups_decoding_branches():
    """A regulated step's record against a count by hand: the groups present
    (held-out ones too), the branches of each that decoded (keyed by name, in
    code order), the KV of the kept sequences."""
    from sglang_taper.stats import step_record

    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        group = rng.integers(-1, 6, n)
        kv = rng.integers(210, 900, n)
        view = make_view([ordinary(f"s{i}", kv_len=int(k)) if g < 0
                          else group_seqs(int(g), 1, kv_len=int(k))[0]
                          for i, (g, k) in enumerate(zip(group, kv))], now=1.0)
        keep = np.sort(rng.choice(n, int(rng.integers(0, n + 1)), replace=False))
        names = {c: f"g{c}" for c in range(4)}  # codes 4, 5: no name
        rec, widths = step_record(view, keep, names, 0.5, 0.01, 0.02, 9.0)
        kept = [int(view.group[i]) for i in keep if view.group[i] >= 0]
        want = {names.get(c, str(c)): kept.count(c) for c in sorted(set(kept))}
        assert widths == want and list(widths) == list(want)
        assert rec.groups == len({int(g) for g in view.group if g >= 0})
        assert rec.branches == len(kept) and rec.max_width == max(want.values(), default=0)
        assert rec.kept == len(keep) and rec.held == n - len(keep)
        assert rec.kv == int(view.kv_len[keep].sum())
