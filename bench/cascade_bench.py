"""Decode step time of one branch group, cascade attention on vs off, on the
CPU engine: groups of 2 to 64 branches sharing prefixes of 128 to 4K tokens.

Two servers (policy eager), alive side by side and asleep when idle
(`--sleep-on-idle`: an idle SGLang scheduler otherwise busy-polls a core):
plain (torch-native attention) and `--taper-cascade` (the two-level path for
the groups its gate passes); `--always` adds a third that takes the two-level
path for every group. Each case runs on every server back to back, on a fresh
group (its own prefix), `--repeats` times, the servers' order rotating. A
run's figure is the 10th percentile of the decode steps that ran the whole
group (other jobs on a shared host only ever add time). Back-to-back pairs
share the host's load of the moment, which moves the speed of a whole minute
by up to 1.5x on the 2-core host (A/A-tested): so a case's speedup is the
median over repeats of the paired ratio plain / cascade, and "no case slower"
allows two standard errors of such a median (from the ratios' spread; the
cases whose groups the gate sends down the plain path are A/A pairs, the noise
made visible). `--threads 1` (the default) runs the servers
single-threaded, as `taper profile` times the gate: on a 2-core host shared
with other jobs two threads stall for whole time slices.

    .venv/bin/python -m bench.cascade_bench [--out bench/results/cascade]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import aiohttp

from bench.client import generate
from controller.cascade_gate import CPU_GATE, CascadeGate
from sglang_taper.server import ServerProcess

CASES = ((2, 1024), (4, 128), (4, 1024), (4, 4096), (16, 256), (16, 1024), (16, 4096),
         (64, 1024), (64, 4096))


def _history(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/taper/stats?history=1", timeout=30) as r:
        return json.loads(r.read())["history"]


async def _group(url: str, branches: int, prefix_words: int, tokens: int, tag: str) -> None:
    prompt = f"{tag} " + "the " * prefix_words  # one token per "the " with the tiny tokenizer
    async with aiohttp.ClientSession() as s:
        await generate(s, url, prompt, 1)  # the prefix lands in the radix cache
        await asyncio.gather(*[generate(s, url, prompt + f" branch {i}:", tokens,
                                        {"taper_group": tag, "taper_branch": i,
                                         "taper_width": branches})
                               for i in range(branches)])


def _start(mode: str, args: list[str], env: dict | None) -> ServerProcess:
    for attempt in range(3):  # a free port can be taken by another job before the bind
        srv = ServerProcess(["--taper-policy", "eager", "--log-level", "warning",
                             "--sleep-on-idle", *args],
                            env=env, log_path=Path(f"/tmp/cascade-bench-{mode}.log"))
        try:
            return srv.start()
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run(srv: ServerProcess, b: int, prefix: int, tokens: int, tag: str) -> dict | None:
    """The p10 and median of the decode steps that ran the whole group [s]."""
    asyncio.run(_group(srv.url, b, prefix, tokens, tag))
    steps = sorted(h["measured"] for h in _history(srv.url)[-tokens:] if h["kept"] == b)
    if not steps:
        return None
    return {"p10": steps[len(steps) // 10], "median": statistics.median(steps)}


def _rel_mad(xs: list[float]) -> float:
    """Median absolute deviation of `xs` over their median."""
    m = statistics.median(xs)
    return statistics.median(abs(x - m) for x in xs) / m


def summarize(runs: dict[tuple, list[dict]], gate: CascadeGate) -> tuple[list[dict], float]:
    """One row per case from {(branches, prefix): per-repeat {mode: figures}}, and
    the tolerance of "no case slower": two standard errors of a median of n
    paired ratios, 2 * 1.2533 * 1.4826 * MAD / sqrt(n) (the normal-theory
    factors for a median and for a MAD), the ratios' relative MAD pooled over
    cases (their median)."""
    rows, spreads, n = [], [], 1
    for (b, prefix), reps in runs.items():
        reps = [r for r in reps if all(v is not None for v in r.values())]
        if not reps:
            continue
        modes = list(reps[0])
        ratios = {m: [r["plain"]["p10"] / r[m]["p10"] for r in reps] for m in modes[1:]}
        row = {"branches": b, "prefix_tokens": prefix,
               "gate": "two-level" if gate.pays(b, prefix) else "plain",
               **{m: statistics.median(r[m]["p10"] for r in reps) for m in modes},
               "speedup": statistics.median(ratios["cascade"]),
               "speedup_of_medians": statistics.median(
                   r["plain"]["median"] / r["cascade"]["median"] for r in reps),
               "repeats": reps}
        if "always" in ratios:
            row["speedup_always"] = statistics.median(ratios["always"])
        spreads.append(_rel_mad(ratios["cascade"]))
        n = max(n, len(reps))
        rows.append(row)
    mad = statistics.median(spreads) if spreads else 0.0
    return rows, 2 * 1.2533 * 1.4826 * mad / n ** 0.5


def _table(rows: list[dict], tol: float) -> str:
    always = bool(rows) and "speedup_always" in rows[0]
    head = ("| branches | prefix | gate | plain ms | cascade ms | speedup | of medians |"
            + (" every group two-level |" if always else "") + " verdict |\n"
            "|---:|---:|---|---:|---:|---:|---:|" + ("---:|" if always else "") + "---|")
    lines = [head]
    for r in rows:
        verdict = "ok" if r["speedup"] >= 1 - tol else "SLOWER"
        lines.append(f"| {r['branches']} | {r['prefix_tokens']} | {r['gate']} | "
                     f"{1e3 * r['plain']:.2f} | {1e3 * r['cascade']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['speedup_of_medians']:.2f}x | "
                     + (f"{r['speedup_always']:.2f}x | " if always else "") + f"{verdict} |")
    return "\n".join(lines)


def _write(out: Path, runs: dict, gate: CascadeGate, ns, started: str, load_start,
           done: int) -> str:
    """result.json, result.md and command.txt for the repeats done so far."""
    rows, tol = summarize(runs, gate)
    table = _table(rows, tol)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                           text=True).stdout.strip()
    host = f"{platform.node()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    result = {"started": started, "commit": commit, "dirty": bool(dirty), "host": host,
              "tokens": ns.tokens, "repeats": ns.repeats, "repeats_done": done,
              "threads": ns.threads, "load_avg_start_end": [load_start, os.getloadavg()],
              "gate": gate.to_dict(), "tolerance": tol,
              "slower": [f"{r['branches']}x{r['prefix_tokens']}" for r in rows
                         if r["speedup"] < 1 - tol],
              "cases": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "result.md").write_text(
        f"{table}\n\ntolerance {tol:.0%}; {done} of {ns.repeats} repeats\n")
    (out / "command.txt").write_text(
        f"# commit {commit}{' + uncommitted changes' if dirty else ''}, {started}, {host} "
        f"(shared with other jobs; 1-min load {load_start[0]:.1f} at the start)\n"
        f".venv/bin/python -m bench.cascade_bench --tokens {ns.tokens} --repeats "
        f"{ns.repeats} --threads {ns.threads}{' --always' if ns.always else ''}"
        f"{' --cascade-profile ' + ns.cascade_profile if ns.cascade_profile else ''}"
        f" --out {ns.out}\n")
    return (f"{table}\ntolerance (two standard errors of a median paired ratio): {tol:.0%}; "
            f"slower beyond it: {result['slower'] or 'none'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64,
                   help="per branch; the steps that ran the whole group are counted")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the servers (0: their default, all cores)")
    p.add_argument("--cascade-profile", default=None,
                   help="passed on as --taper-cascade-profile (default: the built-in gate)")
    p.add_argument("--always", action="store_true",
                   help="also a server that takes the two-level path for every group")
    p.add_argument("--out", default="bench/results/cascade")
    ns = p.parse_args()
    gate = CascadeGate.load(ns.cascade_profile) if ns.cascade_profile else CPU_GATE
    args = {"plain": [],
            "cascade": ["--taper-cascade"] + (["--taper-cascade-profile", ns.cascade_profile]
                                              if ns.cascade_profile else [])}
    if ns.always:  # what the gate saves: every group two-level
        always = Path(tempfile.mkdtemp()) / "always.json"
        always.write_text(json.dumps({"cascade": {"widths": [2], "min_prefix": [0]}}))
        args["always"] = ["--taper-cascade", "--taper-cascade-profile", str(always)]
    env = {**os.environ, "OMP_NUM_THREADS": str(ns.threads)} if ns.threads else None
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    runs: dict[tuple, list[dict]] = {c: [] for c in CASES}
    servers: dict[str, ServerProcess] = {}
    # On SIGTERM unwind as on Ctrl-C, so that the servers stop; the repeats done stay written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for mode, a in args.items():
            servers[mode] = _start(mode, a, env)
            _run(servers[mode], 4, 64, 8, f"{mode}-warmup")
        modes = list(args)
        for rep in range(ns.repeats):
            for k, (b, prefix) in enumerate(CASES):
                order = modes[(rep + k) % len(modes):] + modes[:(rep + k) % len(modes)]
                figures = {m: _run(servers[m], b, prefix, ns.tokens, f"{m}-{rep}-{b}-{prefix}")
                           for m in order}
                runs[(b, prefix)].append({m: figures[m] for m in modes})
                print(f"#{rep} B={b:3d} prefix={prefix:5d}: decode step p10 " + ", ".join(
                    f"{m} {1e3 * f['p10']:.2f} ms" if f else f"{m} -"
                    for m, f in figures.items()), flush=True)
            summary = _write(Path(ns.out), runs, gate, ns, started, load_start, rep + 1)
    finally:
        for srv in servers.values():
            srv.stop()
    print(summary)


if __name__ == "__main__":
    main()
