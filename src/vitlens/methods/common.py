"""Shared building blocks of the attention-based methods (all batched, any float dtype).

Shapes: B images, K heads, N tokens (prefix tokens first, then h*w patches row-major).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vitlens.errors import MethodError

EPS = 1e-8


@dataclass
class Captured:
    """What one forward (+ backward) captured, as the methods see it (all detached).

    Attributes
    ----------
    attentions : list of Tensor
        Post-softmax attention probabilities per layer, (B, K, N, N).
    gradients : list of Tensor or None
        d(target logit)/dA per layer, (B, K, N, N), for this target.
    layer_gradients : dict
        ``{(pool, layer): mean_h max(dS_layer/dA_layer, 0)}`` for LeGrad, (B, 1, N, N), where ``S_layer`` is
        the target score read out of that layer's output: the engine keeps only the positive part's mean
        over heads, which is all LeGrad reads (the full (B, K, N, N) gradient gives the same map).
    readout : Tensor
        (N,) weights of the token rows the classifier reads (CLS: one-hot at 0), or (B, N) per image
        for a head whose pooling depends on the image (SigLIP's attention-pooling probe).
    num_prefix : int
        Prefix tokens before the patches (CLS, distillation, registers).
    grid : (int, int)
        Patch grid (h, w).
    inputs : Tensor or None
        The preprocessed input batch (B, 3, H, W), detached (used by the baseline maps).
    input_relevance : dict
        ``{(variant, conv_gamma, lin_gamma, attention_gamma): (x, modified gradient)}`` from LRP passes.
    cam : dict
        ``{layer name: (activations, gradients)}``, each (B, C, h, w), for the Grad-CAM family.
    cam_layers : list of str
        The default target layers (those used when a method names none).
    layer_terms : dict
        ``{(term function, params): [per-layer term]}``: what a method reads from each layer's attention and
        gradient (:func:`terms_of`), computed by the engine while the backward produces each gradient, so
        that ``gradients`` need not be kept (it is None then).
    attention_relevance : list of Tensor or None
        LRP relevance at the attention probabilities per layer, (B, K, N, N), for this target, from the
        relevance pass with Chefer's rules (``transformer-attribution``).
    input_gradient : (Tensor, Tensor) or None
        The input x and d(target score)/dx for this target, channels in dim 1: (B, C, H, W) for images,
        (1, C, 1, n) per text sequence (saliency, input x gradient).
    """

    attentions: list
    gradients: list | None
    readout: torch.Tensor | None
    num_prefix: int
    grid: tuple
    layer_gradients: dict = field(default_factory=dict)
    cam: dict = field(default_factory=dict)
    cam_layers: list = field(default_factory=list)
    inputs: torch.Tensor | None = None
    input_relevance: dict = field(default_factory=dict)
    attention_relevance: list | None = None
    input_gradient: tuple | None = None
    layer_terms: dict = field(default_factory=dict)


def fuse_heads(attention: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(B, K, N, N) -> (B, N, N) by the mean, max or min over heads."""
    if how == "mean":
        return attention.mean(dim=1)
    if how == "max":
        return attention.amax(dim=1)
    if how == "min":
        return attention.amin(dim=1)
    raise MethodError(f"unknown head fusion {how!r}: expected mean, max or min")


def terms_of(captured: Captured, term, **params) -> list:
    """Per layer, ``term(attention, gradient, **params)``: the engine's copy from the backward, or computed here.

    Gradient methods of the rollout family read a layer only through such a term (Chefer:
    ``mean_h max(G A, 0)``). The engine computes the terms while the backward produces each layer's
    gradient and drops the gradient (``Captured.layer_terms``); otherwise the terms are computed from
    ``captured.gradients``, lazily: each is a zero-argument callable that :func:`rollout_readout` calls
    when it reaches the layer.
    """
    key = (term, tuple(sorted(params.items())))
    if key in captured.layer_terms:
        return list(captured.layer_terms[key])
    return [lambda a=a, g=g: term(a, g, **params) for a, g in zip(captured.attentions, captured.gradients)]


def readout_vector(captured: Captured, like: torch.Tensor) -> torch.Tensor:
    """The classifier's token readout ``w`` as a (B, N) row per image, in ``like``'s dtype and device."""
    weights = captured.readout.to(device=like.device, dtype=like.dtype)
    return weights.expand(like.shape[0], -1) if weights.dim() == 1 else weights


def through_residual(row: torch.Tensor, matrix: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``row @ Â`` with ``Â = rownorm(M + alpha I)``, the residual connection of Abnar & Zuidema's model.

    With s_i the row sums of M + alpha I: ``(v Â)_j = sum_i (v_i / s_i) M_ij + alpha v_j / s_j``, so
    neither Â nor an identity matrix is built. With rows of M summing to 1 and alpha = 1, Â is
    (M + I) / 2; a row of M that is all zero (possible after discarding) is the identity row of Â
    (alpha > 0) or stays zero (alpha = 0). ``row`` (B, N), ``matrix`` (B, N, N): O(N^2) per image
    instead of the O(N^3) of a product of matrices.
    """
    sums = matrix.sum(dim=-1) + alpha
    scaled = torch.where(sums > 0, row / sums.clamp_min(torch.finfo(matrix.dtype).tiny), 0.0)
    return torch.bmm(scaled.unsqueeze(1), matrix).squeeze(1) + alpha * scaled


def through_identity_plus(row: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``row @ (I + matrix)`` for Chefer's unnormalised rollout: ``v + v M``."""
    return row + torch.bmm(row.unsqueeze(1), matrix).squeeze(1)


def rollout_readout(layers, captured: Captured, step) -> torch.Tensor:
    """``w^T M_L ... M_s`` on the patches, (B, h, w), applied right to left as a row vector.

    ``layers`` are the per-layer matrices (B, N, N) in model order (first = layer s), or zero-argument
    callables that build them, so a layer's matrix exists only while it is applied; ``step(row, matrix)``
    is ``row @ M_l`` (:func:`through_residual` or :func:`through_identity_plus`). Only the readout rows
    of the rollout are ever used, so the (N, N) product of every layer is never formed: O(L N^2)
    instead of O(L N^3).
    """
    row = None
    for layer in reversed(list(layers)):
        matrix = layer() if callable(layer) else layer
        row = readout_vector(captured, matrix) if row is None else row
        row = step(row, matrix)
    return patches_to_grid(row[:, captured.num_prefix:], captured.grid)


def readout_rows(matrix: torch.Tensor, captured: Captured) -> torch.Tensor:
    """Read an (B, N, N) token-to-token matrix the way the classifier pools tokens -> (B, h, w).

    The patch map is ``w^T M`` restricted to patch columns, where ``w`` weighs the token rows
    that feed the classifier: the CLS row for CLS pooling (the usual ``M[0, 1:]``), the mean of
    the CLS and distillation rows for distilled DeiT, the mean of patch rows for average pooling.
    """
    weights = captured.readout.to(matrix.dtype).to(matrix.device)
    row = torch.einsum("bn,bnm->bm" if weights.dim() == 2 else "n,bnm->bm", weights, matrix)
    return patches_to_grid(row[:, captured.num_prefix:], captured.grid)


def patches_to_grid(values: torch.Tensor, grid: tuple) -> torch.Tensor:
    """(B, P) per-patch values -> (B, h, w), row-major (token t -> (t // w, t % w))."""
    h, w = grid
    if values.shape[-1] != h * w:
        raise ValueError(f"{values.shape[-1]} patch tokens do not fill a {h}x{w} grid")
    return values.reshape(values.shape[0], h, w)


def minmax(maps: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-map (x - min) / (max - min + eps) over the last two dimensions."""
    flat = maps.flatten(start_dim=-2)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    return ((flat - lo) / (hi - lo + eps)).reshape(maps.shape)


def to_pixels(patch_maps: torch.Tensor, size: tuple) -> torch.Tensor:
    """(B, h, w) raw patch maps -> (B, H, W) in [0, 1].

    Bilinear upsampling with ``align_corners=False`` (as Chefer, LeGrad and pytorch-grad-cam's
    cv2 resize), then per-image min-max with eps 1e-8 so a constant map becomes all zeros
    instead of NaN.
    """
    # float64 so that a constant map stays exactly constant: in float32 the bilinear kernel's
    # rounding steps (~1e-8 of the value) would be blown up by the min-max into visible noise.
    up = F.interpolate(patch_maps.unsqueeze(1).double(), size=tuple(size), mode="bilinear", align_corners=False)
    return minmax(up.squeeze(1)).float()


# --- perturbation methods (RISE, occlusion): shared conventions ------------------------------------
#: what a perturbation method scores each perturbed copy by
SCORES = ("probability", "logit")
#: the value hidden pixels take, in the model's input (normalised) space: 'black' is the normalised
#: value of a 0 pixel, (0 - mean) / std per channel; 'mean' is 0, the preprocessing's mean colour
FILLS = ("black", "mean")


def fill_value(fills: dict, baseline: str, like: torch.Tensor) -> torch.Tensor:
    """The (1, C, 1, 1) fill of ``baseline`` (see :data:`FILLS`) on ``like``'s device and dtype."""
    if baseline not in fills:
        raise MethodError(f"unknown baseline {baseline!r}: expected one of {', '.join(FILLS)}")
    return torch.as_tensor(fills[baseline]).to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1)


def group_size(batch: int, mask_batch: int) -> int:
    """Perturbations per image in one call of the scorer, so that a forward sees about ``mask_batch`` images."""
    return max(1, mask_batch // max(1, batch))
