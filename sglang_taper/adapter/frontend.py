"""`TaperEndpoint`: a `RuntimeEndpoint` for SGLang programs that tags every
`fork` branch with its group, index and width, and every request with the
program's SLO, so an unmodified `@sgl.function` is regulated just by choosing
this backend.

    backend = TaperEndpoint("http://127.0.0.1:30000", ttft=1.0, tpot=0.05)
    state = my_program.run(..., backend=backend)

Serial stages (the program's own generations before a fork and after a join)
are ordinary, latency-critical requests; branch generations are branch work.
Nested forks form their own groups, with `taper_parent` naming the outer one.

Every request of one program run (all its stages, every branch of every fork,
nested ones too) carries the run's id in the routing-key header, so that
SGLang's router (`taper router`, policy manual) keeps the whole program on one
worker. A single server ignores the header.
"""

from __future__ import annotations

import json
import ssl
import threading
import urllib.error
import urllib.request
import uuid

import requests
from sglang.lang.backend import runtime_endpoint
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.interpreter import StreamExecutor
from sglang.utils import HttpResponse

from sglang_taper.meta import as_label, with_meta
from sglang_taper.router import ROUTING_KEY_HEADER

_ATTR = "_taper_branch"  # (group, index, width, parent group) on a forked StreamExecutor
_PROGRAM = "_taper_program"  # the program run's id, on its root executor and every fork
_patch_lock = threading.Lock()
_patched = False
# The routing key of the next request this thread sends: set by TaperEndpoint
# right before RuntimeEndpoint's POST (each executor runs in its own thread),
# taken by that POST.
_next_key = threading.local()


def program_key(s: StreamExecutor) -> str:
    """The id of the program run `s` belongs to: its root executor's session id,
    which every fork (nested ones, fork(1), copy()) inherits."""
    key = getattr(s, _PROGRAM, None)
    if key is None:
        key = f"prog-{s.sid}"
        setattr(s, _PROGRAM, key)
    return key


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
            key = program_key(self)
            for exe in exes:
                setattr(exe, _PROGRAM, key)
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
        plain = runtime_endpoint.http_request

        def keyed_http_request(url, json=None, stream=False, api_key=None, verify=None,
                               method=None):
            key = getattr(_next_key, "key", None)
            if key is None:
                return plain(url, json=json, stream=stream, api_key=api_key, verify=verify,
                             method=method)
            _next_key.key = None
            return _http_request(url, json, stream, api_key, verify, method,
                                 {ROUTING_KEY_HEADER: key})

        keyed_http_request.__wrapped__ = plain
        runtime_endpoint.http_request = keyed_http_request
        _patched = True


def _http_request(url, body, stream, api_key, verify, method, extra: dict[str, str]):
    """sglang.utils.http_request (which RuntimeEndpoint calls for every request)
    with extra headers, which it has no parameter for."""
    headers = {"Content-Type": "application/json; charset=utf-8", **extra}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    if stream:
        return requests.post(url, json=body, stream=True, headers=headers)
    req = urllib.request.Request(url, headers=headers, method=method)
    data = None if body is None else json.dumps(body).encode("utf-8")
    context = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else None
    try:
        return HttpResponse(urllib.request.urlopen(req, data=data, context=context))
    except urllib.error.HTTPError as e:
        return HttpResponse(e)


class TaperEndpoint(RuntimeEndpoint):
    """A RuntimeEndpoint whose requests carry TAPER branch metadata.

    ttft, tpot: the program's SLOs in seconds, sent with every request
    (None: the server's defaults). critical_branches: mark branch requests
    latency-critical too (rarely wanted: it turns branches into serial work).
    routing_key: send the program run's id in the routing-key header.
    """

    routing_key = True

    def __init__(self, *args, ttft: float | None = None, tpot: float | None = None,
                 critical_branches: bool = False, routing_key: bool = True,
                 **kwargs) -> None:
        _patch_fork()  # before RuntimeEndpoint's first request
        super().__init__(*args, **kwargs)
        self.ttft, self.tpot = ttft, tpot
        self.critical_branches = critical_branches
        self.routing_key = routing_key

    def _add_images(self, s, data) -> None:
        # The one call every generation path makes with the executor and the
        # request body in hand, right before the POST.
        super()._add_images(s, data)
        if self.routing_key and isinstance(s, StreamExecutor):
            _next_key.key = program_key(s)
        sp = data.get("sampling_params")
        if not isinstance(sp, dict):
            return
        # Every request names its program run: DP ranks and router workers keep a
        # program (its prefix commits too) in one place.
        fields = {"program": program_key(s) if isinstance(s, StreamExecutor) else None}
        # A warm-up (max_new_tokens 0: prefix caching, scoring) is not a generation:
        # no SLO, no branch. Its sampling params are left as they are: the server
        # recomputes a batch's greedy flag when it leaves (adapter/greedy.py).
        if sp.get("max_new_tokens") != 0:
            fields.update(ttft=self.ttft, tpot=self.tpot)
            branch = getattr(s, _ATTR, None)
            if branch is not None:
                group, index, width, parent = branch
                fields.update(group=group, branch=index, width=width, parent=parent,
                              critical=True if self.critical_branches else None)
        custom = sp.get("custom_params")
        if (custom is not None and not isinstance(custom, dict)
                or all(v is None for v in fields.values())):
            return
        sp["custom_params"] = with_meta(custom, **fields)
        # SGLang's router drops custom_params on /generate but keeps custom_labels.
        label = as_label(sp["custom_params"])
        if label is not None:
            data["custom_labels"] = {**(data.get("custom_labels") or {}), **label}
