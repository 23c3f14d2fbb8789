"""Baseline maps that explain nothing, so every evaluation table shows what chance and centre bias score.

``random``: i.i.d. uniform values per patch, seeded per image (the seed is mixed with a fingerprint
of the image, so every image gets its own map and the same image always gets the same one).
``center``: an isotropic Gaussian centred on the grid, ``sigma`` as a fraction of the grid's longer
side.
"""

from __future__ import annotations

import torch

from vitlens.methods.common import Captured


def _grid(captured: Captured) -> tuple:
    return captured.grid


def random_map(captured: Captured, seed: int = 0) -> torch.Tensor:
    """Uniform noise (B, h, w), reproducible per image."""
    h, w = _grid(captured)
    maps = []
    for image in captured.inputs:
        fingerprint = int(torch.round(image.double().abs().sum() * 1000).item()) % (2 ** 31)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + fingerprint) % (2 ** 63))
        maps.append(torch.rand(h, w, generator=generator, dtype=torch.float64))
    return torch.stack(maps).to(device=captured.inputs.device, dtype=captured.inputs.dtype)


def center_map(captured: Captured, sigma: float = 0.25) -> torch.Tensor:
    """A centred Gaussian (B, h, w), identical for every image."""
    h, w = _grid(captured)
    ys = torch.arange(h, dtype=torch.float64) + 0.5 - h / 2
    xs = torch.arange(w, dtype=torch.float64) + 0.5 - w / 2
    spread = sigma * max(h, w)
    gauss = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * spread ** 2))
    inputs = captured.inputs
    return gauss.expand(len(inputs), h, w).clone().to(device=inputs.device, dtype=inputs.dtype)
