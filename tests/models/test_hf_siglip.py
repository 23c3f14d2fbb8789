"""Hugging Face ``SiglipModel`` explained for text prompts, every method checked in float64.

A tiny random-init SigLIP (vision: hidden 32, 3 layers, 4 heads, 32x32 input, 8x8 patches, attention-pooling
head; text: 2 layers) with O(1) weights, the word-level tokenizer of test_hf_clip.py padded to 16 tokens.
:func:`explicit_forward` restates the image tower from its parameters (patch embedding, position embedding,
no CLS; attention, tanh-GELU MLP; post-layernorm; the pooling head: a probe query attending over all tokens
with the packed ``in_proj`` weights, out_proj, layernorm + MLP residual) and the logits
``exp(logit_scale) * cos + logit_bias`` equal the model's own ``logits_per_image`` to 1e-10. The rollout-style
readout is the pooling attention of each image (mean over heads of the probe's softmax row), so the references
of tests/methods/general_reference.py are read per image with that row; LeGrad's 'model' score re-applies the
pooling head to a layer's tokens (the official LeGrad SigLIP score).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from tests.methods.general_reference import CASES, general_reference, readout_vector
from tests.methods.test_methods_reference import assert_scaled_close
from tests.models.family_checks import (check_batched_equals_alone, check_bystander_untouched, check_gradcam_formula,
                                        check_module_as_given, eager_copy, explain_one, reference_gradients)
from tests.models.family_checks import layer_norm as _ln
from tests.models.family_checks import linear as _lin
from tests.models.prompted_checks import (ATTENTION_METHODS, check_logits_are_the_models, check_lrp_refused,
                                          check_two_prompts_differ, prompted_setup, restate_hf_encoder,
                                          unit_scale)
from tests.models.test_hf_clip import CLASSES, PROMPTS, TEXT_CONFIG, VISION_CONFIG, tiny_tokenizer
from vitlens.models import AttentionRecorder
from vitlens.models.hf_clip import HFSiglip

TARGETS = [3, 5]
GRID = (4, 4)
N = GRID[0] * GRID[1]


def siglip_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 16
    return tokenizer


def tiny_hf_siglip(seed=0, dtype=torch.float64):
    """A small Hugging Face SiglipModel with O(1) parameters, eval mode."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(text_config=dict(TEXT_CONFIG), vision_config=dict(VISION_CONFIG))
    module = SiglipModel(config)
    unit_scale(module, fan_in=lambda p: p.shape[-1])
    with torch.no_grad():
        module.logit_scale.fill_(1.2)
        module.logit_bias.fill_(-0.7)
    return module.to(dtype).eval()


def load(module, **options):
    options = options or {"classes": CLASSES}
    return vitlens.load_model(module, tokenizer=siglip_tokenizer(), **options)


# --------------------------------------------------------------------------------------------------
# the image tower restated from its parameters
# --------------------------------------------------------------------------------------------------

def _mlp(t, mlp):
    return _lin(F.gelu(_lin(t, mlp.fc1), approximate="tanh"), mlp.fc2)


def prompt_embeddings(m, prompts=PROMPTS):
    with torch.no_grad():
        ids = siglip_tokenizer()(prompts, padding="max_length", return_tensors="pt")
        u = m.get_text_features(**ids).pooler_output
    return u / u.norm(dim=-1, keepdim=True)


def pooled(m, z):
    """(B, C) embedding and (B, N) pooling weights of the head on a (B, N, C) stream (after post_layernorm)."""
    v = m.vision_model
    head, heads = v.head, v.config.num_attention_heads
    h = _ln(z, v.post_layernorm)
    B, n, C = h.shape
    wq, wk, wv = head.attention.in_proj_weight.chunk(3)
    bq, bk, bv = head.attention.in_proj_bias.chunk(3)
    q = F.linear(head.probe.expand(B, 1, C), wq, bq).view(B, 1, heads, -1).transpose(1, 2)
    k = F.linear(h, wk, bk).view(B, n, heads, -1).transpose(1, 2)
    val = F.linear(h, wv, bv).view(B, n, heads, -1).transpose(1, 2)
    probs = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)  # (B, heads, 1, N)
    out = _lin((probs @ val).transpose(1, 2).reshape(B, 1, C), head.attention.out_proj)
    out = out + _mlp(_ln(out, head.layernorm), head.mlp)
    return out[:, 0], probs.mean(dim=1)[:, 0]


def logits_of(m, z):
    e, _ = pooled(m, z)
    return m.logit_scale.exp() * (e / e.norm(dim=-1, keepdim=True)) @ prompt_embeddings(m).T + m.logit_bias


def mean_logits(m, z):
    return logits_of(m, z.mean(dim=1, keepdim=True).expand_as(z))


def explicit_forward(m, x):
    v = m.vision_model
    heads = v.config.num_attention_heads
    z = F.conv2d(x, v.embeddings.patch_embedding.weight, v.embeddings.patch_embedding.bias,
                 stride=v.config.patch_size).flatten(2).transpose(1, 2) + v.embeddings.position_embedding.weight
    z, attentions, outputs, normed = restate_hf_encoder(z, v.encoder.layers, heads, _mlp)
    return logits_of(m, z), attentions, outputs, normed, pooled(m, z)[1].detach()


