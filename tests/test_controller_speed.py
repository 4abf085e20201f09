"""The decision's shortcuts change nothing: a make-up reused across steps, the
runs of holds kept per position, the slack from a composition, the predictor's
direct solve. Each is checked against the plain computation it replaces."""

from __future__ import annotations

import copy
from itertools import repeat

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller import Controller, PrefillView, Seq, StepResult, StepView, TaperConfig
from controller.composition import Composition
from controller.composition import key as composition_key
from controller.holds import HoldRuns
from controller.predictor import _solve
from controller.slack import step_budget
from tests.test_controller_invariants import ALL_POLICIES, controller


def _seqs(rng: np.random.Generator, n_groups: int, n_ordinary: int) -> list[Seq]:
    seqs = []
    for g in range(n_groups):
        width = int(rng.integers(1, 7))
        shared = int(rng.integers(0, 2000))
        arrival = float(rng.uniform(0, 5))
        for b in range(width):
            seqs.append(Seq(f"g{g}.{b}", group=g, branch=b, width=width,
                            kv_len=shared + int(rng.integers(1, 3000)), shared_len=shared,
                            arrival=arrival, first_token=arrival + 0.1,
                            generated=int(rng.integers(1, 400)),
                            max_new=int(rng.integers(0, 600)),
                            tpot_slo=float(rng.uniform(0.01, 0.1)),
                            critical=bool(rng.integers(0, 8) == 0)))
    for i in range(n_ordinary):
        arrival = float(rng.uniform(0, 5))
        seqs.append(Seq(f"o{i}", kv_len=int(rng.integers(1, 4000)), arrival=arrival,
                        first_token=None if rng.integers(0, 4) == 0 else arrival + 0.05,
                        generated=int(rng.integers(1, 300)), max_new=int(rng.integers(0, 400)),
                        tpot_slo=float(rng.uniform(0.005, 0.2))))
    rng.shuffle(seqs)
    return seqs


def _view(seqs: list[Seq], rng: np.random.Generator, **kw) -> StepView:
    view = StepView.from_seqs(seqs, now=float(rng.uniform(4, 8)), waiting=int(rng.integers(0, 3)),
                              **kw)
    if rng.integers(0, 3) == 0:
        view.pinned = rng.random(len(seqs)) < 0.1
    return view


def _same_decision(a, b) -> None:
    assert a.keep.tolist() == b.keep.tolist() and a.held.tolist() == b.held.tolist()
    assert a.features.tobytes() == b.features.tobytes()
    for f in ("mandatory", "budget", "externality", "predicted"):
        x, y = getattr(a, f), getattr(b, f)
        assert x == y or (x != x and y != y), f


def _changed(view: StepView, rng: np.random.Generator) -> StepView:
    """`view` with one fixed column changed, under the same ids object."""
    v = copy.copy(view)
    column = ("group", "branch", "critical", "max_new", "arrival", "ttft_slo", "tpot_slo",
              "first_token")[int(rng.integers(0, 8))]
    a = getattr(view, column).copy()
    i = int(rng.integers(0, len(a)))
    if column == "critical":
        a[i] = not a[i]
    elif column == "group":
        a[i] = a[int(rng.integers(0, len(a)))] if rng.integers(0, 2) else -1
    elif a.dtype.kind == "f":
        a[i] = a[i] * 0.5 + 0.01 if a[i] == a[i] else 1.0
    else:
        a[i] += int(rng.integers(1, 5))
    setattr(v, column, a)
    v.ids = view.ids
    return v


@pytest.mark.parametrize("policy", ALL_POLICIES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31))
def test_a_reused_make_up_decides_as_a_fresh_one(policy, seed):
    """Steps over one batch (the make-up reused), with a fixed column changed under
    the same ids now and then: every decision equals a controller's that builds
    the make-up afresh, in the same state."""
    rng = np.random.default_rng(seed)
    cfg = dict(max_hold_steps=int(rng.integers(1, 4)), urgent_paces=float(rng.choice([0, 4])),
               cascade=bool(rng.integers(0, 2)))
    ctl = controller(policy, **cfg)
    seqs = _seqs(rng, int(rng.integers(1, 6)), int(rng.integers(0, 4)))
    view = _view(seqs, rng)
    for step in range(12):
        if step % 4 == 3:
            view = _changed(view, rng)
        else:  # the next step of the same batch: some tokens, a later clock
            view = copy.copy(view)
            view.generated = view.generated + (rng.random(len(view)) < 0.5)
            view.kv_len = view.kv_len + 1
            view.now += 0.02
        fresh = copy.deepcopy(ctl)
        fresh._comp = None
        d = ctl.decide(view)
        _same_decision(d, fresh.decide(view))
        ctl.observe(StepResult(d, step_time=0.02, end=view.now + 0.02))


