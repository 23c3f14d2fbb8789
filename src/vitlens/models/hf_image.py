"""Adapters for Hugging Face DINOv2 (with and without registers) and BEiT image classifiers.

``Dinov2ForImageClassification``, ``Dinov2WithRegistersForImageClassification`` and
``BeitForImageClassification`` route every attention layer through ``transformers``'
``AttentionInterface`` (their ``q_proj`` / ``k_proj`` / ``v_proj`` projections, then the function the
config's ``_attn_implementation`` names, then ``o_proj``), so the shared Hugging Face capture
(:mod:`vitlens.models.hf_capture`) records the model's own probabilities: the config objects select
vitlens's function for the duration of a call. BEiT passes its relative position bias (per layer,
shared, or both, summed by the model) as the attention mask of that call; the capture adds it to the
scores before the recorded softmax, so the probabilities are exactly the model's and LRP's recorder
treats the bias as a constant term of the scores, as for timm's BEiT. No forward is swapped.

What differs from ViT / DeiT (:mod:`vitlens.models.hf_vit`) is what the classifier reads:

* DINOv2's head is one linear layer on ``cat(CLS, mean of the patch tokens)`` after the final
  layernorm (register tokens are in neither half), see :class:`HFDinov2`;
* BEiT pools the mean of the patch tokens through the pooler's layernorm (``use_mean_pooling``, the
  default; the encoder's final layernorm is then an identity) or reads the CLS token after the final
  layernorm, see :class:`HFBeit`.

``_head`` calls the model's own modules in the model's order, so LeGrad's per-layer score is what the
classifier would output on that layer's states, and the last layer's score is the logit itself.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from vitlens.errors import ModelError
from vitlens.models.base import ImageModel
from vitlens.models.capture import AttentionRecorder
from vitlens.models.hf_capture import hf_capture
from vitlens.models.preprocess import hf_preprocess_from_config
from vitlens.models.registry import Family, register_family

#: classifier class -> (attribute of its backbone, class of each layer's attention, pre-attention norm)
DINOV2 = {
    "Dinov2ForImageClassification": ("dinov2", "Dinov2Attention", "norm1"),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", "Dinov2WithRegistersAttention", "norm1"),
}
BEIT = {"BeitForImageClassification": ("beit", "BeitAttention", "layernorm_before")}
#: what an attention layer must have for its call to go through AttentionInterface as read here
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "config")


def _is_transformers_class(module: nn.Module, names) -> bool:
    # by name and defining package, so that no predicate imports transformers for a timm or CNN model
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.") and hasattr(module, "config")


def is_hf_dinov2(module: nn.Module) -> bool:
    return _is_transformers_class(module, DINOV2)


def is_hf_beit(module: nn.Module) -> bool:
    return _is_transformers_class(module, BEIT)


class _HFImageClassifier(ImageModel):
    """What the Hugging Face DINOv2 and BEiT adapters share: layers, patch size, norms, the capture."""

    #: the supported classes of the subclass (see DINOV2, BEIT)
    classes: dict = {}

    def __init__(self, module, preprocess, class_names=None, info=None):
        super().__init__(module, preprocess, class_names, info)
        self.kind = type(module).__name__
        if self.kind not in self.classes:
            raise ModelError(f"unsupported Hugging Face model {self.kind}: this adapter reads "
                             f"{', '.join(self.classes)}")
        backbone_name, attention_class, self._norm_name = self.classes[self.kind]
        self.backbone = getattr(module, backbone_name)
        layers = getattr(self.backbone, "layers", None)
        if layers is None:
            layers = self.backbone.encoder.layer
        self.layers = layers
        for i, layer in enumerate(layers):
            attention = getattr(layer, "attention", None)
            if type(attention).__name__ != attention_class or not all(hasattr(attention, p) for p in ATTENTION_PARTS):
                # another layout (an older transformers, a user's own attention) may not call
                # AttentionInterface: its probabilities would be missed, so it is refused
                raise ModelError(f"unsupported attention {type(attention).__name__} in layer {i} of {self.kind}: "
                                 f"vitlens reads transformers' {attention_class} (q_proj, k_proj, v_proj, o_proj "
                                 "through AttentionInterface)")

    @property
    def num_classes(self) -> int:
        return int(self.module.config.num_labels)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def patch_size(self):
        p = self.module.config.patch_size
        return (p, p) if isinstance(p, int) else tuple(p)

    def _image_size(self):
        s = self.module.config.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    def block_norm_names(self):
        return [self.module_name(getattr(layer, self._norm_name)) for layer in self.layers]

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        with hf_capture(self.module, recorder, self.layers):
            yield recorder


class HFDinov2(_HFImageClassifier):
    """Hugging Face ``Dinov2ForImageClassification`` and ``Dinov2WithRegistersForImageClassification``.

    Tokens: CLS, then the register tokens (with registers), then the patches; any input size (the
    model interpolates its position embeddings itself). LayerScale and the SwiGLU MLP
    (``use_swiglu_ffn``) are inside the layers; LRP gives the SwiGLU gate product the uniform rule
    (:mod:`vitlens.lrp.composite`), and the layer scale, a constant factor, keeps the plain gradient.

    Readout. The logit is ``y = W_cls . n_0 + W_patch . mean_p n_p + b`` (n: the states after the
    final layernorm, p over the patch tokens only): the sum of a CLS-token head and an average-pooled
    head. Rollout-style maps read a token-to-token matrix M through token weights w (``w^T M``), which
    is linear in w, so the map of this head is a mixture of the CLS row and the mean of the patch rows.
    vitlens weighs them equally: ``w = 0.5 e_CLS + 0.5 mean of the patch rows`` (registers 0), the map
    the two halves would give if they contributed equally to the logit. Their real shares depend on
    the image and the class (and can have opposite signs), which a fixed token readout cannot follow;
    equal weights keep both halves, where either one alone would ignore half of what the head reads.
    Gradient-based maps (LeGrad, Chefer's gradients, GMAR's head weights, AttnLRP) see the whole head.
    """

    family = "hf-dinov2"
    classes = DINOV2

    @property
    def num_prefix_tokens(self) -> int:
        # the classifier slices its patch tokens after 1 + num_register_tokens
        return 1 + int(getattr(self.module.config, "num_register_tokens", 0) or 0)

    def readout_weights(self, num_tokens, device=None, dtype=torch.float32):
        prefix = self.num_prefix_tokens
        weights = torch.zeros(num_tokens, device=device, dtype=dtype)
        weights[0] = 0.5
        weights[prefix:] = 0.5 / (num_tokens - prefix)
        return weights

    def logits(self, x):
        # DINOv2 resamples its position embeddings to any input grid by itself (no flag to pass)
        return self.module(pixel_values=x).logits

    def _head(self, hidden):
        normed = self.backbone.layernorm(hidden)
        pooled = torch.cat([normed[:, 0], normed[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)
        return self.module.classifier(pooled)


class HFBeit(_HFImageClassifier):
    """Hugging Face ``BeitForImageClassification`` (BEiT, BEiT v2 checkpoints in the HF layout).

    The relative position bias (per layer and / or shared) is the additive attention mask the model
    itself passes through ``AttentionInterface``; other input sizes run with
    ``interpolate_pos_encoding=True`` (the absolute position embedding, when there is one, and the
    relative position tables are resampled by the model). Readout: with ``use_mean_pooling`` (a
    layernorm in the pooler) the mean of the patch rows, as ``pooler(x) = layernorm(mean_p x_p)``
    reads them; otherwise the CLS row.
    """

    family = "hf-beit"
    classes = BEIT

    def __init__(self, module, preprocess, class_names=None, info=None):
        super().__init__(module, preprocess, class_names, info)
        pooler = getattr(self.backbone, "pooler", None)
        if type(pooler).__name__ != "BeitPooler":
            raise ModelError(f"unsupported BEiT pooler {type(pooler).__name__}: vitlens reads transformers' BeitPooler "
                             "(mean of the patch tokens through its layernorm, or the CLS token)")

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def mean_pooling(self) -> bool:
        # the module's own structure decides (the pooler has a layernorm exactly when it averages)
        return self.backbone.pooler.layernorm is not None

    def readout_weights(self, num_tokens, device=None, dtype=torch.float32):
        weights = torch.zeros(num_tokens, device=device, dtype=dtype)
        if self.mean_pooling:
            weights[1:] = 1.0 / (num_tokens - 1)
        else:
            weights[0] = 1.0
        return weights

    def logits(self, x):
        interpolate = tuple(x.shape[-2:]) != self._image_size()
        return self.module(pixel_values=x, interpolate_pos_encoding=interpolate).logits

    def _head(self, hidden):
        # BeitModel: layernorm (an identity under mean pooling), then the pooler; then the classifier
        return self.module.classifier(self.backbone.pooler(self.backbone.layernorm(hidden)))


def wrap_dinov2(module, preprocess=None, class_names=None, info=None) -> HFDinov2:
    return HFDinov2(module, preprocess or hf_preprocess_from_config(module.config, None), class_names, info)


def wrap_beit(module, preprocess=None, class_names=None, info=None) -> HFBeit:
    return HFBeit(module, preprocess or hf_preprocess_from_config(module.config, None), class_names, info)


# after the HF ViT / DeiT family (20), before torchvision (30); the predicates are disjoint
register_family(Family("hf-dinov2", "image", is_hf_dinov2, wrap_dinov2, priority=22,
                       description="Hugging Face " + ", ".join(DINOV2)))
register_family(Family("hf-beit", "image", is_hf_beit, wrap_beit, priority=22,
                       description="Hugging Face " + ", ".join(BEIT)))
