"""What a decision needs of the batch's make-up, computed once per make-up.

The engines rebuild the `StepView` before every decode step, but the running
set changes only when a sequence joins or leaves it. Between such changes the
group structure (each group's base branch, its largest max_new_tokens and
earliest arrival) and what the decision derives from the sequences' fixed
fields alone (the stage deadlines behind the laxity, the latency-critical
sequences' paces) stay the same. A `Composition` holds them; the controller
reuses the last one while the view's fixed columns (`key`) are equal, byte for
byte, to those it was built from, whatever the ids: a column changed under the
same ids builds a new one.

Every value here is computed by the same elementwise operations as it would be
per step, so a decision is the same bit for bit with or without reuse.
"""

from __future__ import annotations

import numpy as np

from controller.view import StepView


def group_order(view: StepView) -> np.ndarray:
    """View indices by group, then branch index, then view index: np.lexsort((branch,
    group)), as one stable sort of a combined key when that is faster (a few
    hundred sequences and up; group >= -1 and branch >= 0 make it order-preserving)."""
    g, b = view.group, view.branch
    if len(g) >= 512:
        lo, hi = np.minimum.reduce, np.maximum.reduce  # (ndarray.min's, less a wrapper)
        span = int(hi(b)) + 1
        if lo(b) >= 0 and lo(g) >= -1 and int(hi(g)) < (1 << 62) // span:
            return (g * span + b).argsort(kind="stable")
    return np.lexsort((b, g))


def base_branches(view: StepView, by_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sequences that run whatever the budget before the dynamic rules
    (ordinary, latency-critical, each group's base branch: its lowest index), as
    a mask; and, in `by_group` order (group_order), whether each is its group's
    first."""
    gs = view.group[by_group]
    head = np.empty(len(gs), dtype=bool)
    head[0] = True
    np.not_equal(gs[1:], gs[:-1], out=head[1:])
    base = (view.group < 0) | view.critical
    base[by_group[head]] = True
    return base, head


def key(view: StepView, order: str = "global") -> tuple[bytes, ...]:
    """The fixed columns a `Composition` for a policy of `order` is built from, as
    bytes (with "none", not those of the extras' deadlines)."""
    k = (view.group.tobytes(), view.branch.tobytes(), view.critical.tobytes(),
         view.tpot_slo.tobytes())
    if order == "none":
        return k
    return k + (view.max_new.tobytes(), view.arrival.tobytes(), view.ttft_slo.tobytes())


class Composition:
    """The per-make-up structure of a view (see the module docstring).

    `extras` are the static extras: sequences that are neither ordinary,
    latency-critical nor a group's base branch; per step the controller drops
    those that the dynamic rules (pinned, starved, urgent) make mandatory.
    `order` is the policy entry's ("none", "global", "group"): with "none" the
    extras are in view order; otherwise in (group, branch, view index) order,
    the priority sorts' start, and what the laxity needs of them (`deadlines`)
    and cap's ranks (`ranks`) are computed when first asked for: most steps
    under load need neither (no budget, no order).
    """

    __slots__ = ("key", "order", "head", "base", "extras", "_optional", "_stretch",
                 "due", "tpot", "max_new", "rank", "counts", "_gi", "_starts", "crit", "pace",
                 "banked", "margin")

    def __init__(self, view: StepView, k: tuple[bytes, ...], order: str, margin: float,
                 stretch: float, max_banked_tokens: float) -> None:
        self.key, self.margin, self._stretch = k, margin, stretch
        self.order = group_order(view)
        base, self.head = base_branches(view, self.order)
        self.base = base
        if order == "none":
            self.extras = (~base).nonzero()[0]
        else:
            self._optional = optional = ~base[self.order]
            self.extras = self.order[optional]
        self.due = self.rank = self._gi = self._starts = None
        # Slack (controller.slack), of the latency-critical sequences.
        self.crit = c = view.critical.nonzero()[0]
        self.pace = pace = (1.0 - margin) * view.tpot_slo[c]
        # min_i min(d_i - now, B pace_i) = min(min_i d_i - now, min_i B pace_i), bit
        # for bit (rounding is monotone): per step only the least deadline is new.
        self.banked = float((max_banked_tokens * pace).min()) if len(c) else np.inf

    def _group_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Where each group's run starts in group order, and each extra's group
        run: its group's index in group order (ascending: extras are in group
        order)."""
        if self._gi is None:
            self._starts = self.head.nonzero()[0]
            self._gi = (self.head.cumsum() - 1)[self._optional]
        return self._starts, self._gi

    def deadlines(self, view: StepView) -> None:
        """The extras' stage deadlines `due` (Controller._laxity), TPOT SLOs and
        max_new_tokens, in `extras` order; `view`: one of this make-up."""
        if self.due is not None:
            return
        by_group, ext = self.order, self.extras
        starts, gi = self._group_runs()
        lmax = np.maximum.reduceat(view.max_new[by_group], starts)
        first = np.minimum.reduceat(view.arrival[by_group], starts)
        self.tpot = tpot = view.tpot_slo[ext]
        self.max_new = view.max_new[ext]
        self.due = (first[gi] + view.ttft_slo[ext]
                    + np.maximum(lmax[gi] - 1, 0) * tpot * self._stretch)

    def ranks(self) -> None:
        """cap's inputs, in `extras` order: each extra's `rank` among its group's
        extras and its group's mandatory members (`counts`)."""
        if self.rank is not None:
            return
        starts, gi = self._group_runs()
        # an extra's rank: its index less its run's first (gi ascending)
        self.rank = np.arange(len(gi)) - gi.searchsorted(gi)
        self.counts = np.add.reduceat((~self._optional).astype(np.int64), starts)[gi]

    def least_deadline(self, view: StepView) -> float:
        """min_i d_i(n_i + 1), seconds, over the latency-critical sequences (see
        controller.slack); +inf when there are none."""
        c = self.crit
        if not len(c):
            return np.inf
        first = view.first_token[c]
        d = first + view.generated[c] * self.pace
        least = np.minimum.reduce(d)
        if least != least:  # NaN: some have no first token; theirs is due at TTFT
            alt = view.arrival[c] + (1.0 - self.margin) * view.ttft_slo[c]
            least = np.where(np.isnan(first), alt, d).min()
        return float(least)