def test_regrouped_sequences_under_the_same_ids_are_not_stale():
    """The same ids object, but two groups of four became four groups of two:
    the base branches (and so the decision) follow the new groups."""
    seqs = [Seq(f"s{i}", group=i // 4, branch=i % 4, width=4, kv_len=500, shared_len=400,
                generated=10, first_token=0.1) for i in range(8)]
    ctl = Controller(TaperConfig(policy="off"))
    a = StepView.from_seqs(seqs, now=1.0)
    assert ctl.decide(a).keep.tolist() == [0, 4]
    b = copy.copy(a)
    b.group = np.arange(8) // 2
    b.branch = np.arange(8) % 2
    assert b.ids is a.ids
    assert ctl.decide(b).keep.tolist() == [0, 2, 4, 6]


class _ReferenceHolds:
    """The runs of holds as the controller kept them before: a dict by id."""

    def __init__(self, max_hold: int) -> None:
        self.max_hold, self.step, self.since = max_hold, 0, {}

    def record(self, held_ids: list) -> frozenset:
        step, self.step = self.step, self.step + 1
        self.since = dict(zip(held_ids, map(self.since.get, held_ids, repeat(step))))
        first = step - self.max_hold + 1
        return frozenset(s for s, k in self.since.items() if k <= first)


@pytest.mark.parametrize("kind", ["list", "array", "mutated list", "mutated array", "tuple"])
def test_runs_of_holds_match_the_dict_by_id(kind):
    """Per position while the ids stay, by id when they change (a new object, or
    the same one changed in place): the same runs, starved set and counts as
    the dict by id the controller kept before."""
    rng = np.random.default_rng(7)
    holds, ref = HoldRuns(3), _ReferenceHolds(3)
    make = {"list": list, "mutated list": list, "tuple": tuple,
            "array": lambda m: np.array(m, dtype=np.int64),
            "mutated array": lambda m: np.array(m, dtype=np.int64)}[kind]
    members = [int(x) for x in rng.choice(40, 12, replace=False)]
    ids, starved = make(members), frozenset()
    for _ in range(400):
        r = rng.random()
        if r < 0.15:  # membership changes: some leave, some join, a new object
            members = [m for m in members if rng.random() > 0.2]
            members += [int(x) for x in rng.choice(40, 3, replace=False) if int(x) not in members]
            rng.shuffle(members)
            ids = make(members)
        elif kind.startswith("mutated") and r < 0.25:  # the same object, reordered in place
            ids[:] = ids[::-1].copy() if isinstance(ids, np.ndarray) else ids[::-1]
        names = [int(n) for n in ids]
        mask = holds.starved(ids)
        got = {n for n, m in zip(names, mask) if m} if mask is not None else set()
        assert got == {n for n in names if n in starved}
        held = np.sort(rng.choice(len(names), int(rng.integers(0, len(names) + 1)),
                                  replace=False)).astype(np.int64)
        keep = np.setdiff1d(np.arange(len(names)), held)
        holds.record(ids, keep, held)
        starved = ref.record([names[i] for i in held])
        assert holds.by_id() == ref.since
        for n in names[:3]:
            assert holds.held_steps(n) == (ref.step - ref.since[n] if n in ref.since else 0)


