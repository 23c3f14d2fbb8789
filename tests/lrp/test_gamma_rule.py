"""The closed-form Gamma backward against a literal statement of the rule (float64).

The literal statement builds the four modified affine maps of zennit's ``Gamma`` with explicit
x+/x- and W+/W- splits and takes their gradients through autograd; it shares no algebra with
``vitlens.lrp.rules._Gamma``. Covered: linear on 2-D and 4-D inputs, a transposed-view weight,
convolutions with stride, padding, dilation and groups, with and without bias, exact zeros in
the input, and outputs of both signs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitlens.lrp.rules import gamma_conv2d, gamma_linear

EPS = 1e-6


def _stab(z):
    return z + EPS * (2.0 * (z >= 0).to(z.dtype) - 1.0)


def literal_gamma_relevance(x, weight, bias, gamma, op, upstream):
    """R_in for z = op(x, W, b) with output relevance R = z * upstream, by the rule's definition."""
    b = torch.zeros(weight.shape[0], dtype=x.dtype) if bias is None else bias
    w_up, w_down = weight + gamma * weight.clamp(min=0), weight + gamma * weight.clamp(max=0)
    b_up, b_down = b + gamma * b.clamp(min=0), b + gamma * b.clamp(max=0)
    x_pos = x.clamp(min=0).requires_grad_(True)
    x_neg = x.clamp(max=0).requires_grad_(True)
    z = op(x, weight, b).detach()
    relevance = z * upstream
    up = op(x_pos, w_up, b_up) + op(x_neg, w_down, None)
    down = op(x_pos, w_down, b_down) + op(x_neg, w_up, None)
    s_up = relevance * (z > 0) / _stab(up.detach())
    s_down = relevance * (z < 0) / _stab(down.detach())
    g_pos, g_neg = torch.autograd.grad((up * s_up).sum() + (down * s_down).sum(), [x_pos, x_neg])
    return x_pos.detach() * g_pos + x_neg.detach() * g_neg


def _with_zeros(x):
    x = x.clone()
    x.view(-1)[::7] = 0.0
    return x


@pytest.mark.parametrize("gamma", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 4, 6)])
def test_linear_matches_literal_rule(gamma, with_bias, shape):
    g = torch.Generator().manual_seed(0)
    x = _with_zeros(torch.randn(*shape, generator=g, dtype=torch.float64))
    weight = torch.randn(7, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(7, generator=g, dtype=torch.float64) if with_bias else None
    upstream = torch.randn(*shape[:-1], 7, generator=g, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    out = gamma_linear(xg, weight, bias, gamma)
    torch.testing.assert_close(out, F.linear(x, weight, bias))  # the forward is untouched
    (grad,) = torch.autograd.grad(out, xg, upstream)
    expected = literal_gamma_relevance(x, weight, bias, gamma, F.linear, upstream)
    torch.testing.assert_close(xg.detach() * grad, expected, rtol=1e-9, atol=1e-9)


def test_gamma_zero_is_the_ordinary_gradient():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    upstream = torch.randn(3, 5, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(gamma_linear(x, weight, bias, 0.0), x, upstream)
    torch.testing.assert_close(grad, upstream @ weight)


def test_linear_relevance_is_conserved_without_bias():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 8, generator=g, dtype=torch.float64)
    upstream = torch.randn(4, 5, generator=g, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    out = gamma_linear(xg, weight, None, 0.7)
    (grad,) = torch.autograd.grad(out, xg, upstream)
    # every output's relevance is redistributed over its inputs (up to the 1e-6 stabiliser)
    torch.testing.assert_close((x * grad).sum(), (out * upstream).sum(), rtol=1e-5, atol=0)


def test_linear_with_transposed_view_weight():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)  # a Conv1D-style (in, out) weight
    upstream = torch.randn(3, 4, generator=g, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gamma_linear(xg, w.t(), None, 0.5), xg, upstream)
    expected = literal_gamma_relevance(x, w.t().contiguous(), None, 0.5, F.linear, upstream)
    torch.testing.assert_close(x * grad, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gamma", [0.25, 1.0])
@pytest.mark.parametrize("conv_kwargs", [
    dict(kernel_size=4, stride=4),  # a patch embedding (the matrix-product path)
    dict(kernel_size=(4, 3), stride=(4, 3), bias=False),  # non-square patches
    dict(kernel_size=5, stride=5),  # does not tile 12 x 12: the transposed-convolution path
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=3, padding=2, dilation=2, groups=2),
])
def test_conv2d_matches_literal_rule(gamma, conv_kwargs):
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(4, 6, **conv_kwargs).double()
    x = _with_zeros(torch.randn(2, 4, 12, 12, dtype=torch.float64))
    xg = x.clone().requires_grad_(True)
    out = gamma_conv2d(xg, conv, gamma)
    torch.testing.assert_close(out, conv(x))
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, xg, upstream)

    def op(inp, weight, bias):
        return F.conv2d(inp, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    expected = literal_gamma_relevance(x, conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                                       gamma, op, upstream)
    torch.testing.assert_close(xg.detach() * grad, expected, rtol=1e-9, atol=1e-9)
