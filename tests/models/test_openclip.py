"""OpenCLIP models explained for text prompts, every method checked in float64.

Tiny random-init ``open_clip.model.CLIP`` models (vision: width 32, 3 layers, 4 heads, 32x32 input, 8x8
patches, CLS-token or patch-mean pooling; text: CLIP's BPE vocabulary, 2 layers, 16 tokens) with O(1)
weights. The logits are OpenCLIP's own ``logit_scale.exp() * encode_image(x, normalize=True) @
encode_text(tokens, normalize=True).T``. :func:`explicit_forward` restates the image tower from its parameters
(patch convolution, class and position embeddings, ln_pre, blocks with the packed ``in_proj`` attention and GELU
MLP, ln_post, pooling, ``proj``) and must reproduce those logits to 1e-10; the method formulas are
tests/methods/general_reference.py's with the tower's readout.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from tests.methods.general_reference import CASES, general_reference, readout_vector
from tests.methods.test_methods_reference import assert_scaled_close
from tests.models.family_checks import (check_batched_equals_alone, check_bystander_untouched, check_gradcam_formula,
                                        check_module_as_given, explain_one, reference_gradients)
from tests.models.family_checks import layer_norm as _ln
from tests.models.prompted_checks import (check_logits_are_the_models, check_lrp_refused, check_two_prompts_differ,
                                          prompted_setup)
from vitlens.errors import ModelError

open_clip = pytest.importorskip("open_clip", reason="pip install open-clip-torch")

CLASSES = ["dog", "cat", "bird", "car", "tree", "house", "boat", "fish"]
PROMPTS = [f"a photo of a {c}." for c in CLASSES]
TARGETS = [3, 5]
GRID = (4, 4)
N = 1 + GRID[0] * GRID[1]
VISION = dict(layers=3, width=32, head_width=8, patch_size=8, image_size=32, mlp_ratio=2)
TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=2)


def unit_init(module):
    """O(1) parameters for a tiny OpenCLIP model (its own init leaves the attention nearly uniform): logit scale 1.5,
    biases N(0, 0.1), class embedding N(0, 1), position embeddings N(0, 0.5), 1-D weights U(0.5, 1.5), the visual
    projection N(0, 1 / rows), other weights N(0, 1 / fan_in)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "logit_scale":
                p.fill_(1.5)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
            elif name.endswith("class_embedding"):
                p.normal_()
            elif "positional_embedding" in name:
                p.normal_(std=0.5)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
            elif name.endswith("proj") and p.dim() == 2 and "visual" in name:
                p.normal_(std=p.shape[0] ** -0.5)
            else:
                p.normal_(std=p[0].numel() ** -0.5)
    return module


def tiny_open_clip(seed=0, pool="tok", dtype=torch.float64):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    module = unit_init(CLIP(16, CLIPVisionCfg(pool_type=pool, **VISION), CLIPTextCfg(**TEXT)))
    return module.to(dtype).eval()


def tokens(prompts=PROMPTS):
    return open_clip.tokenizer.SimpleTokenizer(context_length=16)(prompts)


def own_logits(m, x, prompts=PROMPTS):
    with torch.no_grad():
        return m.logit_scale.exp() * m.encode_image(x, normalize=True) @ m.encode_text(tokens(prompts),
                                                                                        normalize=True).T


def readout(m, z):
    v = m.visual
    z = _ln(z, v.ln_post)
    pooled = z[:, 0] if v.pool_type == "tok" else z[:, 1:].mean(dim=1)
    e = pooled @ v.proj
    with torch.no_grad():
        u = m.encode_text(tokens(), normalize=True)
    return m.logit_scale.exp() * (e / e.norm(dim=-1, keepdim=True)) @ u.T


def mean_readout(m, z):
    return readout(m, z.mean(dim=1, keepdim=True).expand_as(z))


def explicit_forward(m, x, read=None):
    """The image tower restated from its parameters: ``read(m, z)`` of the last stream (default: :func:`readout`),
    the attention probabilities, block outputs and pre-attention norms."""
    v = m.visual
    z = F.conv2d(x, v.conv1.weight, stride=v.patch_size).flatten(2).transpose(1, 2)
    z = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), z], dim=1) + v.positional_embedding
    z = _ln(z, v.ln_pre)
    attentions, outputs, normed = [], [], []
    for block in v.transformer.resblocks:
        mha = block.attn
        h = _ln(z, block.ln_1)
        normed.append(h)
        B, n, C = h.shape
        heads = mha.num_heads
        q, k, val = (t.view(B, n, heads, -1).transpose(1, 2)
                     for t in F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1))
        probs = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
        attentions.append(probs)
        z = z + F.linear((probs @ val).transpose(1, 2).reshape(B, n, C), mha.out_proj.weight, mha.out_proj.bias)
        z = z + block.mlp.c_proj(F.gelu(block.mlp.c_fc(_ln(z, block.ln_2))))
        outputs.append(z)
    return (read or readout)(m, z), attentions, outputs, normed