def test_runs_of_holds_by_ever_growing_ids_keep_a_table_the_size_of_their_span():
    """Integer ids that only grow (the SGLang adapter numbers requests as they
    come, for the server's life): the same runs and starved set as the dict by
    id, through a table rebuilt around the ids in use, whose size follows their
    span, not the largest id; while one old id keeps the span at ID_LIMIT or
    more, the dict."""
    from controller.holds import ID_LIMIT

    rng = np.random.default_rng(11)
    holds, ref = HoldRuns(3), _ReferenceHolds(3)
    nxt, members, starved = 10, list(range(10)), frozenset()
    old, paths, tables, spans = None, set(), [], []
    for step in range(700):
        if step % 50 == 49:
            nxt += 400_000  # a jump: many requests served elsewhere meanwhile
        if step == 100:
            old = members[0]  # stays until the numbers pass it by ID_LIMIT
        if rng.random() < 0.3:  # some leave; new ones join with the next numbers
            members = [m for m in members if m == old or rng.random() > 0.3]
            members += list(range(nxt, nxt + 3))
            nxt += 3
        if old is not None and nxt - old > ID_LIMIT + 400_000:
            members.remove(old)
            old = None
        ids = np.array(members, dtype=np.int64)
        mask = holds.starved(ids)
        got = {int(n) for n, m in zip(ids, mask) if m} if mask is not None else set()
        assert got == {int(n) for n in ids if int(n) in starved}
        held = np.sort(rng.choice(len(ids), int(rng.integers(0, len(ids) + 1)),
                                  replace=False)).astype(np.int64)
        holds.record(ids, np.setdiff1d(np.arange(len(ids)), held), held)
        starved = ref.record([int(ids[i]) for i in held])
        assert holds.by_id() == ref.since
        paths.add(holds._table_ok)
        tables.append(len(holds._table))
        spans.append(int(ids.max() - ids.min()) + 1)
    assert nxt > 4 * ID_LIMIT and old is None
    assert paths == {True, False}  # the table, and the dict while the old id stayed
    assert max(tables) <= 4 * ID_LIMIT + 64
    assert tables[-1] <= 64 + 4 * max(spans[-60:])  # back to the span of the ids in use


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_the_slack_from_a_composition_is_the_plain_one(seed):
    rng = np.random.default_rng(seed)
    seqs = _seqs(rng, int(rng.integers(0, 4)), int(rng.integers(0, 6)))
    if not seqs:
        return
    queued = None
    if rng.integers(0, 2):
        m = int(rng.integers(0, 4))
        queued = PrefillView(100, rng.uniform(0, 5, m), rng.uniform(0.5, 3, m))
    view = _view(seqs, rng, queued=queued)
    margin, banked, gap = float(rng.uniform(0, 0.5)), float(rng.uniform(1, 8)), 0.003
    comp = Composition(view, composition_key(view), "global", margin, 2.0, banked)
    plain = step_budget(view, margin, banked, gap, 0.01)
    assert step_budget(view, margin, banked, gap, 0.01, comp) == plain


def test_the_direct_solve_is_numpys_bit_for_bit():
    rng = np.random.default_rng(3)
    for _ in range(200):
        x = rng.normal(size=(40, 5)) * rng.uniform(0.01, 10, 5)
        a = x.T @ x + rng.uniform(1e-6, 1) * np.eye(5)
        b = rng.normal(size=5)
        assert _solve(a, b).tobytes() == np.linalg.solve(a, b).tobytes()
    with pytest.raises(np.linalg.LinAlgError), np.errstate(invalid="ignore"):
        _solve(np.zeros((5, 5)), np.ones(5))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), shift=st.floats(-0.2, 0.05))
def test_a_prefix_policy_without_budget_decides_the_same_unordered(seed, shift):
    """taper skips ordering and costing the extras when its budget is <= 0: the
    same decision as ordering them."""
    rng = np.random.default_rng(seed)
    seqs = _seqs(rng, int(rng.integers(2, 12)), int(rng.integers(0, 3)))
    for s in seqs[::5]:
        s.critical, s.first_token, s.generated = True, 0.1, 100
    view = StepView.from_seqs(seqs, now=0.1 + 100 * 0.9 * 0.05 + shift)
    ctl = Controller(TaperConfig(policy="taper", row_tile=int(rng.choice([0, 16]))))
    whole = copy.deepcopy(ctl)
    whole._prefix = False
    _same_decision(ctl.decide(view), whole.decide(view))


def test_a_passthrough_step_ends_every_run_of_holds():
    seqs = [Seq(f"s{i}", group=0, branch=i, width=4, kv_len=300, shared_len=200,
                generated=5, first_token=0.1) for i in range(4)]
    seqs.append(Seq("serial", kv_len=100, generated=5, first_token=0.1, tpot_slo=0.05))
    ctl = Controller(TaperConfig(policy="taper", max_hold_steps=3))
    view = StepView.from_seqs(seqs, now=10.0)  # the serial one is late: no budget
    for step in range(3):
        d = ctl.decide(view)
        ctl.observe(StepResult(d, step_time=0.02, end=10.0 + step))
    assert ctl.held_steps("s3") == 3 and ctl.decide(view).keep.tolist() == [0, 1, 2, 3, 4]
    ctl.observe(StepResult(ctl.passthrough(5, 1500), step_time=0.02, end=14.0))
    assert ctl.held_steps("s3") == 0 and ctl.decide(view).keep.tolist() == [0, 4]


