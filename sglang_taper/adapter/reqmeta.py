"""What TAPER knows of each SGLang request (`req._taper`), and the live view.

A request's metadata is parsed once, when the scheduler creates its `Req`;
before each decode step the view is stacked from the running requests' rows
into the two column blocks that `controller.view.view_from_columns` names, the
same builder the simulator uses. `LiveViews` keeps the blocks' fixed rows while
the batch holds the same requests (the usual step: a batch changes only when a
request joins or leaves it), so such a step reads only each request's output
length and whether it is pinned.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from dataclasses import dataclass

import numpy as np

from controller.config import TaperConfig
from controller.view import FIRST, NO_GROUP, PrefillView, StepView, view_from_columns
from sglang_taper.meta import BranchMeta, parse_meta

logger = logging.getLogger("sglang_taper")

MAX_GROUPS = 65536  # group codes kept before the codes of finished groups are dropped


@dataclass(slots=True)
class ReqMeta:
    """TAPER's per-request state, attached to a `Req` as `req._taper`."""

    group: str | None  # group name, None if ordinary
    code: int  # group code (creation order), NO_GROUP if ordinary
    branch: int  # branch index within the group
    width: int  # branches the group was created with
    ttft: float  # seconds, TTFT SLO
    tpot: float  # seconds per token, TPOT SLO
    arrival: float  # seconds (monotonic), when the scheduler created the request
    critical: bool  # latency-critical (ordinary request or serial stage)
    prompt: int  # prompt tokens
    max_new: int  # the request's max_new_tokens (0: unknown)
    uid: int  # this scheduler's number for the request (the view's id): unique among its live
    first: float = math.nan  # seconds, when its first token was seen; NaN before
    shared: int = 0  # prompt tokens that came from the radix cache (its group's prefix)

    def stamp_first_token(self, req, now: float) -> None:
        """Once the request has its first token: record when, and how much of its
        prompt came from the radix cache (the prefix it shares with its group)."""
        if self.first != self.first and req.output_ids:  # NaN: not stamped yet
            self.first = now
            self.shared = min(req.cached_tokens, self.prompt)


class GroupCodes:
    """Group names -> codes in order of creation (policies favour older groups),
    and how many members of each group were numbered so far."""

    def __init__(self) -> None:
        self._codes: dict[str, int] = {}
        self.names: dict[int, str] = {}  # code -> group name
        self._members: dict[str, int] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._codes)

    def code(self, name: str) -> int:
        code = self._codes.get(name)
        if code is None:
            code = self._codes[name] = self._next
            self.names[code] = name
            self._next += 1
        return code

    def next_member(self, name: str) -> int:
        """The branch index of the group's next member numbered by arrival."""
        n = self._members.get(name, 0)
        self._members[name] = n + 1
        return n

    def prune(self, live: set[str]) -> int:
        """Forget the groups not in `live` (the names some request still carries);
        a live group keeps its code and its member count. Returns how many went."""
        gone = [name for name in self._codes if name not in live]
        for name in gone:
            del self.names[self._codes.pop(name)]
            self._members.pop(name, None)
        return len(gone)


def parse_request(req, config: TaperConfig, groups: GroupCodes, uid: int) -> ReqMeta:
    """The metadata of a new request (ordinary when it carries bad metadata: the
    HTTP server already answered such input with a 400, this is a second line);
    `uid`: the scheduler's number for it."""
    try:
        meta = parse_meta(req.sampling_params.custom_params)
    except ValueError as e:
        logger.warning("TAPER: request %s has bad metadata, served as ordinary: %s", req.rid, e)
        meta = None
    max_new = req.sampling_params.max_new_tokens or 0
    if meta is not None and req.sampling_params.max_new_tokens == 0:
        meta = None  # a prefix warm-up (n>1 or frontend commit), not a branch
    meta = meta or BranchMeta()
    code, branch = NO_GROUP, 0
    if meta.group is not None:
        code = groups.code(meta.group)
        n = groups.next_member(meta.group)
        branch = meta.branch if meta.branch is not None else n
    critical = meta.critical if meta.critical is not None else meta.group is None
    return ReqMeta(
        group=meta.group, code=code, branch=branch, width=meta.width,
        ttft=meta.ttft or config.default_ttft_slo, tpot=meta.tpot or config.default_tpot_slo,
        arrival=time.monotonic(), critical=bool(critical), prompt=len(req.origin_input_ids),
        max_new=max_new, uid=uid)


