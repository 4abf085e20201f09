"""Simulated vs live on the same trace and policy (CPU engine).

    .venv/bin/python -m bench.sim.fidelity [--policy taper] [--cost-model linear:PATH]

Runs the trace live on a fresh `taper serve`, then in the simulator with the
fitted CPU cost model, and prints goodput, SLO attainment and p50/p99 TPOT
side by side with their relative differences (target: within 10%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from bench.cli import with_slo
from bench.metrics import SLOSpec, summarize
from bench.workload import WorkloadConfig, generate

FIELDS = (("goodput", lambda s: s["goodput"]), ("attainment", lambda s: s["slo_attainment"]),
          ("TPOT p50", lambda s: s["tpot_s"]["p50"]), ("TPOT p99", lambda s: s["tpot_s"]["p99"]))


def main() -> None:
    from bench.cli import _calibrate
    from bench.replay import replay
    from bench.sim import cost as costs
    from bench.sim.run import simulate
    from sglang_taper.server import ServerProcess

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="taper")
    p.add_argument("--cost-model", default="linear:bench/sim/profiles/cpu_tiny_llama.json")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--request-rate", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/fidelity.json")
    ns = p.parse_args()
    spec = SLOSpec()
    cost = costs.load(ns.cost_model)
    progs = generate(WorkloadConfig(num_programs=ns.num_prompts, rate=ns.request_rate,
                                    seed=ns.seed))
    with ServerProcess(["--taper-policy", ns.policy, "--log-level", "warning"]) as srv:
        iso = asyncio.run(_calibrate(srv.url))
        progs = with_slo(progs, 1.0, 3 * iso["tpot_s"])
        records, _ = asyncio.run(replay(srv.url, progs))
    live = summarize(records, spec)
    sim = summarize(simulate(progs, cost, ns.policy)["records"], spec)
    rows = []
    print(f"policy {ns.policy}, {len(progs)} programs at {ns.request_rate}/s, "
          f"cost model {cost.name}")
    print("| figure | live | sim | sim/live - 1 |\n|---|---|---|---|")
    for name, get in FIELDS:
        a, b = get(live), get(sim)
        rel = (b / a - 1) if a else float("nan")
        rows.append({"figure": name, "live": a, "sim": b, "rel_diff": rel})
        print(f"| {name} | {a:.4g} | {b:.4g} | {100 * rel:+.1f}% |")
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps({"config": vars(ns), "rows": rows, "live": live,
                                        "sim": sim}, indent=2))


if __name__ == "__main__":
    main()
