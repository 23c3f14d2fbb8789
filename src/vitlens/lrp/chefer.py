"""The LRP rules of Chefer et al. (CVPR 2021, "Transformer Interpretability Beyond Attention Visualization").

Their relevance pass (``relprop`` in hila-chefer/Transformer-Explainability, ``modules/layers_ours.py``),
realised, like the rules of :mod:`vitlens.lrp.rules`, as a modified backward in Gradient x Input form:
at every tensor t of the forward, relevance R_t = t * (modified gradient at t). Initial relevance is
one-hot at the target logit (the engine differentiates y_c / y_c, see
:func:`vitlens.engine._attention_relevance_pass`). The rules:

* ``nn.Linear`` (every projection, the MLP, the head, Hugging Face ``Conv1D`` and the packed ``in_proj`` of
  ``nn.MultiheadAttention``): alpha = 1, beta = 0 with the bias ignored, sign-aware: with z_j = sum_i
  x+_i W+_ji + x-_i W-_ji (no bias), R_i = x+_i sum_j W+_ji R_j / z_j + x-_i sum_j W-_ji R_j / z_j
  (:func:`alpha1_linear`); divisions as the reference's ``safe_divide``: a / (b + 1e-9), 0 where b = 0;
* LayerNorm / RMSNorm, Softmax, GELU (every activation module), Dropout: identity (relevance passes
  unchanged, position by position);
* both attention products (Q K^T before the scale, and A V): the z-rule over both operands with the
  reference's stabiliser, then halved for each (:func:`halved_z_matmul`); the relevance at the attention
  probabilities A, R^A = A * (gradient at A), is what the method reads;
* the residual adds x + f(x) of every block: the z-rule split, then each branch rescaled so that its
  total is proportional to the absolute value of its z-rule total and the two add up to the incoming
  total (per image; :func:`residual_add`); the stream that feeds both the skip and the branch sums the two
  relevances with the reference's ``Clone`` stabiliser, R = X (R_1 + R_2) / (X + 1e-9);
* anything else linear (index selection of the class token, reshapes, layer scale, average pooling):
  the plain gradient, which is the z-rule in this form;
* the gate product of a gated MLP (SwiGLU: EVA-02, DINOv2; not in the paper's ViT) gets the z-rule halved
  like the attention products (:func:`~vitlens.lrp.rules.uniform_mul`).

Rules below the first attention block (the patch embedding's z^B rule, the position embedding's add)
do not enter the relevance at any attention map and are not applied. The residual adds are found
without restating any block's forward: the inputs of each block's pre-attention norm (the adapter's
``block_norm_names``) are the residual stream, and within the forward a ``TorchFunctionMode`` replaces
every addition of a stream tensor and a same-shaped tensor by :func:`residual_add` (whose result joins
the stream). The number found is checked: two per block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vitlens.errors import MethodError
from vitlens.lrp.composite import (_functional_activation, _gated_mlp_forward, _is_activation, _is_conv1d,
                                   _is_gated_mlp, _is_hf_gated_ffn, _is_tanh_head, _is_timm_glu, _rms_norm_eps,
                                   _tanh_head_forward, _timm_glu_forward)
from vitlens.models.capture import AttentionRecorder, attribute_set, masked_scores, swapped_forward

#: the reference's stabiliser (``safe_divide``)
SAFE_EPS = 1e-9


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference's ``safe_divide``: a / (b + 1e-9) where b != 0, and 0 where b == 0."""
    return a / (b + SAFE_EPS) * (b != 0).to(b.dtype)


class _Alpha1Linear(torch.autograd.Function):
    """``F.linear(x, W, b)`` whose backward is the alpha = 1, beta = 0 rule with the bias ignored."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, y = ctx.saved_tensors
        relevance = y * grad_out
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        s = safe_divide(relevance, F.linear(x_pos, w_pos) + F.linear(x_neg, w_neg))
        # R_in = x+ (s W+) + x- (s W-), so the gradient is s W+ where x > 0 and s W- where x < 0
        grad_x = torch.where(x > 0, s @ w_pos, torch.where(x < 0, s @ w_neg, torch.zeros((), dtype=x.dtype,
                                                                                         device=x.device)))
        return grad_x, None, None


def alpha1_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with Chefer's alpha = 1, beta = 0 rule (bias ignored, sign-aware) in its backward."""
    return _Alpha1Linear.apply(x, weight, bias)


