"""Time `Controller.decide` for 256 running sequences in 64 branch groups.

Target (issue 3): median 50 us or less on a 2-core machine. Prints one line per
policy: median, p90, and the decision's width. Run:

    .venv/bin/python -m bench.decide_speed [--seqs 256 --groups 64 --repeat 5000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from controller import Controller, Seq, StepResult, StepView, TaperConfig


def make_view(n_seqs: int, n_groups: int, seed: int = 0) -> StepView:
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
    return StepView.from_seqs(seqs, now=5.03)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5000)
    ns = p.parse_args()
    view = make_view(ns.seqs, ns.groups)
    for policy in ("off", "eager", "cap:2", "taper"):
        ctl = Controller(TaperConfig(policy=policy))
        d = ctl.decide(view)
        ctl.observe(StepResult(d, step_time=0.02, end=5.0))
        times = np.empty(ns.repeat)
        for i in range(ns.repeat):
            t0 = time.perf_counter()
            ctl.decide(view)
            times[i] = time.perf_counter() - t0
        us = times * 1e6
        print(f"{policy:6s} seqs={len(view)} groups={ns.groups} kept={len(d.keep):4d} "
              f"median={np.median(us):6.1f} us  p90={np.percentile(us, 90):6.1f} us")


if __name__ == "__main__":
    main()
