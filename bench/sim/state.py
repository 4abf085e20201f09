"""The simulator's request state: the running decode sequences, kept as numpy
columns (`RunningSet`), and the waiting queue (`WaitingQueue`).

Layout (struct of arrays): `ints` (int64) and `floats` (float64) are 2-D, one
row per field and one column per running sequence, in admission order, which
is the order the controller's `StepView` shows them. The first six rows of
`ints` are the view's integer columns in one block, so that building a view is
one copy of that block and one of `floats`, not a pass per field over objects.
Admission writes one column at the end; finishing compacts the columns with a
boolean mask, keeping the order (as removing from a list would).

Token times: on admission a sequence reserves max_new slots of one float64
buffer, from `BASE`; a decode step writes its end time at BASE + GENERATED for
the whole kept batch in one indexed store, and a finished sequence's slots are
read out as its record's list. When the buffer fills, the live segments are
packed to its front (finished ones are dead), so it holds about the tokens of
the running sequences, not of the whole run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from operator import itemgetter

import numpy as np

from controller.view import (
    FLOAT_ROWS,
    GENERATED,
    INT_ROWS,
    MAX_NEW,
    PrefillView,
    StepView,
    view_from_columns,
)

# Rows of `RunningSet.ints`: the view's integer rows (controller.view names them:
# GROUP ... CRITICAL), then the request id and the token-time buffer's base.
RID, BASE = INT_ROWS, INT_ROWS + 1
# `RunningSet.floats` holds the view's float rows (controller.view: TTFT ... FIRST).


class RunningSet:
    """The running sequences: their view columns and their token times."""

    def __init__(self, capacity: int = 256) -> None:
        self.n = 0  # sequences running: the columns [0, n) are live
        self.ints = np.zeros((INT_ROWS + 2, capacity), np.int64)
        self.floats = np.zeros((FLOAT_ROWS, capacity), np.float64)
        self.times = np.empty(64 * capacity)  # seconds, the token-time buffer
        self._cursor = 0  # the buffer's first unreserved slot
        # The views' ids and fixed columns (all but GENERATED), copied when the
        # membership changes, not every step: the same arrays until then (never
        # written).
        self._fixed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n

    def add(self, rid: int, group: int, branch: int, width: int, shared: int, max_new: int,
            context: int, ttft: float, tpot: float, arrival: float, first: float) -> None:
        """Admit a sequence that has its first token (at `first`, seconds) and
        `max_new` >= 2 tokens to produce in all. Arguments are the view's fields."""
        n = self.n
        if n == self.ints.shape[1]:
            self.ints = np.concatenate([self.ints, np.zeros_like(self.ints)], axis=1)
            self.floats = np.concatenate([self.floats, np.zeros_like(self.floats)], axis=1)
        if self._cursor + max_new > len(self.times):
            self._pack(max_new)
        base = self._cursor
        self._cursor += max_new
        self.times[base] = first
        self.ints[:, n] = (group, branch, width, shared, 1, max_new, context, group < 0, rid,
                          base)
        self.floats[:, n] = (ttft, tpot, arrival, first)
        self.n = n + 1
        self._fixed = None

    def view(self, now: float, waiting: int, queued: PrefillView | None = None) -> StepView:
        """The controller's view of the running sequences (copies: the controller
        may keep what it is given, and the columns change after the step)."""
        n = self.n
        if self._fixed is None:
            self._fixed = (self.ints[RID, :n].copy(), self.ints[:INT_ROWS, :n].copy(),
                           self.floats[:, :n].copy())
        ids, ints, floats = self._fixed
        return view_from_columns(ids, ints, floats, now, waiting=waiting, queued=queued,
                                 generated=self.ints[GENERATED, :n].copy())

    def advance(self, keep: np.ndarray, end: float) -> np.ndarray:
        """One decode step, ending at `end` (seconds), gave the sequences at
        `keep` (ascending indices) a token each. Returns those that are now
        done, ascending."""
        gen = self.ints[GENERATED]
        g = gen[keep]
        self.times[self.ints[BASE, keep] + g] = end
        g += 1
        gen[keep] = g
        return keep[g >= self.ints[MAX_NEW, keep]]

    def pop(self, slots: np.ndarray) -> list[tuple[int, int, list[float]]]:
        """Remove the sequences at `slots` (ascending); returns (rid, generated,
        token times) for each, in that order."""
        ints, times = self.ints, self.times
        out = [(rid, gen, times[base:base + gen].tolist()) for rid, gen, base in
               zip(ints[RID, slots].tolist(), ints[GENERATED, slots].tolist(),
                   ints[BASE, slots].tolist())]
        n = self.n
        _compact(ints, n, slots)
        _compact(self.floats, n, slots)
        self.n = n - len(slots)
        self._fixed = None
        return out

    def _pack(self, extra: int) -> None:
        """Move the live token segments to the front of a buffer with room for
        `extra` more slots and as many again, so packing happens rarely."""
        n = self.n
        base, size = self.ints[BASE, :n], self.ints[MAX_NEW, :n]
        start = np.cumsum(size) - size
        live = int(size.sum())
        src = np.repeat(base - start, size) + np.arange(live)  # each live slot's old index
        times = np.empty(max(2 * (live + extra), len(self.times)))
        times[:live] = self.times[src]
        self.times = times
        self.ints[BASE, :n] = start
        self._cursor = live


