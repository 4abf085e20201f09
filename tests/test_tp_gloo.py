"""Tensor parallelism without a GPU: two CPU processes, one TP rank each, joined by
torch.distributed's gloo backend, drive the adapter's `SchedulerRuntime` through the
same synthetic decode loop, in the order SGLang's hooks call it (attach at request
creation, regulate before the step, on_run, on_result, the held part merged back at
the next pass). The ranks agree on what runs through the runtime's own path
(`_keep_on_every_rank` -> `agree_on_keep` -> SGLang's `broadcast_pyobj` over a real
gloo group); only SGLang's `get_parallel().tp_group` is a stand-in, since SGLang's TP
groups need CUDA (PyNccl) to start.

Rank 1 measures every step 2.5 times as long as rank 0 (its clock runs faster), so
its fit and its slack differ from rank 0's: it would keep other sequences if it
decided for itself, and the clean run checks that it would, so that the agreement
asserted is the broadcast's doing. Each scenario injects a fault (TAPER_INJECT_FAULT)
on one rank, or none, and checks what the runtime's docstrings promise.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest

WORLD = 2
STEPS = 50
RATE = (1.0, 2.5)  # each rank's clock: seconds of its time per second of rank 0's
TIMEOUT_S = 20  # a collective that waits this long means the ranks diverged
# name -> the fault each rank injects (TAPER_INJECT_FAULT), run in this order
SCENARIOS: dict[str, tuple[str | None, str | None]] = {
    "clean": (None, None),
    "rank0_decide": ("decide@25", None),
    "rank0_observe": ("observe@15", None),
    "follower_observe": (None, "observe@10"),
    "follower_stats": (None, "stats@15"),
    "rank0_split": ("split@5", None),
    "follower_split": (None, "split@5"),
}


# ------------------------------------------------------------------ fakes

class _Clock:
    """A rank's monotonic clock, advanced by the synthetic loop (seconds)."""

    def __init__(self, rate: float) -> None:
        self.now = 1000.0
        self.rate = rate

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds * self.rate


class _Req:
    """The parts of SGLang's `Req` the runtime reads."""

    def __init__(self, rid: str, custom: dict | None, prompt: int, max_new: int,
                 cached: int) -> None:
        self.rid = rid
        self.sampling_params = SimpleNamespace(custom_params=custom, max_new_tokens=max_new)
        self.origin_input_ids = list(range(prompt))
        self.output_ids: list[int] = []
        self.cached_tokens = cached
        self.to_finish = self.grammar = self.beam_group = None


class _Batch:
    """The parts of SGLang's `ScheduleBatch` the runtime and its surgery use;
    `filter_batch` rebinds `reqs`, as SGLang's rebinds its tensors."""

    def __init__(self, reqs: list, extend: bool = False) -> None:
        self.reqs = reqs
        self.sampling_info = SimpleNamespace(
            penalizer_orchestrator=SimpleNamespace(is_required=False))
        self.spec_info = self.hisparse_coordinator = None
        self.forward_mode = SimpleNamespace(is_extend=lambda: extend,
                                            is_decode=lambda: not extend)
        self.forward_iter = 0
        self.launch_ts = None
        self.extend_num_tokens = sum(len(r.origin_input_ids) - r.cached_tokens
                                     for r in reqs) if extend else 0

    @property
    def seq_lens_cpu(self):
        import torch

        return torch.tensor([_kv(r) for r in self.reqs], dtype=torch.int64)

    def filter_batch(self, keep_indices: list[int]) -> None:
        self.reqs = [self.reqs[i] for i in keep_indices]

    def merge_batch(self, other: _Batch) -> None:
        self.reqs = self.reqs + other.reqs

    def is_empty(self) -> bool:
        return not self.reqs


def _kv(req: _Req) -> int:
    return len(req.origin_input_ids) + len(req.output_ids)


def _step_seconds(reqs: list) -> float:
    """Rank 0's synthetic decode step: ~3 ms plus 0.3 ms per sequence, KV on top."""
    return 3e-3 + 3e-4 * len(reqs) + 2e-7 * sum(_kv(r) for r in reqs)