def test_a_prefix_sums_as_its_gathered_copy_bit_for_bit():
    """A policy may answer with a count k; the controller then sums costs[:k], a
    view, where it summed costs[mask], a copy: numpy's pairwise sum must give
    the same bits for both."""
    rng = np.random.default_rng(11)
    for m in (1, 7, 8, 9, 100, 128, 129, 1000, 5000):
        costs = rng.uniform(1e-6, 1e-3, m) * rng.choice([1.0, 1e3], m)
        for k in {0, 1, m // 3, m - 1, m}:
            mask = np.zeros(m, dtype=bool)
            mask[:k] = True
            assert costs[:k].sum().tobytes() == costs[mask].sum().tobytes()


def test_passthrough_steps_kept_end_every_run_of_holds_too():
    """observe_passthrough (the cheap form a server without branches pays) ends
    runs of holds as observing a passthrough decision does, once read."""
    seqs = [Seq(f"s{i}", group=0, branch=i, width=4, kv_len=300, shared_len=200,
                generated=5, first_token=0.1) for i in range(4)]
    seqs.append(Seq("serial", kv_len=100, generated=5, first_token=0.1, tpot_slo=0.05))
    ctl = Controller(TaperConfig(policy="taper", max_hold_steps=3))
    view = StepView.from_seqs(seqs, now=10.0)
    for step in range(3):
        ctl.observe(StepResult(ctl.decide(view), step_time=0.02, end=10.0 + step))
    ctl.observe_passthrough(5, 1500, 0.02, 14.0)
    assert ctl.held_steps("s3") == 0 and ctl.decide(view).keep.tolist() == [0, 4]
    for step in range(3):  # the runs start again from zero
        ctl.observe(StepResult(ctl.decide(view), step_time=0.02, end=15.0 + step))
    assert ctl.held_steps("s3") == 3 and ctl._holds.steps == 7


@pytest.mark.parametrize("row_tile", [0, 16])
def test_passthrough_steps_learnt_in_one_go_fit_as_one_by_one(row_tile):
    """Kept passthrough steps leave the fit, the counts, the gap estimate and the
    decisions where observing each passthrough decision would (to rounding);
    a disturbed step is counted and not learnt, a spike goes through the
    one-by-one rules."""
    rng = np.random.default_rng(5)
    one = Controller(TaperConfig(policy="taper", row_tile=row_tile))
    kept = Controller(TaperConfig(policy="taper", row_tile=row_tile))
    t = 0.0
    for i in range(300):
        n = int(rng.integers(0, 64))  # 0: a step that ran nothing is not learnt
        kv = int(rng.integers(100, 20000))
        y = 0.002 + 1e-4 * n + 2e-8 * kv + float(rng.normal(0, 1e-4))
        if i == 250:
            y *= 50  # a spike, past the outlier warm-up
        t += y + 0.001
        disturbed = i % 97 == 13
        one.observe(StepResult(one.passthrough(n, kv), step_time=y, end=t, disturbed=disturbed))
        kept.observe_passthrough(n, kv, y, t, disturbed)
    kept.flush()
    a, b = one.predictor, kept.predictor
    assert (a.observed, a.outliers_disturbed, a.outliers_spike) == (
        b.observed, b.outliers_disturbed, b.outliers_spike)
    assert b.outliers_spike == 1 and b.outliers_disturbed == 3
    np.testing.assert_allclose(a._A, b._A, rtol=1e-9)
    np.testing.assert_allclose(a._b, b._b, rtol=1e-9)
    np.testing.assert_allclose(a.w, b.w, rtol=1e-6)
    np.testing.assert_allclose(a.upper_margin, b.upper_margin, rtol=0.25)
    assert one.gap == pytest.approx(kept.gap, rel=1e-6)


def test_a_decision_reads_the_passthrough_steps_kept_before_it():
    ctl = Controller(TaperConfig(policy="taper"))
    for i in range(10):
        ctl.observe_passthrough(8, 4000, 0.03, 0.04 * (i + 1))
    assert ctl.predictor.observed == 0  # kept, not learnt yet
    seqs = [Seq(f"s{i}", group=0, branch=i, width=2, kv_len=300, shared_len=200,
                generated=5, first_token=0.1) for i in range(2)]
    ctl.decide(StepView.from_seqs(seqs, now=1.0))
    assert ctl.predictor.observed == 10 and ctl.gap == pytest.approx(0.01)
    for i in range(64):
        ctl.observe_passthrough(8, 4000, 0.03, 1.0 + 0.04 * i)
    assert ctl.predictor.observed == 74  # a full batch is learnt at once
