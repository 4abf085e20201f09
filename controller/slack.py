"""Slack accounting: how much time the latency-critical requests have in hand.

A latency-critical request i (an ordinary request or a serial stage) has a
token deadline schedule. Its first token is due at

    d_i(1) = a_i + TTFT_i

and, once the first token came at f_i, token k >= 2 is due at

    d_i(k) = f_i + (k - 1) * TPOT_i

so meeting every deadline means meeting the TTFT SLO and a mean TPOT of at
most TPOT_i. With n_i tokens generated the next token is k = n_i + 1, and the
request's slack at time t is

    s_i(t) = min(d_i(n_i + 1) - t,  B * TPOT_i)          [seconds]

A request that runs ahead of schedule accumulates slack, but at most B TPOTs
of it (`max_banked_tokens`), so that one long step cannot spend a whole
request's savings and wreck its inter-token latency.

The step budget is what the tightest request can give, less a safety margin
and the engine's time between steps:

    budget = (1 - margin) * min_i s_i(now) - gap        [seconds]

and +inf when no latency-critical request is running.
"""

from __future__ import annotations

import math

import numpy as np

from controller.view import StepView


def request_slack(view: StepView, max_banked_tokens: float) -> np.ndarray:
    """Slack s_i(now) in seconds of every latency-critical sequence in the view
    (in view order, latency-critical ones only)."""
    c = view.critical
    first = view.first_token[c]
    tpot = view.tpot_slo[c]
    started = ~np.isnan(first)
    deadline = np.where(
        started,
        first + view.generated[c] * tpot,
        view.arrival[c] + view.ttft_slo[c],
    )
    return np.minimum(deadline - view.now, max_banked_tokens * tpot)


def step_budget(view: StepView, margin: float, max_banked_tokens: float, gap: float) -> float:
    """Seconds the next decode step may take before the tightest latency-critical
    request misses its next deadline (see the module docstring)."""
    if not view.critical.any():
        return math.inf
    slack = request_slack(view, max_banked_tokens)
    return (1.0 - margin) * float(slack.min()) - gap
