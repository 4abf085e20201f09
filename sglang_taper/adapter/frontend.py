"""`TaperEndpoint`: a `RuntimeEndpoint` for SGLang programs that tags every
`fork` branch with its group, index and width, and every request with the
program's SLO, so an unmodified `@sgl.function` is regulated just by choosing
this backend.

    backend = TaperEndpoint("http://127.0.0.1:30000", ttft=1.0, tpot=0.05)
    state = my_program.run(..., backend=backend)

Serial stages (the program's own generations before a fork and after a join)
are ordinary, latency-critical requests; branch generations are branch work.
Nested forks form their own groups, with `taper_parent` naming the outer one.
"""

from __future__ import annotations

import threading
import uuid

from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.interpreter import StreamExecutor
from sglang.utils import http_request

from sglang_taper.meta import with_meta

_ATTR = "_taper_branch"  # (group, index, width, parent group) on a forked StreamExecutor
_patch_lock = threading.Lock()
_patched = False


def _patch_fork() -> None:
    """Wrap StreamExecutor.fork once so forked executors remember their group.

    fork(k > 1) starts a group of k branches (nested in the forking branch's
    group, if any). fork(1), which is also what `ProgramState.copy()` does, starts
    no group: the copy continues the work of the executor it copies, so it keeps
    that executor's tag (a branch stays the same branch; serial work stays serial)."""
    global _patched
    with _patch_lock:
        if _patched:
            return
        original = StreamExecutor.fork

        def fork(self, size: int = 1, position_ids_offset=None):
            exes = original(self, size, position_ids_offset)
            if not isinstance(self.backend, TaperEndpoint):
                return exes
            tag = getattr(self, _ATTR, None)
            if len(exes) == 1:
                if tag is not None:
                    setattr(exes[0], _ATTR, tag)
                return exes
            group = f"f-{uuid.uuid4().hex}"
            for i, exe in enumerate(exes):
                setattr(exe, _ATTR, (group, i, len(exes), tag[0] if tag else None))
            return exes

        fork.__wrapped__ = original
        StreamExecutor.fork = fork
        _patched = True


def _greedy(sp: dict) -> None:
    """Make a request that samples nothing greedy. SGLang ANDs `is_all_greedy`
    when a batch merges in and never recomputes it when the request leaves, so
    one default-temperature warm-up sends the whole running batch down the
    sampling path (softmax, then log of it for logprobs) until it empties."""
    sp.setdefault("temperature", 0.0)


class TaperEndpoint(RuntimeEndpoint):
    """A RuntimeEndpoint whose requests carry TAPER branch metadata.

    ttft, tpot: the program's SLOs in seconds, sent with every request
    (None: the server's defaults). critical_branches: mark branch requests
    latency-critical too (rarely wanted: it turns branches into serial work).
    """

    def __init__(self, *args, ttft: float | None = None, tpot: float | None = None,
                 critical_branches: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ttft, self.tpot = ttft, tpot
        self.critical_branches = critical_branches
        _patch_fork()

    def cache_prefix(self, prefix_str: str) -> None:
        sp = {"max_new_tokens": 0}
        _greedy(sp)
        res = http_request(self.base_url + "/generate",
                           json={"text": prefix_str, "sampling_params": sp},
                           api_key=self.api_key, verify=self.verify)
        self._assert_success(res)

    def _add_images(self, s, data) -> None:
        # The one call every generation path makes with the executor and the
        # request body in hand, right before the POST.
        super()._add_images(s, data)
        sp = data.get("sampling_params")
        if not isinstance(sp, dict):
            return
        if sp.get("max_new_tokens") == 0:  # prefix caching / scoring, not a generation
            _greedy(sp)
            return
        branch = getattr(s, _ATTR, None)
        fields = {"ttft": self.ttft, "tpot": self.tpot}
        if branch is not None:
            group, index, width, parent = branch
            fields.update(group=group, branch=index, width=width, parent=parent,
                          critical=True if self.critical_branches else None)
        custom = sp.get("custom_params")
        if custom is not None and not isinstance(custom, dict):
            return
        sp["custom_params"] = with_meta(custom, **fields)
