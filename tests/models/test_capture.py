"""The attention capture without kept probabilities: ``RecomputedAttention`` and ``HeadMeanRecorder``.

The recomputing attention must be the explicit one (forward and every gradient, masks included, under autocast
too); the recorder must hand the engine each layer's A and dS/dA as the plain recorder does; and the engine must
use it exactly where the methods read no single head, with every map equal to the plain recorder's.
"""

from __future__ import annotations

import pytest
import torch

import vitlens
import vitlens.engine as engine
from tests.conftest import tiny_timm_vit
from vitlens.models import AttentionRecorder
from vitlens.models.capture import HeadMeanRecorder, RecomputedAttention, masked_scores

METHODS = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer"]


def explicit(q, k, v, scale, mask):
    return masked_scores((q * scale) @ k.transpose(-2, -1), mask).softmax(dim=-1) @ v


def qkv(dtype=torch.float64, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 4, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("mask", [None, "additive", "boolean"])
def test_recomputed_attention_is_the_explicit_one_with_every_gradient(mask):
    q, k, v = qkv()
    if mask == "additive":
        mask = torch.randn(1, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    elif mask == "boolean":
        mask = torch.ones(5, 5, dtype=torch.bool).tril()
    out, mean = RecomputedAttention.apply(q, k, v, 0.5, mask, {})
    expected = explicit(q, k, v, 0.5, mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    probs = masked_scores((q * 0.5) @ k.transpose(-2, -1), mask).softmax(dim=-1)
    torch.testing.assert_close(mean, probs.mean(dim=1, keepdim=True), rtol=0, atol=1e-15)
    assert not mean.requires_grad
    weights = torch.randn_like(out)
    ours = torch.autograd.grad((out * weights).sum(), [q, k, v])
    theirs = torch.autograd.grad((expected * weights).sum(), [q, k, v])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(lambda *t: RecomputedAttention.apply(*t, 0.5, mask, {})[0], (q, k, v))


def test_a_learnt_additive_mask_gets_its_gradient():
    """A mask computed from parameters (BEiT's relative position bias) is differentiated as in the explicit path."""
    q, k, v = qkv()
    bias = torch.randn(3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out, _ = RecomputedAttention.apply(q, k, v, 0.5, bias.unsqueeze(0), {})
    expected = explicit(q, k, v, 0.5, bias.unsqueeze(0))
    weights = torch.randn_like(out)
    ours = torch.autograd.grad((out * weights).sum(), [q, k, v, bias])
    theirs = torch.autograd.grad((expected * weights).sum(), [q, k, v, bias])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(lambda b: RecomputedAttention.apply(q, k, v, 0.5, b.unsqueeze(0), {})[0], (bias,))


def test_recomputed_attention_under_bf16_autocast_follows_the_explicit_one():
    q, k, v = qkv(torch.float32, n=17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = RecomputedAttention.apply(q, k, v, 0.5, None, {})
        expected = explicit(q, k, v, 0.5, None)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same operations in the same dtypes
    ours = torch.autograd.grad(out.float().sum(), [q, k, v])
    theirs = torch.autograd.grad(expected.float().sum(), [q, k, v])
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # bf16 products, computed in another order


def test_the_recorder_hands_the_engine_each_layers_attention_and_gradient():
    model = vitlens.load_model(tiny_timm_vit().double())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    plain, lean = AttentionRecorder(), HeadMeanRecorder()
    outputs = {}
    for name, recorder in (("plain", plain), ("lean", lean)):
        with model.capture(recorder):
            outputs[name] = model.logits(x)[:, 3].sum()
    torch.testing.assert_close(outputs["lean"], outputs["plain"], rtol=0, atol=1e-12)
    assert all(a.shape == (2, 1, 17, 17) and not a.requires_grad for a in lean.attentions)
    for layer in range(model.num_layers):
        torch.testing.assert_close(lean.attentions[layer], plain.attentions[layer].mean(dim=1, keepdim=True),
                                   rtol=0, atol=1e-14)
        a_plain, g_plain = plain.attention_and_gradient(
            layer, torch.autograd.grad(outputs["plain"], plain.gradient_sources[layer], retain_graph=True)[0])
        a_lean, g_lean = lean.attention_and_gradient(
            layer, torch.autograd.grad(outputs["lean"], lean.gradient_sources[layer], retain_graph=True)[0])
        torch.testing.assert_close(a_lean, a_plain.detach(), rtol=0, atol=1e-14)
        torch.testing.assert_close(g_lean, g_plain, rtol=0, atol=1e-12)
        assert g_lean.abs().max() > 1e-6
    lean.backward_done()
    assert all(not inputs[-1] for inputs in lean._inputs)  # nothing handed over outlives its backward


def recorders_used(monkeypatch):
    used = []
    for cls in (AttentionRecorder, HeadMeanRecorder):
        original = cls.__init__

        def init(self, *args, _original=original, **kwargs):
            used.append(type(self).__name__)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)
    return used


@pytest.mark.parametrize("methods,params,lean", [
    (METHODS, None, True),
    (["rollout", "gradcam", "saliency"], None, True),
    (["rollout"], {"rollout": {"head_fusion": "max"}}, False),  # the max over heads needs each head
    (["chefer", "attention-gradcam"], None, False),  # attention-gradcam reads each head's gradient
    (["chefer"], {"chefer": {"libragrad": True}}, False),
])
def test_the_engine_keeps_head_means_only_where_no_method_reads_a_head(monkeypatch, methods, params, lean):
    model = vitlens.load_model(tiny_timm_vit())
    used = recorders_used(monkeypatch)
    vitlens.explain(model, torch.randn(1, 3, 32, 32), methods=methods, params=params, memory_budget="100GB")
    assert ("HeadMeanRecorder" in used) == lean


def test_every_map_equals_the_one_from_kept_attention(monkeypatch):
    """The maps with head means only are those with every attention and gradient kept, to float32 rounding."""
    model = vitlens.load_model(tiny_timm_vit(seed=4))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    methods = METHODS + ["gradcam", "saliency"]
    params = {"rollout": {"discard_ratio": 0.3}, "legrad": {"pool": "mean"}}
    lean = vitlens.explain(model, x, methods=methods, params=params, target=[1, 4, 7])
    used = recorders_used(monkeypatch)
    monkeypatch.setattr(engine, "_head_means_suffice", lambda *args: False)
    kept = vitlens.explain(model, x, methods=methods, params=params, target=[1, 4, 7])
    assert "HeadMeanRecorder" not in used
    for name in methods:
        scale = kept.patch_maps[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(lean.patch_maps[name], kept.patch_maps[name], rtol=0, atol=2e-5 * float(scale))
