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
    # copysign rather than torch.where: the same values, an order of magnitude faster on CPU
    return z + torch.copysign(torch.tensor(eps, dtype=z.dtype, device=z.device), z)


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


class _UniformMatmul(torch.autograd.Function):
    """a @ b computed once, with half of each operand's ordinary gradient in the backward."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _sum_to(0.5 * (grad_out @ b.transpose(-1, -2)), a.shape)
        if ctx.needs_input_grad[1]:
            grad_b = _sum_to(0.5 * (a.transpose(-1, -2) @ grad_out), b.shape)
        return grad_a, grad_b


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a gradient over the batch dimensions an operand was broadcast along."""
    return grad if grad.shape == shape else grad.sum_to_size(shape)


def uniform_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b whose relevance is split equally between a and b (half of each operand's gradient)."""
    if a.dim() < 2 or b.dim() < 2:
        return 0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)
    return _UniformMatmul.apply(a, b)


class _Gamma(torch.autograd.Function):
    """Gamma rule for an affine operation ``op(x, weight, bias)`` (linear or convolution).

    Written in closed form so that the backward costs three products with the weight (and no
    ``torch.where``, slow on CPU) instead of the eight products a literal statement needs. With
    P = x+ W+, Q = x+ W-, S = x- W+, T = x- W- (all through ``op``) and z = x W + b:

    * A = |x| |W| + |b| = P - Q - S + T + |b| comes from one product, and z = P + Q + S + T + b;
    * the denominator of a positive output is z + gamma (P + T + b+) = (1 + gamma/2) z + gamma/2 A,
      that of a negative output z + gamma (Q + S + b-) = (1 + gamma/2) z - gamma/2 A; both have the
      sign of z and the magnitude D = (1 + gamma/2) |z| + gamma/2 A;
    * with g the upstream gradient, the per-output factor R/d = g z / d is g |z| / D, and its
      output-signed version g z / D; the modified input gradient is
      (1 + gamma/2) (g |z| / D) W + gamma/2 sign(x) (g z / D) |W|.

    Same relevance as the literal rule (zennit's ``Gamma``), checked in float64 against independent
    statements in tests/lrp/test_gamma_rule.py and tests/lrp/test_lrp_reference.py.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, op, op_input_grad):
        z = op(x, weight, bias)
        ctx.save_for_backward(x, weight, bias, z)
        ctx.gamma, ctx.op, ctx.op_input_grad = gamma, op, op_input_grad
        return z

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, z = ctx.saved_tensors
        gamma, op, op_input_grad = ctx.gamma, ctx.op, ctx.op_input_grad
        abs_weight = weight.abs()
        spread_sum = op(x.abs(), abs_weight, None if bias is None else bias.abs())  # A
        abs_z = z.abs()
        # everything below is divided by (1 + gamma/2), which cancels in the first term
        magnitude = torch.add(abs_z, spread_sum, alpha=0.5 * gamma / (1 + 0.5 * gamma))
        factor = grad_out / magnitude.add_(STABILIZER / (1 + 0.5 * gamma))
        plain = op_input_grad(factor * abs_z, weight, x.shape)
        spread = op_input_grad(factor * z, abs_weight, x.shape)
        # sign(0) = 0 is harmless: an input of 0 carries no relevance
        grad_x = torch.addcmul(plain, x.sign(), spread, value=0.5 * gamma / (1 + 0.5 * gamma))
        return grad_x, None, None, None, None, None


def _linear_input_grad(grad_out, weight, input_shape):
    return grad_out @ weight


def gamma_linear(x, weight, bias, gamma: float):
    """``F.linear`` with the Gamma rule in its backward (gamma 0: the ordinary gradient)."""
    if gamma == 0:
        return F.linear(x, weight, bias)
    return _Gamma.apply(x, weight, bias, gamma, F.linear, _linear_input_grad)


def gamma_conv2d(x, conv: torch.nn.Conv2d, gamma: float):
    """``conv(x)`` with the Gamma rule in its backward (gamma 0: the ordinary gradient)."""
    if conv.padding_mode != "zeros":
        raise NotImplementedError("Gamma rule for padded convolutions other than zero padding")

    def op(inp, weight, bias):
        return F.conv2d(inp, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def op_input_grad(grad_out, weight, input_shape):
        if _is_patchify(conv, input_shape):
            return _patchify_input_grad(grad_out, weight, input_shape)
        return torch.nn.grad.conv2d_input(input_shape, weight, grad_out, conv.stride, conv.padding,
                                          conv.dilation, conv.groups)

    if gamma == 0:
        return op(x, conv.weight, conv.bias)
    return _Gamma.apply(x, conv.weight, conv.bias, gamma, op, op_input_grad)


def _is_patchify(conv: torch.nn.Conv2d, input_shape) -> bool:
    """A non-overlapping patch embedding (kernel = stride, no padding) that tiles the input exactly."""
    kh, kw = conv.kernel_size
    return (tuple(conv.stride) == (kh, kw) and tuple(conv.padding) == (0, 0) and conv.groups == 1
            and tuple(conv.dilation) == (1, 1) and input_shape[-2] % kh == 0 and input_shape[-1] % kw == 0)


def _patchify_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, input_shape) -> torch.Tensor:
    """Input gradient of a patch embedding as one matrix product (about 4x faster than the
    transposed convolution on CPU): every output position reads its own disjoint patch."""
    batch, channels, height, width = input_shape
    out_channels, _, kh, kw = weight.shape
    h, w = height // kh, width // kw
    patches = grad_out.permute(0, 2, 3, 1).reshape(-1, out_channels) @ weight.reshape(out_channels, -1)
    return patches.view(batch, h, w, channels, kh, kw).permute(0, 3, 1, 4, 2, 5).reshape(input_shape)
