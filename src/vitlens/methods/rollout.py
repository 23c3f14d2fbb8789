"""Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers").

    A_bar^l = fuse_h A^l_h                       (mean | max | min over heads)
    A_hat^l = rownorm(A_bar^l + alpha I)         (residual; alpha = 1 gives (A_bar + I) / 2)
    R       = A_hat^L ... A_hat^s                (left multiplication, s = start_layer)
    map     = w^T R restricted to patches        (w: the token rows the classifier reads)

``discard_ratio`` zeroes the weakest patch-to-patch entries of each fused matrix before the
residual is added (jacobgil/vit-explain's noise filter). Unlike vit-explain, entries from or to
prefix tokens are never discarded and the normalisation is per row (its ``sum(-1)`` without
``keepdim`` divides columns, bug B2 in the research notes).
"""

from __future__ import annotations

import torch

from vitlens.errors import MethodError
from vitlens.methods.common import Captured, fuse_heads, readout_rows, rollout_readout, through_residual


def discard_lowest(fused: torch.Tensor, ratio: float, num_prefix: int) -> torch.Tensor:
    """Zero the lowest ``ratio`` share of patch-to-patch entries of each (N, N) matrix."""
    if ratio <= 0:
        return fused
    if not 0 <= ratio < 1:
        raise MethodError(f"discard_ratio must be in [0, 1), got {ratio}")
    patch_block = fused[:, num_prefix:, num_prefix:]
    flat = patch_block.reshape(fused.shape[0], -1)
    count = int(flat.shape[1] * ratio)
    if count == 0:
        return fused
    drop = flat.topk(count, dim=-1, largest=False).indices
    kept = flat.scatter(1, drop, 0.0).reshape(patch_block.shape)
    out = fused.clone()
    out[:, num_prefix:, num_prefix:] = kept
    return out


def attention_rollout(captured: Captured, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      start_layer: int = 0, residual: float = 1.0) -> torch.Tensor:
    """Rollout patch map (B, h, w) from the captured attentions (class-agnostic)."""
    layers = captured.attentions[start_layer:]
    if not layers:
        raise MethodError(f"start_layer {start_layer} leaves no layers (model has {len(captured.attentions)})")
    fused = [lambda a=attention: discard_lowest(fuse_heads(a, head_fusion), discard_ratio, captured.num_prefix)
             for attention in layers]
    return rollout_readout(fused, captured, lambda row, matrix: through_residual(row, matrix, residual))


def raw_attention(captured: Captured, layer: int = -1) -> torch.Tensor:
    """The last layer's attention of the classifier's token(s), mean over heads: a baseline."""
    return readout_rows(captured.attentions[layer].mean(dim=1), captured)
