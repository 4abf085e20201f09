"""Where TAPER pays: max-rate ratios over a grid of regimes, in the simulator.

    .venv/bin/python -m bench.sim.sensitivity [--grid axes|full] [--num-prompts 150] [--out DIR]

Axes: TPOT SLO {1.25, 1.5, 2, 3} x isolated, branch stretch {1.5, 2, 4, 8},
widths {2-4, 4-8, 16-32}, context {256, 2K, 8K} tokens (prompts drawn from
0.75x to 1.25x of it), everything else the default preset's. In each cell every
policy's highest rate at >= 95% attainment is found by bisection (bench/sweep.py)
and taper's ratios over off, eager and the best cap are reported. `--grid full`
runs all 144 cells (hours on 2 cores); `--grid axes` runs the centre cell (TPOT
1.5x, stretch 2, widths 4-8, context 2K) and each axis varied alone (11 cells).
Finished searches are kept in OUT/partial.jsonl, so a run resumes where it
stopped and an axes run is the start of a full one; only searches run with the
same setup (the cost model's file content and every option that moves a
figure, `setup`) are reused. A cap at or
above the widest group is eager, so only caps below it run. Cells run in
parallel worker processes; one line per finished cell goes to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

TPOT_SCALES = (1.25, 1.5, 2.0, 3.0)
STRETCHES = (1.5, 2.0, 4.0, 8.0)
WIDTHS = ((2, 4), (4, 8), (16, 32))
CONTEXTS = (256, 2048, 8192)
CAPS = (2, 4, 8, 16)
CENTRE = (1.5, 2.0, (4, 8), 2048)


def _on_an_axis(cell: tuple) -> bool:
    """The centre, or the centre with one axis moved."""
    return sum(a != b for a, b in zip(cell, CENTRE)) <= 1


def grid_cells(grid: str) -> list[tuple]:
    """The cells of `--grid full` (every combination) or `--grid axes` (the
    centre and each axis varied alone)."""
    full = list(itertools.product(TPOT_SCALES, STRETCHES, WIDTHS, CONTEXTS))
    if grid == "full":
        return full
    return [c for c in full if _on_an_axis(c)]


def _cell_policies(width: tuple[int, int]) -> list[str]:
    return ["off", "eager", *[f"cap:{k}" for k in CAPS if k < width[1]], "taper"]


def _task(args) -> dict:
    """One policy's max rate in one cell."""
    from bench.calibration import capacity, from_cost, mean_context
    from bench.metrics import SLOSpec, summarize
    from bench.sim import cost as costs
    from bench.sim.engine import SimConfig
    from bench.sim.run import simulate
    from bench.sweep import SweepSpec, max_rate, sweep_one
    from bench.workload import PRESETS, at_rate, generate, with_slo
    from controller import TaperConfig

    cell, policy, ns = args
    tpot_x, stretch, width, context = cell
    cost = costs.load(ns.cost_model)
    wl = replace(PRESETS[ns.workload], num_programs=ns.num_prompts, rate=1.0, seed=ns.seed,
                 width=width, prompt_tokens=(round(0.75 * context), round(1.25 * context)))
    progs = generate(wl)
    cal = from_cost(cost, mean_context(progs))
    progs = with_slo(progs, ns.ttft_x * cal["ttft_s"], tpot_x * cal["tpot_s"])
    spec = SLOSpec(branch_stretch=stretch)
    base = TaperConfig(branch_stretch=stretch)
    sim = SimConfig(kv_capacity=ns.kv_capacity, seed=ns.seed)
    cap = capacity(cal, progs)

    def probe(rate: float) -> dict:
        out = simulate(at_rate(progs, 1.0, rate), cost, policy, base, sim)
        return {"rate": rate, "summary": summarize(out["records"], spec)}

    t0 = time.monotonic()
    runs = sweep_one(probe, SweepSpec(start=ns.start * cap))
    best = max_rate(runs)
    return {"cell": cell, "policy": policy, "max_rate": best["rate"], "capacity": cap,
            "probes": [(r["rate"], r["summary"]["slo_attainment"]) for r in runs],
            "wall_s": time.monotonic() - t0}


def setup(ns: argparse.Namespace) -> dict:
    """What a finished search's figures depend on besides its cell and policy:
    the cost model (its file's content, when it names one) and the options."""
    import hashlib

    spec = ns.cost_model
    kind, _, rest = spec.partition(":")
    path = rest if kind in ("measured", "linear", "trace") else spec  # or a bare path
    digest = None
    if path and Path(path).is_file():
        digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]
    return {"cost_model": spec, "cost_sha1": digest, "workload": ns.workload,
            "num_prompts": ns.num_prompts, "seed": ns.seed, "ttft_x": ns.ttft_x,
            "start": ns.start, "kv_capacity": ns.kv_capacity}


def resume(partial: Path, want: dict) -> tuple[dict, int]:
    """The finished searches in `partial` run with setup `want`, by (cell,
    policy), and how many lines were left out (another setup, or none
    recorded); the file is rewritten with the kept lines only."""
    done, stale = {}, 0
    if not partial.exists():
        return done, 0
    kept = []
    for line in partial.read_text().splitlines():
        r = json.loads(line)
        if r.get("setup") != want:
            stale += 1
            continue
        kept.append(line)
        done[(_cell_key(r["cell"]), r["policy"])] = r
    if stale:
        partial.write_text("".join(line + "\n" for line in kept))
    return done, stale


