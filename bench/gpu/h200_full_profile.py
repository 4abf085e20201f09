"""The full-model GPU profile (run on the lent H200; torch and triton only):
all 64 layers of Qwen3-32B's shapes with random BF16 weights, no per-layer
scaling, over a paged (token-granular) KV pool.

1. decode steps, batch 1-256 x context 512-32K, as CUDA-graph replays: embed,
   per layer RMSNorm, fused QKV GEMM, per-head q/k RMSNorm, RoPE, the new
   token's K/V written into the pool, paged flash-decode attention (Triton,
   bench/gpu/paged_attention.py), O projection, SwiGLU MLP; final norm, LM
   head, greedy argmax. Cells whose KV exceeds what the card holds next to
   the weights are not run (null): no server could batch them either.
2. prefill steps (eager, as SGLang runs prefill): `reqs` fresh prompts of
   `tokens` tokens each, causal flash attention (torch SDPA), K/V written to
   the pool, logits of each prompt's last token.
2b. prefill steps over cached context (a fork's branch prefills): `reqs`
   requests of `new` tokens, each over `cached` tokens of its own already in
   the pool (a radix-cache hit: the prefix's K/V is read, not computed),
   attention lower-right causal over cached + new.
3. two-level (cascade) attention of one branch group, per layer: plain paged
   attention over each branch's prefix+suffix vs the prefix read once for the
   whole group plus each branch's suffix, merged by log-sum-exp; widths 2-64 x
   prefixes 256-32K.
4. whole decode steps with cascade: batches of several branch groups, plain vs
   two-level attention in all 64 layers.

    python3 -m bench.gpu.h200_full_profile OUT_DIR [--budget SECONDS] [--only A,B]
    TRITON_INTERPRET=1 python -m bench.gpu.h200_full_profile OUT_DIR --cpu-check

Writes OUT_DIR/profile.json after every cell (a run cut short keeps what it
measured). `--cpu-check` runs every path on a tiny model on the CPU (Triton's
interpreter), for a test before device time is spent.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:  # as a module (python -m bench.gpu...) or as a script from bench/gpu
    from bench.gpu import paged_attention as pa
except ImportError:  # pragma: no cover
    import paged_attention as pa  # type: ignore[no-redef]

QWEN3_32B = dict(layers=64, hidden=5120, inter=25600, heads=64, kv_heads=8, head_dim=128,
                 vocab=151936, rope_theta=1e6)
TINY = dict(layers=2, hidden=64, inter=128, heads=4, kv_heads=2, head_dim=16, vocab=100,
            rope_theta=1e6)

GRID = dict(batches=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            contexts=[512, 1024, 2048, 4096, 8192, 16384, 32768],
            prefill=[(1, 64), (1, 256), (1, 1024), (1, 4096), (1, 16384), (4, 256), (4, 1024),
                     (4, 4096), (16, 64), (16, 256), (16, 1024)],
            # (reqs, new tokens each, cached tokens each): branch prompts of a few
            # tokens over a shared context, and longer additions (tool results)
            prefill_cached=[(1, 8, 0), (1, 8, 1024), (1, 8, 4096), (1, 8, 16384),
                            (1, 8, 32768), (8, 8, 0), (8, 8, 1024), (8, 8, 4096),
                            (8, 8, 16384), (32, 8, 0), (32, 8, 1024), (32, 8, 4096),
                            (64, 8, 0), (64, 8, 2048), (1, 256, 0), (1, 256, 4096),
                            (1, 256, 16384), (8, 256, 0), (8, 256, 4096), (8, 256, 16384)],
            widths=[2, 4, 8, 16, 32, 64],
            prefixes=[256, 512, 1024, 2048, 4096, 8192, 16384, 32768],
            suffix=256,
            # (groups, width, prefix) per batch; suffix as above
            cascade_steps=[(1, 64, 4096), (4, 16, 4096), (16, 4, 4096), (8, 8, 1024),
                           (2, 32, 16384), (32, 2, 2048), (4, 8, 8192), (64, 2, 512)])
CPU_GRID = dict(batches=[1, 3], contexts=[40, 100], prefill=[(1, 20), (2, 33)],
                prefill_cached=[(1, 4, 0), (1, 4, 60), (3, 4, 0), (3, 4, 60), (2, 16, 30)],
                widths=[2, 4],
                prefixes=[30, 70], suffix=9, cascade_steps=[(2, 2, 30), (1, 4, 70)])


class Weights:
    def __init__(self, c: dict, dev, dtype) -> None:
        h, d, H, KVH = c["hidden"], c["head_dim"], c["heads"], c["kv_heads"]

        def mk(*shape):
            return torch.empty(*shape, device=dev, dtype=dtype).normal_(0.0, 0.02)

        self.qkv = mk(h, (H + 2 * KVH) * d)
        self.o = mk(H * d, h)
        self.gate_up = mk(h, 2 * c["inter"])
        self.down = mk(c["inter"], h)
        self.n1 = torch.ones(h, device=dev, dtype=dtype)
        self.n2 = torch.ones(h, device=dev, dtype=dtype)
        self.qn = torch.ones(d, device=dev, dtype=dtype)
        self.kn = torch.ones(d, device=dev, dtype=dtype)


class Model:
    """Random-weight decoder with a K and V pool per layer of `pool_tokens`."""

    def __init__(self, c: dict, dev, dtype, pool_tokens: int | None = None,
                 reserve_bytes: float = 14e9) -> None:
        self.c, self.dev, self.dtype = c, dev, dtype
        torch.manual_seed(0)
        self.layers = [Weights(c, dev, dtype) for _ in range(c["layers"])]
        self.embed = torch.empty(c["vocab"], c["hidden"], device=dev, dtype=dtype).normal_(0, 1)
        self.head = torch.empty(c["hidden"], c["vocab"], device=dev, dtype=dtype).normal_(0, .02)
        self.norm = torch.ones(c["hidden"], device=dev, dtype=dtype)
        self.weight_bytes = sum(t.numel() * t.element_size() for w in self.layers
                                for t in vars(w).values()) + 2 * self.embed.numel() * 2
        self.kv_bytes_per_token = 2 * c["layers"] * c["kv_heads"] * c["head_dim"] * 2
        if pool_tokens is None:
            free, _ = torch.cuda.mem_get_info()
            pool_tokens = int((free - reserve_bytes) / self.kv_bytes_per_token)
        self.pool_tokens = pool_tokens
        shape = (pool_tokens, c["kv_heads"], c["head_dim"])
        self.k = [torch.empty(shape, device=dev, dtype=dtype).normal_() for _ in self.layers]
        self.v = [torch.empty(shape, device=dev, dtype=dtype).normal_() for _ in self.layers]
        d = c["head_dim"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2, device=dev).float() / d))
        pos = torch.arange(40000 if dev == "cuda" else 512, device=dev).float()
        ang = torch.outer(pos, inv)
        self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)

    def _rope(self, t, cos, sin):  # t [n, heads, D]; cos/sin [n, 1, D/2] (neox halves)
        half = t.shape[-1] // 2
        t1, t2 = t[..., :half], t[..., half:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    def forward(self, ids, positions, out_loc, attend, last=None):
        """One step over len(ids) new tokens: `attend(i, q)` gives layer i's
        attention output [n, heads, D] for queries q [n, heads, D] (the new
        tokens' K/V already in the pool); `last` picks the rows whose logits
        are taken (all by default). Returns greedy token ids."""
        c = self.c
        H, KVH, D, h = c["heads"], c["kv_heads"], c["head_dim"], c["hidden"]
        n = ids.shape[0]
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        x = self.embed[ids]
        for i, w in enumerate(self.layers):
            y = F.rms_norm(x, (h,), w.n1)
            q, k, v = (y @ w.qkv).split([H * D, KVH * D, KVH * D], dim=-1)
            q = self._rope(F.rms_norm(q.view(n, H, D), (D,), w.qn), cos, sin)
            k = self._rope(F.rms_norm(k.view(n, KVH, D), (D,), w.kn), cos, sin)
            self.k[i][out_loc] = k
            self.v[i][out_loc] = v.view(n, KVH, D)
            x = x + attend(i, q).reshape(n, H * D) @ w.o
            y = F.rms_norm(x, (h,), w.n2)
            gate, up = (y @ w.gate_up).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w.down
        if last is not None:
            x = x[last]
        return (F.rms_norm(x, (h,), self.norm) @ self.head).argmax(-1)


# ------------------------------------------------------------------- timing

def time_graph(fn, budget_s: float = 0.4) -> float:
    """Seconds per call of fn: CUDA-graph replays, the median of 3 rounds, as
    many replays a round as fit `budget_s` / 3 (at least 2). Eager on the CPU."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    end.record()
    torch.cuda.synchronize()
    one = start.elapsed_time(end) / 1e3
    iters = max(2, min(200, int(budget_s / 3 / max(one, 1e-6))))
    times = []
    for _ in range(3):
        start.record()
        for _ in range(iters):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    del g
    return sorted(times)[1]


def time_eager(fn, reps: int) -> float:
    """Seconds per call, eager (one warm-up call, then the median of `reps`)."""
    fn()
    if not torch.cuda.is_available():
        return time_graph(fn)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------ profile

class Profile:
    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.data: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        (self.out / "profile.json").write_text(json.dumps(self.data, indent=1))


def sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count \
        if torch.cuda.is_available() else 4


def check_kernels(dev, dtype, c) -> dict:
    """The Triton kernels against float64 attention, plain and two-level."""
    torch.manual_seed(1)
    KVH, D, G = c["kv_heads"], c["head_dim"], c["heads"] // c["kv_heads"]
    T = 20000 if dev == "cuda" else 600
    kp = torch.randn(T, KVH, D, device=dev, dtype=dtype)
    vp = torch.randn(T, KVH, D, device=dev, dtype=dtype)
    perm = torch.randperm(T, device=dev).to(torch.int32)
    lens = [1, 7, 300, 5000] if dev == "cuda" else [1, 7, 150]
    indptr = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))],
                          device=dev, dtype=torch.int32)
    idx = perm[:sum(lens)].contiguous()
    q = torch.randn(len(lens), KVH, G, D, device=dev, dtype=dtype)
    out = {}
    ref = pa.reference(q, kp, vp, indptr, idx)
    for splits in (1, 5):
        o, _ = pa.Decode(len(lens), KVH, G, D, max(lens), dev, dtype, sms(), splits)(
            q, kp, vp, indptr, idx)
        out[f"plain_splits{splits}_rel_err"] = _rel(o, ref)
    groups, W, P, S = 2, 3, (3000 if dev == "cuda" else 100), 17
    pre, suf = perm[:groups * P].contiguous(), perm[groups * P:groups * P + groups * W * S]
    suf = suf.contiguous()
    qb = torch.randn(groups * W, KVH, G, D, device=dev, dtype=dtype)
    full = torch.cat([torch.cat([pre[(i // W) * P:(i // W + 1) * P], suf[i * S:(i + 1) * S]])
                      for i in range(groups * W)])
    ref = pa.reference(qb, kp, vp, _ptr(groups * W, P + S, dev), full)
    o = two_level_attention(qb, kp, vp, pre, suf, groups, W, P, S, dev, dtype)[0](qb)
    out["two_level_rel_err"] = _rel(o, ref)
    return out


def _rel(x, ref) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def _ptr(seqs: int, length: int, dev):
    return torch.arange(seqs + 1, device=dev, dtype=torch.int32) * length


def two_level_attention(q_like, kp, vp, prefix_idx, suffix_idx, groups, width, prefix, suffix,
                        dev, dtype):
    """(fn(q) -> out, prefix-level Decode) for `groups` groups of `width`
    branches: group j's prefix is prefix_idx[j*prefix:(j+1)*prefix], branch i's
    suffix suffix_idx[i*suffix:...]. q: [groups*width, kv_heads, G, D]."""
    _, KVH, G, D = q_like.shape
    two = pa.TwoLevel(groups, width, KVH, G, D, prefix, suffix, dev, dtype, sms())
    p_ptr, s_ptr = _ptr(groups, prefix, dev), _ptr(groups * width, suffix, dev)

    def fn(q, kp=kp, vp=vp):
        return two(q, kp, vp, p_ptr, prefix_idx, s_ptr, suffix_idx)

    return fn, two.prefix


def decode_grid(p: Profile, m: Model, grid: dict) -> None:
    c, dev = m.c, m.dev
    KVH, G, D = c["kv_heads"], c["heads"] // c["kv_heads"], c["head_dim"]
    rows = []
    p.data["decode"] = {"batches": grid["batches"], "contexts": grid["contexts"],
                              "decode_s": rows}
    for b in grid["batches"]:
        row = []
        rows.append(row)
        for ctx in grid["contexts"]:
            n = ctx + 1  # the context and the token decoded
            if b * n > m.pool_tokens or p.left() < 30:
                row.append(None)
                continue
            indptr = _ptr(b, n, dev)
            indices = torch.arange(b * n, device=dev, dtype=torch.int32)
            out_loc = (indptr[1:] - 1).long()
            positions = torch.full((b,), ctx, device=dev, dtype=torch.long)
            ids = torch.zeros(b, device=dev, dtype=torch.long)
            dec = pa.Decode(b, KVH, G, D, n, dev, m.dtype, sms())

            def attend(i, q, dec=dec, indptr=indptr, indices=indices, b=b):
                return dec(q.view(b, KVH, G, D), m.k[i], m.v[i], indptr, indices)[0]

            t = time_graph(functools.partial(m.forward, ids, positions, out_loc, attend))
            row.append(t)
            print(f"decode b={b:4d} ctx={ctx:6d}: {1e3 * t:8.2f} ms/step "
                  f"(splits {dec.splits})", flush=True)
            p.save()


def prefill_grid(p: Profile, m: Model, grid: dict) -> None:
    c, dev = m.c, m.dev
    H, KVH, D = c["heads"], c["kv_heads"], c["head_dim"]
    cells = p.data["prefill"] = {"cells": [], "attention": None}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [SDPBackend.FLASH_ATTENTION] if dev == "cuda" else [SDPBackend.MATH]
    for reqs, tokens in grid["prefill"]:
        if p.left() < 30 or reqs * tokens > m.pool_tokens:
            continue
        n = reqs * tokens
        ids = torch.zeros(n, device=dev, dtype=torch.long)
        positions = torch.arange(tokens, device=dev).repeat(reqs)
        out_loc = torch.arange(n, device=dev)
        last = torch.arange(1, reqs + 1, device=dev) * tokens - 1

        def attend(i, q, reqs=reqs, tokens=tokens, n=n):
            qq = q.view(reqs, tokens, H, D).transpose(1, 2)
            k = m.k[i][:n].view(reqs, tokens, KVH, D).transpose(1, 2)
            v = m.v[i][:n].view(reqs, tokens, KVH, D).transpose(1, 2)
            with sdpa_kernel(backends):
                if cells["attention"] != "repeat_kv":
                    try:
                        o = F.scaled_dot_product_attention(qq, k, v, is_causal=True,
                                                           enable_gqa=True)
                        cells["attention"] = f"sdpa {backends[0].name.lower()}, enable_gqa"
                        return o.transpose(1, 2)
                    except RuntimeError:
                        cells["attention"] = "repeat_kv"  # then repeated K/V heads
                k = k.repeat_interleave(H // KVH, dim=1)
                v = v.repeat_interleave(H // KVH, dim=1)
                return F.scaled_dot_product_attention(qq, k, v, is_causal=True).transpose(1, 2)

        t = time_eager(functools.partial(m.forward, ids, positions, out_loc, attend, last),
                       reps=3 if n >= 8192 else 5)
        cells["cells"].append({"reqs": reqs, "tokens": tokens, "prefill_s": t})
        print(f"prefill reqs={reqs:3d} x {tokens:6d} tokens: {1e3 * t:9.2f} ms "
              f"({cells['attention']})", flush=True)
        p.save()


def _lower_right(qq, k, v, tried: list, ways):
    """Attention of queries qq [R, H, new, D] over k/v [R, KVH, L, D], the
    queries being the last `new` of L positions (lower-right causal): the way
    that ran last time (`tried[-1]`), else the first of `ways` that runs (its
    name appended to `tried`), so that timed calls raise nothing."""
    if tried:
        return dict(ways)[tried[-1]](qq, k, v)
    for name, fn in ways:
        try:
            o = fn(qq, k, v)
        except RuntimeError:
            continue
        tried.append(name)
        return o
    raise RuntimeError("no lower-right causal attention ran: " + ", ".join(n for n, _ in ways))


def _cached_ways(H: int, KVH: int, dev):
    """Lower-right causal attention, fastest first: SDPA with torch's
    lower-right causal bias (flash on the GPU) with GQA, then with K/V heads
    repeated, then an explicit mask (any backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    flash = [SDPBackend.FLASH_ATTENTION] if dev == "cuda" else [SDPBackend.MATH]

    def rep(t):
        return t.repeat_interleave(H // KVH, dim=1)

    def bias(qq, k, v, gqa):
        with sdpa_kernel(flash):
            m = causal_lower_right(qq.shape[2], k.shape[2])
            if gqa:
                return F.scaled_dot_product_attention(qq, k, v, attn_mask=m, enable_gqa=True)
            return F.scaled_dot_product_attention(qq, rep(k), rep(v), attn_mask=m)

    def masked(qq, k, v):
        new, L = qq.shape[2], k.shape[2]
        mask = torch.ones(new, L, dtype=torch.bool, device=qq.device).tril(L - new)
        return F.scaled_dot_product_attention(qq, rep(k), rep(v), attn_mask=mask)

    return [("sdpa causal_lower_right, enable_gqa", functools.partial(bias, gqa=True)),
            ("sdpa causal_lower_right, repeat_kv", functools.partial(bias, gqa=False)),
            ("sdpa bool mask, repeat_kv", masked)]


def paged_cached(reqs: int, new: int, cached: int, H: int, KVH: int, D: int, dev, dtype):
    """Lower-right causal attention of `reqs` requests of `new` tokens over
    pool rows laid out request by request (`cached` rows, then the `new`
    ones), split-K as a paged extend kernel reads a long cached prefix: the
    cached rows through the paged flash-decode kernel (one sequence per
    request, rows = new tokens x query heads per KV head, so each request's
    prefix is read once for all its new tokens, in KV splits over the SMs),
    each request's new tokens over themselves in torch, the two merged by
    log-sum-exp. fn(q [reqs*new, H, D], k_pool, v_pool) -> like q."""
    G, L = H // KVH, cached + new
    r = torch.arange(reqs, device=dev)[:, None] * L
    indices = (r + torch.arange(cached, device=dev)[None, :]).reshape(-1).to(torch.int32)
    own = (r + cached + torch.arange(new, device=dev)[None, :]).reshape(-1)
    indptr = _ptr(reqs, cached, dev)
    dec = pa.Decode(reqs, KVH, new * G, D, cached, dev, dtype, sms(), group_q=G) \
        if cached else None
    mask = torch.ones(new, new, dtype=torch.bool, device=dev).tril()

    def fn(q, kp, vp):
        qg = q.view(reqs, new, KVH, G, D).float()
        k = kp[own].view(reqs, new, KVH, D).float()
        v = vp[own].view(reqs, new, KVH, D).float()
        sc = torch.einsum("rtkgd,rskd->rkgts", qg, k) / D ** 0.5
        sc = sc.masked_fill(~mask, float("-inf"))
        o = torch.einsum("rkgts,rskd->rkgtd", sc.softmax(-1), v)  # [reqs, KVH, G, new, D]
        if dec is not None:
            o1, l1 = dec(q.reshape(reqs * new, KVH, G, D), kp, vp, indptr, indices)
            o1 = o1.view(reqs, KVH, new, G, D).transpose(2, 3)
            l1 = l1.view(reqs, KVH, new, G).transpose(2, 3)
            o = pa.merge(o1.float(), l1, o, torch.logsumexp(sc, -1))
        return o.permute(0, 3, 1, 2, 4).reshape(reqs * new, H, D).to(dtype)

    return fn


def prefill_cached(p: Profile, m: Model, grid: dict) -> None:
    """Prefill steps over cached context: `reqs` requests of `new` tokens, each
    over its own `cached` tokens already in the pool (laid out request by
    request: cached rows, then the new ones, which the step writes), timed
    eager with torch SDPA's lower-right causal flash attention (one pass per
    request and head, its KV not split: a long prefix read by few programs),
    and as CUDA-graph replays (the GPU's time without the host's launches)
    with it and with `paged_cached` (split-K, as a paged extend kernel). First
    both attentions checked against float64 on a small case."""
    c, dev = m.c, m.dev
    H, KVH, D = c["heads"], c["kv_heads"], c["head_dim"]
    ways = _cached_ways(H, KVH, dev)
    tried: list[str] = []
    sec = p.data["prefill_cached"] = {"cells": [], "attention": tried,
                                      "attention_paged": "paged_cached (split-K, "
                                                         "bench/gpu/paged_attention.Decode)"}
    torch.manual_seed(2)
    R, new, cached = 2, 5, 70
    L = cached + new
    kp = torch.randn(R * L, KVH, D, device=dev, dtype=m.dtype)
    vp = torch.randn(R * L, KVH, D, device=dev, dtype=m.dtype)
    q = torch.randn(R * new, H, D, device=dev, dtype=m.dtype)
    qq = q.view(R, new, H, D).transpose(1, 2)
    kk, vv = (t.view(R, L, KVH, D).transpose(1, 2) for t in (kp, vp))
    sdpa = _lower_right(qq, kk, vv, tried, ways).transpose(1, 2)
    paged = paged_cached(R, new, cached, H, KVH, D, dev, m.dtype)(q, kp, vp).view(R, new, H, D)
    # float64 (pa.reference): each new token a sequence over its request's rows up to itself
    seqs = [torch.arange(r * L, r * L + cached + j + 1, device=dev)
            for r in range(R) for j in range(new)]
    ptr = torch.tensor([0] + [len(x) for x in seqs], device=dev).cumsum(0).to(torch.int32)
    ref = pa.reference(q.view(R * new, KVH, H // KVH, D), kp, vp, ptr,
                       torch.cat(seqs).to(torch.int32)).reshape(R, new, H, D)
    sec["check_rel_err"] = _rel(sdpa, ref)
    sec["check_rel_err_paged"] = _rel(paged, ref)
    print(f"prefill over cached context: attention check rel err {sec['check_rel_err']:.2e} "
          f"({tried[-1]}), paged split-K {sec['check_rel_err_paged']:.2e}", flush=True)
    for reqs, new, cached in grid["prefill_cached"]:
        L = cached + new
        if p.left() < 30 or reqs * L > m.pool_tokens:
            continue
        n = reqs * new
        ids = torch.zeros(n, device=dev, dtype=torch.long)
        positions = (cached + torch.arange(new, device=dev)).repeat(reqs)
        out_loc = (torch.arange(reqs, device=dev)[:, None] * L + cached
                   + torch.arange(new, device=dev)[None, :]).reshape(-1)
        last = torch.arange(1, reqs + 1, device=dev) * new - 1

        def attend(i, q, reqs=reqs, new=new, L=L):
            qq = q.view(reqs, new, H, D).transpose(1, 2)
            k = m.k[i][:reqs * L].view(reqs, L, KVH, D).transpose(1, 2)
            v = m.v[i][:reqs * L].view(reqs, L, KVH, D).transpose(1, 2)
            return _lower_right(qq, k, v, tried, ways).transpose(1, 2)

        fn = paged_cached(reqs, new, cached, H, KVH, D, dev, m.dtype)

        def attend_paged(i, q, fn=fn):
            return fn(q, m.k[i], m.v[i])

        reps = 3 if reqs * L >= 65536 else 5
        step = functools.partial(m.forward, ids, positions, out_loc, attend, last)
        step_paged = functools.partial(m.forward, ids, positions, out_loc, attend_paged, last)
        # eager (as SGLang prefills; small cells are launch-bound, so noisy), and
        # as CUDA-graph replays: the GPU's own time, what the cached context adds
        cell = {"reqs": reqs, "tokens": new, "cached": cached,
                "prefill_s": time_eager(step, reps=reps),
                "graph_s": time_graph(step), "graph_paged_s": time_graph(step_paged)}
        sec["cells"].append(cell)
        print(f"prefill reqs={reqs:3d} x {new:4d} new over {cached:6d} cached: eager "
              f"{1e3 * cell['prefill_s']:8.2f} ms; graph: {1e3 * cell['graph_s']:8.2f} ms "
              f"({tried[-1]}), paged split-K {1e3 * cell['graph_paged_s']:8.2f} ms", flush=True)
        p.save()


def group_layout(groups: int, width: int, prefix: int, suffix: int, dev):
    """Pool rows of `groups` groups of `width` branches: the groups' prefixes
    first, then each branch's suffix. (prefix indices, suffix indices, every
    branch's whole KV: its group's prefix then its suffix)."""
    pre = torch.arange(groups * prefix, device=dev, dtype=torch.int32)
    end = groups * prefix + groups * width * suffix
    suf = torch.arange(groups * prefix, end, device=dev, dtype=torch.int32)
    full = torch.cat([torch.cat([pre[(i // width) * prefix:(i // width + 1) * prefix],
                                 suf[i * suffix:(i + 1) * suffix]])
                      for i in range(groups * width)])
    return pre, suf, full


def cascade_attention(p: Profile, m: Model, grid: dict) -> None:
    """One group per cell, one layer's attention: plain vs two-level."""
    c, dev, dtype = m.c, m.dev, m.dtype
    KVH, G, D = c["kv_heads"], c["heads"] // c["kv_heads"], c["head_dim"]
    S = grid["suffix"]
    recs = p.data["cascade_attention"] = []
    for w in grid["widths"]:
        for P in grid["prefixes"]:
            if w * (P + S) + P > m.pool_tokens or p.left() < 20:
                continue
            q = torch.randn(w, KVH, G, D, device=dev, dtype=dtype)
            pre, suf, full = group_layout(1, w, P, S, dev)
            plain = pa.Decode(w, KVH, G, D, P + S, dev, dtype, sms())
            pp = _ptr(w, P + S, dev)
            two, d1 = two_level_attention(q, m.k[0], m.v[0], pre, suf, 1, w, P, S, dev, dtype)
            tp = time_graph(functools.partial(plain, q, m.k[0], m.v[0], pp, full), 0.15)
            tc = time_graph(functools.partial(two, q), 0.15)
            recs.append({"width": w, "prefix": P, "suffix_tokens": w * S, "plain_s": tp,
                         "cascade_s": tc, "splits_plain": plain.splits,
                         "splits_prefix": d1.splits})
            print(f"cascade attn W={w:3d} P={P:6d}: plain {1e6 * tp:8.1f} us, two-level "
                  f"{1e6 * tc:8.1f} us (x{tp / tc:.2f})", flush=True)
            p.save()


def cascade_steps(p: Profile, m: Model, grid: dict) -> None:
    """Whole decode steps of `groups` groups of `width` branches: plain vs two-level."""
    c, dev, dtype = m.c, m.dev, m.dtype
    KVH, G, D = c["kv_heads"], c["heads"] // c["kv_heads"], c["head_dim"]
    S = grid["suffix"]
    recs = p.data["cascade_steps"] = []
    for groups, w, P in grid["cascade_steps"]:
        b = groups * w
        if groups * P + b * S > m.pool_tokens or p.left() < 30:
            continue
        pre, suf, full = group_layout(groups, w, P, S, dev)
        out_loc = suf.view(b, S)[:, -1].long()  # the decoded token is each suffix's last
        positions = torch.full((b,), P + S - 1, device=dev, dtype=torch.long)
        ids = torch.zeros(b, device=dev, dtype=torch.long)
        plain = pa.Decode(b, KVH, G, D, P + S, dev, dtype, sms())
        pp = _ptr(b, P + S, dev)
        q0 = torch.empty(b, KVH, G, D, device=dev, dtype=dtype)
        two, _ = two_level_attention(q0, None, None, pre, suf, groups, w, P, S, dev, dtype)

        def attend_plain(i, q, b=b, plain=plain, pp=pp, full=full):
            return plain(q.view(b, KVH, G, D), m.k[i], m.v[i], pp, full)[0]

        def attend_two(i, q, b=b, two=two):
            return two(q.view(b, KVH, G, D), m.k[i], m.v[i])

        tp = time_graph(functools.partial(m.forward, ids, positions, out_loc, attend_plain))
        tc = time_graph(functools.partial(m.forward, ids, positions, out_loc, attend_two))
        # The same step both ways: how often the greedy tokens agree. A random-weight
        # 64-layer model amplifies rounding differences, so the same for plain
        # attention with another split count (the same sum in another order) is the
        # yardstick.
        resplit = pa.Decode(b, KVH, G, D, P + S, dev, dtype, sms(), splits=plain.splits + 3)

        def attend_resplit(i, q, b=b, resplit=resplit, pp=pp, full=full):
            return resplit(q.view(b, KVH, G, D), m.k[i], m.v[i], pp, full)[0]

        ref = m.forward(ids, positions, out_loc, attend_plain)
        same = float((ref == m.forward(ids, positions, out_loc, attend_two)).float().mean())
        same_resplit = float((ref == m.forward(ids, positions, out_loc, attend_resplit))
                             .float().mean())
        recs.append({"groups": groups, "width": w, "prefix": P, "suffix": S, "batch": b,
                     "plain_s": tp, "cascade_s": tc, "same_tokens": same,
                     "same_tokens_plain_resplit": same_resplit})
        print(f"cascade step {groups:3d} x W={w:3d} P={P:6d}: plain {1e3 * tp:8.2f} ms, "
              f"two-level {1e3 * tc:8.2f} ms (x{tp / tc:.2f}); same tokens {same:.3f} "
              f"(plain resplit: {same_resplit:.3f})", flush=True)
        p.save()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cpu = "--cpu-check" in argv
    budget = float(argv[argv.index("--budget") + 1]) if "--budget" in argv else 420.0
    flags_with_values = {argv[i + 1] for i, a in enumerate(argv[:-1])
                         if a in ("--budget", "--only")}
    out = Path(next((a for a in argv if not a.startswith("--") and a not in flags_with_values),
                    "."))
    out.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    c, grid = (QWEN3_32B, GRID) if dev == "cuda" else (TINY, CPU_GRID)
    p = Profile(out, budget)
    import triton
    p.data = {"model": "qwen3-32b" if dev == "cuda" else "tiny (cpu check)",
              "gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype),
              "shape": c, "layers_run": c["layers"]}
    print(p.data, flush=True)
    try:
        p.data["kernel_check"] = check_kernels(dev, dtype, c)
        print("kernel check", p.data["kernel_check"], flush=True)
        m = Model(c, dev, dtype, pool_tokens=None if dev == "cuda" else 2000)
        p.data.update(weight_bytes=m.weight_bytes, kv_bytes_per_token=m.kv_bytes_per_token,
                      pool_tokens=m.pool_tokens, build_s=round(time.monotonic() - p.t0, 1))
        print(f"model built: {m.weight_bytes / 1e9:.1f} GB weights, KV pool "
              f"{m.pool_tokens} tokens, {time.monotonic() - p.t0:.1f} s", flush=True)
        p.save()
    except Exception as e:
        p.data["error"] = f"setup: {type(e).__name__}: {e}"
        p.save()
        raise
    sections = (("decode", decode_grid), ("prefill", prefill_grid),
                ("prefill_cached", prefill_cached),
                ("cascade_attention", cascade_attention), ("cascade_steps", cascade_steps))
    only = argv[argv.index("--only") + 1].split(",") if "--only" in argv else None
    for name, fn in sections:
        if only is not None and name not in only:
            continue
        t = time.monotonic()
        try:
            fn(p, m, grid)
        except Exception as e:  # keep what the other parts measure
            p.data.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            print(f"{name} failed: {type(e).__name__}: {e}", flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
        p.data.setdefault("section_s", {})[name] = round(time.monotonic() - t, 1)
        print(f"{name}: {time.monotonic() - t:.1f} s", flush=True)
        p.save()
    return 1 if p.data.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
