"""Which branch groups take the two-level (cascade) attention path.

Pure Python, no torch: `taper serve` checks a `--taper-cascade-profile` with it
before a server starts, and the engine's backends (sglang_taper/cascade.py,
sglang_taper/adapter/cascade_backend.py) ask it per group and step.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, slots=True)
class CascadeGate:
    """Which branch groups take the two-level path: a group of B members sharing
    P prefix tokens does when

        P >= min_prefix[i],   i: the widest measured width <= B

    `min_prefix[i]` is where the two paths' measured attention times cross at
    width `widths[i]` (`taper profile`). The two-level path reads the prefix once
    instead of B times but has fixed costs of its own (its extra operations, the
    merge), so the crossing falls as B grows. Widths between two measured ones
    take the narrower one's threshold, the higher; below the narrowest, none
    pays. Deciding costs a bisection over a handful of widths."""

    widths: tuple[int, ...]  # group widths measured, ascending
    min_prefix: tuple[float, ...]  # tokens, per width; inf: no prefix measured paid

    def __post_init__(self) -> None:
        w, m = self.widths, self.min_prefix
        if not w or len(w) != len(m) or any(a >= b for a, b in zip(w, w[1:])) or w[0] < 2:
            raise ValueError(f"CascadeGate.widths must ascend from >= 2, one per threshold, "
                             f"got {w!r} for {m!r}")
        if not all(x >= 0 for x in m):  # NaN fails too
            raise ValueError(f"CascadeGate.min_prefix must be >= 0 tokens, got {m!r}")

    def pays(self, width: int, prefix: int) -> bool:
        """True when the two-level path is expected faster for this group."""
        i = bisect.bisect_right(self.widths, width) - 1
        return i >= 0 and prefix >= self.min_prefix[i]

    def pays_many(self, width: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """`pays` of each (width, prefix) pair, as a bool array."""
        i = np.searchsorted(self.widths, width, side="right") - 1
        return prefix >= np.array((*self.min_prefix, math.inf))[i]  # i = -1: none pays

    def to_dict(self) -> dict:
        return {"widths": list(self.widths),
                "min_prefix": [None if math.isinf(x) else x for x in self.min_prefix]}

    @classmethod
    def from_dict(cls, data: dict) -> CascadeGate:
        return cls(tuple(int(x) for x in data["widths"]),
                   tuple(math.inf if x is None else float(x) for x in data["min_prefix"]))

    @classmethod
    def load(cls, path: str | Path) -> CascadeGate:
        """The `cascade` section of a profile written by `taper profile`; a
        missing, unreadable or malformed file is one ValueError line."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON profile ({e})") from None
        if not isinstance(data, dict) or "cascade" not in data:
            raise ValueError(f"{path}: no cascade section (write one with "
                             f"`taper profile --cascade-only --out {path}`)")
        try:
            return cls.from_dict(data["cascade"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad cascade section: {e}") from None


# The CPU engine's gate (the `taper_cascade` backend, tiny Llama: 4 query heads,
# 2 KV heads, head_dim 32, 2 layers, float32), measured by `taper profile` on a
# 2-core x86_64 host: groups of 2 need 2K shared tokens, of 4 about 300, wider
# ones any prefix measured. The same numbers, with the timings they come from,
# are in bench/sim/profiles/cpu_tiny_llama_cascade.json (a test keeps the two
# equal); another host may measure its own and pass --taper-cascade-profile.
CPU_GATE = CascadeGate(widths=(2, 4, 8, 16, 32, 64),
                       min_prefix=(2180.0, 291.0, 64.0, 64.0, 64.0, 64.0))
# FlashInfer's two-level path without a profile: every group of two or more that
# shares any prefix (sglang_taper/cascade.py group_layout with no gate).
EVERY_SHARED = CascadeGate(widths=(2,), min_prefix=(1.0,))
# An engine that never takes the two-level path (another attention backend).
NEVER = CascadeGate(widths=(2,), min_prefix=(math.inf,))
