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
