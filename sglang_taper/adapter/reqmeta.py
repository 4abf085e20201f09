"""What TAPER knows of each SGLang request (`req._taper`), and the live view.

A request's metadata is parsed once, when the scheduler creates its `Req`;
before each decode step the view is stacked from the running requests' rows
into the two column blocks that `controller.view.view_from_columns` names, the
same builder the simulator uses.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from controller.config import TaperConfig
from controller.view import NO_GROUP, PrefillView, StepView, view_from_columns
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


def parse_request(req, config: TaperConfig, groups: GroupCodes) -> ReqMeta:
    """The metadata of a new request (ordinary when it carries bad metadata: the
    HTTP server already answered such input with a 400, this is a second line)."""
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
        max_new=max_new)


class _Ids:
    """Request ids of a batch, read on demand (only held ones ever are)."""

    __slots__ = ("_reqs",)

    def __init__(self, reqs: list) -> None:
        self._reqs = reqs

    def __len__(self) -> int:
        return len(self._reqs)

    def __getitem__(self, i: int) -> str:
        return self._reqs[i].rid


def live_view(reqs: list, metas: list[ReqMeta], now: float, waiting: int,
              queued: PrefillView | None) -> StepView:
    """The controller's view of `reqs` (with their metadata `metas`, first-token
    stamps up to date), built by the simulator's builder."""
    n = len(reqs)
    ints = np.array([(m.code, m.branch, m.width, m.shared, len(r.output_ids), m.max_new,
                      m.prompt, m.critical) for r, m in zip(reqs, metas)],
                    dtype=np.int64).reshape(n, -1).T
    floats = np.array([(m.ttft, m.tpot, m.arrival, m.first) for m in metas],
                      dtype=np.float64).reshape(n, -1).T
    pinned = np.fromiter(
        (r.to_finish is not None or r.grammar is not None or r.beam_group is not None
         for r in reqs), bool, n)
    return view_from_columns(_Ids(reqs), ints, floats, now, waiting=waiting, queued=queued,
                             pinned=pinned)
