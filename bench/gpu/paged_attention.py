"""Decode attention over a paged KV pool, in Triton (for the GPU profile; torch
and triton only, as on the lent machine).

The pool is token-granular, as SGLang's default page size of 1: per layer a K
and a V tensor of [tokens, kv_heads, head_dim], and each query sequence reads
the pool rows its slice of `indices` names (`indptr[s]:indptr[s+1]`), the
layout of SGLang's and FlashInfer's ragged page tables.

`decode(q, ...)` takes q as [seqs, kv_heads, rows, head_dim]: the rows of one
KV head's queries. A plain decode step has rows = the query heads per KV head
(GQA's group). The prefix level of two-level (cascade) attention has one
"sequence" per branch group, the group's shared prefix as its KV, and rows =
branches x heads per KV head, so the prefix is read once for the whole group.
`merge` combines two partial attentions by their log-sum-exps.

Flash decoding: stage 1 splits each sequence's KV over `splits` programs
(online softmax per split), stage 2 reduces the splits by log-sum-exp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _stage1(Q, K, V, Indptr, Indices, MidO, MidL, sm_scale, splits, m_blocks,
            stride_kt, stride_kh,
            KVH: tl.constexpr, M: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    seq = pid // m_blocks
    mb = pid % m_blocks
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(Indptr + seq)
    n = tl.load(Indptr + seq + 1) - start
    per = tl.cdiv(tl.cdiv(n, splits), BLOCK_N) * BLOCK_N
    lo = split * per
    hi = tl.minimum(lo + per, n)

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    row0 = (seq * KVH + kvh) * M  # first query row of this (sequence, KV head)
    # Row r of sequence `seq` is query head r % GQ of KV head kvh in the
    # (r // GQ)-th of the M // GQ query sequences it stands for: read from q
    # [seqs * M // GQ, KVH, GQ, D] as it lies (no gather of a group's queries).
    qrow = ((seq * (M // GQ) + offs_m // GQ) * KVH + kvh) * GQ + offs_m % GQ
    q = tl.load(Q + qrow[:, None] * D + offs_d[None, :], mask=mmask[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for j in range(lo, hi, BLOCK_N):
        nmask = (j + offs_n) < hi
        idx = tl.load(Indices + start + j + offs_n, mask=nmask, other=0).to(tl.int64)
        kv_off = idx[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
        k = tl.load(K + kv_off, mask=nmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # An empty split (a short sequence) stores lse = -inf, which stage 2 weighs 0.
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(safe_l), float("-inf"))
    rows = row0 + offs_m
    tl.store(MidO + (rows[:, None] * splits + split) * D + offs_d[None, :], out,
             mask=mmask[:, None])
    tl.store(MidL + rows * splits + split, lse, mask=mmask)


@triton.jit
def _stage2(MidO, MidL, Out, OutL, splits, D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    smask = offs_s < splits
    lse = tl.load(MidL + row * splits + offs_s, mask=smask, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.exp(lse - mx)
    o = tl.load(MidO + (row * splits + offs_s)[:, None] * D + offs_d[None, :],
                mask=smask[:, None], other=0.0)
    total = tl.sum(w, 0)
    tl.store(Out + row * D + offs_d, (tl.sum(w[:, None] * o, 0) / total).to(Out.dtype.element_ty))
    tl.store(OutL + row, mx + tl.log(total))


@triton.jit
def _stage2_two(MidO1, MidL1, splits1, MidO2, MidL2, splits2, Out, W: tl.constexpr,
                KVH: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr,
                BLOCK_S1: tl.constexpr, BLOCK_S2: tl.constexpr):
    """Reduce a branch's prefix-level splits (its group's) and suffix-level
    splits together: the two-level path's merge, with no pass of its own."""
    row = tl.program_id(0)  # (branch, kv head, query head) of the output
    g = row % GQ
    kvh = (row // GQ) % KVH
    b = row // (GQ * KVH)
    row1 = ((b // W) * KVH + kvh) * (W * GQ) + (b % W) * GQ + g
    offs_d = tl.arange(0, D)
    s1 = tl.arange(0, BLOCK_S1)
    s2 = tl.arange(0, BLOCK_S2)
    l1 = tl.load(MidL1 + row1 * splits1 + s1, mask=s1 < splits1, other=float("-inf"))
    l2 = tl.load(MidL2 + row * splits2 + s2, mask=s2 < splits2, other=float("-inf"))
    mx = tl.maximum(tl.max(l1, 0), tl.max(l2, 0))
    w1 = tl.exp(l1 - mx)
    w2 = tl.exp(l2 - mx)
    o1 = tl.load(MidO1 + (row1 * splits1 + s1)[:, None] * D + offs_d[None, :],
                 mask=(s1 < splits1)[:, None], other=0.0)
    o2 = tl.load(MidO2 + (row * splits2 + s2)[:, None] * D + offs_d[None, :],
                 mask=(s2 < splits2)[:, None], other=0.0)
    acc = tl.sum(w1[:, None] * o1, 0) + tl.sum(w2[:, None] * o2, 0)
    tl.store(Out + row * D + offs_d,
             (acc / (tl.sum(w1, 0) + tl.sum(w2, 0))).to(Out.dtype.element_ty))


def choose_splits(seqs: int, kv_heads: int, m_blocks: int, max_len: int, sms: int) -> int:
    """KV splits per sequence: enough programs for two waves over the SMs, each
    split at least 256 tokens, at most 64 splits."""
    programs = seqs * kv_heads * m_blocks
    want = max(1, math.ceil(2 * sms / programs))
    return max(1, min(want, math.ceil(max_len / 256), 64))


class Decode:
    """One attention call's fixed shapes and buffers (so it can be captured in
    a CUDA graph): q [seqs, kv_heads, rows, D] -> (out like q, lse [seqs,
    kv_heads, rows], float32)."""

    def __init__(self, seqs: int, kv_heads: int, rows: int, head_dim: int, max_len: int,
                 device, dtype, sms: int = 132, splits: int | None = None,
                 group_q: int | None = None) -> None:
        self.seqs, self.kvh, self.rows, self.d = seqs, kv_heads, rows, head_dim
        self.gq = group_q or rows  # query heads per KV head (rows // gq sequences' worth)
        self.block_m = max(16, min(64, triton.next_power_of_2(rows)))
        self.m_blocks = triton.cdiv(rows, self.block_m)
        self.splits = splits or choose_splits(seqs, kv_heads, self.m_blocks, max_len, sms)
        n_rows = seqs * kv_heads * rows
        self.mid_o = torch.empty(n_rows, self.splits, head_dim, device=device,
                                 dtype=torch.float32)
        self.mid_l = torch.empty(n_rows, self.splits, device=device, dtype=torch.float32)
        self.out = torch.empty(seqs, kv_heads, rows, head_dim, device=device, dtype=dtype)
        self.lse = torch.empty(seqs, kv_heads, rows, device=device, dtype=torch.float32)
        self.scale = 1.0 / math.sqrt(head_dim)

    def stage1(self, q, k_pool, v_pool, indptr, indices) -> None:
        assert q.is_contiguous() and q.numel() == self.out.numel(), (q.shape, self.out.shape)
        assert k_pool.stride(2) == 1 and k_pool.stride() == v_pool.stride()
        grid = (self.seqs * self.m_blocks, self.kvh, self.splits)
        _stage1[grid](q, k_pool, v_pool, indptr, indices, self.mid_o, self.mid_l, self.scale,
                      self.splits, self.m_blocks, k_pool.stride(0), k_pool.stride(1),
                      KVH=self.kvh, M=self.rows, GQ=self.gq, D=self.d, BLOCK_M=self.block_m,
                      BLOCK_N=64, num_warps=4, num_stages=2)

    def __call__(self, q, k_pool, v_pool, indptr, indices):
        self.stage1(q, k_pool, v_pool, indptr, indices)
        _stage2[(self.seqs * self.kvh * self.rows,)](
            self.mid_o, self.mid_l, self.out, self.lse, self.splits, D=self.d,
            BLOCK_S=max(2, triton.next_power_of_2(self.splits)))
        return self.out, self.lse


class TwoLevel:
    """Cascade attention of `groups` groups of `width` branches: each group's
    shared prefix read once for all its branches' queries (one prefix-level
    sequence per group, rows = width x query heads per KV head), each branch's
    own suffix read by it alone, both levels' splits reduced together. q
    [groups * width, kv_heads, G, D] -> out like q. Three kernels; no copies."""

    def __init__(self, groups: int, width: int, kv_heads: int, group_q: int, head_dim: int,
                 prefix_len: int, suffix_len: int, device, dtype, sms: int = 132) -> None:
        self.w, self.kvh, self.gq, self.d = width, kv_heads, group_q, head_dim
        self.prefix = Decode(groups, kv_heads, width * group_q, head_dim, prefix_len, device,
                             dtype, sms, group_q=group_q)
        self.suffix = Decode(groups * width, kv_heads, group_q, head_dim, suffix_len, device,
                             dtype, sms)
        self.out = self.suffix.out

    def __call__(self, q, k_pool, v_pool, p_ptr, p_idx, s_ptr, s_idx):
        self.prefix.stage1(q, k_pool, v_pool, p_ptr, p_idx)
        self.suffix.stage1(q, k_pool, v_pool, s_ptr, s_idx)
        a, b = self.prefix, self.suffix
        _stage2_two[(self.out.numel() // self.d,)](
            a.mid_o, a.mid_l, a.splits, b.mid_o, b.mid_l, b.splits, self.out, W=self.w,
            KVH=self.kvh, GQ=self.gq, D=self.d,
            BLOCK_S1=max(2, triton.next_power_of_2(a.splits)),
            BLOCK_S2=max(2, triton.next_power_of_2(b.splits)))
        return self.out


def merge(o1, l1, o2, l2):
    """Attention over the union of two KV sets from each set's (out, lse)."""
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    return ((o1.float() * w1[..., None] + o2.float() * w2[..., None])
            / (w1 + w2)[..., None]).to(o1.dtype)


def reference(q, k_pool, v_pool, indptr, indices):
    """float64 attention, sequence by sequence: q [seqs, kv_heads, rows, D]."""
    outs = []
    bounds = indptr.tolist()
    for s in range(q.shape[0]):
        idx = indices[bounds[s]:bounds[s + 1]].long()
        k = k_pool[idx].double().transpose(0, 1)  # [kv_heads, n, D]
        v = v_pool[idx].double().transpose(0, 1)
        sc = q[s].double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        outs.append(torch.softmax(sc, dim=-1) @ v)
    return torch.stack(outs)