class _Arrivals:
    """The same request stream on every rank (one seed): fork groups of 2-8 branches,
    and latency-critical requests whose TPOT SLOs (so the slack) vary."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def step(self, i: int, running: int) -> list[_Req]:
        rng, out = self.rng, []
        if i % 12 == 0 or rng.random() < 0.08:
            self.n += 1
            width, prompt = int(rng.integers(2, 9)), int(rng.integers(40, 400))
            for b in range(width):
                out.append(_Req(f"g{self.n}.{b}", {"taper_group": f"g{self.n}",
                                                   "taper_branch": b, "taper_width": width},
                                prompt, int(rng.integers(6, 30)), prompt if b else 0))
        if running < 3 and rng.random() < 0.5:
            self.n += 1
            tpot = float(rng.choice([0.008, 0.012, 0.02, 0.05, 0.3]))
            out.append(_Req(f"c{self.n}", {"taper_tpot": tpot}, int(rng.integers(20, 200)),
                            int(rng.integers(10, 50)), 0))
        return out


# ------------------------------------------------------------------ one rank

def _scenario(rank: int, fault: str | None, records: list[dict]) -> None:
    """One rank's run of the synthetic loop under a fresh runtime: appends a record
    per step to `records` (kept so far if a collective fails)."""
    from controller import TaperConfig
    from sglang_taper.adapter import reqmeta, runtime

    clock = _Clock(RATE[rank])
    fake_time = SimpleNamespace(monotonic=clock.monotonic, perf_counter=time.perf_counter)
    runtime.time = reqmeta.time = fake_time  # this process only: a throwaway child
    sched = SimpleNamespace(tp_size=WORLD, server_args=SimpleNamespace(),
                            spec_algorithm=SimpleNamespace(is_none=lambda: True),
                            waiting_queue=[], chunked_req=None, running_batch=_Batch([]))
    rt = runtime.SchedulerRuntime(sched, TaperConfig(policy="taper"), fault)
    arrivals = _Arrivals()
    for i in range(STEPS):
        running = sched.running_batch = rt.merge_into(sched.running_batch)  # next pass
        new = arrivals.step(i, sum(r.rid.startswith("c") for r in running.reqs))
        for r in new:
            rt.guard("attach", rt.attach, r)  # the after_create_req hook
        if new:  # their prefill: first token, the group's prefix from the radix cache
            prefill = _Batch(new, extend=True)
            prefill.launch_ts = clock.now
            clock.advance(1e-3 + 2e-6 * prefill.extend_num_tokens)
            for r in new:
                r.output_ids.append(0)
            rt.guard("on_result", rt.on_result, prefill)
            running.reqs = running.reqs + new
        running.filter_batch([j for j, r in enumerate(running.reqs)
                              if len(r.output_ids) < r.sampling_params.max_new_tokens])
        candidates_reqs = list(running.reqs)
        candidates = [r.rid for r in candidates_reqs]
        rt.guard("regulate", rt.regulate, running)
        rec = {"step": i, "candidates": candidates, "kept": [r.rid for r in running.reqs],
               "held": [] if rt.held is None else [r.rid for r in rt.held.reqs],
               "local": None}
        pending = rt._pending  # (batch, decision, view, keep) of the step being built
        rids = {r._taper.uid: r.rid for r in candidates_reqs if getattr(r, "_taper", None)}
        if pending is not None and pending[2] is not None:
            # under TP the view's rows are the batch's, in its order (rank 0's indices
            # are applied to every rank's batch as they are)
            rec["view_order"] = [rids.get(int(u)) for u in pending[2].ids] == candidates
        if (rank == 0 and pending is not None and pending[0] is running
                and rt._rank0_decision is not None):  # what rank 0 decided this step
            d = rt._rank0_decision
            rec["decided"] = sorted(rids[int(u)] for u in d.ids[d.keep])
        if rank != 0 and pending is not None and pending[2] is not None:
            # What this rank would have kept had it decided for itself (decide is pure).
            rec["local"] = [candidates[j] for j in rt.controller.decide(pending[2]).keep]
        running.forward_iter, running.launch_ts = i, clock.now
        rt.guard("on_run", rt.on_run, running)
        clock.advance(_step_seconds(running.reqs))
        for r in running.reqs:
            r.output_ids.append(i + 1)
        rt.guard("on_result", rt.on_result, running)  # the after_process_result hook
        clock.advance(5e-4)  # the engine's gap between steps
        s = rt.stats
        rec.update(regulating=not rt.disabled, degraded=s.degraded, faults=s.faults,
                   digest=s.decision_digest, regulated_steps=s.regulated_steps)
        records.append(rec)


def _rank_main(rank: int, rendezvous: str, out_dir: str) -> None:
    """A child process: join the gloo group, run the scenarios in order, and write
    each rank's records (so far) and its error, if any, for the parent to judge."""
    out: dict = {"records": {}, "error": None}
    path = os.path.join(out_dir, f"rank{rank}.json")

    def save() -> None:
        with open(path + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(path + ".tmp", path)

    try:
        import torch.distributed as dist

        timeout = timedelta(seconds=TIMEOUT_S)  # a rank that skipped a collective: raise
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                                world_size=WORLD, timeout=timeout)
        import sglang.srt.runtime_context as ctx

        cpu_group = dist.new_group(list(range(WORLD)), backend="gloo", timeout=timeout)
        # SGLang's TP group, as far as TAPER reads it (GroupCoordinator's names).
        tp_group = SimpleNamespace(rank=rank, rank_in_group=rank, ranks=list(range(WORLD)),
                                   cpu_group=cpu_group, world_size=WORLD)
        ctx.get_parallel = lambda: SimpleNamespace(tp_group=tp_group)
        for name, faults in SCENARIOS.items():
            dist.barrier(group=cpu_group)
            _scenario(rank, faults[rank], out["records"].setdefault(name, []))
            save()
        dist.barrier(group=cpu_group)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 (reported to the parent, which fails the test)
        out["error"] = traceback.format_exc()
    save()


