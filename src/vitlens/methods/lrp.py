"""AttnLRP and CP-LRP (Achtibat et al., ICML 2024) with Gamma rules: signed pixel relevance.

The engine runs a separate forward with the LRP rules of :mod:`vitlens.lrp` on the model (same
outputs, modified backward) and one backward per target; these functions turn the input and its
modified gradient into the relevance map R = sum over channels of x * grad, (B, H, W), signed.
Initial relevance is the target logit, so with gamma 0, zero biases and CP-LRP the map sums to it.
"""

from __future__ import annotations

import torch

from vitlens.methods.common import Captured


def _relevance(captured: Captured, key) -> torch.Tensor:
    x, grad = captured.input_relevance[key]
    return (x * grad).sum(dim=1)


def attnlrp(captured: Captured, conv_gamma: float = 1.0, lin_gamma: float = 0.5,
            attention_gamma: bool = True) -> torch.Tensor:
    """AttnLRP relevance (B, H, W). ``attention_gamma=False``: LRP-0 on the attention's projections."""
    return _relevance(captured, ("attnlrp", conv_gamma, lin_gamma, attention_gamma))


def cp_lrp(captured: Captured, conv_gamma: float = 1.0, lin_gamma: float = 0.5,
           attention_gamma: bool = True) -> torch.Tensor:
    """CP-LRP relevance (B, H, W). ``attention_gamma=False``: LRP-0 on the attention's projections."""
    return _relevance(captured, ("cp-lrp", conv_gamma, lin_gamma, attention_gamma))
