"""Workloads as traces: ordinary chat requests with tight SLOs beside branch
programs, seeded, saved and loaded as JSONL so a run can be replayed exactly.

Distributions (all uniform over the stated integer ranges, drawn from one
seeded `numpy.random.Generator`):
- arrivals: Poisson (exponential gaps, mean 1/rate) or bursty Gamma gaps with
  shape `burstiness` (< 1 is burstier than Poisson) and the same mean;
- kind: chat with probability `chat_fraction`, else one of the branch programs
  with equal weight;
- prompt tokens in `prompt_tokens`; chat output tokens in `chat_tokens`;
  serial-stage output tokens in `serial_tokens`; branch width in `width`;
  each branch's output tokens in `branch_tokens` (branches of one stage differ,
  so a stage waits on its longest branch); tool delay in `tool_delay` seconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

KINDS = ("parallel_reasoning", "self_consistency", "skeleton_of_thought", "agentic_tools",
         "tree_of_thought")
_WORDS = ("plan search answer reason branch path vote result outline point check tool "
          "call value number list summary first next then because model token prefix").split()


@dataclass(slots=True)
class Stage:
    kind: str  # "serial" | "parallel" | "tools"
    tokens: list[int]  # output tokens: one entry for serial, one per branch otherwise
    tool_delay: float = 0.0  # seconds, "tools": the call between a branch's two generations
    read_tokens: list[int] = field(default_factory=list)  # "tools": tokens after the call

    @property
    def width(self) -> int:
        return len(self.tokens)


@dataclass(slots=True)
class Program:
    pid: str
    kind: str  # "chat" or one of KINDS
    arrival: float  # seconds after the start of the run
    prompt: str
    ttft_slo: float  # seconds
    tpot_slo: float  # seconds per token
    stages: list[Stage]

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> Program:
        return cls(**{**d, "stages": [Stage(**s) for s in d["stages"]]})


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    num_programs: int = 40
    rate: float = 0.6  # programs per second
    arrival: str = "poisson"  # "poisson" | "gamma"
    burstiness: float = 1.0  # Gamma shape; 1.0 is Poisson
    chat_fraction: float = 0.6
    prompt_tokens: tuple[int, int] = (24, 96)
    chat_tokens: tuple[int, int] = (32, 96)
    serial_tokens: tuple[int, int] = (16, 32)
    width: tuple[int, int] = (16, 32)
    branch_tokens: tuple[int, int] = (48, 128)
    tool_delay: tuple[float, float] = (0.05, 0.3)
    ttft_slo: float = 1.0  # seconds
    tpot_slo: float = 0.01  # seconds per token
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_programs < 1:
            raise ValueError(f"num_programs must be >= 1, got {self.num_programs}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 programs/s, got {self.rate}")
        if self.arrival not in ("poisson", "gamma"):
            raise ValueError(f"arrival must be poisson or gamma, got {self.arrival!r}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if not 0 <= self.chat_fraction <= 1:
            raise ValueError(f"chat_fraction must be in [0, 1], got {self.chat_fraction}")
        for name in ("prompt_tokens", "chat_tokens", "serial_tokens", "width",
                     "branch_tokens", "tool_delay"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a range 0 < lo <= hi, got {(lo, hi)}")


def _text(rng: np.random.Generator, tokens: int, tag: str) -> str:
    # About two tokens per word with the tiny model's tokenizer; close enough.
    words = rng.choice(_WORDS, size=max(1, tokens // 2))
    return f"[{tag}] " + " ".join(words)


def generate(cfg: WorkloadConfig) -> list[Program]:
    rng = np.random.default_rng(cfg.seed)
    mean_gap = 1.0 / cfg.rate
    if cfg.arrival == "poisson" or cfg.burstiness == 1.0:
        gaps = rng.exponential(mean_gap, cfg.num_programs)
    else:
        gaps = rng.gamma(cfg.burstiness, mean_gap / cfg.burstiness, cfg.num_programs)
    arrivals = np.cumsum(gaps) - gaps[0]

    def ri(lo_hi: tuple[int, int], size: int | None = None):
        return rng.integers(lo_hi[0], lo_hi[1] + 1, size=size)

    out = []
    for i, t in enumerate(arrivals):
        chat = rng.random() < cfg.chat_fraction
        kind = "chat" if chat else KINDS[int(rng.integers(len(KINDS)))]
        prompt = _text(rng, int(ri(cfg.prompt_tokens)), f"{kind} {i}")

        def serial() -> Stage:
            return Stage("serial", [int(ri(cfg.serial_tokens))])

        def parallel() -> Stage:
            return Stage("parallel", ri(cfg.branch_tokens, int(ri(cfg.width))).tolist())

        if kind == "chat":
            stages = [Stage("serial", [int(ri(cfg.chat_tokens))])]
        elif kind == "agentic_tools":
            w = int(ri(cfg.width))
            half = (max(1, cfg.branch_tokens[0] // 2), max(1, cfg.branch_tokens[1] // 2))
            stages = [serial(), Stage("tools", ri(half, w).tolist(),
                                      float(rng.uniform(*cfg.tool_delay)),
                                      ri(half, w).tolist()), serial()]
        elif kind == "tree_of_thought":
            stages = [serial(), parallel(), serial(), parallel(), serial()]
        else:
            stages = [serial(), parallel(), serial()]
        out.append(Program(f"p{i:05d}", kind, float(t), prompt, cfg.ttft_slo, cfg.tpot_slo,
                           stages))
    return out


def save_jsonl(programs: list[Program], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(p.to_json() + "\n" for p in programs))


def load_jsonl(path: str | Path) -> list[Program]:
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(Program.from_dict(json.loads(line)))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{n}: not a program record: {e}") from None
    return out
