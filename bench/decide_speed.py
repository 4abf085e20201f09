"""The decision's cost against a decode step: `python -m bench.decide_speed`.

Times `Controller.decide` for 256 running sequences in 64 branch groups under
off, eager, cap:2 and taper, and prints each policy's median next to an
isolated decode step measured in the same run, as a percentage of it (target,
issue 14: at most 1% for every policy). Two cases per policy: the batch's
make-up unchanged since the last decision (the usual step: a batch's
membership changes only when a request joins or leaves it) and changed at
every decision (each one builds the make-up's structure afresh).

The isolated decode step is what one more output token adds to a lone greedy
request on the CPU server: (latency of 65 tokens - latency of 1 token) / 64,
median of 7 such pairs (from whole-request latencies: a stream's chunks may
carry several tokens). Other processes on a shared machine slow some pairs a
lot, so each share is also given against the fastest pair (the conservative
figure). On a server started here (`taper serve --taper-policy
off`, stopped before the timing, as an idle SGLang scheduler keeps a core
busy), or a running one (`--base-url URL`), or given by hand
(`--decode-step-ms X`: no server). Run:

    .venv/bin/python -m bench.decide_speed [--decode-step-ms X | --base-url URL]
        [--seqs 256 --groups 64 --repeat 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from controller import Controller, Seq, StepResult, StepView, TaperConfig

POLICIES = ("off", "eager", "cap:2", "taper")
TARGET = 0.01  # of the isolated decode step


def make_seqs(n_seqs: int, n_groups: int, seed: int = 0) -> list[Seq]:
    rng = np.random.default_rng(seed)
    width = n_seqs // n_groups
    seqs = []
    for g in range(n_groups):
        shared = int(rng.integers(200, 2000))
        for b in range(width):
            seqs.append(Seq(f"r{g}-{b}", group=g, branch=b, width=width,
                            kv_len=shared + int(rng.integers(1, 500)), shared_len=shared,
                            arrival=0.0, first_token=0.1, generated=int(rng.integers(1, 400))))
    # One branch in eight is a serial stage (latency-critical): it sets the budget.
    # Their next deadline is 0.1 + 110 * 0.045 = 5.05 s: 20 ms of slack at now = 5.03 s,
    # enough for taper to admit some of the extras but not all.
    for s in seqs[::8]:
        s.critical, s.tpot_slo, s.generated = True, 0.05, 110
    return seqs


def make_view(n_seqs: int, n_groups: int, seed: int = 0) -> StepView:
    return StepView.from_seqs(make_seqs(n_seqs, n_groups, seed), now=5.03)


def time_decide(policies: list[str], views: list[StepView], repeat: int
                ) -> dict[str, tuple[np.ndarray, int]]:
    """Per policy, microseconds of each of `repeat` decisions, cycling through
    `views` (after one observed step), and the first decision's width. The
    policies take turns, decision by decision, so that they all run under the
    same conditions (other processes on the machine come and go)."""
    ctls, widths = [], []
    for policy in policies:
        ctl = Controller(TaperConfig(policy=policy))
        d = ctl.decide(views[0])
        ctl.observe(StepResult(d, step_time=0.02, end=5.0))
        ctls.append(ctl)
        widths.append(len(d.keep))
    clock = time.perf_counter
    times = np.empty((len(ctls), repeat))
    k = len(views)
    for i in range(repeat):
        v = views[i % k]
        for j, ctl in enumerate(ctls):
            t0 = clock()
            ctl.decide(v)
            times[j, i] = clock() - t0
    return {p: (times[j] * 1e6, widths[j]) for j, p in enumerate(policies)}


async def _lone_steps(url: str, n: int, tokens: int) -> list[float]:
    """Seconds one more output token adds to a lone request, `n` times."""
    import aiohttp

    from bench.client import generate

    async def latency(i: int, max_tokens: int) -> float:
        c = await generate(session, url, f"Request {i}: count from {i}: 1, 2, 3,", max_tokens)
        if c.error or c.output_tokens != max_tokens:
            raise RuntimeError(f"the lone request failed: {c.error or c.output_tokens}")
        return c.end - c.start

    out = []
    async with aiohttp.ClientSession() as session:
        for i in range(n + 1):  # the first pair warms the server up
            one = await latency(2 * i, 1)
            many = await latency(2 * i + 1, tokens + 1)
            if i:
                out.append((many - one) / tokens)
    return out


def decode_step_ms(base_url: str | None, n: int = 7, tokens: int = 64
                   ) -> tuple[float, float, str]:
    """The isolated decode step (ms): the median of `n` and the fastest; and where
    it was measured."""
    if base_url:
        steps, where = asyncio.run(_lone_steps(base_url, n, tokens)), base_url
    else:
        from sglang_taper.server import ServerProcess

        with ServerProcess(["--taper-policy", "off", "--log-level", "warning"]) as server:
            steps = asyncio.run(_lone_steps(server.url, n, tokens))
        where = "a CPU server started here, taper-policy off"
    return (1e3 * statistics.median(steps), 1e3 * min(steps),
            f"{where}; {n} lone requests, {1e3 * max(steps):.2f} ms the slowest")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5000)
    p.add_argument("--policies", default=",".join(POLICIES))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--decode-step-ms", type=float, default=None,
                     help="the isolated decode step, by hand (no server)")
    src.add_argument("--base-url", default=None, help="a running server to measure it on")
    ns = p.parse_args(argv)
    if ns.decode_step_ms is not None:
        step_ms, fastest, where = ns.decode_step_ms, ns.decode_step_ms, "given"
    else:
        step_ms, fastest, where = decode_step_ms(ns.base_url)
    print(f"isolated decode step {step_ms:.2f} ms, the fastest {fastest:.2f} ms ({where}; "
          f"1% = {10 * step_ms:.1f} us)")
    view = make_view(ns.seqs, ns.groups)
    # The same batch less its last sequence: alternating, every decision sees a
    # changed make-up.
    other = StepView.from_seqs(make_seqs(ns.seqs, ns.groups)[:-1], now=5.03)
    print(f"Controller.decide, {len(view)} sequences in {ns.groups} groups, "
          f"{ns.repeat} decisions each; median (p90)")
    worst = 0.0
    policies = ns.policies.split(",")
    same_all = time_decide(policies, [view], ns.repeat)
    changed_all = time_decide(policies, [view, other], ns.repeat)
    for policy in policies:
        (same, kept), (changed, _) = same_all[policy], changed_all[policy]
        med, med_changed = float(np.median(same)), float(np.median(changed))
        share = med / (10 * step_ms)  # in % of the step
        worst = max(worst, med / (10 * fastest))
        print(f"{policy:6s} median {med:6.1f} us = {share:.2f}% of the isolated decode step "
              f"({step_ms:.2f} ms; {med / (10 * fastest):.2f}% of the fastest)  p90 "
              f"{np.percentile(same, 90):6.1f} us  kept {kept:3d}; make-up changed each step: "
              f"median {med_changed:6.1f} us = {med_changed / (10 * step_ms):.2f}%")
    print(f"worst policy: {worst:.2f}% of the fastest decode step "
          f"({'within' if worst <= 100 * TARGET else 'over'} the {100 * TARGET:.0f}% target)")

if __name__ == "__main__":
    main()
