"""`taper profile`: fit the live engine's step-time model for the simulator.

From controlled batches against a TAPER server (policy eager); saved as JSON
for `taper sim --cost-model linear:PATH`.

Decode: groups of n branches (n over a grid) with prompts of a few lengths
decode together; the server's per-step records (/taper/stats?history=1) give
measured step time against sequences and KV tokens. Prefill: single requests
of several prompt lengths, TTFT. Between-step gap: the controller's estimate.

Cascade (the `cascade` section, read by `taper serve --taper-cascade-profile`):
an offline micro-benchmark, in this process, of the CPU cascade backend's own
code for one branch group, plain attention (SGLang's torch-native decode, one
sequence at a time) against the two-level path, over a grid of group widths,
prefix and suffix lengths with the served model's head shapes; per width, the
shortest prefix from which the two-level path is faster (a `CascadeGate`).
`--cascade-only` measures just that part and adds it to the --out file (its
other keys kept) without starting a server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import time
from pathlib import Path

import aiohttp
import numpy as np

from bench.client import generate
from bench.server_stats import StatsClient
from bench.sim.cost import LinearCost


async def _batch(url: str, n: int, ctx_words: int, tokens: int) -> None:
    async with aiohttp.ClientSession() as s:
        prompt = "profile " * ctx_words
        await generate(s, url, prompt, 1)  # cache the prefix
        await asyncio.gather(*[generate(s, url, prompt + f" b{i}", tokens,
                                        {"taper_group": f"prof-{n}-{ctx_words}",
                                         "taper_branch": i, "taper_width": n})
                               for i in range(n)])


async def _ttft(url: str, words: int, i: int) -> tuple[float, int]:
    async with aiohttp.ClientSession() as s:
        c = await generate(s, url, f"uncached {words} {i} " + "word " * words, 1)
        return c.ttft, c.prompt_tokens


async def _tpot(url: str) -> float:
    async with aiohttp.ClientSession() as s:
        c = await generate(s, url, "a lone request", 64)
        return c.tpot


def profile(url: str, batches=(1, 2, 4, 8, 16, 32, 48, 64, 96), contexts=(16, 256, 1024),
            tokens: int = 40) -> LinearCost:
    rows = []
    for ctx in contexts:
        for n in batches:
            asyncio.run(_batch(url, n, ctx, tokens))
            for h in StatsClient(url).get(history=True)["history"][-tokens:]:
                if h["held"] == 0 and h["kept"] == n:
                    rows.append((h["kept"], h["kv"], h["measured"]))
    a = np.array(rows, dtype=float)
    x = np.column_stack([np.ones(len(a)), a[:, 0], a[:, 1]])
    (ca, cb, cc), *_ = np.linalg.lstsq(x, a[:, 2], rcond=None)
    resid = a[:, 2] - x @ np.array([ca, cb, cc])
    noise = float(np.std(resid / np.maximum(a[:, 2], 1e-6)))
    samples = [min(asyncio.run(_ttft(url, w, i)) for i in range(3))
               for w in (32, 256, 1024, 2048)]
    t = np.array([s[0] for s in samples])
    n_tok = np.array([s[1] for s in samples], dtype=float)
    (ce, cf), *_ = np.linalg.lstsq(np.column_stack([np.ones(len(t)), n_tok]), t, rcond=None)
    # The time between steps as one sequence sees it: a lone request's TPOT at
    # the client less the fitted step (the scheduler's p90 gap counts prefills
    # interleaved between decode steps, which the simulator schedules itself).
    tpot = sorted(asyncio.run(_tpot(url)) for _ in range(3))[1]
    gap = max(0.0, tpot - (ca + cb + cc * 64))
    return LinearCost(a=float(ca), b=float(cb), c=max(0.0, float(cc)), e=max(0.0, float(ce)),
                      f=max(0.0, float(cf)), gap=gap, noise=noise, name="linear:cpu-profile")


# ---------------------------------------------------------------- cascade gate

WIDTHS = (2, 4, 8, 16, 32, 64)
PREFIXES = (64, 128, 256, 512, 1024, 2048, 4096)
SUFFIXES = (16, 64)


def _tiny_shape() -> dict:
    """Head shapes of the model `taper serve` builds for the CPU engine."""
    from sglang_taper.cpu.tiny_model import DTYPE, LLAMA_CONFIG

    heads = LLAMA_CONFIG["num_attention_heads"]
    return {"heads": heads, "kv_heads": LLAMA_CONFIG["num_key_value_heads"],
            "head_dim": LLAMA_CONFIG["hidden_size"] // heads,
            "layers": LLAMA_CONFIG["num_hidden_layers"], "dtype": DTYPE}


def _best_of(fns, reps: int, min_s: float = 1e-3) -> list[float]:
    """Seconds per call of each of `fns`: the fastest of `reps` timed batches,
    the functions taking turns (contention on a shared host only ever adds time,
    so the minimum is the cleanest estimate, and turns expose both to it alike)."""
    inner = []
    for fn in fns:
        fn()
        t0 = time.perf_counter()
        fn()
        inner.append(max(1, int(min_s / max(time.perf_counter() - t0, 1e-6))))
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(inner[i]):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t0) / inner[i])
    return best


def time_group(width: int, prefix: int, suffix: int, shape: dict, reps: int = 9,
               seed: int = 0) -> tuple[float, float]:
    """Seconds of one decode step's attention (all layers) for one group of
    `width` members sharing `prefix` KV slots, with about `suffix` own slots
    each: (plain, two-level), timed with the backend's own functions."""
    import torch

    from sglang_taper.adapter.cascade_backend import plain_decode
    from sglang_taper.cascade import Group, decode_group, plan_group

    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, shape["dtype"])
    h, kvh, d, layers = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["layers"]
    own = [suffix + i % 3 for i in range(width)]  # branches a token or two apart
    slots = prefix + sum(own)
    k_cache = torch.randn(slots + 1, kvh, d, generator=g).to(dtype)
    v_cache = torch.randn(slots + 1, kvh, d, generator=g).to(dtype)
    q = torch.randn(width, h, d, generator=g).to(dtype)
    starts = [prefix + sum(own[:i]) for i in range(width)]
    rows = [torch.cat([torch.arange(prefix), torch.arange(s, s + n)])
            for s, n in zip(starts, own)]
    req_to_token = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(torch.int32)
    pool, lens = torch.arange(width), torch.tensor([len(r) for r in rows])
    scale = d ** -0.5

    def plain():
        for _ in range(layers):
            plain_decode(q, k_cache, v_cache, req_to_token, pool, lens, scale)

    def cascade():
        plan = plan_group(rows, Group(tuple(range(width)), prefix))  # once per step
        o = torch.empty_like(q)
        for _ in range(layers):
            o[plan.rows] = decode_group(q[plan.rows], k_cache, v_cache, plan, scale)

    tp, tc = _best_of((plain, cascade), reps)
    return tp, tc


