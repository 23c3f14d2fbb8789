"""Specificity (dependence on the target class): class contrast and the two-object share.

Maps are the ``[0, 1]`` maps at input resolution of :func:`vitlens.explain` (see
:mod:`vitlens.metrics.sensitivity`).

Class contrast ("random logit" test, Sixt et al. 2020 / Chefer et al. 2021's class-specific maps)
    For each image the map of the explained class ``t`` (by default the predicted class) is compared
    with the map of
    * ``2nd``: the highest-ranked class other than ``t`` (by the model's logits on the image), and
    * ``random``: a uniformly drawn class other than ``t``, seeded by ``seed`` and the image content
      (the same image always gets the same class, whatever batch it is in).
    All three maps come from one explain call with three targets per image (one forward, one
    backward per target), so a method that ignores the target gives three identical maps.
    Values (higher = the map depends more on the class):
    * ``contrast_rank_2nd`` / ``contrast_rank_random`` = ``1 - Spearman(m_t, m_other)`` in [0, 2]
      (average ranks for ties; two identical maps give 0 even when constant, where Spearman itself
      is undefined; one constant and one varying map give NaN);
    * ``contrast_l1_2nd`` / ``contrast_l1_random`` = mean absolute difference per pixel
      ``mean |m_t - m_other|`` in [0, 1].
    A map independent of the target scores exactly 0 on all four.

Two-object share
    Input: an image with two labelled objects of different classes, ``[LabelledBox(class, (x0, y0,
    x1, y1)), LabelledBox(...)]`` in model-input pixels (edges; pixel ``(i, j)`` is inside when its
    centre ``(j + .5, i + .5)`` is, as in :mod:`vitlens.metrics.localisation`). Each object's class is
    explained. With ``A`` = pixels of the target's box not in the other box and ``O`` = pixels of the
    other box not in the target's box (the overlap counts for neither),
    ``share(m, target) = sum(m over A) / (sum(m over A) + sum(m over O))`` (NaN when both are 0).
    Values per image:
    * ``object_share`` = mean over the two objects of ``share(m_k, k)``: the share of the relevance
      on the two objects that falls on the explained one (1 = always on the right object; a
      target-independent map scores ``(share_1 + 1 - share_1) / 2 = 0.5``);
    * ``object_contrast`` = ``share(m_1, 1) - share(m_2, 1) = share(m_1, 1) + share(m_2, 2) - 1`` in
      [-1, 1]: how far the relevance moves towards the explained object when the target changes;
      0 for a target-independent map.

``CATDOG`` gives the two objects of ``chefer_catdog.png`` (224 x 224, the classic Chefer et al. demo
image; ImageNet 243 bull mastiff, 282 tiger cat), boxes measured by eye on the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from vitlens.metrics.localisation import box_mask
from vitlens.metrics.sanity import spearman
from vitlens.metrics.perturbation import fingerprint as image_fingerprint
from vitlens.metrics.sensitivity import as_explainer

CONTRAST_VALUES = ("contrast_rank_2nd", "contrast_l1_2nd", "contrast_rank_random", "contrast_l1_random")
OBJECT_VALUES = ("object_share", "object_contrast")


@dataclass(frozen=True)
class LabelledBox:
    """An object: class index and box (x0, y0, x1, y1) in pixels (edges)."""

    label: int
    box: tuple


#: ``chefer_catdog.png`` (224 x 224): bulldog (upper middle, ImageNet 243 'bull mastiff') and tabby cat
#: (lower half, 282 'tiger cat'); the boxes overlap where the dog's paws meet the cat's head.
CATDOG = (LabelledBox(243, (76.0, 12.0, 166.0, 148.0)), LabelledBox(282, (44.0, 120.0, 200.0, 222.0)))


# ------------------------------------------------------------------------------------ distances
def rank_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - Spearman`` per image of two (N, ...) batches of maps; 0 for identical maps (also constant ones)."""
    rho = spearman(a, b)
    same = (a.reshape(a.shape[0], -1) == b.reshape(b.shape[0], -1)).all(dim=1)
    rho = torch.where(same, torch.ones_like(rho), rho)
    return 1.0 - rho


def l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per pixel of two (N, ...) batches of [0, 1] maps."""
    return (a.double() - b.double()).abs().reshape(a.shape[0], -1).mean(dim=1)


# ------------------------------------------------------------------------------------ class contrast
def contrast_targets(logits: torch.Tensor, targets: torch.Tensor, x: torch.Tensor | None = None,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(second-ranked class other than the target, random class other than the target), each (B,)."""
    logits = logits.detach().float().cpu()
    targets = torch.as_tensor(targets, dtype=torch.long).view(-1).cpu()
    B, C = logits.shape
    if C < 2:
        raise ValueError("class contrast needs a model with at least two classes")
    masked = logits.clone()
    masked[torch.arange(B), targets] = -math.inf
    second = masked.argmax(dim=1)
    chosen = []
    for b in range(B):
        fp = image_fingerprint(x[b]) if x is not None else b
        g = torch.Generator().manual_seed((seed * 1_000_003 + fp * 7 + 12345) % (2 ** 63))
        draw = int(torch.randint(0, C - 1, (1,), generator=g))
        chosen.append(draw + 1 if draw >= int(targets[b]) else draw)  # uniform over the C - 1 other classes
    return second, torch.tensor(chosen, dtype=torch.long)


