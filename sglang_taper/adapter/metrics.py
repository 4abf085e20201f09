"""Prometheus metrics beside SGLang's own (with --enable-metrics). Created in
the scheduler process; SGLang's multiprocess registry exports them on /metrics."""

from __future__ import annotations

import math

from prometheus_client import Counter, Gauge, Histogram

from sglang_taper.stats import StepRecord

_TIME_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class TaperMetrics:
    def __init__(self) -> None:
        self.steps = Counter("taper_decode_steps", "Decode steps observed by TAPER")
        self.regulated = Counter("taper_regulated_steps", "Decode steps with branches decided on")
        self.held = Counter("taper_held_branch_steps", "Branch-steps held out of a decode step")
        self.branches = Counter("taper_branch_steps", "Branch-steps that decoded")
        self.budget = Gauge("taper_slack_budget_seconds", "Slack budget for extra branches",
                            multiprocess_mode="mostrecent")
        self.predicted = Gauge("taper_predicted_step_seconds", "Predicted decode step time",
                               multiprocess_mode="mostrecent")
        self.measured = Gauge("taper_measured_step_seconds", "Measured decode step time",
                              multiprocess_mode="mostrecent")
        self.error = Histogram("taper_prediction_abs_error_seconds",
                               "|measured - predicted| step time", buckets=_TIME_BUCKETS)
        self.degraded = Gauge("taper_degraded", "1 when TAPER turned its regulation off "
                              "after an error (see /taper/stats degraded_reason)",
                              multiprocess_mode="max")
        self.enabled = Gauge("taper_enabled", "1 while TAPER's hooks act on the step path "
                             "(TaperConfig.enabled, POST /taper/config)",
                             multiprocess_mode="mostrecent")
        self.width = Histogram("taper_group_width", "Branches of one group decoding in a step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))

    def observe(self, rec: StepRecord, widths: dict[str, int] | None) -> None:
        self.steps.inc()
        self.predicted.set(rec.predicted)
        self.measured.set(rec.measured)
        if widths is None:
            return
        self.regulated.inc()
        self.held.inc(rec.held)
        self.branches.inc(rec.branches)
        if not math.isinf(rec.budget):
            self.budget.set(rec.budget)
        self.error.observe(abs(rec.measured - rec.predicted))
        for w in widths.values():
            self.width.observe(w)
