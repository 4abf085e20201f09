"""HTTP-server-side hooks: validate TAPER metadata (HTTP 400 on bad input), tag
`n>1` requests as a branch group, and serve `/taper/stats`."""

from __future__ import annotations

import logging
import uuid

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_taper.meta import LABEL, from_label, parse_meta, with_meta
from sglang_taper.stats import aggregate_ranks

logger = logging.getLogger("sglang_taper")

_TM = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
# Every generation path (/generate, /v1/completions, /v1/chat/completions,
# Engine.generate) builds a GenerateReqInput and normalizes it first thing in
# TokenizerManager.generate_request, before anything reads its sub-requests.
_NORMALIZE = "sglang.srt.managers.io_struct.GenerateReqInput.normalize_batch_and_arguments"


def _after_verify(result, sampling_params, *args, **kwargs):
    # A ValueError here reaches the client as HTTP 400 with this message.
    parse_meta(sampling_params.custom_params)
    return result


def _tag_parallel_sampling(obj) -> None:
    """Give each prompt of a normalized n>1 request its own branch group of width n.

    Runs right after `normalize_batch_and_arguments`: `sampling_params` is then a
    list of batch_size * n dicts, prompt-major in blocks (entry i + k * batch_size
    is prompt i), often one shared dict. The tokenizer manager sends, per prompt
    i, a warm-up (max_new_tokens 0, not a branch) and then n copies of the
    request built from `obj[i]`; the copies share one SamplingParams, so the
    scheduler numbers the members 0..n-1 as they arrive. Sub-requests already
    built by `obj[i]` (SGLang caches them in `_sub_obj_cache`) are retagged too.
    A prompt whose custom_params already name a taper_group keeps the client's
    grouping; one whose custom_params are invalid (not an object, or bad TAPER
    keys, which a group added here could make look valid) is left for `verify`
    to reject."""
    n = getattr(obj, "parallel_sample_num", 1)
    params = obj.sampling_params
    if n <= 1 or getattr(obj, "is_single", True) or not isinstance(params, list):
        return
    count = obj.batch_size
    for i in range(count):
        sp = params[i]
        custom = sp.get("custom_params")
        try:
            meta = parse_meta(custom)
        except ValueError:
            continue  # not an object, or bad TAPER keys: `verify` answers 400
        if meta is not None and meta.group is not None:
            continue
        tagged = {**sp, "custom_params": with_meta(custom, group=f"n-{uuid.uuid4().hex}",
                                                   width=n)}
        for j in range(i, len(params), count):
            params[j] = tagged
    for j, sub in obj.__dict__.get("_sub_obj_cache", {}).items():
        sub.sampling_params = params[j]


def _restore_labelled_meta(obj) -> None:
    """Move TAPER keys carried in `custom_labels` (what passes through SGLang's
    router, see meta.LABEL) into every prompt's `custom_params`; keys the request
    carries in custom_params itself win. Malformed: ValueError (HTTP 400)."""
    labels = getattr(obj, "custom_labels", None)
    if not isinstance(labels, dict) or LABEL not in labels:
        return
    labels = dict(labels)
    keys = from_label(labels.pop(LABEL))
    obj.custom_labels = labels or None  # not a metrics label
    params = obj.sampling_params
    if params is None:
        params = {}
    if isinstance(params, dict):
        obj.sampling_params = _with_keys(params, keys)
    elif isinstance(params, list):
        obj.sampling_params = [_with_keys(p, keys) if isinstance(p, dict) else p
                               for p in params]


def _with_keys(params: dict, keys: dict) -> dict:
    custom = params.get("custom_params")
    if custom is not None and not isinstance(custom, dict):
        return params  # not an object: `verify` answers 400
    return {**params, "custom_params": {**keys, **(custom or {})}}


def _before_normalize(obj, *args, **kwargs):
    _restore_labelled_meta(obj)  # a ValueError here is the client's HTTP 400
    return None


def _after_normalize(result, obj, *args, **kwargs):
    try:
        _tag_parallel_sampling(obj)
    except Exception:  # tagging is best effort; never fail the request for it
        logger.exception("TAPER: could not tag an n>1 request")
    return result


async def _stats_endpoint(history: int = 0, groups: int = 0):
    """TAPER's figures. With several DP ranks: summed over ranks, each rank's own
    under `dp_ranks`. `history=1`: the recent steps; `groups=1`: the recent branch
    groups and how many of their requests each rank took."""
    from fastapi.responses import JSONResponse
    from sglang.srt.entrypoints.http_server import _global_state

    states = await _global_state.tokenizer_manager.get_internal_state()
    ranks = []
    for s in states:
        t = dict(s.get("taper") or {})
        if not history:
            t.pop("history", None)
        ranks.append(t)
    out = ranks[0] if len(ranks) == 1 else aggregate_ranks(ranks)
    if not groups:
        out.pop("groups_seen", None)
        for t in ranks:
            t.pop("groups_seen", None)
    return JSONResponse(out)


def _after_tokenizer_init(result, manager, *args, **kwargs):
    from sglang.srt.entrypoints.http_server import app

    if not any(getattr(r, "path", None) == "/taper/stats" for r in app.routes):
        app.add_api_route("/taper/stats", _stats_endpoint, methods=["GET"])
    return result


def install() -> None:
    HookRegistry.register("sglang.srt.sampling.sampling_params.SamplingParams.verify",
                          _after_verify, HookType.AFTER)
    HookRegistry.register(_NORMALIZE, _before_normalize, HookType.BEFORE)
    HookRegistry.register(_NORMALIZE, _after_normalize, HookType.AFTER)
    HookRegistry.register(f"{_TM}.__init__", _after_tokenizer_init, HookType.AFTER)
