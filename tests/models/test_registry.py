"""The adapter registry: families register themselves, the loaders dispatch by predicate and prefix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitlens
from tests.conftest import tiny_timm_vit
from vitlens.errors import ModelError
from vitlens.models import load_model, registry, wrap_module
from vitlens.models.base import ImageModel


def test_built_in_families_are_registered_in_priority_order():
    image = [f.name for f in registry.families("image")]
    # the specific ViT families first, then the generic attention family, the CNN catch-all last
    assert image[0] == "timm" and image[-2:] == ["torch-attention", "cnn"]
    assert {"timm", "timm-eva", "timm-beit", "hf", "torchvision"} <= set(image[:-2])
    from vitlens.text import loading  # noqa: F401  registers the text families

    assert [f.name for f in registry.families("text")] == ["hf-encoder", "hf-decoder", "hf-seq2seq"]
    assert {"timm", "hf", "torchvision", "vitlens"} <= set(registry.spec_prefixes("image"))


def test_a_vit_with_a_convolutional_stem_is_not_read_as_a_cnn():
    # timm's ViT has a Conv2d patch embedding, which the CNN predicate alone would accept
    module = tiny_timm_vit()
    assert registry.families("image")[-1].matches(module)
    assert registry.find_family(module, "image").name == "timm"
    assert type(wrap_module(module)).__name__ == "TimmViT"


class _Toy(nn.Module):
    """A module no built-in family reads (no attention, no convolution)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.linear(x.flatten(1))


class _ToyModel(ImageModel):
    family = "toy"
    has_attention = False

    @property
    def num_classes(self):
        return 4

    @property
    def num_layers(self):
        return 0

    def logits(self, x):
        return self.module(x)


def test_a_registered_family_is_picked_by_its_predicate(monkeypatch):
    with pytest.raises(ModelError) as info:
        load_model(_Toy())
    message = str(info.value)
    assert "\n" not in message and "timm VisionTransformer" in message and "convolutional classifiers" in message

    from vitlens.models.preprocess import Preprocess

    family = registry.Family("toy", "image", lambda m: isinstance(m, _Toy),
                             lambda module, preprocess=None, class_names=None, info=None:
                             _ToyModel(module, preprocess or Preprocess((8, 8)), class_names, info), priority=5,
                             description="toy models")
    monkeypatch.setitem(registry._FAMILIES, "image:toy", family)
    model = load_model(_Toy())
    assert isinstance(model, _ToyModel) and model.preprocess.input_size == (8, 8)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    result = vitlens.explain(model, x, methods=["random"], target=1)
    assert result.targets.tolist() == [[1], [1]] and result["random"].shape == (2, 8, 8)


def test_unknown_spec_prefix_lists_the_registered_ones():
    with pytest.raises(ModelError) as info:
        load_model("nosuch:thing")
    message = str(info.value)
    assert "\n" not in message
    for prefix in ("timm:NAME", "hf:NAME", "torchvision:NAME", "vitlens:NAME"):
        assert prefix in message


class _AttentionPoolingCNN(nn.Module):
    """A CNN whose only nn.MultiheadAttention pools its features by cross-attention from a learned query."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.query = nn.Parameter(torch.randn(1, 1, 8))
        self.pool = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        features = self.conv(x).flatten(2).transpose(1, 2)  # (B, HW, 8)
        pooled, _ = self.pool(self.query.expand(x.shape[0], -1, -1), features, features)
        return self.fc(pooled[:, 0])


def test_a_cnn_with_cross_attention_pooling_falls_back_to_the_cnn_family():
    torch.manual_seed(0)
    module = _AttentionPoolingCNN().eval()
    # the generic attention family's predicate accepts it (it has an nn.MultiheadAttention) ...
    assert registry.find_family(module, "image").name == "torch-attention"
    # ... but its dry run finds no self-attention, so the next family (the CNN adapter) reads it
    model = load_model(module, input_size=16)
    assert model.family == "cnn" and model.preprocess.input_size == (16, 16)
    result = vitlens.explain(model, torch.randn(2, 3, 16, 16), methods=["gradcam"], target=0)
    assert result["gradcam"].shape == (2, 16, 16) and result["gradcam"].amax() > 0
