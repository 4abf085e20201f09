"""TAPER's per-step path in the scheduler, timed without a server:
`python -m bench.hook_path`.

Runs `SchedulerRuntime`'s hooks (regulate, on_run, on_result, the merge at the
next pass) as SGLang's scheduler calls them, over stand-in requests and a
stand-in batch whose `filter_batch`/`merge_batch` only select Python lists:
what is timed is TAPER's own code (the view, the decision, the observation,
the step record), not SGLang's batch surgery, which a live run adds on top
(`bench/results/fidelity/hook_split.py` measures both on the real server).

The workload looks like the fidelity default case under load: `--critical`
latency-critical requests decoding beside `--groups` branch groups of
`--width` branches, each request finishing after its tokens and replaced by a
new one (a new group for a group's last branch), on a virtual clock whose
decode step costs 3 ms + 0.1 ms a sequence + 2 us a KV token: with the
critical requests' TPOT SLO at `--slo` times the lone step, taper holds some
branches most steps. Prints microseconds a step by entry point (wall,
perf_counter) and the process CPU time a step, per policy; `--profile` adds
cProfile's top functions.

    .venv/bin/python -m bench.hook_path [--steps 4000] [--policies taper,eager]
        [--decisions PATH]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from types import SimpleNamespace

import numpy as np

from controller import TaperConfig

STEP_S, SEQ_S, KV_S = 3e-3, 1e-4, 2e-6  # the virtual decode step's cost


class _Clock:
    """The scheduler's monotonic clock, advanced by the virtual step times."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = staticmethod(time.perf_counter)


class _Req:
    __slots__ = ("rid", "output_ids", "origin_input_ids", "sampling_params", "cached_tokens",
                 "to_finish", "grammar", "beam_group", "seqlen", "_taper", "budget")

    def __init__(self, rid: str, prompt: int, cached: int, tokens: int, custom: dict | None,
                 ) -> None:
        self.rid = rid
        self.output_ids: list[int] = []
        self.origin_input_ids = [0] * prompt
        self.sampling_params = SimpleNamespace(custom_params=custom, max_new_tokens=tokens)
        self.cached_tokens = cached
        self.to_finish = self.grammar = self.beam_group = None
        self.seqlen = prompt
        self.budget = tokens


class _Batch:
    """What the hooks read of a ScheduleBatch; its surgery selects lists only."""

    def __init__(self, reqs: list) -> None:
        self.reqs = reqs
        self.sampling_info = SimpleNamespace(
            penalizer_orchestrator=SimpleNamespace(is_required=False))
        self.spec_info = self.hisparse_coordinator = None
        self.forward_mode = SimpleNamespace(is_extend=lambda: False, is_decode=lambda: True)
        self.forward_iter = 0
        self.launch_ts = None
        self.seq_lens_cpu = None

    def filter_batch(self, keep_indices: list) -> None:
        self.reqs = [self.reqs[i] for i in keep_indices]

    def merge_batch(self, other) -> None:
        self.reqs = self.reqs + other.reqs

    def is_empty(self) -> bool:
        return not self.reqs


