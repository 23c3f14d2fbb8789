"""``libragrad=True``: the gradient methods read their gradients from a LibraGrad pass (Mehri et al., CVPR 2025).

The reference below restates LibraGrad's backward on a timm ViT in float64 with plain torch operations (queries
and keys detached before the softmax, the LayerNorm variance detached, GELU's gate Phi(x) detached, linear maps
as they are) and the Chefer and Grad-CAM formulas written out; vitlens must give the same maps. The default
(no LibraGrad) stays exactly what it was, and the pass leaves the instance as it found it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from tests.conftest import tiny_hf_vit, tiny_timm_vit, tiny_torchvision_vit, unit_scale
from vitlens.cli import main
from vitlens.engine import run_batch
from vitlens.errors import MethodError
from vitlens.methods import REGISTRY, check_params_for_model, get_method

LIBRA = ("gmar-l1", "gmar-l2", "gmar++", "chefer", "attention-gradcam", "gradcam", "gradcam++", "xgradcam",
         "layercam")


def _ln_variance_detached(x, ln):
    centred = x - x.mean(-1, keepdim=True)
    variance = centred.pow(2).mean(-1, keepdim=True).detach()
    return centred / torch.sqrt(variance + ln.eps) * ln.weight + ln.bias


def libra_reference(module, x, target):
    """LibraGrad gradients of one image's target logit, restated: attention maps A^l, dy/dA^l, and the last
    block's norm1 output (Grad-CAM's layer) with its gradient, all (1, ...) float64."""
    proj = module.patch_embed.proj
    tokens = torch.nn.functional.conv2d(x[None], proj.weight, proj.bias, stride=proj.stride)
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat([module.cls_token, tokens], dim=1) + module.pos_embed
    attentions, cam = [], None
    for i, blk in enumerate(module.blocks):
        h = _ln_variance_detached(tokens, blk.norm1)
        if i == len(module.blocks) - 1:
            cam = h
            cam.retain_grad()
        n, c = h.shape[1], h.shape[2]
        heads = blk.attn.num_heads
        qkv = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(1, n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q.detach() * blk.attn.scale) @ k.detach().transpose(-1, -2)).softmax(-1).requires_grad_(True)
        attentions.append(a)
        o = (a @ v).transpose(1, 2).reshape(1, n, c)
        tokens = tokens + o @ blk.attn.proj.weight.T + blk.attn.proj.bias
        f = _ln_variance_detached(tokens, blk.norm2) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
        gate = 0.5 * (1 + torch.erf(f / math.sqrt(2)))  # GELU(f) = f * Phi(f), the gate detached
        tokens = tokens + (f * gate.detach()) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    logits = _ln_variance_detached(tokens, module.norm)[:, 0] @ module.head.weight.T + module.head.bias
    grads = torch.autograd.grad(logits[0, target], attentions + [cam])
    return [a.detach() for a in attentions], list(grads[:-1]), cam.detach(), grads[-1], logits.detach()


def chefer_expected(attentions, gradients):
    n = attentions[0].shape[-1]
    rollout = torch.eye(n, dtype=torch.float64)
    for a, g in zip(attentions, gradients):
        rollout = rollout + (g * a).clamp_min(0).mean(dim=1)[0] @ rollout
    return rollout[0, 1:]


def gradcam_expected(act, grad):
    a, g = act[0, 1:], grad[0, 1:]  # patches x channels
    return (a @ g.mean(dim=0)).clamp_min(0)


@pytest.fixture(scope="module")
def unit_vit():
    return unit_scale(tiny_timm_vit(seed=7, depth=2, num_classes=5))  # gradients of O(1)


def test_matches_the_float64_restatement(unit_vit):
    model = vitlens.load_model(unit_vit)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[1, 4], [0, 3]])
    params = {n: get_method(n).params({"libragrad": True}) for n in ("chefer", "gradcam")}
    libra = run_batch(model, x, params, targets).patch_maps
    plain = run_batch(model, x, {n: get_method(n).params() for n in params}, targets).patch_maps
    for b in range(2):
        for slot in range(2):
            attentions, gradients, act, grad, logits = libra_reference(unit_vit, x[b], int(targets[b, slot]))
            chefer = chefer_expected(attentions, gradients).reshape(4, 4)
            cam = gradcam_expected(act, grad).reshape(4, 4)
            assert chefer.abs().max() > 1e-2 and cam.abs().max() > 1e-2
            assert torch.allclose(libra["chefer"][b, slot], chefer, atol=1e-9 * chefer.abs().max())
            assert torch.allclose(libra["gradcam"][b, slot], cam, atol=1e-9 * cam.abs().max())
            # LibraGrad changes the gradients: the ordinary maps are not these
            assert not torch.allclose(plain["chefer"][b, slot], chefer, atol=1e-3 * chefer.abs().max())
            assert not torch.allclose(plain["gradcam"][b, slot], cam, atol=1e-3 * cam.abs().max())


@pytest.mark.parametrize("build", [tiny_timm_vit, tiny_hf_vit, tiny_torchvision_vit])
def test_default_is_unchanged_and_libragrad_changes_every_method(build):
    model = vitlens.load_model(build())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    default = run_batch(model, x, {n: get_method(n).params() for n in LIBRA}, "top2")
    explicit = run_batch(model, x, {n: get_method(n).params({"libragrad": False}) for n in LIBRA}, "top2")
    before = run_batch(model, x, {n: {k: v for k, v in get_method(n).params().items() if k != "libragrad"}
                                  for n in LIBRA}, "top2")
    libra = run_batch(model, x, {n: get_method(n).params({"libragrad": True}) for n in LIBRA}, default.targets)
    assert torch.allclose(libra.logits, default.logits, atol=1e-5)  # the forward is the model's
    for name in LIBRA:
        assert torch.equal(default.patch_maps[name], explicit.patch_maps[name]), name
        assert torch.equal(default.patch_maps[name], before.patch_maps[name]), name
        assert not torch.allclose(libra.patch_maps[name], default.patch_maps[name], atol=1e-6), name


def test_one_forward_per_pass_and_the_instance_restored():
    module = tiny_timm_vit()
    model = vitlens.load_model(module)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = module(x)
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    mixed = run_batch(model, x, {"chefer": get_method("chefer").params(),
                                 "gradcam": get_method("gradcam").params({"libragrad": True})})
    assert len(calls) == 2  # the ordinary pass and the LibraGrad pass
    calls.clear()
    alone = run_batch(model, x, {"gradcam": get_method("gradcam").params({"libragrad": True})})
    assert len(calls) == 1
    handle.remove()
    assert torch.equal(mixed.patch_maps["gradcam"], alone.patch_maps["gradcam"])
    assert not any("forward" in vars(m) for m in module.modules())  # no instance forward left behind
    with torch.no_grad():
        assert torch.equal(module(x), logits)


def test_batched_equals_alone():
    model = vitlens.load_model(tiny_torchvision_vit())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    params = {n: get_method(n).params({"libragrad": True}) for n in ("chefer", "gradcam")}
    batched = run_batch(model, x, params)
    for i in range(3):
        alone = run_batch(model, x[i:i + 1], params, batched.targets[i:i + 1])
        for name in params:
            scale = alone.patch_maps[name].abs().max()
            assert torch.allclose(batched.patch_maps[name][i], alone.patch_maps[name][0], atol=1e-5 * scale)


def test_refused_where_the_attention_rules_cannot_run():
    from torchvision.models import resnet18

    from tests.models.test_timm_cait import tiny_cait

    for module, words in ((resnet18(num_classes=4).eval(), "has no attention"), (tiny_cait(), "cp-lrp")):
        model = vitlens.load_model(module, input_size=32) if words == "has no attention" else vitlens.load_model(module)
        with pytest.raises(MethodError) as info:
            check_params_for_model({"gradcam": get_method("gradcam").params({"libragrad": True})}, None, model)
        assert "\n" not in str(info.value) and "libragrad" in str(info.value) and words in str(info.value)
        x = torch.randn(1, 3, *(model.fixed_input_size() or (32, 32)))
        with pytest.raises(MethodError, match="libragrad"):
            run_batch(model, x, {"gradcam": get_method("gradcam").params({"libragrad": True})})


@pytest.mark.parametrize("value", [1, "true", None])
def test_only_true_or_false(value):
    with pytest.raises(MethodError, match="libragrad must be true or false"):
        get_method("chefer").params({"libragrad": value})


def test_the_methods_that_take_it():
    assert sorted(n for n, spec in REGISTRY.items() if "libragrad" in spec.defaults) == sorted(LIBRA)
    assert all(REGISTRY[n].defaults["libragrad"] is False for n in LIBRA)


def test_text_models_get_it_too():
    from tests.text.conftest import tiny_decoder
    from vitlens.text import TextBatch, load_text_model, run_text_batch
    from vitlens.text.task import text_params

    model = load_text_model(tiny_decoder("llama"))
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    batch = TextBatch.from_ids(ids, torch.ones_like(ids))
    plain = run_text_batch(model, batch, {"chefer": text_params("chefer")}, "pred")
    libra = run_text_batch(model, batch, {"chefer": text_params("chefer", {"libragrad": True})}, plain.targets)
    assert libra.token_maps["chefer"][0].shape == plain.token_maps["chefer"][0].shape
    assert not torch.allclose(libra.token_maps["chefer"][0], plain.token_maps["chefer"][0])


def test_command_line(tmp_path, tiny, capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    described = [line for line in listing.splitlines() if line.strip().startswith("libragrad ")]
    assert len(described) == len(LIBRA) and all("true or false" in line for line in described)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "run"
    assert main(["explain", str(image), *tiny, "--methods", "chefer,gradcam", "--param", "chefer.libragrad=true",
                 "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["methods"]["chefer"]["libragrad"] is True and manifest["methods"]["gradcam"]["libragrad"] is False
