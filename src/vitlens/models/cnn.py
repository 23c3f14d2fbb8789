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

from vitlens.models.base import ExplainableModel
from vitlens.models.capture import AttentionRecorder
from vitlens.models.layers import spatial_layers, to_spatial


def is_cnn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


class CNNModel(ExplainableModel):
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
