"""Command-line options shared by `taper bench` and `taper sim` (named after
`python -m sglang.bench_serving` and vLLM's --goodput where they overlap), and
their parsing into the workload, the SLO and the sweep."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from bench import traces
from bench.calibration import isolated_at
from bench.metrics import SLO_MODES, SLOSpec
from bench.workload import (
    DEFAULT_PRESET,
    PRESETS,
    Program,
    WorkloadConfig,
    generate,
    load_jsonl,
    with_slo,
)

DEFAULT_RATE = "50%"  # of the engine's measured capacity for the workload
DEFAULT_GOODPUT = ("ttft:10x", "tpot:1.5x")  # taper sim (the H200 model)


@dataclass(frozen=True, slots=True)
class Rate:
    """A request rate: absolute (programs/s) or a fraction of capacity."""

    value: float
    relative: bool  # value is a fraction of the engine's capacity (written "50%")

    def resolve(self, capacity: float) -> float:
        """Programs per second, given the capacity in programs per second."""
        return self.value * capacity if self.relative else self.value

    def __str__(self) -> str:
        return f"{100 * self.value:g}%" if self.relative else f"{self.value:g}/s"


def parse_rate(text: str) -> Rate:
    text = text.strip()
    try:
        if text.endswith("%"):
            rate = Rate(float(text[:-1]) / 100, True)
        else:
            rate = Rate(float(text), False)
    except ValueError:
        raise ValueError(f"a rate is programs/s (0.6) or a share of capacity (50%), "
                         f"got {text!r}") from None
    if not rate.value > 0:
        raise ValueError(f"a rate must be > 0, got {text!r}")
    return rate


def parse_sweep(text: str | None) -> list[Rate] | str | None:
    """None (one rate), "auto" (bisection), or a list of rates."""
    if text is None:
        return None
    if text.strip() == "auto":
        return "auto"
    return [parse_rate(t) for t in text.split(",") if t.strip()]


def _goodput_item(item: str) -> tuple[str, tuple[float, bool]]:
    m = re.fullmatch(r"(ttft|tpot):([0-9.]+)(x?)", item.strip())
    if not m:
        raise ValueError(f"--goodput: expected ttft:MS or tpot:MS (or :Nx), got {item!r}")
    value, rel = float(m.group(2)), bool(m.group(3))
    if value <= 0:
        raise ValueError(f"--goodput: {item!r} must be > 0")
    return m.group(1), (value if rel else value / 1e3, rel)


def parse_goodput(items: list[str] | tuple[str, ...],
                  defaults: tuple[str, ...] = DEFAULT_GOODPUT) -> dict[str, tuple[float, bool]]:
    """{'ttft': (value, relative), 'tpot': ...}: seconds, or a multiple of the
    isolated value when relative (written Nx); a key not given keeps its default."""
    out = dict(_goodput_item(i) for i in defaults)
    out.update(_goodput_item(i) for i in items)
    return out


def goodput(ns) -> dict[str, tuple[float, bool]]:
    """The command's SLOs: --goodput over the command's own defaults."""
    return parse_goodput(ns.goodput, getattr(ns, "goodput_defaults", DEFAULT_GOODPUT))


def slo_seconds(goodput: dict, isolated: dict) -> tuple[float, float]:
    """(TTFT, TPOT) SLOs in seconds, relative ones against the isolated figures."""
    ttft = goodput["ttft"][0] * (isolated["ttft_s"] if goodput["ttft"][1] else 1.0)
    tpot = goodput["tpot"][0] * (isolated["tpot_s"] if goodput["tpot"][1] else 1.0)
    return ttft, tpot


def _range(kind):
    def parse(text: str):
        parts = text.split(",")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}")
        return (kind(parts[0]), kind(parts[1]))

    return parse


class _Given(argparse.Action):
    """Store the value and note that the flag was given (`<dest>_given`), so a
    default can be told apart from the same value typed."""

    def __call__(self, parser, ns, values, option_string=None) -> None:
        setattr(ns, self.dest, values)
        setattr(ns, f"{self.dest}_given", True)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from None


# Flags that override one WorkloadConfig field of the preset.
_OVERRIDES = {"num_prompts": "num_programs", "burstiness": "burstiness",
              "chat_fraction": "chat_fraction", "width": "width",
              "branch_tokens": "branch_tokens", "chat_tokens": "chat_tokens",
              "prompt_tokens": "prompt_tokens", "serial_tokens": "serial_tokens",
              "length_scale": "length_scale"}


def add_workload_args(p: argparse.ArgumentParser, default_policies: str,
                      default_result_dir: str, default_length_scale: float | None = None,
                      default_rate: str | None = DEFAULT_RATE,
                      default_goodput: tuple[str, ...] = DEFAULT_GOODPUT) -> None:
    p.add_argument("--workload", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"workload preset (default {DEFAULT_PRESET}); the flags below "
                   "override single fields of it")
    p.add_argument("--length-scale", type=float, default=default_length_scale,
                   help="multiply every token length of the preset or trace (default: "
                   f"{default_length_scale or 1})")
    p.add_argument("--num-prompts", type=int, help="programs (chat requests and branch "
                   "programs) in the workload; with a trace dataset, its first N requests "
                   "(default: all)")
    p.add_argument("--request-rate", default=default_rate, action=_Given,
                   help="programs/s (0.6), or a share of the engine's measured capacity "
                   f"for this workload (50%%); with --sweep auto the first rate tried "
                   f"(default {(default_rate or 'see below').replace('%', '%%')})")
    p.set_defaults(request_rate_given=False)
    p.add_argument("--burstiness", type=float,
                   help="Gamma shape of the arrival gaps; 1.0 is Poisson, < 1 burstier")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace")
    p.add_argument("--seeds", type=_ints, help="repeat over these trace seeds, e.g. 0,1,2 "
                   "(ratios are then reported with their spread)")
    p.add_argument("--chat-fraction", type=float)
    p.add_argument("--width", type=_range(int), help="branch width LO,HI")
    p.add_argument("--branch-tokens", type=_range(int), help="output tokens per branch LO,HI")
    p.add_argument("--chat-tokens", type=_range(int), help="output tokens per chat LO,HI")
    p.add_argument("--serial-tokens", type=_range(int),
                   help="output tokens per serial stage LO,HI")
    p.add_argument("--prompt-tokens", type=_range(int), help="prompt (context) tokens LO,HI")
    p.add_argument("--goodput", nargs="+", default=list(default_goodput), metavar="KEY:VALUE",
                   help="SLOs: ttft:MS tpot:MS, or KEY:Nx for N times the isolated value "
                   f"measured at the start of the run (default {' '.join(default_goodput)})")
    p.set_defaults(goodput_defaults=tuple(default_goodput))
    p.add_argument("--slo-basis", choices=("mean", "context"),
                   help="what a relative SLO (Nx) multiplies: mean: the isolated TTFT and "
                   "TPOT at the workload's mean context (default for generated workloads); "
                   "context: each program's own, at its prompt length (default for trace "
                   "datasets, whose contexts span 100x: one TPOT SLO for all would be "
                   "out of reach for the longest alone)")
    p.add_argument("--slo-mode", choices=SLO_MODES, default="stage",
                   help="stage: each parallel stage has a deadline (--branch-stretch); "
                   "program: each program has one (--program-multiple); see bench/README.md")
    p.add_argument("--branch-stretch", type=float, default=SLOSpec().branch_stretch,
                   help="stage mode: a parallel stage may take this much longer than serial "
                   "pace over its longest branch")
    p.add_argument("--program-multiple", type=float, default=SLOSpec().program_multiple,
                   help="program mode: a program may take this many times its critical "
                   "path at serial pace (plus its tool delays)")
    p.add_argument("--drain", type=float, default=SLOSpec().drain,
                   help="seconds after the last arrival before unfinished programs are cut "
                   "off as failed; also closes the goodput window")
    p.add_argument("--dataset", metavar="[FORMAT:]PATH",
                   help="replay this instead of generating a workload: a JSONL of programs "
                   "(--save-trace writes one), or a request trace FORMAT:PATH with FORMAT "
                   f"one of {', '.join(traces.FORMATS)} (bench/README.md, Replaying traces); "
                   "--num-prompts then takes its first N requests (default: all) and "
                   "--length-scale scales its token lengths")
    p.add_argument("--time-scale", type=float, metavar="K",
                   help="trace datasets only, instead of --request-rate: replay at the "
                   "trace's own pace stretched K times, i.e. at its native rate / K "
                   "programs/s (1: real time, 0.1: ten times faster)")
    p.add_argument("--branch-fraction", type=float, metavar="F",
                   help="trace datasets only: share (0-1) of the trace's requests replayed "
                   "as branch programs over the same prompt, drawn with --seed; the others "
                   f"are chat requests (default {traces.BRANCH_FRACTION})")
    p.add_argument("--max-prompt-tokens", type=int, metavar="N",
                   help="trace datasets only: leave out requests whose prompt, after "
                   "--length-scale, exceeds N tokens (an engine's context limit: the tiny "
                   "CPU model has 8192 positions); the result says how many")
    p.add_argument("--save-trace", help="write the generated trace (JSONL) here")
    p.add_argument("--sweep", help="auto: find each policy's highest rate at >= 95%% "
                   "attainment by bisection (to 5%%); or rates to test, e.g. 25%%,50%%,75%% "
                   "or 0.5,1,2")
    p.add_argument("--policies", default=default_policies,
                   help=f"comma-separated (default {default_policies}); live, POLICY+cascade "
                   "runs POLICY on a server with --taper-cascade (POLICY+nogate: with "
                   "--no-taper-prefill-gate) in the same run (one calibration, one SLO for "
                   "both)")
    p.add_argument("--result-dir", default=default_result_dir,
                   help="result.json, result.md and PNG plots go here")
    p.add_argument("--output-file", help="append one JSON line per run here (JSONL)")
    p.add_argument("--no-plots", action="store_true")


def workload_config(ns, seed: int | None = None) -> WorkloadConfig:
    """The preset with the flags' overrides (rate 1/s: runs scale arrivals)."""
    base = PRESETS[ns.workload]
    over = {field: getattr(ns, flag) for flag, field in _OVERRIDES.items()
            if getattr(ns, flag, None) is not None}
    if "burstiness" in over and over["burstiness"] != 1.0:
        over["arrival"] = "gamma"
    known = {f.name for f in fields(WorkloadConfig)}
    assert set(over) <= known
    return replace(base, **over, rate=1.0, seed=ns.seed if seed is None else seed)


