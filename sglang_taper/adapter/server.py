"""HTTP-server-side hooks: validate TAPER metadata (HTTP 400 on bad input), tag
`n>1` requests as a branch group, and serve `/taper/stats`."""

from __future__ import annotations

import logging
import uuid

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_taper.meta import parse_meta, with_meta

logger = logging.getLogger("sglang_taper")

_TM = "sglang.srt.managers.tokenizer_manager.TokenizerManager"


def _after_verify(result, sampling_params, *args, **kwargs):
    # A ValueError here reaches the client as HTTP 400 with this message.
    parse_meta(sampling_params.custom_params)
    return result


def _tag_parallel_sampling(obj) -> None:
    """Give each prompt of an n>1 request its own branch group. The n samples
    share one sampling-params dict per prompt (the tokenizer manager copies the
    request, not the dict), so the scheduler sees n members of one group and
    numbers them as they arrive."""
    n = getattr(obj, "parallel_sample_num", 1)
    if n <= 1 or obj.sampling_params is None:
        return
    params = obj.sampling_params
    count = obj.batch_size
    items = list(params) if isinstance(params, list) else [params] * count
    for i in range(count):
        sp = items[i]
        custom = sp.get("custom_params")
        if custom is not None and not isinstance(custom, dict):
            continue  # a scalar or list: nowhere to put the tag
        if isinstance(custom, dict) and "taper_group" in custom:
            continue  # the client grouped it already
        items[i] = {**sp, "custom_params": with_meta(custom, group=f"n-{uuid.uuid4().hex}",
                                                     width=n)}
    obj.sampling_params = items


def _around_batch_request(original, manager, obj, *args, **kwargs):
    try:
        _tag_parallel_sampling(obj)
    except Exception:  # tagging is best effort; never fail the request for it
        logger.exception("TAPER: could not tag an n>1 request")
    return original(manager, obj, *args, **kwargs)


async def _stats_endpoint(history: int = 0):
    from fastapi.responses import JSONResponse
    from sglang.srt.entrypoints.http_server import _global_state

    states = await _global_state.tokenizer_manager.get_internal_state()
    ranks = []
    for s in states:
        t = dict(s.get("taper") or {})
        if not history:
            t.pop("history", None)
        ranks.append(t)
    return JSONResponse(ranks[0] if len(ranks) == 1 else {"dp_ranks": ranks})


def _after_tokenizer_init(result, manager, *args, **kwargs):
    from sglang.srt.entrypoints.http_server import app

    if not any(getattr(r, "path", None) == "/taper/stats" for r in app.routes):
        app.add_api_route("/taper/stats", _stats_endpoint, methods=["GET"])
    return result


def install() -> None:
    HookRegistry.register("sglang.srt.sampling.sampling_params.SamplingParams.verify",
                          _after_verify, HookType.AFTER)
    HookRegistry.register(f"{_TM}._handle_batch_request", _around_batch_request,
                          HookType.AROUND)
    HookRegistry.register(f"{_TM}.__init__", _after_tokenizer_init, HookType.AFTER)
