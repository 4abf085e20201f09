"""Workloads as traces: ordinary chat requests with tight SLOs beside branch
programs, seeded, saved and loaded as JSONL so a run can be replayed exactly.

Named presets (`PRESETS`, `--workload NAME`) fix every distribution; flags
override single fields. `long-context` is the default: the regime agentic and
reasoning serving lives in (contexts of thousands of tokens, branches of
hundreds), where a decode step grows with width mostly through KV reads.
`mixed` is the earlier default (short prompts, wide groups). `length_scale`
multiplies every token length, so the tiny CPU model can replay a GPU-sized
preset in minutes (see bench/README.md for why the effect carries over).

Distributions (all uniform over the stated integer ranges, drawn from one
seeded `numpy.random.Generator`):
- arrivals: Poisson (exponential gaps, mean 1/rate) or bursty Gamma gaps with
  shape `burstiness` (< 1 is burstier than Poisson) and the same mean;
- kind: chat with probability `chat_fraction`, else one of the preset's branch
  program kinds (`kinds`) with equal weight;
- prompt tokens in `prompt_tokens`; chat output tokens in `chat_tokens`;
  serial-stage output tokens in `serial_tokens`; branch width in `width`;
  each branch's output tokens in `branch_tokens` (branches of one stage differ,
  so a stage waits on its longest branch); tool delay in `tool_delay` seconds
  (one delay per tool stage: the calls of a round run in parallel and the
  round waits on them together); tool rounds per `agentic_tools` program in
  `rounds` (each round: parallel tool calls, then a serial step that reads the
  results).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

KINDS = ("parallel_reasoning", "self_consistency", "skeleton_of_thought", "agentic_tools",
         "tree_of_thought")
_CHARS_PER_TOKEN = 6  # measured on the tiny model's tokenizer for `_text` output
_TOKENS_PER_WORD = 1.1  # likewise (the bracketed tag adds about 4 tokens)
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
    prompt_tokens: int = 0  # tokens the prompt was drawn to have (0: unknown, estimate)

    def context_tokens(self) -> int:
        """Tokens of the prompt: as drawn, else estimated from its text."""
        return self.prompt_tokens or max(1, len(self.prompt) // _CHARS_PER_TOKEN)

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
    prompt_tokens: tuple[int, int] = (1024, 4096)
    chat_tokens: tuple[int, int] = (64, 256)
    serial_tokens: tuple[int, int] = (32, 128)
    width: tuple[int, int] = (4, 16)
    branch_tokens: tuple[int, int] = (128, 512)
    tool_delay: tuple[float, float] = (0.05, 0.3)
    ttft_slo: float = 1.0  # seconds
    tpot_slo: float = 0.01  # seconds per token
    seed: int = 0
    length_scale: float = 1.0  # multiplies every token range above (at least 1 token)
    kinds: tuple[str, ...] = KINDS  # the branch programs drawn (equal weight)
    rounds: tuple[int, int] = (1, 1)  # tool rounds per agentic_tools program

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
        if not self.length_scale > 0:
            raise ValueError(f"length_scale must be > 0, got {self.length_scale}")
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"kinds must be some of {', '.join(KINDS)}, got {self.kinds}")
        for name in ("prompt_tokens", "chat_tokens", "serial_tokens", "width",
                     "branch_tokens", "tool_delay", "rounds"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a range 0 < lo <= hi, got {(lo, hi)}")

    def tokens(self, name: str) -> tuple[int, int]:
        """A token range after `length_scale`."""
        lo, hi = getattr(self, name)
        k = self.length_scale
        return max(1, round(lo * k)), max(1, round(hi * k))


# Every preset is a complete WorkloadConfig; flags override single fields. All
# keep 60% chat requests with tight SLOs beside the branch programs: they are
# the latency-sensitive traffic branch parallelism endangers.
PRESETS: dict[str, WorkloadConfig] = {
    # Today's default: all five program kinds, contexts of 1-4K tokens, branch
    # groups of 4-16 with 128-512 tokens each.
    "long-context": WorkloadConfig(),
    # The first default: short prompts, wide groups of short branches.
    "mixed": WorkloadConfig(prompt_tokens=(24, 96), chat_tokens=(32, 96),
                            serial_tokens=(16, 32), width=(16, 32), branch_tokens=(48, 128)),
    # Parallel reasoning: a few long chains of thought over a long context.
    "parallel-reasoning": WorkloadConfig(kinds=("parallel_reasoning",), width=(4, 8),
                                         branch_tokens=(256, 1024),
                                         prompt_tokens=(1024, 4096)),
    # Self-consistency: many medium samples of one question, then a vote.
    "self-consistency": WorkloadConfig(kinds=("self_consistency",), width=(16, 64),
                                       branch_tokens=(64, 256), prompt_tokens=(512, 2048)),
    # Agentic: 2-3 rounds of 2-6 parallel tool calls; each call's delay is
    # uniform in 0.1-1.0 s (one per round), each call generates its arguments
    # and then reads the result (32-128 tokens each).
    "agentic": WorkloadConfig(kinds=("agentic_tools",), width=(2, 6), rounds=(2, 3),
                              tool_delay=(0.1, 1.0), branch_tokens=(64, 256),
                              prompt_tokens=(1024, 4096)),
}
DEFAULT_PRESET = "long-context"


def _text(rng: np.random.Generator, tokens: int, tag: str) -> str:
    """Random words, about `tokens` tokens with the tiny model's tokenizer."""
    words = rng.choice(_WORDS, size=max(1, round((tokens - 4) / _TOKENS_PER_WORD)))
    # .tolist() first: joining numpy str_ scalars is about 3x slower (the
    # simulator's largest remaining cost on 10k programs); the text is the same
    return f"[{tag}] " + " ".join(words.tolist())


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

    prompt_r, chat_r = cfg.tokens("prompt_tokens"), cfg.tokens("chat_tokens")
    serial_r, branch_r = cfg.tokens("serial_tokens"), cfg.tokens("branch_tokens")
    out = []
    for i, t in enumerate(arrivals):
        chat = rng.random() < cfg.chat_fraction
        kind = "chat" if chat else cfg.kinds[int(rng.integers(len(cfg.kinds)))]
        n_prompt = int(ri(prompt_r))
        # Text from its own stream, so a trace's structure (kinds, lengths, arrivals)
        # does not depend on how many words its prompts took: a length-scaled trace
        # is the same trace, scaled.
        prompt = _text(np.random.default_rng([cfg.seed, i]), n_prompt, f"{kind} {i}")

        def serial() -> Stage:
            return Stage("serial", [int(ri(serial_r))])

        def parallel() -> Stage:
            return Stage("parallel", ri(branch_r, int(ri(cfg.width))).tolist())

        if kind == "chat":
            stages = [Stage("serial", [int(ri(chat_r))])]
        elif kind == "agentic_tools":
            half = (max(1, branch_r[0] // 2), max(1, branch_r[1] // 2))
            # One round draws nothing extra, so single-round presets replay as before.
            rounds = 1 if cfg.rounds == (1, 1) else int(ri(cfg.rounds))
            stages = []
            for r in range(rounds):
                w = int(ri(cfg.width))
                if r == 0:
                    stages.append(serial())
                stages += [Stage("tools", ri(half, w).tolist(),
                                 float(rng.uniform(*cfg.tool_delay)),
                                 ri(half, w).tolist()), serial()]
        elif kind == "tree_of_thought":
            stages = [serial(), parallel(), serial(), parallel(), serial()]
        else:
            stages = [serial(), parallel(), serial()]
        out.append(Program(f"p{i:05d}", kind, float(t), prompt, cfg.ttft_slo, cfg.tpot_slo,
                           stages, n_prompt))
    return out


def at_rate(programs: list[Program], base_rate: float, rate: float) -> list[Program]:
    """The same programs, arrivals scaled from `base_rate` to `rate` programs/s."""
    k = base_rate / rate
    return [replace(p, arrival=p.arrival * k) for p in programs]


def with_slo(programs: list[Program], ttft: float, tpot: float) -> list[Program]:
    """The same programs with the run's SLOs (seconds, seconds per token)."""
    return [replace(p, ttft_slo=ttft, tpot_slo=tpot) for p in programs]


def decode_tokens(p: Program) -> int:
    """Output tokens the program generates in all (every branch, both
    generations of a tool branch)."""
    return sum(sum(s.tokens) + sum(s.read_tokens) for s in p.stages)


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
