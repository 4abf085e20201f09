"""Scripted multi-step loops: TAPER against eager and off, starvation, purity."""

from __future__ import annotations

import subprocess
import sys

import pytest

from controller import Controller, Seq, StepView, TaperConfig
from tests.scripted import Script


def step_model(n: int, kv: int) -> float:
    return 2.0e-3 + 2.0e-4 * n + 1.0e-8 * kv


TPOT_SLO = 5.0e-3  # isolated ~2.7 ms per token, eager with 33 sequences ~9 ms


def scenario() -> Script:
    seqs = [Seq("serial", kv_len=300, generated=1, first_token=0.0, tpot_slo=TPOT_SLO)]
    seqs += [Seq(f"b{i}", group=0, branch=i, width=32, kv_len=300, shared_len=280,
                 generated=1, first_token=0.0) for i in range(32)]
    target = {"serial": 150, **{f"b{i}": 300 for i in range(32)}}
    return Script(seqs, target, step_model, noise=0.03)


def run(policy: str) -> Script:
    script = scenario()
    script.run(Controller(TaperConfig(policy=policy)))
    return script


def branch_tokens_during_serial(script: Script) -> float:
    """Mean number of branches decoding per step while the serial request ran."""
    steps = len(script.token_times["serial"]) - 1
    return sum(w.get(0, 0) for w in script.widths[:steps]) / steps


def test_taper_keeps_the_serial_slo_that_eager_breaks():
    eager, off, taper = run("eager"), run("off"), run("taper")
    assert eager.mean_tpot("serial") > TPOT_SLO * 1.3
    assert taper.mean_tpot("serial") <= TPOT_SLO
    assert off.mean_tpot("serial") <= TPOT_SLO
    width_taper = branch_tokens_during_serial(taper)
    assert width_taper > 3 * branch_tokens_during_serial(off)
    assert width_taper < 32


@pytest.mark.parametrize("policy, width", [("off", 1), ("cap:1", 1), ("cap:3", 3),
                                           ("eager", 32), ("taper", 32)])
def test_baselines_keep_their_width_for_the_whole_run(policy, width):
    """Far past max_hold_steps, `off` still decodes one branch of the group per
    step and `cap:K` at most K (no starvation promotion: that is taper's alone),
    and every branch still finishes. Taper bounds how long a branch waits."""
    script = scenario()
    # Tight SLO: taper's budget is often zero; branches must still finish.
    script.seqs[0].tpot_slo = 2.6e-3
    ctl = Controller(TaperConfig(policy=policy, max_hold_steps=40))
    script.run(ctl)
    if width < 32:
        assert len(script.widths) > 20 * 40, "the run must be far longer than max_hold_steps"
    for s in script.seqs:
        assert s.generated == script.target[s.sid], (policy, s.sid)
    assert max(w.get(0, 0) for w in script.widths) == width
    longest_wait = max(script.max_held_run.values(), default=0)
    if policy == "taper":
        assert longest_wait <= 40
    elif policy != "eager":
        assert longest_wait > 40  # the old promotion would have fired here


@pytest.mark.parametrize("blocked", [["sglang"], ["torch"], ["sglang", "torch"]])
def test_controller_imports_without_sglang_or_torch(blocked):
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None  # any import of it now fails\n"
        "import controller\n"
        "from controller import Controller, Seq, StepView, TaperConfig\n"
        "v = StepView.from_seqs([Seq('a'), Seq('b', group=0)], now=1.0)\n"
        "Controller(TaperConfig()).decide(v)\n"
        "assert not any(k.split('.')[0] in ('sglang', 'torch') and sys.modules[k] is not None\n"
        "               for k in sys.modules)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize(
    "field, value, needle",
    [("margin", 1.0, "margin"), ("max_hold_steps", 0, "max_hold_steps"),
     ("default_tpot_slo", -1.0, "default_tpot_slo"), ("policy", "cap:-2", "K >= 1"),
     ("forgetting", float("nan"), "forgetting")],
)
def test_config_errors_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        TaperConfig(**{field: value})


def test_config_json_round_trip_and_unknown_field():
    cfg = TaperConfig(policy="cap:3", margin=0.2)
    assert TaperConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="no field 'bogus'"):
        TaperConfig.from_json('{"bogus": 1}')


def test_taper_admits_the_most_urgent_branches_first():
    """Least laxity first: with room for two extras, the group closer to its
    stage deadline gets them, and within it the branches with most work left."""

    def make(first_token: float) -> list[Seq]:
        seqs = [Seq("serial", kv_len=100, generated=5, first_token=first_token,
                    tpot_slo=0.01)]
        # Group 0 is older, but its long branches give it a far deadline (laxity ~18 s).
        seqs += [Seq(f"a{i}", group=0, branch=i, width=4, kv_len=100, generated=2,
                     max_new=400, arrival=7.0, first_token=7.1, tpot_slo=0.05)
                 for i in range(4)]
        # Group 1 is younger with short branches, due soon (laxity 2.0 to 3.0 s).
        seqs += [Seq(f"b{i}", group=1, branch=i, width=4, kv_len=100, generated=2,
                     max_new=30 + 10 * i, arrival=8.0, first_token=8.1, tpot_slo=0.05)
                 for i in range(4)]
        return seqs

    ctl = Controller(TaperConfig(policy="taper", margin=0.0))
    now = 10.0
    t_mand = Controller(TaperConfig(policy="off")).decide(StepView.from_seqs(make(9.0), now))
    per_extra = ctl.predictor.unit_costs[1] + ctl.predictor.unit_costs[2] * 100
    # Slack = next deadline - now = first_token + 5 * tpot - now; leave room for 2.5 extras.
    slack = t_mand.predicted + 2.5 * per_extra
    view = StepView.from_seqs(make(now + slack - 5 * 0.01), now)
    d = ctl.decide(view)
    extras = sorted(view.ids[i] for i in d.keep if view.ids[i] not in ("serial", "a0", "b0"))
    assert extras == ["b2", "b3"]
