"""Branch admission policies, registered by name, with the rules the controller
applies for each.

Every policy sees the same prepared `Candidates`: the sequences that must run
(ordinary requests, latency-critical sequences, each group's base branch, and
whatever the entry's promotion rules make mandatory) and the optional extra
branches in the order the entry asks for. A policy returns which extras to admit:
a mask over them, or a count k for their first k (a prefix of the order, which
the controller then takes without gathering).

Priority order of extras (`order="global"` and `"group"`): least laxity first,
i.e. the branch with the least time in hand before its stage's deadline given
the tokens it still has to generate (see `Controller._laxity`), then the older
group, then the lower branch index. Across groups this is earliest-deadline-
first; within a group the branch with the most work left goes first, which
keeps a group's branches finishing together rather than waiting on one laggard.

Promotion rules are per entry, so a baseline is exactly what its name says for
the whole run: `off` never runs a second branch of a group and `cap:K` never
more than K, however long a branch has waited. Only `taper` (and the
simulator's `clairvoyant`) promote a branch held `max_hold_steps` steps in a
row; only `taper` promotes a branch whose stage is about to miss its deadline
(`urgent_paces`). Only `taper` gates prefills (`Controller.admit_prefill`): the
baselines prefill whenever the engine would, as stock SGLang does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A parsed policy string: a registry name and its argument (K of `cap:K`)."""

    name: str
    arg: int | None = None

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}:{self.arg}"

    @property
    def entry(self) -> PolicyEntry:
        return POLICIES[self.name]


@dataclass(slots=True)
class Candidates:
    """Input of a policy for one step."""

    extras: np.ndarray  # int64 view indices of optional branches (see PolicyEntry.order)
    extra_group: np.ndarray  # int64 group code of each extra
    extra_rank: np.ndarray  # int64 rank among its group's extras (0-based); order "group"
    mandatory_in_group: np.ndarray  # int64, per extra: mandatory members of its group; "group"
    costs: np.ndarray  # float64 seconds, marginal predicted step time of each extra
    budget: float  # seconds available to extras (may be negative, or +inf)
    # For policies with their own cost model (the simulator's clairvoyant policy):
    base_n: int = 0  # sequences that run anyway
    base_kv: float = 0.0  # KV tokens they attend
    kv_own: np.ndarray | None = None  # KV tokens each extra would add
    slack: float = float("inf")  # seconds before the tightest deadline, less the gap


# -> bool mask over c.extras, or k: the first k of them
Policy = Callable[[Candidates], np.ndarray | int]


class StepCost(Protocol):
    """A true step-time model (the simulator's): seconds of a decode step of n
    sequences attending kv KV tokens."""

    def decode(self, n: int, kv: float) -> float: ...


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    name: str
    usage: str  # how it is written, e.g. "cap:K"
    takes_arg: bool
    make: Callable[[int | None, StepCost | None], Policy]
    # How the controller orders the extras for it: "none" (all or nothing),
    # "group" (groups contiguous, each in priority order; fills rank and counts),
    # "global" (priority order across groups).
    order: str = "global"
    starvation: bool = False  # a branch held max_hold_steps in a row becomes mandatory
    urgency: bool = False  # a held branch under urgent_paces of laxity becomes mandatory
    needs_cost: bool = False  # needs the true step-time model: simulator only
    # before a prefill step: defer it while it would make a running critical request
    # miss an SLO that it can still meet (see Controller.admit_prefill)
    prefill_gate: bool = False
    doc: str = ""
    # admits a prefix of the priority order whose costs fit the budget, so none when
    # the budget is <= 0: the controller then skips ordering and costing the extras
    prefix: bool = False


POLICIES: dict[str, PolicyEntry] = {}


def register(name: str, usage: str | None = None, takes_arg: bool = False,
             order: str = "global", starvation: bool = False, urgency: bool = False,
             needs_cost: bool = False, prefill_gate: bool = False, prefix: bool = False):
    if order not in ("none", "group", "global"):
        raise ValueError(f"policy {name!r}: unknown order {order!r}")

    def deco(make):
        doc = (make.__doc__ or "").strip().split("\n")[0]
        POLICIES[name] = PolicyEntry(name, usage or name, takes_arg, make, order, starvation,
                                     urgency, needs_cost, prefill_gate, doc, prefix)
        return make

    return deco


def parse_policy(text: str) -> PolicySpec:
    """Parse and validate a policy string against the registry.

    Raises ValueError with a one-line message naming the bad input.
    """
    name, sep, arg = text.strip().partition(":")
    entry = POLICIES.get(name)
    choices = ", ".join(e.usage for e in POLICIES.values())
    if entry is None:
        raise ValueError(f"unknown policy {text!r}; choose from {choices}")
    if not entry.takes_arg:
        if sep:
            raise ValueError(f"policy {name!r} takes no argument, got {text!r}")
        return PolicySpec(name)
    try:
        k = int(arg)
    except ValueError:
        raise ValueError(f"policy {entry.usage} needs an integer K >= 1, got {text!r}") from None
    if k < 1:
        raise ValueError(f"policy {entry.usage} needs K >= 1, got {text!r}")
    return PolicySpec(name, k)


def make_policy(spec: PolicySpec, cost: StepCost | None = None) -> Policy:
    entry = spec.entry
    if entry.needs_cost and cost is None:
        raise ValueError(f"policy {spec.name!r} needs the true step-time model; it exists "
                         f"only in the simulator (taper sim)")
    return entry.make(spec.arg, cost)


@register("off", order="none")
def _off(_k, _cost) -> Policy:
    """No branch parallelism: one branch per group decodes, the rest wait."""
    return lambda c: 0


@register("eager", order="none")
def _eager(_k, _cost) -> Policy:
    """Every branch decodes in every step (stock SGLang behaviour)."""
    return lambda c: len(c.extras)


@register("cap", usage="cap:K", takes_arg=True, order="group")
def _cap(k, _cost) -> Policy:
    """At most K sequences per group decode in a step (mandatory ones count)."""
    assert k is not None and k >= 1

    def admit(c: Candidates) -> np.ndarray:
        return c.extra_rank < (k - c.mandatory_in_group)

    return admit


@register("taper", starvation=True, urgency=True, prefill_gate=True, prefix=True)
def _taper(_k, _cost) -> Policy:
    """Admit extras in priority order while their summed predicted externality
    fits the step's slack budget."""

    # The admitted set is a prefix of the priority order, so more budget never
    # admits fewer branches.
    def admit(c: Candidates) -> int:
        if c.budget <= 0 or not len(c.extras):
            return 0
        return int(c.costs.cumsum().searchsorted(c.budget, side="right"))

    return admit


@register("clairvoyant", starvation=True, needs_cost=True)
def _clairvoyant(_k, cost: StepCost) -> Policy:
    """Simulator only: TAPER's order with the true step time and no prediction
    error; each step admits the widest prefix that still meets every critical
    deadline. A per-step greedy, not an upper bound."""

    def admit(c: Candidates) -> int:
        m = len(c.extras)
        if np.isinf(c.slack):
            return m
        cum = np.cumsum(c.kv_own)

        def fits(k: int) -> bool:
            kv = c.base_kv + (cum[k - 1] if k else 0.0)
            return cost.decode(c.base_n + k, kv) <= c.slack

        if not fits(0):
            return 0
        lo, hi = 0, m  # the largest k in [0, m] with fits(k); fits is monotone in k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    return admit
