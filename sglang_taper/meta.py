"""Branch metadata carried in `sampling_params.custom_params` (keys `taper_*`).

Pure Python: the frontend endpoint writes it, the server validates it when a
request arrives (HTTP 400 on bad input), the scheduler reads it.

    taper_group     str, 1..128 chars   the branch group (one fork, or one n>1 request)
    taper_branch    int >= 0            index within the group; if absent, the
                                        scheduler numbers members by arrival
    taper_width     int >= 1            branches the group was created with
    taper_ttft      float > 0, seconds  the request's TTFT SLO (default: the server's)
    taper_tpot      float > 0, seconds  its TPOT SLO (default: the server's)
    taper_critical  bool                latency-critical (default: true for ordinary
                                        requests, false for branches)
    taper_parent    str                 the enclosing group of a nested fork
    taper_program   str, 1..128 chars   the program run the request belongs to (every
                                        stage and branch of it): keeps a program on
                                        one data-parallel rank
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PREFIX = "taper_"
# The same keys, as one JSON string, in the request's `custom_labels` under this
# name: the field SGLang's router (sglang-router 0.3.2) passes through on
# /generate, where it drops `sampling_params.custom_params`. The server moves
# them back into custom_params before anything reads them.
LABEL = "taper"
_TYPES: dict[str, tuple[type, ...]] = {
    "taper_group": (str,),
    "taper_branch": (int,),
    "taper_width": (int,),
    "taper_ttft": (int, float),
    "taper_tpot": (int, float),
    "taper_critical": (bool,),
    "taper_parent": (str,),
    "taper_program": (str,),
}


@dataclass(frozen=True, slots=True)
class BranchMeta:
    group: str | None = None
    branch: int | None = None
    width: int = 1
    ttft: float | None = None  # seconds
    tpot: float | None = None  # seconds per token
    critical: bool | None = None
    parent: str | None = None
    program: str | None = None


def parse_meta(custom_params: Any) -> BranchMeta | None:
    """The TAPER metadata in `custom_params`, None if it carries none.

    Raises ValueError with a message naming the bad key, or saying that
    custom_params is not an object: SGLang declares it `Dict[str, ...]` (its
    OpenAI endpoints answer 400 to anything else, and its own writers call
    `dict()` on it), so a string or list on /generate gets the same answer.
    """
    if custom_params is None:
        return None
    if not isinstance(custom_params, dict):
        raise ValueError("custom_params must be a JSON object (name -> value), got "
                         f"{type(custom_params).__name__} {custom_params!r:.60}")
    keys = [k for k in custom_params if isinstance(k, str) and k.startswith(PREFIX)]
    if not keys:
        return None
    values: dict[str, Any] = {}
    for k in keys:
        if k not in _TYPES:
            raise ValueError(f"unknown TAPER key {k!r} in custom_params; "
                             f"known: {', '.join(sorted(_TYPES))}")
        v = custom_params[k]
        kinds = _TYPES[k]
        if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
            want = " or ".join(t.__name__ for t in kinds)
            raise ValueError(f"custom_params[{k!r}] must be {want}, got {v!r}")
        values[k[len(PREFIX):]] = v
    for k in ("ttft", "tpot"):
        if k in values and not (math.isfinite(values[k]) and values[k] > 0):
            raise ValueError(f"custom_params['taper_{k}'] must be > 0 seconds, "
                             f"got {values[k]!r}")
        if k in values:
            values[k] = float(values[k])
    for k in ("group", "program"):
        if k in values and not 1 <= len(values[k]) <= 128:
            raise ValueError(f"custom_params['taper_{k}'] must be 1 to 128 characters")
    group = values.get("group")
    if group is None and ({"branch", "width", "parent"} & values.keys()):
        raise ValueError("custom_params: taper_branch/taper_width/taper_parent need "
                         "taper_group")
    width = values.get("width", 1)
    if width < 1:
        raise ValueError(f"custom_params['taper_width'] must be >= 1, got {width}")
    branch = values.get("branch")
    if branch is not None and not 0 <= branch < width:
        raise ValueError(f"custom_params['taper_branch'] must be in [0, taper_width={width}), "
                         f"got {branch}")
    return BranchMeta(group=group, branch=branch, width=width, ttft=values.get("ttft"),
                      tpot=values.get("tpot"), critical=values.get("critical"),
                      parent=values.get("parent"), program=values.get("program"))


def with_meta(custom_params: dict | None, **fields: Any) -> dict:
    """A copy of `custom_params` with `taper_<field>` keys set (None values skipped)."""
    out = dict(custom_params or {})
    for k, v in fields.items():
        if v is not None:
            out[PREFIX + k] = v
    return out


def taper_keys(custom_params: dict | None) -> dict:
    """The `taper_*` entries of `custom_params`."""
    return {k: v for k, v in (custom_params or {}).items()
            if isinstance(k, str) and k.startswith(PREFIX)}


def as_label(custom_params: dict | None) -> dict[str, str] | None:
    """`custom_labels` carrying the TAPER keys of `custom_params` (None if none)."""
    import json

    keys = taper_keys(custom_params)
    return {LABEL: json.dumps(keys, separators=(",", ":"))} if keys else None


def from_label(value) -> dict:
    """The TAPER keys carried in `custom_labels[LABEL]`; ValueError if malformed."""
    import json

    try:
        keys = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        keys = None
    if not isinstance(keys, dict) or any(not str(k).startswith(PREFIX) for k in keys):
        raise ValueError(f"custom_labels[{LABEL!r}] must be a JSON object of taper_* keys, "
                         f"got {value!r:.80}")
    return keys
