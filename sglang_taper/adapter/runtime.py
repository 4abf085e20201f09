"""TAPER's state inside one SGLang scheduler process: the controller's two calls
(decide before a decode step, observe after it), the TP agreement on what runs,
and the fail-safe.

Fail-safe: TAPER must never take the scheduler down. Every entry point from a
hook runs under `guard`: an exception is logged once with its traceback,
counted, and turns regulation off for this scheduler (`degraded`, with the
reason, in /taper/stats and the `taper_degraded` gauge). A step whose decision
failed runs whole; a held part is always merged back. Under tensor parallelism
rank 0 decides and broadcasts, and a failure on rank 0 is broadcast as "keep
all, degrade", so every rank reaches the same fallback at the same step.
Degraded stays until an operator re-arms regulation (POST /taper/rearm, `rearm`):
a fresh controller, as at launch, without restarting the server.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable

import numpy as np

from controller import Controller, PrefillView, StepResult, TaperConfig
from sglang_taper.adapter import batch as surgery
from sglang_taper.adapter.reqmeta import MAX_GROUPS, GroupCodes, LiveViews, ReqMeta, parse_request
from sglang_taper.stats import TaperStats, step_record

logger = logging.getLogger("sglang_taper")

_LOG_EVERY_S = 10.0
FAULT_POINTS = ("attach", "decide", "split", "observe", "stats")  # where a fault can be injected
FAULT_LATER = "later"  # TAPER_INJECT_FAULT=later: none at launch; POST /taper/fault sets one
_DEGRADED = "degraded after an error"
# Fixed at launch: the attention backend and its gate (cascade), the predictor's warm start.
LAUNCH_ONLY = ("cascade", "cascade_profile", "profile")


class InjectedFault(RuntimeError):
    """Raised on purpose (TAPER_INJECT_FAULT) to prove the fail-safe."""


def agree_on_keep(is_rank0: bool, decide: Callable[[], np.ndarray],
                  broadcast: Callable[[list], list], degrade: str | None = None
                  ) -> tuple[np.ndarray | None, str | None]:
    """Every TP rank must build the same batch: rank 0 decides (its clock and fit
    are the reference) and broadcasts the kept indices, or None ("keep all") with
    a reason to degrade: its decision failed, or `degrade` (an earlier fault on
    rank 0) says so. Every rank calls `broadcast` exactly once, whatever happened
    on rank 0, so none blocks. Returns (keep or None, reason or None)."""
    payload: list = [None, degrade]
    if is_rank0 and degrade is None:
        try:
            payload = [decide().tolist(), None]
        except Exception as e:  # noqa: BLE001 (the fail-safe: see the module docstring)
            logger.exception("TAPER: the decision failed on TP rank 0; every rank runs whole")
            payload = [None, f"decide: {type(e).__name__}: {e}"]
    keep, reason = broadcast(payload)
    return (None if keep is None else np.asarray(keep, dtype=np.int64)), reason


class SchedulerRuntime:
    """TAPER's state inside one scheduler process."""

    def __init__(self, scheduler, config: TaperConfig, fault: str | None = None) -> None:
        self.config = config
        # TaperConfig.enabled, read by every hook first: off, they return at once
        self.enabled = config.enabled
        gate = None
        if config.cascade:  # the controller counts a prefix once only where the engine does
            from sglang_taper.adapter.cascade_backend import engine_gate

            gate = engine_gate(getattr(scheduler, "server_args", None), config)
        self.controller = Controller(config, cascade_gate=gate)
        self.stats = TaperStats(str(config.policy))
        self.groups = GroupCodes()
        # one rank: views in a fixed order (decisions mapped to the batch's); under TP
        # every rank applies rank 0's indices to its batch: views in the batch's order
        self.views = LiveViews(canonical=scheduler.tp_size == 1)
        self._uids = itertools.count()  # the requests' numbers, in order of attachment
        self.held = None  # the held-out part of the running batch, or None
        # forward_iter -> (decision, view, keep), or (None, seqs, KV tokens) for a
        # step run whole without asking the controller (Controller.observe_passthrough)
        self.inflight: dict[int, tuple] = {}
        self._pending = None  # (batch, decision, view, keep) of the step being built
        self._last_log = time.monotonic()
        self._metrics = None
        self._disturbed_before = 0.0  # steps launched before this (monotonic s) spanned a
        # pause or a control request: not learnt from
        self.hook_seconds = 0.0  # seconds spent in TAPER's hooks on the scheduler path
        self.hook_split: dict[str, float] = {}  # the same, per entry point
        self.decode_seconds = 0.0  # seconds of measured decode steps
        self.prefill_seconds = 0.0  # seconds of measured prefill (extend) steps
        self._degrade_next: str | None = None  # TP: a fault to announce in the next broadcast
        self._rank0_decision = None
        # TAPER_INJECT_FAULT given at all (even `later`): POST /taper/fault may set one
        self._faults_allowed = bool(fault)
        self._fault, self._fault_at = _parse_fault(fault)
        self._gate = gate
        self._calls: dict[str, int] = {}
        self.scheduler = scheduler
        self.tp_size = scheduler.tp_size
        self._trace = _open_trace(os.environ.get(ENV_TRACE), scheduler)
        self.disabled = surgery.unsupported(scheduler)
        if self.disabled:
            logger.warning("TAPER regulation is off in this scheduler: %s", self.disabled)
        if getattr(scheduler.server_args, "enable_metrics", False):
            from sglang_taper.adapter.metrics import TaperMetrics

            self._metrics = TaperMetrics()
            self._metrics.enabled.set(int(config.enabled))
        logger.info("TAPER installed: policy=%s enabled=%s tp_size=%d%s", config.policy,
                    config.enabled, self.tp_size,
                    f" (injecting a fault in {self._fault})" if self._fault else "")

    # ------------------------------------------------------------- run-time control

    def reconfigure(self, changes: dict) -> None:
        """Apply a JSON object of TaperConfig fields (POST /taper/config), between
        two steps. Raises ValueError (one line), changing nothing, for a bad field
        or value or a field fixed at launch. The controller keeps its predictor's
        fit (Controller.reconfigure); new default SLOs apply to requests that
        arrive afterwards. Switching off drops the bookkeeping of steps in flight
        (their results are not observed): the hooks do nothing until it is on;
        requests that arrived meanwhile are attached, and timed, when first seen."""
        new = self.config.merged(changes)
        for name in LAUNCH_ONLY:
            if getattr(new, name) != getattr(self.config, name):
                raise ValueError(f"TaperConfig.{name} is fixed at launch; restart the server "
                                 f"to change it")
        if new.spec.entry.needs_cost:
            raise ValueError(f"policy {new.policy}: needs the true step-time model, which "
                             f"only the simulator has (taper sim)")
        if new != self.config:
            self.guard("reconfigure", self._take, new)

    def reset_stats(self) -> None:
        """POST /taper/stats/reset: counters, histograms and self-timed overhead
        from zero; the predictor, the config, the requests in flight and a
        degraded state (not a counter) stay."""
        degraded = self.stats.degraded
        self.stats = TaperStats(str(self.config.policy))
        self.stats.degraded = degraded
        self.hook_seconds = 0.0
        self.hook_split = {}
        self.decode_seconds = 0.0
        self.prefill_seconds = 0.0
        self.views.reset_counts()

    def rearm(self) -> bool:
        """POST /taper/rearm: after a fault, regulate again without a restart
        (the warm radix cache and the requests in flight stay). The controller
        starts afresh, as at launch, its predictor included (a fault may have left
        the fit itself wrong); steps in flight are not observed; an injected fault
        is spent. Called between two steps, when no part is held. The `faults`
        counter keeps counting. Returns whether regulation was degraded; raises
        ValueError when it is off for another reason (unsupported, a broken TP
        group), which a re-arm cannot mend."""
        if self.disabled and not self.disabled.startswith(_DEGRADED):
            raise ValueError(f"regulation is off for another reason: {self.disabled}")
        was = self.stats.degraded is not None or self._degrade_next is not None
        if not was:
            return False
        if self.held is not None:  # cannot happen between steps; never lose a part
            raise ValueError("a held part of the batch is still out; try again")
        self.controller = Controller(self.config, cascade_gate=self._gate)
        self.inflight.clear()
        self._pending = self._rank0_decision = self._degrade_next = None
        self.disabled = None
        self.stats.degraded = None
        self._fault, self._fault_at, self._calls = None, 0, {}
        self._disturbed_before = time.monotonic()
        if self._metrics is not None:
            self._metrics.degraded.set(0)
        logger.warning("TAPER: regulation re-armed after a fault (POST /taper/rearm)")
        return True

    def inject(self, spec: str) -> None:
        """POST /taper/fault (testing the fail-safe): raise at POINT from its N-th
        call on, counted from now. Only on a server launched with
        TAPER_INJECT_FAULT (`later` for none at launch); ValueError otherwise."""
        if not self._faults_allowed:
            raise ValueError("fault injection is off: launch the server with "
                             "TAPER_INJECT_FAULT=later (testing only)")
        point, at = _parse_fault(spec, "fault")
        if point is None:
            raise ValueError(f"no fault in {spec!r}: give POINT or POINT@N, "
                             f"POINT one of {FAULT_POINTS}")
        self._fault, self._fault_at, self._calls = point, at, {}
        logger.warning("TAPER: injecting a fault in %s from call %d", self._fault,
                       self._fault_at)

    def _take(self, config: TaperConfig) -> None:
        changed = {k: v for k, v in config.to_dict().items() if getattr(self.config, k) != v}
        self.controller.reconfigure(config)
        self.config = config
        self.stats.policy = str(config.policy)
        if not config.enabled:
            self._pending = None
            self.inflight.clear()
        self.enabled = config.enabled
        if self._metrics is not None:
            self._metrics.enabled.set(int(config.enabled))
        logger.info("TAPER: config changed: %s", changed)

    # ------------------------------------------------------------- fail-safe

    def guard(self, where: str, fn: Callable, *args):
        """Run one of TAPER's entry points; on an exception, degrade (module
        docstring) and return None. Also times it (TAPER's cost on the
        scheduler's critical path)."""
        t0 = time.perf_counter()  # vDSO clock; time.thread_time() is a slow syscall here
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 (the fail-safe)
            self.degrade(where, e)
            return None
        finally:
            dt = time.perf_counter() - t0
            self.hook_seconds += dt
            self.hook_split[where] = self.hook_split.get(where, 0.0) + dt

    def degrade(self, where: str, exc: BaseException | None, reason: str | None = None,
                agreed: bool = False) -> None:
        """Turn regulation off for this scheduler, once, saying why (under TP: from
        the step all ranks agree on, `agreed` when that is now)."""
        if exc is not None:
            self.stats.faults += 1
        first = self.stats.degraded is None
        reason = reason or f"{where}: {type(exc).__name__}: {exc}"
        if first:
            self.stats.degraded = reason
            if exc is not None:
                logger.error("TAPER: an error in %s; regulation is off for this scheduler from "
                             "now on and every step runs whole", where, exc_info=exc)
            else:
                logger.error("TAPER: regulation is off for this scheduler: %s", reason)
        else:
            logger.debug("TAPER: another fault in %s: %r", where, exc)
        if self.tp_size > 1 and not agreed:
            # Every rank must stop splitting at the same step: rank 0 announces it
            # in its next broadcast. A follower's own fault is reported, and the
            # follower keeps applying rank 0's decisions.
            self._degrade_next = self._degrade_next or reason
        else:
            self.disabled = self.disabled or f"{_DEGRADED} ({reason})"
        self._pending = None
        if self._metrics is not None:
            self._metrics.degraded.set(1)

    def _inject(self, where: str) -> None:
        if self._fault == where:
            n = self._calls[where] = self._calls.get(where, 0) + 1
            if n >= self._fault_at:
                raise InjectedFault(f"injected fault in {where} (call {n})")

    # ----------------------------------------------------------- new requests

    def attach(self, req) -> ReqMeta:
        """Parse a new request's metadata and attach what the view needs."""
        self._inject("attach")
        if len(self.groups) > MAX_GROUPS:
            self.groups.prune(self._live_groups())
        meta = req._taper = parse_request(req, self.config, self.groups, next(self._uids))
        custom = req.sampling_params.custom_params
        group = custom.get("taper_group") if isinstance(custom, dict) else None
        self.stats.note_request(group if isinstance(group, str) else meta.group)
        return meta

    def _live_groups(self) -> set[str]:
        """Group names some request still carries: running, held or waiting."""
        sched = self.scheduler
        reqs = list(sched.running_batch.reqs) + list(sched.waiting_queue)
        if self.held is not None:
            reqs += self.held.reqs
        return {m.group for r in reqs if (m := getattr(r, "_taper", None)) is not None
                and m.group is not None}

    def _metas(self, reqs: list, now: float) -> list[ReqMeta]:
        metas = []
        for r in reqs:
            m = getattr(r, "_taper", None)
            if m is None:
                m = self.attach(r)
            m.stamp_first_token(r, now)
            metas.append(m)
        return metas

    # ----------------------------------------------------------- decode step

    def regulate(self, batch) -> None:
        """Decide which sequences of `batch` decode; park the rest in `self.held`."""
        self._pending = None
        if self.held is not None:  # defensive: never lose a parked part
            self.merge_into(batch)
        if self.disabled:
            return
        reqs = batch.reqs
        if self.tp_size > 1:
            # Whether to take part in this step's collectives must not depend on
            # anything a rank can get wrong alone (its attach may have failed).
            if not any(_names_group(r) for r in reqs):
                return
        elif not any(m is not None and m.group is not None
                     for m in (getattr(r, "_taper", None) for r in reqs)):
            return
        if surgery.unsafe_to_split(batch):
            self.stats.unsafe_steps += 1
            return
        now = time.monotonic()
        if self.tp_size > 1:
            self._regulate_tp(batch, reqs, now)
            return
        view = self._view(reqs, now)
        self._inject("decide")
        decision = self.controller.decide(view)
        keep = decision.keep  # the view's indices; the batch's are `to_batch`'s
        if len(keep) < len(reqs):
            self._inject("split")
            kept, held = self.views.to_batch(keep), self.views.to_batch(decision.held)
            self.held = surgery.split(batch, kept, held)
            self.views.reorder(kept, held)
        self._pending = (batch, decision, view, keep)

    def _regulate_tp(self, batch, reqs: list, now: float) -> None:
        """Tensor parallelism: every rank must run the same batch. Rank 0's decision
        is broadcast; then, on a step that splits, the ranks confirm that every one
        of them split (and that none has a fault to announce) before any runs: if
        one did not, every rank puts its batch back as it was and all stop
        regulating at this step."""
        keep, view = self._keep_on_every_rank(reqs, now)
        if keep is None or len(keep) == len(reqs):
            if keep is not None:
                self._pending = (batch, None, view, keep)
            return
        held_idx = surgery.complement(keep, len(reqs))
        held, failure = None, None
        try:
            self._inject("split")
            held = surgery.split(batch, keep, held_idx)
        except Exception as e:  # noqa: BLE001 (agreed on below)
            failure = e
        failed = self._ranks_in_trouble(failure is not None or self._degrade_next is not None)
        if failed:
            if held is not None:
                surgery.unsplit(batch, held, keep, held_idx)
            if failure is not None:
                self.degrade("split", failure, agreed=True)
            self.degrade("split (TP)", None, agreed=True, reason=self._degrade_next or (
                f"a fault on TP rank(s) {failed}; every rank runs whole"))
            return
        self.held = held
        self.views.reorder(keep, held_idx)
        self._pending = (batch, None, view, keep)

    def _ranks_in_trouble(self, mine: bool) -> list[int]:
        """TP: the ranks (in the group) that report trouble; every rank calls this
        on the same steps (those whose agreed decision splits)."""
        import torch
        import torch.distributed as dist
        from sglang.srt.runtime_context import get_parallel

        group = get_parallel().tp_group
        flags = torch.zeros(len(group.ranks), dtype=torch.int32)
        flags[group.rank_in_group] = int(mine)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group.cpu_group)
        return flags.nonzero().flatten().tolist()

    def _view(self, reqs: list, now: float):
        return self.views.build(reqs, self._metas, now, len(self.scheduler.waiting_queue),
                                self._queued())

    def _queued(self) -> PrefillView | None:
        """The prefill waiting behind this step, with the latency-critical requests
        waiting for it (their TTFT budgets the step), or None when none waits.
        Per decode step, so no radix-cache match: the prefix lengths are those
        SGLang's own prefill attempt found this pass (0 for a new request)."""
        if not self.scheduler.waiting_queue:
            return None
        queued = self._waiting_prefill(match=False)
        return queued if len(queued.arrival) else None

    def _keep_on_every_rank(self, reqs: list, now: float) -> tuple[np.ndarray | None, object]:
        """TP: the indices every rank keeps (None: all, this step) and this rank's
        view (None where it could not be built: the rank still follows rank 0)."""
        from sglang.srt.runtime_context import get_parallel
        from sglang.srt.utils.common import broadcast_pyobj

        group = get_parallel().tp_group
        is_rank0 = group.rank_in_group == 0
        view = None

        def decide() -> np.ndarray:
            nonlocal view
            view = self._view(reqs, now)
            self._inject("decide")
            self._rank0_decision = self.controller.decide(view)
            return self._rank0_decision.keep

        def broadcast(payload: list) -> list:
            return broadcast_pyobj(payload, group.rank, group.cpu_group, src=group.ranks[0])

        def counted(fn: Callable) -> Callable:
            def run():
                try:
                    return fn()
                except Exception:
                    self.stats.faults += 1  # agree_on_keep logs it and tells every rank
                    raise
            return run

        self._rank0_decision = None
        try:
            keep, reason = agree_on_keep(is_rank0, counted(decide), broadcast, self._degrade_next)
        except Exception as e:
            # The collective itself failed: the group is broken, and another
            # attempt could only block. Off on this rank, whatever the others do.
            self.stats.faults += 1
            self.disabled = f"the TP broadcast failed ({type(e).__name__}: {e})"
            raise
        if reason is not None:
            self.degrade("decide (TP rank 0)", None, reason=reason, agreed=True)
            return None, None
        if not is_rank0:
            try:
                view = self._view(reqs, now)
            except Exception as e:  # noqa: BLE001 (reported; the split still follows rank 0)
                self.degrade("view (TP follower)", e)
        return keep, view

    def merge_into(self, running_batch):
        """Put the held part back; returns the running batch to use. Never drops
        the held part: if the merge fails it stays parked (and is counted as
        owning KV) and the next pass tries again."""
        held = self.held
        if held is None:
            return running_batch
        try:
            out = surgery.merge(running_batch, held)
        except Exception as e:  # noqa: BLE001
            self.degrade("merge", e)
            return running_batch
        self.held = None
        return out

    def on_run(self, batch) -> None:
        """After `run_batch` launched a decode step (forward_iter is set)."""
        pending, self._pending = self._pending, None
        if (pending is None or pending[0] is not batch or pending[2] is None
                or len(pending[3]) != len(batch.reqs)):
            n = len(batch.reqs)
            # numpy, not a torch reduction: torch would wake its intra-op thread pool
            kv = int(batch.seq_lens_cpu.numpy().sum()) if batch.seq_lens_cpu is not None else 0
            self.inflight[batch.forward_iter] = (None, n, kv)  # a passthrough step
            return
        _, decision, view, keep = pending
        if decision is None:  # TP: rank 0 keeps its own decision, followers a stand-in
            decision = self._rank0_decision or self._follower_decision(view, keep)
            self._rank0_decision = None
        self.inflight[batch.forward_iter] = (decision, view, keep)

    def _follower_decision(self, view, keep: np.ndarray):
        d = self.controller.passthrough(len(keep), int(view.kv_len[keep].sum()))
        d.keep = keep
        d.held = surgery.complement(keep, len(view))
        d.ids = view.ids
        return d

    def disturb(self) -> None:
        """A pause or a control request is being handled: the steps in flight
        measure it too, so none of them is learnt from."""
        self._disturbed_before = time.monotonic()

    def on_result(self, batch) -> None:
        """After the result of a step was processed: observe and record."""
        now = time.monotonic()
        if batch.forward_mode.is_extend():
            self._on_prefill(batch, now)
            return
        entry = self.inflight.pop(batch.forward_iter, None)
        if entry is None or batch.launch_ts is None:
            return
        decision, view, keep = entry
        step_time = now - batch.launch_ts
        self.decode_seconds += step_time
        if self._trace is not None:
            n, kv = (entry[1], entry[2]) if decision is None else \
                (len(keep), int(view.kv_len[keep].sum()))
            self._trace_line(f"d,{batch.launch_ts:.6f},{now:.6f},{n},{kv}\n")
        disturbed = batch.launch_ts <= self._disturbed_before
        self._inject("observe")
        if decision is None:  # a step without branches: learn from it, count it, nothing more
            _, n_seqs, kv_tokens = entry
            self.controller.observe_passthrough(n_seqs, kv_tokens, step_time, now, disturbed)
            self._inject("stats")
            self.stats.steps += 1
            if self._metrics is not None:
                self._metrics.steps.inc()
            return
        self.controller.observe(StepResult(decision, step_time=step_time, end=now,
                                           disturbed=disturbed))
        self._inject("stats")
        rec, widths = step_record(view, keep, self.groups.names, decision.budget,
                                  decision.predicted, step_time, now)
        # The decision digest tells TP ranks' decisions apart (by request id: the batch
        # that ran is the kept part, in view order); one rank needs none.
        self.stats.record(rec, widths, [r.rid for r in batch.reqs] if self.tp_size > 1 else None)
        if self._metrics is not None:
            self._metrics.observe(rec, widths)
        if now - self._last_log > _LOG_EVERY_S and self.stats.regulated_steps:
            self._last_log = now
            logger.info(self.stats.summary())

    def _trace_line(self, line: str) -> None:
        try:
            self._trace.write(line)
        except (OSError, ValueError) as e:  # a full disk ends the trace, not regulation
            logger.warning("%s: writing failed (%s); step trace stopped", ENV_TRACE, e)
            trace, self._trace = self._trace, None
            try:
                trace.close()
            except (OSError, ValueError):
                pass

    def _on_prefill(self, batch, now: float) -> None:
        for r in batch.reqs:
            m = getattr(r, "_taper", None)
            if m is not None:
                m.stamp_first_token(r, now)
        if batch.launch_ts is not None and batch.extend_num_tokens:
            self.prefill_seconds += now - batch.launch_ts
            if self._trace is not None:
                # the requests' whole prompts (Req.seqlen: the overlap loop's batch copy
                # has no seq_lens_sum)
                context = sum(r.seqlen for r in batch.reqs)
                self._trace_line(f"p,{batch.launch_ts:.6f},{now:.6f},"
                                 f"{int(batch.extend_num_tokens)},{len(batch.reqs)},"
                                 f"{context}\n")
            self.controller.observe_prefill(int(batch.extend_num_tokens), now - batch.launch_ts,
                                            batch.launch_ts <= self._disturbed_before)

    # ----------------------------------------------------------- prefill gate

    def defer_prefill(self, running_batch) -> bool:
        """Before SGLang builds a prefill batch: True to decode the running batch
        first (the controller's prefill gate, controller/prefill.py)."""
        sched = self.scheduler
        if (self.disabled or not self.controller.gates_prefill or self.tp_size > 1
                or sched.chunked_req is not None or not sched.waiting_queue
                or running_batch.is_empty()):
            return False
        reqs = running_batch.reqs
        if not any(m is not None and m.critical
                   for m in (getattr(r, "_taper", None) for r in reqs)):
            return False  # no latency-critical request decoding: nothing to protect
        now = time.monotonic()
        view = self.views.build(reqs, self._metas, now, len(sched.waiting_queue), None)
        deferred = not self.controller.admit_prefill(view, self._waiting_prefill())
        if deferred:
            self.stats.deferred_prefills += 1
        return deferred

    def _waiting_prefill(self, match: bool = True) -> PrefillView:
        """The prefill SGLang would build now, approximately: waiting requests in
        queue order, their prompt tokens not in the radix cache (matched now when
        `match`, else as last matched), up to the scheduler's per-step token
        budget; and the waiting critical requests."""
        from sglang.srt.mem_cache.common import match_kv_cache

        sched = self.scheduler
        limits = [x for x in (sched.max_prefill_tokens, sched.chunked_prefill_size) if x]
        budget = min(limits) if limits else 1 << 30
        tokens, arrival, ttft = 0, [], []
        for req in sched.waiting_queue:
            m = getattr(req, "_taper", None)
            if m is None:
                m = self.attach(req)
            if m.critical:
                arrival.append(m.arrival)
                ttft.append(m.ttft)
            if tokens < budget:
                if match:  # what SGLang's FCFS policy does to every waiting request each pass
                    match_kv_cache(req, sched.tree_cache)
                tokens += max(1, len(req.origin_input_ids) - req.prefix_len)
        return PrefillView(min(tokens, budget), np.asarray(arrival, dtype=np.float64),
                           np.asarray(ttft, dtype=np.float64))

    # ----------------------------------------------------------------- figures

    def held_count(self) -> int:
        return 0 if self.held is None else len(self.held.reqs)

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
            "held_reqs": self.held_count(),
            "last_step_held": self.stats.history[-1].held if self.stats.history else 0,
        }

    def status(self) -> dict:
        ctl = self.controller
        ctl.flush()
        pred = ctl.predictor
        return {
            "dp_rank": _dp_rank(),
            "kv": self.kv_figures(),
            "enabled": self.enabled,
            "regulating": self.enabled and not self.disabled,
            "disabled_reason": self.disabled,
            "batch_invariant": _batch_invariant(),
            "config": self.config.to_json(),
            "overhead": {"hook_seconds": self.hook_seconds, "by_method_s": self.hook_split,
                         "decode_seconds": self.decode_seconds,
                         "hook_us_per_step": 1e6 * self.hook_seconds / max(1, self.stats.steps),
                         "views": self.views.counts(),
                         "fraction_of_decode": self.hook_seconds / max(1e-9,
                                                                       self.decode_seconds)},
            "predictor": {"weights": pred.w.tolist(),  # the raw fit, seconds per scaled unit
                          # what decisions use: clipped, floored, per unscaled unit
                          "unit_costs": pred.unit_costs.tolist(),
                          "level": pred.level,  # measured / prior-predicted step time
                          "observed": pred.observed,  # steps learnt from
                          "rejected": {"disturbed": pred.outliers_disturbed,
                                       "spike": pred.outliers_spike},
                          "upper_margin_s": pred.upper_margin,
                          "gap_s": ctl.gap,
                          # prefill steps: intercept and seconds per 1024 prompt tokens
                          "prefill_weights": ctl.prefill_predictor.w[[0, 3]].tolist(),
                          "prefill_observed": ctl.prefill_predictor.observed,
                          "prefill_seconds": self.prefill_seconds},
            **self.stats.to_dict(),
        }


