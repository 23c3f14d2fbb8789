"""Sensitivity (robustness to the input): max- and average-sensitivity (Yeh et al., NeurIPS 2019) and a
local Lipschitz estimate, with every perturbed copy of every image explained in large batches.

Maps
    The maps compared are the ``[0, 1]`` maps at the model's input resolution that
    :func:`vitlens.explain` returns in ``ExplainResult.maps`` (raw patch map, bilinear upsampling,
    per-map min-max; signed LRP relevance: positive part over its maximum). A constant raw map
    becomes all zeros. Every method therefore lives on the same scale, and a sensitivity of 0.1
    means the same for all of them.

Perturbations
    ``samples`` perturbed copies per image, ``x'_s = x + delta_s``, with ``delta_s`` drawn i.i.d.
    uniform in the L-infinity ball of radius ``radius`` in ``[0, 1]`` PIXEL space
    (``delta ~ U(-r, r)`` per pixel and channel), the perturbed pixels clamped to ``[0, 1]`` (so the
    actual perturbation can be smaller than ``delta`` near black and white), and carried into the
    model's normalised input space with its own preprocessing mean/std: pixel ``p = x * std + mean``,
    ``x' = (clamp(p + delta, 0, 1) - mean) / std``. Default radius 0.05 (about 13 grey levels of 255;
    the prediction of a real ViT-Tiny stays the same for the vast majority of images). The noise of
    image ``b``, sample ``s`` is seeded by ``seed``, a fingerprint of the image's content and ``s``,
    so an image gets the same perturbations whatever batch it is in (batched == per image).
    The perturbed copies are explained for the SAME target class as the original (the map change
    measures the input's effect, not a change of the predicted class).

Values per image (``d_s`` = distance between the map of ``x'_s`` and the map of ``x``)
    * ``max_sensitivity`` = ``max_s d_s`` and ``avg_sensitivity`` = ``mean_s d_s`` with
      ``d_s = ||m(x'_s) - m(x)||_2 / sqrt(H W)`` (root-mean-square change per pixel, in ``[0, 1]``;
      ``norm='rms'``, default) or ``||m(x'_s) - m(x)||_2 / ||m(x)||_2`` (``norm='relative'``, the
      Quantus convention; NaN for an all-zero original map). Lower = more robust.
    * ``lipschitz`` = ``max_s ||m(x'_s) - m(x)||_2 / ||p'_s - p||_2`` (plain L2 norms: the map over
      its H x W pixels, the input over its 3 x H x W values in ``[0, 1]`` pixel space, actual
      clamped perturbation). Lower = smoother.

A map that does not depend on the input (a constant map, the ``center`` baseline) has sensitivity
and Lipschitz estimate exactly 0; the ``random`` baseline (noise seeded by the image content) is as
sensitive as a map can be — robustness alone is not quality, read it next to faithfulness.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from vitlens.metrics.perturbation import fingerprint as image_fingerprint, pixel_stats

SENSITIVITY_VALUES = ("max_sensitivity", "avg_sensitivity", "lipschitz")
NORMS = ("rms", "relative")


# ------------------------------------------------------------------------------------ explainers
class Explainer:
    """A callable that explains a batch: ``(x (N, 3, H, W), targets (N,) or (N, K)) -> {method: maps}``.

    The maps are ``ExplainResult.maps`` of :func:`vitlens.explain`: (N, H, W) for 1-d targets,
    (N, K, H, W) for (N, K) targets. All methods come from one pass per chunk of ``batch_size``.
    ``calls`` and ``images`` count the explain calls and the images explained.
    """

    def __init__(self, model, methods, params: dict | None = None, batch_size: int = 32, precision="fp32"):
        from vitlens.methods import parse_methods
        from vitlens.models import ImageModel, load_model

        self.model = model if isinstance(model, ImageModel) else load_model(model)
        self.methods = parse_methods(methods, self.model)
        self.params = {m: p for m, p in (params or {}).items() if m in self.methods}
        self.batch_size = batch_size
        self.precision = precision
        self.calls = 0
        self.images = 0

    @property
    def pixel_stats(self) -> tuple:
        return pixel_stats(self.model)

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> dict:
        from vitlens.api import explain

        targets = torch.as_tensor(targets, dtype=torch.long)
        result = explain(self.model, x, methods=self.methods, target=targets, batch_size=self.batch_size,
                         params=self.params, precision=self.precision, warn=False)  # the run warns once
        self.calls += 1
        self.images += x.shape[0]
        if targets.dim() == 1:
            return {m: result.maps[m][:, 0] for m in self.methods}
        return {m: result.maps[m] for m in self.methods}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) of a batch (no explanation)."""
        out = []
        with torch.no_grad(), self.model.eval_mode():
            for start in range(0, x.shape[0], self.batch_size):
                chunk = x[start:start + self.batch_size].to(device=self.model.device, dtype=self.model.dtype)
                out.append(self.model.logits(chunk).float().cpu())
        return torch.cat(out)


def as_explainer(explain_fn=None, model=None, methods=None, params=None, batch_size: int = 32):
    """``explain_fn`` if given (any callable with the :class:`Explainer` signature), else an
    :class:`Explainer` of ``model`` with ``methods``."""
    if explain_fn is not None:
        return explain_fn
    if model is None or methods is None:
        raise ValueError("give an explain callable, or a model and methods")
    return Explainer(model, methods, params, batch_size)


