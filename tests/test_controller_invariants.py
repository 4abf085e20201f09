"""Invariants every registered policy must keep, checked over random views."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller import POLICIES, Controller, Seq, StepResult, StepView, TaperConfig


def policy_strings() -> list[str]:
    out = []
    for entry in POLICIES.values():
        out += [f"{entry.name}:{k}" for k in (1, 2, 3)] if entry.takes_arg else [entry.name]
    return out


ALL_POLICIES = policy_strings()


class LinearStep:
    """A true step-time model for the policies that need one (clairvoyant)."""

    def decode(self, n: int, kv: float) -> float:
        return 2e-3 + 1e-4 * n + 1e-8 * kv


def controller(policy: str, **cfg) -> Controller:
    config = TaperConfig(policy=policy, **cfg)
    return Controller(config, cost=LinearStep() if config.spec.entry.needs_cost else None)


@st.composite
def views(draw) -> StepView:
    seqs: list[Seq] = []
    n_groups = draw(st.integers(0, 8))
    for g in range(n_groups):
        width = draw(st.integers(1, 8))
        # Some branches may have finished already: a subset of indices runs.
        alive = draw(st.lists(st.integers(0, width - 1), min_size=1, max_size=width,
                              unique=True))
        shared = draw(st.integers(0, 2000))
        arrival = draw(st.floats(0, 5))
        for b in sorted(alive):
            seqs.append(Seq(
                f"g{g}.{b}", group=g, branch=b, width=width,
                kv_len=shared + draw(st.integers(1, 3000)), shared_len=shared,
                arrival=arrival, first_token=arrival + 0.1,
                generated=draw(st.integers(1, 500)),
                critical=draw(st.booleans()) if draw(st.integers(0, 9)) == 0 else False,
            ))
    for i in range(draw(st.integers(0, 6))):
        arrival = draw(st.floats(0, 5))
        seqs.append(Seq(
            f"o{i}", kv_len=draw(st.integers(1, 4000)), arrival=arrival,
            first_token=arrival + draw(st.floats(0.01, 1.0)),
            generated=draw(st.integers(1, 300)),
            tpot_slo=draw(st.floats(0.005, 0.2)), ttft_slo=1.0,
        ))
    order = draw(st.permutations(range(len(seqs))))
    seqs = [seqs[i] for i in order]
    return StepView.from_seqs(seqs, now=draw(st.floats(5, 40)))


def base_indices(view: StepView) -> set[int]:
    best: dict[int, int] = {}
    for i in range(len(view)):
        g = int(view.group[i])
        if g >= 0 and (g not in best or view.branch[i] < view.branch[best[g]]):
            best[g] = i
    return set(best.values())


def per_group_kept(view: StepView, keep: np.ndarray) -> dict[int, int]:
    out: dict[int, int] = {}
    for i in keep:
        g = int(view.group[i])
        if g >= 0:
            out[g] = out.get(g, 0) + 1
    return out


SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("policy", ALL_POLICIES)
@SETTINGS
@given(view=views())
def test_mandatory_always_run_and_partition(policy, view):
    d = controller(policy).decide(view)
    keep, held = set(d.keep.tolist()), set(d.held.tolist())
    assert keep.isdisjoint(held) and keep | held == set(range(len(view)))
    assert list(d.keep) == sorted(d.keep) and list(d.held) == sorted(d.held)
    for i in range(len(view)):
        if view.group[i] < 0 or view.critical[i]:
            assert i in keep, "ordinary and critical requests are never held"
    assert base_indices(view) <= keep, "a group's base branch is never held"
    assert d.held_ids() == [view.ids[i] for i in d.held]
    if len(view):
        assert keep, "never hold everything"


@pytest.mark.parametrize("k", [1, 2, 3])
@SETTINGS
@given(view=views())
def test_cap_k_respected(k, view):
    d = Controller(TaperConfig(policy=f"cap:{k}")).decide(view)
    for g, count in per_group_kept(view, d.keep).items():
        members = np.flatnonzero(view.group == g)
        forced = 1 + int(view.critical[members].sum())  # base + critical ones must run
        assert count <= max(k, forced)
        # and cap admits up to K when the group has that many
        assert count >= min(k, len(members))


@SETTINGS
@given(view=views())
def test_off_runs_one_branch_per_group(view):
    d = Controller(TaperConfig(policy="off")).decide(view)
    base = base_indices(view)
    kept = per_group_kept(view, d.keep)
    for g in set(view.group[view.group >= 0].tolist()):
        members = [i for i in range(len(view)) if view.group[i] == g]
        must = sum(1 for i in members if i in base or view.critical[i])
        assert kept[g] == must  # the base plus any latency-critical member, nothing more


@SETTINGS
@given(view=views())
def test_eager_runs_everything(view):
    d = Controller(TaperConfig(policy="eager")).decide(view)
    assert len(d.held) == 0


@SETTINGS
@given(view=views())
def test_taper_externality_within_budget(view):
    ctl = Controller(TaperConfig(policy="taper"))
    d = ctl.decide(view)
    assert d.externality <= max(d.budget, 0.0) + 1e-12
    # Recompute the externality independently from the predictor's weights.
    w = ctl.predictor.unit_costs
    base = base_indices(view)
    extras = [i for i in d.keep if view.group[i] >= 0 and not view.critical[i]
              and i not in base]
    expect = sum(w[1] + w[2] * view.kv_len[i] for i in extras)
    assert d.externality == pytest.approx(expect, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("policy", ALL_POLICIES)
@SETTINGS
@given(view=views(), extra=st.floats(0.0, 2.0))
def test_more_slack_never_narrows(policy, view, extra):
    ctl = controller(policy)
    d = ctl.decide(view)
    earlier = StepView(**{**{f: getattr(view, f) for f in view.__slots__}, "now": view.now - extra})
    d2 = ctl.decide(earlier)
    assert len(d2.keep) >= len(d.keep)
    assert set(d.keep.tolist()) <= set(d2.keep.tolist())


@pytest.mark.parametrize("policy", ALL_POLICIES)
@SETTINGS
@given(view=views())
def test_same_view_same_decision(policy, view):
    a, b = controller(policy), controller(policy)
    d1, d2, d3 = a.decide(view), a.decide(view), b.decide(view)
    for other in (d2, d3):
        assert np.array_equal(d1.keep, other.keep)
        assert d1.budget == other.budget and d1.externality == other.externality


def test_held_branch_admitted_after_max_hold_steps():
    """Bounded wait: with no budget at all, taper still admits a branch held
    max_hold_steps steps in a row."""
    cfg = TaperConfig(policy="taper", max_hold_steps=5)
    ctl = Controller(cfg)
    seqs = [Seq(f"b{i}", group=0, branch=i, width=3, kv_len=100, generated=1, first_token=0.0)
            for i in range(3)]
    # A late ordinary request makes the budget negative.
    seqs.append(Seq("late", kv_len=10, generated=50, first_token=0.0, tpot_slo=0.01))
    admitted_at = {}
    for step in range(12):
        view = StepView.from_seqs(seqs, now=10.0 + step)
        d = ctl.decide(view)
        assert d.budget < 0
        for i in d.keep:
            admitted_at.setdefault(view.ids[i], step)
        ctl.observe(StepResult(d, step_time=0.01, end=10.0 + step + 0.01))
    assert admitted_at["b0"] == 0
    assert admitted_at["b1"] == 5 and admitted_at["b2"] == 5


def test_taper_promotes_a_branch_whose_stage_deadline_is_at_risk():
    """urgent_paces: a held branch with less laxity than that many paces runs even
    when the budget is negative; without it, it waits. Its cost then counts as
    mandatory, so the admitted extras' externality still fits the budget."""
    def view(now: float) -> StepView:
        # Stage due at 0 + 1.0 + 99 * 0.05 * 2 = 10.9 s; 99 tokens left need
        # 99 * 0.9 * 0.05 = 4.455 s: laxity = 6.445 - now.
        seqs = [Seq(f"b{i}", group=0, branch=i, width=3, kv_len=100, generated=1,
                    first_token=0.5, max_new=100) for i in range(3)]
        seqs.append(Seq("late", kv_len=10, generated=50, first_token=0.0, tpot_slo=0.01))
        return StepView.from_seqs(seqs, now=now)

    urgent = Controller(TaperConfig(policy="taper", urgent_paces=10))  # 0.45 s
    plain = Controller(TaperConfig(policy="taper"))
    for ctl in (urgent, plain):
        d = ctl.decide(view(5.0))  # laxity 1.445 s: not urgent
        assert d.budget < 0 and len(d.keep) == 2  # base branch and the ordinary request
    d = urgent.decide(view(6.0))  # laxity 0.445 s < 0.45 s
    assert len(d.keep) == 4 and d.mandatory == 4 and d.externality == 0.0
    assert len(plain.decide(view(6.0)).keep) == 2
    cap = Controller(TaperConfig(policy="cap:1", urgent_paces=10))  # taper only
    assert len(cap.decide(view(6.0)).keep) == 2