def class_contrast(x: torch.Tensor, targets: torch.Tensor | None = None, explain_fn: Callable | None = None,
                   model=None, methods=None, params: dict | None = None, logits: torch.Tensor | None = None,
                   seed: int = 0, stats: dict | None = None) -> dict:
    """Class contrast of every method for a batch (see the module docstring).

    Parameters
    ----------
    x : Tensor (B, 3, H, W)
        Preprocessed images.
    targets : LongTensor (B,), optional
        Explained classes; default the predicted ones.
    explain_fn : callable, optional
        ``(x, targets (N, K)) -> {method: (N, K, H, W) maps}``; default an
        :class:`~vitlens.metrics.sensitivity.Explainer` of ``model`` with ``methods``.
    logits : Tensor (B, C), optional
        The model's logits on ``x`` (ranking for the second class); computed when not given (needs
        ``explain_fn.logits`` or a model).

    Returns
    -------
    dict : method -> {value name: (B,) float64}, plus ``'_targets'``: (B, 3) LongTensor
    (target, second, random) and ``'_maps'``: method -> (B, H, W) maps of the explained class.
    """
    explain_fn = as_explainer(explain_fn, model, methods, params)
    x = x.detach().cpu()
    if logits is None:
        if hasattr(explain_fn, "logits"):
            logits = explain_fn.logits(x)
        else:
            raise ValueError("class_contrast needs the logits (or an explainer with a .logits method)")
    if targets is None:
        targets = logits.argmax(dim=1)
    targets = torch.as_tensor(targets, dtype=torch.long).view(-1).cpu()
    second, other = contrast_targets(logits, targets, x, seed)
    triple = torch.stack([targets, second, other], dim=1)
    maps = explain_fn(x, triple)
    if stats is not None:
        stats["explained"] = stats.get("explained", 0) + x.shape[0]
        stats["calls"] = stats.get("calls", 0) + 1
    out: dict = {}
    for m, v in maps.items():
        v = v.detach().cpu()
        own = v[:, 0]
        out[m] = {"contrast_rank_2nd": rank_distance(own, v[:, 1]), "contrast_l1_2nd": l1_distance(own, v[:, 1]),
                  "contrast_rank_random": rank_distance(own, v[:, 2]),
                  "contrast_l1_random": l1_distance(own, v[:, 2])}
    out["_targets"] = triple
    out["_maps"] = {m: v[:, 0].detach().cpu() for m, v in maps.items()}
    return out


# ------------------------------------------------------------------------------------ two objects
def object_share(maps: torch.Tensor, target_boxes: Sequence, other_boxes: Sequence) -> torch.Tensor:
    """Share of the relevance on the two objects that falls on the target's box (overlap excluded).

    Parameters
    ----------
    maps : Tensor (N, H, W), values >= 0 (negative values are clipped)
    target_boxes, other_boxes : one (x0, y0, x1, y1) box per map (input pixels)
    """
    N, H, W = maps.shape
    out = torch.full((N,), math.nan, dtype=torch.float64)
    for n in range(N):
        own = box_mask([target_boxes[n]], (H, W))
        other = box_mask([other_boxes[n]], (H, W))
        positive = maps[n].double().clamp(min=0)
        on_own = positive[own & ~other].sum()
        on_other = positive[other & ~own].sum()
        total = on_own + on_other
        if total > 0:
            out[n] = float(on_own / total)
    return out


def pick_two(objects: Sequence[LabelledBox]) -> tuple | None:
    """The first two objects of different classes, or None."""
    objects = list(objects or ())
    for i, first in enumerate(objects):
        for second in objects[i + 1:]:
            if int(second.label) != int(first.label):
                return first, second
    return None


def two_object_share(x: torch.Tensor, objects: Sequence[Sequence[LabelledBox]], explain_fn: Callable | None = None,
                     model=None, methods=None, params: dict | None = None, maps: dict | None = None,
                     stats: dict | None = None) -> dict:
    """``object_share`` and ``object_contrast`` per image and method (NaN for an image without two
    objects of different classes).

    Parameters
    ----------
    x : Tensor (B, 3, H, W)
    objects : one list of :class:`LabelledBox` (input pixels) per image
    explain_fn : callable, optional
        ``(x, targets (N, 2)) -> {method: (N, 2, H, W)}``.
    maps : dict, optional
        method -> (B, 2, H, W) maps for the two picked objects' classes, when already computed.
    """
    explain_fn = as_explainer(explain_fn, model, methods, params) if maps is None else explain_fn
    x = x.detach().cpu()
    B = x.shape[0]
    picked = [pick_two(o) for o in objects]
    have = [b for b in range(B) if picked[b] is not None]
    if maps is None:
        if have:
            targets = torch.tensor([[int(picked[b][0].label), int(picked[b][1].label)] for b in have])
            got = explain_fn(x[have], targets)
            if stats is not None:
                stats["explained"] = stats.get("explained", 0) + len(have)
                stats["calls"] = stats.get("calls", 0) + 1
        else:
            got = None
    else:
        got = {m: v[have] for m, v in maps.items()}
    out: dict = {}
    names = list(got) if got is not None else list(getattr(explain_fn, "methods", []) or [])
    for m in names:
        share = torch.full((B,), math.nan, dtype=torch.float64)
        contrast = torch.full((B,), math.nan, dtype=torch.float64)
        if have:
            v = got[m].detach().cpu()
            first = [tuple(picked[b][0].box) for b in have]
            second = [tuple(picked[b][1].box) for b in have]
            s11 = object_share(v[:, 0], first, second)  # map of object 1 on object 1
            s22 = object_share(v[:, 1], second, first)  # map of object 2 on object 2
            s21 = object_share(v[:, 1], first, second)  # map of object 2 on object 1
            share[have] = (s11 + s22) / 2
            contrast[have] = s11 - s21
        out[m] = {"object_share": share, "object_contrast": contrast}
    return out


__all__ = ["CATDOG", "CONTRAST_VALUES", "LabelledBox", "OBJECT_VALUES", "class_contrast", "contrast_targets",
           "l1_distance", "object_share", "pick_two", "rank_distance", "two_object_share"]