def _cell_key(cell) -> tuple:
    """A cell as a key: its widths a tuple again after a JSON round trip."""
    return tuple(tuple(x) if isinstance(x, list) else x for x in cell)


def _ratio(t, o):
    if o is None:
        return math.inf if t else None
    return (t or 0.0) / o


def summarize_cells(results: list[dict]) -> list[dict]:
    cells: dict[tuple, dict] = {}
    for r in results:
        cells.setdefault(_cell_key(r["cell"]), {})[r["policy"]] = r["max_rate"]
    out = []
    for cell, rates in sorted(cells.items()):
        caps = [v for p, v in rates.items() if p.startswith("cap:") and v is not None]
        best_cap = max(caps) if caps else None
        if not any(p.startswith("cap:") for p in rates):
            best_cap = rates.get("eager")
        t = rates.get("taper")
        out.append({"tpot_x": cell[0], "stretch": cell[1], "width": list(cell[2]),
                    "context": cell[3], "max_rate": rates,
                    "taper/off": _ratio(t, rates.get("off")),
                    "taper/eager": _ratio(t, rates.get("eager")),
                    "taper/best cap": _ratio(t, best_cap)})
    return out


def _f(x) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2f}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Max-rate ratios, taper over off / eager / best cap, by regime "
             f"({meta['num_prompts']} programs per probe, seed {meta['seed']}, cost model "
             f"{meta['cost_model']}). Each cell: `off | eager | best cap`; `inf`: the other "
             f"policy sustains no rate tried; `-`: neither does.\n"]
    axes = [r for r in rows
            if _on_an_axis((r["tpot_x"], r["stretch"], tuple(r["width"]), r["context"]))]
    if axes:
        lines.append("\n#### One axis at a time (centre: TPOT 1.5x, stretch 2, widths 4-8, "
                     "context 2048)\n")
        lines.append("| TPOT SLO | stretch | widths | context | taper/off | taper/eager | "
                     "taper/best cap |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in axes:
            lines.append(f"| {r['tpot_x']:g}x | {r['stretch']:g} | {r['width'][0]}-"
                         f"{r['width'][1]} | {r['context']} | {_f(r['taper/off'])} | "
                         f"{_f(r['taper/eager'])} | {_f(r['taper/best cap'])} |")
    if len(rows) == len(axes):
        return "\n".join(lines) + "\n"
    for context, width in itertools.product(CONTEXTS, WIDTHS):
        lines.append(f"\n#### context {context} tokens, widths {width[0]}-{width[1]}\n")
        lines.append("| TPOT SLO \\ stretch | " + " | ".join(f"{s:g}" for s in STRETCHES) + " |")
        lines.append("|---|" + "---|" * len(STRETCHES))
        for tx in TPOT_SCALES:
            cells = []
            for st in STRETCHES:
                row = next((r for r in rows if r["tpot_x"] == tx and r["stretch"] == st
                            and tuple(r["width"]) == width and r["context"] == context), None)
                cells.append("…" if row is None else
                             f"{_f(row['taper/off'])} \\| {_f(row['taper/eager'])} \\| "
                             f"{_f(row['taper/best cap'])}")
            lines.append(f"| {tx:g}x | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cost-model",
                   default="measured:bench/sim/profiles/h200_qwen3_32b_full.json")
    p.add_argument("--workload", default="long-context")
    p.add_argument("--grid", choices=("axes", "full"), default="full",
                   help="full: all 144 cells; axes: the centre and each axis alone (11)")
    p.add_argument("--num-prompts", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-x", type=float, default=10.0, help="TTFT SLO, x isolated")
    p.add_argument("--start", type=float, default=0.25,
                   help="first rate tried, as a share of capacity")
    p.add_argument("--kv-capacity", type=int, default=400_000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="results/sensitivity")
    ns = p.parse_args(argv)
    cells = grid_cells(ns.grid)
    tasks = [(c, pol, ns) for c in cells for pol in _cell_policies(c[2])]
    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / "partial.jsonl"
    want = setup(ns)
    done, stale = resume(partial, want)  # a long run may be interrupted
    if stale:
        print(f"[sensitivity] {partial}: {stale} finished searches of another setup (cost "
              f"model or options) dropped, not reused", file=sys.stderr, flush=True)
    todo = [t for t in tasks if (t[0], t[1]) not in done]
    print(f"[sensitivity] {len(cells)} cells, {len(tasks)} (cell, policy) searches, "
          f"{len(todo)} to run on {ns.workers} workers", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with ProcessPoolExecutor(ns.workers) as pool, open(partial, "a") as log:
        futures = [pool.submit(_task, t) for t in todo]
        for i, fut in enumerate(as_completed(futures), 1):
            r = {**fut.result(), "setup": want}
            done[(r["cell"], r["policy"])] = r
            log.write(json.dumps(r) + "\n")
            log.flush()
            print(f"[sensitivity] {i}/{len(todo)} {r['cell']} {r['policy']}: max rate "
                  f"{_f(r['max_rate'])} ({r['wall_s']:.0f} s; {time.monotonic() - t0:.0f} s "
                  f"in all)", file=sys.stderr, flush=True)
    wanted = set(cells)
    rows = summarize_cells([r for key, r in done.items() if key[0] in wanted])
    meta = {k: v for k, v in vars(ns).items()}
    (out_dir / "result.json").write_text(json.dumps(
        {"meta": meta, "cells": [{k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
                                  for k, v in r.items()} for r in rows]}, indent=1))
    (out_dir / "result.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