def slo_basis(ns) -> str:
    """`--slo-basis`, defaulted by the dataset (see its help)."""
    given = getattr(ns, "slo_basis", None)
    return given or ("context" if _trace_spec(ns) else "mean")


def program_slos(ns, programs: list[Program], cal: dict, cost=None) -> list[Program]:
    """The programs with the run's SLOs: --goodput against the isolated figures
    of `cal` (at the mean context), or with basis `context` against each
    program's own at its prompt length (from `cost`, the simulator's model, or
    the live calibration's fit)."""
    good = goodput(ns)
    if slo_basis(ns) == "mean":
        return with_slo(programs, *slo_seconds(good, cal))
    at = isolated_at(cal, cost)
    out = []
    for p in programs:
        ttft, tpot = at(p.context_tokens())
        out.append(replace(p, **dict(zip(("ttft_slo", "tpot_slo"), slo_seconds(
            good, {"ttft_s": ttft, "tpot_s": tpot})))))
    return out


def _trace_spec(ns) -> tuple[str, Path] | None:
    return traces.parse_spec(ns.dataset) if getattr(ns, "dataset", None) else None


def branch_fraction(ns) -> float:
    f = getattr(ns, "branch_fraction", None)
    return traces.BRANCH_FRACTION if f is None else f


def load_programs(ns, seed: int | None = None) -> tuple[list[Program], dict | None]:
    """The run's programs for a seed, arriving at 1 program/s on average (runs
    scale arrivals): the preset with the flags' overrides, a JSONL of programs
    (--dataset PATH), or a request trace (--dataset FORMAT:PATH, its first
    --num-prompts requests). With a trace, also what it is (`traces.describe`:
    its native rate in programs/s and predicted prefix-cache hit rate)."""
    cfg = workload_config(ns, seed)
    spec = _trace_spec(ns)
    if spec is None:
        return (load_jsonl(ns.dataset) if ns.dataset else generate(cfg)), None
    requests = traces.load(*spec)
    limit = getattr(ns, "max_prompt_tokens", None)
    if limit:
        fits = [r for r in requests if traces.scaled(r.input_tokens, cfg.length_scale) <= limit]
        left_out, requests = len(requests) - len(fits), fits
    requests = requests[:ns.num_prompts]
    programs, _ = traces.to_programs(requests, cfg, branch_fraction(ns))
    info = traces.describe(*spec, requests, cfg.length_scale, branch_fraction(ns))
    if limit:
        info.update(max_prompt_tokens=limit, left_out_of_whole_trace=left_out)
    return programs, info


