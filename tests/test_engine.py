"""The one-pass engine: targets, one forward for every method, nothing left on the model."""

from __future__ import annotations

import pytest
import torch

import vitlens
from tests.conftest import tiny_timm_vit
from vitlens.engine import plan, resolve_targets, run_batch
from vitlens.errors import MethodError, TargetError
from vitlens.methods import (ATTENTIONS, CAM, GRADIENTS, INPUT_GRADIENT, LAYER_GRADIENTS, PATH_GRADIENTS, PERTURB,
                             REGISTRY, get_method, parse_methods)


@pytest.fixture
def model():
    m = vitlens.load_model(tiny_timm_vit())
    m.class_names = [f"thing {i}, alias{i}" for i in range(10)]
    return m


#: the perturbation methods with few forwards (their defaults mean hundreds per image)
FEW_PERTURBATIONS = {"rise": {"masks": 8, "mask_batch": 8}, "occlusion": {"window": 16, "stride": 16, "mask_batch": 8},
                     "integrated-gradients": {"steps": 4, "batch": 8}}


def _all_methods(perturbation=True):
    return {name: spec.params(FEW_PERTURBATIONS.get(name)) for name, spec in REGISTRY.items()
            if perturbation or not {PERTURB, PATH_GRADIENTS} & spec.needs}


def test_plan_collects_needs_legrad_layers_and_cam_layers():
    needs, layers, cam = plan({"rollout": {}, "legrad": {"layers": 2, "pool": "mean"}}, num_layers=3)
    assert needs == {ATTENTIONS, LAYER_GRADIENTS}
    assert layers == {("mean", 1), ("mean", 2)} and cam == []
    needs, layers, cam = plan({"gmar-l1": {}}, num_layers=3)
    assert needs == {ATTENTIONS, GRADIENTS} and layers == set()
    needs, _, cam = plan({"gradcam": {"layers": None}, "layercam": {"layers": "a.b, c"}}, 3, ["blocks.2.norm1"])
    assert needs == {CAM} and cam == ["blocks.2.norm1", "a.b", "c"]


def test_every_method_runs_from_one_forward(model):
    """All methods share one forward; each LRP rule set (transformer-attribution's relevance pass among them) adds
    exactly one forward of its own."""
    calls = []
    handle = model.module.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(4, 3, 32, 32)
    shared = {n: p for n, p in _all_methods(perturbation=False).items() if not REGISTRY[n].signed}
    result = run_batch(model, x, shared, target="top2")
    assert len(calls) == 1 + 1  # the shared pass and transformer-attribution's relevance pass
    assert set(result.patch_maps) == set(shared)
    for name, maps in result.patch_maps.items():
        # saliency: per pixel, from the input gradient of the same backward
        assert maps.shape == ((4, 2, 32, 32) if INPUT_GRADIENT in REGISTRY[name].needs else (4, 2, 4, 4))
        assert torch.isfinite(maps).all()
    calls.clear()
    result = run_batch(model, x, _all_methods(perturbation=False), target="top2")
    assert len(calls) == 1 + 1 + 2  # the shared pass, the relevance pass, attnlrp, cp-lrp
    for name in ("attnlrp", "cp-lrp"):
        assert result.patch_maps[name].shape == (4, 2, 32, 32)  # signed pixel relevance
    calls.clear()
    result = run_batch(model, x, _all_methods(), target="top2")
    handle.remove()
    # + the perturbation forwards: 8 images per forward = 2 masks / windows per image; rise 8 masks -> 4,
    # occlusion the unperturbed images and 4 windows -> 1 + 2; integrated gradients 4 steps x 8 copies (4 images x 2
    # targets), 8 per forward -> 4
    assert len(calls) == 1 + 1 + 2 + 4 + 3 + 4
    for name in ("rise", "occlusion", "integrated-gradients"):
        assert result.patch_maps[name].shape == (4, 2, 32, 32)


def test_parameters_keep_no_gradients(model):
    run_batch(model, torch.randn(2, 3, 32, 32), _all_methods())
    assert all(p.grad is None for p in model.module.parameters())


def test_frozen_parameters_still_give_gradient_methods(model):
    for p in model.module.parameters():
        p.requires_grad_(False)
    result = run_batch(model, torch.randn(2, 3, 32, 32), {"gmar-l2": get_method("gmar-l2").params(),
                                                         "legrad": get_method("legrad").params()})
    assert result.patch_maps["legrad"].abs().sum() > 0