# ------------------------------------------------------------------------------------ perturbations
def perturb(x: torch.Tensor, index: int, sample: int, radius: float, mean, std, seed: int = 0,
            fingerprint: int | None = None) -> tuple[torch.Tensor, float]:
    """One perturbed copy of the preprocessed image ``x[index]`` (3, H, W) and the L2 norm of its actual
    perturbation in ``[0, 1]`` pixel space (see the module docstring)."""
    image = x[index]
    fp = image_fingerprint(image) if fingerprint is None else fingerprint
    generator = torch.Generator().manual_seed(((seed * 1_000_003 + fp) * 1009 + sample) % (2 ** 63))
    delta = (torch.rand(image.shape, generator=generator, dtype=torch.float64) * 2 - 1) * radius
    m = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    pixels = image.double().cpu() * s + m
    moved = (pixels + delta).clamp(0.0, 1.0)
    step = float((moved - pixels).norm())
    return ((moved - m) / s).to(dtype=x.dtype), step


def _distances(new: torch.Tensor, old: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) normalised distance and plain L2 distance of (N, H, W) maps."""
    diff = (new.double() - old.double()).flatten(1).norm(dim=1)
    if norm == "rms":
        return diff / math.sqrt(old[0].numel()), diff
    base = old.double().flatten(1).norm(dim=1)
    rel = torch.where(base > 0, diff / base.clamp(min=1e-300), torch.full_like(diff, math.nan))
    return rel, diff


def sensitivity(x: torch.Tensor, targets: torch.Tensor, explain_fn: Callable | None = None, model=None,
                methods=None, params: dict | None = None, maps: dict | None = None, radius: float = 0.05,
                samples: int = 10, norm: str = "rms", seed: int = 0, mean=None, std=None, batch_size: int = 64,
                stats: dict | None = None) -> dict:
    """Max-/average-sensitivity and the local Lipschitz estimate of every method, for a batch.

    Parameters
    ----------
    x : Tensor (B, 3, H, W)
        Preprocessed images.
    targets : LongTensor (B,)
        Explained class per image (kept for the perturbed copies).
    explain_fn : callable, optional
        ``(x, targets (N,)) -> {method: (N, H, W) maps in [0, 1]}``; default an :class:`Explainer`
        of ``model`` with ``methods`` and ``params``.
    maps : dict, optional
        method -> (B, H, W) maps of the unperturbed images, when already computed (else explained).
    radius : float
        L-infinity radius of the uniform noise in [0, 1] pixel space.
    samples : int
        Perturbed copies per image.
    norm : {'rms', 'relative'}
        Distance of maps for the sensitivities (the Lipschitz estimate always uses plain L2).
    mean, std : per-channel preprocessing statistics (default: the model's, or of ``explain_fn.pixel_stats``).
    batch_size : int
        Perturbed images per explain call (images and samples are mixed in one call).
    stats : dict, optional
        Filled with ``explained`` (perturbed images explained) and ``calls``.

    Returns
    -------
    dict : method -> {'max_sensitivity', 'avg_sensitivity', 'lipschitz', 'distances'} with (B,)
    float64 tensors and ``distances`` the (B, samples) per-sample values.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: choose from {', '.join(NORMS)}")
    if samples < 1:
        raise ValueError("samples must be at least 1")
    explain_fn = as_explainer(explain_fn, model, methods, params)
    if mean is None or std is None:
        stats_of = getattr(explain_fn, "pixel_stats", None)
        if stats_of is None and model is not None:
            stats_of = pixel_stats(model)
        m0, s0 = stats_of if stats_of is not None else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        mean, std = (m0 if mean is None else mean), (s0 if std is None else std)
    x = x.detach().cpu()
    targets = torch.as_tensor(targets, dtype=torch.long).view(-1).cpu()
    B = x.shape[0]
    if maps is None:
        maps = explain_fn(x, targets)
    maps = {m: (v[:, 0] if v.dim() == 4 else v).detach().cpu() for m, v in maps.items()}
    fingerprints = [image_fingerprint(x[b]) for b in range(B)]
    pairs = [(b, s) for b in range(B) for s in range(samples)]
    dist = {m: torch.zeros(B, samples, dtype=torch.float64) for m in maps}
    ratio = {m: torch.zeros(B, samples, dtype=torch.float64) for m in maps}
    explained = calls = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        made = [perturb(x, b, s, radius, mean, std, seed, fingerprints[b]) for b, s in chunk]
        xp = torch.stack([t for t, _ in made])
        steps = torch.tensor([n for _, n in made], dtype=torch.float64)
        index = torch.tensor([b for b, _ in chunk])
        new = explain_fn(xp, targets[index])
        explained += len(chunk)
        calls += 1
        for m in maps:
            d, plain = _distances(new[m].detach().cpu(), maps[m][index], norm)
            lip = torch.where(steps > 0, plain / steps.clamp(min=1e-300), torch.zeros_like(plain))
            for j, (b, s) in enumerate(chunk):
                dist[m][b, s] = d[j]
                ratio[m][b, s] = lip[j]
    if stats is not None:
        stats["explained"] = stats.get("explained", 0) + explained
        stats["calls"] = stats.get("calls", 0) + calls
    return {m: {"max_sensitivity": dist[m].amax(dim=1), "avg_sensitivity": dist[m].mean(dim=1),
                "lipschitz": ratio[m].amax(dim=1), "distances": dist[m]} for m in maps}


__all__ = ["Explainer", "NORMS", "SENSITIVITY_VALUES", "as_explainer", "perturb", "sensitivity"]