def apply_time_scale(ns, trace: dict | None) -> None:
    """--time-scale K: the run's rate becomes the trace's native rate / K, an
    absolute rate in programs/s (`--request-rate`, which validate() keeps unset)."""
    if getattr(ns, "time_scale", None) is not None and trace is not None:
        ns.request_rate = f"{trace['native_rate'] / ns.time_scale!r}"


def _validate_dataset(ns) -> None:
    spec = _trace_spec(ns)
    scale, fraction = getattr(ns, "time_scale", None), getattr(ns, "branch_fraction", None)
    if spec is None:
        if ns.dataset and not Path(ns.dataset).is_file():
            raise ValueError(f"--dataset: no such file: {ns.dataset}")
        if ns.dataset:
            load_jsonl(ns.dataset)
        for flag, value in (("--time-scale", scale), ("--branch-fraction", fraction),
                            ("--max-prompt-tokens", getattr(ns, "max_prompt_tokens", None))):
            if value is not None:
                raise ValueError(f"{flag} applies to a trace dataset only "
                                 f"(--dataset FORMAT:PATH, FORMAT one of "
                                 f"{', '.join(traces.FORMATS)})")
        return
    if fraction is not None and not 0 <= fraction <= 1:
        raise ValueError(f"--branch-fraction must be in [0, 1], got {fraction}")
    if ns.num_prompts is not None and ns.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {ns.num_prompts}")
    limit = getattr(ns, "max_prompt_tokens", None)
    if limit is not None and limit < 1:
        raise ValueError(f"--max-prompt-tokens must be >= 1, got {limit}")
    requests = traces.load(*spec)[:ns.num_prompts]
    if scale is None:
        return
    if not scale > 0:
        raise ValueError(f"--time-scale must be > 0, got {scale}")
    if getattr(ns, "request_rate_given", False):
        raise ValueError("--time-scale sets the rate (the trace's native rate / K): "
                         "give it or --request-rate, not both")
    if isinstance(parse_sweep(ns.sweep), list):
        raise ValueError("--time-scale sets one rate: with --sweep, give the rates to "
                         "test there (or --sweep auto to start at the trace's pace)")
    if traces.native_rate(requests) == float("inf"):
        raise ValueError(f"--time-scale: the {len(requests)} requests replayed all arrive "
                         "at once: the trace has no pace to stretch")


