"""``attention_gamma``: Gamma(lin_gamma) on the attention's q/k/v and output projections, or LRP-0 there.

``attention_gamma=False`` is LXT's torchvision setup (zennit's Gamma hooks never fire inside
``nn.MultiheadAttention``). Checked against the explicit float64 relevance propagation of
``test_lrp_reference`` with LRP-0 written out for the projections (timm, and the same weights in a
torchvision ViT, whose packed ``in_proj`` goes through the recorder and ``out_proj`` through its module),
and the default against the default path, bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vitlens
from tests.conftest import tiny_hf_vit, tiny_timm_vit, tiny_torchvision_vit, unit_scale
from tests.lrp.test_lrp_reference import reference_relevance
from vitlens.cli import main
from vitlens.engine import run_batch
from vitlens.errors import MethodError
from vitlens.lrp.composite import LRPConfig, attention_projections
from vitlens.methods import get_method
from vitlens.models.convert import timm_to_torchvision_vit

VARIANTS = ("attnlrp", "cp-lrp")


def _params(variant, **overrides):
    return {variant: get_method(variant).params(overrides)}


def _one_block_timm():
    """The reference's one-block ViT (unit-scale weights, float64)."""
    return unit_scale(tiny_timm_vit(seed=4, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                    num_classes=5))


def _as_torchvision(timm_module):
    from torchvision.models.vision_transformer import VisionTransformer

    tv = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                           mlp_dim=timm_module.blocks[0].mlp.fc1.out_features, num_classes=5).double()
    tv.load_state_dict(timm_to_torchvision_vit(timm_module.state_dict()), strict=True)
    return tv.eval()


@pytest.fixture(scope="module")
def one_block():
    return _one_block_timm()


@pytest.mark.parametrize("family", ["timm", "torchvision"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("conv_gamma, lin_gamma", [(1.0, 0.5), (0.25, 0.1)])
def test_lrp0_on_the_projections_matches_the_explicit_propagation(one_block, family, variant, conv_gamma,
                                                                 lin_gamma):
    """attention_gamma=False: LRP-0 on qkv / in_proj and proj / out_proj, Gamma(lin_gamma) on the MLP and head."""
    module = one_block if family == "timm" else _as_torchvision(one_block)
    model = vitlens.load_model(module)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[1, 4], [0, 2]])
    off = run_batch(model, x, _params(variant, conv_gamma=conv_gamma, lin_gamma=lin_gamma, attention_gamma=False),
                    targets).patch_maps[variant]
    on = run_batch(model, x, _params(variant, conv_gamma=conv_gamma, lin_gamma=lin_gamma),
                   targets).patch_maps[variant]
    for b in range(2):
        for slot in range(2):
            target = int(targets[b, slot])
            lrp0 = reference_relevance(one_block, x[b], target, variant, conv_gamma, lin_gamma, attn_gamma=0.0)[0]
            gamma = reference_relevance(one_block, x[b], target, variant, conv_gamma, lin_gamma)[0]
            assert (lrp0 - gamma).abs().max() > 1e-3  # the option changes the relevance, 1000 x the tolerance
            assert torch.allclose(off[b, slot], lrp0, atol=1e-6), (family, variant, b, slot)
            assert torch.allclose(on[b, slot], gamma, atol=1e-6), (family, variant, b, slot)


