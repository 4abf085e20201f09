"""Live runs against a real `taper serve`: a fresh server per policy, the same
warm-up on each, one calibration per run, a clean slate before every rate.

Warm-up and calibration are one identical sequence of requests sent to every
server right after it starts, so no policy's server has seen more traffic
than another's: a few requests (one of them a small branch group, so the
branch path is exercised too), then

- `samples` lone requests, one at a time, at the workload's mean context:
  the isolated TTFT and TPOT (median and spread);
- groups of 8 and `REF_BATCH` concurrent ordinary requests at that context
  and at a short one: decode step time against batch and KV (the live-fitted
  cost model the simulator can replay the workload on) and the capacity.

The first server's figures set the run's SLOs and capacity; every server's
figures are kept in the result, so drift of the machine shows.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import zlib
from pathlib import Path

import aiohttp
import numpy as np

from bench.calibration import REF_BATCH, spread
from bench.client import generate
from bench.server_stats import COUNTERS, StatsClient, delta

WARM_TOKENS = 16
CAL_TOKENS = 32  # output tokens of each calibration request
SHORT_CONTEXT = 32
BATCH_CONTEXT = 1024  # at most, for the batches: REF_BATCH of them must fit in KV


def _prompt(tokens: int, tag: str) -> str:
    """About `tokens` tokens of text that no other request shares (uncached)."""
    from bench.workload import _text

    return _text(np.random.default_rng(zlib.crc32(tag.encode())), tokens, tag)


async def _warm_up(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for i in range(2):
            await generate(s, url, _prompt(64, f"warm {i}"), WARM_TOKENS)
        shared = _prompt(64, "warm group")
        await generate(s, url, shared, 1)
        await asyncio.gather(*[generate(s, url, shared + f" branch {b}:", WARM_TOKENS,
                                        {"taper_group": "warm-up", "taper_branch": b,
                                         "taper_width": 4}) for b in range(4)])


async def _batch(url: str, n: int, context: int, tag: str) -> list:
    """n requests decoding together. Their prompts are prefilled into the radix
    cache first, so that no prefill stalls the batch's decode steps."""
    prompts = [_prompt(context, f"{tag} {i}") for i in range(n)]
    async with aiohttp.ClientSession() as s:
        for text in prompts:
            await generate(s, url, text, 1)
        return await asyncio.gather(*[generate(s, url, t, CAL_TOKENS) for t in prompts])


async def _calibrate(url: str, context: int, samples: int) -> dict:
    lone = []
    async with aiohttp.ClientSession() as s:
        for i in range(samples):
            lone.append(await generate(s, url, _prompt(context, f"lone {i}"), CAL_TOKENS))
        short = [await generate(s, url, _prompt(SHORT_CONTEXT, f"short {i}"), CAL_TOKENS)
                 for i in range(3)]
    points = []  # (sequences, KV tokens per sequence, TPOT seconds)
    for c in lone:
        points.append((1, context, c.tpot))
    for n in (8, REF_BATCH):
        for ctx in (SHORT_CONTEXT, min(context, BATCH_CONTEXT)):
            done = await _batch(url, n, ctx, f"batch {n} {ctx}")
            points += [(n, ctx, c.tpot) for c in done if c.tpot is not None]
    errors = [c.error for c in lone + short if c.error]
    if errors:
        raise RuntimeError(f"calibration requests failed: {errors[0]}")
    ttft = [c.ttft for c in lone]
    tpot = [c.tpot for c in lone]
    cal = {"context": context, "samples": samples,
           "ttft_s": float(np.median(ttft)), "tpot_s": float(np.median(tpot)),
           "ttft_spread": spread(ttft), "tpot_spread": spread(tpot),
           "short_ttft_s": float(np.median([c.ttft for c in short])), "points": points}
    cal["fit"] = fit_cost(cal)
    f = cal["fit"]
    # Capacity from the fit, at the workload's context (which may not fit REF_BATCH
    # times in the KV pool of the CPU engine).
    cal["tokens_per_s"] = REF_BATCH / (f["a"] + f["b"] * REF_BATCH
                                       + f["c"] * REF_BATCH * context)
    cal["batch"] = REF_BATCH
    return cal


def fit_cost(cal: dict) -> dict:
    """A linear step-time model fitted to the calibration's client-side TPOTs:
    T(n, kv) = a + b n + c kv (the time between tokens as a sequence sees it,
    the scheduler's gap included), and prefill from the two contexts' TTFTs.
    Saved as a `linear:` cost model for `taper sim`."""
    pts = np.asarray(cal["points"], dtype=float)
    n, ctx, t = pts[:, 0], pts[:, 1], pts[:, 2]
    x = np.column_stack([np.ones(len(n)), n, n * ctx])
    (a, b, c), *_ = np.linalg.lstsq(x, t, rcond=None)
    dctx = cal["context"] - SHORT_CONTEXT
    f = max(0.0, (cal["ttft_s"] - cal["short_ttft_s"]) / dctx) if dctx > 0 else 0.0
    e = max(0.0, cal["short_ttft_s"] - f * SHORT_CONTEXT - a)
    resid = t - x @ np.array([a, b, c])
    return {"kind": "linear", "a": float(max(a, 0.0)), "b": float(max(b, 0.0)),
            "c": float(max(c, 0.0)), "d": 0.0, "e": float(e), "f": float(f), "g": 0.0,
            "gap": 0.0, "noise": float(np.std(resid / t)),
            "source": "live calibration (client-side TPOT, gap included)"}


