"""N servers behind a router, in the simulator (`taper sim --replicas N --routing P`).

Each replica is an independent `Engine` (bench/sim/engine.py): its own
controller (TAPER's decisions, predictor and prefill gate), KV, clock, step
noise and counters. One `Programs` side issues the programs' requests, and a
routing policy (`ROUTINGS`) sends each request to a replica:

- `round_robin`: every request (a serial stage, each branch of a fork, a tool
  branch's reading) to the next replica in turn, so a fork's branches spread
  over the replicas;
- `least_loaded`: to the replica with the fewest requests routed to it and not
  finished (waiting, running, or held out of a step by its controller);
- `group_affine`: all of a program's requests to one replica, the least loaded
  one when the program arrives.

The prefix cache is per replica. The single engine's model is that a request
prefills only what is new to its program (the prompt at arrival, the join's
digest after a fork, its branch prompt, a tool's result) and finds the rest of
the program's context in the radix cache. Here that holds on a replica that has
seen the context; elsewhere the request also prefills what that replica lacks:
the first request of a stage sent to a replica pays it, siblings sent there
with it reuse it (as a prefix warm-up or in-batch prefix sharing would), and a
tool branch's reading sent away from its call's replica also prefills its
branch prompt and its call. Caches never evict, as in the single engine.

A replica holding part of a fork sees a partial group: its controller makes the
lowest-index branch it holds the group's base branch (mandatory), so `off` on
a split group runs one branch per replica.

Time: events (arrivals, tool returns, deliveries) fire in (time, kind, id)
order before any replica's step that starts later; otherwise the replica with
the earliest clock runs one step (ties: the lowest index). A request that one
replica's step issues to another is delivered as an event at that step's end.
The router's load counts are its own (routed minus finished), so they may run
up to one decode step ahead on replicas whose current step is already taken.

With one replica, every routing is the single engine bit for bit.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from bench.records import ProgramRecord
from bench.sim.cost import CostModel
from bench.sim.engine import Engine, Programs, SimConfig, _Req
from bench.sim.run import make_controller, server_figures
from bench.workload import Program
from controller import Controller, TaperConfig

_DELIVER = 2  # event kind: a request reaches a replica (after tool returns and arrivals)


@dataclass(slots=True, eq=False)
class _Placement:
    """Where one program's requests went and what each replica caches of it."""

    cached: list[int]  # tokens of the program's context in each replica's prefix cache
    home: int = -1  # group_affine: the program's replica
    calls: dict[tuple[int, int], int] = field(default_factory=dict)  # a tool call's
    # (stage, branch) -> the replica that ran it, until its reading is routed
    replicas: set[int] = field(default_factory=set)  # every replica that served it


class Router:
    """Chooses the replica of each request. `load[k]`: requests routed to
    replica k and not finished."""

    def __init__(self, n: int) -> None:
        self.n = n

    def route(self, r: _Req, where: _Placement, load: list[int]) -> int:
        raise NotImplementedError


ROUTINGS: dict[str, type[Router]] = {}


def register(name: str):
    def deco(cls: type[Router]) -> type[Router]:
        ROUTINGS[name] = cls
        return cls

    return deco


def _least(load: list[int]) -> int:
    return load.index(min(load))  # the lowest index on ties


