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
from tests.methods.general_reference import (CASES, batched_and_alone, general_reference, module_snapshot,
                                             readout_vector, reference_params)
from tests.methods.test_methods_reference import assert_scaled_close
from tests.models.test_hf_clip import CLASSES, PROMPTS, tiny_tokenizer
from vitlens.errors import MethodError
from vitlens.methods import REGISTRY
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
    config = SiglipConfig(
        text_config=dict(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8))
    module = SiglipModel(config)
    with torch.no_grad():
        for name, p in module.named_parameters():
            last = name.split(".")[-1]
            if name in ("logit_scale", "logit_bias"):
                p.fill_(1.2 if name == "logit_scale" else -0.7)
            elif last in ("bias", "in_proj_bias"):
                p.normal_(std=0.1)
            elif last == "probe":
                p.normal_()
            elif "position_embedding" in name:
                p.normal_(std=0.5)
            elif p.dim() == 1:  # layernorm weights
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=p.shape[-1] ** -0.5)
    return module.to(dtype).eval()


def load(module, **options):
    options = options or {"classes": CLASSES}
    return vitlens.load_model(module, tokenizer=siglip_tokenizer(), **options)


# --------------------------------------------------------------------------------------------------
# the image tower restated from its parameters
# --------------------------------------------------------------------------------------------------

def _ln(t, ln):
    return F.layer_norm(t, (t.shape[-1],), ln.weight, ln.bias, ln.eps)


def _lin(t, lin):
    return F.linear(t, lin.weight, lin.bias)


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
    attentions, outputs, normed = [], [], []
    for layer in v.encoder.layers:
        a = layer.self_attn
        h = _ln(z, layer.layer_norm1)
        normed.append(h)
        B, n, C = h.shape
        q, k, val = (_lin(h, p).view(B, n, heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        probs = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
        attentions.append(probs)
        z = z + _lin((probs @ val).transpose(1, 2).reshape(B, n, C), a.out_proj)
        z = z + _mlp(_ln(z, layer.layer_norm2), layer.mlp)
        outputs.append(z)
    return logits_of(m, z), attentions, outputs, normed, pooled(m, z)[1].detach()


def reference_capture(m, x, targets):
    logits, attentions, outputs, normed, readout = explicit_forward(m, x)
    t = torch.tensor(targets).view(-1, 1)
    grads = torch.autograd.grad(logits.gather(1, t).sum(), attentions + [normed[-1]], retain_graph=True)
    layer_grads = {}
    for layer, (z, a) in enumerate(zip(outputs, attentions)):
        for pool, read in (("model", logits_of), ("mean", mean_logits)):
            s = read(m, z).gather(1, t).sum()
            layer_grads[(pool, layer)] = torch.autograd.grad(s, a, retain_graph=True)[0].numpy().copy()
    return {"A": [a.detach().numpy().copy() for a in attentions], "G": [g.numpy().copy() for g in grads[:-1]],
            "LG": layer_grads, "logits": logits.detach(), "cam": (normed[-1].detach(), grads[-1]),
            "readout": readout.numpy()}


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
    x = torch.randn(len(TARGETS), 3, 32, 32, generator=torch.Generator().manual_seed(5)).double()
    return {"module": module, "model": load(copy.deepcopy(module)), "x": x,
            "cap": reference_capture(module, x, TARGETS)}


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
        torch.testing.assert_close(model.logits(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(setup["cap"]["logits"], expected, rtol=0, atol=1e-10)


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
    eager = copy.deepcopy(module)
    for m in eager.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"
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
    result = vitlens.explain(setup["model"], setup["x"], methods=[method], target=TARGETS,
                             params={method: params} if params else None)
    actual = result.patch_maps[method][:, 0]
    full = reference_params(method, REGISTRY[method].params(params))
    expected = per_image_reference(method, full, cap)
    assert_scaled_close(actual.numpy(), expected)
    if method != "legrad":
        # the pooling row matters: the mean of all rows would give another map
        mean = general_reference(method, full, cap, readout_vector("mean-all", 0, N), 0)
        assert np.abs(mean - expected).max() > 1e-3 * np.abs(expected).max()


def test_gradcam_default_layer_matches_the_formula(setup):
    result = vitlens.explain(setup["model"], setup["x"], methods=["gradcam"], target=TARGETS)
    activation, gradient = setup["cap"]["cam"]
    a = activation.reshape(2, *GRID, -1).permute(0, 3, 1, 2)
    g = gradient.reshape(2, *GRID, -1).permute(0, 3, 1, 2)
    expected = (g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1).clamp_min(0)
    assert_scaled_close(result.patch_maps["gradcam"][:, 0].numpy(), expected.numpy())


def test_two_prompts_give_two_different_maps(setup):
    result = vitlens.explain(setup["model"], setup["x"][:1], methods=["legrad", "chefer", "gradcam"],
                             target=torch.tensor([[CLASSES.index("dog"), CLASSES.index("house")]]))
    for name in ("legrad", "chefer", "gradcam"):
        maps = result.patch_maps[name][0]
        assert (maps[0] - maps[1]).abs().max() > 1e-3 * maps.abs().max(), name


METHODS = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "gradcam"]


def test_batched_equals_one_at_a_time(setup):
    for batched, alone in batched_and_alone(vitlens.explain, setup["model"], setup["x"], METHODS):
        assert_scaled_close(batched, alone, rel=1e-9)


def test_model_returned_exactly_as_given_and_lrp_refused():
    module = tiny_hf_siglip(seed=3)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    model = load(module)
    before = module_snapshot(module)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    vitlens.explain(model, x, methods="all")
    vitlens.explain(model, x, methods=["attention"])
    assert module_snapshot(module) == before
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())
    with pytest.raises(MethodError, match="cosine similarity") as info:
        vitlens.explain(model, x, methods=["cp-lrp"])
    assert "\n" not in str(info.value)


def test_another_model_inside_the_capture_is_untouched():
    from tests.models.family_checks import check_bystander_untouched

    check_bystander_untouched(load(tiny_hf_siglip(seed=0)), tiny_hf_siglip(seed=1),
                              call=lambda module, x: module.get_image_features(pixel_values=x).pooler_output)
