"""Generic attention-model explainability (Chefer, Gur & Wolf, ICCV 2021), self-attention rules.

With G^l = d y_c / d A^l from one backward of the target logit:

    A_bar^l = mean_h max(G^l_h * A^l_h, 0)          (clamp before the head mean)
    R       = (I + A_bar^L) ... (I + A_bar^s)         (no normalisation: R <- R + A_bar R)
    map     = w_cls^T R on patch columns
"""

from __future__ import annotations

import torch

from vitlens.methods.common import Captured, rollout_readout, terms_of, through_identity_plus


def chefer_term(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """A_bar^l = mean_h max(G^l_h * A^l_h, 0), (B, N, N): all the method reads of a layer."""
    return (gradient * attention).clamp_min(0).mean(dim=1)


def chefer_rollout(captured: Captured, start_layer: int = 0) -> torch.Tensor:
    """Chefer grad x attention rollout patch map (B, h, w)."""
    return rollout_readout(terms_of(captured, chefer_term)[start_layer:], captured, through_identity_plus)
