"""Run-time control: `GET /taper/config` reads the schedulers' live
`TaperConfig`, `POST /taper/config` changes fields of it.

The HTTP server lives in the tokenizer-manager process; the controller runs in
each scheduler process. A change travels the way SGLang's own control requests
(`/get_internal_state`, `/set_internal_state`) do: the tokenizer manager sends
one `TaperConfigReq` (a msgspec struct registered with SGLang's IPC codec),
the data-parallel controller, when there is one, passes it to every DP rank
(its fallback for control messages), TP rank 0 of each rank broadcasts it to
the other TP ranks with its other input, and every scheduler answers with a
`TaperConfigReqOutput` (only TP rank 0's answer is sent), which a fan-out
communicator collects, one per DP rank. A scheduler handles it while it takes
in new requests at the start of a scheduling pass: after the held branches
rejoined the running batch and before the next decision, never during a step.

Every scheduler validates the change against its own config
(`TaperConfig.merged`, the same checks and one-line messages as `taper serve`)
and applies all of it or none. Errors: 400 with `{"error": message}` for bad
input (every rank refused it), 503 when TAPER is not running in a scheduler,
500 when the ranks disagree (which would be a bug).

Auth: POST is an admin action, as SGLang's `/set_internal_state`
(`AuthLevel.ADMIN_OPTIONAL`): with `--admin-api-key` it needs that key, else
with `--api-key` that one, else none. GET is an ordinary endpoint (like
`/server_info` and `/taper/stats`): `--api-key` when set.

`POST /taper/stats/reset` (same auth as POST /taper/config) travels the same
way and restarts `/taper/stats`' counters at zero on every scheduler.
`POST /taper/rearm` (same auth) turns regulation back on after a fault left it
degraded (SchedulerRuntime.rearm), on every scheduler; it answers the config
and `rearmed`: whether any scheduler was degraded. `POST /taper/fault` with
{"fault": "POINT[@N]"} injects a fault from now on, for testing the fail-safe,
and only on a server launched with TAPER_INJECT_FAULT (`later`: none at launch).
"""

from __future__ import annotations

import json
import logging
from functools import partial

from fastapi import Request
from sglang.srt.managers.io_struct import BaseReq, hook_custom_types
from sglang.srt.plugins.hook_registry import HookRegistry, HookType
from sglang.srt.utils.auth import AuthLevel, auth_level

logger = logging.getLogger("sglang_taper")

PATH = "/taper/config"
RESET_PATH = "/taper/stats/reset"
REARM_PATH = "/taper/rearm"
FAULT_PATH = "/taper/fault"


class TaperConfigReq(BaseReq, kw_only=True):
    """To every scheduler: read TAPER's config, or change it."""

    changes: str | None = None  # a JSON object of TaperConfig fields; None: only read
    reset_stats: bool = False  # restart /taper/stats' counters (POST /taper/stats/reset)
    rearm: bool = False  # regulate again after a fault (POST /taper/rearm)
    fault: str | None = None  # POINT[@N] to inject from now on (POST /taper/fault)


class TaperConfigReqOutput(BaseReq, kw_only=True):
    """A scheduler's answer."""

    config: str | None = None  # its TaperConfig after the request (JSON); None: TAPER is off
    error: str | None = None  # why it refused the change (one line); None: applied
    rearmed: bool = False  # it was degraded and regulates again
    dp_rank: int | None = None


# ------------------------------------------------------------------ scheduler side


def _answer(scheduler, req: TaperConfigReq) -> TaperConfigReqOutput:
    from sglang.srt.runtime_context import get_parallel

    rt = getattr(scheduler, "_taper", None)
    rank = get_parallel().dp_rank
    if rt is None:
        return TaperConfigReqOutput(error="TAPER is not running in this scheduler",
                                    dp_rank=rank)
    error = None
    if req.changes is not None:
        try:
            rt.reconfigure(json.loads(req.changes))
        except ValueError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 (a control request never takes SGLang down)
            logger.exception("TAPER: could not apply a config change")
            error = f"{type(e).__name__}: {e}"
    rearmed = False
    for wanted, act in ((req.rearm, rt.rearm),
                        (req.fault is not None, lambda: rt.inject(req.fault))):
        if wanted and error is None:
            try:
                rearmed = bool(act()) or rearmed
            except ValueError as e:
                error = str(e)
    if req.reset_stats and error is None:
        rt.reset_stats()
    return TaperConfigReqOutput(config=rt.config.to_json(), error=error, dp_rank=rank,
                                rearmed=rearmed)


def _after_scheduler_init(result, scheduler, *args, **kwargs):
    from sglang.utils import TypeBasedDispatcher

    scheduler._request_dispatcher += TypeBasedDispatcher(
        [(TaperConfigReq, partial(_answer, scheduler))])
    return result


