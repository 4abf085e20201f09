"""Scheduler hooks: run the controller before every decode step of SGLang's
scheduler, hold out the branches it does not admit (keeping their KV), and
bring them back at the start of the next scheduling pass.

Lifecycle of a held branch, in SGLang 0.5.23 terms:

1. `update_running_batch` filters, checks memory, retracts if needed, then
   calls `running_batch.prepare_for_decode()`: candidates are final and no KV
   slot is allocated yet. There the controller decides; the batch is split in
   two with `filter_batch` (which frees no KV): the kept part decodes, the held
   part is parked on the runtime. A held `Req` keeps its `req_pool_idx`, KV and
   radix lock; its pending next-token stays in the relay buffer.
2. The step runs and its result is processed against the batch that ran.
3. At the start of the next pass (`ingest_requests`, before any abort, pause,
   idle check or prefill decision looks at `running_batch`) the held part is
   merged back with `merge_batch`.

So between two passes every request is in `running_batch`, as stock SGLang
expects. Steps whose batch cannot be split safely (active penalizers, whose
orchestrator is shared; speculative decoding; hierarchical sparse attention)
run whole and are counted as `unsafe_steps`.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from controller import Controller, PrefillView, StepResult, StepView, TaperConfig
from controller.view import NO_GROUP
from sglang_taper.meta import BranchMeta, parse_meta
from sglang_taper.stats import StepRecord, TaperStats

logger = logging.getLogger("sglang_taper")

_SCHED = "sglang.srt.managers.scheduler.Scheduler"
_BATCH = "sglang.srt.managers.schedule_batch.ScheduleBatch"
_LOG_EVERY_S = 10.0


class _Ids:
    """Request ids of a batch, read on demand (only held ones ever are)."""

    __slots__ = ("_reqs",)

    def __init__(self, reqs: list) -> None:
        self._reqs = reqs

    def __len__(self) -> int:
        return len(self._reqs)

    def __getitem__(self, i: int) -> str:
        return self._reqs[i].rid


# Columns of `_ReqMeta.row`, one float row per request so that a view is one
# np.array over the batch: group code, branch index, width, TTFT and TPOT SLOs
# (seconds), arrival and first-token times (seconds, NaN before it), critical
# (0/1), prompt tokens, tokens shared with the group (radix-cache hit), max_new_tokens.
CODE, BRANCH, WIDTH, TTFT, TPOT, ARRIVAL, FIRST, CRITICAL, PROMPT, SHARED, MAX_NEW = range(11)


class _ReqMeta:
    """Per-request state the view needs, attached to `Req` as `req._taper`."""

    __slots__ = ("group", "row")

    def __init__(self, group: str | None, row: list[float]) -> None:
        self.group = group  # group name, None if ordinary
        self.row = row  # the view's columns, indexed by CODE ... MAX_NEW


def _timed(method):
    """Accumulate the method's own time in `self.hook_seconds` (what TAPER adds to
    the scheduler's critical path)."""

    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()  # vDSO clock; time.thread_time() is a slow syscall here
        try:
            return method(self, *args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            self.hook_seconds += dt
            self.hook_split[method.__name__] = self.hook_split.get(method.__name__, 0.0) + dt

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class SchedulerRuntime:
    """TAPER's state inside one scheduler process."""

    def __init__(self, scheduler, config: TaperConfig) -> None:
        self.config = config
        self.controller = Controller(config)
        self.stats = TaperStats(str(config.policy))
        self.held = None  # the held-out part of the running batch, or None
        self.inflight: dict[int, tuple] = {}  # forward_iter -> (decision, view | None)
        self._codes: dict[str, int] = {}  # group name -> code, in order of creation
        self._names: dict[int, str] = {}  # code -> group name
        self._branches: dict[str, int] = {}  # group name -> members numbered so far
        self._next_code = 0
        self._last_log = time.monotonic()
        self._pending = None  # (batch, decision, view, keep) of the step being built
        self._rank0_decision = None
        self._metrics = None
        self.hook_seconds = 0.0  # seconds spent in regulate/on_run/on_result
        self.hook_split: dict[str, float] = {}  # the same, per method
        self.decode_seconds = 0.0  # seconds of measured decode steps
        self.prefill_seconds = 0.0  # seconds of measured prefill (extend) steps
        args = scheduler.server_args
        self.tp_size = scheduler.tp_size
        self.scheduler = scheduler
        self.disabled = _unsupported(scheduler)
        if self.disabled:
            logger.warning("TAPER regulation is off in this scheduler: %s", self.disabled)
        if getattr(args, "enable_metrics", False):
            from sglang_taper.adapter.metrics import TaperMetrics

            self._metrics = TaperMetrics()
        logger.info("TAPER enabled: policy=%s tp_size=%d", config.policy, self.tp_size)

    # ----------------------------------------------------------- new requests

    def attach(self, req) -> None:
        """Parse a new request's metadata and attach what the view needs."""
        try:
            meta = parse_meta(req.sampling_params.custom_params)
        except ValueError as e:  # the HTTP server validates; this is a second line
            logger.warning("TAPER: request %s has bad metadata, served as ordinary: %s",
                           req.rid, e)
            meta = None
        if meta is not None and req.sampling_params.max_new_tokens == 0:
            meta = None  # a prefix warm-up (n>1 or frontend commit), not a branch
        meta = meta or BranchMeta()
        cfg = self.config
        code, branch = NO_GROUP, 0
        if meta.group is not None:
            if meta.group not in self._codes:
                if len(self._codes) > 65536:
                    self._prune_groups()
                self._codes[meta.group] = self._next_code
                self._names[self._next_code] = meta.group
                self._next_code += 1
            code = self._codes[meta.group]
            n = self._branches.get(meta.group, 0)
            self._branches[meta.group] = n + 1
            branch = meta.branch if meta.branch is not None else n
        critical = meta.critical if meta.critical is not None else meta.group is None
        req._taper = _ReqMeta(meta.group, [
            code, branch, meta.width, meta.ttft or cfg.default_ttft_slo,
            meta.tpot or cfg.default_tpot_slo, time.monotonic(), math.nan, critical,
            len(req.origin_input_ids), 0, req.sampling_params.max_new_tokens or 0,
        ])

    def _prune_groups(self) -> None:
        self._codes.clear()
        self._names.clear()
        self._branches.clear()

    # ----------------------------------------------------------- decode step

    @_timed
    def regulate(self, batch) -> None:
        """Decide which sequences of `batch` decode; park the rest in `self.held`."""
        reqs = batch.reqs
        if self.held is not None:  # defensive: never lose a parked part
            self.merge_into(batch)
            reqs = batch.reqs
        metas = [getattr(r, "_taper", None) for r in reqs]
        if self.disabled or not any(m is not None and m.group is not None for m in metas):
            return
        if _unsafe_to_split(batch):
            self.stats.unsafe_steps += 1
            return
        now = time.monotonic()
        view = self._view(reqs, metas, now)
        if self.tp_size > 1:
            keep = self._decide_on_rank0(view)
            decision = None
        else:
            decision = self.controller.decide(view)
            keep = decision.keep
        if len(keep) < len(reqs):
            held = decision.held if decision is not None else _complement(keep, len(reqs))
            self.held = _split(batch, keep, held)
        self._pending = (batch, decision, view, keep)

    def _view(self, reqs: list, metas: list, now: float) -> StepView:
        for r, m in zip(reqs, metas):
            if m is None:
                self.attach(r)
            else:
                _stamp_first_token(r, m, now)
        rows = np.array([r._taper.row for r in reqs], dtype=np.float64)
        generated = np.fromiter((len(r.output_ids) for r in reqs), np.int64, len(reqs))
        prompt = rows[:, PROMPT].astype(np.int64)
        pinned = np.fromiter(
            (r.to_finish is not None or r.grammar is not None or r.beam_group is not None
             for r in reqs), bool, len(reqs))
        return StepView(
            ids=_Ids(reqs),
            group=rows[:, CODE].astype(np.int64),
            branch=rows[:, BRANCH].astype(np.int64),
            width=rows[:, WIDTH].astype(np.int64),
            kv_len=prompt + generated,
            shared_len=rows[:, SHARED].astype(np.int64),
            ttft_slo=rows[:, TTFT],
            tpot_slo=rows[:, TPOT],
            arrival=rows[:, ARRIVAL],
            first_token=rows[:, FIRST],
            generated=generated,
            critical=rows[:, CRITICAL].astype(bool),
            max_new=rows[:, MAX_NEW].astype(np.int64),
            now=now,
            waiting=len(self.scheduler.waiting_queue),
            pinned=pinned if pinned.any() else None,
        )

    def defer_prefill(self, running_batch) -> bool:
        """Before SGLang builds a prefill batch: True to decode the running batch
        first (the controller's prefill gate, controller/prefill.py). Never raises:
        on an error the prefill runs, as stock SGLang would."""
        sched = self.scheduler
        if (self.disabled or not self.controller.gates_prefill or self.tp_size > 1
                or sched.chunked_req is not None or not sched.waiting_queue
                or running_batch.is_empty()):
            return False
        try:
            reqs = running_batch.reqs
            metas = [getattr(r, "_taper", None) for r in reqs]
            if not any(m is not None and m.row[CRITICAL] for m in metas):
                return False  # no latency-critical request decoding: nothing to protect
            view = self._view(reqs, metas, time.monotonic())
            deferred = not self.controller.admit_prefill(view, self._waiting_prefill())
        except Exception:  # the gate is an optimization: never fail the scheduler for it
            logger.exception("TAPER: prefill gate failed; prefilling as SGLang would")
            return False
        if deferred:
            self.stats.deferred_prefills += 1
        return deferred

    def _waiting_prefill(self) -> PrefillView:
        """The prefill SGLang would build now, approximately: waiting requests in
        queue order, their prompt tokens not in the radix cache, up to the
        scheduler's per-step token budget; and the waiting critical requests."""
        from sglang.srt.mem_cache.common import match_kv_cache

        sched = self.scheduler
        limits = [x for x in (sched.max_prefill_tokens, sched.chunked_prefill_size) if x]
        budget = min(limits) if limits else 1 << 30
        tokens, arrival, ttft = 0, [], []
        for req in sched.waiting_queue:
            m = getattr(req, "_taper", None)
            if m is None:
                self.attach(req)
                m = req._taper
            if m.row[CRITICAL]:
                arrival.append(m.row[ARRIVAL])
                ttft.append(m.row[TTFT])
            if tokens < budget:
                # What SGLang's FCFS policy does to every waiting request each pass.
                match_kv_cache(req, sched.tree_cache)
                tokens += max(1, len(req.origin_input_ids) - req.prefix_len)
        return PrefillView(min(tokens, budget), np.asarray(arrival, dtype=np.float64),
                           np.asarray(ttft, dtype=np.float64))

    def _decide_on_rank0(self, view: StepView) -> np.ndarray:
        """With tensor parallelism every rank must build the same batch: rank 0
        decides (its clock and fit are the reference) and broadcasts."""
        from sglang.srt.runtime_context import get_parallel
        from sglang.srt.utils.common import broadcast_pyobj

        group = get_parallel().tp_group
        if group.rank_in_group == 0:
            decision = self.controller.decide(view)
            payload = [decision.keep.tolist()]
        else:
            decision, payload = None, [None]
        keep = broadcast_pyobj(payload, group.rank, group.cpu_group, src=group.ranks[0])[0]
        self._rank0_decision = decision
        return np.asarray(keep, dtype=np.int64)

    def merge_into(self, running_batch):
        """Put the held part back; returns the running batch to use."""
        held, self.held = self.held, None
        if held is None or held.is_empty():
            return running_batch
        if running_batch.is_empty():
            return held
        running_batch.merge_batch(held)
        return running_batch

    @_timed
    def on_run(self, batch) -> None:
        """After `run_batch` launched a decode step (forward_iter is set)."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] is not batch:
            n = len(batch.reqs)
            # numpy, not a torch reduction: torch would wake its intra-op thread pool
            kv = int(batch.seq_lens_cpu.numpy().sum()) if batch.seq_lens_cpu is not None else 0
            self.inflight[batch.forward_iter] = (self.controller.passthrough(n, kv), None, None)
            return
        _, decision, view, keep = pending
        if decision is None:  # TP: rank 0 keeps its own decision, followers a stand-in
            decision = self._rank0_decision or self._follower_decision(view, keep)
            self._rank0_decision = None
        self.inflight[batch.forward_iter] = (decision, view, keep)

    def _follower_decision(self, view: StepView, keep: np.ndarray):
        d = self.controller.passthrough(len(keep), int(view.kv_len[keep].sum()))
        d.keep = keep
        d.held = _complement(keep, len(view))
        d.ids = view.ids
        return d

    @_timed
    def on_result(self, batch) -> None:
        """After the result of a step was processed: observe and record."""
        now = time.monotonic()
        if batch.forward_mode.is_extend():
            for r in batch.reqs:
                m = getattr(r, "_taper", None)
                if m is not None:
                    _stamp_first_token(r, m, now)
            if batch.launch_ts is not None and batch.extend_num_tokens:
                self.prefill_seconds += now - batch.launch_ts
                self.controller.observe_prefill(int(batch.extend_num_tokens),
                                                now - batch.launch_ts)
            return
        entry = self.inflight.pop(batch.forward_iter, None)
        if entry is None or batch.launch_ts is None:
            return
        decision, view, keep = entry
        step_time = now - batch.launch_ts
        self.decode_seconds += step_time
        self.controller.observe(StepResult(decision, step_time=step_time, end=now))
        if view is None:  # a step without branches: learn from it, count it, nothing more
            self.stats.steps += 1
            if self._metrics is not None:
                self._metrics.steps.inc()
            return
        # One sort of the view's group codes gives both the groups present and how
        # many of each decoded (the kept ones).
        grouped = view.group >= 0
        codes, inverse = np.unique(view.group[grouped], return_inverse=True)
        kept = np.zeros(len(view), dtype=bool)
        kept[keep] = True
        counts = np.bincount(inverse[kept[grouped]], minlength=len(codes))
        present = counts > 0
        names = self._names
        widths = {names.get(int(c), str(int(c))): int(n)
                  for c, n in zip(codes[present], counts[present])}
        rec = StepRecord(
            end=now, seqs=len(view), kept=len(keep), kv=int(view.kv_len[keep].sum()),
            held=len(view) - len(keep), groups=len(codes), branches=int(counts.sum()),
            max_width=int(counts.max()) if len(counts) else 0,
            budget=decision.budget, predicted=decision.predicted, measured=step_time,
        )
        # The decision digest tells TP ranks' decisions apart; one rank needs none.
        self.stats.record(rec, widths, [view.ids[i] for i in keep] if self.tp_size > 1 else None)
        if self._metrics is not None:
            self._metrics.observe(rec, widths)
        if now - self._last_log > _LOG_EVERY_S and self.stats.regulated_steps:
            self._last_log = now
            logger.info(self.stats.summary())

    def kv_figures(self) -> dict:
        """KV pool occupancy in tokens: at idle, available + evictable = capacity."""
        sched = self.scheduler
        return {
            "capacity": int(sched.max_total_num_tokens),
            "available": int(sched.token_to_kv_pool_allocator.available_size()),
            "evictable": int(sched.tree_cache.evictable_size()),
            "protected": int(sched.tree_cache.protected_size()),
            "running_reqs": len(sched.running_batch.reqs),
            # held now: 0 whenever the endpoint answers (the held part rejoined the
            # running batch at the start of the pass that serves it)
            "held_reqs": 0 if self.held is None else len(self.held.reqs),
            "last_step_held": self.stats.history[-1].held if self.stats.history else 0,
        }

    def status(self) -> dict:
        return {
            "kv": self.kv_figures(),
            "enabled": True,
            "regulating": not self.disabled,
            "disabled_reason": self.disabled,
            "batch_invariant": _batch_invariant(),
            "config": self.config.to_json(),
            "overhead": {"hook_seconds": self.hook_seconds, "by_method_s": self.hook_split,
                         "decode_seconds": self.decode_seconds,
                         "hook_us_per_step": 1e6 * self.hook_seconds / max(1, self.stats.steps),
                         "fraction_of_decode": self.hook_seconds / max(1e-9,
                                                                       self.decode_seconds)},
            "predictor": {"weights": self.controller.predictor.w.tolist(),
                          "observed": self.controller.predictor.observed,
                          "upper_margin_s": self.controller.predictor.upper_margin,
                          "gap_s": self.controller.gap,
                          # prefill steps: intercept and seconds per 1024 prompt tokens
                          "prefill_weights": self.controller.prefill_predictor.w[[0, 3]].tolist(),
                          "prefill_observed": self.controller.prefill_predictor.observed,
                          "prefill_seconds": self.prefill_seconds},
            **self.stats.to_dict(),
        }


def _stamp_first_token(req, meta: _ReqMeta, now: float) -> None:
    """Once a request has its first token: record when, and how much of its
    prompt came from the radix cache (the prefix it shares with its group)."""
    if meta.row[FIRST] != meta.row[FIRST] and req.output_ids:  # NaN: not stamped yet
        meta.row[FIRST] = now
        meta.row[SHARED] = min(req.cached_tokens, meta.row[PROMPT])


def _batch_invariant() -> bool:
    from sglang_taper.cpu import batch_invariant

    return batch_invariant.enabled()


def _unsupported(scheduler) -> str | None:
    """Why this scheduler cannot regulate branches, or None."""
    args = scheduler.server_args
    if getattr(args, "enable_mixed_chunk", False):
        return "--enable-mixed-chunk builds decode batches outside update_running_batch"
    if not scheduler.spec_algorithm.is_none():
        return "speculative decoding"
    if getattr(args, "pp_size", 1) > 1:
        return "pipeline parallelism"
    if getattr(args, "enable_dp_attention", False):
        return "DP attention"
    if getattr(args, "disaggregation_mode", "null") != "null":
        return "PD disaggregation"
    if getattr(scheduler, "enable_continuous_input_polling", False):
        return "continuous input polling merges requests mid-step"
    return None


def _unsafe_to_split(batch) -> bool:
    """A split would corrupt shared per-batch state: run the step whole."""
    info = batch.sampling_info
    return (
        info.penalizer_orchestrator.is_required  # one orchestrator, shared by both parts
        or batch.spec_info is not None
        or batch.hisparse_coordinator is not None
    )


def _complement(keep: np.ndarray, n: int) -> np.ndarray:
    """The indices in range(n) not in `keep`, ascending."""
    mask = np.ones(n, dtype=bool)
    mask[keep] = False
    return mask.nonzero()[0]


def _split(batch, keep: np.ndarray, held: np.ndarray):
    """Split `batch` in place into the kept part and return the held part.
    `filter_batch` frees no KV; each part gets its own sampling-info object
    (filtering rebinds its tensors), so the parts are independent."""
    out = copy.copy(batch)
    out.sampling_info = copy.copy(batch.sampling_info)
    out.filter_batch(keep_indices=held.tolist())
    batch.filter_batch(keep_indices=keep.tolist())
    return out


# ------------------------------------------------------------------- hooks

_runtime: SchedulerRuntime | None = None
_config: TaperConfig | None = None
_slowdown = 1.0  # every forward pass takes this many times as long (testing)
_regulating: object | None = None  # the batch update_running_batch is preparing


def runtime() -> SchedulerRuntime | None:
    return _runtime


def _after_init(result, scheduler, *args, **kwargs):
    global _runtime
    _runtime = SchedulerRuntime(scheduler, _config)
    scheduler._taper = _runtime


def _after_create_req(req, scheduler, *args, **kwargs):
    if _runtime is not None:
        _runtime.attach(req)
    return req


def _before_ingest(scheduler, *args, **kwargs):
    rt = _runtime
    if rt is not None and rt.held is not None:
        scheduler.running_batch = rt.merge_into(scheduler.running_batch)


def _before_next_batch(scheduler, *args, **kwargs):
    rt = _runtime
    if rt is not None and rt.held is not None:
        scheduler.running_batch = rt.merge_into(scheduler.running_batch)
        if "running_batch" in kwargs:
            kwargs["running_batch"] = scheduler.running_batch
        elif args:
            args = (scheduler.running_batch, *args[1:])
        return (scheduler, *args), kwargs
    return None


def _around_update_running(original, scheduler, batch, *args, **kwargs):
    global _regulating
    _regulating = batch
    try:
        return original(scheduler, batch, *args, **kwargs)
    finally:
        _regulating = None


def _around_should_defer_prefill(original, scheduler, running_batch, *args, **kwargs):
    if original(scheduler, running_batch, *args, **kwargs):
        return True  # SGLang's own prefill-decode interval
    rt = _runtime
    return rt is not None and rt.defer_prefill(running_batch)


def _around_prepare_decode(original, batch, *args, **kwargs):
    if _runtime is not None and batch is _regulating:
        _runtime.regulate(batch)
    return original(batch, *args, **kwargs)


def _around_run_batch(original, scheduler, batch, *args, **kwargs):
    if _config is not None and _config.cascade:
        from sglang_taper.adapter.cascade_backend import set_batch_groups

        decode = batch.forward_mode.is_decode()
        set_batch_groups([m.row[CODE] if (m := getattr(r, "_taper", None)) is not None else -1
                          for r in batch.reqs] if decode else None)
    t0 = time.perf_counter()
    result = original(scheduler, batch, *args, **kwargs)
    if _slowdown > 1.0:  # the forward ran synchronously (CPU, no overlap): stretch it
        time.sleep((_slowdown - 1.0) * (time.perf_counter() - t0))
    if _runtime is not None and batch.forward_mode.is_decode():
        _runtime.on_run(batch)
    return result


def _after_process_result(result, scheduler, batch, *args, **kwargs):
    if _runtime is not None and batch is not None:
        _runtime.on_result(batch)
    return result


def _after_owning_rows(owners, checker, *args, **kwargs):
    # SGLang's busy-time KV conservation check counts the rows of requests in
    # running_batch/last_batch; between a step and the next pass the held part
    # owns rows too.
    rt = _runtime
    if rt is not None and rt.held is not None:
        seen = {id(r) for r in owners}
        owners.extend(r for r in rt.held.reqs if r.kv.holds_kv and id(r) not in seen)
    return owners


def install(config: TaperConfig, slowdown: float = 1.0) -> None:
    global _config, _slowdown
    _config, _slowdown = config, slowdown
    HookRegistry.register(f"{_SCHED}.__init__", _after_init, HookType.AFTER)
    HookRegistry.register(f"{_SCHED}._create_generation_req", _after_create_req, HookType.AFTER)
    HookRegistry.register(f"{_SCHED}.ingest_requests", _before_ingest, HookType.BEFORE)
    HookRegistry.register(f"{_SCHED}.get_next_batch_to_run", _before_next_batch,
                          HookType.BEFORE)
    HookRegistry.register(f"{_SCHED}.update_running_batch", _around_update_running,
                          HookType.AROUND)
    HookRegistry.register(f"{_SCHED}._should_defer_prefill", _around_should_defer_prefill,
                          HookType.AROUND)
    HookRegistry.register(f"{_BATCH}.prepare_for_decode", _around_prepare_decode,
                          HookType.AROUND)
    HookRegistry.register(f"{_SCHED}.run_batch", _around_run_batch, HookType.AROUND)
    HookRegistry.register(f"{_SCHED}.process_batch_result", _after_process_result,
                          HookType.AFTER)
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.invariant_checker."
        "SchedulerInvariantChecker._requests_owning_rows", _after_owning_rows, HookType.AFTER)
