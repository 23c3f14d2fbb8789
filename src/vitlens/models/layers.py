"""Target layers for Grad-CAM-style methods: naming, automatic choice, and spatial reshaping."""

from __future__ import annotations

import torch
from torch import nn

from vitlens.errors import MethodError

_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


def spatial_layers(module: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules whose output is a (B, C, h, w) map with h * w > 1, in completion order.

    Found with one forward of ``example`` under temporary hooks (removed afterwards). Pooling
    layers are left out: Grad-CAM explains features, not their pooled copies.
    """
    order: list[str] = []
    handles = []
    for name, sub in module.named_modules():
        if not name or isinstance(sub, _POOLING):
            continue

        def hook(mod, inputs, output, name=name):
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
                order.append(name)

        handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    seen, unique = set(), []
    for name in order:
        if name not in seen:
            seen.add(name)
            unique.append(name)
    return unique


def suggest(valid: list[str] | None, count: int = 10) -> str:
    """A short list of layer names for error messages: shallow names first, the last ones kept."""
    valid = valid or []
    shallow = [name for name in valid if name.count(".") <= 1] or valid
    return ", ".join(shallow[-count:]) or "see model.named_modules()"


def find_module(module: nn.Module, name: str, valid: list[str] | None = None) -> nn.Module:
    """Resolve a dotted module name (``layer4.1``, ``features.7``, ``blocks.-1.norm1``)."""
    current = module
    for part in name.split("."):
        try:
            if part.lstrip("-").isdigit() and isinstance(current, (nn.Sequential, nn.ModuleList)):
                current = current[int(part)]
            else:
                current = getattr(current, part)
        except (AttributeError, IndexError, TypeError):
            current = None
        if not isinstance(current, nn.Module):
            raise MethodError(f"unknown target layer '{name}': valid choices include {suggest(valid)}")
    return current


def to_spatial(activation: torch.Tensor, layer: str, valid: list[str] | None = None) -> torch.Tensor:
    if activation.dim() != 4:
        raise MethodError(
            f"target layer '{layer}' has no spatial output (shape {tuple(activation.shape)}): "
            f"choose one of {suggest(valid)}"
        )
    return activation