def slo_spec(ns) -> SLOSpec:
    return SLOSpec(mode=ns.slo_mode, branch_stretch=ns.branch_stretch,
                   program_multiple=ns.program_multiple, drain=ns.drain)


def seeds(ns) -> list[int]:
    return list(ns.seeds) if ns.seeds else [ns.seed]


def policies(ns) -> list[str]:
    return [p.strip() for p in ns.policies.split(",") if p.strip()]


# Live only: `POLICY+VARIANT` runs POLICY on a server launched with the variant's
# flags, in the same run as the others (one calibration, one SLO for all).
LIVE_VARIANTS = {"cascade": ["--taper-cascade"],
                 # the ablation of taper's prefill gate (controller/prefill.py)
                 "nogate": ["--no-taper-prefill-gate"]}


def live_variant(label: str) -> tuple[str, list[str]]:
    """`taper+cascade` -> ("taper", ["--taper-cascade"]); a plain policy -> (it, [])."""
    policy, plus, variant = label.partition("+")
    if not plus:
        return label, []
    if variant not in LIVE_VARIANTS:
        raise ValueError(f"policy {label!r}: unknown variant {variant!r} "
                         f"(known: {', '.join('+' + v for v in LIVE_VARIANTS)})")
    return policy, list(LIVE_VARIANTS[variant])


def validate(ns, live: bool) -> None:
    """Raise ValueError (one line) for bad input, before anything starts."""
    from controller.policies import parse_policy

    goodput(ns)
    _validate_dataset(ns)
    if ns.request_rate is not None:
        parse_rate(ns.request_rate)
    parse_sweep(ns.sweep)
    workload_config(ns)
    slo_spec(ns)
    for pol in policies(ns):
        if "+" in pol and not live:
            known = ", ".join("+" + v for v in LIVE_VARIANTS)
            raise ValueError(f"policy {pol!r}: variants ({known}) run live only, in taper bench")
        spec = parse_policy(live_variant(pol)[0])
        if live and spec.entry.needs_cost:
            raise ValueError(f"policy {pol!r} exists only in the simulator (taper sim)")
    if not policies(ns):
        raise ValueError("--policies: no policy given")
