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

C. `--overhead`: the hooks' cost on one server, the plugin switched on and
   off at run time (POST /taper/config `enabled`) in interleaved rounds; the
   paired throughput ratio with a 95% interval, and TAPER's self-timed share
   of a decode step at 1, 16 and 64 sequences. 100 rounds by default (about
   10 minutes): on a 2-core host a pair's ratio spreads by about 9%, and 12
   rounds gave an interval 11 points wide.

    .venv/bin/python -m bench.scheduler_bench --overhead [--rounds 100]
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


def _set_enabled(url: str, on: bool) -> None:
    req = urllib.request.Request(url + "/taper/config", method="POST",
                                 data=json.dumps({"enabled": on}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        got = json.loads(r.read())
    if got.get("enabled") is not on:
        raise RuntimeError(f"POST /taper/config enabled={on} answered {got}")


# two-sided 95% Student t quantiles by degrees of freedom (1.96 past the table)
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26,
        10: 2.23, 11: 2.20, 12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11,
        18: 2.10, 19: 2.09, 20: 2.09, 25: 2.06, 30: 2.04, 40: 2.02, 60: 2.00}


def _t95(df: int) -> float:
    keys = [k for k in _T95 if k <= df]
    return _T95[max(keys)] if df <= 60 else 1.96


def paired_overhead(on: list[float], off: list[float]) -> dict:
    """Overhead 1 - on/off from paired rounds: the mean of the per-round log
    ratios with its 95% t interval (rounds differ in the host's speed; a pair
    shares it)."""
    import math

    logs = [math.log(a / b) for a, b in zip(on, off, strict=True)]
    n = len(logs)
    mean = statistics.fmean(logs)
    half = _t95(n - 1) * statistics.stdev(logs) / math.sqrt(n) if n > 1 else float("inf")
    return {"rounds": n, "ratio_on_off": math.exp(mean),
            "overhead": 1 - math.exp(mean),
            # the interval of the overhead: its upper end is the pessimistic one
            "overhead_ci95": [1 - math.exp(mean + half), 1 - math.exp(mean - half)]}


def _hook_share(url: str, seqs: int, tokens: int) -> dict:
    """TAPER's self-timed time per decode step, at `seqs` concurrent sequences."""
    before = _stats(url)
    asyncio.run(no_branch_load(url, seqs, tokens))
    after = _stats(url)
    d_hook = after["overhead"]["hook_seconds"] - before["overhead"]["hook_seconds"]
    d_decode = after["overhead"]["decode_seconds"] - before["overhead"]["decode_seconds"]
    d_steps = after["steps"] - before["steps"]
    return {"seqs": seqs, "steps": d_steps,
            "hook_us_per_step": 1e6 * d_hook / max(1, d_steps),
            "step_ms": 1e3 * d_decode / max(1, d_steps),
            "fraction_of_decode": d_hook / max(1e-9, d_decode)}


def overhead(ns) -> dict:
    """One server under `taper`; the plugin switched on and off through
    POST /taper/config (`enabled`) in short interleaved rounds (on-off, then
    off-on), a load with no branches in each. The throughput ratio of each
    pair is a same-server, same-minute comparison."""
    srv = ServerProcess(["--taper-policy", "taper", "--log-level", "warning"],
                        log_path=Path(ns.logs) / "overhead-toggle.log")
    runs: dict[bool, list[float]] = {True: [], False: []}
    with srv:
        asyncio.run(_warm(srv.url))
        for _ in range(2):  # allocator and kernel warm-up, untimed
            asyncio.run(no_branch_load(srv.url, ns.requests, ns.tokens))
        for rnd in range(ns.rounds):
            for on in ((True, False) if rnd % 2 == 0 else (False, True)):
                _set_enabled(srv.url, on)
                tput = asyncio.run(no_branch_load(srv.url, ns.requests, ns.tokens))
                runs[on].append(tput)
                print(f"[overhead] round {rnd + 1}/{ns.rounds} {'on ' if on else 'off'} "
                      f"{tput:.1f} tok/s", flush=True)
        _set_enabled(srv.url, True)
        shares = []
        for seqs in ns.share_seqs:
            shares.append(_hook_share(srv.url, seqs, ns.tokens))
            h = shares[-1]
            print(f"[overhead] {seqs:3d} seqs: hooks {h['hook_us_per_step']:.1f} us per step "
                  f"of {h['step_ms']:.2f} ms ({100 * h['fraction_of_decode']:.2f}%)", flush=True)
    res = paired_overhead(runs[True], runs[False])
    lo, hi = res["overhead_ci95"]
    print(f"[overhead] taper on vs off, same server, {res['rounds']} paired rounds of "
          f"{ns.requests} x {ns.tokens} tokens: overhead {100 * res['overhead']:.2f}% "
          f"(95% CI {100 * lo:.2f}% .. {100 * hi:.2f}%); target < 2%, upper end < 3%: "
          f"{'met' if res['overhead'] < 0.02 and hi < 0.03 else 'NOT met'}", flush=True)
    return {**res, "on_tok_s": runs[True], "off_tok_s": runs[False], "hook_share": shares}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--branches", type=int, default=64)
    p.add_argument("--branch-tokens", type=int, default=256)
    p.add_argument("--serial-tokens", type=int, default=96)
    p.add_argument("--requests", type=int, default=32, help="B: concurrent requests")
    p.add_argument("--tokens", type=int, default=192, help="B: output tokens each")
    p.add_argument("--rounds", type=int, default=None,
                   help="B: alternations (default 3; 100 with --overhead)")
    p.add_argument("--skip", choices=("a", "b"), default=None)
    p.add_argument("--overhead", action="store_true",
                   help="only the same-server on/off overhead: the plugin toggled through "
                        "POST /taper/config in interleaved rounds (--rounds, default 100 here), "
                        "then TAPER's self-timed share per step at --share-seqs")
    p.add_argument("--share-seqs", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 16, 64], help="--overhead: batch sizes for the hook share")
    p.add_argument("--out", default="results/scheduler_bench.json")
    p.add_argument("--logs", default=os.environ.get("TAPER_BENCH_LOGS", "/tmp/taper-bench"))
    ns = p.parse_args()
    Path(ns.logs).mkdir(parents=True, exist_ok=True)
    result = {"config": vars(ns)}
    if ns.overhead:
        ns.rounds = ns.rounds or 100
        if ns.rounds < 2:
            p.error("--overhead needs --rounds >= 2 for an interval")
        if ns.out == p.get_default("out"):
            ns.out = "results/scheduler_overhead.json"
        result["overhead_toggle"] = overhead(ns)
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {ns.out}")
        return
    ns.rounds = ns.rounds or 3
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
