"""Transformer attribution (Chefer, Gur & Wolf, CVPR 2021, "Transformer Interpretability Beyond Attention
Visualization"; ``transformer_attribution`` of hila-chefer/Transformer-Explainability).

With G^l = d y_c / d A^l from the ordinary backward of the target logit and R^{A,l} the LRP relevance at
the attention probabilities from a relevance pass with the paper's rules (initial relevance one-hot at
c; see :mod:`vitlens.lrp.chefer`):

    A_bar^l = mean_h max(G^l_h * R^{A,l}_h, 0)         (clamp before the head mean)
    R       = (I + A_bar^L) ... (I + A_bar^s)            (s = start_layer; no normalisation)
    map     = w^T R on the patch columns                 (w: the classifier's token readout, CLS one-hot)
"""

from __future__ import annotations

import torch

from vitlens.methods.common import Captured, rollout_readout, through_identity_plus


def transformer_attribution(captured: Captured, start_layer: int = 1) -> torch.Tensor:
    """Chefer's transformer attribution patch map (B, h, w)."""
    layers = [lambda r=r, g=g: (g * r).clamp_min(0).mean(dim=1)
              for r, g in zip(captured.attention_relevance[start_layer:], captured.gradients[start_layer:])]
    return rollout_readout(layers, captured, through_identity_plus)
