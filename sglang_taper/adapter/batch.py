"""Batch surgery on SGLang's `ScheduleBatch`: split a decode batch into the part
that runs and the part held out (keeping its KV), merge it back, and say when a
batch or a scheduler cannot be split safely."""

from __future__ import annotations

import copy

import numpy as np


def unsupported(scheduler) -> str | None:
    """Why this scheduler cannot regulate branches, or None."""
    args = scheduler.server_args
    if getattr(args, "enable_mixed_chunk", False):
        return "--enable-mixed-chunk builds decode batches outside update_running_batch"
    if not scheduler.spec_algorithm.is_none():
        return "speculative decoding"
    if getattr(args, "pp_size", 1) > 1:
        return "pipeline parallelism"
    if getattr(args, "enable_dp_attention", False):
        return "DP attention"
    if getattr(args, "disaggregation_mode", "null") != "null":
        return "PD disaggregation"
    if getattr(args, "enable_pdmux", False):
        return "--enable-pdmux runs prefill and decode batches side by side"
    if getattr(scheduler, "enable_continuous_input_polling", False):
        return "continuous input polling merges requests mid-step"
    return None


def unsafe_to_split(batch) -> bool:
    """A split would corrupt shared per-batch state: run the step whole."""
    info = batch.sampling_info
    return (
        info.penalizer_orchestrator.is_required  # one orchestrator, shared by both parts
        or batch.spec_info is not None
        or batch.hisparse_coordinator is not None
    )


def complement(keep: np.ndarray, n: int) -> np.ndarray:
    """The indices in range(n) not in `keep`, ascending."""
    mask = np.ones(n, dtype=bool)
    mask[keep] = False
    return mask.nonzero()[0]


def split(batch, keep: np.ndarray, held: np.ndarray):
    """Split `batch` in place into the kept part and return the held part.
    `filter_batch` frees no KV; each part gets its own sampling-info object
    (filtering rebinds its tensors), so the parts are independent. The held part
    is built first: if that fails, `batch` is untouched."""
    out = copy.copy(batch)
    out.sampling_info = copy.copy(batch.sampling_info)
    out.filter_batch(keep_indices=held.tolist())
    batch.filter_batch(keep_indices=keep.tolist())
    return out


def unsplit(batch, held, keep: np.ndarray, held_idx: np.ndarray) -> None:
    """Undo `split`: put `held` back into `batch` in the batch's original order
    (under TP every rank must hold the same sequences in the same rows)."""
    batch.merge_batch(held)
    order = np.argsort(np.concatenate([keep, held_idx]), kind="stable")
    batch.filter_batch(keep_indices=order.tolist())


def merge(running_batch, held):
    """Put a held part back; returns the running batch to use."""
    if held is None or held.is_empty():
        return running_batch
    if running_batch.is_empty():
        return held
    running_batch.merge_batch(held)
    return running_batch
