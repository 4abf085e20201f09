"""The controller: `decide(view)` before a decode step, `observe(result)` after.

One object serves the live SGLang hook and the simulator alike.
"""

from __future__ import annotations

import math
from itertools import repeat

import numpy as np

from controller import prefill as prefill_gate
from controller.config import TaperConfig
from controller.policies import Candidates, StepCost, make_policy
from controller.predictor import SCALE, StepTimeModel, StepTimePredictor, features, quantile
from controller.slack import step_budget
from controller.view import Decision, PrefillView, StepResult, StepView

_EMPTY = np.zeros(0, dtype=np.int64)


class Controller:
    """Per-step branch admission, and (taper) the prefill gate.

    decide() is a pure function of the controller's state and the view. State
    changes in observe() (the predictor's fit, the estimate of the engine's time
    between steps, how many steps in a row each held branch has waited), in
    observe_prefill() (the prefill fit) and in admit_prefill() (whether a
    prefill is being deferred, which keeps decide() to the mandatory batch until
    the waiting queue empties or the prefill is admitted).
    """

    def __init__(self, config: TaperConfig | None = None, model: StepTimeModel | None = None,
                 cost: StepCost | None = None) -> None:
        """`model`: the predictor's warm start (otherwise `config.profile`, or the
        default prior). `cost`: the true step-time model, for the policies that
        need one (the simulator's `clairvoyant`)."""
        self.config = config or TaperConfig()
        spec = self.config.spec
        entry = spec.entry
        self.policy_name = str(spec)
        self._policy = make_policy(spec, cost)
        self._order = entry.order
        self._promote_starved = entry.starvation
        # seconds per TPOT second: laxity under urgent * TPOT promotes a branch
        self._urgent = (self.config.urgent_paces * (1.0 - self.config.margin)
                        if entry.urgency else 0.0)
        if model is None and self.config.profile:
            model = StepTimeModel.load(self.config.profile)
        c = self.config
        fit = dict(forgetting=c.forgetting, upper_quantile=c.upper_quantile,
                   residual_window=c.residual_window, prior_weight=c.prior_weight,
                   weight_floor=c.weight_floor, outlier_factor=c.outlier_factor,
                   row_tile=c.row_tile)
        self.predictor = StepTimePredictor(model, **fit)
        # Prefill steps, fitted on their own (intercept and prefill tokens excited).
        self.prefill_predictor = StepTimePredictor(model, **fit)
        self._prefill_gate = entry.prefill_gate and self.config.prefill_gate
        self._deferring = False  # a prefill is being deferred: decode the mandatory only
        self._held_since: dict[str, int] = {}  # id -> observed step its run of holds began
        self._observed = 0  # steps observed (numbers the steps for _held_since)
        self._starved: frozenset[str] = frozenset()  # held >= max_hold_steps
        self._last_end: float | None = None  # seconds, end of the last observed step
        self._gaps = np.zeros(64)  # seconds between a step's end and the next decision
        self._n_gaps = 0
        self.gap = 0.0  # seconds, recent 90th percentile of those gaps

    # ------------------------------------------------------------------ decide

    def decide(self, view: StepView) -> Decision:
        """Choose which sequences of `view` decode in the next step."""
        n = len(view)
        if n == 0:
            return Decision(_EMPTY, _EMPTY, 0, math.inf, 0.0, 0.0, np.zeros(len(SCALE)), ())
        g = view.group
        mandatory, order, head = self._mandatory(view)
        extras = (~mandatory).nonzero()[0]
        lax = None
        if len(extras) and self._order != "none":
            lax = self._laxity(view, order, head, extras)
            if self._urgent:  # deadline-critical branches run whatever the budget
                urgent = lax < self._urgent * view.tpot_slo[extras]
                if urgent.any():
                    mandatory[extras[urgent]] = True
                    extras, lax = extras[~urgent], lax[~urgent]
        cascade = self.config.cascade
        kv = view.kv_len
        x_mand = self._features(view, mandatory)
        kv_m = kv[mandatory]
        t_mand = self.predictor.batch_time(x_mand)
        slack = step_budget(view, self.config.margin, self.config.max_banked_tokens, self.gap,
                            self._prefill_time(view.queued.tokens) if view.queued else 0.0)
        budget = slack - t_mand - self.predictor.upper_margin
        if self._deferring:  # a deferred prefill waits for the critical requests' cushion
            if view.waiting:
                budget = min(budget, 0.0)
            else:
                self._deferring = False

        if len(extras):
            if self._order != "none":
                if self._order == "group":  # cap: groups contiguous, least laxity first
                    pri = np.lexsort((view.branch[extras], lax, g[extras]))
                else:
                    pri = np.lexsort((view.branch[extras], g[extras], lax))
                extras = extras[pri]
            ext_g = g[extras]
            own = kv[extras] - view.shared_len[extras] if cascade else kv[extras]
            costs = self.predictor.extra_costs(len(kv_m), own)
            if self._order == "group":
                rank = self._run_rank(ext_g)
                counts = self._mandatory_counts(g[order], head, mandatory[order], ext_g)
            else:
                rank, counts = _EMPTY, _EMPTY
            admit = self._policy(Candidates(extras, ext_g, rank, counts, costs, budget,
                                            len(kv_m), x_mand[2], own, slack))
            admitted = extras[admit]
            externality = float(costs[admit].sum())
            mandatory[admitted] = True
            kept_extra_kv = float(own[admit].sum())
        else:
            externality, kept_extra_kv, admitted = 0.0, 0.0, _EMPTY
        keep = mandatory.nonzero()[0]
        held = (~mandatory).nonzero()[0]
        x = x_mand.copy()
        x[1] += len(admitted)
        x[2] += kept_extra_kv
        return Decision(
            keep=keep,
            held=held,
            mandatory=len(kv_m),
            budget=budget,
            externality=externality,
            predicted=t_mand + externality,
            features=x / SCALE,
            ids=view.ids,
        )

    def _mandatory(self, view: StepView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sequences that run whatever the budget (ordinary, critical, pinned,
        each group's base branch, starved ones), as a mask; with the group-sorted
        order of the view and the first position of each group in it."""
        n, g = len(view), view.group
        order = np.lexsort((view.branch, g))  # by group, then branch index
        gs = g[order]
        head = np.empty(n, dtype=bool)
        head[0] = True
        np.not_equal(gs[1:], gs[:-1], out=head[1:])
        mandatory = (g < 0) | view.critical
        if view.pinned is not None:
            mandatory |= view.pinned
        mandatory[order[head]] = True  # each group's base branch: its lowest index
        if self._starved:
            mandatory |= np.fromiter((s in self._starved for s in view.ids), bool, n)
        return mandatory, order, head

    def _features(self, view: StepView, kept: np.ndarray) -> np.ndarray:
        """Unscaled predictor features of the batch of `kept` (a mask)."""
        kv_k = view.kv_len[kept]
        if self.config.cascade:
            sh = view.shared_len[kept]
            kv, prefix = float((kv_k - sh).sum()), float(self._group_prefix(view.group[kept], sh))
        else:
            kv, prefix = float(kv_k.sum()), 0.0
        return np.array([1.0, len(kv_k), kv, view.prefill_tokens, prefix])

    @property
    def gates_prefill(self) -> bool:
        """Whether this policy ever defers a prefill (engines may skip asking)."""
        return self._prefill_gate

    def admit_prefill(self, view: StepView, prefill: PrefillView) -> bool:
        """Before a prefill step: True to run it now, False to decode `view`'s
        sequences first (see controller.prefill). Only for policies whose entry
        gates prefills; the others always say True."""
        if not (self._prefill_gate and len(view) and view.critical.any()):
            self._deferring = False
            return True
        t_prefill = self._prefill_time(prefill.tokens)
        # What each decode step takes while the prefill waits: the mandatory batch.
        t_mand = self.predictor.batch_time(self._features(view, self._mandatory(view)[0]))
        self._deferring = prefill_gate.defer(view, prefill, self.config.margin, t_prefill,
                                             t_mand + self.gap)
        return not self._deferring

    def _prefill_time(self, tokens: int) -> float:
        """Seconds a prefill step of `tokens` tokens takes (upper bound)."""
        p = self.prefill_predictor
        return p.predict(features(0, 0, tokens)) + p.upper_margin

    def observe_prefill(self, tokens: int, seconds: float, disturbed: bool = False) -> None:
        """Learn from a finished prefill step of `tokens` tokens (`disturbed`: it
        spanned a pause or a control request, so it is counted, not learnt)."""
        self.prefill_predictor.update(features(0, 0, tokens), seconds, disturbed)

    def _laxity(self, view: StepView, order: np.ndarray, head: np.ndarray,
                extras: np.ndarray) -> np.ndarray:
        """Seconds each extra branch has in hand before its stage's deadline.

        A branch group's stage is due at  D = a + TTFT + (L - 1) * TPOT * stretch
        (a: the group's earliest arrival, L: the largest max_new_tokens among its
        running members, stretch: `branch_stretch`), and a branch with r tokens
        still to generate needs about r steps at the (1 - margin) * TPOT pace:

            laxity = D - now - r * (1 - margin) * TPOT        [seconds]

        Sequences that report no max_new_tokens (0) count as having none left.
        """
        run_of = np.cumsum(head) - 1  # position in `order` -> group run index
        where = np.empty(len(order), dtype=np.int64)
        where[order] = run_of
        starts = head.nonzero()[0]
        lmax = np.maximum.reduceat(view.max_new[order], starts)
        first = np.minimum.reduceat(view.arrival[order], starts)
        gi = where[extras]
        tpot = view.tpot_slo[extras]
        due = (first[gi] + view.ttft_slo[extras]
               + np.maximum(lmax[gi] - 1, 0) * tpot * self.config.branch_stretch)
        remaining = np.maximum(view.max_new[extras] - view.generated[extras], 0)
        return due - view.now - remaining * (1.0 - self.config.margin) * tpot

    @staticmethod
    def _run_rank(ext_g: np.ndarray) -> np.ndarray:
        """Rank of each extra within its run of equal group codes (groups contiguous)."""
        m = len(ext_g)
        start = np.empty(m, dtype=bool)
        start[0] = True
        np.not_equal(ext_g[1:], ext_g[:-1], out=start[1:])
        idx = np.arange(m)
        return idx - np.maximum.accumulate(np.where(start, idx, 0))

    def passthrough(self, n_seqs: int, kv_tokens: int) -> Decision:
        """A decision that runs a whole batch the controller was not asked about
        (no branches in it), so that observe() still learns from the step."""
        keep = np.arange(n_seqs, dtype=np.int64)
        x = np.array([1.0, n_seqs, kv_tokens, 0.0, 0.0])
        # No prediction (NaN): reading the weights would re-solve the fit every step.
        return Decision(keep, _EMPTY, n_seqs, math.inf, 0.0, math.nan, x / SCALE, ())

    @staticmethod
    def _group_prefix(groups: np.ndarray, shared: np.ndarray) -> int:
        """Shared-prefix tokens read once per group present (cascade attention)."""
        in_group = groups >= 0
        if not in_group.any():
            return 0
        gg, sh = groups[in_group], shared[in_group]
        o = np.lexsort((-sh, gg))
        first = np.ones(len(o), dtype=bool)
        first[1:] = gg[o][1:] != gg[o][:-1]
        return int(sh[o][first].sum())

    @staticmethod
    def _mandatory_counts(
        gs: np.ndarray, head: np.ndarray, mand_sorted: np.ndarray, ext_g: np.ndarray
    ) -> np.ndarray:
        """For each extra, how many mandatory members its group has in the view.
        `gs`, `head`, `mand_sorted`: group codes, run starts and the mandatory
        mask in group-sorted order."""
        starts = head.nonzero()[0]
        per_group = np.add.reduceat(mand_sorted.astype(np.int64), starts)
        return per_group[np.searchsorted(gs[starts], ext_g)]

    # ----------------------------------------------------------------- observe

    def observe(self, result: StepResult) -> None:
        """Learn from a finished step: refit the predictor, track held branches."""
        d = result.decision
        if len(d.keep):
            self.predictor.update(d.features, result.step_time, result.disturbed)
        self._end_step(result.end - result.step_time, result.end)
        if not self._promote_starved:  # the baselines never promote: nothing to count
            return
        # Each held id keeps the observed-step number its current run of holds began
        # (map/zip: the per-step cost stays in C for hundreds of held branches).
        step = self._observed
        self._observed += 1
        held = d.held_ids()
        since = self._held_since = dict(zip(held, map(self._held_since.get, held,
                                                      repeat(step))))
        first = step - self.config.max_hold_steps + 1  # held since then or earlier: starved
        self._starved = (frozenset(s for s, k in since.items() if k <= first)
                         if since and min(since.values()) <= first else frozenset())

    def _end_step(self, start: float, end: float) -> None:
        if self._last_end is not None:
            self._gaps[self._n_gaps % len(self._gaps)] = max(0.0, start - self._last_end)
            self._n_gaps += 1
            if self._n_gaps <= 16 or self._n_gaps % 8 == 0:
                filled = self._gaps[: min(self._n_gaps, len(self._gaps))]
                self.gap = quantile(filled, 0.9)
        self._last_end = end

    def held_steps(self, sid: str) -> int:
        """Consecutive steps `sid` has been held as of the last observed step
        (counted for the policies that promote starved branches)."""
        since = self._held_since.get(sid)
        return 0 if since is None else self._observed - since