class LiveServer:
    """One fresh `taper serve` for one policy, warmed up and calibrated."""

    def __init__(self, policy: str, serve_args: list[str], log_dir: Path, context: int,
                 samples: int = 10) -> None:
        self.policy = policy
        self.serve_args = serve_args
        self.log_path = log_dir / f"server-{policy.replace(':', '').replace('+', '-')}.log"
        self.context = context
        self.samples = samples
        self.proc = None
        self.calibration: dict | None = None
        self.start_s = 0.0

    def __enter__(self) -> LiveServer:
        from bench.options import live_variant
        from sglang_taper.server import ServerProcess

        policy, extra = live_variant(self.policy)
        t0 = time.monotonic()
        self.proc = ServerProcess(["--taper-policy", policy, "--log-level", "warning",
                                   *extra, *self.serve_args], log_path=self.log_path).start()
        self.start_s = time.monotonic() - t0
        asyncio.run(_warm_up(self.url))
        self.calibration = asyncio.run(_calibrate(self.url, self.context, self.samples))
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.stop()

    def decode_at(self, points: tuple[tuple[int, int], ...]) -> None:
        """Batches of (sequences, context tokens each) decoding together, for a
        step trace to see steps of those shapes (`_batch`: prompts prefilled
        first); the figures are not kept here."""
        for n, context in points:
            done = asyncio.run(_batch(self.url, n, context, f"shape {n} {context}"))
            errors = [c.error for c in done if c.error]
            if errors:
                raise RuntimeError(f"decode_at({n}, {context}) failed: {errors[0]}")

    def calibrate_again(self) -> dict:
        """The calibration once more, from a clean slate (its prompts uncached
        again): how the server's speed moved since the first."""
        StatsClient(self.url).clean_slate()
        return asyncio.run(_calibrate(self.url, self.context, self.samples))

    @property
    def url(self) -> str:
        return self.proc.url

    def run(self, programs, spec, drain: float, progress=None) -> dict:
        """Replay `programs` from a clean slate; the run's records, summary and
        the server's figures over exactly this run."""
        return run_programs(self.url, [self.url], programs, spec, drain, progress)


class ExternalServer:
    """A running server, or a router in front of several (`taper bench --base-url`):
    warmed up and calibrated like a fresh server, never started or stopped here.
    Its policy is whatever it runs. Through a router the calibration's requests
    are spread as the router spreads requests without a routing key; the server
    figures are the sum over the workers the router lists (GET /workers)."""

    def __init__(self, url: str, context: int, samples: int = 10,
                 label: str = "external") -> None:
        self.url = url.rstrip("/")
        self.policy = label
        self.context = context
        self.samples = samples
        self.calibration: dict | None = None
        self.start_s = 0.0
        self.stats_urls: list[str] = []

    def __enter__(self) -> ExternalServer:
        self.stats_urls = stats_urls(self.url)
        asyncio.run(_warm_up(self.url))
        self.calibration = asyncio.run(_calibrate(self.url, self.context, self.samples))
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run(self, programs, spec, drain: float, progress=None) -> dict:
        return run_programs(self.url, self.stats_urls, programs, spec, drain, progress)


def stats_urls(url: str) -> list[str]:
    """Where a run's server figures come from: the server itself, or the workers
    of a router (sglang-router lists them at /workers); [] if none answers."""
    if StatsClient(url).try_get():
        return [url]
    try:
        with urllib.request.urlopen(url + "/workers", timeout=10) as r:
            workers = [w["url"] for w in json.loads(r.read()).get("workers", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [w for w in workers if StatsClient(w).try_get()]


def run_programs(url: str, figure_urls: list[str], programs, spec, drain: float,
                 progress=None) -> dict:
    """Replay `programs` against `url` from a clean slate on every server of
    `figure_urls`; the records, the summary and the servers' figures of this run."""
    from bench.metrics import request_tpot, summarize
    from bench.replay import replay

    clients = [StatsClient(u) for u in figure_urls]
    before = [c.clean_slate() for c in clients]
    records, samples = asyncio.run(replay(url, programs, progress=progress,
                                          drain_timeout=drain, stats_urls=figure_urls))
    for c in clients:
        c.wait_idle()
    server = merge_figures([delta(b, c.get()) for b, c in zip(before, clients)])
    return {"records": records, "summary": summarize(records, spec), "server": server,
            "tpots_ms": [round(1e3 * t, 4) for p in records for r in p.requests
                         if r.role == "serial" and (t := request_tpot(r.token_times))
                         is not None],
            "width_series": _width_series(samples)}


def merge_figures(figures: list[dict]) -> dict:
    """One run's figures over several servers: counters and width histograms
    summed, each server's own figures under "workers"; one server's as they are."""
    if len(figures) == 1:
        return figures[0]
    if not figures:
        return {}
    out: dict = {k: sum(f.get(k, 0) for f in figures) for k in COUNTERS}
    hist: dict[str, int] = {}
    for f in figures:
        for w, n in f.get("group_width_histogram", {}).items():
            hist[w] = hist.get(w, 0) + n
    out["group_width_histogram"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    out["max_group_width"] = max(f.get("max_group_width", 0) for f in figures)
    out["mean_width"] = (out["branch_steps"] / out["regulated_steps"]
                         if out["regulated_steps"] else None)
    out["workers"] = figures
    return out


def _width_series(samples: list[dict]) -> list[tuple[float, float]]:
    out = []
    for a, b in zip(samples, samples[1:]):
        steps = b["regulated_steps"] - a["regulated_steps"]
        if steps > 0:
            out.append((round(b["t"], 3), (b["branch_steps"] - a["branch_steps"]) / steps))
    return out
