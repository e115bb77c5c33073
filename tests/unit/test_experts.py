"""ConvExpert's padded convolution batch: few shapes, and the same numbers as no padding."""

import copy

import pytest
import torch

from pce_dist.model.experts import ConvExpert, padded_rows


def test_padded_rows_bounds_extra_rows_and_shapes():
    for m in range(1, 5000):
        r = padded_rows(m)
        assert r >= m and (r - m <= 7 or (r - m) / m < 1 / 8), (m, r)
    assert padded_rows(64) == 64 and padded_rows(65) == 72 and padded_rows(513) == 576
    assert len({padded_rows(m) for m in range(1, 513)}) == 32  # 8 below 64 rows, then 8 per octave


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("M", [5, 9, 70, 129])
def test_bucketed_expert_equals_unpadded(norm, M):
    torch.manual_seed(0)
    plain = ConvExpert(6, 8, norm=norm, bucket_rows=False).train()
    bucketed = copy.deepcopy(plain)
    bucketed.bucket_rows = True
    seen = []
    bucketed.conv1.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    x = torch.randn(M, 6, 5, 5)
    outs = []
    for expert in (plain, bucketed):
        xi = x.clone().requires_grad_(True)
        y = expert(xi)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in expert.named_parameters()},
                     {n: b.clone() for n, b in expert.named_buffers()}))
    assert seen == [padded_rows(M)]  # the convolution really ran on the padded batch
    (y0, gx0, g0, b0), (y1, gx1, g1, b1) = outs
    assert y1.shape == (M, 8, 5, 5)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for name in g0:  # weight gradients sum over rows: another batch size, another summation order
        scale = g0[name].abs().max().item()
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
    for name in b0:  # BatchNorm running statistics saw only the real rows
        torch.testing.assert_close(b1[name], b0[name], msg=name)