def reference_capture(m, x, targets):
    logits, attentions, outputs, normed, readout = explicit_forward(m, x)
    cap = reference_gradients(m, targets, logits, attentions, outputs, normed, logits_of, mean_logits)
    return {**cap, "readout": readout.numpy()}


def per_image_reference(method, params, cap):
    """general_reference read with each image's own pooling row."""
    out = []
    for b in range(cap["A"][0].shape[0]):
        one = {"A": [a[b:b + 1] for a in cap["A"]], "G": [g[b:b + 1] for g in cap["G"]],
               "LG": {key: g[b:b + 1] for key, g in cap["LG"].items()}}
        out.append(general_reference(method, params, one, cap["readout"][b], 0)[0])
    return np.stack(out)


@pytest.fixture(scope="module")
def setup():
    module = tiny_hf_siglip(seed=1)
    return prompted_setup(module, load(copy.deepcopy(module)), reference_capture, TARGETS)


def test_family_facts_and_logits(setup):
    model, module, x = setup["model"], setup["module"], setup["x"]
    assert isinstance(model, HFSiglip) and model.family == "hf-siglip"
    assert model.num_layers == 3 and model.num_classes == 8 and model.num_prefix_tokens == 0
    assert model.class_names == CLASSES and model.prompts == PROMPTS
    assert model.block_norm_names()[-1] == "vision_model.encoder.layers.2.layer_norm1"
    assert set(model.unsupported_methods()) == {"attnlrp", "cp-lrp"}
    ids = siglip_tokenizer()(PROMPTS, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        expected = module(pixel_values=x, **ids).logits_per_image
    check_logits_are_the_models(model, x, setup["cap"]["logits"], expected)


def test_capture_records_the_pooling_attention_as_the_readout(setup):
    model, x, cap = setup["model"], setup["x"], setup["cap"]
    recorder = AttentionRecorder(keep_block_outputs=True)
    with torch.no_grad(), model.capture(recorder):
        model.logits(x)
    assert len(recorder.attentions) == 3 and recorder.readout.shape == (2, N)
    np.testing.assert_allclose(recorder.readout.numpy(), cap["readout"], rtol=0, atol=1e-12)
    for mine, theirs in zip(recorder.attentions, cap["A"]):
        np.testing.assert_allclose(mine.numpy(), theirs, rtol=0, atol=1e-12)
    # not a constant: the two images pool their patches differently, and far from uniformly
    assert np.abs(cap["readout"][0] - cap["readout"][1]).max() > 1e-2
    assert np.abs(cap["readout"] - 1.0 / N).max() > 1e-2


def test_captured_attention_equals_eager_output_attentions(setup):
    module, model, x = setup["module"], setup["model"], setup["x"]
    eager = eager_copy(module)
    with torch.no_grad():
        expected = eager.vision_model(pixel_values=x, output_attentions=True).attentions
        recorder = AttentionRecorder()
        with model.capture(recorder):
            model.logits(x)
    assert len(expected) == len(recorder.attentions) == 3
    for mine, theirs in zip(recorder.attentions, expected):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)  # eager softmax in float32


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}".replace(" ", "") for m, p in CASES])
def test_matches_independent_float64_reference(setup, method, params):
    cap = setup["cap"]
    actual, full = explain_one(setup["model"], setup["x"], method, params, TARGETS)
    expected = per_image_reference(method, full, cap)
    assert_scaled_close(actual.numpy(), expected)
    if method != "legrad":
        # the pooling row matters: the mean of all rows would give another map
        mean = general_reference(method, full, cap, readout_vector("mean-all", 0, N), 0)
        assert np.abs(mean - expected).max() > 1e-3 * np.abs(expected).max()


def test_gradcam_default_layer_matches_the_formula(setup):
    check_gradcam_formula(setup["model"], setup["x"], TARGETS, setup["cap"]["cam"], GRID, prefix=0)


def test_two_prompts_give_two_different_maps(setup):
    check_two_prompts_differ(setup["model"], setup["x"][:1],
                             torch.tensor([[CLASSES.index("dog"), CLASSES.index("house")]]),
                             ["legrad", "chefer", "gradcam"])


def test_batched_equals_one_at_a_time(setup):
    check_batched_equals_alone(setup["model"], setup["x"], ATTENTION_METHODS)


def test_model_returned_exactly_as_given_and_lrp_refused():
    module = tiny_hf_siglip(seed=3)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    model = load(module)
    x = check_module_as_given(model, module, state)
    check_lrp_refused(model, x, "cp-lrp")


def test_another_model_inside_the_capture_is_untouched():
    check_bystander_untouched(load(tiny_hf_siglip(seed=0)), tiny_hf_siglip(seed=1),
                              call=lambda module, x: module.get_image_features(pixel_values=x).pooler_output)
