"""The prefill gate: the externality of a prefill step on running critical requests.

A prefill step stalls every decoding sequence for its whole duration T_p (the
engine runs prefill and decode steps one after the other). Extra branches are
not the only thing that inflates a latency-critical request's inter-token
time: a long prompt arriving while a short serial request decodes can cost it
its TPOT SLO on its own, whatever the decode policy does.

A critical request i decoding toward N_i tokens (N_i its max_new_tokens, n_i
generated, first token at f_i) meets its tightened mean pace iff it finishes
by D_i = f_i + (N_i - 1) (1 - m) TPOT_i. Its remaining r_i = N_i - n_i tokens
take at least r_i steps of the mandatory batch, T_min each (predicted, plus the
engine's gap), so the stall it can still absorb, its cushion, is

    c_i = D_i - now - r_i T_min                                [seconds]

The gate defers a prefill while some critical request has 0 < c_i < T_p: the
stall would make it miss an SLO it can still meet. While deferring, the decode
steps run the mandatory batch only, so each step grows c_i by about
(1 - m) TPOT_i - T_min, until the prefill fits, the request finishes, or a
waiting critical request's first token is due: a prefill is never deferred
past  a_j + (1 - m) TTFT_j - T_p - T_min  for a waiting critical request j
(a_j its arrival). A request with c_i <= 0 cannot be saved by waiting (it will
miss anyway), and one with no known length (N_i = 0) is not protected.
"""

from __future__ import annotations

import numpy as np

from controller.view import PrefillView, StepView


def cushions(view: StepView, margin: float, step: float) -> np.ndarray:
    """c_i in seconds of each running critical request of known length (see the
    module docstring); `step`: seconds one mandatory decode step takes."""
    c = view.critical & (view.max_new > 0) & ~np.isnan(view.first_token)
    n_final = view.max_new[c]
    pace = (1.0 - margin) * view.tpot_slo[c]
    due = view.first_token[c] + (n_final - 1) * pace
    remaining = np.maximum(n_final - view.generated[c], 0)
    return due - view.now - remaining * step


def must_run(prefill: PrefillView, margin: float, now: float, t_prefill: float,
             step: float) -> bool:
    """Would a waiting critical request miss its (tightened) TTFT if the prefill
    waited one more decode step?"""
    if not len(prefill.arrival):
        return False
    due = prefill.arrival + (1.0 - margin) * prefill.ttft_slo
    return float(due.min()) - now - t_prefill - step < 0.0


def defer(view: StepView, prefill: PrefillView, margin: float, t_prefill: float,
          step: float) -> bool:
    """Should the engine decode instead of running this prefill now?"""
    if must_run(prefill, margin, view.now, t_prefill, step):
        return False
    c = cushions(view, margin, step)
    return bool(((c > 0.0) & (c < t_prefill)).any())
