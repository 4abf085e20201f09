"""Measure on a GPU (run on the lent H200; torch only):

1. decode steps of a Qwen3-32B-shaped model with random BF16 weights over
   batch size x context length, as the table `taper sim --cost-model
   measured:PATH` interpolates. Four decoder layers are built and timed (CUDA
   graph replays); a step is 16x that (64 identical layers) plus the LM head.
2. two-level (cascade) decode attention for branch groups sharing a prefix:
   prefix attention once per group, suffix attention per branch, merged by
   log-sum-exp, checked against plain attention over each branch's whole KV,
   and both timed.

    python3 bench/gpu/h200_profile.py OUT_DIR [--quick]
Writes decode_profile.json and cascade.json to OUT_DIR, printing a summary.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

QWEN3_32B = dict(layers=64, hidden=5120, inter=25600, heads=64, kv_heads=8, head_dim=128,
                 vocab=151936)
MEASURED_LAYERS = 4


def attn_lse(q, k, v):
    """Attention of q [B, 1, M, D] over k, v [B, 1, N, D]; returns (out [B,1,M,D],
    lse [B,1,M] natural log). Flash kernel on CUDA, math on CPU."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if q.is_cuda:
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                 scale=scale)
        return out[0], out[1]
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype), lse


def gqa_decode(q, k, v):
    """q [B, H, D] (one token per sequence), k/v [B, KVH, N, D] -> out [B, H, D], lse [B, H].
    Each KV head's query heads become the query rows of one MQA problem."""
    b, h, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    qq = q.view(b, kvh, g, d).reshape(b * kvh, 1, g, d)
    kk = k.reshape(b * kvh, 1, k.shape[2], d)
    vv = v.reshape(b * kvh, 1, v.shape[2], d)
    o, lse = attn_lse(qq, kk, vv)
    return o.reshape(b, h, d), lse.reshape(b, h)


class Layer(torch.nn.Module):
    def __init__(self, c, dev, dtype):
        super().__init__()
        h, hd = c["hidden"], c["head_dim"]
        self.c = c
        mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype) * 0.02  # noqa: E731
        self.qkv = mk(h, (c["heads"] + 2 * c["kv_heads"]) * hd)
        self.o = mk(c["heads"] * hd, h)
        self.gate_up = mk(h, 2 * c["inter"])
        self.down = mk(c["inter"], h)
        self.n1 = torch.ones(h, device=dev, dtype=dtype)
        self.n2 = torch.ones(h, device=dev, dtype=dtype)

    def forward(self, x, kcache, vcache):
        c, hd = self.c, self.c["head_dim"]
        b = x.shape[0]
        y = F.rms_norm(x, (x.shape[-1],), self.n1)
        qkv = y @ self.qkv
        q = qkv[:, : c["heads"] * hd].reshape(b, c["heads"], hd)
        # The new token's k/v would be appended to the cache; its cost is one row.
        a, _ = gqa_decode(q, kcache, vcache)
        x = x + a.reshape(b, -1) @ self.o
        y = F.rms_norm(x, (x.shape[-1],), self.n2)
        gu = y @ self.gate_up
        gate, up = gu.chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ self.down