class _ResidualAdd(torch.autograd.Function):
    """a + b whose backward is the reference's ``Add.relprop`` (z-rule, then each branch rescaled per image)."""

    @staticmethod
    def forward(ctx, a, b, batch_dim):
        ctx.save_for_backward(a, b)
        ctx.batch_dim = batch_dim
        return a + b

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        z = a + b
        s = safe_divide(z * grad_out, z)  # the z-rule: R_a = a s, R_b = b s
        dims = tuple(d for d in range(z.dim()) if d != ctx.batch_dim)
        shape = tuple(-1 if d == ctx.batch_dim else 1 for d in range(z.dim()))
        sum_a, sum_b = (a * s).sum(dims), (b * s).sum(dims)
        total = (z * grad_out).sum(dims)
        denominator = sum_a.abs() + sum_b.abs()
        # branch totals proportional to |their z-rule totals|, adding up to the incoming total
        factor_a = safe_divide(safe_divide(sum_a.abs(), denominator) * total, sum_a)
        factor_b = safe_divide(safe_divide(sum_b.abs(), denominator) * total, sum_b)
        return s * factor_a.view(shape), s * factor_b.view(shape), None


class _HalvedZMatmul(torch.autograd.Function):
    """a @ b whose backward is the reference's ``einsum.relprop`` halved: the z-rule over both operands with
    its stabiliser (S = safe_divide(R, a b), R_a = a (S b^T) / 2, R_b = b (a^T S) / 2)."""

    @staticmethod
    def forward(ctx, a, b):
        z = a @ b
        ctx.save_for_backward(a, b, z)
        return z

    @staticmethod
    def backward(ctx, grad_out):
        a, b, z = ctx.saved_tensors
        s = 0.5 * safe_divide(z * grad_out, z)
        return s @ b.transpose(-1, -2), a.transpose(-1, -2) @ s


def halved_z_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (same batch shapes) with the z-rule over both operands, halved for each, in its backward."""
    return _HalvedZMatmul.apply(a, b)


def identity(function, x: torch.Tensor) -> torch.Tensor:
    """``function(x)`` (shape-preserving) whose relevance passes unchanged, position by position: the
    gradient is f(x) / x (0 where x = 0). The ratio comes from a detached input, so no operation on ``x``
    itself happens here but the one product (:class:`_ResidualAdds` watches additions on the stream)."""
    y = function(x)
    plain = x.detach()
    ratio = torch.where(plain != 0, y.detach() / torch.where(plain != 0, plain, 1), 0)
    product = x * ratio
    return y.detach() + (product - product.detach())


def residual_add(a: torch.Tensor, b: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """a + b with the reference's residual rule in its backward (the images along ``batch_dim``)."""
    return _ResidualAdd.apply(a, b, batch_dim)


_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add_,
         torch.Tensor.__iadd__}


class _ResidualAdds(TorchFunctionMode):
    """Replace ``stream + branch`` by :func:`residual_add` while active (see the module docstring)."""

    def __init__(self, batch_size: int | None = None, seq_first: bool = False):
        super().__init__()
        self.seq_first = seq_first
        self.stream: dict = {}  # id -> tensor (kept alive so that an id is never reused during the pass)
        self.found = 0
        self.cloned: set = set()
        self.batch_size = batch_size

    def mark(self, tensor: torch.Tensor) -> None:
        self.stream[id(tensor)] = tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADDS and len(args) == 2 and not kwargs and self._is_residual(*args):
            batch_dim = self._batch_dim(args[0].shape)
            skip = args[0] if id(args[0]) in self.stream else args[1]
            if id(skip) not in self.cloned:
                # the stream also feeds the branch: the reference's Clone sums the two relevances, with its
                # stabiliser, R = X (R_1 / (X + 1e-9) + R_2 / (X + 1e-9)); in this form: the summed gradient
                # times X / (X + 1e-9)
                self.cloned.add(id(skip))
                plain = skip.detach()
                skip.register_hook(lambda grad: safe_divide(grad * plain, plain))
            out = residual_add(*args, batch_dim)
            self.found += 1
            self.mark(out)
            return out
        return func(*args, **kwargs)

    def _batch_dim(self, shape) -> int:
        """Where the images are in a stream tensor: (B, N, C), or (N, B, C) for sequence-first attention."""
        if self.batch_size is None:
            return 0
        found = [d for d in range(min(2, len(shape))) if shape[d] == self.batch_size]
        if not found:
            raise MethodError(f"transformer-attribution: no dimension of the residual stream {tuple(shape)} is "
                              f"the batch of {self.batch_size}")
        if len(found) == 2:  # as many images as tokens: the model's layout decides
            return 1 if self.seq_first else 0
        return found[0]

    def _is_residual(self, a, b) -> bool:
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.requires_grad and b.requires_grad and (id(a) in self.stream or id(b) in self.stream))


