"""Greedy batches stay greedy.

SGLang computes a batch's sampling flags (`SamplingBatchInfo.is_all_greedy`:
every request has top_k <= 1; `need_top_p_sampling`, `need_top_k_sampling`,
`need_min_p_sampling`) from its requests when the batch is built, ANDs/ORs
them when batches merge, and never recomputes them when requests leave
(`ScheduleBatch.filter_batch`). So one non-greedy request that joins a running
batch and finishes leaves the batch on the sampling path until it empties:
the greedy requests still get their argmax, but their logprobs become
log(softmax) instead of log_softmax (different last bits), and every step pays
the sampling kernels. After every filter the flags are recomputed from the
requests that remain, exactly as a new batch of them would have them.

This is a correctness fix for every client, regulated or not: it is installed
with the plugin and stays on when TAPER is switched off at run time
(`TaperConfig.enabled`). Cost: one attribute read per filter of an all-greedy
batch; one pass over the requests when the batch was not.
"""

from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookRegistry, HookType
from sglang.srt.sampling.sampling_params import TOP_K_ALL

logger = logging.getLogger("sglang_taper")


def refresh_flags(batch) -> None:
    """Recompute `batch.sampling_info`'s sampling flags from `batch.reqs`."""
    info = batch.sampling_info
    if info is None or info.is_all_greedy or not batch.reqs:
        return  # all-greedy stays so when requests leave; an empty batch is dropped
    params = [r.sampling_params for r in batch.reqs]
    info.is_all_greedy = all(p.top_k <= 1 for p in params)
    info.need_top_p_sampling = any(p.top_p != 1.0 for p in params)
    info.need_top_k_sampling = any(p.top_k != TOP_K_ALL for p in params)
    info.need_min_p_sampling = any(p.min_p > 0 for p in params)


class _Refresh:
    """The hook; after an error (logged once) it stands aside: the stock flags
    are still valid, only sticky."""

    def __init__(self) -> None:
        self.failed = False

    def after_filter(self, result, batch, *args, **kwargs):
        if not self.failed:
            try:
                refresh_flags(batch)
            except Exception:  # noqa: BLE001 (never fail SGLang's filter)
                self.failed = True
                logger.exception("TAPER: could not recompute a batch's sampling flags; "
                                 "left to SGLang from now on")
        return result


def install() -> None:
    HookRegistry.register("sglang.srt.managers.schedule_batch.ScheduleBatch.filter_batch",
                          _Refresh().after_filter, HookType.AFTER)
