"""LRP rules as modified backward passes (relevance = input x modified gradient).

Every rule here keeps the forward value exactly and changes only the gradient, so that for an
operation y = f(x) with upstream gradient g (relevance R_out = y * g in gradient x input form),
x * (modified gradient) is the LRP relevance R_in the rule prescribes. The rules (AttnLRP, Achtibat
et al., ICML 2024; Gamma after zennit):

* identity rule for element-wise non-linearities: R_in = R_out (gradient f(x)/x);
* LayerNorm with the standard deviation treated as a constant (mean-centring and the affine
  map stay differentiable);
* softmax: plain gradient x input (which is AttnLRP's softmax rule);
* uniform rule for bilinear products (Q K^T, A V, the gate product of a gated MLP): each operand
  receives half the relevance;
* Gamma rule for Linear / Conv2d, sign-aware as zennit's ``Gamma``: positive outputs are
  explained by (x+, w + gamma w+) and (x-, w + gamma w-), negative outputs by (x+, w + gamma w-)
  and (x-, w + gamma w+); each group is normalised by its own stabilised sum; the bias (with its
  gamma share) only enters the positive-input terms. gamma = 0 is the plain LRP-0 rule, i.e. the
  ordinary gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

STABILIZER = 1e-6


def stabilize(z: torch.Tensor, eps: float = STABILIZER) -> torch.Tensor:
    """z + eps * sign(z), with sign(0) = +1 (zennit's stabiliser)."""
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def identity_rule(activation: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f(x) with the gradient f(x)/x, so the relevance passes through unchanged."""
    y = activation(x)
    ratio = (y / stabilize(x, 1e-10)).detach()
    # forward: x * ratio == y (up to the 1e-10 stabiliser); backward: g * ratio
    return y.detach() + (x * ratio - (x * ratio).detach())


def layer_norm_std_detached(x: torch.Tensor, normalized_shape, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm whose standard deviation is a constant for the backward pass."""
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    std = torch.sqrt(centred.pow(2).mean(dim=dims, keepdim=True) + eps).detach()
    out = centred / std
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def rms_norm_std_detached(x: torch.Tensor, weight, eps: float) -> torch.Tensor:
    """RMSNorm (over the last dimension) whose root mean square is a constant for the backward pass.

    Computed like Llama's ``LlamaRMSNorm``: in float32, ``x * rsqrt(mean(x^2) + eps)``, cast back,
    then scaled by ``weight``. Relevance is conserved element-wise: x * grad = y * upstream grad.
    """
    dtype = x.dtype
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps).detach()
    out = (xf * inv).to(dtype)
    return out * weight if weight is not None else out


def uniform_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise a * b whose relevance is split equally between a and b (the gate of a gated MLP)."""
    return 0.5 * (a * b.detach()) + 0.5 * (a.detach() * b)


def uniform_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b whose relevance is split equally between a and b (half of each operand's gradient)."""
    return 0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)


class _Gamma(torch.autograd.Function):
    """Gamma rule for an affine operation ``op(x, weight, bias)`` (linear or convolution)."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, op):
        ctx.save_for_backward(x, weight, bias if bias is not None else torch.empty(0))
        ctx.gamma, ctx.op, ctx.has_bias = gamma, op, bias is not None
        return op(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        gamma, op = ctx.gamma, ctx.op
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        w_up, w_down = weight + gamma * w_pos, weight + gamma * w_neg
        b_up = None if bias is None else bias + gamma * bias.clamp(min=0)
        b_down = None if bias is None else bias + gamma * bias.clamp(max=0)
        with torch.enable_grad():
            x_pos = x.clamp(min=0).detach().requires_grad_(True)
            x_neg = x.clamp(max=0).detach().requires_grad_(True)
            z = op(x, weight, bias).detach()
            relevance = grad_out * z
            # positive outputs: (x+, w_up, b_up) + (x-, w_down); negative: (x+, w_down, b_down) + (x-, w_up)
            z_pos = [op(x_pos, w_up, b_up), op(x_neg, w_down, None)]
            z_neg = [op(x_pos, w_down, b_down), op(x_neg, w_up, None)]
            s_pos = relevance * (z > 0) / stabilize(z_pos[0] + z_pos[1]).detach()
            s_neg = relevance * (z < 0) / stabilize(z_neg[0] + z_neg[1]).detach()
            g_pos_a, g_neg_a, g_pos_b, g_neg_b = _grads4(z_pos, z_neg, x_pos, x_neg, s_pos, s_neg)
        # relevance R_in = x+ (g_pos_a + g_pos_b) + x- (g_neg_a + g_neg_b); as a gradient of x:
        grad_x = torch.where(x > 0, g_pos_a + g_pos_b, g_neg_a + g_neg_b)
        return grad_x, None, None, None, None


def _grads4(z_pos, z_neg, x_pos, x_neg, s_pos, s_neg):
    """Gradients of the four modified outputs w.r.t. the split inputs, in one autograd call."""
    total = (z_pos[0] * s_pos).sum() + (z_pos[1] * s_pos).sum()
    g_pos_a, g_neg_a = torch.autograd.grad(total, [x_pos, x_neg])
    total = (z_neg[0] * s_neg).sum() + (z_neg[1] * s_neg).sum()
    g_pos_b, g_neg_b = torch.autograd.grad(total, [x_pos, x_neg])
    return g_pos_a, g_neg_a, g_pos_b, g_neg_b


def gamma_linear(x, weight, bias, gamma: float):
    """``F.linear`` with the Gamma rule in its backward (gamma 0: the ordinary gradient)."""
    if gamma == 0:
        return F.linear(x, weight, bias)
    return _Gamma.apply(x, weight, bias, gamma, F.linear)


def gamma_conv2d(x, conv: torch.nn.Conv2d, gamma: float):
    """``conv(x)`` with the Gamma rule in its backward (gamma 0: the ordinary gradient)."""
    if conv.padding_mode != "zeros":
        raise NotImplementedError("Gamma rule for padded convolutions other than zero padding")

    def op(inp, weight, bias):
        return F.conv2d(inp, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    if gamma == 0:
        return op(x, conv.weight, conv.bias)
    return _Gamma.apply(x, conv.weight, conv.bias, gamma, op)
