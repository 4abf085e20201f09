"""Two-level (cascade) decode attention for branch groups, in plain torch.

Branches of one group attend over the same prefix. Attention over a key set
split in two parts is exact when each part's partial result is kept with its
log-sum-exp and the two are merged:

    o = (e^{l1} o1 + e^{l2} o2) / (e^{l1} + e^{l2}),   l = logsumexp of the scores

so a group's queries can attend to the shared prefix in one batched operation
(the prefix is read once for the whole group) and each branch to its own
suffix. Shapes follow SGLang's decode: one query token per sequence,
q [B, H, D]; K/V rows [N, KVH, D]; H a multiple of KVH (GQA).

Reading the prefix once does not always pay: the two-level path has fixed
costs of its own, so `CascadeGate` sends a group down it only where it was
measured faster than plain attention (the shortest prefix that pays, per group
width, from `taper profile`; the CPU engine's are `CPU_GATE`; both live in
controller/cascade_gate.py, which needs no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from controller.cascade_gate import CascadeGate


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries q [M, H, D] over keys/values [N, KVH, D], every query
    seeing every key. Returns out [M, H, Dv] in q's dtype and lse [M, H] (float32).
    With N = 0 the output is 0 and lse is -inf (no mass)."""
    m, h, d = q.shape
    n, kvh, _ = k.shape
    g = h // kvh
    acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 if given
    if n == 0:
        return (q.new_zeros((m, h, v.shape[-1])),
                torch.full((m, h), float("-inf"), device=q.device, dtype=acc))
    qf = q.to(acc).view(m, kvh, g, d).permute(1, 0, 2, 3).reshape(kvh, m * g, d)
    kf = k.to(acc).permute(1, 0, 2)  # [KVH, N, D]
    vf = v.to(acc).permute(1, 0, 2)
    s = torch.bmm(qf, kf.transpose(1, 2)) * scale  # [KVH, M*G, N]
    lse = torch.logsumexp(s, dim=-1)
    o = torch.bmm(torch.softmax(s, dim=-1), vf)  # [KVH, M*G, Dv]
    o = o.view(kvh, m, g, -1).permute(1, 0, 2, 3).reshape(m, h, -1)
    return o.to(q.dtype), lse.view(kvh, m, g).permute(1, 0, 2).reshape(m, h)


def merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor,
          l2: torch.Tensor) -> torch.Tensor:
    """Merge two partial attention results by their log-sum-exp (exact)."""
    acc = torch.promote_types(torch.promote_types(o1.dtype, l1.dtype), torch.float32)
    l1, l2 = l1.to(acc), l2.to(acc)
    mx = torch.maximum(l1, l2)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)  # both empty: no NaN
    w1, w2 = torch.exp(l1 - mx), torch.exp(l2 - mx)
    den = (w1 + w2).clamp_min(torch.finfo(acc).tiny)
    out = (o1.to(acc) * w1[..., None] + o2.to(acc) * w2[..., None]) / den[..., None]
    return out.to(o1.dtype)


def padded_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         valid: torch.Tensor, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query q[i] [H, D] over its own keys/values k[i], v[i]
    [S, KVH, D], of which only those with valid[i] [S] count: one batched
    operation for a group's suffixes. Returns out [B, H, Dv] in q's dtype and lse
    [B, H] (float32); a query with no valid key gets 0 and -inf."""
    b, h, d = q.shape
    s, kvh, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // kvh
    acc = torch.promote_types(q.dtype, torch.float32)
    if s == 0:
        return (q.new_zeros((b, h, dv)),
                torch.full((b, h), float("-inf"), device=q.device, dtype=acc))
    qf = q.to(acc).reshape(b * kvh, g, d)
    kf = k.to(acc).permute(0, 2, 1, 3).reshape(b * kvh, s, d)
    vf = v.to(acc).permute(0, 2, 1, 3).reshape(b * kvh, s, dv)
    sc = torch.bmm(qf, kf.transpose(1, 2)) * scale  # [B*KVH, G, S]
    sc = sc.masked_fill(~valid.repeat_interleave(kvh, 0)[:, None, :], float("-inf"))
    lse = torch.logsumexp(sc, dim=-1)  # [B*KVH, G]
    o = torch.bmm(torch.exp(sc - lse.nan_to_num(neginf=0.0)[..., None]), vf)
    return o.view(b, h, dv).to(q.dtype), lse.view(b, h)


def two_level_decode(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                     suffix_k: list[torch.Tensor], suffix_v: list[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """Decode attention of a group: q [B, H, D], one query per branch; the shared
    prefix [P, KVH, D] read once for all B; branch i's own suffix [S_i, KVH, D]."""
    lens = torch.tensor([len(x) for x in suffix_k])
    s = int(lens.max()) if len(lens) else 0
    valid = torch.arange(s)[None, :] < lens[:, None]
    pad = torch.nn.utils.rnn.pad_sequence
    o1, l1 = attention_lse(q, prefix_k, prefix_v, scale)
    o2, l2 = padded_attention_lse(q, pad(suffix_k, batch_first=True),
                                  pad(suffix_v, batch_first=True), valid, scale)
    return merge(o1, l1, o2, l2)


