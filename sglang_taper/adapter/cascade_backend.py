"""Cascade attention backends for branch groups (selected with
`taper serve --taper-cascade`).

- `taper_cascade` (CPU): derived from SGLang's torch-native backend. In decode
  steps with branch groups, each group's queries attend to the shared prefix in
  one batched operation, each branch to its own suffix, merged by log-sum-exp;
  ordinary requests and groups of one take the torch-native path; prefill is
  the torch-native one.
- `taper_cascade_flashinfer` (GPU): derived from SGLang's FlashInfer backend;
  decode steps with groups run FlashInfer's MultiLevelCascadeAttentionWrapper
  on the two-level plan of `sglang_taper.cascade.plan_two_level`. Eager decode
  only: the captured CUDA graph bakes in the plain decode kernel, so steps with
  groups must not replay it (run with --disable-cuda-graph).

The scheduler hook passes each decode batch's group codes through
`set_batch_groups` right before the forward (same process, same row order).
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.attention_registry import register_attention_backend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_taper.cascade import Group, group_layout, two_level_decode

_codes: list[int] | None = None  # group code per row of the batch about to run


def set_batch_groups(codes: list[int] | None) -> None:
    global _codes
    _codes = codes


def _layout(backend, forward_batch) -> tuple[list[Group], list[torch.Tensor]] | None:
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
    groups = group_layout(rows, codes)
    return (groups, rows) if groups else None


class TaperCascadeAttnBackend(TorchNativeAttnBackend):
    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self.cascade = _layout(self, forward_batch)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        plain = (self.cascade is None or layer.is_cross_attention
                 or (layer.sliding_window_size is not None and layer.sliding_window_size > -1)
                 or layer.qk_head_dim != layer.v_head_dim)
        if plain:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        groups, rows = self.cascade
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
        grouped = set()
        for g in groups:
            members = list(g.rows)
            grouped.update(members)
            pidx = rows[members[0]][: g.prefix_len]
            sk = [k_cache[rows[r][g.prefix_len:]] for r in members]
            sv = [v_cache[rows[r][g.prefix_len:]] for r in members]
            o_[members] = two_level_decode(q_[members], k_cache[pidx], v_cache[pidx], sk, sv,
                                           scale).to(o_.dtype)
        rest = [i for i in range(q_.shape[0]) if i not in grouped]
        if rest:
            idx = torch.tensor(rest, device=q_.device)
            sub_o = torch.empty_like(o_[idx])
            self._run_sdpa_forward_decode(
                q_[idx].contiguous(), sub_o, k_cache, v_cache,
                self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices[idx],
                forward_batch.seq_lens[idx], None, scaling=scale,
                enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num, causal=False)
            o_[idx] = sub_o
        return o


def _flashinfer_backend_class():
    """Defined on demand: importing SGLang's FlashInfer backend needs flashinfer."""
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    from sglang_taper.cascade import plan_two_level

    class TaperCascadeFlashInferBackend(FlashInferAttnBackend):
        """Decode steps with branch groups through FlashInfer's two-level cascade."""

        def init_forward_metadata(self, forward_batch):
            super().init_forward_metadata(forward_batch)
            self.cascade = _layout(self, forward_batch)
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


def register() -> None:
    """Register both backends and let SGLang's argument parser accept their names."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES

    for name in NAMES:
        if name not in ATTENTION_BACKEND_CHOICES:
            ATTENTION_BACKEND_CHOICES.append(name)
    register_attention_backend("taper_cascade")(TaperCascadeAttnBackend)
    register_attention_backend("taper_cascade_flashinfer")(
        lambda runner: _flashinfer_backend_class()(runner))