def test_target_forms(model):
    logits = torch.tensor([[0.0, 3.0, 1.0, 0, 0, 0, 0, 0, 0, 2.0], [5.0, 0, 0, 0, 0, 0, 0, 0, 4.0, 0]])
    assert resolve_targets(model, logits, None).tolist() == [[1], [0]]
    assert resolve_targets(model, logits, "pred").tolist() == [[1], [0]]
    assert resolve_targets(model, logits, 7).tolist() == [[7], [7]]
    assert resolve_targets(model, logits, "7").tolist() == [[7], [7]]
    assert resolve_targets(model, logits, "thing 4, alias4").tolist() == [[4], [4]]
    assert resolve_targets(model, logits, "ALIAS5").tolist() == [[5], [5]]
    assert resolve_targets(model, logits, "top2").tolist() == [[1, 9], [0, 8]]
    assert resolve_targets(model, logits, [2, "alias3"]).tolist() == [[2], [3]]
    assert resolve_targets(model, logits, torch.tensor([6, 5])).tolist() == [[6], [5]]


@pytest.mark.parametrize("target, message", [
    (10, "target class 10 is out of range: the model has 10 classes"),
    (-1, "out of range"),
    ("zebra", "unknown target class name 'zebra'"),
    ([1, 2, 3], "3 targets given for 2 images"),
    ("top11", "k must be between 1 and 10"),
])
def test_bad_targets_are_one_line_errors(model, target, message):
    logits = torch.randn(2, 10)
    with pytest.raises(TargetError, match=message) as info:
        resolve_targets(model, logits, target)
    assert "\n" not in str(info.value)


def test_method_names_and_parameters():
    assert parse_methods("all") == list(vitlens.DEFAULT_METHODS)
    assert parse_methods("rollout, legrad,rollout") == ["rollout", "legrad"]
    with pytest.raises(MethodError, match="unknown method 'gradcam-x'"):
        parse_methods("rollout,gradcam-x")
    with pytest.raises(MethodError, match="method 'rollout' has no parameter 'alpha'"):
        get_method("rollout").params({"alpha": 1})


def test_class_agnostic_methods_ignore_the_target(model):
    x = torch.randn(2, 3, 32, 32)
    a = run_batch(model, x, {"rollout": {}, "attention": {"layer": -1}}, target=1)
    b = run_batch(model, x, {"rollout": {}, "attention": {"layer": -1}}, target=8)
    assert torch.equal(a.patch_maps["rollout"], b.patch_maps["rollout"])
    assert torch.equal(a.patch_maps["attention"], b.patch_maps["attention"])


def test_class_specific_methods_depend_on_the_target(model):
    x = torch.randn(2, 3, 32, 32)
    methods = {n: get_method(n).params() for n in ("gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer")}
    a = run_batch(model, x, methods, target=1)
    b = run_batch(model, x, methods, target=8)
    for name in methods:
        assert not torch.allclose(a.patch_maps[name], b.patch_maps[name]), name


def test_images_and_text_run_through_the_same_engine(model, monkeypatch):
    """One loop: an image request and a text request both go through engine._shared_pass and _lrp_pass."""
    from tests.text.conftest import random_batch, tiny_text_model
    from vitlens import engine
    from vitlens.text import TextBatch, load_text_model, run_text_batch
    from vitlens.text.task import TextTask, text_params

    seen = []
    shared, lrp = engine._shared_pass, engine._lrp_pass
    monkeypatch.setattr(engine, "_shared_pass", lambda task, *a: (seen.append(("shared", type(task).__name__)),
                                                                    shared(task, *a))[1])
    monkeypatch.setattr(engine, "_lrp_pass", lambda task, *a: (seen.append(("lrp", type(task).__name__)),
                                                              lrp(task, *a))[1])
    run_batch(model, torch.randn(2, 3, 32, 32), {"rollout": {}, "attnlrp": get_method("attnlrp").params()})
    ids, mask = random_batch()
    text_model = load_text_model(tiny_text_model("bert"))
    result = run_text_batch(text_model, TextBatch.from_ids(ids, mask),
                            {"rollout": text_params("rollout"), "attnlrp": text_params("attnlrp")})
    assert seen == [("shared", "ImageTask"), ("lrp", "ImageTask"), ("shared", TextTask.__name__),
                    ("lrp", TextTask.__name__)]
    assert [m.shape for m in result.token_maps["rollout"]] == [(1, 9), (1, 5), (1, 7)]
