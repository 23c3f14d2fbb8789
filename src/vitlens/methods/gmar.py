"""GMAR: Gradient-driven Multi-head Attention Rollout (Jo, Jang & Park, ICIP 2025, arXiv 2504.19414).

Per layer l and head h, with G^l = d y_c / d A^l from one backward of the target logit:

    g^l_h = sum_ij |G^l_hij|                (L1)   or   (sum_ij (G^l_hij)^2)^(1/2)   (L2)
    w^l_h = g^l_h / (sum_h' g^l_h' + eps)   (head weights, per layer, non-negative, sum 1)
    A_bar^l = sum_h w^l_h A^l_h             (convex combination: rows still sum to 1)
    R = rownorm(A_bar^L + alpha I) ... rownorm(A_bar^1 + alpha I),   map = w_cls^T R on patches

This is the method as the paper describes it. The official code differs (channel groups of a
LayerNorm output taken as "heads", 16 heads hard-coded, one weight vector for all layers, a
196x197 block averaged; bug B6) and the GMAR++ repository multiplies on the right (B1); neither
is copied here.
"""

from __future__ import annotations

import torch

from vitlens.errors import MethodError
from vitlens.methods.common import EPS, Captured, rollout_readout, terms_of, through_residual


def head_norms(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    """(B, K, N, N) gradients -> (B, K) per-head L1 or L2 norms."""
    flat = gradient.flatten(start_dim=2)
    if norm == "l1":
        return flat.abs().sum(dim=-1)
    if norm == "l2":
        return flat.pow(2).sum(dim=-1).sqrt()
    raise MethodError(f"unknown head norm {norm!r}: expected 'l1' or 'l2'")


def normalized_head_weights(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    scores = head_norms(gradient, norm)
    return scores / (scores.sum(dim=-1, keepdim=True) + EPS)


def gmar(captured: Captured, norm: str = "l2", residual: float = 1.0, start_layer: int = 0) -> torch.Tensor:
    """GMAR patch map (B, h, w)."""
    layers = terms_of(captured, gmar_term, norm=norm)[start_layer:]
    return rollout_readout(layers, captured, lambda row, matrix: through_residual(row, matrix, residual))


def gmar_term(attention: torch.Tensor, gradient: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """A_bar^l = sum_h w^l_h A^l_h, (B, N, N): all GMAR reads of a layer."""
    return torch.einsum("bk,bknm->bnm", normalized_head_weights(gradient, norm), attention)
