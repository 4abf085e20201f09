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

    ids: Sequence[str]  # request ids
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
    prefill_tokens: int = 0  # prefill tokens planned into this same step (mixed steps)
    pinned: np.ndarray | None = None  # bool, must run this step for the engine's sake
    # (finishing or aborted, grammar-constrained, ...) without being latency-critical

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_seqs(
        cls, seqs: Sequence[Seq], now: float, waiting: int = 0, prefill_tokens: int = 0
    ) -> StepView:
        def col(name: str, dtype: type) -> np.ndarray:
            return np.fromiter((getattr(s, name) for s in seqs), dtype=dtype, count=len(seqs))

        first = np.fromiter(
            (math.nan if s.first_token is None else s.first_token for s in seqs),
            dtype=np.float64,
            count=len(seqs),
        )
        critical = np.fromiter(
            (s.group == NO_GROUP if s.critical is None else s.critical for s in seqs),
            dtype=bool,
            count=len(seqs),
        )
        return cls(
            ids=[s.sid for s in seqs],
            group=col("group", np.int64),
            branch=col("branch", np.int64),
            width=col("width", np.int64),
            kv_len=col("kv_len", np.int64),
            shared_len=col("shared_len", np.int64),
            ttft_slo=col("ttft_slo", np.float64),
            tpot_slo=col("tpot_slo", np.float64),
            arrival=col("arrival", np.float64),
            first_token=first,
            generated=col("generated", np.int64),
            critical=critical,
            max_new=col("max_new", np.int64),
            now=now,
            waiting=waiting,
            prefill_tokens=prefill_tokens,
        )


@dataclass(slots=True, eq=False)
class Decision:
    """Which sequences decode in the step. The rest are held: they keep their KV
    and rejoin a later step."""

    keep: np.ndarray  # int64 indices into the view, ascending: the sequences that decode
    held: np.ndarray  # int64 indices into the view, ascending: the sequences held out
    mandatory: int  # sequences that had to run (ordinary, critical, base, starved, urgent)
    budget: float  # seconds of slack left for extra branches after the mandatory
    # batch (upper bound); +inf when no latency-critical sequence is running
    externality: float  # seconds, predicted extra step time of the admitted extras
    predicted: float  # seconds, predicted (mean) step time of the kept batch
    features: np.ndarray = field(repr=False)  # the kept batch's predictor features
    ids: Sequence[str] = field(repr=False)  # the view's ids (not copied)

    def held_ids(self) -> list[str]:
        """Ids of the held sequences (built on demand, off the decision path)."""
        ids = self.ids
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
