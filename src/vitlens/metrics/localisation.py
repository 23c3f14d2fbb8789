"""Localisation metrics: does the map point at the object?

Maps are (B, H, W) at the model input resolution (``ExplainResult.maps[m][:, 0]``, in [0, 1]).
Boxes come in ORIGINAL image pixels (``Sample.boxes``, edges ``x0 <= x < x1``) and are carried into
input pixels through the preprocessing crop box (:func:`boxes_to_input`). Pixel ``(i, j)`` of the
input covers ``[j, j + 1) x [i, i + 1)``; it is inside a box when its centre ``(j + .5, i + .5)`` is.

* **pointing game** (Zhang et al. 2016): a hit when the map's maximum (the first in raster order
  when several pixels share it) lies inside a box or within ``tolerance`` input pixels of one
  (Euclidean distance from the pixel centre to the box; the paper used 15 px). NaN for an image
  without a box inside the crop.
* **energy in box** (Wang et al., Score-CAM 2020): share of the positive relevance that falls inside
  the union of the boxes, ``sum(relu(m) * inside) / sum(relu(m))``; 0 for an all-zero map.
* **segmentation** (Chefer et al. 2021's protocol): threshold at the map's mean, foreground =
  ``map > mean``; per image pixel accuracy, foreground IoU, mIoU (mean of the foreground and
  background IoUs) and average precision of the map values against the mask (step-wise AP, ties
  grouped, as ``sklearn.metrics.average_precision_score``). Chefer accumulates pixel accuracy and
  IoU over the whole dataset; vitlens reports per-image values so that each has a confidence
  interval.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def boxes_to_input(boxes: Sequence, crop_box, input_size: tuple) -> list[tuple]:
    """Carry boxes from original-image pixels into model-input pixels.

    ``crop_box`` (x0, y0, x1, y1) is the region of the original image the model saw (it is
    stretched to ``input_size`` = (H, W)). Boxes are clipped to the input; boxes entirely outside
    it are dropped.
    """
    H, W = input_size
    cx0, cy0, cx1, cy1 = (float(v) for v in crop_box)
    sx, sy = W / max(cx1 - cx0, 1e-12), H / max(cy1 - cy0, 1e-12)
    out = []
    for x0, y0, x1, y1 in boxes:
        bx0, bx1 = (x0 - cx0) * sx, (x1 - cx0) * sx
        by0, by1 = (y0 - cy0) * sy, (y1 - cy0) * sy
        bx0, bx1 = max(0.0, bx0), min(float(W), bx1)
        by0, by1 = max(0.0, by0), min(float(H), by1)
        if bx1 > bx0 and by1 > by0:
            out.append((bx0, by0, bx1, by1))
    return out


def box_mask(boxes: Sequence, input_size: tuple) -> torch.Tensor:
    """(H, W) bool: pixels whose centre lies in any box (input pixel coordinates)."""
    H, W = input_size
    ys = torch.arange(H, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(W, dtype=torch.float64)[None, :] + 0.5
    mask = torch.zeros(H, W, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        mask |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return mask


def pointing_game(maps: torch.Tensor, boxes: Sequence[Sequence], tolerance: float = 15.0) -> torch.Tensor:
    """1.0 (hit) / 0.0 (miss) per image; NaN for an image without boxes.

    Parameters
    ----------
    maps : Tensor (B, H, W)
    boxes : one sequence of (x0, y0, x1, y1) input-pixel boxes per image
    tolerance : float
        Input pixels around a box that still count as a hit.
    """
    B, H, W = maps.shape
    flat = maps.reshape(B, -1).double()
    peak = flat.argmax(dim=1)
    out = torch.full((B,), math.nan, dtype=torch.float64)
    for b in range(B):
        if not boxes[b]:
            continue
        py, px = divmod(int(peak[b]), W)
        cx, cy = px + 0.5, py + 0.5
        best = math.inf
        for x0, y0, x1, y1 in boxes[b]:
            inside = x0 <= cx < x1 and y0 <= cy < y1
            dx = max(x0 - cx, 0.0, cx - x1)
            dy = max(y0 - cy, 0.0, cy - y1)
            best = min(best, 0.0 if inside else math.hypot(dx, dy))
        out[b] = 1.0 if best <= tolerance else 0.0
    return out


def energy_in_box(maps: torch.Tensor, boxes: Sequence[Sequence]) -> torch.Tensor:
    """Share of positive relevance inside the boxes, per image (NaN without boxes)."""
    B, H, W = maps.shape
    out = torch.full((B,), math.nan, dtype=torch.float64)
    for b in range(B):
        if not boxes[b]:
            continue
        positive = maps[b].double().clamp(min=0)
        total = positive.sum()
        inside = positive[box_mask(boxes[b], (H, W))].sum()
        out[b] = float(inside / total) if total > 0 else 0.0
    return out


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Average precision ``sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds (sklearn's definition).

    NaN when there is no positive label.
    """
    s = scores.flatten().double()
    y = labels.flatten().bool()
    positives = int(y.sum())
    if positives == 0:
        return math.nan
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], y[order].double()
    tp = torch.cumsum(y, 0)
    # keep the last index of each run of equal scores (a threshold takes all tied items at once)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp = tp[last]
    predicted = (torch.nonzero(last).flatten() + 1).double()
    precision = tp / predicted
    recall = tp / positives
    previous = torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
    return float(((recall - previous) * precision).sum())


def segmentation_scores(maps: torch.Tensor, masks: torch.Tensor) -> dict:
    """Chefer's segmentation protocol per image: threshold at the map mean.

    Parameters
    ----------
    maps : Tensor (B, H, W)
    masks : BoolTensor (B, H, W)
        Ground-truth foreground.

    Returns
    -------
    dict of (B,) tensors: ``pixel_accuracy``, ``iou`` (foreground), ``miou`` (mean of foreground
    and background IoU), ``ap``. IoU of a class absent from both prediction and mask is NaN.
    """
    B = maps.shape[0]
    m = maps.reshape(B, -1).double()
    gt = masks.reshape(B, -1).bool()
    pred = m > m.mean(dim=1, keepdim=True)

    def iou(a, b):
        inter = (a & b).sum(dim=1).double()
        union = (a | b).sum(dim=1).double()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, math.nan))

    fg, bg = iou(pred, gt), iou(~pred, ~gt)
    return {
        "pixel_accuracy": (pred == gt).double().mean(dim=1),
        "iou": fg,
        "miou": torch.nanmean(torch.stack([fg, bg]), dim=0),
        "ap": torch.tensor([average_precision(m[b], gt[b]) for b in range(B)], dtype=torch.float64),
    }


def mask_to_input(mask: torch.Tensor, crop_box, input_size: tuple) -> torch.Tensor:
    """An original-resolution (h, w) mask cropped by ``crop_box`` and resized (nearest) to the input."""
    h, w = mask.shape
    H, W = input_size
    cx0, cy0, cx1, cy1 = (float(v) for v in crop_box)
    ys = (cy0 + (torch.arange(H, dtype=torch.float64) + 0.5) * (cy1 - cy0) / H).floor().long().clamp(0, h - 1)
    xs = (cx0 + (torch.arange(W, dtype=torch.float64) + 0.5) * (cx1 - cx0) / W).floor().long().clamp(0, w - 1)
    return mask[ys][:, xs].bool()


__all__ = ["average_precision", "box_mask", "boxes_to_input", "energy_in_box", "mask_to_input", "pointing_game",
           "segmentation_scores"]
