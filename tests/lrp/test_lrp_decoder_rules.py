"""LRP rules for decoder language models: Hugging Face Conv1D (GPT-2), RMSNorm, the gated MLP product."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vitlens.lrp import LRPConfig, lrp_rules
from vitlens.lrp.rules import gamma_linear, rms_norm_std_detached, uniform_mul


def _relevance(module, x, upstream):
    """x * d<out, upstream>/dx: the relevance at the input of ``module`` for relevance out * upstream."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    return out.detach(), x.detach() * grad


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_conv1d_gets_the_gamma_rule_of_the_equivalent_linear_layer(gamma):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 4)  # x @ W + b, W (4, 6)
    with torch.no_grad():
        conv.bias.normal_()
    linear = nn.Linear(4, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    x, upstream = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    plain = conv(x)
    config = LRPConfig("cp-lrp", 1.0, gamma)
    with lrp_rules(conv, config):
        out, relevance = _relevance(conv, x, upstream)
    with lrp_rules(linear, config):
        _, expected = _relevance(linear, x, upstream)
    assert torch.allclose(out, plain, atol=1e-6)
    assert torch.allclose(relevance, expected, atol=1e-6)
    if gamma == 0:  # LRP-0 is the plain gradient
        _, gradient_x_input = _relevance(copy.deepcopy(conv), x, upstream)
        assert torch.allclose(relevance, gradient_x_input, atol=1e-6)
    assert "forward" not in conv.__dict__ and torch.allclose(conv(x), plain)


def test_rms_norm_keeps_its_output_and_conserves_relevance():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(1)
    for norm in (LlamaRMSNorm(8, eps=1e-6), nn.RMSNorm(8, eps=1e-6)):
        with torch.no_grad():
            norm.weight.normal_()
        x, upstream = torch.randn(2, 5, 8) * 3, torch.randn(2, 5, 8)
        plain = norm(x)
        with lrp_rules(norm, LRPConfig()):
            out, relevance = _relevance(norm, x, upstream)
        assert torch.allclose(out, plain, atol=1e-6)
        # the root mean square is a constant: each element's relevance is its output's (x * grad = y * upstream)
        assert torch.allclose(relevance, out * upstream, atol=1e-5)
        assert "forward" not in norm.__dict__
    x = torch.randn(3, 4)
    assert torch.allclose(rms_norm_std_detached(x, None, 1e-6), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_gated_mlp_product_splits_relevance_equally():
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    out = uniform_mul(a, b)
    assert torch.equal(out, a * b)
    grad_a, grad_b = torch.autograd.grad((out * upstream).sum(), [a, b])
    assert torch.allclose(a * grad_a, 0.5 * a * b * upstream) and torch.allclose(b * grad_b, 0.5 * a * b * upstream)


def test_llama_mlp_is_conservative_without_biases():
    """SiLU (identity rule) times up-projection (uniform rule), then down: x * grad sums to out * upstream."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(2)
    mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, hidden_act="silu")).eval()
    x, upstream = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    plain = mlp(x)
    with lrp_rules(mlp, LRPConfig("cp-lrp", 0.0, 0.0)):
        out, relevance = _relevance(mlp, x, upstream)
    assert torch.allclose(out, plain, atol=1e-6)
    assert torch.allclose(relevance.sum(-1), (out * upstream).sum(-1), atol=1e-4)
    assert not any("forward" in m.__dict__ for m in mlp.modules())


def test_gamma_linear_with_a_transposed_view_weight():
    """Conv1D hands W^T (a view) to the Gamma rule: same as a contiguous copy."""
    torch.manual_seed(3)
    w, b = torch.randn(4, 6), torch.randn(6)
    x = torch.randn(5, 4, requires_grad=True)
    g1 = torch.autograd.grad(gamma_linear(x, w.t(), b, 0.3).sum(), x)[0]
    g2 = torch.autograd.grad(gamma_linear(x, w.t().contiguous(), b, 0.3).sum(), x)[0]
    assert torch.allclose(g1, g2, atol=1e-5)
