"""LRP on every ViT family: conservation, batching, no side effects, the real model, the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitlens
from vitlens.errors import MethodError
from tests.conftest import SHARED_DATA, requires_shared, tiny_hf_vit, tiny_timm_vit, tiny_torchvision_vit
from vitlens.engine import run_batch

FAMILIES = {"timm": tiny_timm_vit, "hf": tiny_hf_vit, "torchvision": tiny_torchvision_vit}


def _without_additive_constants(module: nn.Module) -> nn.Module:
    """Zero every bias and every added constant (class token, position embedding)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias") or any(k in name for k in ("pos_embed", "position", "cls_token", "class_token")):
                param.zero_()
    return module


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cp_lrp_conserves_the_target_logit(family):
    model = vitlens.load_model(_without_additive_constants(FAMILIES[family]()))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = run_batch(model, x, {"cp-lrp": {"conv_gamma": 0.0, "lin_gamma": 0.0}}, target="top2")
    sums, logits = result.extras["cp-lrp"]["relevance_sum"], result.extras["cp-lrp"]["target_logit"]
    assert torch.allclose(result.patch_maps["cp-lrp"].flatten(2).sum(-1), sums)
    assert ((sums - logits).abs() / logits.abs()).max() <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attnlrp_absorbed_share_is_reported(family):
    """AttnLRP's softmax rule is not conservative by design: the sum and the logit are both reported."""
    model = vitlens.load_model(_without_additive_constants(FAMILIES[family]()))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = vitlens.explain(model, x, methods="attnlrp", params={"attnlrp": {"conv_gamma": 0.0, "lin_gamma": 0.0}})
    share = result.extras["attnlrp"]["relevance_sum"] / result.extras["attnlrp"]["target_logit"]
    assert torch.isfinite(share).all() and (share > 0).all() and (share < 1.5).all()
    # with biases the model absorbs relevance: the reported sum differs from the logit
    biased = vitlens.explain(FAMILIES[family](), x, methods="cp-lrp")
    ratio = biased.extras["cp-lrp"]["relevance_sum"] / biased.extras["cp-lrp"]["target_logit"]
    assert not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_relevance_equals_per_image(family):
    model = vitlens.load_model(FAMILIES[family]())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = [2, 7, 2]
    batched = vitlens.explain(model, x, methods="attnlrp,cp-lrp", target=targets)
    for i in range(3):
        alone = vitlens.explain(model, x[i:i + 1], methods="attnlrp,cp-lrp", target=targets[i])
        for name in ("attnlrp", "cp-lrp"):
            scale = alone.patch_maps[name].abs().max()
            assert torch.allclose(batched.patch_maps[name][i], alone.patch_maps[name][0], atol=1e-5 * scale)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lrp_leaves_the_model_and_other_methods_unchanged(family):
    module = FAMILIES[family]()
    model = vitlens.load_model(module)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    other_methods = ["rollout", "gmar-l2", "legrad", "chefer", "gradcam"]
    with torch.no_grad():
        logits_before = model.logits(x)
    before = vitlens.explain(model, x, methods=other_methods)
    together = vitlens.explain(model, x, methods=other_methods + ["attnlrp"])
    after = vitlens.explain(model, x, methods=other_methods)
    with torch.no_grad():
        assert torch.equal(model.logits(x), logits_before)
    for name in other_methods:
        assert torch.equal(before.patch_maps[name], after.patch_maps[name]), name
        assert torch.allclose(before.patch_maps[name], together.patch_maps[name], atol=1e-6), name
    assert not any("forward" in m.__dict__ for m in module.modules())
    assert nn.Linear.forward.__qualname__ == "Linear.forward"
    assert nn.LayerNorm.forward.__qualname__ == "LayerNorm.forward"


def test_other_models_are_untouched_during_an_lrp_pass():
    """Rules are set on the explained instance only: a second model computes plain gradients meanwhile."""
    from vitlens.lrp import LRPConfig, lrp_rules

    explained, bystander = tiny_timm_vit(seed=0), tiny_timm_vit(seed=1)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    expected = torch.autograd.grad(bystander(x)[0, 3], x)[0]
    with lrp_rules(explained, LRPConfig("attnlrp", 1.0, 0.5)):
        during = torch.autograd.grad(bystander(x)[0, 3], x)[0]
    assert torch.equal(during, expected)


def test_gamma_changes_the_relevance_and_zero_gamma_is_lrp0():
    model = vitlens.load_model(tiny_timm_vit())
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    plain = vitlens.explain(model, x, methods="cp-lrp", params={"cp-lrp": {"conv_gamma": 0.0, "lin_gamma": 0.0}})
    gamma = vitlens.explain(model, x, methods="cp-lrp", params={"cp-lrp": {"conv_gamma": 1.0, "lin_gamma": 0.5}})
    assert not torch.allclose(plain.patch_maps["cp-lrp"], gamma.patch_maps["cp-lrp"], atol=1e-6)
    with pytest.raises(MethodError, match="method 'cp-lrp': lin_gamma must be a number >= 0, got -1.0"):
        vitlens.explain(model, x, methods="cp-lrp", params={"cp-lrp": {"lin_gamma": -1.0}})


def test_signed_maps_and_positive_part():
    model = vitlens.load_model(tiny_timm_vit())
    result = vitlens.explain(model, torch.randn(2, 3, 32, 32), methods="attnlrp")
    raw, shown = result.patch_maps["attnlrp"], result.maps["attnlrp"]
    assert raw.shape == shown.shape == (2, 1, 32, 32)
    assert (raw < 0).any() and (raw > 0).any()  # signed
    assert shown.min() >= 0 and torch.allclose(shown.flatten(2).amax(-1), torch.ones(2, 1))
    assert torch.equal(shown == 0, raw <= 0)


@requires_shared
def test_real_vit_catdog_relevance_follows_the_class(real_vit):
    """chefer_catdog.png: bulldog in the upper half of the 224x224 input, cat in the lower half.

    Split: positive relevance in rows 0-111 vs 112-223.
    """
    from vitlens.data import load_image

    image = load_image(SHARED_DATA / "demo_images" / "chefer_catdog.png")
    result = vitlens.explain(real_vit, [image], methods="attnlrp,cp-lrp", target=torch.tensor([[243, 282]]))
    for name in ("attnlrp", "cp-lrp"):
        dog, cat = result.patch_maps[name][0].clamp_min(0)
        assert not torch.allclose(dog, cat)
        upper = [(m[:112].sum() / m.sum()).item() for m in (dog, cat)]
        assert upper[0] > upper[1], (name, upper)
