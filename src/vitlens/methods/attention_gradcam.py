"""Grad-CAM on the attention of one layer: the ``attn_gradcam`` baseline of Chefer, Gur & Wolf (CVPR 2021).

hila-chefer/Transformer-Explainability, ``baselines/ViT/ViT_explanation_generator.py``,
``Baselines.generate_cam_attn``: with A^l (B, K, N, N) the layer's attention (last layer by default)
and G^l = d y_c / d A^l from the same backward as every other gradient method,

    a_h = w^T A^l_h     on the patch columns   (the readout row(s): CLS -> A_h[0, 1:])
    g_h = w^T G^l_h     on the patch columns
    c_h = mean over the patch columns of g_h   (one Grad-CAM weight per head)
    map = max(0, mean_h c_h a_h)               (clamp after the head mean, as the reference)

The reference averages the gradient over the class row's patch columns only (not over every query
row) and clamps the head mean; ``w`` is the model's readout (one-hot CLS, (CLS + distillation) / 2,
the patch-row mean of an average-pooled model, SigLIP's pooling attention), as for rollout.
"""

from __future__ import annotations

import torch

from vitlens.methods.common import Captured, patches_to_grid


def _readout_row(tensor: torch.Tensor, captured: Captured) -> torch.Tensor:
    """(B, K, N, N) -> (B, K, P): the readout-weighted query rows, patch columns only."""
    weights = captured.readout.to(device=tensor.device, dtype=tensor.dtype)
    rows = torch.einsum("bn,bknm->bkm" if weights.dim() == 2 else "n,bknm->bkm", weights, tensor)
    return rows[..., captured.num_prefix:]


def attention_gradcam(captured: Captured, layer: int = -1) -> torch.Tensor:
    """Attention Grad-CAM patch map (B, h, w) of one layer (default the last)."""
    attention = _readout_row(captured.attentions[layer], captured)
    weights = _readout_row(captured.gradients[layer], captured).mean(dim=-1, keepdim=True)
    return patches_to_grid((weights * attention).mean(dim=1).clamp_min(0), captured.grid)
