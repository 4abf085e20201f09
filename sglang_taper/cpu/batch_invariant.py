"""Batch-invariant matrix products for the CPU engine.

A CPU GEMM does not compute a row the same way at every batch size: with
oneDNN/MKL in float32, a row multiplied alone (M=1), in a batch of 2-3, or in
a batch of 4+ comes out different in its last bits (measured: up to 1e-5 on
the tiny model's 128x512 layers). Holding a branch out of a step changes the
decode batch size of everyone in it, so those bits change, and now and then a
greedy choice between two near-tied tokens flips. TAPER's promise is that
regulation never changes what a request generates, so the CPU engine makes
each row's product independent of the batch around it.

How: every `aten::mm` / `aten::addmm` on CPU is computed in tiles of exactly
`TILE` rows (the last one zero-padded) with one batched `bmm` call. A kernel
called with one fixed shape computes each row the same way whatever the other
rows hold and wherever the row sits (verified in tests/test_batch_invariant.py),
so a token's hidden state no longer depends on how many tokens shared its step.
This is the CPU counterpart of SGLang's `--enable-deterministic-inference`,
whose kernels are Triton (GPU only). Cost: about +20% on the matmuls.

Installed in the server's processes by the plugin when `taper serve` sets
`TAPER_BATCH_INVARIANT=1` (the default on the CPU engine).
"""

from __future__ import annotations

import torch

TILE = 16

_lib = None


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for 2-D `a` (M, K) and `b` (K, N), each row computed as in a
    (TILE, K) @ (K, N) product."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0:
        return a.new_empty((0, n))
    pad = -m % TILE
    if pad:
        a = torch.cat([a, a.new_zeros((pad, k))])
    else:
        a = a.contiguous()
    tiles = a.shape[0] // TILE
    out = torch.bmm(a.view(tiles, TILE, k), b.expand(tiles, k, n))
    return out.view(tiles * TILE, n)[:m]


def _mm_out(a, b, *, out):
    return out.copy_(mm(a, b))


def _addmm(bias, a, b, *, beta=1, alpha=1):
    out = mm(a, b)
    if alpha != 1:
        out = out * alpha
    if beta == 0:
        return out
    return out + (bias if beta == 1 else bias * beta)


def enable() -> None:
    """Route CPU `mm`/`addmm` in this process through the tiled kernel (idempotent)."""
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("mm", mm, "CPU")
    lib.impl("mm.out", _mm_out, "CPU")
    lib.impl("addmm", _addmm, "CPU")
    _lib = lib


def disable() -> None:
    """Restore torch's own CPU kernels (for tests)."""
    global _lib
    if _lib is not None:
        _lib._destroy()
        _lib = None


def enabled() -> bool:
    return _lib is not None
