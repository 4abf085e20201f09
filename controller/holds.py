"""Runs of holds: how many observed steps in a row each branch has been held,
for the policies that promote a branch held `max_hold_steps` in a row.

The runs are kept per position of the last observed decision's view, as one
array. While the next view shows the same ids (the same list or array object,
equal to a copy taken when it was recorded: an engine that rebuilds its ids
only when the batch's membership changes, as the simulator does), positions
are the same sequences and a step costs a few array operations. Otherwise the
held sequences are matched by id: through a table indexed by id when the ids
are integers in a numpy array spread over fewer than ID_LIMIT (the simulator's
request numbers, the SGLang adapter's), sized by the span of the ids in use,
else one dict lookup per held sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

import numpy as np

NOT_HELD = np.iinfo(np.int64).max  # `since` of a sequence the last step ran
ID_LIMIT = 1 << 20  # integer ids spread over fewer go through the id table (16 bytes an id)
_NONE = np.zeros(0, dtype=np.int64)


class HoldRuns:
    """The observed step each held sequence's current run of holds began."""

    def __init__(self, max_hold_steps: int) -> None:
        self.max_hold_steps = max_hold_steps
        self.steps = 0  # steps recorded
        self._ids: Sequence = ()  # the last recorded decision's ids (the object)
        self._snap: list | np.ndarray | None = None  # a copy of them: a list's or an array's
        self._snap_bytes = b""  # an array's copy, as bytes
        self._since = np.zeros(0, dtype=np.int64)  # per position of _ids, or NOT_HELD
        self._held_ids: list | None = []  # the held ids, in position order, when listed
        self._starved: np.ndarray | None = None  # per position: held max_hold_steps or more
        self._first = 0  # at the last record, held since this step or earlier: starved
        # The id table: `since` by id as of the last record, for the ids [_base, _base +
        # its length), valid where `_stamp` holds the number of the flush that wrote it
        # (an id seen before but not in the last record's view is not held, as the dict
        # by id forgets it). Only the last record's entries are ever valid, so ids out of
        # its range get a fresh table around the ids in use, the last record written in
        # again: its size follows their span, not the largest id ever seen.
        self._table_ok = False  # the recorded ids can index the table
        self._snap_span = (0, 0)  # their smallest id and largest + 1
        self._base = 0
        self._table = np.zeros(0, dtype=np.int64)
        self._stamp = np.zeros(0, dtype=np.int64)
        self._flushes = 0
        self._flushed = True  # the last record is in the table

    def _same(self, ids: Sequence) -> bool:
        """`ids` is the recorded object, unchanged since."""
        if ids is not self._ids or self._snap is None:
            return False
        if isinstance(ids, np.ndarray):
            return ids.tobytes() == self._snap_bytes
        return ids == self._snap

    def record(self, ids: Sequence, keep: np.ndarray, held: np.ndarray) -> None:
        """One observed step, whose decision ran the positions `keep` and held the
        positions `held` (both ascending) of its view's `ids`."""
        step = self.steps
        self.steps += 1
        span = None
        if self._same(ids):
            since = self._since  # per position still: a held one's run goes on
            self._held_ids = None
        elif (span := _span(ids)) is not None and self._table_ok:
            since = self._carried(ids, span)
            self._held_ids = None
        else:
            by_id = self.by_id()
            listed = [ids[i] for i in held.tolist()]
            since = np.full(len(ids), NOT_HELD, dtype=np.int64)
            since[held] = np.fromiter(map(by_id.get, listed, repeat(NOT_HELD)), np.int64,
                                      len(listed))
            self._held_ids = listed
        if since is not self._since:
            self._ids, self._table_ok, self._snap_span = ids, span is not None, span
            self._snap = (ids.copy() if isinstance(ids, np.ndarray) or type(ids) is list
                          else None)
            if isinstance(ids, np.ndarray):
                self._snap_bytes = self._snap.tobytes()
        np.minimum(since, step, out=since)  # held now, not before: the run starts now
        if len(since):  # (a passthrough decision runs a batch it shows no ids of)
            since[keep] = NOT_HELD
        self._since, self._flushed = since, False
        self._first = first = step - self.max_hold_steps + 1
        starved = len(since) and np.minimum.reduce(since) <= first
        self._starved = since <= first if starved else None

    def record_unseen(self, steps: int) -> None:
        """`steps` observed steps in a row that ran a batch without showing its
        ids (passthrough decisions: nothing held), as many `record` calls would
        take them: every run of holds ends."""
        if steps <= 0:
            return
        if not (type(self._ids) is tuple and not self._ids):  # not after a passthrough
            self.record((), _NONE, _NONE)
            steps -= 1
        self.steps += steps
        self._first = self.steps - self.max_hold_steps

    def _carried(self, ids: np.ndarray, span: tuple[int, int]) -> np.ndarray:
        """`since` as of the last record for each of `ids` (integers in `span`, see
        `_span`), NOT_HELD for those it did not hold, through the id table."""
        spans = [sp for sp in (span, self._snap_span) if sp[1] > sp[0]]
        if not spans:  # no ids now, none recorded
            return np.full(len(ids), NOT_HELD, dtype=np.int64)
        lo, hi = min(sp[0] for sp in spans), max(sp[1] for sp in spans)
        base = self._base
        if lo < base or hi > base + len(self._table):
            # a fresh table around the ids in use (room to grow upwards, as new
            # requests' ids do); the last record is written in again below
            size = max(64, 2 * (hi - lo))
            self._base = base = lo
            self._table = np.zeros(size, dtype=np.int64)
            self._stamp = np.zeros(size, dtype=np.int64)
            self._flushed = False
        if not self._flushed:  # write the last record in
            snap = self._snap - base
            self._flushes += 1
            self._table[snap] = self._since
            self._stamp[snap] = self._flushes
            self._flushed = True
        at = ids - base
        return np.where(self._stamp[at] == self._flushes, self._table[at], NOT_HELD)

    def _names(self, positions: np.ndarray) -> list | np.ndarray:
        """The recorded ids at `positions` (held ones, ascending)."""
        if self._held_ids is not None:
            held = (self._since != NOT_HELD).nonzero()[0]
            listed = self._held_ids
            return [listed[k] for k in np.searchsorted(held, positions).tolist()]
        if isinstance(self._snap, np.ndarray):
            return self._snap[positions]
        return [self._snap[i] for i in positions.tolist()]

    def by_id(self) -> dict:
        """Held id -> the observed step its run of holds began."""
        held = (self._since != NOT_HELD).nonzero()[0]
        names = self._names(held)
        if isinstance(names, np.ndarray):
            names = names.tolist()
        return dict(zip(names, self._since[held].tolist()))

    def starved(self, ids: Sequence) -> np.ndarray | None:
        """A mask over `ids` of the sequences held `max_hold_steps` observed steps
        in a row or more, or None when there are none."""
        if self._starved is None:
            return None
        if self._same(ids):
            return self._starved
        if self._table_ok and (span := _span(ids)) is not None:
            return self._carried(ids, span) <= self._first
        names = self._names(self._starved.nonzero()[0])
        names = set(names.tolist() if isinstance(names, np.ndarray) else names)
        return np.fromiter((s in names for s in ids), bool, len(ids))

    def held_steps(self, sid) -> int:
        """Consecutive observed steps `sid` has been held, as of the last one."""
        since = self.by_id().get(sid)
        return 0 if since is None else self.steps - since


def _span(ids: Sequence) -> tuple[int, int] | None:
    """The smallest of `ids` and their largest + 1, or None if they cannot index the
    id table: not a numpy array of integers, or spread over ID_LIMIT or more."""
    if not (isinstance(ids, np.ndarray) and ids.dtype.kind in "iu"):
        return None
    if not len(ids):
        return (0, 0)
    lo, top = int(np.minimum.reduce(ids)), int(np.maximum.reduce(ids))
    return (lo, top + 1) if top - lo < ID_LIMIT else None
