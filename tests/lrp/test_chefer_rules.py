"""The rules of vitlens.lrp.chefer (Chefer et al., CVPR 2021) against their formulas, in float64.

Each rule is a modified backward in Gradient x Input form: with an upstream gradient g = R_out / y at the
output y, the relevance an input x receives is x * (its modified gradient). The formulas are written out
here element by element (numpy), independently of the autograd functions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import tiny_timm_vit
from vitlens.lrp.chefer import alpha1_linear, chefer_rules, halved_z_matmul, identity, residual_add


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _relevance_in(fn, inputs, relevance_out):
    """x * d(sum(out * g))/dx with g = R_out / out, for every input."""
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, relevance_out / out.detach())
    return out, [t.detach() * g for t, g in zip(inputs, grads)]


def test_alpha1_linear_is_the_sign_aware_alpha1_beta0_rule_without_bias():
    x = torch.randn(5, 7, dtype=torch.float64, generator=_gen(0))
    weight = torch.randn(4, 7, dtype=torch.float64, generator=_gen(1))
    bias = torch.randn(4, dtype=torch.float64, generator=_gen(2))
    r_out = torch.randn(5, 4, dtype=torch.float64, generator=_gen(3))
    out, (r_in,) = _relevance_in(lambda t: alpha1_linear(t, weight, bias), [x], r_out)
    assert torch.equal(out, torch.nn.functional.linear(x, weight, bias))
    X, W, R = x.numpy(), weight.numpy(), r_out.numpy()
    expected = np.zeros_like(X)
    for n in range(X.shape[0]):
        for j in range(W.shape[0]):
            contrib = np.array([X[n, i] * W[j, i] if X[n, i] * W[j, i] > 0 else 0.0 for i in range(X.shape[1])])
            expected[n] += contrib * R[n, j] / (contrib.sum() + 1e-9)
    np.testing.assert_allclose(r_in.numpy(), expected, rtol=1e-10, atol=1e-12)
    # each output's relevance is handed on whole (the bias takes none)
    np.testing.assert_allclose(r_in.sum(1).numpy(), R.sum(1), rtol=1e-7)


@pytest.mark.parametrize("batch_dim", [0, 1])
def test_residual_add_rescales_each_branch_per_image(batch_dim):
    a = torch.randn(3, 5, 6, dtype=torch.float64, generator=_gen(4))
    b = torch.randn(3, 5, 6, dtype=torch.float64, generator=_gen(5))
    r_out = torch.randn(3, 5, 6, dtype=torch.float64, generator=_gen(6))
    if batch_dim == 1:
        a, b, r_out = (t.transpose(0, 1).contiguous() for t in (a, b, r_out))
    out, (r_a, r_b) = _relevance_in(lambda s, t: residual_add(s, t, batch_dim), [a, b], r_out)
    assert torch.equal(out, a + b)
    if batch_dim == 1:
        a, b, r_out, r_a, r_b = (t.transpose(0, 1) for t in (a, b, r_out, r_a, r_b))
    for image in range(3):
        A, B, R = a[image].numpy(), b[image].numpy(), r_out[image].numpy()
        za, zb = A * R / (A + B + 1e-9), B * R / (A + B + 1e-9)  # the z-rule split
        sa, sb = za.sum(), zb.sum()
        expected_a = za * (abs(sa) / (abs(sa) + abs(sb)) * R.sum()) / sa
        expected_b = zb * (abs(sb) / (abs(sa) + abs(sb)) * R.sum()) / sb
        np.testing.assert_allclose(r_a[image].numpy(), expected_a, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(r_b[image].numpy(), expected_b, rtol=1e-7, atol=1e-10)
        # the two branch totals add up to the incoming total
        assert abs(float(r_a[image].sum() + r_b[image].sum()) - R.sum()) < 1e-7 * abs(R).sum()


def test_halved_z_matmul_gives_each_operand_half_the_z_rule():
    a = torch.rand(2, 3, 4, 5, dtype=torch.float64, generator=_gen(7))
    b = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=_gen(8))
    r_out = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=_gen(9))
    out, (r_a, r_b) = _relevance_in(halved_z_matmul, [a, b], r_out)
    assert torch.equal(out, a @ b)
    A, B, R = a.numpy(), b.numpy(), r_out.numpy()
    Z = A @ B
    expected_a = np.einsum("...ik,...kj,...ij->...ik", A, B, R / (Z + 1e-9)) / 2
    expected_b = np.einsum("...ik,...kj,...ij->...kj", A, B, R / (Z + 1e-9)) / 2
    np.testing.assert_allclose(r_a.numpy(), expected_a, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(r_b.numpy(), expected_b, rtol=1e-8, atol=1e-12)


def test_identity_passes_relevance_unchanged_through_softmax_and_layer_norm():
    x = torch.randn(2, 4, 6, dtype=torch.float64, generator=_gen(10))
    r_out = torch.randn(2, 4, 6, dtype=torch.float64, generator=_gen(11))
    norm = torch.nn.LayerNorm(6).double()
    for fn in (lambda t: t.softmax(-1), norm):
        out, (r_in,) = _relevance_in(lambda t, fn=fn: identity(fn, t), [x], r_out)
        assert torch.equal(out, fn(x))
        torch.testing.assert_close(r_in, r_out, rtol=1e-12, atol=1e-12)


def test_rules_are_scoped_to_the_block_and_find_two_residual_adds_per_block():
    module = tiny_timm_vit(seed=1)
    x = torch.randn(2, 3, 32, 32, generator=_gen(12))
    before = module(x)
    own = {name: "forward" in sub.__dict__ for name, sub in module.named_modules()}
    stream = [block.norm1 for block in module.blocks]
    with chefer_rules(module, stream, batch_size=2) as adds:
        inside = module(x.requires_grad_(True))
    assert adds.found == 2 * len(module.blocks)
    torch.testing.assert_close(inside, before, rtol=1e-5, atol=1e-6)  # same outputs, other backward
    assert {name: "forward" in sub.__dict__ for name, sub in module.named_modules()} == own
    assert not module.blocks[0].norm1._forward_pre_hooks
    assert torch.overrides._get_current_function_mode_stack() == []
    assert torch.equal(module(x), before)
