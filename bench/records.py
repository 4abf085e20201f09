"""What a run records: one record per program, its stages and its requests.

Produced by the live replay and by the simulator alike, read by the metrics.
Times are seconds from the start of the run; lengths are tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """Times in seconds from the start of the run."""

    stage: int
    branch: int  # -1 for a serial request
    role: str  # "serial" | "branch" | "read" (a tool branch's second generation)
    start: float
    first_token: float | None
    end: float
    token_times: list[float]
    output_tokens: int
    cached_tokens: int
    error: str | None
    prompt_tokens: int = 0  # as the server counted them (0: not reported, as in the simulator)


@dataclass(slots=True)
class StageRecord:
    index: int
    kind: str  # "serial" | "parallel" | "tools"
    start: float
    end: float
    width: int
    longest: int  # output tokens of the longest branch (all its generations)
    tool_delay: float


@dataclass(slots=True)
class ProgramRecord:
    pid: str
    kind: str
    arrival: float  # scheduled, seconds from the start of the run
    start: float
    end: float
    ttft_slo: float
    tpot_slo: float
    stages: list[StageRecord] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    error: str | None = None
