"""Group-affine placement: which replica (a DP rank, or a worker behind a
router) serves a request, so that a branch group is regulated as a whole.

Pure Python. A request names up to three keys in its TAPER metadata: its
program (`taper_program`: every stage and branch of one frontend program run),
its branch group (`taper_group`: one fork, or one n>1 request) and the group it
is nested in (`taper_parent`). The first request that names a key places it;
every later request that names it follows:

- a known group decides (the members of one group always share a replica);
- a new group goes where its program is, else where its parent group is;
- a request with nothing known goes to the least-loaded replica, and all the
  keys it names are placed there.

A request that names no key is not placed here (the caller's own method, e.g.
SGLang's round robin, decides). Placements are remembered in a bounded LRU
table; a replica that left (not in `active`) loses its placements.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from sglang_taper.meta import BranchMeta, parse_meta


@dataclass(frozen=True, slots=True)
class Keys:
    program: str | None = None
    group: str | None = None
    parent: str | None = None
    width: int = 1

    def __bool__(self) -> bool:
        return (self.program or self.group or self.parent) is not None


def keys_of(custom_params) -> Keys:
    """The placement keys of a request's custom_params (none if it has bad metadata:
    the server answers such a request with a 400 before it is placed)."""
    try:
        meta = parse_meta(custom_params)
    except ValueError:
        return Keys()
    return keys_of_meta(meta)


def keys_of_meta(meta: BranchMeta | None) -> Keys:
    if meta is None:
        return Keys()
    return Keys(program=meta.program, group=meta.group, parent=meta.parent, width=meta.width)


class Placement:
    """Key -> replica, with new work sent to the least loaded replica.

    `loads` passed to `place` are the replicas' current load (requests running,
    held out of a step, or waiting); a placement of a new group adds its width
    to the chosen replica's pending load, so a burst of groups arriving between
    two load reports spreads out instead of piling onto one replica."""

    def __init__(self, capacity: int = 65536) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._where: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._pending: dict[int, float] = {}  # replica -> load added since the last report
        self.placed = 0  # keyed requests placed
        self.new = 0  # of those, sent to the least-loaded replica (nothing known)

    def __len__(self) -> int:
        return len(self._where)

    def reported(self, replica: int) -> None:
        """A fresh load of `replica` arrived: its pending increments are in it now."""
        self._pending.pop(replica, None)

    def lookup(self, kind: str, key: str | None) -> int | None:
        if key is None:
            return None
        where = self._where.get((kind, key))
        if where is not None:
            self._where.move_to_end((kind, key))
        return where

    def _remember(self, kind: str, key: str | None, replica: int) -> None:
        if key is None:
            return
        self._where[(kind, key)] = replica
        self._where.move_to_end((kind, key))
        while len(self._where) > self.capacity:
            self._where.popitem(last=False)

    def place(self, keys: Keys, loads: Sequence[float], active: Sequence[int]) -> int | None:
        """The replica for a request with `keys`, or None if it names none.
        `loads[i]`: replica i's load; `active`: the replicas that may be chosen."""
        if not keys or not active:
            return None
        allowed = set(active)
        known = {}
        for kind, key in (("group", keys.group), ("program", keys.program),
                          ("group", keys.parent)):
            where = self.lookup(kind, key)
            if where is not None and where in allowed:  # else that replica left
                known[(kind, key)] = where
        where = next(iter(known.values()), None)
        fresh = where is None
        if fresh:
            where = min(active, key=lambda r: (loads[r] + self._pending.get(r, 0.0), r))
            self.new += 1
        if keys.group is not None and ("group", keys.group) not in known:
            # A new group brings its whole width to the replica.
            self._pending[where] = self._pending.get(where, 0.0) + max(1, keys.width)
        elif fresh:  # a new program (its first request): at least that request
            self._pending[where] = self._pending.get(where, 0.0) + 1.0
        for kind, key in (("group", keys.group), ("program", keys.program),
                          ("group", keys.parent)):
            if key is not None and (kind, key) not in known:
                self._remember(kind, key, where)
        self.placed += 1
        return where
