"""Two-level (cascade) attention equals plain attention; plans are right."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_taper.cascade import (
    attention_lse,
    group_layout,
    plan_two_level,
    run_plan,
    two_level_decode,
)

HEADS = [(4, 4), (4, 2), (8, 1), (6, 3), (8, 2)]  # (query heads, KV heads): MHA, GQA, MQA


@settings(max_examples=80, deadline=None)
@given(b=st.integers(1, 6), p=st.integers(0, 40), heads=st.sampled_from(HEADS),
       d=st.sampled_from([4, 8, 16]), data=st.data())
def test_two_level_equals_plain_attention(b, p, heads, d, data):
    h, kvh = heads
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    suffixes = [data.draw(st.integers(0 if p else 1, 20)) for _ in range(b)]
    q = torch.randn(b, h, d, generator=g, dtype=torch.float64)
    pk, pv = (torch.randn(p, kvh, d, generator=g, dtype=torch.float64) for _ in range(2))
    sk = [torch.randn(s, kvh, d, generator=g, dtype=torch.float64) for s in suffixes]
    sv = [torch.randn(s, kvh, d, generator=g, dtype=torch.float64) for s in suffixes]
    scale = 1 / math.sqrt(d)
    got = two_level_decode(q, pk, pv, sk, sv, scale)
    for i in range(b):
        want, _ = attention_lse(q[i:i + 1], torch.cat([pk, sk[i]]), torch.cat([pv, sv[i]]),
                                scale)
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-9, atol=1e-9)


def test_two_level_float32_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(16, 8, 32, generator=g)
    pk, pv = torch.randn(300, 2, 32, generator=g), torch.randn(300, 2, 32, generator=g)
    sk = [torch.randn(7 + i, 2, 32, generator=g) for i in range(16)]
    sv = [torch.randn(7 + i, 2, 32, generator=g) for i in range(16)]
    got = two_level_decode(q, pk, pv, sk, sv, 0.2)
    for i in range(16):
        want, _ = attention_lse(q[i:i + 1].double(), torch.cat([pk, sk[i]]).double(),
                                torch.cat([pv, sv[i]]).double(), 0.2)
        torch.testing.assert_close(got[i:i + 1].double(), want, rtol=2e-5, atol=2e-6)


def _batch(seed: int):
    """KV slot rows for a decode batch: two groups sharing prefixes, ordinary rows."""
    g = torch.Generator().manual_seed(seed)
    next_slot = iter(range(10_000))

    def slots(n):
        return torch.tensor([next(next_slot) for _ in range(n)])

    p0, p1 = slots(50), slots(17)
    rows, codes = [], []
    for i in range(4):  # group 0: prefix p0, suffixes of different lengths
        rows.append(torch.cat([p0, slots(3 + i)]))
        codes.append(0)
    rows.append(slots(30))  # an ordinary request
    codes.append(-1)
    for i in range(3):  # group 1
        rows.append(torch.cat([p1, slots(1 + 2 * i)]))
        codes.append(7)
    rows.append(torch.cat([p1[:5], slots(9)]))  # shares less: group 1's LCP shrinks to 5
    codes.append(7)
    rows.append(torch.cat([slots(4), slots(2)]))  # a group of one: ordinary path
    codes.append(9)
    order = torch.randperm(len(rows), generator=g).tolist()
    return [rows[i] for i in order], [codes[i] for i in order]


def test_group_layout_finds_the_shared_prefix():
    rows, codes = _batch(1)
    groups = group_layout(rows, codes)
    by_size = sorted((len(gr.rows), gr.prefix_len) for gr in groups)
    assert by_size == [(4, 5), (4, 50)]
    for gr in groups:
        first = rows[gr.rows[0]][: gr.prefix_len]
        assert all(torch.equal(rows[r][: gr.prefix_len], first) for r in gr.rows)
        assert all(codes[r] == codes[gr.rows[0]] for r in gr.rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_level_plan_computes_plain_attention(seed):
    """The plan handed to FlashInfer's cascade wrapper, executed with the torch
    reference semantics, gives plain attention for every row."""
    rows, codes = _batch(seed)
    groups = group_layout(rows, codes)
    perm, levels = plan_two_level(rows, groups)
    assert sorted(perm.tolist()) == list(range(len(rows)))
    for lv in levels:
        assert int(lv.qo_indptr[-1]) == len(rows)
        assert int(lv.kv_indptr[-1]) == len(lv.kv_indices)
        assert (lv.kv_indptr[1:] > lv.kv_indptr[:-1]).all()  # no empty entry
    # Shared prefixes are read once: level 0 holds fewer slots than the batch's KV.
    assert len(levels[0].kv_indices) < sum(len(r) for r in rows) - len(rows)
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(10_000, 2, 16, generator=g, dtype=torch.float64)
    v_cache = torch.randn(10_000, 2, 16, generator=g, dtype=torch.float64)
    q = torch.randn(len(rows), 4, 16, generator=g, dtype=torch.float64)
    got = run_plan(q, k_cache, v_cache, perm, levels, 0.25)
    for i, r in enumerate(rows):
        want, _ = attention_lse(q[i:i + 1], k_cache[r], v_cache[r], 0.25)
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-9, atol=1e-9)


def test_gpu_backend_imports_and_plans_on_cpu():
    pytest.importorskip("flashinfer")
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    from sglang_taper.adapter.cascade_backend import _flashinfer_backend_class

    cls = _flashinfer_backend_class()
    assert issubclass(cls, FlashInferAttnBackend)
    rows, codes = _batch(3)
    perm, levels = plan_two_level(rows, group_layout(rows, codes))
    assert len(levels) == 2 and all(lv.kv_indices.dtype == torch.int32 for lv in levels)