# ------------------------------------------------------------------ HTTP side


def _reply(status: int, body: dict):
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status)


async def _ask(changes: str | None, reset_stats: bool = False, rearm: bool = False,
               fault: str | None = None):
    """Send one request to every scheduler and turn their answers into a response."""
    from sglang.srt.entrypoints.http_server import _global_state

    manager = _global_state.tokenizer_manager
    manager.auto_create_handle_loop()
    answers = await manager._taper_config_communicator(
        TaperConfigReq(changes=changes, reset_stats=reset_stats, rearm=rearm, fault=fault))
    answers = sorted(answers, key=lambda a: a.dp_rank or 0)
    ranks = [{"dp_rank": a.dp_rank, "error": a.error,
              "config": None if a.config is None else json.loads(a.config)} for a in answers]
    if any(a.config is None for a in answers):
        return _reply(503, {"error": "TAPER is not running in a scheduler", "dp_ranks": ranks})
    errors = {a.error for a in answers}
    configs = {a.config for a in answers}
    if len(errors) == 1 and None not in errors and len(configs) == 1:
        return _reply(400, {"error": errors.pop()})
    if errors != {None} or len(configs) != 1:
        return _reply(500, {"error": "the DP ranks disagree", "dp_ranks": ranks})
    body = json.loads(configs.pop())
    if rearm:
        body = {"rearmed": any(a.rearmed for a in answers), "config": body}
    return _reply(200, body)


async def get_config():
    """The live TaperConfig of the server's schedulers (every field)."""
    return await _ask(None)


@auth_level(AuthLevel.ADMIN_OPTIONAL)  # as /set_internal_state
async def post_config(request: Request):
    """Change fields of the live TaperConfig: a JSON object, e.g.
    {"policy": "cap:4", "margin": 0.2}. Answers the new config."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return _reply(400, {"error": "the body must be a JSON object of TaperConfig fields"})
    return await _ask(json.dumps(body))


@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def post_stats_reset(request: Request):
    """Restart /taper/stats' counters, histograms and self-timed overhead at zero
    on every scheduler (the predictor's fit and the config stay; Prometheus
    counters, which must never go back, keep counting). For comparing policies
    on one server: switch, reset, run. Answers the live config."""
    return await _ask(None, reset_stats=True)


@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def post_rearm(request: Request):
    """After a fault left TAPER degraded (every step whole), regulate again
    without a restart: a fresh controller on every scheduler, as at launch.
    Answers {"rearmed": whether any was degraded, "config": the live config}.
    Regulation that is off for another reason (unsupported by the server's
    settings, a broken TP group) stays off: 400 with the reason."""
    return await _ask(None, rearm=True)


@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def post_fault(request: Request):
    """Testing the fail-safe: {"fault": "POINT[@N]"} makes TAPER's scheduler code
    raise at POINT from its N-th call on, counted from now. Refused (400) unless
    the server was launched with TAPER_INJECT_FAULT (`later`: none at launch)."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    fault = body.get("fault") if isinstance(body, dict) else None
    if not isinstance(fault, str) or not fault:
        return _reply(400, {"error": 'the body must be {"fault": "POINT[@N]"}'})
    return await _ask(None, fault=fault)


def _after_tokenizer_init(result, manager, *args, **kwargs):
    from sglang.srt.entrypoints.http_server import app
    from sglang.srt.managers.communicator import FanOutCommunicator
    from sglang.srt.runtime_context import get_parallel
    from sglang.utils import TypeBasedDispatcher

    comm = FanOutCommunicator(manager._dispatch_to_scheduler, get_parallel().num_dp_ranks,
                              "queueing")
    manager._taper_config_communicator = comm
    manager._result_dispatcher += TypeBasedDispatcher(
        [(TaperConfigReqOutput, comm.handle_recv)])
    if not any(getattr(r, "path", None) == PATH for r in app.routes):
        app.add_api_route(PATH, get_config, methods=["GET"])
        app.add_api_route(PATH, post_config, methods=["POST"])
        app.add_api_route(RESET_PATH, post_stats_reset, methods=["POST"])
        app.add_api_route(REARM_PATH, post_rearm, methods=["POST"])
        app.add_api_route(FAULT_PATH, post_fault, methods=["POST"])
    return result


def install() -> None:
    # Every SGLang process that decodes IPC messages must know the two structs
    # (tokenizer manager, DP controller, schedulers); the plugin loads in each.
    hook_custom_types(TaperConfigReq, TaperConfigReqOutput)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.__init__",
                          _after_scheduler_init, HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.tokenizer_manager.TokenizerManager.__init__",
                          _after_tokenizer_init, HookType.AFTER)
