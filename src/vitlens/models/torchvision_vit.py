"""Adapter for torchvision ``VisionTransformer`` (``vit_b_16`` and friends).

torchvision's encoder blocks call ``nn.MultiheadAttention`` with ``need_weights=False``, which takes
the fused path. During capture each block's attention instance gets an explicit forward computed
from the same packed ``in_proj`` weights and ``out_proj``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from vitlens.errors import ModelError
from vitlens.models.base import ExplainableModel
from vitlens.models.capture import AttentionRecorder, explicit_attention, swapped_forward


def is_torchvision_vit(module: nn.Module) -> bool:
    from torchvision.models.vision_transformer import VisionTransformer

    return isinstance(module, VisionTransformer)


def mha_capturing_forward(mha: nn.MultiheadAttention, layer: int, recorder: AttentionRecorder):
    """Self-attention forward of one ``nn.MultiheadAttention`` instance with explicit softmax."""
    if not mha._qkv_same_embed_dim:
        raise ModelError("nn.MultiheadAttention with separate key/value dimensions is not supported")

    def forward(query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        x = query if mha.batch_first else query.transpose(0, 1)
        B, N, C = x.shape
        heads = mha.num_heads
        head_dim = C // heads
        qkv = recorder.linear(x, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = _combine_masks(attn_mask, key_padding_mask, is_causal, N, x.device)
        out = explicit_attention(q, k, v, head_dim ** -0.5, layer, recorder, mask)
        out = out.transpose(1, 2).reshape(B, N, C)
        out = mha.out_proj(out)
        if not mha.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = recorder.attentions[layer]
            weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights

    return forward


def _combine_masks(attn_mask, key_padding_mask, is_causal, n, device):
    """MHA's masks as one additive float mask (``-inf`` where attending is not allowed), or None."""
    masks = []
    if attn_mask is not None:
        masks.append(_additive(attn_mask))
    if key_padding_mask is not None:
        masks.append(_additive(key_padding_mask)[:, None, None, :])
    if is_causal and attn_mask is None:
        masks.append(_additive(torch.ones(n, n, dtype=torch.bool, device=device).triu(1)))
    if not masks:
        return None
    total = masks[0]
    for m in masks[1:]:
        total = total + m
    return total


def _additive(mask):
    # nn.MultiheadAttention convention: a boolean True marks a position that may NOT be attended.
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(mask, float("-inf"))
    return mask


class TorchvisionViT(ExplainableModel):
    """torchvision ``VisionTransformer``."""

    family = "torchvision"

    @property
    def num_classes(self) -> int:
        return int(self.module.num_classes)

    @property
    def num_layers(self) -> int:
        return len(self.module.encoder.layers)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def patch_size(self):
        return (self.module.patch_size, self.module.patch_size)

    def block_norm_names(self):
        return [self.module_name(block.ln_1) for block in self.module.encoder.layers]

    def fixed_input_size(self):
        return (self.module.image_size, self.module.image_size)

    def logits(self, x):
        return self.module(x)

    def _head(self, hidden):
        return self.module.heads(self.module.encoder.ln(hidden)[:, 0])

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        with contextlib.ExitStack() as stack:
            for i, block in enumerate(self.module.encoder.layers):
                mha = block.self_attention
                stack.enter_context(swapped_forward(mha, mha_capturing_forward(mha, i, recorder)))
                if recorder.keep_block_outputs:
                    handle = block.register_forward_hook(_block_hook(i, recorder))
                    stack.callback(handle.remove)
            yield recorder


def _block_hook(index, recorder):
    def hook(module, inputs, output):
        recorder.on_block_output(index, output)

    return hook
