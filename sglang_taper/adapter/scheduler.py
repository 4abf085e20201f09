"""Scheduler hooks: run the controller before every decode step of SGLang's
scheduler, hold out the branches it does not admit (keeping their KV), and
bring them back at the start of the next scheduling pass.

Lifecycle of a held branch, in SGLang 0.5.23 terms:

1. `update_running_batch` filters the finishing requests, then checks decode
   memory (`check_decode_mem`), retracts if needed, and calls
   `running_batch.prepare_for_decode()`. The controller decides at the memory
   check, so that the check (and any retraction) sees only what will decode:
   branches about to be held need no new KV slot and must not force the
   retraction of critical requests. The batch is split in two with
   `filter_batch` (which frees no KV): the kept part decodes, the held part is
   parked on the runtime. A held `Req` keeps its `req_pool_idx`, KV and radix
   lock; its pending next-token stays in the relay buffer. If even the kept
   part does not fit, the held part rejoins and SGLang retracts as it would
   have; if the batch changed before `prepare_for_decode` (a retraction), the
   controller decides again there.
2. The step runs and its result is processed against the batch that ran.
3. At the start of the next pass (`ingest_requests`, before any abort, pause,
   idle check or prefill decision looks at `running_batch`) the held part is
   merged back with `merge_batch`.

So between two passes every request is in `running_batch`, as stock SGLang
expects. Steps whose batch cannot be split safely (active penalizers, whose
orchestrator is shared; speculative decoding; hierarchical sparse attention)
run whole and are counted as `unsafe_steps`. Every hook runs TAPER's code under
the runtime's fail-safe (adapter/runtime.py): an error there never reaches
SGLang. With `TaperConfig.enabled` off (at launch or by POST /taper/config)
every per-step hook returns at once, before any controller or view work; a
part still held out is merged back all the same.

The module layout, one job each: `reqmeta` (per-request metadata, the view),
`batch` (split, merge, what cannot be split), `runtime` (decide, observe, TP,
the fail-safe), this module (the hooks and their installation).
"""

from __future__ import annotations

import logging
import time

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from controller import TaperConfig
from sglang_taper.adapter.runtime import SchedulerRuntime

logger = logging.getLogger("sglang_taper")

_SCHED = "sglang.srt.managers.scheduler.Scheduler"
_BATCH = "sglang.srt.managers.schedule_batch.ScheduleBatch"
_COMPONENTS = "sglang.srt.managers.scheduler_components"


