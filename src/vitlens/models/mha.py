"""``torch.nn.MultiheadAttention`` with its softmax made explicit, for any adapter that captures it.

``nn.MultiheadAttention`` runs a fused kernel whenever it can (and always when the caller passes
``need_weights=False``, as ``nn.TransformerEncoderLayer`` and torchvision's ViT do), so its
probabilities are never materialised. During a vitlens call an adapter gives each instance it
captures the forward below (per instance, with :func:`~vitlens.models.capture.swapped_forward`): the
same packed ``in_proj`` weights and ``out_proj`` module, with ``softmax(q k^T / sqrt(d) + mask)``
computed by :func:`~vitlens.models.capture.explicit_attention`. The packed projection goes through
``recorder.linear`` because it is a parameter, not a module an LRP rule could be attached to;
``out_proj`` is an ``nn.Linear`` subclass and is called as a module.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vitlens.errors import ModelError
from vitlens.models.capture import AttentionRecorder, explicit_attention


def check_capturable(mha: nn.MultiheadAttention, name: str = "nn.MultiheadAttention") -> None:
    """One-line ModelError for the configurations the explicit forward does not reproduce."""
    if not mha._qkv_same_embed_dim:
        raise ModelError(f"{name}: nn.MultiheadAttention with separate key/value dimensions is not supported")
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        raise ModelError(f"{name}: nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")


def is_self_attention(query, key, value) -> bool:
    """The call attends a sequence to itself (``mha(x, x, x)``: the same tensor object three times).

    Identity, not equal values: the explicit forward projects q, k and v all from ``query``, which
    is the same computation (and the same gradient paths) only when they are one tensor.
    """
    return (key is None or key is query) and (value is None or value is query)


def mha_capturing_forward(mha: nn.MultiheadAttention, layer: int | Callable[[], int], recorder: AttentionRecorder,
                          name: str = "nn.MultiheadAttention"):
    """Self-attention forward of one ``nn.MultiheadAttention`` instance with an explicit softmax.

    Parameters
    ----------
    mha : nn.MultiheadAttention
    layer : int or callable
        The layer index the probabilities are reported under, or a function returning the index
        of each call (an adapter that numbers attention calls in forward order).
    recorder : AttentionRecorder
    name : str
        How error messages name the module.

    Returns
    -------
    callable
        A forward with ``nn.MultiheadAttention.forward``'s signature and outputs: ``(output,
        weights)``, the weights per head or averaged over heads as the caller asks, None when
        ``need_weights=False``.
    """
    check_capturable(mha, name)
    next_layer = layer if callable(layer) else (lambda: layer)

    def forward(query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not is_self_attention(query, key, value):
            raise ModelError(f"{name} is called with keys or values other than its query: vitlens captures "
                             "self-attention only")
        if query.dim() != 3:
            raise ModelError(f"{name} is called with an unbatched {query.dim()}-D input: vitlens captures batched "
                             "self-attention only")
        x = query if mha.batch_first else query.transpose(0, 1)
        B, N, C = x.shape
        heads = mha.num_heads
        head_dim = C // heads
        index = next_layer()
        qkv = recorder.linear(x, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = combine_masks(attn_mask, key_padding_mask, is_causal, B, heads, N, x.device, x.dtype)
        out = explicit_attention(q, k, v, head_dim ** -0.5, index, recorder, mask)
        out = out.transpose(1, 2).reshape(B, N, C)
        out = mha.out_proj(out)
        if not mha.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            # the tensor the recorder kept is the one that multiplied the values
            weights = recorder.attentions[index]
            weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights

    return forward


def combine_masks(attn_mask, key_padding_mask, is_causal, batch, heads, n, device, dtype=torch.float32):
    """MHA's masks as one additive float mask broadcastable to (B, heads, N, N), or None.

    ``attn_mask`` may be (N, N) or (B * heads, N, N) as ``nn.MultiheadAttention`` accepts; boolean
    masks mark with True the positions that may NOT be attended (the MHA convention).
    """
    masks = []
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        if mask.dim() == 3:
            mask = mask.reshape(batch, heads, n, n)
        masks.append(mask)
    if key_padding_mask is not None:
        masks.append(_additive(key_padding_mask, dtype)[:, None, None, :])
    if is_causal and attn_mask is None:
        masks.append(_additive(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), dtype))
    if not masks:
        return None
    total = masks[0]
    for m in masks[1:]:
        total = total + m
    return total


def _additive(mask, dtype=torch.float32):
    # nn.MultiheadAttention convention: a boolean True marks a position that may NOT be attended.
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device, dtype=dtype).masked_fill(mask, float("-inf"))
    return mask


__all__ = ["check_capturable", "combine_masks", "is_self_attention", "mha_capturing_forward"]
