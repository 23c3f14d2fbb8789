"""The same weights in timm, Hugging Face and torchvision give the same logits and the same maps."""

from __future__ import annotations

import pytest
import torch

import vitlens
from tests.conftest import same_vit_three_layouts, tiny_timm_vit
from vitlens.errors import ModelError
from vitlens.models import load_model
from vitlens.models.convert import timm_to_hf_vit


@pytest.fixture(scope="module")
def three_layouts():
    return [load_model(m) for m in same_vit_three_layouts(seed=5)]


def test_converted_weights_give_the_same_logits(three_layouts):
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits = [m.logits(x) for m in three_layouts]
    assert torch.allclose(logits[0], logits[1], atol=1e-4)
    assert torch.allclose(logits[0], logits[2], atol=1e-4)


def test_converted_weights_give_the_same_maps(three_layouts):
    x = torch.randn(2, 3, 32, 32)
    results = [vitlens.explain(m, x, methods="all", target=[1, 6]) for m in three_layouts]
    for name in results[0].methods:
        reference = results[0].patch_maps[name]
        scale = reference.abs().max()
        for other in results[1:]:
            assert torch.allclose(other.patch_maps[name], reference, atol=1e-4 * scale, rtol=1e-3), name
            assert torch.allclose(other[name], results[0][name], atol=2e-3), name


def test_tokens_without_counterpart_refuse_to_convert():
    state = tiny_timm_vit(reg_tokens=2).state_dict()
    with pytest.raises(ModelError, match="reg_token"):
        timm_to_hf_vit(state)
