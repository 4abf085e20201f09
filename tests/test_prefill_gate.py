"""The prefill gate (controller/prefill.py): a prefill waits while it would make a
running critical request miss an SLO it can still meet, never past a waiting
request's first-token deadline, and only under taper."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller import Controller, PrefillView, Seq, StepView, TaperConfig
from controller.prefill import cushions

TPOT = 0.02  # seconds per token: pace (1 - 0.1) * 0.02 = 18 ms


def view(first_token: float, generated: int, max_new: int = 100, now: float = 10.0,
         waiting: int = 1) -> StepView:
    """A critical request and a group of 4 branches."""
    seqs = [Seq("serial", kv_len=200, generated=generated, first_token=first_token,
                tpot_slo=TPOT, max_new=max_new)]
    seqs += [Seq(f"b{i}", group=0, branch=i, width=4, kv_len=200, generated=3,
                 first_token=9.0, max_new=200) for i in range(4)]
    return StepView.from_seqs(seqs, now=now, waiting=waiting)


def no_waiting() -> PrefillView:
    """A 4096-token prefill with no latency-critical request among its waiters."""
    return PrefillView(4096, np.zeros(0), np.zeros(0))


def controller(policy: str = "taper") -> Controller:
    ctl = Controller(TaperConfig(policy=policy))
    # Prefills cost 2.4 ms + 0.12 s per 1024 tokens: 4096 tokens take about 0.48 s.
    for _ in range(50):
        ctl.observe_prefill(1024, 0.1224)
        ctl.observe_prefill(4096, 0.4824)
    return ctl


def t_prefill(ctl: Controller, tokens: int) -> float:
    return ctl.prefill_predictor.predict(np.array([1.0, 0, 0, tokens / 1024, 0]))


def cushion_of(ctl: Controller, v: StepView) -> float:
    """The critical request's cushion, with mandatory steps as the controller
    predicts them (the request and the group's base branch)."""
    w = ctl.predictor.unit_costs
    step = w[0] + 2 * w[1] + 2 * 200 * w[2]
    return float(cushions(v, ctl.config.margin, step + ctl.gap)[0])


def test_defers_while_a_critical_request_could_absorb_the_stall_later():
    ctl = controller()
    # 20 of 100 tokens at exactly the tightened pace (18 ms): its last token is due
    # 80 paces (1.44 s) from now and the 80 steps left take ~80 * 2.6 ms: the cushion
    # is about 1.23 s.
    v = view(first_token=10.0 - 19 * 0.018, generated=20)
    wide = ctl.decide(v)
    assert len(wide.keep) == 5  # room in this step for every branch
    c = cushion_of(ctl, v)
    assert 1.1 < c < 1.3
    assert t_prefill(ctl, 12288) > c > t_prefill(ctl, 8192)
    assert not ctl.admit_prefill(v, PrefillView(12288, np.zeros(0), np.zeros(0)))
    narrow = ctl.decide(v)  # while deferring, only the mandatory batch decodes
    assert len(narrow.keep) == 2 and narrow.budget <= 0
    assert ctl.admit_prefill(v, PrefillView(8192, np.zeros(0), np.zeros(0)))  # it fits
    assert ctl.decide(v).budget == wide.budget


def test_a_request_that_will_miss_anyway_is_not_protected():
    ctl = controller()
    v = view(first_token=8.4, generated=20)  # behind: due 8.4 + 99 * 0.018 = 10.18 s
    ctl.decide(v)
    assert cushion_of(ctl, v) < 0
    assert ctl.admit_prefill(v, no_waiting())


def test_a_waiting_request_due_for_its_first_token_forces_the_prefill():
    ctl = controller()
    v = view(first_token=10.0 - 76 * 0.018, generated=77)  # cushion ~0.35 s < 0.48 s
    ctl.decide(v)
    assert not ctl.admit_prefill(v, no_waiting())
    # Arrived 0.9 s ago with a 1 s TTFT SLO: due at now + 0.0 s (tightened), cannot wait.
    assert ctl.admit_prefill(v, PrefillView(4096, np.array([9.1]), np.array([1.0])))
    # With 10 s of TTFT left it can.
    assert not ctl.admit_prefill(v, PrefillView(4096, np.array([9.9]), np.array([10.0])))


@pytest.mark.parametrize("policy", ["off", "eager", "cap:2"])
def test_baselines_never_gate(policy):
    ctl = controller(policy)
    v = view(first_token=10.0 - 76 * 0.018, generated=77)
    ctl.decide(v)
    assert not ctl.gates_prefill and ctl.admit_prefill(v, no_waiting())


def test_an_empty_queue_ends_a_deferral():
    ctl = controller()
    v = view(first_token=10.0 - 76 * 0.018, generated=77)
    wide = ctl.decide(v)
    assert not ctl.admit_prefill(v, no_waiting())
    assert ctl.decide(v).budget <= 0
    gone = view(first_token=10.0 - 76 * 0.018, generated=77, waiting=0)
    assert ctl.decide(gone).budget == wide.budget


def test_cushion_formula():
    v = view(first_token=9.0, generated=40, max_new=100, now=10.0)
    c = cushions(v, margin=0.1, step=0.005)
    # due 9 + 99 * 0.018 = 10.782; 60 tokens left at 5 ms: 0.3 s -> cushion 0.482 s
    assert c == pytest.approx([10.782 - 10.0 - 0.3])
    unknown = view(first_token=9.0, generated=40, max_new=0)
    assert len(cushions(unknown, 0.1, 0.005)) == 0
    assert not math.isnan(c[0])


def test_the_gate_can_be_turned_off():
    ctl = Controller(TaperConfig(policy="taper").updated(["prefill_gate=off"]))
    v = view(first_token=10.0 - 76 * 0.018, generated=77)
    ctl.decide(v)
    assert not ctl.gates_prefill and ctl.admit_prefill(v, no_waiting())
    with pytest.raises(ValueError, match="prefill_gate needs a bool"):
        TaperConfig().updated(["prefill_gate=maybe"])
