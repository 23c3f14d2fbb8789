"""The explicit attention computation every adapter routes through while vitlens is capturing.

Fused kernels (``scaled_dot_product_attention``, flash attention) never materialise the
post-softmax probabilities, so no hook can see them. During a vitlens call each adapter swaps
its model's attention for :func:`explicit_attention` on the *instances* it owns (never on a
class), which computes ``softmax(q k^T * scale + mask) @ v`` step by step and hands the
probabilities to the active :class:`AttentionRecorder`. The swap is undone when the call ends.

The recorder keeps the probabilities as graph tensors, so ``torch.autograd.grad(score, A)``
gives d(score)/dA for exactly the tensor that multiplied the values. A recorder may also
substitute the tensor it is given (LRP rules need that); plain capture returns it unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


class AttentionRecorder:
    """Collects the attention probabilities of each layer during one forward pass.

    Attributes
    ----------
    attentions : list of Tensor
        One (B, heads, N, N) tensor per layer, in forward order, still attached to the graph.
    block_outputs : list of Tensor
        The residual stream after each block (B, N, C), filled by adapters when requested.
    readout : Tensor or None
        (B, N) per-image weights of the token rows the model's head read in this forward, for a head
        whose pooling depends on the image (SigLIP's attention-pooling probe); None: the adapter's
        fixed :meth:`~vitlens.models.base.ExplainableModel.readout_weights`.
    """

    #: the recorder changes how relevance passes q k^T and A v (LRP rules): an attention vitlens does not compute
    #: itself (a hooked module) cannot be explained under it
    rules_attention = False

    def __init__(self, keep_block_outputs: bool = False):
        self.attentions: list[torch.Tensor] = []
        self.block_outputs: list[torch.Tensor] = []
        self.keep_block_outputs = keep_block_outputs
        self.readout: torch.Tensor | None = None

    def on_probabilities(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        # Layers are called in order during a forward; a second forward in the same session
        # (for example a re-run on the same recorder) would be a programming error.
        if layer != len(self.attentions):
            raise RuntimeError(f"attention of layer {layer} recorded out of order")
        self.attentions.append(probs)
        return probs

    def on_block_output(self, layer: int, hidden: torch.Tensor) -> None:
        if self.keep_block_outputs:
            self.block_outputs.append(hidden)

    def on_readout(self, weights: torch.Tensor) -> None:
        """The head's (B, N) token weights of this forward (each row sums to 1), kept without the graph."""
        self.readout = weights.detach()

    # What the engine differentiates to get each layer's attention gradient, and how it reads the gradient back.
    @property
    def gradient_sources(self) -> list:
        """Per layer, the graph tensor whose gradient gives d(score)/dA: here the probabilities themselves."""
        return self.attentions

    def attention_and_gradient(self, layer: int, gradient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, d(score)/dA) of ``layer``, both (B, heads, N, N), from the gradient of its gradient source."""
        return self.attentions[layer].detach(), gradient

    def attention_gradient(self, layer: int, gradient: torch.Tensor) -> torch.Tensor:
        """d(score)/dA of ``layer`` alone (LeGrad reads no attention)."""
        return gradient

    def backward_done(self) -> None:
        """A backward that read layers through :meth:`attention_and_gradient` has ended."""

    # Hooks for modified backward passes (LRP): how attention combines q, k, v, and how a
    # projection that is not called as a module (MultiheadAttention's packed in_proj) is applied.
    def attend(self, q, k, v, scale, layer, mask=None):
        scores = (q * scale) @ k.transpose(-2, -1)
        probs = masked_scores(scores, mask).softmax(dim=-1)
        probs = self.on_probabilities(layer, probs)
        return probs @ v

    def linear(self, x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias)

    def normalize(self, t):
        """t / ||t|| over the last dimension (cosine attention's queries and keys, Swin-V2)."""
        return torch.nn.functional.normalize(t, dim=-1)


class HeadMeanRecorder(AttentionRecorder):
    """Keeps each layer's attention as its mean over heads and lets autograd keep no attention at all.

    For a pass whose methods read a layer's attention only through its head mean (rollout, the raw attention),
    a term of it and its gradient (Chefer, GMAR, GMAR++) or LeGrad's gradient. The attention runs as
    :class:`RecomputedAttention`: ``A = softmax(q k^T * scale + mask)`` and ``out = A v`` in the forward, of which
    only ``mean_h A`` (B, 1, N, N) is kept (``attentions``); autograd saves q, k and v, not the (B, heads, N, N)
    probabilities, which the backward recomputes one layer at a time. Since ``out = A v``, the gradient of the
    score at A is ``(d score / d out) v^T``: the engine differentiates the outputs (``gradient_sources``) and
    :meth:`attention_and_gradient` gives one layer's A and its gradient when the backward reaches it (and hands A
    on to the layer's own backward, which then does not compute it again).

    An adapter that reports probabilities without :meth:`attend` (hooked attention modules, CaiT's class
    attention) keeps them as the plain recorder does, layer by layer: that layer's source is A itself.
    """

    def __init__(self, keep_block_outputs: bool = False):
        super().__init__(keep_block_outputs)
        self._sources: list[torch.Tensor] = []
        self._inputs: list[tuple | None] = []  # per layer (q, k, v, scale, mask, shared); None: a probabilities source
        self._attending = False

    def attend(self, q, k, v, scale, layer, mask=None):
        shared: dict = {}  # the layer's probabilities, from the gradient hook to the layer's backward
        out, mean = RecomputedAttention.apply(q, k, v, scale, mask, shared)
        self._attending = True
        try:
            self.on_probabilities(layer, mean)
        finally:
            self._attending = False
        self._sources.append(out)
        self._inputs.append((q, k, v, scale, mask, shared))
        return out

    def on_probabilities(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        probs = super().on_probabilities(layer, probs)
        if not self._attending:  # reported by the adapter itself: kept with its graph, as the plain recorder does
            self._sources.append(probs)
            self._inputs.append(None)
        return probs

    @property
    def gradient_sources(self) -> list:
        return self._sources

    def attention_and_gradient(self, layer, gradient):
        if self._inputs[layer] is None:
            return self.attentions[layer].detach(), gradient
        q, k, _, scale, mask, shared = self._inputs[layer]
        with torch.no_grad():
            probs = _probabilities(q.detach(), k.detach(), scale, mask)
        grad_probs = self.attention_gradient(layer, gradient)
        # the hook sees the gradient the layer's backward is about to get: it reuses both instead of computing them
        shared["probs"], shared["grad_probs"] = probs, grad_probs
        return probs, grad_probs

    def backward_done(self):
        # what a hook handed to a layer whose backward did not run in that backward (the first layer, whose output
        # is where the backward stops) must not reach a later backward with another gradient
        for inputs in self._inputs:
            if inputs is not None:
                inputs[-1].clear()

    def attention_gradient(self, layer, gradient):
        if self._inputs[layer] is None:
            return gradient
        v = self._inputs[layer][2]
        with torch.no_grad():
            return gradient @ v.detach().transpose(-2, -1).to(gradient.dtype)


def _probabilities(q, k, scale, mask):
    """softmax(q k^T * scale + mask) as the explicit path computes it (the softmax in float32 or wider, as autocast
    computes it; outside autocast for a float32 model the same)."""
    scores = masked_scores((q * scale) @ k.transpose(-2, -1), mask)
    return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))


class RecomputedAttention(torch.autograd.Function):
    """``out = softmax(q k^T * scale + mask) v`` whose backward recomputes the probabilities instead of saving them.

    Forward: (B, heads, N, d) queries, keys, values -> (out, mean over heads of the probabilities (B, 1, N, N), no
    graph). Backward, with A recomputed (or, with dA, handed over in ``shared`` by a gradient hook on ``out``):

        dA = d_out v^T     dv = A^T d_out     dS = A * (dA - rowsum(dA * A))     dq = scale dS k     dk = dS^T (q scale)

    which is autograd's own backward of the explicit computation; an additive mask that requires a gradient (BEiT's
    relative position bias) gets ``dS`` summed to its shape. Under autocast the products run in the autocast dtype
    and the softmax in float32, in the forward and the backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, mask, shared):
        probs = _probabilities(q, k, scale, mask)
        out = probs.to(v.dtype) @ v
        device = q.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), device)
        ctx.scale, ctx.mask, ctx.shared = scale, mask, shared
        ctx.save_for_backward(q, k, v)
        mean = probs.mean(dim=1, keepdim=True)
        ctx.mark_non_differentiable(mean)
        return out, mean

    @staticmethod
    def backward(ctx, grad_out, grad_mean):
        q, k, v = ctx.saved_tensors
        enabled, dtype, device = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            probs, grad_probs = ctx.shared.pop("probs", None), ctx.shared.pop("grad_probs", None)
            if probs is None:
                probs = _probabilities(q, k, ctx.scale, ctx.mask)
            if grad_probs is None:
                grad_probs = grad_out @ v.transpose(-2, -1)
            grad_probs = grad_probs.to(probs.dtype)
            grad_v = probs.to(v.dtype).transpose(-2, -1) @ grad_out
            # autograd's own softmax backward (the formula above, in one kernel)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            grad_q = (grad_scores.to(k.dtype) @ k) * ctx.scale
            grad_k = (grad_scores.to(q.dtype).transpose(-2, -1) @ q) * ctx.scale
        grad_mask = None
        if ctx.needs_input_grad[4]:
            grad_mask = grad_scores.sum_to_size(ctx.mask.shape).to(ctx.mask.dtype)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, grad_mask, None


def masked_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention scores with a mask applied: a boolean keep-mask (False -> the dtype's minimum, so the
    softmax gives exactly 0 there) or an additive float mask."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    layer: int,
    recorder: AttentionRecorder,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with the probabilities materialised and reported.

    Parameters
    ----------
    q, k, v : Tensor
        (B, heads, N, head_dim) queries, keys and values after projection (and q/k norms).
    scale : float
        Multiplier of the dot products (usually ``head_dim ** -0.5``).
    layer : int
        Index of the transformer block, 0-based.
    recorder : AttentionRecorder
        Receives the probabilities; what it returns is what multiplies the values.
    mask : Tensor, optional
        Additive float mask or boolean keep-mask broadcastable to (B, heads, N, N).

    Returns
    -------
    Tensor
        (B, heads, N, head_dim), the attention output before the heads are merged.
    """
    return recorder.attend(q, k, v, scale, layer, mask)


@contextlib.contextmanager
def swapped_forward(module: torch.nn.Module, forward: Callable) -> Iterator[None]:
    """Give one module instance a different ``forward`` for the duration of the block.

    Only the instance's ``__dict__`` is touched, so other instances of the same class (in this
    model or any other) keep their behaviour, and whatever instance-level forward the user may
    have set is put back exactly.
    """
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


@contextlib.contextmanager
def attribute_set(obj: object, name: str, value: object) -> Iterator[None]:
    """Set ``obj.name = value`` for the duration of the block, then restore it exactly.

    A value that lived on the class (not on the instance) is restored by deleting the instance
    attribute again; properties are restored through their setter.
    """
    is_property = isinstance(getattr(type(obj), name, None), property)
    had_own = is_property or name in getattr(obj, "__dict__", {})
    previous = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)
