"""Adapter for Hugging Face ``ViTForImageClassification`` and the DeiT classifiers.

Capture uses the library's own extension point: an attention function registered in
``transformers.AttentionInterface`` under the name ``vitlens_capture``. For the duration of a
call the model's *own config object* selects it; the global registry only gains one entry and
no existing entry or class is changed. Registration is idempotent.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import nn

from vitlens.errors import ModelError
from vitlens.models.base import ExplainableModel
from vitlens.models.capture import AttentionRecorder, attribute_set, explicit_attention

ATTENTION_NAME = "vitlens_capture"
_ACTIVE: contextvars.ContextVar[AttentionRecorder | None] = contextvars.ContextVar("vitlens_recorder", default=None)
_registered = False

SUPPORTED = ("ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An ``AttentionInterface`` function: explicit softmax, probabilities reported in order."""
    recorder = _ACTIVE.get()
    if recorder is None:
        raise RuntimeError("vitlens attention function called outside a capture")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    if groups > 1:  # grouped-query attention (Llama, Mistral, Qwen): each key/value head serves `groups` heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
    # The layer index is the call order: blocks run in sequence within one forward.
    out = explicit_attention(query, key, value, scaling, len(recorder.attentions), recorder, mask)
    # HF expects (B, N, heads, head_dim) back, plus the weights.
    return out.transpose(1, 2).contiguous(), recorder.attentions[-1]


def _ensure_registered() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _capture_attention)
    _registered = True


def attention_configs(module: nn.Module) -> list:
    """The distinct Hugging Face config objects of a model's submodules (they select the attention)."""
    seen = {}
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen[id(cfg)] = cfg
    return list(seen.values())


def is_hf_vit(module: nn.Module) -> bool:
    return type(module).__name__ in SUPPORTED and hasattr(module, "config")


class HFViT(ExplainableModel):
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

    def _configs(self):
        return attention_configs(self.module)

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        _ensure_registered()
        token = _ACTIVE.set(recorder)
        try:
            with contextlib.ExitStack() as stack:
                for cfg in self._configs():
                    stack.enter_context(attribute_set(cfg, "_attn_implementation", ATTENTION_NAME))
                if recorder.keep_block_outputs:
                    for i, layer in enumerate(self.layers):
                        handle = layer.register_forward_hook(_layer_hook(i, recorder))
                        stack.callback(handle.remove)
                if getattr(self.module, "gradient_checkpointing", False) or any(
                        getattr(m, "gradient_checkpointing", False) for m in self.layers):
                    raise ModelError("disable gradient checkpointing before explaining a Hugging Face model")
                yield recorder
        finally:
            _ACTIVE.reset(token)


def _layer_hook(index, recorder):
    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        recorder.on_block_output(index, hidden)

    return hook
