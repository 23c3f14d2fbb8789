"""Adapter for convolutional classifiers (torchvision, timm, Hugging Face, or any ``nn.Module``).

CNNs have no attention: they support the Grad-CAM family, which needs the activations of a target
layer and the target logit's gradient with respect to them. The default target layer is the last
module with a spatial output before global pooling (ResNet ``layer4``, VGG ``features``,
EfficientNet ``bn2``), found once with a dry run.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from vitlens.models.base import ImageModel
from vitlens.models.capture import AttentionRecorder
from vitlens.models.layers import spatial_layers, to_spatial
from vitlens.models.preprocess import Preprocess, hf_preprocess_from_config, interpolation_name, torchvision_default_preprocess
from vitlens.models.registry import Family, register_family


def is_cnn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


class CNNModel(ImageModel):
    """Any convolutional image classifier."""

    family = "cnn"
    has_attention = False

    def __init__(self, module, preprocess, class_names=None, info=None):
        super().__init__(module, preprocess, class_names, info)
        self._spatial: list[str] | None = None
        self._num_classes: int | None = None

    def _dry_run(self) -> None:
        h, w = self.preprocess.input_size
        example = torch.zeros(1, 3, h, w, device=self.device, dtype=self.dtype)
        with self.eval_mode():
            self._spatial = spatial_layers(self.module, example)
            with torch.no_grad():
                self._num_classes = int(self.logits(example).shape[-1])

    def spatial_layer_names(self) -> list[str]:
        if self._spatial is None:
            self._dry_run()
        return self._spatial

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

    def default_cam_layers(self) -> list[str]:
        names = self.spatial_layer_names()
        return names[-1:]

    def cam_spatial(self, activation: torch.Tensor, grid, layer: str) -> torch.Tensor:
        return to_spatial(activation, layer, self.spatial_layer_names())

    def logits(self, x):
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
def cnn_default_preprocess(module) -> Preprocess:
    """A timm CNN's own data config, a Hugging Face CNN's processor config, else ImageNet at 224."""
    if getattr(module, "pretrained_cfg", None):
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=module)
        _, h, w = cfg["input_size"]
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
                       description="convolutional classifiers (torchvision, timm, Hugging Face, any nn.Module with Conv2d)"))
