"""Every access to SGLang internals (sglang==0.5.23) lives here.

When SGLang changes, this module is what changes.
"""

from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from controller.config import TaperConfig

logger = logging.getLogger("sglang_taper")

_INTERNAL_STATE = (
    "sglang.srt.managers.scheduler_components.internal_state."
    "SchedulerInternalStateController.get_internal_state"
)

_config: TaperConfig | None = None


def status() -> dict:
    """What the scheduler reports about TAPER in its internal state."""
    assert _config is not None
    return {"enabled": True, "policy": _config.policy, "config": _config.to_json()}


def _add_internal_state(result, *args, **kwargs):
    result.internal_state["taper"] = status()
    return result


def install(config: TaperConfig) -> None:
    """Register TAPER's hooks. Called once per SGLang process by the plugin."""
    global _config
    _config = config
    HookRegistry.register(_INTERNAL_STATE, _add_internal_state, HookType.AFTER)
    logger.info("TAPER enabled: policy=%s", config.policy)
