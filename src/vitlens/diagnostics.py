"""Maps that show nothing: constant, all-zero or non-finite explanation maps, and what most likely caused them.

A map like that is written like any other and looks like an explanation (a flat colour, or min-max
noise): the run says so instead, once, naming the method, how many maps and the first image. The
checks are on the raw maps, before any normalisation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["CONSTANT", "NON_FINITE", "ZERO", "degenerate_kind", "flat_scores", "likely_cause", "summarise"]

NON_FINITE = "non-finite"
ZERO = "all-zero"
CONSTANT = "constant"

# How far apart a map's values must be, relative to their size, to count as a map: float32 rounding of
# a constant map computed through different paths stays far below this.
_RELATIVE_SPREAD = 1e-6


def degenerate_kind(raw: torch.Tensor) -> str | None:
    """``'non-finite'`` (any NaN or infinity), ``'all-zero'``, ``'constant'`` (every value equal up to
    float32 rounding: ``max - min <= 1e-6 * max |value|``) or None for a map that shows something."""
    values = raw.detach().double()
    if not bool(torch.isfinite(values).all()):
        return NON_FINITE
    largest = float(values.abs().max()) if values.numel() else 0.0
    if largest == 0.0:
        return ZERO
    if float(values.max() - values.min()) <= _RELATIVE_SPREAD * largest:
        return CONSTANT
    return None


def flat_scores(scores: torch.Tensor) -> bool:
    """True when a model's class scores (logits or probabilities) of one image are all equal."""
    values = scores.detach().double()
    return float(values.max() - values.min()) <= _RELATIVE_SPREAD * max(float(values.abs().max()), 1e-30)


def likely_cause(kind: str, flat_logits: bool, precision: str = "fp32") -> str:
    """The most likely reason for a degenerate map of ``kind``, in words."""
    if kind == NON_FINITE:
        advice = f" (the run used {precision}: try fp32)" if precision != "fp32" else ""
        return f"the model's output or its gradients overflowed{advice}"
    if flat_logits:
        return ("the model gives every class the same score: an untrained or zero-initialised head "
                "(torchvision's vit_b_16() without weights has one)?")
    return "no signal reached the map (for a gradient method: the target's gradient is zero)"


def summarise(items: Iterable[tuple[str, str, str, str]]) -> list[str]:
    """One line per (method, kind): ``items`` are ``(method, kind, cause, image name)``, one per map.

    ``gradcam: 4 constant maps (first: 'a.jpg'): the model gives every class the same score...``
    """
    groups: dict[tuple[str, str], list] = {}
    for method, kind, cause, image in items:
        group = groups.setdefault((method, kind), [0, image, cause])
        group[0] += 1
    lines = []
    for (method, kind), (count, first, cause) in groups.items():
        noun = "map" if count == 1 else "maps"
        lines.append(f"{method}: {count} {kind} {noun} (first: '{first}'): {cause}")
    return lines