def time_graph(fn, iters: int) -> float:
    """Seconds per call of fn, timed over CUDA graph replays (eager on CPU)."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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


def decode_profile(out: Path, quick: bool) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    c = dict(QWEN3_32B)
    if dev == "cpu":  # a shape check on a machine without a GPU
        c.update(hidden=256, inter=512, heads=8, kv_heads=2, head_dim=32, vocab=1000)
    layers = [Layer(c, dev, dtype) for _ in range(MEASURED_LAYERS)]
    head = torch.randn(c["hidden"], c["vocab"], device=dev, dtype=dtype) * 0.02
    batches = [1, 8, 32] if quick else [1, 4, 16, 32, 64, 128, 256]
    contexts = [512, 2048] if quick else [512, 1024, 2048, 4096, 8192]
    table = []
    for b in batches:
        row = []
        for ctx in contexts:
            kvh, hd = c["kv_heads"], c["head_dim"]
            caches = [(torch.randn(b, kvh, ctx, hd, device=dev, dtype=dtype),
                       torch.randn(b, kvh, ctx, hd, device=dev, dtype=dtype))
                      for _ in layers]
            x = torch.randn(b, c["hidden"], device=dev, dtype=dtype)

            def step(x=x, caches=caches):
                y = x
                for layer, (kc, vc) in zip(layers, caches):
                    y = layer(y, kc, vc)
                return y

            t_layers = time_graph(step, 5 if dev == "cpu" else 20)
            t_head = time_graph(lambda x=x: x @ head, 5 if dev == "cpu" else 20)
            total = t_layers * c["layers"] / MEASURED_LAYERS + t_head
            row.append(total)
            print(f"decode b={b:4d} ctx={ctx:5d}: {1e3 * total:8.2f} ms/step", flush=True)
            caches = None  # free this size's cache before the next
            if dev == "cuda":
                torch.cuda.empty_cache()
        table.append(row)
    data = {"model": "qwen3-32b", "gpu": torch.cuda.get_device_name() if dev == "cuda" else dev,
            "dtype": str(dtype), "measured_layers": MEASURED_LAYERS, "batches": batches,
            "contexts": contexts, "decode_s": table,
            "method": "4 random-weight Qwen3-32B decoder layers (RMSNorm, fused QKV GEMM, "
                      "flash decode attention with GQA over a dense KV cache, O proj, SwiGLU MLP) "
                      "timed as CUDA-graph replays, x16 for 64 layers, plus the LM head GEMM; "
                      "RoPE, sampling and the KV append are not included",
            "torch": torch.__version__}
    (out / "decode_profile.json").write_text(json.dumps(data, indent=2))
    return data


def cascade(out: Path, quick: bool) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    h, kvh, d = (64, 8, 128) if dev == "cuda" else (8, 2, 32)
    suffix = 128
    results = []
    for branches in (16, 64):
        for prefix in (1024, 4096):
            if quick and (branches, prefix) != (16, 1024):
                continue
            torch.manual_seed(0)
            q = torch.randn(branches, h, d, device=dev, dtype=dtype)
            kp = torch.randn(1, kvh, prefix, d, device=dev, dtype=dtype)
            vp = torch.randn(1, kvh, prefix, d, device=dev, dtype=dtype)
            ks = torch.randn(branches, kvh, suffix, d, device=dev, dtype=dtype)
            vs = torch.randn(branches, kvh, suffix, d, device=dev, dtype=dtype)
            kfull = torch.cat([kp.expand(branches, -1, -1, -1), ks], dim=2).contiguous()
            vfull = torch.cat([vp.expand(branches, -1, -1, -1), vs], dim=2).contiguous()
            g = h // kvh

            def plain(q=q, kfull=kfull, vfull=vfull):
                return gqa_decode(q, kfull, vfull)[0]

            def two_level(q=q, kp=kp, vp=vp, ks=ks, vs=vs, branches=branches, prefix=prefix,
                          g=g):
                # Level 1: every branch's queries against the shared prefix at once.
                qp = q.view(branches, kvh, g, d).permute(1, 0, 2, 3).reshape(kvh, 1,
                                                                              branches * g, d)
                o1, l1 = attn_lse(qp, kp.reshape(kvh, 1, prefix, d),
                                  vp.reshape(kvh, 1, prefix, d))
                o1 = o1.reshape(kvh, branches, g, d).permute(1, 0, 2, 3).reshape(branches, h, d)
                l1 = l1.reshape(kvh, branches, g).permute(1, 0, 2).reshape(branches, h)
                # Level 2: each branch against its own suffix.
                o2, l2 = gqa_decode(q, ks, vs)
                m = torch.maximum(l1, l2)
                w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
                return ((o1.float() * w1[..., None] + o2.float() * w2[..., None])
                        / (w1 + w2)[..., None]).to(dtype)

            ref = gqa_decode(q.float(), kfull.float(), vfull.float())[0] if dev == "cpu" else \
                _reference(q, kfull, vfull)
            err_plain = _rel(plain(), ref)
            err_two = _rel(two_level(), ref)
            iters = 3 if dev == "cpu" else 50
            t_plain, t_two = time_graph(plain, iters), time_graph(two_level, iters)
            rec = {"branches": branches, "prefix": prefix, "suffix": suffix, "heads": h,
                   "kv_heads": kvh, "head_dim": d, "rel_err_plain": err_plain,
                   "rel_err_two_level": err_two, "plain_s": t_plain, "two_level_s": t_two,
                   "speedup": t_plain / t_two}
            results.append(rec)
            print(f"cascade B={branches:3d} P={prefix:5d}: plain {1e6 * t_plain:8.1f} us, "
                  f"two-level {1e6 * t_two:8.1f} us (x{t_plain / t_two:.2f}); rel err "
                  f"{err_plain:.1e} / {err_two:.1e}", flush=True)
    data = {"device": torch.cuda.get_device_name() if dev == "cuda" else dev,
            "dtype": str(dtype), "results": results,
            "method": "torch flash attention (aten._scaled_dot_product_flash_attention, "
                      "which returns the log-sum-exp) for both levels, merged by LSE; "
                      "plain = flash over each branch's materialized prefix+suffix KV; "
                      "CUDA-graph replays"}
    (out / "cascade.json").write_text(json.dumps(data, indent=2))
    return data


def _reference(q, k, v):
    """float64 attention on the GPU, chunked over branches."""
    outs = []
    for i in range(q.shape[0]):
        o, _ = gqa_decode_math(q[i:i + 1].double(), k[i:i + 1].double(), v[i:i + 1].double())
        outs.append(o)
    return torch.cat(outs)


def gqa_decode_math(q, k, v):
    b, h, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    qq = q.view(b, kvh, g, d)
    s = torch.einsum("bkgd,bknd->bkgn", qq, k) / math.sqrt(d)
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bkgn,bknd->bkgd", p, v)
    return o.reshape(b, h, d), None


def _rel(x, ref) -> float:
    x, ref = x.double(), ref.double()
    if torch.isnan(x).any():
        return float("nan")
    return float((x - ref).norm() / ref.norm())


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    quick = "--quick" in sys.argv
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for name, fn in (("cascade", cascade), ("decode", decode_profile)):
        t = time.perf_counter()
        try:
            fn(out, quick)
        except Exception as e:  # keep what the other part measured
            print(f"{name} failed: {type(e).__name__}: {e}", flush=True)
        print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
