"""Messages between the serving engine and the controller.

`StepView` is what the engine shows the controller before a decode step;
`Decision` is the answer; `StepResult` is what the engine reports after the
step. The view is columnar (one numpy array per field, one entry per running
decode sequence) so that a decision over hundreds of sequences is a handful
of vectorized operations rather than a Python loop.

Units: times are seconds on one monotonic clock shared by the engine and the
controller; lengths are tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

NO_GROUP = -1  # `StepView.group` of an ordinary request


@dataclass(slots=True)
class Seq:
    """One running decode sequence, as a row. A convenience for building views
    in tests and in the simulator; the controller reads only `StepView`."""

    sid: str  # request id
    group: int = NO_GROUP  # branch group, numbered in order of the group's creation
    branch: int = 0  # branch index within the group, 0-based
    width: int = 1  # number of branches the group was created with
    kv_len: int = 0  # tokens held in KV: prompt + generated
    shared_len: int = 0  # tokens of the KV shared with the rest of the group
    ttft_slo: float = 1.0  # seconds from arrival to the first token
    tpot_slo: float = 0.05  # seconds per output token after the first
    arrival: float = 0.0  # seconds, when the request reached the engine
    first_token: float | None = None  # seconds, when its first token was produced
    generated: int = 0  # output tokens produced so far (the first included)
    critical: bool | None = None  # latency-critical; default: True iff not in a group
    max_new: int = 0  # the request's max_new_tokens (0: unknown)


@dataclass(slots=True, eq=False)
class StepView:
    """The running decode sequences before one decode step, one array entry each.

    `group` codes must be assigned in order of group creation (an older group
    has a smaller code): policies use that order to favour older programs.
    """

    ids: Sequence[str]  # request ids: any sequence (a list; an int64 array: the simulator's)
    group: np.ndarray  # int64, branch group code, NO_GROUP (-1) for ordinary requests
    branch: np.ndarray  # int64, branch index within the group
    width: np.ndarray  # int64, the group's width (branches created), 1 if ordinary
    kv_len: np.ndarray  # int64, tokens in KV (prompt + generated)
    shared_len: np.ndarray  # int64, tokens of KV shared with the group (its prefix)
    ttft_slo: np.ndarray  # float64, seconds
    tpot_slo: np.ndarray  # float64, seconds per token
    arrival: np.ndarray  # float64, seconds
    first_token: np.ndarray  # float64, seconds; NaN before the first token
    generated: np.ndarray  # int64, output tokens so far
    critical: np.ndarray  # bool, latency-critical (ordinary request or serial stage)
    max_new: np.ndarray  # int64, the request's max_new_tokens (0: unknown)
    now: float = 0.0  # seconds, when the decision is asked for
    waiting: int = 0  # requests in the engine's waiting queue
    prefill_tokens: int = 0  # prefill tokens planned into this same step (mixed steps;
    # 0 on engines that run prefill and decode steps apart, as SGLang does here)
    pinned: np.ndarray | None = None  # bool, must run this step for the engine's sake
    # (finishing or aborted, grammar-constrained, ...) without being latency-critical
    queued: PrefillView | None = None  # the prefill waiting behind this step and the
    # latency-critical requests queued for it (their TTFT budgets the step); None: none

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_seqs(
        cls, seqs: Sequence[Seq], now: float, waiting: int = 0, prefill_tokens: int = 0,
        queued: PrefillView | None = None,
    ) -> StepView:
        """A view of `seqs` (tests and tools), through the engines' builder."""
        n = len(seqs)
        ints = np.array([(s.group, s.branch, s.width, s.shared_len, s.generated, s.max_new,
                          s.kv_len - s.generated,
                          s.group == NO_GROUP if s.critical is None else s.critical)
                         for s in seqs], dtype=np.int64).reshape(n, INT_ROWS).T
        floats = np.array([(s.ttft_slo, s.tpot_slo, s.arrival,
                            math.nan if s.first_token is None else s.first_token)
                           for s in seqs], dtype=np.float64).reshape(n, FLOAT_ROWS).T
        view = view_from_columns([s.sid for s in seqs], ints, floats, now, waiting=waiting,
                                 queued=queued)
        view.prefill_tokens = prefill_tokens
        return view


