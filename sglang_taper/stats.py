"""Per-step and cumulative figures of branch admission (pure Python + numpy)."""

from __future__ import annotations

import math
import zlib
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class StepRecord:
    end: float  # seconds (scheduler monotonic clock), when the step finished
    seqs: int  # sequences that were candidates
    kept: int  # sequences that decoded
    kv: int  # KV tokens the kept sequences attend
    held: int  # branches held out
    groups: int  # branch groups present
    branches: int  # branch sequences that decoded
    max_width: int  # most branches of one group that decoded
    budget: float  # seconds of slack budget for extras (inf: no critical request)
    predicted: float  # seconds, predicted step time of the kept batch
    measured: float  # seconds, measured step time

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__slots__}
        d["budget"] = None if math.isinf(self.budget) else self.budget
        return d


def step_record(view, keep: np.ndarray, names: dict[int, str], budget: float,
                predicted: float, measured: float, end: float
                ) -> tuple[StepRecord, dict[str, int]]:
    """The record of a regulated step (`view`: the controller's view before it,
    `keep`: the indices that decoded), and the branches of each group present
    that decoded, by group name (`names`: code -> name)."""
    # Per-step Python over a batch's tens of group codes: cheaper than a numpy sort.
    group = view.group
    kept = group[keep]
    counts = Counter(kept[kept >= 0].tolist())
    widths = {names.get(c, str(c)): counts[c] for c in sorted(counts)}
    present = len(set(group[group >= 0].tolist()))
    rec = StepRecord(
        end=end, seqs=len(view), kept=len(keep), kv=int(view.kv_len[keep].sum()),
        held=len(view) - len(keep), groups=present, branches=sum(counts.values()),
        max_width=max(counts.values(), default=0),
        budget=budget, predicted=predicted, measured=measured,
    )
    return rec, widths


class TaperStats:
    """Cumulative counters plus a ring of recent steps."""

    def __init__(self, policy: str, history: int = 512) -> None:
        self.policy = policy
        self.steps = 0  # decode steps observed
        self.regulated_steps = 0  # steps with branches the controller decided on
        self.unsafe_steps = 0  # steps with branches run whole (penalties, spec, ...)
        self.deferred_prefills = 0  # passes that decoded instead of prefilling (taper's gate)
        self.held_branch_steps = 0  # sum over steps of branches held
        self.branch_steps = 0  # sum over steps of branches that decoded
        self.max_width = 0  # most branches of one group that decoded in one step
        self.width_hist: dict[int, int] = {}  # branches of a group decoding -> group-steps
        self.abs_err_sum = 0.0  # seconds, sum |measured - predicted| over regulated steps
        self.rel_err_sum = 0.0
        self.err_n = 0
        self.history: deque[StepRecord] = deque(maxlen=history)
        self._recent_err: deque[float] = deque(maxlen=history)
        self.last_widths: dict[str, int] = {}  # group -> branches decoding, last step
        self.decision_digest = 0  # running hash of decisions (equal across TP ranks)
        self.degraded: str | None = None  # why regulation turned itself off, or None
        self.faults = 0  # exceptions caught on the scheduler path (the first one degrades)
        self.rejected_steps = 0  # decode steps not learnt from (spanned a pause, outlier)
        self.requests = 0  # generation requests this scheduler took
        # recent branch groups -> requests naming them that this scheduler took
        # (n>1 warm-ups and frontend commits included): shows where groups ran
        self.groups_seen: OrderedDict[str, int] = OrderedDict()
        self._groups_cap = history * 2

    def note_request(self, group: str | None) -> None:
        self.requests += 1
        if group is not None:
            self.groups_seen[group] = self.groups_seen.get(group, 0) + 1
            self.groups_seen.move_to_end(group)
            if len(self.groups_seen) > self._groups_cap:
                self.groups_seen.popitem(last=False)

    def record(self, rec: StepRecord, widths: dict[str, int] | None, kept_ids=None) -> None:
        self.steps += 1
        if widths is None:
            return
        self.regulated_steps += 1
        self.held_branch_steps += rec.held
        self.branch_steps += rec.branches
        self.max_width = max(self.max_width, rec.max_width)
        for w in widths.values():
            self.width_hist[w] = self.width_hist.get(w, 0) + 1
        self.last_widths = widths
        if rec.measured > 0 and not math.isnan(rec.predicted):
            err = rec.measured - rec.predicted
            self.abs_err_sum += abs(err)
            self.rel_err_sum += abs(err) / rec.measured
            self.err_n += 1
            self._recent_err.append(err)
        self.history.append(rec)
        if kept_ids is not None:  # crc32, not hash(): str hashes differ between processes
            self.decision_digest = zlib.crc32("\n".join(kept_ids).encode(), self.decision_digest)

    def to_dict(self, history: bool = True) -> dict:
        err = np.asarray(self._recent_err) if self._recent_err else np.zeros(1)
        out = {
            "policy": self.policy,
            "steps": self.steps,
            "regulated_steps": self.regulated_steps,
            "unsafe_steps": self.unsafe_steps,
            "deferred_prefills": self.deferred_prefills,
            "held_branch_steps": self.held_branch_steps,
            "branch_steps": self.branch_steps,
            "mean_branch_width": self.branch_steps / max(1, self.regulated_steps),
            "max_group_width": self.max_width,
            "group_width_histogram": {str(k): v for k, v in sorted(self.width_hist.items())},
            "last_group_widths": self.last_widths,
            "prediction": {
                "mean_abs_error_s": self.abs_err_sum / max(1, self.err_n),
                "mean_rel_error": self.rel_err_sum / max(1, self.err_n),
                "recent_p90_abs_error_s": float(np.quantile(np.abs(err), 0.9)),
                "recent_over_fraction": float((err > 0).mean()),
            },
            "decision_digest": self.decision_digest,
            "degraded": self.degraded is not None,
            "degraded_reason": self.degraded,
            "faults": self.faults,
            "requests_attached": self.requests,
            "groups_seen": dict(self.groups_seen),
        }
        if self.history:
            last = self.history[-1]
            out["last"] = last.to_dict()
        if history:
            out["history"] = [r.to_dict() for r in self.history]
        return out

    def summary(self) -> str:
        return (
            f"TAPER policy={self.policy} steps={self.steps} regulated={self.regulated_steps} "
            f"mean_width={self.branch_steps / max(1, self.regulated_steps):.2f} "
            f"max_width={self.max_width} held_branch_steps={self.held_branch_steps} "
            f"pred_err={1e3 * self.abs_err_sum / max(1, self.err_n):.2f}ms "
            f"({100 * self.rel_err_sum / max(1, self.err_n):.1f}%)"
        )


