"""Branch admission policies, registered by name.

Every policy sees the same prepared `Candidates`: the sequences that must run
(ordinary requests, latency-critical sequences, each group's base branch,
branches held too long) and the optional extra branches in priority order. A
policy returns how many of those extras, or which, to admit.

Priority order of extras (documented contract, used by `cap` and `taper`):
least laxity first, i.e. the branch with the least time in hand before its
stage's deadline given the tokens it still has to generate (see
`Controller._laxity`), then the older group, then the lower branch index.
Across groups this is earliest-deadline-first; within a group the branch with
the most work left goes first, which keeps a group's branches finishing
together rather than waiting on one laggard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from controller.config import PolicySpec


@dataclass(slots=True)
class Candidates:
    """Input of a policy for one step."""

    extras: np.ndarray  # int64 view indices of optional branches (see PolicyEntry.order)
    extra_group: np.ndarray  # int64 group code of each extra
    extra_rank: np.ndarray  # int64 rank among its group's extras (0-based); cap only
    mandatory_in_group: np.ndarray  # int64, per extra: mandatory members of its group; cap only
    costs: np.ndarray  # float64 seconds, marginal predicted step time of each extra
    budget: float  # seconds available to extras (may be negative, or +inf)
    # For policies with their own cost model (the simulator's clairvoyant bound):
    base_n: int = 0  # sequences that run anyway
    base_kv: float = 0.0  # KV tokens they attend
    kv_own: np.ndarray | None = None  # KV tokens each extra would add
    slack: float = float("inf")  # seconds before the tightest deadline, less the gap


Policy = Callable[[Candidates], np.ndarray]  # -> bool mask over c.extras


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    name: str
    usage: str  # how it is written, e.g. "cap:K"
    takes_arg: bool
    make: Callable[[int | None], Policy]
    # How the controller orders the extras for it: "none" (all or nothing),
    # "group" (groups contiguous, each in priority order; fills rank and counts),
    # "global" (priority order across groups).
    order: str = "global"


POLICIES: dict[str, PolicyEntry] = {}


def register(name: str, usage: str | None = None, takes_arg: bool = False,
             order: str = "global"):
    def deco(make: Callable[[int | None], Policy]):
        POLICIES[name] = PolicyEntry(name, usage or name, takes_arg, make, order)
        return make

    return deco


def make_policy(spec: PolicySpec) -> Policy:
    return POLICIES[spec.name].make(spec.arg)


@register("off", order="none")
def _off(_: int | None) -> Policy:
    """No branch parallelism: one branch per group decodes, the rest wait."""
    return lambda c: np.zeros(len(c.extras), dtype=bool)


@register("eager", order="none")
def _eager(_: int | None) -> Policy:
    """Every branch decodes in every step (stock SGLang behaviour)."""
    return lambda c: np.ones(len(c.extras), dtype=bool)


@register("cap", usage="cap:K", takes_arg=True, order="group")
def _cap(k: int | None) -> Policy:
    """At most K sequences per group decode in a step (mandatory ones count)."""
    assert k is not None and k >= 1

    def admit(c: Candidates) -> np.ndarray:
        return c.extra_rank < (k - c.mandatory_in_group)

    return admit


@register("taper")
def _taper(_: int | None) -> Policy:
    """Admit extras in priority order while their summed predicted externality
    fits the step's slack budget. The admitted set is a prefix of the priority
    order, so more budget never admits fewer branches."""

    def admit(c: Candidates) -> np.ndarray:
        mask = np.zeros(len(c.extras), dtype=bool)
        if c.budget <= 0 or not len(c.extras):
            return mask
        n = int(np.searchsorted(np.cumsum(c.costs), c.budget, side="right"))
        mask[:n] = True
        return mask

    return admit
