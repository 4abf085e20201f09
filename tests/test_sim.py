"""The simulator: deterministic, drives the real controller, sane under each policy."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.metrics import SLOSpec, summarize
from bench.sim import cost as costs
from bench.sim.run import simulate, warm_start
from bench.workload import PRESETS, generate, with_slo

PROFILE = "bench/sim/profiles/h200_qwen3_32b_decode.json"


def workload(n: int = 80, rate: float = 1.0, seed: int = 1):
    progs = generate(replace(PRESETS["mixed"], num_programs=n, rate=rate, seed=seed,
                             width=(4, 16), branch_tokens=(128, 512), chat_tokens=(64, 256)))
    return with_slo(progs, 2.0, 0.03)


def test_same_seed_same_result():
    cost = costs.load("analytic:qwen3-32b@h200")
    a = summarize(simulate(workload(), cost, "taper")["records"], SLOSpec())
    b = summarize(simulate(workload(), cost, "taper")["records"], SLOSpec())
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.parametrize("policy", ["off", "eager", "cap:4", "taper", "clairvoyant"])
def test_every_program_completes_under_every_policy(policy):
    cost = costs.load(f"measured:{PROFILE}")
    progs = workload(40)
    recs = simulate(progs, cost, policy)["records"]
    assert len(recs) == 40 and not any(r.error for r in recs)
    for spec, r in zip(progs, recs):
        assert [s.kind for s in r.stages] == [s.kind for s in spec.stages]
        requests = sum(1 if s.kind == "serial" else s.width * (2 if s.kind == "tools" else 1)
                       for s in spec.stages)
        assert len(r.requests) == requests and r.end >= r.start
        for q, out_tokens in ((q, q.output_tokens) for q in r.requests):
            assert out_tokens >= 1 and q.first_token is not None
            assert len(q.token_times) == out_tokens


def test_off_is_one_branch_per_group_and_eager_is_wider():
    cost = costs.load("analytic:qwen3-32b@h200")
    off = simulate(workload(), cost, "off")["server"]
    eager = simulate(workload(), cost, "eager")["server"]
    assert eager["held_branch_steps"] == 0 and off["held_branch_steps"] > 0
    assert eager["mean_width"] > off["mean_width"]


def test_mean_width_counts_the_steps_with_branches_as_the_live_server():
    """One program alone under off: every step with a branch in it decodes one
    (its group's base); the serial stages' steps do not dilute the figure."""
    cost = costs.load(f"measured:{PROFILE}")
    server = simulate(workload(1), cost, "off")["server"]
    assert 0 < server["regulated_steps"] < server["decode_steps"]
    assert server["mean_width"] == 1.0


def test_taper_keeps_critical_tpot_and_beats_off_under_load():
    cost = costs.load(f"measured:{PROFILE}")
    res = {p: summarize(simulate(workload(120, rate=1.5), cost, p)["records"], SLOSpec())
           for p in ("off", "eager", "taper")}
    assert res["taper"]["chat_attainment"] >= 0.95
    assert res["taper"]["goodput"] > 1.5 * res["off"]["goodput"]
    assert res["taper"]["goodput"] >= res["eager"]["goodput"]


def test_cost_models_load_and_increase():
    for spec in ("analytic:qwen3-8b@h100", "analytic:qwen3-32b@h200", f"measured:{PROFILE}",
                 "linear:bench/sim/profiles/cpu_tiny_llama.json"):
        m = costs.load(spec)
        costs.check(m)
        assert m.decode(64, 64 * 4096) > m.decode(64, 64 * 512)
        # 64 branches sharing a 4000-token prefix, 96 tokens of their own each:
        # with cascade the prefix is read once (kv counts private tokens only).
        if not spec.startswith("linear"):
            assert m.decode(64, 64 * 96, 4000, cascade=True) < m.decode(64, 64 * 4096)
    with pytest.raises(ValueError, match="unknown cost model"):
        costs.load("bogus:thing")
    assert len(warm_start(costs.load("analytic:qwen3-32b@h200")).weights) == 5


def test_the_throughput_bound_is_above_what_a_policy_sustains():
    from bench.metrics import SLOSpec as Spec
    from bench.metrics import allowance
    from bench.sim.bound import max_rate_bound
    from bench.sim.engine import SimConfig
    from bench.sweep import SweepSpec, max_rate, sweep_one

    cost = costs.load(f"measured:{PROFILE}")
    # Enough programs that the work outweighs the longest allowance (else the
    # bound is infinite: a short run cannot bound the rate).
    progs = workload(500)
    spec = Spec()

    def probe(rate: float) -> dict:
        recs = simulate([replace(p, arrival=p.arrival / rate) for p in progs], cost,
                        "eager")["records"]
        return {"rate": rate, "summary": summarize(recs, spec)}

    best = max_rate(sweep_one(probe, SweepSpec(start=1.0)))["rate"]
    longest = max(allowance(p, spec) for p in progs)
    bound = max_rate_bound(progs, cost, SimConfig(kv_capacity=400_000), longest)
    assert best is not None and 0 < best < bound < float("inf")


@settings(max_examples=300, deadline=None)
@given(xs=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=12, unique=True),
       ys=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=12, max_size=12),
       x=st.floats(-2e6, 2e6, allow_nan=False))
def test_scalar_interp_is_np_interp_bit_for_bit(xs, ys, x):
    """The measured cost model's lookups skip np.interp's call overhead; the
    values must not move (the simulator's results are checked against a digest)."""
    import numpy as np

    xp = sorted(xs)
    fp = ys[: len(xp)]
    for at in (x, xp[0], xp[-1], xp[len(xp) // 2], (xp[0] + xp[-1]) / 2):
        assert costs.interp(at, xp, fp) == float(np.interp(at, xp, fp))
        assert costs.interp(at, xp, fp) == float(np.interp(at, np.array(xp), np.array(fp)))


def _base_and_twice_as_slow():
    """A linear cost model, the same twice as slow (gap included), 30 programs."""
    coeffs = dict(a=0.004, b=0.0003, c=4e-7, e=0.006, f=2e-5, g=0.001)
    return (costs.LinearCost(**coeffs, gap=0.001),
            costs.LinearCost(**{k: 2 * v for k, v in coeffs.items()}, gap=0.002), workload(30))


def _token_times(progs, cost, sim) -> list[float]:
    recs = simulate(progs, cost, "eager", sim=sim)["records"]
    return [t for r in recs for q in r.requests for t in q.token_times]


def test_a_host_speed_factor_scales_every_step_and_gap():
    """SimConfig.speed (fidelity's replay of a live host's speed): a factor 2
    throughout is the same run as a cost model twice as slow, gap included;
    a factor that starts later slows only what comes after it."""
    import math

    from bench.sim.engine import SimConfig

    base, slow, progs = _base_and_twice_as_slow()

    def ends(cost, speed=None):
        return _token_times(progs, cost, SimConfig(speed=speed))

    doubled = ends(base, ((0.0,), (2.0,)))
    assert doubled == pytest.approx(ends(slow), rel=1e-9)
    plain = ends(base)
    later = ends(base, ((0.0, 20.0), (1.0, 3.0)))
    assert later != plain
    first_late = min(i for i, (x, y) in enumerate(zip(plain, later)) if not math.isclose(x, y))
    assert plain[first_late] > 20.0 - 0.1  # nothing before the factor changed moved
    for bad in (((), ()), ((0.0, 1.0), (1.0,)), ((1.0, 0.0), (1.0, 1.0)), ((0.0,), (0.0,))):
        with pytest.raises(ValueError, match="SimConfig.speed"):
            simulate(progs, base, "eager", sim=SimConfig(speed=bad))


def test_the_hooks_time_lands_on_decode_steps_with_a_branch_only():
    """SimConfig.hook_s (fidelity's TAPER hook time): each decode step with a
    branch in it waits that much longer; chat-only programs do not move."""
    from dataclasses import replace

    from bench.sim.engine import SimConfig, Simulator
    from bench.sim.run import make_controller

    cost = costs.LinearCost(a=0.004, b=0.0003, c=4e-7, e=0.006, f=2e-5, g=0.001, gap=0.001)
    progs = workload(30)
    chat = [replace(p, kind="chat", stages=p.stages[:1]) for p in progs
            if p.stages[0].kind == "serial"]

    def run(ps, hook):
        sim = Simulator(ps, cost, make_controller("eager", cost), SimConfig(hook_s=hook))
        recs = sim.run()
        return sim, [t for r in recs for q in r.requests for t in q.token_times]

    # one program with a fork, alone (eager holds nothing, nothing else arrives):
    # the same steps, its end later by exactly the hook of each regulated step
    forked = [replace(next(p for p in progs if any(st.kind == "parallel" for st in p.stages)),
                      arrival=0.0)]
    plain_sim, plain = run(forked, 0.0)
    hooked_sim, hooked = run(forked, 0.01)
    assert hooked_sim.steps == plain_sim.steps and hooked_sim.regulated_steps > 0
    assert max(hooked) - max(plain) == pytest.approx(0.01 * hooked_sim.regulated_steps,
                                                     rel=1e-9)
    assert run(chat, 0.01)[1] == run(chat, 0.0)[1]  # no branch, no hook


def test_a_load_slowdown_scales_steps_with_the_recent_tokens():
    """SimConfig.load (fidelity's bracket_load): alpha 2 with no slope is a cost
    model twice as slow; a slope slows a busy run more; bad triples refused."""
    from bench.sim.engine import SimConfig

    base, slow, progs = _base_and_twice_as_slow()

    def ends(cost, load=None):
        return _token_times(progs, cost, SimConfig(load=load))

    assert ends(base, (2.0, 0.0, 5.0)) == pytest.approx(ends(slow), rel=1e-9)
    assert ends(base, (1.0, 0.0, 5.0)) == ends(base)
    busy = ends(base, (1.0, 0.002, 5.0))
    assert max(busy) > max(ends(base))
    for bad in ((0.0, 0.0, 5.0), (1.0, -1.0, 5.0), (1.0, 0.0, 0.0)):
        with pytest.raises(ValueError, match="SimConfig.load"):
            simulate(progs, base, "eager", sim=SimConfig(load=bad))
    # the factor itself: alpha + slope x the tokens of the steps that ended in the
    # last window_s, over window_s; back to alpha after a longer idle stretch
    from bench.sim.engine import Simulator
    from bench.sim.run import make_controller

    sim = Simulator(progs, base, make_controller("eager", base),
                    SimConfig(load=(1.5, 0.01, 2.0)))
    sim.t = 10.0
    for end, n in ((7.5, 100), (8.5, 6), (9.9, 4)):  # the first ended before the window
        sim._window.append((end, n))
        sim._window_tokens += n
    assert sim._at_speed(1.0) == pytest.approx((1.5 + 0.01 * 10 / 2.0, base.gap * 1.55))
    sim.t = 20.0
    assert sim._at_speed(1.0, 0.5) == (1.5, 0.75)


def test_a_prefill_is_told_each_request_s_cached_times_new_tokens():
    """The engine passes the sum over a prefill's requests of cached x new
    tokens (a cost model pricing the new tokens' attention over the cache
    needs it per request: a mean over a mixed batch would not do)."""
    calls = []

    class Recording(costs.LinearCost):
        def prefill(self, tokens, reqs, context=0.0, cached_new=None):
            calls.append((tokens, reqs, context, cached_new))
            return super().prefill(tokens, reqs, context, cached_new)

    cost = Recording(a=0.004, b=0.0003, c=4e-7, e=0.006, f=2e-5, g=0.001, gap=0.001)
    simulate(workload(30), cost, "eager")
    calls = [c for c in calls if c[3] is not None]  # the engine's (priors ask without)
    assert calls and any(cn > 0 for *_, cn in calls)
    for tokens, reqs, context, cached_new in calls:
        assert 0 <= cached_new <= (context - tokens) * tokens
        if reqs == 1:
            assert cached_new == (context - tokens) * tokens
    fit = costs.CachedPrefill([{"reqs": r, "tokens": t, "cached": c, "prefill_s": 1.0,
                                "graph_s": 0.03 + r * c * (2e-7 + 5e-9 * t)}
                               for r, t in ((1, 8), (2, 64)) for c in (0, 1000, 4000)])
    # two requests over 1000 cached each, 8 and 120 new: their own products, not the mean
    assert fit(128, 2, 2128, 1000 * 8 + 1000 * 120) == pytest.approx(
        2000 * 2e-7 + 5e-9 * 128000)
    assert fit(128, 2, 2128) == pytest.approx(2000 * 2e-7 + 5e-9 * 2000 * 64)
