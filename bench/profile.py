"""`taper profile`: fit the live engine's step-time model for the simulator.

From controlled batches against a TAPER server (policy eager); saved as JSON
for `taper sim --cost-model linear:PATH`.

Decode: groups of n branches (n over a grid) with prompts of a few lengths
decode together; the server's per-step records (/taper/stats?history=1) give
measured step time against sequences and KV tokens. Prefill: single requests
of several prompt lengths, TTFT. Between-step gap: the controller's estimate.
"""

from __future__ import annotations

import argparse
import asyncio
import time

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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="taper profile", description=__doc__)
    p.add_argument("--base-url", default=None, help="a running server (default: start one)")
    p.add_argument("--out", default="results/cpu_profile.json")
    ns = p.parse_args(argv)
    from sglang_taper.server import ServerProcess

    server = None
    url = ns.base_url
    if url is None:
        server = ServerProcess(["--taper-policy", "eager", "--log-level", "warning"]).start()
        url = server.url
    try:
        t0 = time.monotonic()
        model = profile(url.rstrip("/"))
        model.save(ns.out, fitted_s=time.monotonic() - t0)
        print(f"[profile] {model.describe()}\n[profile] wrote {ns.out}")
    finally:
        if server is not None:
            server.stop()
    return 0
