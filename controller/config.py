"""Controller configuration.

The algorithm never reads environment variables: entry points (the CLI, the
plugin loader) build a `TaperConfig` and pass it in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

from controller.policies import PolicySpec, parse_policy


def _f(default, help_: str):
    """A field whose help text becomes its `taper serve --taper-*` flag's help."""
    return field(default=default, metadata={"help": help_})


@dataclass(frozen=True, slots=True)
class TaperConfig:
    """Everything the controller can be told. Validated on construction."""

    policy: str = _f("taper", "the admission policy: off | eager | cap:K | taper")
    enabled: bool = _f(True, "live server: TAPER's hooks act on the step path; off: every step "
                       "runs as stock SGLang (settable at run time with POST /taper/config)")
    default_ttft_slo: float = _f(2.0, "seconds to the first token, for requests that carry "
                                 "no taper_ttft")
    default_tpot_slo: float = _f(0.1, "seconds per output token, for requests that carry no "
                                 "taper_tpot")
    margin: float = _f(0.1, "critical requests are held to a pace of (1 - margin) * TPOT, "
                       "leaving this fraction for prediction error; in [0, 1)")
    max_banked_tokens: float = _f(4.0, "a request ahead of schedule banks at most this many "
                                  "paces of slack")
    max_hold_steps: int = _f(256, "taper only: a branch held this many steps in a row is "
                             "admitted (the baselines never promote)")
    branch_stretch: float = _f(2.0, "a branch stage is due within TTFT + (L-1) * TPOT * "
                               "stretch (L: its longest branch's max_new_tokens); orders "
                               "taper's extras")
    urgent_paces: float = _f(0.0, "taper only: a held branch with less laxity than this many "
                             "paces, (1 - margin) * TPOT each, becomes mandatory; 0: never")
    forgetting: float = _f(0.995, "step-time predictor: weight of the past per observed step, "
                           "in [0.9, 1]")
    upper_quantile: float = _f(0.95, "step-time predictor: quantile of recent residuals added "
                               "for the upper bound, in [0.5, 1)")
    residual_window: int = _f(256, "step-time predictor: residuals kept for that quantile")
    prior_weight: float = _f(2e-3, "step-time predictor: the prior counts as this fraction of "
                             "the (forgetting-weighted) observations, so it never vanishes; "
                             ">= 0")
    weight_floor: float = _f(0.25, "step-time predictor: the per-sequence and per-KV-token "
                             "costs decisions use never fall below this fraction of the "
                             "prior's; in [0, 1]")
    outlier_factor: float = _f(4.0, "step-time predictor: a step over this many times the "
                               "upper bound is not learnt from (after 32 steps); > 1, inf: "
                               "never")
    row_tile: int = _f(0, "step-time predictor: the batch's sequences cost whole tiles of "
                       "this many rows (16 on the CPU engine's batch-invariant GEMM); 0: "
                       "linear")
    profile: str | None = _f(None, "path of a saved step-time model (taper profile) to "
                             "warm-start the predictor from")
    cascade: bool = _f(False, "the engine reads a group's shared prefix once per step "
                       "(cascade attention)")
    cascade_profile: str | None = _f(None, "path of a profile (taper profile) whose cascade "
                                     "section decides which groups take the two-level path; "
                                     "none: the CPU engine's measured default (on a GPU: "
                                     "every group)")
    prefill_gate: bool = _f(True, "taper only: defer a prefill that would cost a running "
                            "critical request an SLO it can still meet (controller/prefill.py)")
    spec: PolicySpec = field(init=False, repr=False, compare=False)  # `policy`, parsed

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", parse_policy(self.policy))
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
        _check(self, "prior_weight", self.prior_weight >= 0, "must be >= 0")
        _check(self, "weight_floor", 0 <= self.weight_floor <= 1, "must be in [0, 1]")
        _check(self, "outlier_factor", self.outlier_factor > 1, "must be > 1")
        _check(self, "row_tile", self.row_tile >= 0, "must be >= 0 (0: off)")

    def to_dict(self) -> dict:
        """The constructor's fields (not the parsed spec)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def updated(self, pairs: list[str]) -> TaperConfig:
        """A copy with FIELD=VALUE overrides, typed by field (bools: true/false,
        on/off, 1/0). Raises ValueError naming a bad field or value."""
        kinds = {f.name: str(f.type) for f in fields(self) if f.init}
        values = self.to_dict()
        for pair in pairs:
            name, sep, text = pair.partition("=")
            if not sep or name not in kinds:
                raise ValueError(f"expected FIELD=VALUE with a TaperConfig field, got {pair!r}")
            kind = kinds[name]
            try:
                if kind == "bool":
                    if text.lower() not in ("true", "false", "on", "off", "1", "0"):
                        raise ValueError
                    values[name] = text.lower() in ("true", "on", "1")
                elif kind == "int":
                    values[name] = int(text)
                elif kind == "float":
                    values[name] = float(text)
                else:
                    values[name] = None if text.lower() == "none" else text
            except ValueError:
                raise ValueError(f"TaperConfig.{name} needs a {kind}, got {text!r}") from None
        return type(self)(**values)

    def merged(self, changes: dict) -> TaperConfig:
        """A copy with the fields of a JSON object `changes` replaced, typed by
        field (a float field takes an int; a bool field only true/false). Raises
        ValueError naming a bad field or value."""
        kinds = {f.name: str(f.type) for f in fields(self) if f.init}
        values = self.to_dict()
        for name, value in changes.items():
            kind = kinds.get(name)
            if kind is None:
                raise ValueError(f"TaperConfig has no field {name!r}")
            if not _json_fits(kind, value):
                raise ValueError(f"TaperConfig.{name} needs a {kind}, got {value!r}")
            values[name] = float(value) if kind == "float" else value
        return type(self)(**values)

    @classmethod
    def from_json(cls, text: str) -> TaperConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TaperConfig has no field {unknown[0]!r}")
        return cls(**data)


def _json_fits(kind: str, value) -> bool:
    """A JSON value fits a field of this annotation (bool is not a number here)."""
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float))
    return isinstance(value, str) or (value is None and "None" in kind)


def _check(cfg: TaperConfig, name: str, ok: bool, rule: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, float) and math.isnan(value):
        ok = False
    if not ok:
        raise ValueError(f"TaperConfig.{name} {rule}, got {value!r}")