@dataclass(frozen=True, slots=True)
class Group:
    """One branch group in a decode batch."""

    rows: tuple[int, ...]  # batch rows of its members
    prefix_len: int  # tokens of KV shared by all members (same KV slots)


def group_layout(kv_rows: list[torch.Tensor], codes: list[int],
                 gate: CascadeGate | None = None) -> list[Group]:
    """Groups present in a decode batch with the prefix their members really
    share: the longest common prefix of their KV slot indices (the radix cache
    gives shared tokens the same slots). `kv_rows[i]`: KV slot indices of row i;
    `codes[i]`: its branch group code, negative for an ordinary request.
    Ordinary requests and groups of one are left out (they take the ordinary
    path), and so are groups `gate` turns down, before their prefix is even
    compared when no prefix they could share would pay."""
    members: dict[int, list[int]] = {}
    for i, c in enumerate(codes):
        if c >= 0:
            members.setdefault(c, []).append(i)
    out = []
    for rows in members.values():
        if len(rows) < 2:
            continue
        lcp = min(len(kv_rows[r]) for r in rows)
        if gate is not None and not gate.pays(len(rows), lcp):
            continue  # not even the longest prefix they could share would pay
        heads = torch.stack([kv_rows[r][:lcp] for r in rows])  # [B, shortest row]
        differ = (heads[1:] != heads[0]).any(0).nonzero()
        if len(differ):
            lcp = int(differ[0, 0])
        if lcp > 0 and (gate is None or gate.pays(len(rows), lcp)):
            out.append(Group(tuple(rows), lcp))
    return out


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """What one group's two-level attention reads, built once per decode step
    and used by every layer (the torch path)."""

    rows: torch.Tensor  # int64 [B]: batch rows of its members
    prefix: torch.Tensor  # int64 [P]: KV slots of the shared prefix
    suffix: torch.Tensor  # int64 [B, S_max]: each member's own KV slots, padded
    valid: torch.Tensor  # bool [B, S_max]: which of `suffix` are real


def plan_group(kv_rows: list[torch.Tensor], group: Group) -> GroupPlan:
    """Index tensors of `group` (kv_rows: KV slot indices of every batch row)."""
    p = group.prefix_len
    own = [kv_rows[r][p:] for r in group.rows]
    lens = torch.tensor([len(x) for x in own])
    s = int(lens.max())
    valid = torch.arange(s)[None, :] < lens[:, None]
    suffix = torch.nn.utils.rnn.pad_sequence(own, batch_first=True)
    # Padding repeats the row's first own slot (a decode row always has one: its
    # new token), so a masked read never touches a slot no request holds.
    suffix = torch.where(valid, suffix, suffix[:, :1]).long()
    return GroupPlan(torch.tensor(group.rows), kv_rows[group.rows[0]][:p].long(), suffix, valid)