def _parse_fault(spec: str | None, source: str = "TAPER_INJECT_FAULT"
                 ) -> tuple[str | None, int]:
    """TAPER_INJECT_FAULT: `POINT` or `POINT@N` (raise from the N-th call on), or
    `later` (none now)."""
    if not spec or spec == FAULT_LATER:
        return None, 0
    point, _, at = spec.partition("@")
    if point not in FAULT_POINTS:
        raise ValueError(f"{source}: {point!r} is not one of {FAULT_POINTS} "
                         f"(or {FAULT_LATER!r})")
    if at and not (at.isdigit() and int(at) >= 1):
        raise ValueError(f"{source}: the call number in {spec!r} must be an "
                         f"integer >= 1")
    return point, int(at or 1)


def _names_group(req) -> bool:
    """The request's own metadata names a branch group (read from what every TP
    rank received alike, not from what this rank attached)."""
    custom = req.sampling_params.custom_params
    return (isinstance(custom, dict) and "taper_group" in custom
            and req.sampling_params.max_new_tokens != 0)


ENV_TRACE = "TAPER_STEP_TRACE"  # PATH: every step's kind, launch, end and size, as CSV


def _open_trace(path: str | None, scheduler):
    """The step trace's file (TAPER_STEP_TRACE=PATH), line-buffered so a killed
    server leaves whole lines; a rank other than the first writes PATH.tpT.dpD
    (.ppP for a later pipeline stage). With SGLang's overlap scheduler (the GPU
    default) a step's end is when its result was processed, after the next
    step's launch: gaps come out negative and step times include the overlap.
    Lines: `d,launch,end,seqs,kv_tokens` for a decode step, `p,launch,end,
    new_tokens,requests,context_tokens` for a prefill step (context: the
    requests' whole prompts, cached prefixes included; scheduler monotonic
    seconds). A path that cannot be opened is logged and traces nothing."""
    if not path:
        return None
    tp, pp = getattr(scheduler, "tp_rank", 0) or 0, getattr(scheduler, "pp_rank", 0) or 0
    try:
        dp = _dp_rank() or 0
    except Exception:  # no parallel context (a unit test's stand-in scheduler)
        dp = getattr(scheduler, "dp_rank", 0) or 0
    if tp or dp or pp:
        path = f"{path}.tp{tp}.dp{dp}" + (f".pp{pp}" if pp else "")
    try:
        f = open(path, "a", buffering=1)  # noqa: SIM115 (open for the server's life)
        if f.tell() == 0:  # a restarted server appends to its predecessor's lines
            f.write("kind,launch,end,size,count,context\n")
    except OSError as e:
        logger.warning("%s=%s: cannot write it (%s); no step trace", ENV_TRACE, path, e)
        return None
    return f


def _dp_rank() -> int | None:
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().dp_rank


def _batch_invariant() -> bool:
    from sglang_taper.cpu import batch_invariant

    return batch_invariant.enabled()
