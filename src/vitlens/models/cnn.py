"""Adapter for convolutional classifiers (torchvision, timm, Hugging Face, or any ``nn.Module``).

CNNs have no attention: they support the Grad-CAM family, which needs the activations of a target
layer and the target logit's gradient with respect to them. The default target layer is the last
module with a spatial output before global pooling (ResNet ``layer4``, VGG ``features``,
EfficientNet ``bn2``, timm Swin ``norm``), found once with a dry run that also decides each layer's
layout: channel-first (B, C, h, w), channel-last (B, h, w, C) as in timm Swin, Swin-V2, ConvNeXt and
MaxViT blocks, or a token sequence (B, h*w, C); see :func:`vitlens.models.layers.scan_layers`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from vitlens.errors import MethodError
from vitlens.models.base import ImageModel
from vitlens.models.capture import AttentionRecorder
from vitlens.models.layers import LayerScan, canonical_name, scan_layers, suggest, to_spatial, unmappable
from vitlens.models.preprocess import (Preprocess, hf_preprocess_from_config, interpolation_name,
                                      torchvision_default_preprocess)
from vitlens.models.registry import Family, register_family


def is_cnn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


class CNNModel(ImageModel):
    """Any convolutional image classifier."""

    family = "cnn"
    has_attention = False

    def __init__(self, module, preprocess, class_names=None, info=None):
        super().__init__(module, preprocess, class_names, info)
        self._scan: LayerScan | None = None
        self._num_classes: int | None = None
        self._input_size: tuple | None = None  # (H, W) of the last forward: the grid of token outputs

    def _dry_run(self) -> None:
        h, w = self.preprocess.input_size
        # two images, so that an output whose first dimension is not the batch is told apart from one
        # that merely starts with 1 (Swin-V2's position-bias MLP gives (1, 7, 7, heads) for any batch)
        example = torch.zeros(2, 3, h, w, device=self.device, dtype=self.dtype)
        with self.eval_mode():
            # a layer whose layout one run leaves open is settled by a run at twice the height, where
            # the model accepts it (spatial dimensions follow the input, channels do not)
            self._scan = scan_layers(self.module, example, second_size=(2 * h, w))
            with torch.no_grad():
                self._num_classes = int(self.logits(example).shape[-1])

    @property
    def layer_scan(self) -> LayerScan:
        """The dry run's findings: mappable layers, their layouts (name -> LayerLayout), and why others are not."""
        if self._scan is None:
            self._dry_run()
        return self._scan

    @property
    def layer_layouts(self) -> dict:
        """name -> layout ('NCHW', 'NHWC' or 'NLC') of every mappable layer."""
        return {name: entry.layout for name, entry in self.layer_scan.layouts.items()}

    def spatial_layer_names(self) -> list[str]:
        return self.layer_scan.names

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self._dry_run()
        return self._num_classes

    @property
    def num_layers(self) -> int:
        return 0

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    def fixed_input_size(self) -> tuple[int, int] | None:
        return timm_fixed_input_size(self.module)

    def default_cam_layers(self) -> list[str]:
        return self.spatial_layer_names()[-1:]

    def check_cam_layer(self, layer: str) -> None:
        """One-line MethodError, before anything runs, for a named layer that cannot be a Grad-CAM target.

        The dry run's shape is reported (its batch of 2 images); :meth:`cam_spatial` raises the same
        error with the batch's shape, for callers that do not check first.
        """
        scan = self.layer_scan
        key = canonical_name(self.module, layer, scan.names)  # an unknown name: one line with choices
        if key in scan.layouts:
            return
        shape = scan.shapes.get(key)
        if shape is None:
            raise MethodError(f"target layer '{layer}' does not output a tensor in a forward pass: "
                              f"choose one of {suggest(scan.names)}")
        raise unmappable(layer, shape, scan.problems.get(key), scan.names)

    def cam_spatial(self, activation: torch.Tensor, grid, layer: str) -> torch.Tensor:
        # ``grid`` is the engine's 16-pixel stand-in for models without patches; the real grid is the
        # layer's own, and token outputs are laid on the one that fits the batch's input size
        key = canonical_name(self.module, layer, self.layer_scan.names)
        return to_spatial(activation, layer, self.layer_scan, self._input_size, key=key)

    def logits(self, x):
        self._input_size = tuple(x.shape[-2:])
        out = self.module(x)
        if hasattr(out, "logits"):
            return out.logits
        if isinstance(out, (tuple, list)):
            return out[0]
        return out

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        yield recorder  # nothing to capture: no attention


# --- registration -----------------------------------------------------------------------------
def timm_fixed_input_size(module) -> tuple[int, int] | None:
    """The input size a timm model with a strict patch embedding (Swin, Swin-V2) takes, else None."""
    patch_embed = getattr(module, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None or not getattr(patch_embed, "strict_img_size", False) or getattr(module, "dynamic_img_size", False):
        return None
    return int(size[0]), int(size[1])


def cnn_default_preprocess(module) -> Preprocess:
    """A timm CNN's own data config, a Hugging Face CNN's processor config, else ImageNet at 224."""
    if getattr(module, "pretrained_cfg", None):
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=module)
        _, h, w = cfg["input_size"]
        # the model's real input size wins over a pretrained config of another resolution (a Swin
        # built with img_size=64 keeps the 224 of its pretrained config)
        h, w = timm_fixed_input_size(module) or (h, w)
        return Preprocess((int(h), int(w)), tuple(cfg["mean"]), tuple(cfg["std"]),
                          interpolation_name(cfg.get("interpolation", "bilinear")), float(cfg.get("crop_pct", 0.875)))
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "num_labels"):
        return hf_preprocess_from_config(config, getattr(config, "_name_or_path", None) or None)
    return torchvision_default_preprocess(224)


def wrap(module, preprocess=None, class_names=None, info=None) -> CNNModel:
    return CNNModel(module, preprocess or cnn_default_preprocess(module), class_names, info)


# the catch-all: tried after every attention family, so a ViT with a convolutional stem stays a ViT
register_family(Family("cnn", "image", is_cnn, wrap, priority=90,
                       description="convolutional classifiers (torchvision, timm, Hugging Face, "
                                   "any nn.Module with Conv2d)"))
