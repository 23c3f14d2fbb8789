"""saliency, input-x-gradient, integrated-gradients on images: equal to captum's Saliency, InputXGradient and
IntegratedGradients on the same model (a tiny timm ViT, a Hugging Face ViT, a CNN), batched = alone."""

from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency

import vitlens
from tests.conftest import tiny_hf_vit, tiny_timm_vit
from tests.methods.test_rise import black, tiny_cnn
from vitlens.errors import MethodError

GRADIENT_METHODS = ["saliency", "input-x-gradient", "integrated-gradients"]


def images(count=2, seed=1):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits_of(module):
    def forward(x):
        out = module(x)
        return out.logits if hasattr(out, "logits") else out
    return forward


def close(ours, ref, tol=1e-5):
    scale = ref.abs().max().item()
    assert scale > 0
    assert (ours - ref).abs().max().item() <= tol * scale, (ours - ref).abs().max().item() / scale


@pytest.mark.parametrize("build", [lambda: tiny_timm_vit(seed=3), lambda: tiny_hf_vit(seed=2),
                                   lambda: tiny_cnn(seed=4)], ids=["timm", "hf", "cnn"])
def test_equal_to_captum(build):
    module = build()
    model = vitlens.load_model(module, input_size=32) if not hasattr(module, "config") else vitlens.load_model(module)
    x = images()
    targets = torch.tensor([2, 6])
    params = {"integrated-gradients": {"steps": 12, "batch": 5}, "saliency": {"reduce": "max"}}
    result = vitlens.explain(model, x, methods=GRADIENT_METHODS, target=[2, 6], params=params)
    f = logits_of(module)
    grad = Saliency(f).attribute(x.clone(), target=targets, abs=True)
    close(result.patch_maps["saliency"][:, 0], grad.amax(dim=1))
    close(result.patch_maps["input-x-gradient"][:, 0],
          InputXGradient(f).attribute(x.clone().requires_grad_(), target=targets).sum(dim=1))
    close(result.patch_maps["integrated-gradients"][:, 0],
          IntegratedGradients(f).attribute(x, target=targets, n_steps=12).sum(dim=1))
    assert result.maps["saliency"].shape == (2, 1, 32, 32)


@pytest.mark.parametrize("reduce", ["max", "l2", "sum"])
def test_saliency_reductions(reduce):
    module = tiny_timm_vit(seed=3)
    model = vitlens.load_model(module)
    x = images()
    result = vitlens.explain(model, x, methods=["saliency"], target=4, params={"saliency": {"reduce": reduce}})
    grad = Saliency(module).attribute(x.clone(), target=4)  # |d y / d x| per channel
    ref = {"max": grad.amax(dim=1), "l2": grad.norm(dim=1), "sum": grad.sum(dim=1)}[reduce]
    close(result.patch_maps["saliency"][:, 0], ref)


def test_integrated_gradients_black_baseline_and_rule():
    module = tiny_timm_vit(seed=5)
    model = vitlens.load_model(module)
    x = images(1, seed=3)
    params = {"integrated-gradients": {"steps": 9, "baseline": "black", "method": "riemann_trapezoid"}}
    ours = vitlens.explain(model, x, methods=["integrated-gradients"], target=1, params=params)
    base = black(model).float().view(1, 3, 1, 1).expand_as(x)
    ref = IntegratedGradients(module).attribute(x, baselines=base, target=1, n_steps=9, method="riemann_trapezoid")
    close(ours.patch_maps["integrated-gradients"][:, 0], ref.sum(dim=1))
    # completeness: the attributions sum to y(x) - y(x') up to the integration error
    fine = vitlens.explain(model, x, methods=["integrated-gradients"], target=1,
                           params={"integrated-gradients": {"steps": 128, "baseline": "black"}})
    with torch.no_grad():
        gap = (module(x)[0, 1] - module(base)[0, 1]).item()
    total = fine.patch_maps["integrated-gradients"].sum().item()
    assert abs(total - gap) < 0.01 * abs(gap), (total, gap)


def test_batched_equals_alone_and_top_k():
    model = vitlens.load_model(tiny_timm_vit(seed=6))
    x = images(3, seed=7)
    params = {"integrated-gradients": {"steps": 6, "batch": 4}}
    together = vitlens.explain(model, x, methods=GRADIENT_METHODS, target="top2", params=params)
    for i in range(3):
        alone = vitlens.explain(model, x[i:i + 1], methods=GRADIENT_METHODS, target=together.targets[i:i + 1],
                                params=params)
        for name in GRADIENT_METHODS:
            close(together.patch_maps[name][i], alone.patch_maps[name][0])


def test_with_other_methods_one_shared_backward():
    """The input gradient comes from the shared pass: the other methods' maps do not change."""
    model = vitlens.load_model(tiny_timm_vit(seed=3))
    x = images()
    both = vitlens.explain(model, x, methods=["chefer", "saliency", "gradcam"], target=3)
    alone = vitlens.explain(model, x, methods=["chefer", "gradcam"], target=3)
    for name in ("chefer", "gradcam"):
        assert torch.equal(both.patch_maps[name], alone.patch_maps[name])
    # alone, the forward needs no attention capture (fused attention): equal to float32 rounding
    single = vitlens.explain(model, x, methods=["saliency"], target=3)
    close(both.patch_maps["saliency"], single.patch_maps["saliency"])


def test_unknown_baseline_for_images_is_one_line():
    model = vitlens.load_model(tiny_timm_vit())
    with pytest.raises(MethodError, match="baseline='unk' is not available for this input: use zero, black"):
        vitlens.explain(model, images(1), methods=["integrated-gradients"],
                        params={"integrated-gradients": {"baseline": "unk", "steps": 2}})
    with pytest.raises(MethodError, match="steps must be an integer >= 1"):
        vitlens.explain(model, images(1), methods=["integrated-gradients"],
                        params={"integrated-gradients": {"steps": 0}})


def test_bf16_maps_are_float32_and_close():
    model = vitlens.load_model(tiny_timm_vit(seed=3))
    x = images()
    params = {"integrated-gradients": {"steps": 8}}
    full = vitlens.explain(model, x, methods=GRADIENT_METHODS, target=2, params=params)
    half = vitlens.explain(model, x, methods=GRADIENT_METHODS, target=2, params=params, precision="bf16")
    for name in GRADIENT_METHODS:
        a, b = full.patch_maps[name].flatten(), half.patch_maps[name].flatten()
        assert b.dtype == torch.float32
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9, name
