"""`taper serve`: start `sglang.launch_server` with TAPER enabled.

The launcher consumes its own `--taper-*` flags, validates them into a
`TaperConfig`, and passes every other argument unchanged to SGLang. The config
reaches the plugin in SGLang's processes through the environment (SGLang's
`ServerArgs` rejects unknown flags; spawned children inherit the environment).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

from controller.cascade_gate import CascadeGate
from controller.config import TaperConfig
from sglang_taper.plugin import ENV_BATCH_INVARIANT, ENV_CONFIG, ENV_ENABLED, ENV_SLOWDOWN

# What the notes found to work on a CPU-only machine; each applies only when
# the user did not pass the flag. Overlap scheduling is off because with it a
# fork's prefix lands in the radix cache a step late and branches miss it.
CPU_DEFAULTS: tuple[tuple[str, str | None], ...] = (
    ("--device", "cpu"),
    ("--dtype", "float32"),
    ("--attention-backend", "torch_native"),
    ("--sampling-backend", "pytorch"),
    ("--disable-cuda-graph", None),
    ("--max-total-tokens", "65536"),
    ("--mem-fraction-static", "0.05"),
    ("--disable-overlap-schedule", None),
)


class ServeError(ValueError):
    """Bad `taper serve` input; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Launch:
    cmd: list[str]  # the SGLang command line
    env: dict[str, str]  # its environment
    config: TaperConfig
    cpu: bool  # CPU settings were applied


def _flag(name: str) -> str:
    return "--taper-" + name.replace("_", "-")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="taper serve",
        allow_abbrev=False,  # never let a prefix of a --taper flag eat an SGLang flag
        description="Start the SGLang server with TAPER branch admission. Flags other "
        "than --taper-* go to `python -m sglang.launch_server` unchanged.",
        epilog="At run time: GET /taper/config answers the live settings (the fields "
        "below, as JSON); POST /taper/config with a JSON object of fields, e.g. "
        '{"policy": "cap:4"} or {"enabled": false}, changes them between two decode '
        "steps on every scheduler (HTTP 400 with one line for bad input; the predictor "
        "keeps its fit). POST needs --admin-api-key when set, else --api-key. cascade, "
        "cascade_profile and profile are fixed at launch. Figures: GET /taper/stats. "
        "After a fault turned regulation off (degraded), POST /taper/rearm turns it "
        "back on without a restart (same key).",
    )
    for f in fields(TaperConfig):
        if not f.init:
            continue
        default = f.default if f.default is not MISSING else None
        if f.type in ("bool", bool):
            state = "on" if f.default else "off"
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=f.default, help=f"{f.metadata.get('help')} (default: {state})")
        else:
            kind = {"float": float, "int": int}.get(str(f.type), str)
            p.add_argument(_flag(f.name), dest=f.name, type=kind, default=default,
                           help=f"{f.metadata.get('help')} (default: {default})")
    p.add_argument("--taper-device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: CPU settings when no NVIDIA device is present")
    p.add_argument("--taper-batch-invariant", choices=("on", "off"), default=None,
                   help="CPU engine: compute every matmul row as if alone in its batch, so "
                   "that holding branches out of a step never changes a greedy output "
                   "(default on with the CPU engine; on a GPU use SGLang's "
                   "--enable-deterministic-inference)")
    p.add_argument("--taper-slowdown", type=float, default=1.0, metavar="F",
                   help="testing: every forward pass takes F times as long, as on a machine "
                   "F times slower (default 1: off)")
    p.add_argument("--taper-overlap", action="store_true",
                   help="on CPU, keep SGLang's overlap scheduler (off by default there: "
                   "with it a fork's prefix reaches the radix cache a step late)")
    return p


