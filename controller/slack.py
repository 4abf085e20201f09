"""Slack accounting: how much time the latency-critical requests have in hand.

A latency-critical request i (an ordinary request or a serial stage) with SLOs
TTFT_i and TPOT_i is held to a tightened schedule, m = `margin`:

    d_i(1) = a_i + (1 - m) * TTFT_i                 first token, a_i its arrival
    d_i(k) = f_i + (k - 1) * (1 - m) * TPOT_i       token k >= 2, f_i its first-token time

Meeting every deadline means meeting the TTFT SLO and a mean TPOT of at most
(1 - m) * TPOT_i. The margin sits in the schedule, not in the per-step budget,
on purpose: a controller that spends whatever slack it is given settles at a
step time equal to the schedule's pace, so only a tightened pace leaves room
for prediction error in the mean. With n_i tokens generated the next token is
k = n_i + 1 and the request's slack at time t is

    s_i(t) = min(d_i(n_i + 1) - t,  B * (1 - m) * TPOT_i)        [seconds]

A request that runs ahead of schedule banks slack, at most B paces of it
(`max_banked_tokens`), so one long step cannot spend a request's savings and
wreck its inter-token latency. The step budget is what the tightest request can
give, less the engine's time between steps:

    budget = min_i s_i(now) - gap        [seconds]

and +inf when no latency-critical request is running or queued.

A latency-critical request j still waiting for its prefill (queued) gets its
first token only after this step, the engine's gap and the prefill, T_p
seconds (predicted), so it has

    q_j(t) = a_j + (1 - m) * TTFT_j - t - T_p                    [seconds]

in hand, and the budget is the least of the s_i and q_j, less the gap.
"""

from __future__ import annotations

import math

import numpy as np

from controller.composition import Composition
from controller.view import StepView


def request_slack(view: StepView, margin: float, max_banked_tokens: float) -> np.ndarray:
    """Slack s_i(now) in seconds of each latency-critical sequence in the view
    (in view order, latency-critical ones only)."""
    c = view.critical
    first = view.first_token[c]
    pace = (1.0 - margin) * view.tpot_slo[c]
    started = ~np.isnan(first)
    deadline = np.where(
        started,
        first + view.generated[c] * pace,
        view.arrival[c] + (1.0 - margin) * view.ttft_slo[c],
    )
    return np.minimum(deadline - view.now, max_banked_tokens * pace)


def queued_slack(view: StepView, margin: float, t_prefill: float) -> float:
    """min_j q_j(now) in seconds over the queued latency-critical requests (see
    the module docstring), +inf when none is queued. `t_prefill`: seconds the
    prefill waiting behind this step takes."""
    q = view.queued
    if q is None or not len(q.arrival):
        return math.inf
    due = q.arrival + (1.0 - margin) * q.ttft_slo
    return float(due.min()) - view.now - t_prefill


def step_budget(view: StepView, margin: float, max_banked_tokens: float, gap: float,
                t_prefill: float = 0.0, comp: Composition | None = None) -> float:
    """Seconds the next decode step may take before the tightest latency-critical
    request, running or queued, misses its next (tightened) deadline; see the
    module docstring. `t_prefill`: seconds of the prefill queued behind the step.
    `comp`: the view's composition, built with the same margin and
    `max_banked_tokens`, if the caller has it (the same value, fewer operations)."""
    slack = queued_slack(view, margin, t_prefill)
    if comp is not None:
        # min_i min(d_i - now, B pace_i) = min(min_i d_i - now, min_i B pace_i),
        # bit for bit: rounding a difference or a product is monotone.
        if len(comp.crit):
            slack = min(slack, min(comp.least_deadline(view) - view.now, comp.banked))
    elif view.critical.any():
        slack = min(slack, float(request_slack(view, margin, max_banked_tokens).min()))
    return slack - gap
