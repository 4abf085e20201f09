"""Group-affine data parallelism (`--dp-size N`): SGLang's DataParallelController
sends each request to one scheduler (DP rank). Stock, it round-robins, so a
fork's branches land on different ranks: each rank prefills the shared prefix
and sees a partial group it cannot regulate as a whole. Here a request that
names a program, group or parent group is sent to the rank its keys were placed
on (`sglang_taper.affinity`), a new one to the least-loaded rank, where load is
the ranks' own published figure (running + waiting requests; TAPER adds the
branches held out of the step, scheduler.after_get_loads). Requests with no
TAPER keys, health checks, requests a client already pinned with
`routed_dp_rank`, and every request under `follow_bootstrap_room` (PD
disaggregation pairs ranks by it) are left to SGLang's method.
"""

from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_taper.affinity import Placement, keys_of

logger = logging.getLogger("sglang_taper")

_DPC = "sglang.srt.managers.data_parallel_controller.DataParallelController"


class DPAffinity:
    def __init__(self) -> None:
        self.placement = Placement()
        self.failed = False  # set once if placing ever raised: SGLang's method from then on

    def before_route(self, controller, req, *args, **kwargs):
        # Every dispatch method (round robin, total_requests, ...) first asks
        # maybe_external_dp_rank_routing whether the request names its rank;
        # naming it here makes that answer yes.
        if (self.failed or getattr(req, "routed_dp_rank", None) is not None
                or controller.load_balance_method.name == "FOLLOW_BOOTSTRAP_ROOM"):
            # PD disaggregation pairs prefill and decode ranks by the bootstrap room
            return None
        try:
            sp = getattr(req, "sampling_params", None)
            keys = keys_of(getattr(sp, "custom_params", None))
            if not keys:
                return None
            active = list(controller._active_workers)
            req.routed_dp_rank = self.placement.place(keys, self._loads(controller), active)
        except Exception:  # never fail a request for placement: SGLang's own method
            self.failed = True
            logger.exception("TAPER: group-affine DP placement failed; SGLang's "
                             "load balancing from now on")
        return None

    def _loads(self, controller) -> list[float]:
        budget = controller.dp_budget
        before = list(budget.last_timestamp)
        budget.update_budget(controller.load_snapshot_reader.read_all())
        for rank, (old, new) in enumerate(zip(before, budget.last_timestamp)):
            if new != old:
                self.placement.reported(rank)
        return [float(x) for x in budget.total_requests]


_affinity: DPAffinity | None = None


def install() -> None:
    global _affinity
    _affinity = DPAffinity()
    HookRegistry.register(f"{_DPC}.maybe_external_dp_rank_routing", _affinity.before_route,
                          HookType.BEFORE)