class SchedulerHooks:
    """The hook functions, over the one runtime of this scheduler process."""

    def __init__(self, config: TaperConfig, slowdown: float = 1.0,
                 fault: str | None = None) -> None:
        self.config = config
        self.slowdown = slowdown  # every forward pass takes this many times as long (testing)
        self.fault = fault  # TAPER_INJECT_FAULT (testing the fail-safe)
        self.runtime: SchedulerRuntime | None = None
        self._regulating = None  # the batch update_running_batch is preparing
        self._decided_len = -1  # its size right after this pass's decision, -1: none yet

    # ------------------------------------------------------------ lifecycle

    def after_init(self, result, scheduler, *args, **kwargs):
        try:
            self.runtime = SchedulerRuntime(scheduler, self.config, self.fault)
        except Exception:  # noqa: BLE001 (TAPER off, SGLang serves as stock)
            logger.exception("TAPER: could not start in this scheduler; serving as stock SGLang")
            self.runtime = None
        scheduler._taper = self.runtime

    def after_create_req(self, req, scheduler, *args, **kwargs):
        rt = self.runtime
        if rt is not None and rt.enabled:  # switched off: attached when first regulated
            rt.guard("attach", rt.attach, req)
        return req

    def _merge_held(self, scheduler) -> None:
        rt = self.runtime
        if rt is not None and rt.held is not None:
            scheduler.running_batch = rt.merge_into(scheduler.running_batch)

    def before_ingest(self, scheduler, *args, **kwargs):
        rt = self.runtime
        if rt is None:
            return
        if rt.held is not None:
            self._merge_held(scheduler)
        elif rt.views.holding and not getattr(getattr(scheduler, "running_batch", None),
                                              "reqs", None):
            rt.views.clear()  # nothing decodes: let go of the last view's requests

    def before_next_batch(self, scheduler, *args, **kwargs):
        rt = self.runtime
        if rt is not None and rt.held is not None:
            self._merge_held(scheduler)
            if "running_batch" in kwargs:
                kwargs["running_batch"] = scheduler.running_batch
            elif args:
                args = (scheduler.running_batch, *args[1:])
            return (scheduler, *args), kwargs
        return None

    # ------------------------------------------------------------ the decode step

    def around_update_running(self, original, scheduler, batch, *args, **kwargs):
        rt = self.runtime
        if rt is None or not rt.enabled:
            return original(scheduler, batch, *args, **kwargs)
        self._regulating, self._decided_len = batch, -1
        try:
            return original(scheduler, batch, *args, **kwargs)
        finally:
            self._regulating, self._decided_len = None, -1

    def around_check_decode_mem(self, original, batch, *args, **kwargs):
        rt = self.runtime
        if rt is None or batch is not self._regulating or args or kwargs:
            return original(batch, *args, **kwargs)
        rt.guard("regulate", rt.regulate, batch)
        self._decided_len = len(batch.reqs)
        ok = original(batch)
        if ok or rt.held is None:
            return ok
        # Even the kept part lacks room: everything rejoins and SGLang retracts
        # from the whole batch, as it would have without TAPER.
        rt.merge_into(batch)
        self._decided_len = -1
        return original(batch)

    def around_prepare_decode(self, original, batch, *args, **kwargs):
        rt = self.runtime
        if (rt is not None and batch is self._regulating and rt.enabled
                and len(batch.reqs) != self._decided_len):
            # No decision yet this pass, or a retraction changed the batch since.
            rt.guard("regulate", rt.regulate, batch)
        return original(batch, *args, **kwargs)

    def around_should_defer_prefill(self, original, scheduler, running_batch, *args, **kwargs):
        if original(scheduler, running_batch, *args, **kwargs):
            return True  # SGLang's own prefill-decode interval
        rt = self.runtime
        return (rt is not None and rt.enabled
                and bool(rt.guard("prefill_gate", rt.defer_prefill, running_batch)))

    def around_run_batch(self, original, scheduler, batch, *args, **kwargs):
        rt = self.runtime
        if self.config.cascade:
            from sglang_taper.adapter.cascade_backend import set_batch_groups

            decode = batch.forward_mode.is_decode()
            set_batch_groups([m.code if (m := getattr(r, "_taper", None)) is not None else -1
                              for r in batch.reqs] if decode else None)
        t0 = time.perf_counter()
        result = original(scheduler, batch, *args, **kwargs)
        if self.slowdown > 1.0:  # the forward ran synchronously (CPU, no overlap): stretch it
            time.sleep((self.slowdown - 1.0) * (time.perf_counter() - t0))
        if rt is not None and rt.enabled and batch.forward_mode.is_decode():
            rt.guard("on_run", rt.on_run, batch)
        return result

    def after_process_result(self, result, scheduler, batch, *args, **kwargs):
        rt = self.runtime
        if rt is not None and rt.enabled and batch is not None:
            rt.guard("on_result", rt.on_result, batch)
        return result

    # ------------------------------------------------------------ SGLang's own figures

    def before_control(self, scheduler, *args, **kwargs):
        """A pause, flush or weight update is being handled: the steps in flight
        measure it too (the predictor does not learn from them)."""
        rt = self.runtime
        if rt is not None:
            rt.disturb()

    def after_owning_rows(self, owners, checker, *args, **kwargs):
        # SGLang's busy-time KV conservation check counts the rows of requests in
        # running_batch/last_batch; between a step and the next pass the held part
        # owns rows too. A streaming session's turn runs on the session's KV record,
        # which the check counts as session-held already: leave it out, as SGLang does.
        rt = self.runtime
        if rt is not None and rt.held is not None:
            seen = {id(r) for r in owners}
            sessions = {id(kv) for kv in checker.tree_cache.session_records().values()}
            owners.extend(r for r in rt.held.reqs if r.kv.holds_kv and id(r) not in seen
                          and id(r.kv) not in sessions)
        return owners

    def after_get_loads(self, snapshot, inquirer, *args, **kwargs):
        # The load published after a step (to the DP controller and routers) counts
        # running_batch, which lacks the held part until the next pass.
        rt = self.runtime
        if rt is not None and rt.held is not None and snapshot is not None:
            snapshot.num_running_reqs += rt.held_count()
        return snapshot

    def after_decode_stats(self, result, reporter, *args, **kwargs):
        # SGLang's running-requests gauge and log line count the batch that ran.
        rt = self.runtime
        stats = getattr(reporter, "stats", None)
        if rt is not None and rt.held is not None and stats is not None:
            running = getattr(stats, "num_running_reqs", None)
            if running is not None and hasattr(running, "total"):
                from sglang.srt.managers.scheduler_components.metrics_reporter import QueueCount

                reqs = list(reporter.scheduler.running_batch.reqs) + list(rt.held.reqs)
                stats.num_running_reqs = QueueCount.from_reqs(
                    reqs, reporter.scheduler.enable_priority_scheduling)
        return result


_hooks: SchedulerHooks | None = None  # this process's hooks, set once by install()


def runtime() -> SchedulerRuntime | None:
    """This scheduler process's TAPER runtime (None elsewhere, or when off)."""
    return _hooks.runtime if _hooks is not None else None


def install(config: TaperConfig, slowdown: float = 1.0, fault: str | None = None) -> None:
    global _hooks
    h = _hooks = SchedulerHooks(config, slowdown, fault)
    reg = HookRegistry.register
    reg(f"{_SCHED}.__init__", h.after_init, HookType.AFTER)
    reg(f"{_SCHED}._create_generation_req", h.after_create_req, HookType.AFTER)
    reg(f"{_SCHED}.ingest_requests", h.before_ingest, HookType.BEFORE)
    reg(f"{_SCHED}.get_next_batch_to_run", h.before_next_batch, HookType.BEFORE)
    reg(f"{_SCHED}.update_running_batch", h.around_update_running, HookType.AROUND)
    reg(f"{_SCHED}._should_defer_prefill", h.around_should_defer_prefill, HookType.AROUND)
    reg(f"{_BATCH}.check_decode_mem", h.around_check_decode_mem, HookType.AROUND)
    reg(f"{_BATCH}.prepare_for_decode", h.around_prepare_decode, HookType.AROUND)
    reg(f"{_SCHED}.run_batch", h.around_run_batch, HookType.AROUND)
    reg(f"{_SCHED}.process_batch_result", h.after_process_result, HookType.AFTER)
    for control in ("pause_generation", "flush_cache"):
        reg(f"{_SCHED}.{control}", h.before_control, HookType.BEFORE)
    reg(f"{_COMPONENTS}.invariant_checker.SchedulerInvariantChecker._requests_owning_rows",
        h.after_owning_rows, HookType.AFTER)
    reg(f"{_COMPONENTS}.load_inquirer.SchedulerLoadInquirer.get_loads", h.after_get_loads,
        HookType.AFTER)
    reg(f"{_COMPONENTS}.metrics_reporter.SchedulerMetricsReporter.report_decode_stats",
        h.after_decode_stats, HookType.AFTER)
