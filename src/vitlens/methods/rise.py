"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko, BMVC 2018).

Model-agnostic: only the model's scores of masked copies of the input are used. For N random masks
M_i (H, W) with values in [0, 1] and the target score f_c (softmax probability by default, the paper's
choice; or the logit),

    S_c = sum_i f_c(x * M_i + b * (1 - M_i)) M_i / (N p)

Masks, as the paper's code (eclique/RISE ``generate_masks``): a binary s x s grid with each cell kept
with probability p, upsampled bilinearly (``skimage.transform.resize(order=1, mode='reflect')``:
pixel-centre coordinates, mirrored at the border) to (s + 1) * ceil(H / s) by (s + 1) * ceil(W / s),
then an H x W crop at a random shift within one cell. ``b`` is the fill of hidden pixels in the model's
input space: 'black' (the paper's ``I * M`` on the [0, 1] image: (0 - mean) / std after normalisation)
or 'mean' (0 after normalisation, what the authors' PyTorch code gives by masking the normalised tensor).

The random draws come from one CPU ``torch.Generator`` seeded with ``seed`` per call, in this order:
``grid = torch.rand(N, s, s) < p`` (float64), then the row shifts ``torch.randint(ceil(H / s), (N,))``,
then the column shifts ``torch.randint(ceil(W / s), (N,))``. Every image of a batch gets the same
masks, so a map does not depend on the batch it was explained in, nor on ``mask_batch`` (how many
masked images one forward pass holds, which bounds memory), beyond float rounding of the forwards.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from vitlens.methods.common import fill_value, group_size


def rise_draws(count: int, cells: int, keep: float, size: tuple, seed: int) -> tuple:
    """The random part of RISE: (N, s, s) binary float64 grids and (N,) row and column shifts."""
    generator = torch.Generator().manual_seed(int(seed))
    grids = (torch.rand(count, cells, cells, generator=generator, dtype=torch.float64) < keep).double()
    rows = torch.randint(math.ceil(size[0] / cells), (count,), generator=generator)
    cols = torch.randint(math.ceil(size[1] / cells), (count,), generator=generator)
    return grids, rows, cols


def upsampling_matrix(cells: int, length: int) -> torch.Tensor:
    """(length, cells) float64 linear interpolation with pixel-centre coordinates, mirrored at the border.

    Output pixel o reads the grid at ``c = (o + 0.5) * cells / length - 0.5``, linearly between
    ``floor(c)`` and ``floor(c) + 1``; an index outside the grid is mirrored about the edge cell
    (-1 -> 1, cells -> cells - 2), as ``scipy.ndimage`` 'mirror' (skimage's 'reflect') does.
    """
    out = torch.arange(length, dtype=torch.float64)
    coords = (out + 0.5) * cells / length - 0.5
    low = torch.floor(coords)
    frac = coords - low
    low = low.long()
    matrix = torch.zeros(length, cells, dtype=torch.float64)
    for index, weight in ((low, 1 - frac), (low + 1, frac)):
        if cells == 1:
            index = torch.zeros_like(index)
        else:
            index = index.abs()
            index = torch.where(index > cells - 1, 2 * (cells - 1) - index, index)
        matrix.index_put_((out.long(), index), weight, accumulate=True)
    return matrix


def rise_masks(grids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: tuple) -> torch.Tensor:
    """(G, H, W) float64 masks: each grid upsampled to (s + 1) cells and cropped at its shift."""
    cells = grids.shape[-1]
    height, width = size
    up_rows = upsampling_matrix(cells, (cells + 1) * math.ceil(height / cells))
    up_cols = upsampling_matrix(cells, (cells + 1) * math.ceil(width / cells))
    row_windows = up_rows[rows[:, None] + torch.arange(height)]  # (G, H, s)
    col_windows = up_cols[cols[:, None] + torch.arange(width)]  # (G, W, s)
    return torch.einsum("ghs,gst,gwt->ghw", row_windows, grids, col_windows)


def rise(inputs: torch.Tensor, score_fn: Callable, fills: dict, masks: int = 1000, cells: int = 7,
         keep: float = 0.5, seed: int = 0, mask_batch: int = 64, score: str = "probability",
         baseline: str = "black") -> torch.Tensor:
    """RISE saliency (B, K, H, W) at input resolution, one map per target slot.

    ``score_fn(perturbed, score)`` takes (B, G, C, H, W) perturbed copies (G per image) and returns
    the (B, G, K) scores of each image's targets; ``fills`` maps 'black' / 'mean' to (C,) values.
    """
    batch, _, height, width = inputs.shape
    grids, rows, cols = rise_draws(masks, cells, keep, (height, width), seed)
    fill = fill_value(fills, baseline, inputs)[:, None]  # (1, 1, C, 1, 1)
    group = group_size(batch, mask_batch)
    saliency = None
    for start in range(0, masks, group):
        stop = start + group
        mask = rise_masks(grids[start:stop], rows[start:stop], cols[start:stop], (height, width))
        mask = mask.to(device=inputs.device, dtype=inputs.dtype)
        expanded = mask[None, :, None]  # (1, G, 1, H, W)
        scores = score_fn(inputs[:, None] * expanded + fill * (1 - expanded), score)  # (B, G, K)
        part = torch.einsum("bgk,ghw->bkhw", scores.to(mask.dtype), mask)
        saliency = part if saliency is None else saliency + part
    return saliency / (masks * keep)