def has_flag(args: Sequence[str], flag: str) -> bool:
    """`flag` was given, as `--flag v` or `--flag=v`."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _value(args: list[str], *flags: str) -> str | None:
    for i, a in enumerate(args):
        for flag in flags:
            if a == flag and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
    return None


def _parallel_ranks(args: list[str]) -> int:
    """Scheduler processes SGLang starts: dp x tp x pp."""
    n = 1
    for flags in (("--dp-size", "--data-parallel-size", "--dp"),
                  ("--tp-size", "--tensor-parallel-size", "--tp"),
                  ("--pp-size", "--pipeline-parallel-size")):
        v = _value(args, *flags)
        if v is not None:
            try:
                n *= int(v)
            except ValueError:
                raise ServeError(f"{flags[0]} must be an integer, got {v!r}") from None
    return n


def cpu_binding(ranks: int, cores: list[int]) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for `ranks` CPU schedulers: the cores split into
    contiguous shares, one per rank (a core shared round-robin when there are
    fewer cores than ranks). SGLang's default binds a rank per NUMA node and
    refuses more ranks than nodes."""
    cores = sorted(cores)
    if len(cores) < ranks:
        return "|".join(str(cores[i % len(cores)]) for i in range(ranks))
    shares = []
    for i in range(ranks):
        part = cores[i * len(cores) // ranks:(i + 1) * len(cores) // ranks]
        contiguous = part[-1] - part[0] == len(part) - 1
        shares.append(f"{part[0]}-{part[-1]}" if contiguous and len(part) > 1
                      else ",".join(str(c) for c in part))
    return "|".join(shares)


def _looks_local(path: str) -> bool:
    """A hub id is `org/name`; anything else is meant as a local path."""
    return path.startswith(("/", ".", "~")) or path.count("/") != 1


def build_launch(argv: list[str], base_env: dict[str, str] | None = None) -> Launch:
    """Validate `taper serve` arguments and build the SGLang command and environment."""
    from sglang_taper.cpu import assets

    ns, rest = _parser().parse_known_args(argv)
    values = {f.name: getattr(ns, f.name) for f in fields(TaperConfig) if f.init}
    try:
        config = TaperConfig(**values)
    except ValueError as e:
        msg = str(e)
        for f in fields(TaperConfig):
            msg = msg.replace(f"TaperConfig.{f.name}", _flag(f.name))
        raise ServeError(msg) from None
    if config.spec.entry.needs_cost:
        raise ServeError(f"--taper-policy {config.policy}: needs the true step-time model, "
                         f"which only the simulator has (taper sim)")
    if config.profile and not Path(config.profile).is_file():
        raise ServeError(f"--taper-profile: no such file: {config.profile}")
    if config.cascade_profile:
        if not config.cascade:
            raise ServeError("--taper-cascade-profile needs --taper-cascade")
        try:  # here, not in the server process, where a bad file stops the start-up
            CascadeGate.load(config.cascade_profile)
        except ValueError as e:
            raise ServeError(f"--taper-cascade-profile: {e}") from None
    if has_flag(rest, "--enable-mixed-chunk") and config.policy != "eager":
        raise ServeError(
            "--enable-mixed-chunk builds decode batches outside the step TAPER regulates; "
            "drop it, or use --taper-policy eager"
        )

    cpu = ns.taper_device == "cpu" or (ns.taper_device == "auto" and not assets.has_gpu())
    env = dict(os.environ if base_env is None else base_env)
    args = list(rest)
    model = _value(args, "--model-path", "--model")
    if model is not None:
        if _looks_local(model) and not Path(model).expanduser().exists():
            raise ServeError(f"--model-path: no such directory: {model}")
    if config.cascade and not has_flag(args, "--attention-backend"):
        args += ["--attention-backend", "taper_cascade" if cpu else "taper_cascade_flashinfer"]
        if not cpu and not has_flag(args, "--disable-cuda-graph"):
            args.append("--disable-cuda-graph")  # cascade steps are eager-only
    env.pop(ENV_BATCH_INVARIANT, None)  # only this launcher's flags decide
    env.pop(ENV_SLOWDOWN, None)
    if not (ns.taper_slowdown >= 1.0 and math.isfinite(ns.taper_slowdown)):
        raise ServeError(f"--taper-slowdown must be >= 1, got {ns.taper_slowdown}")
    if ns.taper_slowdown > 1.0:
        # The forward must have finished when run_batch returns: no overlap loop.
        if ns.taper_overlap or not (cpu or has_flag(args, "--disable-overlap-schedule")):
            raise ServeError("--taper-slowdown needs the overlap scheduler off")
        env[ENV_SLOWDOWN] = repr(ns.taper_slowdown)
    if ns.taper_batch_invariant == "on" and not cpu:
        raise ServeError("--taper-batch-invariant is for the CPU engine; on a GPU use "
                         "SGLang's --enable-deterministic-inference")
    if cpu:
        stub, tiny = assets.ensure_cpu_assets()
        if model is None:
            args = ["--model-path", str(tiny), *args]
        for flag, value in CPU_DEFAULTS:
            if flag == "--disable-overlap-schedule" and ns.taper_overlap:
                continue
            if not has_flag(args, flag):
                args += [flag] if value is None else [flag, value]
        env = assets.cpu_env(env)
        ranks = _parallel_ranks(args)
        if ranks > 1 and "SGLANG_CPU_OMP_THREADS_BIND" not in env:
            env["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_binding(ranks, list(os.sched_getaffinity(0)))
        if ns.taper_batch_invariant != "off":
            env[ENV_BATCH_INVARIANT] = "1"
            if not has_flag(argv, "--taper-row-tile"):
                # Batch-invariant GEMMs compute in 16-row tiles: step time is a
                # staircase in the batch size, which the predictor then models.
                config = replace(config, row_tile=16)
    elif model is None:
        raise ServeError("--model-path is required when a GPU is present")
    # The scheduler's numpy work is a few tiny arrays per step; OpenBLAS threads
    # waking for them contend with torch's OpenMP workers (measured: the hooks'
    # time per step fell ~4x on 2 cores with this set).
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env[ENV_ENABLED] = "1"
    env[ENV_CONFIG] = config.to_json()
    cmd = [sys.executable, "-m", "sglang.launch_server", *args]
    return Launch(cmd=cmd, env=env, config=config, cpu=cpu)


def serve(argv: list[str]) -> int:
    try:
        launch = build_launch(argv)
    except ServeError as e:
        print(f"taper serve: error: {e}", file=sys.stderr)
        return 2
    print(f"taper serve: policy={launch.config.policy} "
          f"{'cpu engine' if launch.cpu else 'gpu'}: {' '.join(launch.cmd[1:])}",
          file=sys.stderr, flush=True)
    # exec, so that the pid the caller holds is SGLang's launcher: SIGTERM stops all.
    os.execvpe(launch.cmd[0], launch.cmd, launch.env)
    return 0  # unreachable