_SUMMED = ("steps", "regulated_steps", "unsafe_steps", "deferred_prefills",
           "held_branch_steps", "branch_steps", "faults", "requests_attached")


def aggregate_ranks(ranks: list[dict]) -> dict:
    """One figure set for a server with several DP ranks (each rank's own
    `TaperStats.to_dict`, plus the runtime's status): counters summed, the widest
    group kept, histograms and groups merged, degraded if any rank is; the
    per-rank figures stay under `dp_ranks`."""
    ranks = sorted(ranks, key=lambda r: (r.get("dp_rank") is None, r.get("dp_rank") or 0))

    def total(key: str) -> int:
        return sum(int(r.get(key) or 0) for r in ranks)

    out: dict = {"policy": ranks[0].get("policy") if ranks else None,
                 "dp_size": len(ranks)}
    for key in _SUMMED:
        out[key] = total(key)
    out["mean_branch_width"] = out["branch_steps"] / max(1, out["regulated_steps"])
    out["max_group_width"] = max((int(r.get("max_group_width") or 0) for r in ranks), default=0)
    hist: dict[str, int] = {}
    groups: dict[str, int] = {}
    for r in ranks:
        for k, v in (r.get("group_width_histogram") or {}).items():
            hist[k] = hist.get(k, 0) + v
        for k, v in (r.get("groups_seen") or {}).items():
            groups[k] = groups.get(k, 0) + v
    out["group_width_histogram"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    out["groups_seen"] = groups
    out["degraded"] = any(r.get("degraded") for r in ranks)
    out["degraded_reason"] = next((r["degraded_reason"] for r in ranks
                                   if r.get("degraded_reason")), None)
    out["regulating"] = all(r.get("regulating", False) for r in ranks)
    out["enabled"] = all(r.get("enabled", True) for r in ranks)  # TaperConfig.enabled
    kv: dict = {}
    for r in ranks:
        for k, v in (r.get("kv") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                kv[k] = kv.get(k, 0) + v
    out["kv"] = kv  # summed over ranks
    out["dp_ranks"] = ranks
    return out
