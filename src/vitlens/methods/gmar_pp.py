"""GMAR++: positive gradients x attention, per-layer head weights, residual rollout.

After the GMAR-Plus research code (soham5498, ``src/gmarv2.py``), with its right-multiplied
rollout (bug B1) and unguarded weight denominator (B10) corrected. With G^l = d y_c / d A^l:

    G+      = max(G^l, 0)
    g_h     = ||G+_h||_1  or  ||G+_h||_2          (head importance from positive gradients only)
    w_h     = g_h / (sum_h g_h + eps)
    W^l     = sum_h w_h (G+_h * A^l_h)            (gradient-weighted attention)
    A_hat^l = rownorm(W^l + alpha I)
    R       = A_hat^L ... A_hat^1,  map = w_cls^T R on patches

``normalize='none'`` is the reference computation. Its W^l holds products of small gradients and
probabilities (row sums ~1e-4 on real models), so next to alpha I the rollout is nearly the
identity and the result depends on the scale of the logits (research notes section 5, oddity
O1). ``normalize='layer'`` divides W^l by its mean row sum (per image and layer) before the
residual is added, which keeps the relative structure of W^l and makes the map invariant to a
rescaling of the logits.
"""

from __future__ import annotations

import torch

from vitlens.errors import MethodError
from vitlens.methods.common import EPS, Captured, rollout_readout, terms_of, through_residual
from vitlens.methods.gmar import normalized_head_weights


def gradient_weighted_attention(attention: torch.Tensor, gradient: torch.Tensor, norm: str) -> torch.Tensor:
    """W = sum_h w_h (relu(G_h) * A_h), (B, N, N)."""
    positive = gradient.clamp_min(0)
    weights = normalized_head_weights(positive, norm)
    return torch.einsum("bk,bknm->bnm", weights, positive * attention)


def gmar_plus_plus(captured: Captured, norm: str = "l2", residual: float = 1.0, normalize: str = "none",
                   start_layer: int = 0) -> torch.Tensor:
    """GMAR++ patch map (B, h, w)."""
    if normalize not in ("none", "layer"):
        raise MethodError(f"unknown normalize {normalize!r}: expected 'none' or 'layer'")
    layers = terms_of(captured, gmar_plus_plus_term, norm=norm, normalize=normalize)[start_layer:]
    return rollout_readout(layers, captured, lambda row, matrix: through_residual(row, matrix, residual))


def gmar_plus_plus_term(attention: torch.Tensor, gradient: torch.Tensor, norm: str = "l2",
                        normalize: str = "none") -> torch.Tensor:
    """W^l (divided by its mean row sum with ``normalize='layer'``), (B, N, N): all GMAR++ reads of a layer."""
    weighted = gradient_weighted_attention(attention, gradient, norm)
    if normalize == "layer":
        mean_row_sum = weighted.sum(dim=-1).mean(dim=-1)
        weighted = weighted / (mean_row_sum[:, None, None] + EPS)
    return weighted