def decode_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 plan: GroupPlan, scale: float) -> torch.Tensor:
    """Two-level decode attention of one group's queries q [B, H, D] over the KV
    cache [slots, KVH, D]: the prefix gathered once, the suffixes in one batch."""
    o1, l1 = attention_lse(q, k_cache[plan.prefix], v_cache[plan.prefix], scale)
    o2, l2 = padded_attention_lse(q, k_cache[plan.suffix], v_cache[plan.suffix], plan.valid,
                                  scale)
    return merge(o1, l1, o2, l2)



@dataclass(frozen=True, slots=True)
class LevelPlan:
    """One level of a paged (page size 1) multi-level cascade: entry e's queries
    are rows qo_indptr[e]:qo_indptr[e+1] (of the permuted batch) and attend to KV
    slots kv_indices[kv_indptr[e]:kv_indptr[e+1]], as FlashInfer's
    MultiLevelCascadeAttentionWrapper.plan takes them."""

    qo_indptr: torch.Tensor  # int32 [entries + 1]
    kv_indptr: torch.Tensor  # int32 [entries + 1]
    kv_indices: torch.Tensor  # int32 [total KV slots]
    kv_last_page_len: torch.Tensor  # int32 [entries], all 1 with page size 1


def plan_two_level(kv_rows: list[torch.Tensor], groups: list[Group]
                   ) -> tuple[torch.Tensor, list[LevelPlan]]:
    """Two levels for a decode batch: level 0 holds each group's shared prefix
    (its members' queries contiguous) and, for every other sequence, all but its
    last token; level 1 holds each sequence's own suffix. Returns the row
    permutation (queries are reordered by it, outputs scattered back) and the
    two level plans. No entry is empty: decode sequences have >= 2 tokens."""
    n = len(kv_rows)
    grouped = {r for g in groups for r in g.rows}
    perm: list[int] = []
    q0, k0, idx0, q1, k1, idx1 = [0], [0], [], [0], [0], []
    for g in groups:
        perm.extend(g.rows)
        q0.append(q0[-1] + len(g.rows))
        idx0.append(kv_rows[g.rows[0]][: g.prefix_len])
        k0.append(k0[-1] + g.prefix_len)
        for r in g.rows:
            idx1.append(kv_rows[r][g.prefix_len:])
    for r in range(n):
        if r in grouped:
            continue
        perm.append(r)
        row = kv_rows[r]
        cut = max(1, len(row) - 1)
        q0.append(q0[-1] + 1)
        idx0.append(row[:cut])
        k0.append(k0[-1] + cut)
        idx1.append(row[cut:])
    for s in idx1:
        q1.append(q1[-1] + 1)
        k1.append(k1[-1] + len(s))

    def level(qo, kvp, parts) -> LevelPlan:
        i32 = torch.int32
        return LevelPlan(torch.tensor(qo, dtype=i32), torch.tensor(kvp, dtype=i32),
                         torch.cat(parts).to(i32) if parts else torch.zeros(0, dtype=i32),
                         torch.ones(len(qo) - 1, dtype=i32))

    return torch.tensor(perm, dtype=torch.int64), [level(q0, k0, idx0), level(q1, k1, idx1)]


def run_plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             perm: torch.Tensor, levels: list[LevelPlan], scale: float) -> torch.Tensor:
    """Execute a level plan with the torch math above: the reference semantics of
    the FlashInfer wrapper, used to check a plan on a machine without a GPU."""
    qp = q[perm]
    out, lse = None, None
    for lv in levels:
        o = torch.empty_like(qp)
        l_ = torch.empty(qp.shape[:2], device=q.device,
                         dtype=torch.promote_types(q.dtype, torch.float32))
        for e in range(len(lv.qo_indptr) - 1):
            qs, qe = int(lv.qo_indptr[e]), int(lv.qo_indptr[e + 1])
            ks, ke = int(lv.kv_indptr[e]), int(lv.kv_indptr[e + 1])
            idx = lv.kv_indices[ks:ke].long()
            o[qs:qe], l_[qs:qe] = attention_lse(qp[qs:qe], k_cache[idx], v_cache[idx], scale)
        out, lse = (o, l_) if out is None else (merge(out, lse, o, l_),
                                               torch.logaddexp(lse, l_))
    res = torch.empty_like(out)
    res[perm] = out
    return res
