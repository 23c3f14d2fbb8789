"""Adapter for Hugging Face ``ViTForImageClassification`` and the DeiT classifiers, and the ``hf:`` image loader.

Attention is captured through the shared Hugging Face mechanism (:mod:`vitlens.models.hf_capture`):
the model's own config objects select a registered ``AttentionInterface`` function for the duration
of a call. ``hf:ORG/NAME`` and local Hugging Face directories load any image classifier the
``transformers`` auto classes know; the registry then picks its adapter (this one for ViT/DeiT, the
CNN adapter for convolutional ones).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from vitlens.errors import ModelError, one_line
from vitlens.models import hub
from vitlens.models.base import ImageModel
from vitlens.models.capture import AttentionRecorder
from vitlens.models.hf_capture import hf_capture
from vitlens.models.preprocess import hf_preprocess_from_config
from vitlens.models.registry import Family, LoadedModule, register_family, register_spec
from vitlens.models.weights import HUB_HINT, read_weights

SUPPORTED = ("ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")
#: Hugging Face model types loaded as the whole image-text model (their classes are text prompts), not a classifier
PROMPTED_MODEL_TYPES = ("clip", "siglip")


def is_hf_vit(module: nn.Module) -> bool:
    return type(module).__name__ in SUPPORTED and hasattr(module, "config")


class HFViT(ImageModel):
    """Hugging Face ViT / DeiT image classifiers."""

    family = "hf"

    def __init__(self, module, preprocess, class_names=None, info=None):
        super().__init__(module, preprocess, class_names, info)
        name = type(module).__name__
        if name not in SUPPORTED:
            raise ModelError(f"unsupported Hugging Face model {name}: vitlens supports {', '.join(SUPPORTED)}")
        self.kind = name
        self.backbone = module.vit if hasattr(module, "vit") else module.deit
        layers = getattr(self.backbone, "layers", None)
        if layers is None:  # transformers 4.x layout
            layers = self.backbone.encoder.layer
        self.layers = layers

    @property
    def num_classes(self) -> int:
        return int(self.module.config.num_labels)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.kind == "ViTForImageClassification" else 2

    @property
    def patch_size(self):
        p = self.module.config.patch_size
        return (p, p) if isinstance(p, int) else tuple(p)

    def block_norm_names(self):
        return [self.module_name(layer.layernorm_before) for layer in self.layers]

    def readout_weights(self, num_tokens, device=None, dtype=torch.float32):
        weights = torch.zeros(num_tokens, device=device, dtype=dtype)
        if self.kind == "DeiTForImageClassificationWithTeacher":
            weights[0] = weights[1] = 0.5
        else:
            weights[0] = 1.0
        return weights

    def _image_size(self):
        s = self.module.config.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    def logits(self, x):
        interpolate = tuple(x.shape[-2:]) != self._image_size()
        out = self.module(pixel_values=x, interpolate_pos_encoding=interpolate)
        return out.logits

    def _head(self, hidden):
        normed = self.backbone.layernorm(hidden)
        if self.kind == "DeiTForImageClassificationWithTeacher":
            return (self.module.cls_classifier(normed[:, 0]) + self.module.distillation_classifier(normed[:, 1])) / 2
        return self.module.classifier(normed[:, 0])

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        with hf_capture(self.module, recorder, self.layers):
            yield recorder


# --- loading --------------------------------------------------------------------------------
def load_hf_spec(spec, name, weights, num_classes):
    is_local = Path(name).is_dir()
    module = None
    # the local cache first: a pre-populated cache works offline without a network attempt
    for local_only in ((True,) if is_local else (True, False)):
        if not local_only and not hub.reachable(hub.HF_HOST):
            raise ModelError(f"cannot fetch '{spec}': the model hub is unreachable and it is not cached; {HUB_HINT}")
        try:
            module = _build(spec, name, weights, num_classes, local_only)
            break
        except OSError as exc:
            if is_local:
                raise ModelError(f"cannot load Hugging Face model directory '{name}': {one_line(exc)}") from None
            if not local_only:
                raise ModelError(f"cannot fetch '{spec}' (no such model, or the hub failed): {HUB_HINT}") from None
        except (ValueError, KeyError) as exc:
            raise ModelError(f"'{name}' is not an image classification model: {one_line(exc)}") from None
    return LoadedModule(module, preprocess=hf_preprocess_from_config(module.config, name))


def _build(spec, name, weights, num_classes, local_files_only):
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING, MODEL_MAPPING
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(name, local_files_only=local_files_only,
                                        **({} if num_classes is None else {"num_labels": num_classes}))
    prompted = getattr(config, "model_type", None) in PROMPTED_MODEL_TYPES  # CLIP / SigLIP: the image-text model
    if weights is None:
        kwargs = {} if num_classes is None else {"num_labels": num_classes, "ignore_mismatched_sizes": True}
        auto = AutoModel if prompted else AutoModelForImageClassification
        with hub.quiet_progress():
            return auto.from_pretrained(name, local_files_only=local_files_only, **kwargs)
    mapping = MODEL_MAPPING if prompted else MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING
    if type(config) not in mapping:
        raise ValueError(f"{type(config).__name__} has no image classification model")
    cls = mapping[type(config)]
    state = read_weights(weights)
    # transformers converts saved (hub) key names to its in-memory names itself
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with hub.quiet_progress():
            module, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = [(label, sorted(info.get(key) or [])) for label, key in
                (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("wrong-shape", "mismatched_keys"))]
    problems = [(label, [k if isinstance(k, str) else k[0] for k in keys]) for label, keys in problems if keys]
    if problems:
        parts = [f"{len(keys)} {label} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
                 for label, keys in problems]
        raise ModelError(f"weights '{weights}' do not fit {spec}: " + "; ".join(parts))
    return module


def wrap(module, preprocess=None, class_names=None, info=None) -> HFViT:
    return HFViT(module, preprocess or hf_preprocess_from_config(module.config, None), class_names, info)


register_family(Family("hf", "image", is_hf_vit, wrap, priority=20,
                       description="Hugging Face " + ", ".join(SUPPORTED)))
register_spec("image", "hf", load_hf_spec)
