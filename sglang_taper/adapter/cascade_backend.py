"""Cascade attention backends for branch groups (selected with
`taper serve --taper-cascade`).

Both take the two-level path only for the groups where it pays: a
`CascadeGate` (controller/cascade_gate.py) compares the predicted time of plain
and two-level attention per group, from the group's width, shared prefix and
own tokens; the other groups are attended as ordinary sequences.

- `taper_cascade` (CPU): derived from SGLang's torch-native backend. In decode
  steps with branch groups, each group's queries attend to the shared prefix in
  one batched operation and to their own suffixes in another, merged by
  log-sum-exp; ordinary requests, groups of one and groups the gate turns down
  take the torch-native path; prefill is the torch-native one. Gate: the
  `cascade_profile` given, else the CPU engine's measured `CPU_GATE`.
- `taper_cascade_flashinfer` (GPU): derived from SGLang's FlashInfer backend;
  decode steps with groups run FlashInfer's MultiLevelCascadeAttentionWrapper
  on the two-level plan of `sglang_taper.cascade.plan_two_level`. Eager decode
  only: the captured CUDA graph bakes in the plain decode kernel, so steps with
  groups must not replay it (run with --disable-cuda-graph). Gate: the
  `cascade_profile` given; without one every group with a shared prefix takes
  it (no FlashInfer timings have been measured for a default).

The scheduler hook passes each decode batch's group codes through
`set_batch_groups` right before the forward (same process, same row order).
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.attention_registry import register_attention_backend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from controller.cascade_gate import CPU_GATE, EVERY_SHARED, NEVER, CascadeGate
from controller.config import TaperConfig
from sglang_taper.cascade import (
    Group,
    decode_group,
    group_layout,
    plan_group,
)

_codes: list[int] | None = None  # group code per row of the batch about to run


def set_batch_groups(codes: list[int] | None) -> None:
    global _codes
    _codes = codes


def _layout(backend, forward_batch, gate: CascadeGate | None
            ) -> tuple[list[Group], list[torch.Tensor]] | None:
    """This decode step's groups that take the two-level path (those `gate`
    passes; all with a shared prefix if None) and every row's KV slots."""
    codes = _codes
    if codes is None or not forward_batch.forward_mode.is_decode():
        return None
    bs = forward_batch.batch_size
    if len(codes) != bs or sum(1 for c in codes if c >= 0) < 2:
        return None
    req_to_token = backend.req_to_token_pool.req_to_token
    pool = forward_batch.req_pool_indices.tolist()
    lens = forward_batch.seq_lens.tolist()
    rows = [req_to_token[pool[i], : lens[i]] for i in range(bs)]
    groups = group_layout(rows, codes, gate)
    return (groups, rows) if groups else None


class TaperCascadeAttnBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner, gate: CascadeGate | None = CPU_GATE):
        super().__init__(model_runner)
        self.gate = gate
        self.cascade = None

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        layout = _layout(self, forward_batch, self.gate)
        if layout is None:
            self.cascade = None
            return
        groups, rows = layout
        grouped = {r for g in groups for r in g.rows}
        rest = [i for i in range(len(rows)) if i not in grouped]
        self.cascade = ([plan_group(rows, g) for g in groups],
                        torch.tensor(rest, device=forward_batch.seq_lens.device) if rest else None)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        plain = (self.cascade is None or layer.is_cross_attention
                 or (layer.sliding_window_size is not None and layer.sliding_window_size > -1)
                 or layer.qk_head_dim != layer.v_head_dim)
        if plain:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        plans, rest = self.cascade
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o = torch.empty_like(q)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        scale = layer.scaling
        for plan in plans:
            o_[plan.rows] = decode_group(q_[plan.rows], k_cache, v_cache, plan,
                                         scale).to(o_.dtype)
        if rest is not None:
            o_[rest] = plain_decode(q_[rest].contiguous(), k_cache, v_cache,
                                    self.req_to_token_pool.req_to_token,
                                    forward_batch.req_pool_indices[rest],
                                    forward_batch.seq_lens[rest], scale)
        return o