class LiveViews:
    """Builds the controller's view of a decode batch (the simulator's builder,
    `view_from_columns`), keeping the last view's fixed rows (every row but the
    output length) with its requests, which it holds, so that no id is reused
    meanwhile.

    A batch of the same requests reuses the blocks whole: the view is the same
    arrays in the same order (its ids, the requests' `uid`s, the same int64
    array), which the controller reads fastest (its make-up and its hold
    bookkeeping are kept while they stay: controller/composition.py,
    controller/holds.py). A split changes the batch's order (SGLang merges a
    held part back at the end): `reorder` records where each view row will be,
    and `to_batch` maps a decision's view indices to the batch's. With
    `canonical` off (tensor parallelism, where every rank must apply rank 0's
    indices to its own batch) the blocks are permuted instead, so that the
    view's order is always the batch's. A batch whose requests changed (one
    joined or left) is stacked in its own order, gathering the columns of the
    requests it shares with the last view and stacking rows only for the
    others, after `metas(reqs, now)` has attached and stamped them. A row is
    kept only once its request has had its first token (the stamp is fixed)."""

    def __init__(self, canonical: bool = True) -> None:
        self.canonical = canonical
        self.clear()
        self.reset_counts()

    def clear(self) -> None:
        """Forget the last view (and let go of its requests): the next is stacked."""
        self._reqs: list = []  # the requests in view order
        self._blocks: tuple | None = None  # (ids, ints, floats) of _reqs
        self._stamped = False  # every row of the blocks has its first-token stamp
        self._pos: dict | None = None  # id(req) -> its column, stamped rows only
        self._batch: list = []  # the requests in the order the next batch has them
        self._to_batch: np.ndarray | None = None  # view row -> batch row; None: the same

    def reset_counts(self) -> None:
        self.reused = 0  # views that reused the blocks whole
        self.gathered = 0  # views that gathered some columns
        self.stacked = 0  # views stacked afresh

    def counts(self) -> dict[str, int]:
        """How the views were built: fixed rows reused whole, gathered, stacked."""
        return {"reused": self.reused, "gathered": self.gathered, "stacked": self.stacked}

    def build(self, reqs: list, metas, now: float, waiting: int,
              queued: PrefillView | None) -> StepView:
        """The view of the batch `reqs` (in the batch's order); its rows may be in
        another order (`to_batch`)."""
        n = len(reqs)
        last = self._batch
        if self._stamped and len(last) == n and all(map(operator.is_, reqs, last)):
            ids, ints, floats = self._blocks
            self.reused += 1
        else:
            ids, ints, floats = self._restack(reqs, metas, now)
        rows = self._reqs
        generated = np.fromiter((len(r.output_ids) for r in rows), np.int64, n)
        pinned = np.fromiter(
            (r.to_finish is not None or r.grammar is not None or r.beam_group is not None
             for r in rows), bool, n)
        return view_from_columns(ids, ints, floats, now, waiting=waiting, queued=queued,
                                 pinned=pinned, generated=generated)

    @property
    def holding(self) -> bool:
        """Whether the last view's requests are still referenced here."""
        return bool(self._reqs)

    def to_batch(self, rows: np.ndarray) -> np.ndarray:
        """The batch's indices (ascending) of the last view's `rows`."""
        return rows if self._to_batch is None else np.sort(self._to_batch[rows])

    def reorder(self, keep: np.ndarray, held: np.ndarray) -> None:
        """The last batch was split into its rows `keep` and `held` (batch indices,
        each ascending) and will come back as the kept part with the held part
        merged back at its end."""
        batch = self._batch
        if not (self._blocks is not None and len(keep) + len(held) == len(batch)
                and len(keep) and len(held) and keep[-1] > held[0]):
            return  # the order does not change
        order = np.concatenate([keep, held])
        self._batch = [batch[i] for i in order.tolist()]
        if self.canonical:
            where = np.empty(len(order), dtype=np.int64)
            where[order] = np.arange(len(order))
            self._to_batch = where if self._to_batch is None else where[self._to_batch]
        else:
            ids, ints, floats = self._blocks
            self._reqs = self._batch
            self._blocks, self._pos = (ids[order], ints[:, order], floats[:, order]), None

    def _restack(self, reqs: list, metas, now: float) -> tuple:
        n = len(reqs)
        cols = None
        if self._blocks is not None:
            if self._pos is None:
                stamped = ~np.isnan(self._blocks[2][FIRST])
                self._pos = {id(r): i for i, r in enumerate(self._reqs) if stamped[i]}
            pos = self._pos
            cols = np.fromiter((pos.get(id(r), -1) for r in reqs), np.int64, n)
            new = (cols < 0).nonzero()[0]
            if len(new) == n:
                cols = None
        if cols is None:
            ids, ints, floats = _rows(metas(reqs, now))
            self.stacked += 1
        else:
            old_ids, old_ints, old_floats = self._blocks
            ids, ints, floats = old_ids[cols], old_ints[:, cols], old_floats[:, cols]
            if len(new):
                ids[new], ints[:, new], floats[:, new] = _rows(
                    metas([reqs[i] for i in new.tolist()], now))
            self.gathered += 1
        self._reqs = self._batch = list(reqs)
        self._blocks, self._pos, self._to_batch = (ids, ints, floats), None, None
        self._stamped = not np.isnan(floats[FIRST]).any()
        return ids, ints, floats


def _rows(ms: list[ReqMeta]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ids and the fixed rows of the two blocks (GENERATED left 0) of `ms`."""
    n = len(ms)
    ids = np.fromiter((m.uid for m in ms), np.int64, n)
    # row-major, as the view reads them (gathers and permutations of them stay so)
    ints = np.ascontiguousarray(np.array(
        [(m.code, m.branch, m.width, m.shared, 0, m.max_new, m.prompt, m.critical) for m in ms],
        dtype=np.int64).reshape(n, -1).T)
    floats = np.ascontiguousarray(np.array(
        [(m.ttft, m.tpot, m.arrival, m.first) for m in ms], dtype=np.float64).reshape(n, -1).T)
    return ids, ints, floats
