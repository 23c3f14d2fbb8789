"""Model adapters: how to read attention, gradients and layer scores out of each model family."""

from vitlens.models.base import ExplainableModel, ImageModel, ModelInfo
from vitlens.models.capture import AttentionRecorder
from vitlens.models.loading import describe, imagenet_class_names, load_model, read_weights, wrap_module
from vitlens.models.preprocess import Preprocess

__all__ = [
    "AttentionRecorder",
    "ExplainableModel",
    "ImageModel",
    "ModelInfo",
    "Preprocess",
    "describe",
    "imagenet_class_names",
    "load_model",
    "read_weights",
    "wrap_module",
]