def plain_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 req_to_token: torch.Tensor, pool_indices: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """SGLang's torch-native decode attention of q [N, H, D], one sequence at a
    time (what a group the gate turns down gets; `taper profile` times it)."""
    out = torch.empty_like(q)
    TorchNativeAttnBackend._run_sdpa_forward_decode(
        None, q, out, k_cache, v_cache, req_to_token, pool_indices, seq_lens, None,
        scaling=scale, enable_gqa=q.shape[1] != k_cache.shape[1], causal=False)
    return out


def _flashinfer_backend_class():
    """Defined on demand: importing SGLang's FlashInfer backend needs flashinfer."""
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    from sglang_taper.cascade import plan_two_level

    class TaperCascadeFlashInferBackend(FlashInferAttnBackend):
        """Decode steps with branch groups through FlashInfer's two-level cascade."""

        gate: CascadeGate | None = None

        def init_forward_metadata(self, forward_batch):
            super().init_forward_metadata(forward_batch)
            self.cascade = _layout(self, forward_batch, self.gate)
            if self.cascade is None:
                return
            import flashinfer

            groups, rows = self.cascade
            perm, levels = plan_two_level(rows, groups)
            dev = forward_batch.seq_lens.device
            if not hasattr(self, "_cascade_wrapper"):
                self._cascade_wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(
                    2, torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=dev), "NHD")
            self._cascade_perm = perm.to(dev)
            self._cascade_levels = levels

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            if getattr(self, "cascade", None) is None:
                return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            if save_kv_cache and k is not None:
                forward_batch.token_to_kv_pool.set_kv_buffer(
                    layer, forward_batch.out_cache_loc, k, v, layer.k_scale, layer.v_scale)
            dev = q.device
            lv = self._cascade_levels
            self._cascade_wrapper.plan(
                [x.qo_indptr.to(dev) for x in lv], [x.kv_indptr.to(dev) for x in lv],
                [x.kv_indices.to(dev) for x in lv], [x.kv_last_page_len.to(dev) for x in lv],
                layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim, 1,
                sm_scale=layer.scaling, q_data_type=q.dtype,
                kv_data_type=forward_batch.token_to_kv_pool.dtype)
            q_ = q.view(-1, layer.tp_q_head_num, layer.head_dim)[self._cascade_perm]
            kv = forward_batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)
            out = self._cascade_wrapper.run(q_, kv)
            res = torch.empty_like(out)
            res[self._cascade_perm] = out
            return res.view(-1, layer.tp_q_head_num * layer.head_dim)

    return TaperCascadeFlashInferBackend


NAMES = ("taper_cascade", "taper_cascade_flashinfer")


def backend_gate(backend: str | None, config: TaperConfig | None) -> CascadeGate:
    """The gate decode attention `backend` applies: `config.cascade_profile`'s
    if given, else the backend's default (CPU_GATE on CPU, every group sharing
    a prefix with FlashInfer); NEVER for a backend not of ours."""
    if backend not in NAMES:
        return NEVER
    if config is not None and config.cascade_profile:
        return CascadeGate.load(config.cascade_profile)
    return CPU_GATE if backend == "taper_cascade" else EVERY_SHARED


def engine_gate(server_args, config: TaperConfig) -> CascadeGate:
    """The rule this server's decode attention applies, for the controller's
    prediction (the user may have chosen another decode backend: NEVER)."""
    return backend_gate(getattr(server_args, "decode_attention_backend", None)
                        or getattr(server_args, "attention_backend", None), config)


def register(config: TaperConfig | None = None) -> None:
    """Register both backends and let SGLang's argument parser accept their names.
    Their gate: `config.cascade_profile`'s cascade section if given (a bad file
    fails here, at start-up), else each backend's default (see the module doc)."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES

    cpu_gate = backend_gate("taper_cascade", config)
    gpu_gate = backend_gate("taper_cascade_flashinfer", config)
    for name in NAMES:
        if name not in ATTENTION_BACKEND_CHOICES:
            ATTENTION_BACKEND_CHOICES.append(name)
    register_attention_backend("taper_cascade")(
        lambda runner: TaperCascadeAttnBackend(runner, cpu_gate))

    def flashinfer(runner):
        backend = _flashinfer_backend_class()(runner)
        backend.gate = gpu_gate  # EVERY_SHARED: what no gate (None) does in group_layout
        return backend

    register_attention_backend("taper_cascade_flashinfer")(flashinfer)
