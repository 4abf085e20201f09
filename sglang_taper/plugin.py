"""SGLang plugin entry point (group `sglang.srt.plugins`).

SGLang loads plugins in every one of its processes wherever this package is
installed, so `load` does nothing unless `taper serve` (or the user) enabled
TAPER through the environment: installed but not enabled, SGLang serves
exactly as stock.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("sglang_taper")

ENV_ENABLED = "TAPER_ENABLED"
ENV_CONFIG = "TAPER_CONFIG"
ENV_BATCH_INVARIANT = "TAPER_BATCH_INVARIANT"  # "1": CPU matmuls batch-invariant
ENV_SLOWDOWN = "TAPER_SLOWDOWN"  # F > 1: every forward pass takes F times as long (testing)
ENV_FAULT = "TAPER_INJECT_FAULT"  # POINT[@N] or later: TAPER raises there (testing)


def enabled() -> bool:
    return os.environ.get(ENV_ENABLED) == "1"


def load() -> None:
    if not enabled():
        return
    from controller.config import TaperConfig
    from sglang_taper import adapter

    config = TaperConfig.from_json(os.environ.get(ENV_CONFIG) or "{}")
    adapter.install(config, slowdown=float(os.environ.get(ENV_SLOWDOWN) or 1.0),
                    fault=os.environ.get(ENV_FAULT) or None)
    if os.environ.get(ENV_BATCH_INVARIANT) == "1":
        from sglang_taper.cpu import batch_invariant

        batch_invariant.enable()