# Named rows of the two column blocks every engine builds a `StepView` from: the
# simulator keeps its running set as such blocks, the SGLang adapter stacks one
# row per request. Integer block (int64), one column per sequence:
GROUP, BRANCH, WIDTH, SHARED, GENERATED, MAX_NEW, CONTEXT, CRITICAL = range(8)
INT_ROWS = 8  # rows of the integer block; CONTEXT: prompt tokens, CRITICAL: 0/1
# Float block (float64 seconds); FIRST is NaN before the first token:
TTFT, TPOT, ARRIVAL, FIRST = range(4)
FLOAT_ROWS = 4


def view_from_columns(ids: Sequence[str], ints: np.ndarray, floats: np.ndarray, now: float,
                      *, waiting: int = 0, queued: PrefillView | None = None,
                      pinned: np.ndarray | None = None,
                      generated: np.ndarray | None = None) -> StepView:
    """The view of n sequences from an (INT_ROWS, n) int64 block and a (FLOAT_ROWS, n)
    float64 block with the rows named above. The view's columns are rows of the
    blocks, not copied if the blocks are C-contiguous (else they are copied once
    here, as a block stacked row by row and transposed is: the decision's many
    operations on each column then read contiguous memory). Pass blocks the
    engine will not change during the decision. `generated`: the GENERATED row,
    if given apart (then the block's is not read: an engine may keep one copy of
    the fixed rows across steps)."""
    ints, floats = np.ascontiguousarray(ints), np.ascontiguousarray(floats)
    group, branch, width, shared, gen, max_new, context, critical = ints[:INT_ROWS]
    if generated is None:
        generated = gen
    ttft, tpot, arrival, first = floats[:FLOAT_ROWS]
    return StepView(
        ids=ids, group=group, branch=branch, width=width, kv_len=context + generated,
        shared_len=shared, ttft_slo=ttft, tpot_slo=tpot, arrival=arrival, first_token=first,
        generated=generated, critical=critical.astype(bool), max_new=max_new, now=now,
        waiting=waiting, pinned=pinned if pinned is not None and pinned.any() else None,
        queued=queued)


@dataclass(slots=True, eq=False)
class Decision:
    """Which sequences decode in the step. The rest are held: they keep their KV
    and rejoin a later step."""

    keep: np.ndarray  # int64 indices into the view, ascending: the sequences that decode
    held: np.ndarray  # int64 indices into the view, ascending: the sequences held out
    mandatory: int  # sequences that had to run (ordinary, critical, base, starved, urgent)
    budget: float  # seconds of slack left for extra branches after the mandatory
    # batch (upper bound); +inf when no latency-critical sequence is running or queued
    externality: float  # seconds, predicted extra step time of the admitted extras
    predicted: float  # seconds, predicted (mean) step time of the kept batch
    features: np.ndarray = field(repr=False)  # the kept batch's predictor features
    ids: Sequence[str] = field(repr=False)  # the view's ids (not copied)

    def held_ids(self) -> list[str]:
        """Ids of the held sequences (built on demand, off the decision path)."""
        ids = self.ids
        if isinstance(ids, np.ndarray):
            return ids[self.held].tolist()
        return [ids[i] for i in self.held.tolist()]

    def kept_ids(self) -> list[str]:
        ids = self.ids
        return [ids[i] for i in self.keep.tolist()]


@dataclass(slots=True, frozen=True)
class PrefillView:
    """A prefill step the engine is about to run instead of a decode step, and the
    latency-critical requests waiting in its queue (for `Controller.admit_prefill`)."""

    tokens: int  # prompt tokens the step would compute (those not in the prefix cache)
    arrival: np.ndarray  # float64 seconds, arrival of each waiting latency-critical request
    ttft_slo: np.ndarray  # float64 seconds, the TTFT SLO of each


@dataclass(slots=True, frozen=True)
class StepResult:
    """What the engine measured for one decode step."""

    decision: Decision  # the decision the step ran under
    step_time: float  # seconds, measured duration of the step's forward + sampling
    end: float  # seconds, when the step finished (same clock as StepView.now)
    # True when the step spanned a pause_generation or a control request: its time
    # says nothing about the batch, so the predictor does not learn from it
    disturbed: bool = False
