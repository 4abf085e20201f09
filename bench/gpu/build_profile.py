"""Assemble the simulator's H200 profile from the full-model device runs.

    python -m bench.gpu.build_profile bench/results/gpu-full-profile \
        --pin prefill=run1 --out bench/sim/profiles/h200_qwen3_32b_full.json

Reads RUN/profile.json of each run folder given (runs of
bench/gpu/h200_full_profile.py) and takes, per section, the latest run that
has it (`--pin SECTION=RUN` names another): the decode table, the prefill
cells (fresh prompts, and over cached context), the cascade attention grid
(from which the cascade gate's per-width thresholds are derived, as `taper
profile` derives the CPU engine's) and the whole cascade steps. Decode tables of
several runs are compared cell by cell (`decode_run_spread`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.profile import min_prefixes
from bench.sim.cost import MeasuredCost
from controller.cascade_gate import CascadeGate


def load_runs(folder: Path) -> list[tuple[str, dict]]:
    runs = sorted(p for p in folder.iterdir() if (p / "profile.json").is_file())
    if not runs:
        raise ValueError(f"{folder}: no RUN/profile.json in it")
    return [(p.name, json.loads((p / "profile.json").read_text())) for p in runs]


def latest(runs: list[tuple[str, dict]], key: str,
           pins: dict[str, str] | None = None) -> tuple[str, dict | list]:
    """The section `key` of the latest run that has it, or of the run `pins`
    names for it."""
    have = [(name, data[key]) for name, data in runs if data.get(key)]
    if pins and key in pins:
        have = [(name, sec) for name, sec in have if name == pins[key]]
        if not have:
            raise ValueError(f"--pin {key}={pins[key]}: that run has no {key!r} section")
    if not have:
        raise ValueError(f"no run has a {key!r} section")
    return have[-1]


def run_spread(runs: list[tuple[str, dict]]) -> float | None:
    """Largest relative difference of a decode cell between any two runs."""
    tables = [np.array(d["decode"]["decode_s"], dtype=float) for _, d in runs
              if d.get("decode")]
    if len(tables) < 2:
        return None
    stack = np.stack(tables)
    both = ~np.isnan(stack).any(axis=0)  # cells every run measured
    if not both.any():
        return None
    cells = stack[:, both]
    return float(np.max((cells.max(0) - cells.min(0)) / cells.min(0)))


def sharing_fit(table: dict, steps: list[dict]) -> dict:
    """The decode table's two corrections for branch groups, from the whole
    cascade steps measured: `shared_reread`, what a branch's read of its
    group's prefix costs in plain attention relative to a read of its own (the
    median over steps of the value that makes the table give the measured plain
    step; below 1 where the branches' shared pages hit in cache), and
    `two_level_s_per_token`, seconds per prefix token a branch reads through the
    two-level path beyond the table's prefix-read-once step (the median of the
    measured excess per such token, clipped at 0). A step no value in [0, 2]
    explains is listed, not used; with none usable, 1 and 0 (the table alone)."""
    m = MeasuredCost("decode-table", table)
    per_step = []
    for r in steps:
        n, own, groups = r["batch"], r["batch"] * r["suffix"], r["groups"]
        uniq, reads = groups * r["prefix"], n * r["prefix"]
        lo, hi = 0.0, 2.0
        for _ in range(60):  # the plain step grows with rho: bisect
            mid = (lo + hi) / 2
            if m.decode(n, own + uniq + mid * (reads - uniq)) < r["plain_s"]:
                lo = mid
            else:
                hi = mid
        excess = max(0.0, r["cascade_s"] - m.decode(n, own, uniq, cascade=True))
        per_step.append({"groups": groups, "width": r["width"], "prefix": r["prefix"],
                         "reread": lo, "two_level_s_per_token": excess / max(reads, 1),
                         # width 1, or no re-read cost in [0, 2] gives the plain step
                         "used": reads > uniq and 0.0 < lo < 2.0})
    used = [x for x in per_step if x["used"]]
    if not used:  # nothing to fit: the table as it is (no reuse, no two-level excess)
        return {"shared_reread": 1.0, "two_level_s_per_token": 0.0, "sharing_fit": per_step}
    return {"shared_reread": float(np.median([x["reread"] for x in used])),
            "two_level_s_per_token": float(np.median([x["two_level_s_per_token"]
                                                      for x in used])),
            "sharing_fit": per_step}


def build(folder: Path, pins: dict[str, str] | None = None) -> dict:
    runs = load_runs(folder)
    dec_run, dec = latest(runs, "decode", pins)
    pre_run, pre = latest(runs, "prefill", pins)
    try:  # runs before the section existed have none: the prompt's cached part then is free
        cached_run, cached = latest(runs, "prefill_cached", pins)
    except ValueError:
        cached_run, cached = None, None
    att_run, grid = latest(runs, "cascade_attention", pins)
    step_run, steps = latest(runs, "cascade_steps", pins)
    meta = dict(runs[-1][1])
    widths = sorted({r["width"] for r in grid})
    prefixes = sorted({r["prefix"] for r in grid})
    gate = CascadeGate(tuple(widths), tuple(min_prefixes(grid, widths, prefixes)))
    null_cells = sum(x is None for row in dec["decode_s"] for x in row)
    fit = sharing_fit({"batches": dec["batches"], "contexts": dec["contexts"],
                       "decode_s": dec["decode_s"]}, steps)
    return {
        "label": "measured: all 64 layers of Qwen3-32B's shapes, random BF16 weights, on one "
                 "H200; paged KV (token-granular) with Triton flash-decode attention, "
                 "CUDA-graph replays (bench/gpu/h200_full_profile.py)",
        "model": "qwen3-32b", "gpu": meta["gpu"], "dtype": meta["dtype"],
        "torch": meta["torch"], "triton": meta["triton"], "model_layers": 64,
        "measured_layers": 64,
        "weight_bytes": meta["weight_bytes"], "kv_bytes_per_token": meta["kv_bytes_per_token"],
        # tokens of KV the card held beside the weights with 14 GB kept free
        "kv_capacity_tokens": meta["pool_tokens"],
        "batches": dec["batches"], "contexts": dec["contexts"], "decode_s": dec["decode_s"],
        "decode_null": f"{null_cells} cells (batch x (context+1) over kv_capacity_tokens) "
                       "were not run: no server holds them; the simulator extends each "
                       "batch row linearly in context from its last two cells",
        "decode_run_spread": run_spread(runs),
        "prefill": {"cells": pre["cells"], "attention": pre["attention"],
                    "method": "eager (as SGLang prefills): reqs fresh prompts of `tokens` "
                              "tokens each, causal flash attention, logits of last tokens"},
        "prefill_cached": None if cached is None else {
            "cells": cached["cells"], "attention": cached["attention"],
            "attention_paged": cached.get("attention_paged"),
            "method": "reqs requests of `tokens` new tokens, each over `cached` tokens of its "
                      "own in the pool, lower-right causal: eager with SDPA flash "
                      "(prefill_s), CUDA-graph replays with it (graph_s) and with a split-K "
                      "paged kernel for the cached part (graph_paged_s); the simulator "
                      "takes the better per cell (bench/sim/cost.CachedPrefill)"},
        "cascade": {**gate.to_dict(),
                    "rule": "two-level iff prefix >= min_prefix of the widest width <= the "
                            "group's (null: never); from where plain/two-level attention "
                            "time crosses 1",
                    "backend": "triton two-level (bench/gpu/paged_attention.TwoLevel)",
                    "shape": meta["shape"], "grid": grid},
        "cascade_steps": steps,
        # fitted to cascade_steps (sharing_fit says how): the simulator's step cost
        # for branch groups (bench/sim/engine.py Simulator._shared_reads)
        "shared_reread": fit["shared_reread"],
        "two_level_s_per_token": fit["two_level_s_per_token"],
        "sharing_fit": fit["sharing_fit"],
        "source": {"decode": dec_run, "prefill": pre_run, "prefill_cached": cached_run,
                   "cascade_attention": att_run,
                   "cascade_steps": step_run,
                   "runs": [name for name, _ in runs]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.build_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a folder of run folders, each with profile.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pin", action="append", default=[], metavar="SECTION=RUN",
                   help="take SECTION from run folder RUN, not the latest that has it "
                        "(e.g. prefill=run1: a later run re-measured it only as an anchor)")
    ns = p.parse_args(argv)
    try:
        pins = dict(x.split("=", 1) for x in ns.pin)
    except ValueError:
        print(f"build_profile: --pin takes SECTION=RUN, got {ns.pin}", file=sys.stderr)
        return 2
    try:
        data = build(ns.folder, pins)
    except (OSError, ValueError, KeyError) as e:
        print(f"build_profile: {e}", file=sys.stderr)
        return 2
    ns.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {ns.out}: decode {len(data['batches'])}x{len(data['contexts'])}, "
          f"{len(data['prefill']['cells'])} prefill cells, cascade gate "
          f"{dict(zip(data['cascade']['widths'], data['cascade']['min_prefix']))}, "
          f"run spread {data['decode_run_spread']}, shared reread {data['shared_reread']:.3f}, "
          f"two-level {1e9 * data['two_level_s_per_token']:.2f} ns/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
