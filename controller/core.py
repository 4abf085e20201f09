"""The controller: `decide(view)` before a decode step, `observe(result)` after.

One object serves the live SGLang hook and the simulator alike.
"""

from __future__ import annotations

import math

import numpy as np

from controller import prefill as prefill_gate
from controller.cascade_gate import CascadeGate
from controller.composition import Composition, base_branches, group_order
from controller.composition import key as composition_key
from controller.config import TaperConfig
from controller.holds import HoldRuns
from controller.policies import Candidates, StepCost, make_policy
from controller.predictor import SCALE, StepTimeModel, StepTimePredictor, features, quantile
from controller.slack import step_budget
from controller.view import Decision, PrefillView, StepResult, StepView

_EMPTY = np.zeros(0, dtype=np.int64)
UNSEEN_BATCH = 64  # passthrough steps learnt from in one go (Controller.observe_passthrough)


def _fit_settings(c: TaperConfig) -> dict:
    """The step-time predictors' settings in a config."""
    return dict(forgetting=c.forgetting, upper_quantile=c.upper_quantile,
                residual_window=c.residual_window, prior_weight=c.prior_weight,
                weight_floor=c.weight_floor, outlier_factor=c.outlier_factor,
                row_tile=c.row_tile)


class Controller:
    """Per-step branch admission, and (taper) the prefill gate.

    decide() is a function of the controller's state and the view (it keeps the
    view's make-up for the next one, a cache: controller/composition.py, and
    first learns from the steps observe_passthrough kept). State changes in
    observe() and observe_passthrough() (the predictor's fit, the estimate of the
    engine's time between steps, how many steps in a row each held branch has
    waited), in
    observe_prefill() (the prefill fit) and in admit_prefill() (whether a
    prefill is being deferred, which keeps decide() to the mandatory batch until
    the waiting queue empties or the prefill is admitted).
    """

    def __init__(self, config: TaperConfig | None = None, model: StepTimeModel | None = None,
                 cost: StepCost | None = None, cascade_gate: CascadeGate | None = None) -> None:
        """`model`: the predictor's warm start (otherwise `config.profile`, or the
        default prior). `cost`: the true step-time model, for the policies that
        need one (the simulator's `clairvoyant`). `cascade_gate` (with
        `config.cascade`): the engine's rule for which groups take the two-level
        path, so that only theirs count as read once; None: every group in the
        batch does (the simulator's engine)."""
        config = config or TaperConfig()
        if model is None and config.profile:
            model = StepTimeModel.load(config.profile)
        fit = _fit_settings(config)
        self.predictor = StepTimePredictor(model, **fit)
        # Prefill steps, fitted on their own (intercept and prefill tokens excited).
        self.prefill_predictor = StepTimePredictor(model, **fit)
        self._cost = cost
        self._cascade_gate = cascade_gate
        self._gaps = np.zeros(64)  # seconds between a step's end and the next decision
        self._n_gaps = 0
        self.gap = 0.0  # seconds, recent 90th percentile of those gaps
        self._unseen: list[tuple] = []  # passthrough steps not learnt from yet
        self._apply(config)

    def _apply(self, config: TaperConfig) -> None:
        """Everything derived from the config, and the per-policy state, afresh."""
        self.config = config
        spec = config.spec
        entry = spec.entry
        self.policy_name = str(spec)
        self._policy = make_policy(spec, self._cost)
        self._order = entry.order
        self._prefix = entry.prefix
        self._promote_starved = entry.starvation
        # seconds per TPOT second: laxity under urgent * TPOT promotes a branch
        self._urgent = config.urgent_paces * (1.0 - config.margin) if entry.urgency else 0.0
        self._prefill_gate = entry.prefill_gate and config.prefill_gate
        self._deferring = False  # a prefill is being deferred: decode the mandatory only
        self._holds = HoldRuns(config.max_hold_steps)  # runs of holds, for starvation
        self._comp: Composition | None = None  # the last view's make-up (per config)
        self._last_end: float | None = None  # seconds, end of the last observed step

    def reconfigure(self, config: TaperConfig) -> None:
        """Take new settings between two steps. What was learnt stays: both
        predictors' fits (retuned in place if a fit setting changed) and the gap
        estimate. The policy's own state starts afresh, as in a new controller
        (runs of holds, a deferred prefill); so does the gap's reference step, so
        the time spent under the old settings (or switched off) is not a gap.
        `config.profile` is a warm start: a new one is not loaded."""
        self.flush()
        fit = _fit_settings(config)
        if fit != _fit_settings(self.config):
            self.predictor.tune(**fit)
            self.prefill_predictor.tune(**fit)
        self._apply(config)

    # ------------------------------------------------------------------ decide

    def decide(self, view: StepView) -> Decision:
        """Choose which sequences of `view` decode in the next step."""
        if not len(view):
            return Decision(_EMPTY, _EMPTY, 0, math.inf, 0.0, 0.0, np.zeros(len(SCALE)), ())
        if self._unseen:
            self.flush()
        mandatory, comp, dynamic = self._mandatory(view)
        extras, lax, part = self._optional(view, comp, mandatory, dynamic)
        x_mand = self._features(view, mandatory)
        n_mand = int(x_mand[1])
        t_mand = self.predictor.batch_time(x_mand)
        slack = step_budget(view, self.config.margin, self.config.max_banked_tokens, self.gap,
                            self._prefill_time(view.queued.tokens) if view.queued else 0.0,
                            comp)
        budget = slack - t_mand - self.predictor.upper_margin
        if self._deferring:  # a deferred prefill waits for the critical requests' cushion
            if view.waiting:
                budget = min(budget, 0.0)
            else:
                self._deferring = False

        externality, kept_extra_kv, admitted = 0.0, 0.0, _EMPTY
        # A prefix policy admits nothing without a budget: no order, no costs.
        if len(extras) and not (self._prefix and budget <= 0):
            if self._order != "none":
                if lax is None:
                    lax = self._laxity(view, comp)
                    if part is not None:
                        lax = lax[part]
                extras = self._priority(view, extras, lax)
            ext_g = view.group[extras]
            kv = view.kv_len[extras]
            own = kv
            if self.config.cascade:
                own = kv - (view.shared_len[extras] if self._cascade_gate is None
                            else self._gated_share(view, mandatory, ext_g))
            costs = self.predictor.extra_costs(n_mand, own)
            if self._order != "group":
                rank, counts = _EMPTY, _EMPTY
            elif part is None:
                comp.ranks()
                rank, counts = comp.rank, comp.counts  # per group: the sort kept them
            else:
                rank = self._run_rank(ext_g)
                counts = self._mandatory_counts(view.group[comp.order], comp.head,
                                                mandatory[comp.order], ext_g)
            admit = self._policy(Candidates(extras, ext_g, rank, counts, costs, budget,
                                            n_mand, x_mand[2], own, slack))
            if isinstance(admit, int):  # the first `admit` of them
                admit = slice(admit)
            admitted = extras[admit]
            externality = float(costs[admit].sum())
            mandatory[admitted] = True
            kept_extra_kv = float(own[admit].sum())
        keep = mandatory.nonzero()[0]
        held = (~mandatory).nonzero()[0]
        if self._cascade_gate is not None and self.config.cascade and len(admitted):
            x_mand = self._features(view, mandatory)  # the gate may send more groups down
        else:
            x_mand[1] += len(admitted)  # now the kept batch's
            x_mand[2] += kept_extra_kv
        return Decision(keep, held, n_mand, budget, externality, t_mand + externality,
                        x_mand / SCALE, view.ids)

    def _optional(self, view: StepView, comp: Composition, mandatory: np.ndarray,
                  dynamic: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The extras still optional once the dynamic rules made theirs mandatory
        (pinned, starved, and urgent: this adds deadline-critical branches to
        `mandatory`), in the composition's order; their laxity if urgency needed
        it, else None; and which of `comp.extras` they are (None: all)."""
        extras = comp.extras
        part = ~mandatory[extras] if dynamic else None
        lax = None
        if self._urgent and len(extras):  # deadline-critical branches run whatever the budget
            lax = self._laxity(view, comp)
            urgent = lax < self._urgent * comp.tpot  # (tpot: filled by _laxity)
            if part is not None:
                urgent &= part
            if urgent.any():
                mandatory[extras[urgent]] = True
                part = ~urgent if part is None else part & ~urgent
        if part is not None:
            extras = extras[part]
            if lax is not None:
                lax = lax[part]
        return extras, lax, part

    def _priority(self, view: StepView, extras: np.ndarray, lax: np.ndarray) -> np.ndarray:
        """The extras in priority order: least laxity, then group, branch and view
        index. They come in (group, branch, index) order, so a stable sort on the
        laxity alone gives it; cap's (groups contiguous) then sorts by group."""
        by_lax = lax.argsort(kind="stable")
        if self._order == "group":
            return extras[by_lax[view.group[extras][by_lax].argsort(kind="stable")]]
        return extras[by_lax]

    def _mandatory(self, view: StepView, build: bool = True
                   ) -> tuple[np.ndarray, Composition | None, bool]:
        """The sequences that run whatever the budget (ordinary, critical, pinned,
        each group's base branch, starved ones), as a mask; the view's
        composition (kept for the next view; not built unless `build`); and
        whether pinned or starved ones were added to its base."""
        k = composition_key(view, self._order)
        comp = self._comp
        if comp is not None and comp.key == k:
            mandatory = comp.base.copy()
        elif build:
            c = self.config
            comp = self._comp = Composition(view, k, self._order, c.margin, c.branch_stretch,
                                            c.max_banked_tokens)
            mandatory = comp.base.copy()
        else:
            comp, mandatory = None, base_branches(view, group_order(view))[0]
        dynamic = False
        if view.pinned is not None:
            mandatory |= view.pinned
            dynamic = True
        starved = self._holds.starved(view.ids)
        if starved is not None:
            mandatory |= starved
            dynamic = True
        return mandatory, comp, dynamic

    def _features(self, view: StepView, kept: np.ndarray) -> np.ndarray:
        """Unscaled predictor features of the batch of `kept` (a mask)."""
        kv_k = view.kv_len[kept]
        if self.config.cascade and self._cascade_gate is not None:
            saved, prefix = self._gated_prefix(view.group[kept], view.shared_len[kept])
            kv = float(kv_k.sum()) - saved
        elif self.config.cascade:
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
        if self._unseen:
            self.flush()
        t_prefill = self._prefill_time(prefill.tokens)
        # A waiting critical request that would miss its TTFT after even the shortest
        # decode step (the gap alone: a batch's predicted time is >= 0) makes the
        # prefill run whatever the batch: no need to know it (the usual case under
        # load, where the queue is late).
        if prefill_gate.must_run(prefill, self.config.margin, view.now, t_prefill, self.gap):
            self._deferring = False
            return True
        # What each decode step takes while the prefill waits: the mandatory batch
        # (its make-up is not kept: the view of a prefill that runs never decodes).
        mandatory = self._mandatory(view, build=False)[0]
        t_mand = self.predictor.batch_time(self._features(view, mandatory))
        self._deferring = prefill_gate.defer(view, prefill, self.config.margin, t_prefill,
                                             t_mand + self.gap)
        return not self._deferring

    def _prefill_time(self, tokens: int) -> float:
        """Seconds a prefill step of `tokens` tokens takes (upper bound)."""
        return self.prefill_predictor.upper(0, 0, tokens)

    def observe_prefill(self, tokens: int, seconds: float, disturbed: bool = False) -> None:
        """Learn from a finished prefill step of `tokens` tokens (`disturbed`: it
        spanned a pause or a control request, so it is counted, not learnt)."""
        self.prefill_predictor.update(features(0, 0, tokens), seconds, disturbed)

    def _laxity(self, view: StepView, comp: Composition) -> np.ndarray:
        """Seconds each extra branch of `comp` (in its order) has in hand before
        its stage's deadline.

        A branch group's stage is due at  D = a + TTFT + (L - 1) * TPOT * stretch
        (a: the group's earliest arrival, L: the largest max_new_tokens among its
        running members, stretch: `branch_stretch`; `comp.due` holds D), and a
        branch with r tokens still to generate needs about r steps at the
        (1 - margin) * TPOT pace:

            laxity = D - now - r * (1 - margin) * TPOT        [seconds]

        Sequences that report no max_new_tokens (0) count as having none left.
        """
        comp.deadlines(view)
        remaining = np.maximum(comp.max_new - view.generated[comp.extras], 0)
        return comp.due - view.now - remaining * (1.0 - self.config.margin) * comp.tpot

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
    def _group_prefixes(groups: np.ndarray, shared: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Of the sequences in a group (`groups` >= 0): their mask, the group
        codes present (ascending), each such sequence's index into them, and
        each group's prefix: its members' largest `shared` (the first member
        prefilled it: its own count is 0)."""
        in_group = groups >= 0
        codes, inv = np.unique(groups[in_group], return_inverse=True)
        prefix = np.zeros(len(codes))
        np.maximum.at(prefix, inv, shared[in_group])
        return in_group, codes, inv, prefix

    def _gated_prefix(self, groups: np.ndarray, shared: np.ndarray) -> tuple[float, float]:
        """With the engine's cascade gate, of a batch's sequences (`groups`,
        `shared`): the KV tokens its members do not read one by one, and the
        prefix tokens read once, over the groups the gate sends down the
        two-level path (a group's width: its members in the batch)."""
        _, codes, inv, prefix = self._group_prefixes(groups, shared)
        if not len(codes):
            return 0.0, 0.0
        width = np.bincount(inv, minlength=len(codes))
        pays = self._cascade_gate.pays_many(width, prefix)
        return float((width * prefix)[pays].sum()), float(prefix[pays].sum())

    def _gated_share(self, view: StepView, mandatory: np.ndarray,
                     ext_g: np.ndarray) -> np.ndarray:
        """Per extra (of groups `ext_g`), the prefix tokens it would not read
        itself: its group's prefix when the gate passes the group at its
        mandatory members plus this one, else 0. Conservative: an extra that
        tips its group over the gate's threshold is not credited with its
        members' savings."""
        in_group, codes, inv, prefix = self._group_prefixes(view.group, view.shared_len)
        members = np.bincount(inv, weights=mandatory[in_group], minlength=len(codes))
        j = codes.searchsorted(ext_g)
        p = prefix[j]
        return np.where(self._cascade_gate.pays_many(members[j] + 1, p), p, 0.0)

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
        if self._unseen:
            self.flush()
        d = result.decision
        if len(d.keep):
            self.predictor.update(d.features, result.step_time, result.disturbed)
        self._end_step(result.end - result.step_time, result.end)
        if not self._promote_starved:  # the baselines never promote: nothing to count
            return
        self._holds.record(d.ids, d.keep, d.held)

    def observe_passthrough(self, n_seqs: int, kv_tokens: int, step_time: float, end: float,
                            disturbed: bool = False) -> None:
        """What observe(StepResult(passthrough(n_seqs, kv_tokens), ...)) learns,
        for a step the controller was not asked about, at a fraction of its
        cost: the step is kept, and up to `UNSEEN_BATCH` of them are learnt in
        one go when the controller is next read (`flush`: decide, admit_prefill,
        observe, reconfigure, held_steps, and readers outside such as the
        runtime's status) or the batch is full. The fit is the same to rounding
        (StepTimePredictor.update_many says what is coarser); the gap estimate
        is refreshed once per batch rather than every 8 steps. A server without
        branches in its load pays this on every step."""
        unseen = self._unseen
        unseen.append((n_seqs, kv_tokens, step_time, end, disturbed))
        if len(unseen) >= UNSEEN_BATCH:
            self.flush()

    def flush(self) -> None:
        """Learn from the passthrough steps kept by observe_passthrough (readers
        of the predictor, the gap or the holds outside decide/observe call it)."""
        unseen = self._unseen
        if not unseen:
            return
        self._unseen = []
        a = np.array(unseen, dtype=np.float64)
        step_time, end = a[:, 2], a[:, 3]
        run = a[a[:, 0] > 0]  # (observe learns nothing from a step that ran no sequence)
        x = np.zeros((len(run), len(SCALE)))
        x[:, 0] = 1.0
        x[:, 1] = run[:, 0]
        x[:, 2] = run[:, 1]
        x /= SCALE
        self.predictor.update_many(x, run[:, 2], run[:, 4] != 0)
        self._end_steps(end - step_time, end)
        if self._promote_starved:
            self._holds.record_unseen(len(a))

    def _end_steps(self, start: np.ndarray, end: np.ndarray) -> None:
        """_end_step for steps in order (the gap estimate refreshed once, at the end)."""
        if self._last_end is None:
            self._last_end = float(end[0])
            start, end = start[1:], end[1:]
        k = len(end)
        if not k:
            return
        prev = np.empty(k)
        prev[0] = self._last_end
        prev[1:] = end[:-1]
        gaps = np.maximum(start - prev, 0.0)
        ring = self._gaps
        if k > len(ring):
            self._n_gaps += k - len(ring)
            gaps = gaps[-len(ring):]
        ring[(self._n_gaps + np.arange(len(gaps))) % len(ring)] = gaps
        self._n_gaps += len(gaps)
        self.gap = quantile(ring[: min(self._n_gaps, len(ring))], 0.9)
        self._last_end = float(end[-1])

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
        self.flush()
        return self._holds.held_steps(sid)