class Workload:
    def __init__(self, ns, seed: int = 0) -> None:
        self.ns = ns
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def _tokens(self) -> int:
        return int(self.rng.integers(self.ns.tokens // 2, self.ns.tokens * 3 // 2))

    def critical(self) -> list:
        self.n += 1
        tpot = self.ns.slo * (STEP_S + SEQ_S)
        return [_Req(f"c{self.n}", 600, 0, self._tokens(), {"taper_tpot": tpot})]

    def group(self) -> list:
        self.n += 1
        name, w = f"g{self.n}", self.ns.width
        return [_Req(f"{name}-{b}", 1500, 1400, self._tokens(),
                     {"taper_group": name, "taper_width": w, "taper_branch": b})
                for b in range(w)]


def run(policy: str, ns, profile: cProfile.Profile | None = None, fresh_views: bool = False,
        record: bool = False) -> dict:
    """One policy's run. `fresh_views`: stack every view afresh (no fixed rows
    kept, as before LiveViews); `record`: also return each step's decision (the
    ids that decoded, and the measured step)."""
    from sglang_taper.adapter import reqmeta
    from sglang_taper.adapter import runtime as rt_mod

    clock = _Clock()
    real = rt_mod.time, reqmeta.time
    rt_mod.time = reqmeta.time = clock  # the virtual clock; perf_counter stays real
    try:
        sched = SimpleNamespace(
            server_args=SimpleNamespace(), tp_size=1,
            spec_algorithm=SimpleNamespace(is_none=lambda: True), waiting_queue=[],
            max_prefill_tokens=16384, chunked_prefill_size=8192, chunked_req=None)
        rt = rt_mod.SchedulerRuntime(sched, TaperConfig(policy=policy))
        work = Workload(ns)
        reqs = [r for _ in range(ns.critical) for r in work.critical()]
        reqs += [r for _ in range(ns.groups) for r in work.group()]
        for r in reqs:
            rt.attach(r)
            r.output_ids.append(1)  # prefilled: the first token
        batch = _Batch(reqs)
        sched.running_batch = batch
        merge_s = 0.0
        decisions = []
        seqs = held = 0
        cpu0 = time.process_time()
        if profile is not None:
            profile.enable()
        for step in range(ns.steps):
            t0 = time.perf_counter()
            batch = rt.merge_into(batch)  # the next pass's ingest
            merge_s += time.perf_counter() - t0
            sched.running_batch = batch
            n_all = len(batch.reqs)
            if fresh_views:
                rt.views.clear()
            rt.guard("regulate", rt.regulate, batch)
            seqs += n_all
            held += n_all - len(batch.reqs)
            batch.forward_iter = step
            batch.launch_ts = clock.now
            rt.guard("on_run", rt.on_run, batch)
            if record:
                decisions.append(([r.rid for r in batch.reqs], n_all))
            kv = sum(len(r.origin_input_ids) + len(r.output_ids) for r in batch.reqs)
            clock.now += STEP_S + SEQ_S * len(batch.reqs) + KV_S * kv
            for r in batch.reqs:
                r.output_ids.append(1)
            rt.guard("on_result", rt.on_result, batch)
            # finished requests leave; each is replaced (a group by a new group)
            done = [r for r in batch.reqs if len(r.output_ids) >= r.budget]
            if done:
                gone = {id(r) for r in done}
                batch.reqs = [r for r in batch.reqs if id(r) not in gone]
                for r in done:
                    if r._taper.group is None:
                        new = work.critical()
                    elif not any(q._taper.group == r._taper.group for q in batch.reqs) and (
                            rt.held is None or not any(q._taper.group == r._taper.group
                                                       for q in rt.held.reqs)):
                        new = work.group()
                    else:
                        continue
                    for q in new:
                        rt.attach(q)
                        q.output_ids.append(1)
                    batch.reqs = batch.reqs + new
        if profile is not None:
            profile.disable()
        cpu = time.process_time() - cpu0
    finally:
        rt_mod.time, reqmeta.time = real
    steps = ns.steps
    split = {k: 1e6 * v / steps for k, v in sorted(rt.hook_split.items())}
    split["merge"] = 1e6 * merge_s / steps
    return {"policy": policy, "steps": steps, "mean_seqs": seqs / steps,
            "mean_held": held / steps, "us_per_step": split,
            "hooks_us_per_step": sum(split.values()),
            "cpu_us_per_step": 1e6 * cpu / steps, "faults": rt.stats.faults,
            # how LiveViews built the views (None: a tree without it)
            "views": rt.views.counts() if hasattr(rt, "views") else {
                k: None for k in ("reused", "gathered", "stacked")},
            **({"decisions": decisions, "stats": rt.stats.to_dict()} if record else {})}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--policies", default="taper,eager")
    p.add_argument("--critical", type=int, default=8, help="latency-critical requests")
    p.add_argument("--groups", type=int, default=5, help="branch groups decoding")
    p.add_argument("--width", type=int, default=8, help="branches per group")
    p.add_argument("--tokens", type=int, default=200, help="mean output tokens a request")
    p.add_argument("--slo", type=float, default=6.0,
                   help="critical TPOT SLO over the lone step's time")
    p.add_argument("--repeat", type=int, default=3, help="runs per policy; the fastest kept")
    p.add_argument("--profile", action="store_true", help="cProfile's top 25 (taper's run)")
    p.add_argument("--fresh-views", action="store_true",
                   help="stack every step's view afresh (keep no fixed rows): the cost "
                        "LiveViews saves")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--decisions", metavar="PATH",
                   help="also write each policy's decisions, step by step (the request "
                        "ids that decoded), as JSON: two trees' files compare with cmp")
    ns = p.parse_args(argv)
    for name in ("steps", "width", "tokens", "repeat"):
        if getattr(ns, name) < 1:
            p.error(f"--{name} must be >= 1")
    if ns.critical < 0 or ns.groups < 0 or ns.critical + ns.groups == 0 or not ns.slo > 0:
        p.error("--critical and --groups must be >= 0 (not both 0), --slo > 0")
    for policy in ns.policies.split(","):
        try:
            if TaperConfig(policy=policy).spec.entry.needs_cost:
                p.error(f"--policies: {policy} needs the simulator's true step time")
        except ValueError as e:
            p.error(f"--policies: {e}")
    out = []
    for policy in ns.policies.split(","):
        best = min((run(policy, ns, fresh_views=ns.fresh_views) for _ in range(ns.repeat)),
                   key=lambda r: r["hooks_us_per_step"])
        out.append(best)
        parts = ", ".join(f"{k} {v:.1f}" for k, v in best["us_per_step"].items())
        print(f"[hook_path] {policy:6s} {best['mean_seqs']:.1f} seqs, {best['mean_held']:.1f} "
              f"held a step: hooks {best['hooks_us_per_step']:.1f} us/step ({parts}); "
              f"CPU {best['cpu_us_per_step']:.1f} us/step (the whole loop)"
              + ("; views " + ", ".join(f"{k} {v}" for k, v in best["views"].items())
                 if best["views"]["reused"] is not None else ""), flush=True)
        if best["faults"]:
            raise SystemExit(f"{policy}: {best['faults']} faults in the hooks")
    if ns.decisions:
        with open(ns.decisions, "w") as f:
            json.dump({policy: run(policy, ns, record=True)["decisions"]
                       for policy in ns.policies.split(",")}, f)
    if ns.profile:
        prof = cProfile.Profile()
        run(ns.policies.split(",")[0], ns, prof)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
