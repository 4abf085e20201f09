"""Controller configuration and the policy-string parser.

The algorithm never reads environment variables: entry points (the CLI, the
plugin loader) build a `TaperConfig` and pass it in.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A parsed policy string: `off`, `eager`, `taper` or `cap:K`."""

    name: str
    arg: int | None = None  # K for cap:K

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}:{self.arg}"


def parse_policy(text: str) -> PolicySpec:
    """Parse and validate a policy string against the policy registry.

    Raises ValueError with a one-line message naming the bad input.
    """
    from controller.policies import POLICIES  # the registry decides what is valid

    name, sep, arg = text.strip().partition(":")
    entry = POLICIES.get(name)
    choices = ", ".join(e.usage for e in POLICIES.values())
    if entry is None:
        raise ValueError(f"unknown policy {text!r}; choose from {choices}")
    if not entry.takes_arg:
        if sep:
            raise ValueError(f"policy {name!r} takes no argument, got {text!r}")
        return PolicySpec(name)
    try:
        k = int(arg)
    except ValueError:
        raise ValueError(f"policy {entry.usage} needs an integer K >= 1, got {text!r}") from None
    if k < 1:
        raise ValueError(f"policy {entry.usage} needs K >= 1, got {text!r}")
    return PolicySpec(name, k)


@dataclass(frozen=True, slots=True)
class TaperConfig:
    """Everything the controller can be told. Validated on construction."""

    policy: str = "taper"  # off | eager | cap:K | taper
    default_ttft_slo: float = 2.0  # seconds, for requests that carry no SLO
    default_tpot_slo: float = 0.1  # seconds per output token, likewise
    margin: float = 0.1  # fraction of the tightest slack kept in reserve
    max_banked_tokens: float = 4.0  # slack counted at most this many TPOTs ahead
    max_hold_steps: int = 256  # taper: a branch held this many steps in a row is admitted
    branch_stretch: float = 2.0  # a branch stage is due within TTFT + (L-1)*TPOT*stretch
    # taper: a held branch whose laxity (Controller._laxity) falls under this many
    # paces, (1 - margin) * TPOT each, becomes mandatory so its stage can still make
    # its deadline; 0 never promotes
    urgent_paces: float = 0.0
    forgetting: float = 0.995  # predictor: weight of the past per observed step
    upper_quantile: float = 0.95  # predictor: residual quantile added for the upper bound
    residual_window: int = 256  # predictor: residuals kept for that quantile
    profile: str | None = None  # path of a saved step-time model to warm-start from
    cascade: bool = False  # the engine reads a group's shared prefix once per step

    def __post_init__(self) -> None:
        parse_policy(self.policy)
        _check(self, "default_ttft_slo", self.default_ttft_slo > 0, "must be > 0 seconds")
        _check(self, "default_tpot_slo", self.default_tpot_slo > 0, "must be > 0 seconds")
        _check(self, "margin", 0 <= self.margin < 1, "must be in [0, 1)")
        _check(self, "max_banked_tokens", self.max_banked_tokens >= 1, "must be >= 1")
        _check(self, "max_hold_steps", self.max_hold_steps >= 1, "must be >= 1")
        _check(self, "branch_stretch", self.branch_stretch >= 1, "must be >= 1")
        _check(self, "urgent_paces", self.urgent_paces >= 0, "must be >= 0")
        _check(self, "forgetting", 0.9 <= self.forgetting <= 1, "must be in [0.9, 1]")
        _check(self, "upper_quantile", 0.5 <= self.upper_quantile < 1, "must be in [0.5, 1)")
        _check(self, "residual_window", self.residual_window >= 8, "must be >= 8")

    @property
    def policy_spec(self) -> PolicySpec:
        return parse_policy(self.policy)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TaperConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TaperConfig has no field {unknown[0]!r}")
        return cls(**data)


def _check(cfg: TaperConfig, name: str, ok: bool, rule: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, float) and math.isnan(value):
        ok = False
    if not ok:
        raise ValueError(f"TaperConfig.{name} {rule}, got {value!r}")
