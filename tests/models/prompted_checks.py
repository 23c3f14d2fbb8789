"""Checks the prompt-driven (CLIP-style) model tests run the same way: one copy, called with the family's own
model and its independent restatement (tests/models/test_hf_clip.py, test_hf_siglip.py, test_openclip.py).
"""

from __future__ import annotations

import pytest
import torch

import vitlens
from tests.models.family_checks import layer_norm, linear
from vitlens.errors import MethodError

# every attention method and Grad-CAM: what a prompt-driven model supports (relevance propagation is refused)
ATTENTION_METHODS = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "gradcam"]


def unit_scale(module, fan_in):
    """O(1) parameters for a tiny Hugging Face CLIP-style model (their 0.02-std init leaves attention uniform):
    biases N(0, 0.1), class embedding / pooling probe N(0, 1), position embeddings N(0, 0.5), layernorm weights
    U(0.5, 1.5), other weights N(0, 1 / fan_in(p)); the logit scale (and bias) are left to the caller."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            last = name.split(".")[-1]
            if name in ("logit_scale", "logit_bias"):
                continue
            if last in ("bias", "in_proj_bias"):
                p.normal_(std=0.1)
            elif last in ("class_embedding", "probe"):
                p.normal_()
            elif "position_embedding" in name:
                p.normal_(std=0.5)
            elif p.dim() == 1:  # layernorm weights
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=fan_in(p) ** -0.5)


def prompted_setup(module, model, reference_capture, targets):
    """The module, its loaded model, two float64 images (float32 values: explain() reads image tensors as
    float32 before the model's dtype) and ``reference_capture(module, x, targets)``."""
    x = torch.randn(len(targets), 3, 32, 32, generator=torch.Generator().manual_seed(5)).double()
    return {"module": module, "model": model, "x": x, "cap": reference_capture(module, x, targets)}


def restate_hf_encoder(z, layers, heads, mlp):
    """A Hugging Face CLIP-style encoder (``layer_norm1`` -> q/k/v/out projections -> ``layer_norm2`` ->
    ``mlp(t, layer.mlp)``, both residual) restated from its parameters on the token stream ``z``: the last
    stream, the attention probabilities (graph leaves of the scores), block outputs and pre-attention norms."""
    attentions, outputs, normed = [], [], []
    for layer in layers:
        a = layer.self_attn
        h = layer_norm(z, layer.layer_norm1)
        normed.append(h)
        B, n, C = h.shape
        q, k, val = (linear(h, p).view(B, n, heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        probs = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
        attentions.append(probs)
        z = z + linear((probs @ val).transpose(1, 2).reshape(B, n, C), a.out_proj)
        z = z + mlp(layer_norm(z, layer.layer_norm2), layer.mlp)
        outputs.append(z)
    return z, attentions, outputs, normed


def check_logits_are_the_models(model, x, restated, expected):
    """The adapter's logits are the model's own (to 1e-12), and so are the restatement's (to 1e-10)."""
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(restated, expected, rtol=0, atol=1e-10)  # the restatement is the model


def check_two_prompts_differ(model, x, targets, methods, grid=None):
    """Two prompts as the targets of one image give two different maps with every method (on ``grid``)."""
    result = vitlens.explain(model, x, methods=methods, target=targets)
    for name in methods:
        maps = result.patch_maps[name][0]
        if grid is not None:
            assert maps.shape == (2, *grid)
        assert (maps[0] - maps[1]).abs().max() > 1e-3 * maps.abs().max(), name


def check_lrp_refused(model, x, method):
    """Relevance propagation is refused in one line: the logits are a cosine similarity."""
    with pytest.raises(MethodError, match="cosine similarity") as info:
        vitlens.explain(model, x, methods=[method])
    assert "\n" not in str(info.value)
