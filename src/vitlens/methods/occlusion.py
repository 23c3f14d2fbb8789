"""Occlusion (Zeiler & Fergus, ECCV 2014), as captum's ``Occlusion`` computes it.

Model-agnostic: a ``window`` x ``window`` square (pixels of the model input, every channel) slides
over the input with step ``stride``; each position j hides its pixels W_j with the fill ``b``, and

    d_j = f_c(x) - f_c(x * (1 - W_j) + b * W_j)                 (drop of the target score)
    S_c = sum_j d_j W_j / sum_j W_j                             (mean over the windows covering a pixel)

f_c is the target's softmax probability (default, Zeiler & Fergus' plots) or its logit. Window
positions, as captum: top-left corners at 0, stride, 2 stride, ... up to ceil((H - window) / stride)
strides, so the last window may be cut by the border and every pixel is covered at least once.
``b`` is 'mean' (default: 0 in the model's normalised input space, the mean colour: Zeiler & Fergus'
grey square, and captum's ``baselines=0`` on a normalised tensor) or 'black' ((0 - mean) / std).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from vitlens.errors import MethodError
from vitlens.methods.common import fill_value, group_size


def window_starts(length: int, window: int, stride: int) -> list:
    """Top-left coordinates of the windows along one axis (captum's shift counts)."""
    return [i * stride for i in range(math.ceil((length - window) / stride) + 1)]


def occlusion(inputs: torch.Tensor, score_fn: Callable, fills: dict, window: int = 32, stride: int = 16,
              baseline: str = "mean", score: str = "probability", mask_batch: int = 64) -> torch.Tensor:
    """Occlusion map (B, K, H, W) at input resolution, one map per target slot.

    ``score_fn(perturbed, score)`` takes (B, G, C, H, W) perturbed copies (G per image) and returns
    the (B, G, K) scores of each image's targets; ``fills`` maps 'black' / 'mean' to (C,) values.
    """
    batch, _, height, width = inputs.shape
    if window > height or window > width:
        raise MethodError(f"method 'occlusion': window={window} is larger than the {height}x{width} input")
    fill = fill_value(fills, baseline, inputs)[:, None]  # (1, 1, C, 1, 1)
    positions = [(top, left) for top in window_starts(height, window, stride)
                 for left in window_starts(width, window, stride)]
    original = score_fn(inputs[:, None], score)  # (B, 1, K)
    group = group_size(batch, mask_batch)
    total = None
    counts = torch.zeros(height, width, dtype=inputs.dtype, device=inputs.device)
    for start in range(0, len(positions), group):
        chosen = positions[start:start + group]
        hidden = torch.zeros(len(chosen), height, width, dtype=inputs.dtype, device=inputs.device)
        for j, (top, left) in enumerate(chosen):
            hidden[j, top:top + window, left:left + window] = 1
        expanded = hidden[None, :, None]  # (1, G, 1, H, W)
        drops = original - score_fn(inputs[:, None] * (1 - expanded) + fill * expanded, score)  # (B, G, K)
        part = torch.einsum("bgk,ghw->bkhw", drops.to(hidden.dtype), hidden)
        total = part if total is None else total + part
        counts += hidden.sum(dim=0)
    return total / counts
