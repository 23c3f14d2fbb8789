"""Where the LRP rules apply: a scoped preparation of one model instance.

Rules (``rules.py``) say *what* a layer does to relevance; this module says *where* each applies
(zennit's composite idea): every ``nn.Linear`` gets Gamma(``lin_gamma``) — including the attention
projections, which are called as modules in the adapters' explicit attention, and the packed
``in_proj`` of ``nn.MultiheadAttention`` through :meth:`LRPRecorder.linear` — every ``nn.Conv2d``
Gamma(``conv_gamma``), every LayerNorm the std-detached form, every element-wise activation
module the identity rule, and attention the AttnLRP (uniform rule on Q K^T and A V) or CP-LRP
(Q and K constant) form. Everything is undone when the block ends; no class is touched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from vitlens.lrp.rules import gamma_conv2d, gamma_linear, identity_rule, layer_norm_std_detached, uniform_matmul
from vitlens.models.capture import AttentionRecorder, _masked, swapped_forward

ACTIVATIONS = (nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.Softplus, nn.ELU, nn.LeakyReLU, nn.Hardswish)


@dataclass(frozen=True)
class LRPConfig:
    """Which LRP variant and Gamma strengths."""

    variant: str = "attnlrp"  # or "cp-lrp"
    conv_gamma: float = 1.0
    lin_gamma: float = 0.5

    def __post_init__(self):
        if self.variant not in ("attnlrp", "cp-lrp"):
            raise ValueError(f"unknown LRP variant {self.variant!r}")
        for name in ("conv_gamma", "lin_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class LRPRecorder(AttentionRecorder):
    """Attention with the AttnLRP / CP-LRP rules, projections with the Gamma rule."""

    def __init__(self, config: LRPConfig):
        super().__init__()
        self.config = config

    def attend(self, q, k, v, scale, layer, mask=None):
        if self.config.variant == "cp-lrp":
            # queries and keys as constants: the attention weights only route relevance through V
            scores = (q.detach() * scale) @ k.detach().transpose(-2, -1)
            probs = _masked(scores, mask).softmax(dim=-1)
            self.on_probabilities(layer, probs)
            return probs @ v
        scores = uniform_matmul(q * scale, k.transpose(-2, -1))
        probs = _masked(scores, mask).softmax(dim=-1)  # softmax rule = its gradient x input
        self.on_probabilities(layer, probs)
        return uniform_matmul(probs, v)

    def linear(self, x, weight, bias):
        return gamma_linear(x, weight, bias, self.config.lin_gamma)


def _is_activation(module: nn.Module) -> bool:
    if isinstance(module, ACTIVATIONS):
        return True
    return type(module).__module__.startswith("transformers.activations")


def _linear_forward(module: nn.Linear, gamma: float):
    return lambda x: gamma_linear(x, module.weight, module.bias, gamma)


def _conv_forward(module: nn.Conv2d, gamma: float):
    return lambda x: gamma_conv2d(x, module, gamma)


def _layer_norm_forward(module: nn.LayerNorm):
    return lambda x: layer_norm_std_detached(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _activation_forward(module: nn.Module):
    original = type(module).forward

    def forward(x, *args, **kwargs):
        return identity_rule(lambda t: original(module, t, *args, **kwargs), x)

    return forward


@contextlib.contextmanager
def lrp_rules(model: nn.Module, config: LRPConfig) -> Iterator[None]:
    """Within the block, ``model`` computes the same outputs with LRP rules in its backward."""
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                stack.enter_context(swapped_forward(module, _linear_forward(module, config.lin_gamma)))
            elif isinstance(module, nn.Conv2d):
                stack.enter_context(swapped_forward(module, _conv_forward(module, config.conv_gamma)))
            elif isinstance(module, nn.LayerNorm):
                stack.enter_context(swapped_forward(module, _layer_norm_forward(module)))
            elif _is_activation(module):
                stack.enter_context(swapped_forward(module, _activation_forward(module)))
        yield


def input_relevance(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Pixel relevance (B, H, W): the sum over channels of input x (modified) gradient."""
    return (x * grad).sum(dim=1)