def min_prefixes(grid: list[dict], widths, prefixes) -> list[float]:
    """Per width, the shortest shared prefix [tokens] from which the two-level
    path was measured faster: where plain/two-level crosses 1 for the last time
    over the prefixes (log-log interpolation between the two grid points around
    it, rounded up to whole tokens), the highest over the suffix lengths; the
    first prefix measured if it paid everywhere, inf if it never paid. Then made
    non-increasing in width, upward (a wider group reads its prefix more times:
    it pays no later)."""
    out = []
    for w in widths:
        worst = 0.0
        rows = [r for r in grid if r["width"] == w]
        for s in sorted({r["suffix_tokens"] for r in rows}):
            by_p = {r["prefix"]: r["plain_s"] / r["cascade_s"] for r in rows
                    if r["suffix_tokens"] == s}
            ps = [p for p in prefixes if p in by_p]
            losing = [k for k, p in enumerate(ps) if by_p[p] < 1.0]
            if not losing:
                thr = float(ps[0])
            elif losing[-1] == len(ps) - 1:
                thr = float("inf")
            else:
                k = losing[-1]
                (p0, r0), (p1, r1) = ((ps[k], by_p[ps[k]]), (ps[k + 1], by_p[ps[k + 1]]))
                f = -np.log(r0) / (np.log(r1) - np.log(r0))
                thr = float(np.ceil(np.exp(np.log(p0) + f * (np.log(p1) - np.log(p0))) - 1e-6))
            worst = max(worst, thr)
        out.append(worst)
    return [max(out[i:]) for i in range(len(out))]


