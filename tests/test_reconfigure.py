"""Run-time control without a server: `TaperConfig.merged` (the JSON patch of
POST /taper/config), `Controller.reconfigure` (the fit survives, the new policy
decides as a fresh controller would), the endpoint's auth level, and the
simulator's --help."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from controller import Controller, Seq, TaperConfig
from tests.scripted import Script


@pytest.mark.parametrize("changes, needle", [
    ({"margin": 1.5}, "TaperConfig.margin must be in [0, 1), got 1.5"),
    ({"margin": "0.2"}, "TaperConfig.margin needs a float, got '0.2'"),
    ({"max_hold_steps": 2.5}, "TaperConfig.max_hold_steps needs a int"),
    ({"enabled": 0}, "TaperConfig.enabled needs a bool, got 0"),
    ({"prefill_gate": "off"}, "TaperConfig.prefill_gate needs a bool, got 'off'"),
    ({"margin": True}, "TaperConfig.margin needs a float, got True"),
    ({"policy": None}, "TaperConfig.policy needs a str, got None"),
    ({"policy": "bogus"}, "unknown policy 'bogus'"),
    ({"no_such": 1}, "TaperConfig has no field 'no_such'"),
])
def test_a_bad_change_is_one_line_naming_the_field(changes, needle):
    with pytest.raises(ValueError) as err:
        TaperConfig().merged(changes)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_change_types_its_values_and_keeps_the_rest():
    base = TaperConfig(policy="off", margin=0.3)
    new = base.merged({"policy": "cap:4", "default_tpot_slo": 1, "enabled": False,
                       "profile": None})
    assert new.policy == "cap:4" and new.spec.arg == 4 and new.enabled is False
    assert new.default_tpot_slo == 1.0 and isinstance(new.default_tpot_slo, float)
    assert new.margin == 0.3 and base.merged({}) == base


def step_model(n: int, kv: int) -> float:
    return 2.0e-3 + 2.0e-4 * n + 1.0e-8 * kv


def scenario(seed: int) -> Script:
    """A critical request with a tight TPOT beside a group of 12 branches."""
    seqs = [Seq("serial", kv_len=300, generated=1, first_token=0.0, tpot_slo=3.5e-3)]
    seqs += [Seq(f"b{i}", group=0, branch=i, width=12, kv_len=300, shared_len=280,
                 generated=1, first_token=0.0) for i in range(12)]
    target = {"serial": 80, **{f"b{i}": 120 for i in range(12)}}
    return Script(seqs, target, step_model, noise=0.05, seed=seed)


def test_a_policy_change_keeps_the_fit():
    ctl = Controller(TaperConfig(policy="off"))
    scenario(0).run(ctl)
    pred, prefill = ctl.predictor, ctl.prefill_predictor
    observed, weights, margin, gap = pred.observed, pred.w.copy(), pred.upper_margin, ctl.gap
    assert observed > 100
    ctl.reconfigure(TaperConfig(policy="taper", margin=0.2))
    assert ctl.predictor is pred and ctl.prefill_predictor is prefill
    assert pred.observed == observed and np.array_equal(pred.w, weights)
    assert pred.upper_margin == margin and ctl.gap == gap
    assert ctl.policy_name == "taper" and ctl.config.margin == 0.2


def test_after_a_change_it_decides_as_a_fresh_controller_with_that_fit():
    """`off` then POST {"policy": "taper"} regulates as a server started with
    `taper` that had learnt the same fit: step for step the same decisions."""
    ctl = Controller(TaperConfig(policy="off"))
    scenario(0).run(ctl)
    fresh = Controller(TaperConfig(policy="taper"))
    fresh.predictor = copy.deepcopy(ctl.predictor)
    fresh.prefill_predictor = copy.deepcopy(ctl.prefill_predictor)
    fresh._gaps, fresh._n_gaps, fresh.gap = ctl._gaps.copy(), ctl._n_gaps, ctl.gap
    ctl.reconfigure(TaperConfig(policy="taper"))
    switched, started = scenario(1), scenario(1)
    switched.run(ctl)
    started.run(fresh)
    assert switched.widths == started.widths
    assert switched.token_times == started.token_times
    assert any(0 < w.get(0, 0) < 12 for w in started.widths)  # taper did regulate here


def test_retuning_the_fit_keeps_what_it_learnt():
    ctl = Controller(TaperConfig(policy="taper"))
    scenario(0).run(ctl)
    pred = ctl.predictor
    observed = pred.observed
    recent = pred._resid[: pred._n_resid] if pred._n_resid <= len(pred._resid) else np.roll(
        pred._resid, -(pred._n_resid % len(pred._resid)))
    ctl.reconfigure(TaperConfig(policy="taper", residual_window=16, forgetting=0.99,
                                weight_floor=0.5))
    assert ctl.predictor is pred and pred.observed == observed
    assert np.array_equal(pred._resid, recent[-16:]) and pred.lam == 0.99
    assert pred.upper_margin >= 0 and np.isfinite(pred.w).all()
    scenario(1).run(ctl)  # and it keeps learning
    assert pred.observed > observed


def test_posting_a_change_is_an_admin_action():
    """SGLang's middleware reads the endpoint's level: POST /taper/config is
    ADMIN_OPTIONAL like /set_internal_state (the admin key when set, else the API
    key), GET an ordinary endpoint (the API key when set)."""
    from sglang.srt.utils.auth import AuthLevel, decide_request_auth

    from sglang_taper.adapter import control

    assert control.post_config._auth_level == AuthLevel.ADMIN_OPTIONAL
    assert getattr(control.get_config, "_auth_level", AuthLevel.NORMAL) == AuthLevel.NORMAL

    def allowed(key, api_key=None, admin=None):
        return decide_request_auth(method="POST", path=control.PATH,
                                   authorization_header=key and f"Bearer {key}",
                                   api_key=api_key, admin_api_key=admin,
                                   auth_level=AuthLevel.ADMIN_OPTIONAL).allowed

    assert allowed(None)  # no keys configured
    assert not allowed(None, api_key="k") and allowed("k", api_key="k")
    assert not allowed("k", api_key="k", admin="a") and allowed("a", api_key="k", admin="a")


def test_sim_help_names_the_simulators_policies(capsys):
    from bench.sim.cli import DEFAULT_SIM_POLICIES, main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"(default {DEFAULT_SIM_POLICIES})" in text
    assert "clairvoyant" in DEFAULT_SIM_POLICIES
