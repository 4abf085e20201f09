"""Every access to SGLang internals (sglang==0.5.23) lives in this package:
`scheduler` (per-step admission hooks), `server` (request validation, n>1
groups, /taper/stats), `control` (GET/POST /taper/config), `dp` (group-affine
data-parallel dispatch), `greedy` (batches' sampling flags recomputed when
requests leave), `metrics` (Prometheus), `frontend` (the endpoint that tags
fork branches). When SGLang changes, this package is what changes."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from controller.config import TaperConfig

_INTERNAL_STATE = (
    "sglang.srt.managers.scheduler_components.internal_state."
    "SchedulerInternalStateController.get_internal_state"
)


def _add_internal_state(result, *args, **kwargs):
    from sglang_taper.adapter.scheduler import runtime

    rt = runtime()
    if rt is not None:
        status = rt.guard("status", rt.status)
        result.internal_state["taper"] = status if status is not None else {
            "enabled": True, "regulating": False, "degraded": True,
            "degraded_reason": rt.stats.degraded}
    return result


def install(config: TaperConfig, slowdown: float = 1.0, fault: str | None = None) -> None:
    """Register TAPER's hooks. Called once per SGLang process by the plugin.
    `slowdown` > 1 makes every forward pass take that many times as long (a
    slower machine, for testing that the benchmark's verdict does not depend
    on the machine's speed). `fault`: a point where TAPER's scheduler code raises
    on purpose (adapter/runtime.py FAULT_POINTS), to prove the fail-safe."""
    from sglang_taper.adapter import control, dp, greedy, scheduler, server

    scheduler.install(config, slowdown, fault)
    server.install()
    control.install()
    dp.install()
    greedy.install()
    if config.cascade:
        from sglang_taper.adapter import cascade_backend

        cascade_backend.register(config)
    HookRegistry.register(_INTERNAL_STATE, _add_internal_state, HookType.AFTER)
