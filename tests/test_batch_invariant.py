"""The CPU engine's batch-invariant matrix products (sglang_taper.cpu.batch_invariant)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sglang_taper.cpu import batch_invariant as bi


@pytest.fixture()
def invariant():
    bi.enable()
    yield
    bi.disable()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_in", [(512, 128), (128, 256), (384, 128)])
def test_a_row_is_the_same_in_every_batch_and_position(invariant, dtype, out_in):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_in, generator=gen).to(dtype)
    row = torch.randn(out_in[1], generator=gen).to(dtype)
    alone = F.linear(row[None], w)[0]
    for m in (2, 3, 4, 7, 15, 16, 17, 40, 100):
        for pos in (0, m // 2, m - 1):
            x = torch.randn(m, out_in[1], generator=gen).to(dtype)
            x[pos] = row
            assert torch.equal(F.linear(x, w)[pos], alone), (m, pos)


def test_every_entry_point_matches_torch(invariant):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(37, 64, generator=gen), torch.randn(64, 48, generator=gen)
    bias = torch.randn(48, generator=gen)
    ref = (a.double() @ b.double()).float()
    torch.testing.assert_close(torch.mm(a, b), ref)
    torch.testing.assert_close(a @ b, ref)
    torch.testing.assert_close(torch.addmm(bias, a, b), ref + bias)
    torch.testing.assert_close(torch.addmm(bias, a, b, beta=0.5, alpha=2.0),
                               2.0 * ref + 0.5 * bias)
    out = torch.empty(37, 48)
    torch.mm(a, b, out=out)
    torch.testing.assert_close(out, ref)
    three_d = a.view(1, 37, 64) @ b  # folds to mm
    torch.testing.assert_close(three_d[0], ref)
    assert torch.mm(a[:0], b).shape == (0, 48)


def test_disable_restores_torch_kernels():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 32, generator=gen), torch.randn(32, 8, generator=gen)
    before = torch.mm(a, b)
    bi.enable()
    assert bi.enabled()
    bi.disable()
    assert not bi.enabled()
    assert torch.equal(torch.mm(a, b), before)