@register("round_robin")
class RoundRobin(Router):
    """Every request to the next replica in turn."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self._next = 0

    def route(self, r, where, load):
        k = self._next
        self._next = (k + 1) % self.n
        return k


@register("least_loaded")
class LeastLoaded(Router):
    """Every request to the replica with the fewest unfinished requests."""

    def route(self, r, where, load):
        return _least(load)


@register("group_affine")
class GroupAffine(Router):
    """A program to one replica, the least loaded when it arrives."""

    def route(self, r, where, load):
        if where.home < 0:
            where.home = _least(load)
        return where.home


def check_routing(name: str) -> str:
    if name not in ROUTINGS:
        raise ValueError(f"unknown routing {name!r}; choose from {', '.join(ROUTINGS)}")
    return name


class _Replica(Engine):
    """One server behind the router: reports what it finishes to the cluster."""

    def __init__(self, index: int, cluster: Cluster, cost: CostModel, controller: Controller,
                 config: SimConfig) -> None:
        super().__init__(cost, controller, config)
        if index:  # replica 0 draws the single engine's noise; the others their own
            self.rng = np.random.default_rng([config.seed, index])
        self.index = index
        self.cluster = cluster
        self.idle = True  # found nothing to run; woken by the next request sent to it

    def _finish(self, r: _Req, t: float, token_times: list[float]) -> None:
        self.cluster._finished(self, r, t, token_times)


class Cluster(Programs):
    """The programs served by one replica per controller, behind `routing`."""

    def __init__(self, programs: list[Program], cost: CostModel,
                 controllers: list[Controller], routing: str,
                 config: SimConfig | None = None) -> None:
        super().__init__(programs)
        cfg = config or SimConfig()
        n = len(controllers)
        self.replicas = [_Replica(k, self, cost, c, cfg) for k, c in enumerate(controllers)]
        self.router = ROUTINGS[check_routing(routing)](n)
        self.load = [0] * n  # requests routed to each replica and not finished
        self.requests = [0] * n  # requests routed to each replica
        self.prefill_tokens = [0] * n  # prompt tokens each replica prefilled
        self.extra_prefill = [0] * n  # of those, what one engine would have had cached
        self.moved_reads = 0  # tool readings routed away from their call's replica
        self.placements: dict[str, _Placement] = {}  # by program id
        self._parts: dict[int, set[int]] = {}  # group code -> replicas holding its branches
        self._stepping: _Replica | None = None  # the replica whose step is running

    # ---------------------------------------------------------------- routing

    def _submit(self, r: _Req, uncached: int) -> None:
        prog = r.prog
        n = len(self.replicas)
        where = self.placements.get(prog.spec.pid)
        if where is None:
            where = self.placements[prog.spec.pid] = _Placement([0] * n)
        k = self.router.route(r, where, self.load)
        own = 0  # tokens of the branch's own the replica lacks (a moved reading)
        if r.role == "read":
            fresh = 0
            if where.calls.pop((r.stage, r.branch)) != k:
                own = r.context - prog.context - uncached  # branch prompt and call
                self.moved_reads += 1
        else:
            fresh = uncached - (r.context - prog.context)  # new to the program
        lacks = max(0, prog.context - fresh - where.cached[k])
        r.new_tokens = max(1, uncached + lacks + own)
        where.cached[k] = max(where.cached[k], prog.context)
        where.replicas.add(k)
        if r.role == "branch":
            self._parts.setdefault(r.group, set()).add(k)
        self.load[k] += 1
        self.requests[k] += 1
        self.prefill_tokens[k] += r.new_tokens
        self.extra_prefill[k] += r.new_tokens - max(1, uncached)
        stepping = self._stepping
        if stepping is None or stepping.index == k:
            self._enqueue(k, r, r.start)
        else:  # issued by another replica's step: it reaches k when that step ends
            self._push(stepping.t, _DELIVER, (k, r))

    def _enqueue(self, k: int, r: _Req, t: float) -> None:
        e = self.replicas[k]
        if e.idle:
            e.t = max(e.t, t)
            e.idle = False
        e.queue(r)

    def _fire(self, t: float, kind: int, payload) -> None:
        if kind == _DELIVER:
            self._enqueue(*payload, t)
        else:
            super()._fire(t, kind, payload)

    def _finished(self, e: _Replica, r: _Req, t: float, token_times: list[float]) -> None:
        k = e.index
        self.load[k] -= 1
        where = self.placements[r.prog.spec.pid]
        if r.role == "serial":  # k now caches the program's context and this answer
            where.cached[k] = r.prog.context + r.generated
        elif r.role == "branch" and r.prog.spec.stages[r.stage].kind == "tools":
            where.calls[(r.stage, r.branch)] = k
        self._finish(r, t, token_times)

    # ------------------------------------------------------------------- time

    def run(self, max_steps: int = 50_000_000) -> list[ProgramRecord]:
        events, replicas = self.events, self.replicas
        for _ in range(max_steps):
            nxt = None
            for e in replicas:
                if not e.idle and (nxt is None or e.t < nxt.t):
                    nxt = e
            if events and (nxt is None or events[0][0] <= nxt.t):
                t, kind, _, payload = heapq.heappop(events)
                self._fire(t, kind, payload)
                continue
            if nxt is None:
                break
            self._stepping = nxt
            if not nxt.step():
                nxt.idle = True
            self._stepping = None
        self.records.sort(key=lambda r: r.pid)
        return self.records

    def figures(self) -> dict:
        """What routing did: requests and prefill per replica, split groups."""
        parts = [len(s) for s in self._parts.values()]
        return {"replicas": len(self.replicas),
                "requests": list(self.requests), "prefill_tokens": list(self.prefill_tokens),
                "extra_prefill_tokens": list(self.extra_prefill),
                "decode_steps": [e.steps["decode"] for e in self.replicas],
                "groups": len(parts), "split_groups": sum(p > 1 for p in parts),
                "group_parts": sum(parts), "moved_reads": self.moved_reads}


def simulate_replicas(programs: list[Program], cost: CostModel, policy: str, replicas: int,
                      routing: str, base: TaperConfig | None = None,
                      sim: SimConfig | None = None) -> dict:
    """`bench.sim.run.simulate` on `replicas` servers behind `routing`: the same
    records and server figures (summed over replicas), and `server["routing"]`."""
    ctls = [make_controller(policy, cost, base) for _ in range(replicas)]
    c = Cluster(programs, cost, ctls, routing, sim)
    records = c.run()
    return {"records": records,
            "server": {**server_figures(c.replicas, max(e.t for e in c.replicas)),
                       "routing": c.figures()}}
