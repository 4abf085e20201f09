"""TAPER: per-step admission of intra-request branches (pure Python + numpy).

Contract: `Controller.decide(StepView) -> Decision` before each decode step,
`Controller.observe(StepResult)` after it. See `controller.view` for the
messages and their units, `controller.slack` for the slack budget and
`controller.predictor` for the step-time model.
"""

from controller.config import TaperConfig
from controller.core import Controller
from controller.policies import POLICIES, PolicySpec, parse_policy
from controller.predictor import FEATURES, StepTimeModel, StepTimePredictor
from controller.view import NO_GROUP, Decision, PrefillView, Seq, StepResult, StepView

__all__ = [
    "FEATURES",
    "NO_GROUP",
    "POLICIES",
    "Controller",
    "Decision",
    "PolicySpec",
    "PrefillView",
    "Seq",
    "StepResult",
    "StepTimeModel",
    "StepTimePredictor",
    "StepView",
    "TaperConfig",
    "parse_policy",
]