# ------------------------------------------------------------------ the parent

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    """Both ranks' records and errors (one pair of processes for every scenario:
    each child pays a few seconds importing torch and SGLang)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    tmp = tmp_path_factory.mktemp("tp_gloo")
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_rank_main, args=(r, str(tmp / "rendezvous"), str(tmp)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 150  # imports on a loaded 2-core host, then timeouts
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    out = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
        path = tmp / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote nothing (exit code {p.exitcode})"
        out.append(json.loads(path.read_text()))
    return out


def _pair(runs: list[dict], name: str) -> tuple[list[dict], list[dict]]:
    """Both ranks' records of scenario `name`, checked step by step for what every
    scenario promises: the same batch runs on every rank, both stop regulating at
    the same step, and nothing is lost."""
    r0, r1 = (run["records"].get(name, []) for run in runs)
    for a, b in zip(r0, r1):
        step = a["step"]
        # Same stream, same candidates: otherwise the indices agreed on mean nothing.
        assert a["candidates"] == b["candidates"], f"step {step}: candidates differ"
        assert a["kept"] == b["kept"], (
            f"step {step}: rank 0 ran {a['kept']}, rank 1 ran {b['kept']}")
        assert a["regulating"] == b["regulating"], (
            f"step {step}: regulating on rank 0: {a['regulating']}, rank 1: {b['regulating']}")
        for rec in (a, b):  # every candidate either runs or is held
            assert sorted(rec["kept"] + rec["held"]) == sorted(rec["candidates"])
    if len(r0) < STEPS or len(r1) < STEPS:
        errors = "\n".join(f"rank {r}: {run['error']}" for r, run in enumerate(runs)
                           if run["error"])
        pytest.fail(f"{name}: the ranks ran {len(r0)} and {len(r1)} of {STEPS} steps\n{errors}")
    return r0, r1


def _first_off(records: list[dict]) -> int | None:
    return next((rec["step"] for rec in records if not rec["regulating"]), None)


def _first_degraded(records: list[dict]) -> int | None:
    return next((rec["step"] for rec in records if rec["degraded"] is not None), None)


def test_every_rank_runs_rank0s_decision_every_step(runs):
    r0, r1 = _pair(runs, "clean")
    assert [a["digest"] for a in r0] == [b["digest"] for b in r1]
    # The run regulated for real: branches held at many steps, at varied widths.
    held_steps = sum(bool(a["held"]) for a in r0)
    assert held_steps >= 10, f"only {held_steps} steps held a branch"
    assert len({len(a["kept"]) for a in r0}) >= 5
    assert r0[-1]["regulated_steps"] == r1[-1]["regulated_steps"] >= 30
    # Rank 1 would have decided otherwise: the agreement is the broadcast's doing.
    differ = sum(b["local"] is not None and b["local"] != a["kept"] for a, b in zip(r0, r1))
    assert differ >= 5, f"rank 1's own decisions differed at only {differ} steps"
    assert all(rec["regulating"] and rec["degraded"] is None for rec in r0 + r1)
    # What ran is what rank 0's controller decided, and every view was in batch order.
    decided = [a for a in r0 if "decided" in a]
    assert len(decided) >= 30 and all(sorted(a["kept"]) == a["decided"] for a in decided)
    assert all(rec.get("view_order", True) for rec in r0 + r1)
    assert sum("view_order" in rec for rec in r0 + r1) >= 60


@pytest.mark.parametrize("name", ["rank0_decide", "rank0_observe"])
def test_a_fault_on_rank0_degrades_every_rank_at_the_same_step(runs, name):
    r0, r1 = _pair(runs, name)
    off = _first_off(r0)
    assert off is not None and 5 <= off < STEPS - 10, f"rank 0 turned off at step {off}"
    assert _first_off(r1) == off, "the ranks stopped regulating at different steps"
    assert all(not rec["regulating"] for rec in r0[off:] + r1[off:])
    assert any(a["held"] for a in r0[:off]), "nothing was held before the fault"
    for a, b in zip(r0[off:], r1[off:]):  # keep-all, in the order of the candidates
        assert a["kept"] == a["candidates"] and not a["held"] and not b["held"]
    reason = r0[-1]["degraded"]
    assert reason is not None and "InjectedFault" in reason and r1[-1]["degraded"] == reason
    fault = _first_degraded(r0)
    assert _first_degraded(r1) == off
    if name == "rank0_decide":  # the decision failed: both ranks run whole at once
        assert fault == off
    else:  # it failed after step `fault` ran; rank 0 announced it at its next decision
        assert fault < off and all(rec["regulating"] for rec in r1[:off])
    # Until the fault the decisions agreed, digest for digest (rank 0 records no
    # step whose observation failed).
    assert [a["digest"] for a in r0[:fault]] == [b["digest"] for b in r1[:fault]]


@pytest.mark.parametrize("name", ["follower_observe", "follower_stats"])
def test_a_fault_on_the_follower_stops_every_rank_at_the_next_split(runs, name):
    """A follower's own fault is counted where it happened; the follower goes on
    applying rank 0's decisions until the next step that splits, where the ranks'
    confirmation carries it: every rank then runs whole and stops regulating."""
    r0, r1 = _pair(runs, name)
    fault = _first_degraded(r1)
    assert fault is not None and 5 <= fault < STEPS - 10
    assert "InjectedFault" in r1[-1]["degraded"] and r1[-1]["faults"] >= 1
    assert all(a["faults"] == 0 for a in r0)  # rank 0 had no fault of its own
    off = _first_off(r0)
    assert off is not None and off >= fault and _first_off(r1) == off
    assert all(rec["regulating"] for rec in r0[:off] + r1[:off])
    assert not any(rec["regulating"] for rec in r0[off:] + r1[off:])
    assert "TP rank(s) [1]" in r0[-1]["degraded"]
    # Nothing split between the fault and the step that carried it: the follower's
    # fault cannot have let the batches drift apart.
    assert not any(a["held"] for a in r0[fault + 1:off])
    assert [a["digest"] for a in r0[:fault]] == [b["digest"] for b in r1[:fault]]


@pytest.mark.parametrize("name", ["rank0_split", "follower_split"])
def test_a_failed_split_on_one_rank_puts_every_batch_back(runs, name):
    """The split is confirmed by every rank before the step runs: one that failed
    makes every rank put its batch back in its original order and run it whole,
    and all stop regulating at that same step."""
    r0, r1 = _pair(runs, name)  # the same batch on both ranks at every step
    failing = r0 if name == "rank0_split" else r1
    fault = _first_degraded(failing)
    assert fault is not None and fault == _first_off(r0) == _first_off(r1)
    assert "InjectedFault" in failing[-1]["degraded"] and failing[-1]["faults"] >= 1
    for a in (r0[fault], r1[fault]):  # that step ran whole, rows in their order
        assert a["kept"] == a["candidates"] and not a["held"]
    assert any(a["held"] for a in r0[:fault]), "nothing was held before the fault"