def cascade_section(widths=WIDTHS, prefixes=PREFIXES, suffixes=SUFFIXES,
                    shape: dict | None = None, reps: int = 9, threads: int = 1,
                    log=print) -> dict:
    """Time the grid and return the profile's `cascade` section: the gate (the
    shortest prefix that pays, per width), how it fares on the grid itself,
    and every timing (data first).

    `threads`: torch's intra-op threads while timing; 0: all cores, as the
    server runs. One by default: on a small host shared with other jobs, a
    2-thread operation waits a whole time slice for a descheduled thread, and
    the timings scatter several-fold (measured on the 2-core host); one thread
    gives stable figures, and understates the two-level path's larger
    operations' gain from a second thread, which errs toward plain attention."""
    import torch

    from controller.cascade_gate import CascadeGate

    shape = shape or _tiny_shape()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    t0 = time.monotonic()
    grid = []
    try:
        for b in widths:
            for p in prefixes:
                for s in suffixes:
                    tp, tc = time_group(b, p, s, shape, reps)
                    suffix_tokens = sum(s + i % 3 for i in range(b))
                    grid.append({"width": b, "prefix": p, "suffix_tokens": suffix_tokens,
                                 "plain_s": tp, "cascade_s": tc})
            log(f"[profile] cascade B={b:3d}: plain/two-level at P=" + " ".join(
                f"{r['prefix']}:{r['plain_s'] / r['cascade_s']:.2f}"
                for r in grid[-len(prefixes) * len(suffixes)::len(suffixes)]))
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    gate = CascadeGate(tuple(widths), tuple(min_prefixes(grid, widths, prefixes)))
    tp = np.array([r["plain_s"] for r in grid])
    tc = np.array([r["cascade_s"] for r in grid])
    two = np.array([gate.pays(r["width"], r["prefix"]) for r in grid])
    return {
        **gate.to_dict(),
        "rule": "two-level iff prefix >= min_prefix of the widest width <= the group's "
                "(null: never); from where plain/two-level attention time crosses 1",
        "backend": "taper_cascade",
        "shape": shape,
        "threads": threads,
        "host": f"{platform.node()} {platform.machine()} {platform.processor()}".strip(),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "measure_s": round(time.monotonic() - t0, 1),
        "check": {
            # grid points where the gate picks the path measured faster
            "agreement": float(np.mean(two == (tc < tp))),
            # measured time of the gate's pick over the faster one's, worst point
            "worst_regret": float(np.max(np.where(two, tc, tp) / np.minimum(tp, tc))),
        },
        "grid": grid,
    }


def write_cascade(path: str | Path, section: dict) -> None:
    """Put `section` into the profile at `path` (its other keys kept), or start one."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {"kind": "cascade"}
    data["cascade"] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="taper profile", description=__doc__)
    p.add_argument("--base-url", default=None, help="a running server (default: start one)")
    p.add_argument("--out", default="results/cpu_profile.json")
    p.add_argument("--cascade-only", action="store_true",
                   help="measure only the cascade gate (no server) and add it to --out")
    p.add_argument("--no-cascade", action="store_true", help="skip the cascade gate")
    p.add_argument("--cascade-threads", type=int, default=1,
                   help="torch threads while timing the cascade gate (0: all cores)")
    ns = p.parse_args(argv)
    if not ns.cascade_only:
        _profile_live(ns.base_url, ns.out)
    if not ns.no_cascade:
        section = cascade_section(threads=ns.cascade_threads)
        write_cascade(ns.out, section)
        pairs = ", ".join(f"{w}: {p}" for w, p in zip(section["widths"], section["min_prefix"]))
        print(f"[profile] cascade gate, shortest prefix that pays per width: {pairs} "
              f"({json.dumps(section['check'])})\n[profile] wrote {ns.out}")
    return 0


def _profile_live(base_url: str | None, out: str) -> None:
    from sglang_taper.server import ServerProcess

    server = None
    url = base_url
    if url is None:
        server = ServerProcess(["--taper-policy", "eager", "--log-level", "warning"]).start()
        url = server.url
    try:
        t0 = time.monotonic()
        model = profile(url.rstrip("/"))
        model.save(out, fitted_s=time.monotonic() - t0)
        print(f"[profile] {model.describe()}\n[profile] wrote {out}")
    finally:
        if server is not None:
            server.stop()