class CheferRecorder(AttentionRecorder):
    """Attention under Chefer's rules: z-rule halved on Q K^T and A V, identity softmax; alpha-1 projections."""

    rules_attention = True

    def attend(self, q, k, v, scale, layer, mask=None):
        # the z-rule on q k^T before the scale, as the reference (its scale multiplies the product)
        scores = halved_z_matmul(q, k.transpose(-2, -1)) * scale
        probs = identity(lambda t: masked_scores(t, mask).softmax(dim=-1), scores)
        probs = self.on_probabilities(layer, probs)
        return halved_z_matmul(probs, v)

    def linear(self, x, weight, bias):
        return alpha1_linear(x, weight, bias)


def _alpha1_forward(module: nn.Linear):
    return lambda x: alpha1_linear(x, module.weight, module.bias)


def _conv1d_alpha1_forward(module: nn.Module):
    return lambda x: alpha1_linear(x, module.weight.t(), module.bias)


def _identity_forward(module: nn.Module):
    """The module's own forward (a norm, an activation) with the identity rule."""
    original = type(module).forward
    return lambda x, *args, **kwargs: identity(lambda t: original(module, t, *args, **kwargs), x)


def _identity_function(function):
    return lambda x: identity(function, x)


@contextlib.contextmanager
def chefer_rules(model: nn.Module, stream_modules: list, batch_size: int | None = None,
                 seq_first: bool = False) -> Iterator[_ResidualAdds]:
    """Within the block, ``model`` computes the same outputs with Chefer's rules in its backward.

    ``stream_modules`` are the modules whose input is the residual stream (each block's pre-attention
    norm); ``batch_size`` finds the images' dimension in it (``seq_first`` decides when the batch size equals
    the token count); the yielded object counts the residual adds found (``.found``).
    """
    adds = _ResidualAdds(batch_size, seq_first)
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                stack.enter_context(swapped_forward(module, _alpha1_forward(module)))
            elif _is_conv1d(module):
                stack.enter_context(swapped_forward(module, _conv1d_alpha1_forward(module)))
            elif isinstance(module, nn.LayerNorm) or _rms_norm_eps(module) is not None:
                stack.enter_context(swapped_forward(module, _identity_forward(module)))
            elif _is_gated_mlp(module) or _is_hf_gated_ffn(module):
                stack.enter_context(swapped_forward(module, _gated_mlp_forward(module)))
            elif _is_timm_glu(module):
                stack.enter_context(swapped_forward(module, _timm_glu_forward(module)))
            elif _is_tanh_head(module):
                stack.enter_context(swapped_forward(module, _tanh_head_forward(module)))
            elif _is_activation(module):
                stack.enter_context(swapped_forward(module, _identity_forward(module)))
            elif _functional_activation(module) is not None:
                rule = _identity_function(_functional_activation(module))
                stack.enter_context(attribute_set(module, "activation", rule))
        for module in stream_modules:
            stack.callback(module.register_forward_pre_hook(lambda mod, inputs: adds.mark(inputs[0])).remove)
        stack.enter_context(adds)
        yield adds
        adds.stream.clear()


__all__ = ["CheferRecorder", "alpha1_linear", "chefer_rules", "residual_add", "safe_divide"]
