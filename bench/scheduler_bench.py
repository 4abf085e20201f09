"""Measure the patched scheduler on the CPU engine (issue: scheduler hooks).

A. A latency-critical serial request decoding beside one group of fork
   branches. Its TPOT SLO is set between its isolated TPOT and its TPOT under
   `eager` (both measured first); then its TPOT and the branches' completion
   time under `taper`, `eager` and `off`, each on a fresh server.
B. The hook's overhead on a workload with no branches: output throughput with
   the plugin enabled (`taper serve`) and not enabled (stock
   `sglang.launch_server`), alternated, side by side in one run. The plugin's
   batch-invariant matmuls (on by default on the CPU engine) are a separate
   cost, so there are three servers: stock, the hooks alone
   (`--taper-batch-invariant off`), and the default (hooks + invariance).

    .venv/bin/python -m bench.scheduler_bench [--branches 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import urllib.request
from pathlib import Path

import aiohttp

from bench.client import generate
from sglang_taper.server import ServerProcess

PREFIX = "Shared context for every branch of this group. " * 12


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/taper/stats", timeout=30) as r:
        return json.loads(r.read())


async def _warm(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        await generate(s, url, "warm up", 8)


async def serial_alone(url: str, tokens: int) -> float:
    async with aiohttp.ClientSession() as s:
        c = await generate(s, url, "Serial request, alone:", tokens)
    return c.tpot


async def corun(url: str, branches: int, branch_tokens: int, serial_tokens: int,
                tpot_slo: float | None) -> dict:
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        group = [asyncio.create_task(generate(
            s, url, PREFIX + f"Branch {i}:", branch_tokens,
            {"taper_group": "bench-g", "taper_branch": i, "taper_width": branches}))
            for i in range(branches)]
        await asyncio.sleep(0.5)  # the branches are decoding by now
        custom = {"taper_tpot": tpot_slo, "taper_ttft": 5.0} if tpot_slo else None
        serial = await generate(s, url, "Serial request, beside the branches:", serial_tokens,
                                custom)
        done = await asyncio.gather(*group)
        t_end = max(c.end for c in done)
    errors = [c.error for c in [serial, *done] if c.error]
    return {"serial_tpot": serial.tpot, "serial_ttft": serial.ttft,
            "branches_done_s": t_end - t0, "errors": errors}


def part_a(ns) -> dict:
    out: dict = {}
    slo = None
    for policy in ("eager", "taper", "off"):
        with ServerProcess(["--taper-policy", policy, "--log-level", "warning"],
                           log_path=Path(ns.logs) / f"sched-bench-{policy}.log") as srv:
            asyncio.run(_warm(srv.url))
            if policy == "eager":
                out["isolated_tpot"] = asyncio.run(serial_alone(srv.url, ns.serial_tokens))
            r = asyncio.run(corun(srv.url, ns.branches, ns.branch_tokens, ns.serial_tokens,
                                  slo))
            stats = _stats(srv.url)
            r["mean_branch_width"] = stats["mean_branch_width"]
            r["held_branch_steps"] = stats["held_branch_steps"]
            out[policy] = r
            if policy == "eager":
                slo = (out["isolated_tpot"] + r["serial_tpot"]) / 2
                out["tpot_slo"] = slo
            print(f"[A] {policy:5s} serial TPOT {1e3 * r['serial_tpot']:.2f} ms "
                  f"(SLO {1e3 * slo:.2f} ms), branches done in {r['branches_done_s']:.2f} s, "
                  f"mean width {r['mean_branch_width']:.1f}", flush=True)
    return out


async def no_branch_load(url: str, n: int, tokens: int) -> float:
    """Output tokens per second for n concurrent ordinary requests."""
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        done = await asyncio.gather(*[generate(s, url, f"Ordinary request {i}:", tokens)
                                      for i in range(n)])
        dt = time.monotonic() - t0
    return sum(c.output_tokens for c in done) / dt


def part_b(ns) -> dict:
    from sglang_taper.serve import build_launch

    # One command line; only the plugin's switches in the environment differ.
    launch = build_launch(["--taper-policy", "taper", "--log-level", "warning"])
    envs = {
        "stock": {k: v for k, v in launch.env.items() if not k.startswith("TAPER_")},
        "hooks": {k: v for k, v in launch.env.items() if k != "TAPER_BATCH_INVARIANT"},
        "taper": launch.env,
    }
    runs: dict[str, list[float]] = {k: [] for k in envs}
    hook = {}
    for rnd in range(ns.rounds):
        order = list(envs) if rnd % 2 == 0 else list(reversed(envs))
        for kind in order:
            srv = ServerProcess(cmd=launch.cmd, env=envs[kind],
                                log_path=Path(ns.logs) / f"overhead-{kind}.log")
            with srv:
                asyncio.run(_warm(srv.url))
                # The first full-size runs of a fresh server are slow (allocator
                # and kernel warm-up): two untimed passes, then the median of three.
                for _ in range(2):
                    asyncio.run(no_branch_load(srv.url, ns.requests, ns.tokens))
                tput = statistics.median(asyncio.run(no_branch_load(srv.url, ns.requests,
                                                                    ns.tokens))
                                         for _ in range(3))
                if kind == "hooks":
                    hook = _stats(srv.url)["overhead"]
            runs[kind].append(tput)
            print(f"[B] round {rnd} {kind:5s} {tput:.1f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"[B] TAPER's own time on the scheduler path: {hook['hook_us_per_step']:.1f} us "
          f"per decode step, {100 * hook['fraction_of_decode']:.2f}% of decode time")
    print(f"[B] medians: stock {med['stock']:.1f}, hooks {med['hooks']:.1f}, "
          f"hooks + batch invariance {med['taper']:.1f} tok/s")
    return {"stock_tok_s": runs["stock"], "hooks_tok_s": runs["hooks"],
            "taper_tok_s": runs["taper"],
            "overhead_fraction": 1 - med["hooks"] / med["stock"],
            "batch_invariance_cost_fraction": 1 - med["taper"] / med["hooks"],
            "hook": hook}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--branches", type=int, default=64)
    p.add_argument("--branch-tokens", type=int, default=256)
    p.add_argument("--serial-tokens", type=int, default=96)
    p.add_argument("--requests", type=int, default=32, help="B: concurrent requests")
    p.add_argument("--tokens", type=int, default=192, help="B: output tokens each")
    p.add_argument("--rounds", type=int, default=3, help="B: alternations")
    p.add_argument("--skip", choices=("a", "b"), default=None)
    p.add_argument("--out", default="results/scheduler_bench.json")
    p.add_argument("--logs", default=os.environ.get("TAPER_BENCH_LOGS", "/tmp/taper-bench"))
    ns = p.parse_args()
    Path(ns.logs).mkdir(parents=True, exist_ok=True)
    result = {"config": vars(ns)}
    if ns.skip != "a":
        result["corun"] = part_a(ns)
    if ns.skip != "b":
        result["overhead"] = part_b(ns)
        o = result["overhead"]
        print(f"[B] hook overhead without branches: {100 * o['overhead_fraction']:.2f}%; "
              f"batch invariance: {100 * o['batch_invariance_cost_fraction']:.2f}% more "
              "(medians of rounds)")
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
