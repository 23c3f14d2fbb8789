"""The real ImageNet ViT-Tiny from ../shared/data: preprocessing is right, maps are class-specific."""

from __future__ import annotations

import csv
import warnings

import torch

import vitlens
from tests.conftest import SHARED_DATA, requires_shared
from vitlens.api import DegenerateMapWarning
from vitlens.data import load_image

pytestmark = requires_shared

CLASS_SPECIFIC = ("gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer")


def test_top1_on_first_200_imagenet_val_images(real_vit):
    folder = SHARED_DATA / "imagenet_val_1300"
    with open(folder / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))[:200]
    batch = torch.stack([real_vit.preprocess(load_image(folder / r["file"]))[0] for r in rows])
    labels = torch.tensor([int(r["label"]) for r in rows])
    with torch.no_grad():
        predictions = torch.cat([real_vit.logits(batch[i:i + 50]).argmax(-1) for i in range(0, 200, 50)])
    accuracy = (predictions == labels).float().mean().item()
    assert accuracy >= 0.80, accuracy


def test_preprocessing_comes_from_the_timm_config(real_vit):
    pre = real_vit.preprocess
    assert pre.input_size == (224, 224)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    assert pre.interpolation == "bicubic" and pre.crop_pct == 0.9
    assert real_vit.class_name(243) == "bull mastiff" and real_vit.class_name(282) == "tiger cat"


def test_catdog_maps_follow_the_class(real_vit):
    """In chefer_catdog.png the bulldog fills the upper half and the cat lies in the lower half.

    Split used: rows 0-111 of the 224x224 model input (upper half) vs rows 112-223.
    """
    image = load_image(SHARED_DATA / "demo_images" / "chefer_catdog.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateMapWarning)  # a trained model: every map shows something
        result = vitlens.explain(real_vit, [image], methods="all", target=torch.tensor([[243, 282]]))
    assert result.map_warnings() == [] and result.degenerate_maps() == []
    assert result.predictions[0].index == 243
    for name in CLASS_SPECIFIC:
        dog_map, cat_map = result.maps[name][0, 0], result.maps[name][0, 1]
        assert not torch.allclose(dog_map, cat_map, atol=1e-3), name
        upper_share = [m[:112].sum() / m.sum() for m in (dog_map, cat_map)]
        assert upper_share[0] > upper_share[1], (name, upper_share)


def test_non_square_input_with_dynamic_size():
    import timm

    from tests.conftest import VIT_TINY_WEIGHTS

    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True)
    module.load_state_dict(torch.load(VIT_TINY_WEIGHTS, weights_only=True))
    model = vitlens.load_model(module)
    x = torch.randn(2, 3, 224, 320)
    result = vitlens.explain(model, x, methods="all")
    for name in result.methods:
        expected = (2, 1, 224, 320) if vitlens.METHODS[name].signed else (2, 1, 14, 20)  # LRP: pixel relevance
        assert result.patch_maps[name].shape == expected
        assert result[name].shape == (2, 224, 320)