def test_the_projections_are_exactly_the_attention_linears():
    cases = {
        tiny_timm_vit: lambda i: {f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj"},
        tiny_hf_vit: lambda i: {f"vit.layers.{i}.attention.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
        # the packed in_proj is a parameter: it goes through LRPRecorder.linear
        tiny_torchvision_vit: lambda i: {f"encoder.layers.encoder_layer_{i}.self_attention.out_proj"},
    }
    for build, expected in cases.items():
        module = build()
        found = attention_projections(module)
        names = {name for name, sub in module.named_modules() if id(sub) in found}
        assert names == set().union(*(expected(i) for i in range(3))), build.__name__
        linears = {name for name, sub in module.named_modules() if isinstance(sub, nn.Linear)}
        assert linears - names  # the MLP and the head keep Gamma(lin_gamma)


def test_recorder_projections_follow_the_option():
    """The packed projections applied through the recorder (torchvision in_proj, BEiT / EVA qkv)."""
    from vitlens.lrp import LRPRecorder

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    g = torch.randn(3, 5, dtype=torch.float64)
    off = torch.autograd.grad(LRPRecorder(LRPConfig("attnlrp", 1.0, 0.5, False)).linear(x, weight, bias), x, g)[0]
    on = torch.autograd.grad(LRPRecorder(LRPConfig("attnlrp", 1.0, 0.5)).linear(x, weight, bias), x, g)[0]
    assert torch.allclose(off, g @ weight)  # plain gradient: LRP-0
    assert not torch.allclose(on, g @ weight)


@pytest.mark.parametrize("build", [tiny_timm_vit, tiny_hf_vit, tiny_torchvision_vit])
def test_default_is_the_gamma_on_every_linear_path(build):
    """No parameter, ``attention_gamma=True`` and the parameters as they were before the option (no key at
    all) give the same maps bit for bit; ``False`` changes them."""
    model = vitlens.load_model(build())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for variant in VARIANTS:
        default = run_batch(model, x, _params(variant)).patch_maps[variant]
        explicit = run_batch(model, x, _params(variant, attention_gamma=True)).patch_maps[variant]
        before = run_batch(model, x, {variant: {"conv_gamma": 1.0, "lin_gamma": 0.5}}).patch_maps[variant]
        off = run_batch(model, x, _params(variant, attention_gamma=False)).patch_maps[variant]
        assert torch.equal(default, explicit) and torch.equal(default, before)
        assert (off - default).abs().max() > 0.05 * default.abs().max()


def test_both_settings_in_one_call_get_their_own_pass():
    model = vitlens.load_model(tiny_torchvision_vit())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    both = vitlens.explain(model, x, methods=["attnlrp", "cp-lrp"], params={"cp-lrp": {"attention_gamma": False}})
    alone = vitlens.explain(model, x, methods="cp-lrp", params={"cp-lrp": {"attention_gamma": False}})
    default = vitlens.explain(model, x, methods="attnlrp")
    assert torch.equal(both.patch_maps["cp-lrp"], alone.patch_maps["cp-lrp"])
    assert torch.equal(both.patch_maps["attnlrp"], default.patch_maps["attnlrp"])


@pytest.mark.parametrize("value", [1, 0, "false", None, 0.5])
def test_only_true_or_false_is_accepted(value):
    with pytest.raises(MethodError) as info:
        get_method("attnlrp").params({"attention_gamma": value})
    message = str(info.value)
    assert "\n" not in message and "attention_gamma must be true or false" in message


def test_command_line_sets_and_lists_the_option(tmp_path, tiny, capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    described = [line for line in listing.splitlines() if line.strip().startswith("attention_gamma ")]
    assert len(described) == 2 and all("true or false" in line for line in described)  # attnlrp and cp-lrp
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    maps = {}
    for value in ("false", "true"):
        out = tmp_path / value
        code = main(["explain", str(image), *tiny, "--methods", "cp-lrp", "--param",
                     f"cp-lrp.attention_gamma={value}", "--out", str(out), "--quiet"])
        assert code == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["methods"]["cp-lrp"]["attention_gamma"] is (value == "true")
        maps[value] = np.load(next(out.rglob("*.npy")))
    assert not np.allclose(maps["false"], maps["true"])
    assert main(["explain", str(image), *tiny, "--methods", "cp-lrp", "--param", "cp-lrp.attention_gamma=1",
                 "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vitlens: error: method 'cp-lrp': attention_gamma must be true or false, got 1"


def test_the_projections_of_the_other_families():
    """Text encoders and decoders, EVA and BEiT: exactly the q/k/v (or packed qkv) and output projections of
    each attention block, never an MLP layer of the same name (GPT-2's attention and MLP both have c_proj)."""
    from tests.text.conftest import tiny_decoder, tiny_text_model

    cases = {
        "bert": (tiny_text_model("bert"), {"query", "key", "value", "dense"}, 4),
        "distilbert": (tiny_text_model("distilbert"), {"q_lin", "k_lin", "v_lin", "out_lin"}, 4),
        "gpt2": (tiny_decoder("gpt2"), {"c_attn", "c_proj"}, 2),
        "llama": (tiny_decoder("llama"), {"q_proj", "k_proj", "v_proj", "o_proj"}, 4),
        "eva02": (tiny_timm_vit(name="eva02_tiny_patch14_224", img_size=28, patch_size=14, embed_dim=32, depth=2,
                                num_heads=2), {"qkv", "proj"}, 2),
        "beit": (tiny_timm_vit(name="beit_base_patch16_224", embed_dim=32, depth=2, num_heads=2), {"qkv", "proj"}, 2),
    }
    for family, (module, expected, per_layer) in cases.items():
        found = attention_projections(module)
        names = [name for name, sub in module.named_modules() if id(sub) in found]
        assert len(names) == 2 * per_layer, family  # two layers each
        assert {name.split(".")[-1] for name in names} == expected, family
        assert all(any(part.endswith("attn") or part.endswith("attention") for part in name.lower().split("."))
                   for name in names), (family, names)