def reference_capture(m, x, targets):
    logits, attentions, outputs, normed = explicit_forward(m, x)
    return reference_gradients(m, targets, logits, attentions, outputs, normed, readout, mean_readout)


@pytest.fixture(scope="module", params=["tok", "avg"])
def setup(request):
    module = tiny_open_clip(seed=1, pool=request.param)
    model = vitlens.load_model(copy.deepcopy(module), prompts=PROMPTS)
    return {"pool": request.param, **prompted_setup(module, model, reference_capture, TARGETS)}


def test_family_facts_and_logits(setup):
    model, module, x = setup["model"], setup["module"], setup["x"]
    assert model.family == "open-clip" and model.num_layers == 3 and model.num_prefix_tokens == 1
    assert model.num_classes == 8 and model.class_names == PROMPTS and model.fixed_input_size() == (32, 32)
    assert model.default_cam_layers() == ["visual.transformer.resblocks.2.ln_1"]
    assert set(model.unsupported_methods()) == {"attnlrp", "cp-lrp"}
    expected = own_logits(module, x)
    check_logits_are_the_models(model, x, setup["cap"]["logits"], expected)
    # OpenCLIP's forward gives the same embeddings
    with torch.no_grad():
        image, text, scale = module(x, tokens())[:3]
    torch.testing.assert_close(scale * image @ text.T, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}".replace(" ", "") for m, p in CASES])
def test_matches_independent_float64_reference(setup, method, params):
    actual, full = explain_one(setup["model"], setup["x"], method, params, TARGETS)
    w = readout_vector("cls" if setup["pool"] == "tok" else "mean", 1, N)
    expected = general_reference(method, full, setup["cap"], w, 1)
    assert_scaled_close(actual.numpy(), expected)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3 * np.abs(expected).max()


def test_gradcam_default_layer_matches_the_formula(setup):
    check_gradcam_formula(setup["model"], setup["x"], TARGETS, setup["cap"]["cam"], GRID)


def test_two_prompts_give_two_different_maps_and_batches_equal_single_images(setup):
    check_two_prompts_differ(setup["model"], setup["x"][:1], torch.tensor([[0, 5]]), ["legrad", "chefer"])
    methods = ["attention", "rollout", "gmar-l2", "gmar++", "legrad", "chefer", "gradcam"]
    check_batched_equals_alone(setup["model"], setup["x"], methods)


def test_model_returned_exactly_as_given_and_lrp_refused():
    module = tiny_open_clip(seed=3)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    model = vitlens.load_model(module, classes=CLASSES[:3])
    assert model.module is module and model.prompts == [f"a photo of a {c}." for c in CLASSES[:3]]
    x = check_module_as_given(model, module, state)
    check_lrp_refused(model, x, "attnlrp")


def test_open_clip_spec_with_a_weights_file(tmp_path):
    """``open_clip:ARCH`` + ``weights``: OpenCLIP builds the architecture, vitlens reads the file safely."""
    name = "vitlens-test-tiny-vit"
    config = {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT}
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    module = tiny_open_clip(seed=4, dtype=torch.float32)
    torch.save(module.state_dict(), tmp_path / "tiny.pth")
    model = vitlens.load_model(f"open_clip:{name}", weights=tmp_path / "tiny.pth", prompts=PROMPTS[:2])
    assert model.family == "open-clip" and model.info.weights_sha256
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), own_logits(module, x, PROMPTS[:2]), rtol=0, atol=1e-5)
    with pytest.raises(ModelError, match="unknown OpenCLIP architecture 'no-such-arch'"):
        vitlens.load_model("open_clip:no-such-arch", prompts=["a dog"])
    with pytest.raises(ModelError, match="unknown OpenCLIP pretrained tag 'nope'"):
        vitlens.load_model("open_clip:ViT-B-32:nope", prompts=["a dog"])


def test_another_model_inside_the_capture_is_untouched():
    check_bystander_untouched(vitlens.load_model(tiny_open_clip(seed=0), prompts=PROMPTS[:2]), tiny_open_clip(seed=1),
                              call=lambda module, x: module.encode_image(x))
