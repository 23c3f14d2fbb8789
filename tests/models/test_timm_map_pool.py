"""timm ``VisionTransformer`` with ``global_pool='map'`` (an attention-pooling head, ``AttentionPoolLatent``).

Random-init tiny timm ViTs built from configs (no hub), float64, unit-scale weights. The reference reads nothing of
vitlens: the blocks' attention comes from timm's own unfused path (``fused_attn = False`` on a deep copy, a hook on
``attn.attn_drop``, which receives the softmax output), the pooling head is restated from its parameters (latent
queries through ``q``, keys and values through ``kv``, softmax, ``proj``, LayerNorm + MLP residual, then the latent
read by its ``pool_type``) and checked against timm's own logits, gradients come from plain autograd. The
rollout-style readout of each image is its pooling attention: the mean over heads of the latent rows the head's
output reads (all latents for ``pool_type='avg'``, the first for ``'token'``), zero on prefix tokens the head does
not see, and the formulas of tests/methods/general_reference.py are read per image with that row. LeGrad's
``'model'`` score re-applies the pooling head (restated) to a layer's tokens.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from tests.methods.general_reference import CASES, general_reference, readout_vector
from tests.models.family_checks import (check_batched_equals_alone, check_capture_keeps_the_logits,
                                        check_gradcam_formula, check_module_as_given, check_per_image_reference,
                                        reference_gradients)
from tests.models.family_checks import layer_norm as _ln
from tests.models.family_checks import linear as _lin
from tests.models.test_timm_eva import _unit_scale
from vitlens.errors import MethodError, ModelError
from vitlens.models import AttentionRecorder
from vitlens.models.timm_vit import TimmViT

TARGETS = [3, 6]
GRID = (4, 4)
METHODS = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "gradcam"]

#: name -> (create_model options, latent queries, the head's pool_type, pool_include_prefix)
MODELS = {
    # SigLIP in timm: no class token, one latent query
    "siglip": (dict(class_token=False), 1, "token", False),
    # a class token and two registers the head does not see, two latents averaged
    "prefix-avg-latents": (dict(class_token=True, reg_tokens=2), 2, "avg", False),
    # two registers the head does see (pool_include_prefix), two latents of which only the first is read
    "include-prefix-token": (dict(class_token=False, reg_tokens=2), 2, "token", True),
}


def tiny_map_vit(name="siglip", seed=0):
    """A small timm ViT with global_pool='map', float64, eval mode, unit-scale weights."""
    import timm
    from timm.layers import AttentionPoolLatent

    options, latents, pool_type, include_prefix = MODELS[name]
    torch.manual_seed(seed)
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                               depth=3, num_heads=4, num_classes=10, global_pool="map", **options)
    if (latents, pool_type) != (1, "token"):
        module.attn_pool = AttentionPoolLatent(32, num_heads=4, latent_len=latents, pool_type=pool_type,
                                               norm_layer=torch.nn.LayerNorm)
    module.pool_include_prefix = include_prefix
    _unit_scale(module)
    with torch.no_grad():
        module.attn_pool.latent.normal_()  # a probe far from uniform attention
    return module.double().eval()


# --------------------------------------------------------------------------------------------------
# the reference: timm's unfused blocks, the pooling head restated, plain autograd
# --------------------------------------------------------------------------------------------------

def pooled(m, z):
    """(B, classes) logits and (B, N) pooling readout of the head on a (B, N, C) stream (before the final norm)."""
    pool, heads = m.attn_pool, m.attn_pool.num_heads
    h = _ln(z, m.norm)
    B, n, C = h.shape
    skipped = 0 if m.pool_include_prefix else m.num_prefix_tokens
    h = h[:, skipped:]
    L = pool.latent.shape[1]
    q = _lin(pool.latent.expand(B, -1, -1), pool.q).view(B, L, heads, -1).transpose(1, 2)
    kv = _lin(h, pool.kv)
    k, v = kv[..., :C].view(B, n - skipped, heads, -1).transpose(1, 2), kv[..., C:].view(B, n - skipped, heads,
                                                                                           -1).transpose(1, 2)
    probs = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)  # (B, heads, L, N - skipped)
    out = _lin((probs @ v).transpose(1, 2).reshape(B, L, C), pool.proj)
    out = out + _lin(F.gelu(_lin(_ln(out, pool.norm), pool.mlp.fc1)), pool.mlp.fc2)
    read = 1 if pool.pool == "token" else L
    embedding = out[:, 0] if pool.pool == "token" else out.mean(1)
    readout = F.pad(probs[:, :, :read].mean(dim=(1, 2)), (skipped, 0))
    return _lin(embedding, m.head), readout


def logits_of(m, z):
    return pooled(m, z)[0]


def mean_logits(m, z):
    return logits_of(m, z.mean(dim=1, keepdim=True).expand_as(z))


def reference_capture(module, x, targets):
    m = copy.deepcopy(module)
    attentions, outputs, normed = [], [], []
    for blk in m.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda mod, inputs, output: attentions.append(output))
        blk.norm1.register_forward_hook(lambda mod, inputs, output: normed.append(output))
        blk.register_forward_hook(lambda mod, inputs, output: outputs.append(output))
    m.attn_pool.fused_attn = True  # timm's own head (fused), the restatement is checked against it
    logits = m(x)
    restated, readout = pooled(m, outputs[-1])
    torch.testing.assert_close(restated, logits, rtol=0, atol=1e-10)
    cap = reference_gradients(m, targets, logits, attentions, outputs, normed, logits_of, mean_logits)
    return {**cap, "readout": readout.detach().numpy()}


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def setup(request):
    module = tiny_map_vit(request.param, seed=len(request.param))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return {"name": request.param, "module": module, "model": vitlens.load_model(copy.deepcopy(module)), "x": x,
            "cap": reference_capture(module, x, TARGETS), "prefix": int(module.num_prefix_tokens)}


def test_family_facts(setup):
    model, prefix = setup["model"], setup["prefix"]
    assert isinstance(model, TimmViT) and model.family == "timm" and model.attention_pooled
    assert model.num_layers == 3 and model.num_classes == 10 and model.num_prefix_tokens == prefix
    assert set(model.unsupported_methods()) == {"attnlrp", "cp-lrp"}
    # outside a capture: the mean of the tokens the head sees
    n = prefix + 16
    seen = 0 if setup["module"].pool_include_prefix else prefix
    np.testing.assert_array_equal(model.readout_weights(n, dtype=torch.float64).numpy(),
                                  readout_vector("mean", seen, n))


def test_capture_reports_the_pooling_attention_as_the_readout(setup):
    model, x, cap, prefix = setup["model"], setup["x"], setup["cap"], setup["prefix"]
    check_capture_keeps_the_logits(model, x, cap["A"], grad=True)
    recorder = AttentionRecorder()
    with torch.no_grad(), model.capture(recorder):
        model.logits(x)
    assert recorder.readout.shape == (2, prefix + 16)
    np.testing.assert_allclose(recorder.readout.numpy(), cap["readout"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(cap["readout"].sum(-1), 1.0, atol=1e-12)
    # image-dependent and far from uniform: a real probe
    assert np.abs(cap["readout"][0] - cap["readout"][1]).max() > 1e-2
    assert np.abs(cap["readout"][:, prefix:] - 1.0 / 16).max() > 1e-2
    if setup["name"] == "prefix-avg-latents":
        assert (cap["readout"][:, :prefix] == 0).all()
    if setup["name"] == "include-prefix-token":
        assert (cap["readout"][:, :prefix] > 1e-4).all()


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}".replace(" ", "") for m, p in CASES])
def test_matches_independent_float64_reference(setup, method, params):
    cap, prefix = setup["cap"], setup["prefix"]
    full, expected = check_per_image_reference(setup["model"], setup["x"], method, params, TARGETS, cap, prefix,
                                               GRID)
    if method != "legrad":
        # the pooling row matters: the mean of the patch rows would give another map
        mean = general_reference(method, full, cap, readout_vector("mean", prefix, prefix + 16), prefix)
        assert np.abs(mean - expected).max() > 1e-3 * np.abs(expected).max()


def test_gradcam_default_layer_matches_the_formula(setup):
    check_gradcam_formula(setup["model"], setup["x"], TARGETS, setup["cap"]["cam"], GRID, prefix=setup["prefix"])


def test_batched_equals_one_at_a_time(setup):
    check_batched_equals_alone(setup["model"], setup["x"], METHODS)


def test_model_returned_exactly_as_given_and_lrp_refused_in_one_line():
    module = tiny_map_vit("prefix-avg-latents", seed=3)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    model = vitlens.load_model(module)
    fused = lambda m: getattr(m, "fused_attn", None)  # noqa: E731
    x = check_module_as_given(model, module, state, fused)
    for method in ("attnlrp", "cp-lrp", "transformer-attribution"):
        with pytest.raises(MethodError, match="attention-pooling head") as info:
            vitlens.explain(model, x, methods=[method])
        assert "\n" not in str(info.value)


def test_unsupported_pooling_head_is_one_line():
    from timm.layers import AttentionPoolLatent

    class OwnPool(AttentionPoolLatent):
        def forward(self, x, attn_mask=None):
            return super().forward(x, attn_mask)[..., :]

    module = tiny_map_vit("siglip")
    module.attn_pool = OwnPool(32, num_heads=4).double()
    with pytest.raises(ModelError, match="unsupported attention pooling OwnPool") as info:
        vitlens.load_model(module)
    assert "\n" not in str(info.value)