def _compact(block: np.ndarray, n: int, slots: np.ndarray) -> None:
    """Remove the columns `slots` (ascending) of `block[:, :n]`, keeping the order:
    the runs between them move left (a few runs: cheaper than a gather of all)."""
    if len(slots) > 16:
        live = np.ones(n, dtype=bool)
        live[slots] = False
        block[:, :n - len(slots)] = block[:, :n].compress(live, axis=1)
        return
    cuts = slots.tolist() + [n]
    dst = cuts[0]
    for j in range(len(cuts) - 1):
        size = cuts[j + 1] - cuts[j] - 1
        block[:, dst:dst + size] = block[:, cuts[j] + 1:cuts[j + 1]]
        dst += size


class WaitingQueue:
    """The requests waiting for a prefill, first in first out, with the arrival
    and TTFT SLO (seconds) of the latency-critical ones among them kept as
    columns in queue order: the controller reads those before every decode
    step, so they are kept up to date per request queued or admitted, not
    gathered from the whole queue per step."""

    def __init__(self, capacity: int = 256) -> None:
        self._q: deque[tuple[object, bool]] = deque()  # (request, latency-critical)
        self._cols = np.empty((2, capacity))  # arrival, TTFT SLO; live in [_head, _tail)
        self._head = self._tail = 0
        self.version = 0  # changes whenever the queue does

    def __len__(self) -> int:
        return len(self._q)

    def __bool__(self) -> bool:
        return bool(self._q)

    def __iter__(self) -> Iterator:
        return map(itemgetter(0), self._q)

    def append(self, r, critical: bool, arrival: float, ttft: float) -> None:
        """Queue `r` last; `critical`: it is latency-critical (its `arrival` and
        `ttft`, seconds, then budget the decode steps while it waits)."""
        self._q.append((r, critical))
        self.version += 1
        if not critical:
            return
        if self._tail == self._cols.shape[1]:
            # A new block, never an in-place move: columns handed out stay valid.
            live = self._cols[:, self._head:self._tail]
            cols = np.empty((2, max(2 * live.shape[1], 256)))
            cols[:, :live.shape[1]] = live
            self._cols, self._head, self._tail = cols, 0, live.shape[1]
        self._cols[:, self._tail] = (arrival, ttft)
        self._tail += 1

    def popleft(self):
        r, critical = self._q.popleft()
        self.version += 1
        if critical:
            self._head += 1
        return r

    def critical(self) -> tuple[np.ndarray, np.ndarray]:
        """Arrival and TTFT SLO (seconds) of the waiting latency-critical requests,
        in queue order (read-only views)."""
        cols = self._cols[:, self._head:self._tail]
        return cols[0], cols[1]
