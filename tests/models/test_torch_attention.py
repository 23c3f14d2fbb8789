"""A user's own ViT (``nn.Conv2d`` patches + ``nn.TransformerEncoder``) read by the generic attention adapter.

Every attention method is checked in float64 against an independent computation: the test runs the
model's encoder layers itself (the forward of ``nn.TransformerEncoderLayer`` re-implemented here,
pre-norm and post-norm), takes the attention probabilities from calling each layer's
``self_attn(x, x, x, need_weights=True, average_attn_weights=False)``, and the gradients with plain
autograd: the probabilities enter the attention output as ``A + delta`` with a zero leaf ``delta``, so
``d score / d delta`` is the gradient with respect to A along every path (later layers included). The
method formulas are tests/methods/general_reference.py's (tests/methods/test_methods_reference.py's with a
general readout: mean of the patch tokens, of all tokens), checked equal to test_methods_reference.py's own
on a CLS readout; AttnLRP / CP-LRP are checked against an explicit relevance propagation that mirrors
tests/lrp/test_lrp_reference.py.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import vitlens
from tests.lrp.test_lrp_reference import lrp_layer_norm, lrp_linear
from tests.methods.general_reference import general_reference, readout_vector, reference_params
from tests.methods.test_methods_reference import assert_scaled_close, ref_attention, ref_rollout, reference
from tests.models.family_checks import check_lrp_against_reference
from vitlens.errors import MethodError, ModelError
from vitlens.methods import REGISTRY
from vitlens.models.cnn import is_cnn
from vitlens.models.registry import find_family

TARGETS = [3, 1]


class UserViT(nn.Module):
    """What a user writes: conv patches, optional CLS token, learned positions, nn.TransformerEncoder, head.

    pool: 'cls' (token 0), 'mean' (mean of the patch tokens, after the final norm), 'mean-all' (mean of
    every token, CLS included). final_norm: 'encoder' (``TransformerEncoder(norm=...)``), 'module' (a
    LayerNorm after the encoder) or None.
    """

    def __init__(self, img=32, patch=8, dim=16, depth=3, heads=2, classes=5, cls_token=True, pool="cls",
                 batch_first=True, norm_first=True, final_norm="encoder", activation="gelu"):
        super().__init__()
        self.pool, self.batch_first = pool, batch_first
        self.prefix = int(cls_token)
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + self.prefix, dim) * 0.5)
        # dropout > 0: explanations must be those of the model in eval mode
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.1, activation=activation,
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim) if final_norm == "encoder" else None,
                                             enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim) if final_norm == "module" else None
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():  # O(1) weights and biases: no degenerate (all-equal) attention
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.1)
                elif p.dim() >= 2 and "embed" not in name and "token" not in name:
                    p.normal_(std=p[0].numel() ** -0.5)

    def tokens(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return t + self.pos_embed

    def final_norm(self, t):
        if self.encoder.norm is not None:
            t = self.encoder.norm(t)
        return self.norm(t) if self.norm is not None else t

    def classify(self, t):
        """Everything after the encoder layers, on a (B, N, C) stream (the test's reference uses it)."""
        return self.pool_and_head(self.encoder.norm(t) if self.encoder.norm is not None else t)

    def pool_and_head(self, t):
        """Everything after the encoder module."""
        if self.norm is not None:
            t = self.norm(t)
        if self.pool == "cls":
            return self.head(t[:, 0])
        if self.pool == "mean":
            return self.head(t[:, self.prefix:].mean(dim=1))
        return self.head(t.mean(dim=1))

    def forward(self, x):
        t = self.tokens(x)
        if not self.batch_first:
            t = t.transpose(0, 1)
        t = self.encoder(t)
        if not self.batch_first:
            t = t.transpose(0, 1)
        return self.pool_and_head(t)


def user_vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    return UserViT(**kwargs).double().eval()


# --------------------------------------------------------------------------------------------------
# independent capture: the encoder layers run here, attention from self_attn(..., need_weights=True)
# --------------------------------------------------------------------------------------------------

def _self_attention(mha, h, delta):
    """mha on a (B, N, C) stream: output recomputed from its own returned weights A (+ delta), and A."""
    x = h if mha.batch_first else h.transpose(0, 1)
    native, A = mha(x, x, x, need_weights=True, average_attn_weights=False)
    B, N, C = h.shape
    K, d = mha.num_heads, C // mha.num_heads
    v = F.linear(h, mha.in_proj_weight[2 * C:], mha.in_proj_bias[2 * C:]).view(B, N, K, d).transpose(1, 2)
    out = ((A + delta) @ v).transpose(1, 2).reshape(B, N, C)
    out = mha.out_proj(out)
    # the recomputation is the module's own output (so the gradients below are the model's)
    assert torch.allclose(out, native if mha.batch_first else native.transpose(0, 1), atol=1e-12)
    return out, A


def _encoder_layer(layer, x, delta):
    """nn.TransformerEncoderLayer.forward (eval: dropout is the identity), written out."""
    def ff(t):
        return layer.linear2(layer.activation(layer.linear1(t)))

    if layer.norm_first:
        sa, A = _self_attention(layer.self_attn, layer.norm1(x), delta)
        x = x + sa
        x = x + ff(layer.norm2(x))
    else:
        sa, A = _self_attention(layer.self_attn, x, delta)
        x = layer.norm1(x + sa)
        x = layer.norm2(x + ff(x))
    return x, A


def reference_capture(model, x, targets):
    m = copy.deepcopy(model).eval()
    t = torch.tensor(targets).view(-1, 1)
    N = m.pos_embed.shape[1]
    deltas, attentions, outputs = [], [], []
    z = m.tokens(x)
    for layer in m.encoder.layers:
        delta = torch.zeros(x.shape[0], layer.self_attn.num_heads, N, N, dtype=x.dtype, requires_grad=True)
        z, A = _encoder_layer(layer, z, delta)
        deltas.append(delta)
        attentions.append(A)
        outputs.append(z)
    logits = m.classify(z)
    assert torch.allclose(logits, m(x), atol=1e-12)  # the written-out forward is the model's
    grads = torch.autograd.grad(logits.gather(1, t).sum(), deltas, retain_graph=True)
    layer_grads = {}
    for layer, (zl, delta) in enumerate(zip(outputs, deltas)):
        score_model = m.classify(zl).gather(1, t).sum()  # the model's own pooling, norm and head
        score_mean = m.head(m.final_norm(zl.mean(dim=1))).gather(1, t).sum()  # mean of ALL tokens -> norm -> head
        layer_grads[("model", layer)] = torch.autograd.grad(score_model, delta, retain_graph=True)[0].numpy()
        layer_grads[("mean", layer)] = torch.autograd.grad(score_mean, delta, retain_graph=True)[0].numpy()
    return {"A": [a.detach().numpy() for a in attentions], "G": [g.numpy() for g in grads], "LG": layer_grads,
            "logits": logits.detach()}


# --------------------------------------------------------------------------------------------------
# 1. every attention method == the independent float64 computation
# --------------------------------------------------------------------------------------------------

MODELS = {
    # name: constructor options; pre-norm with a final norm, post-norm without (as each is usually written)
    f"{'pre' if nf else 'post'}-{'bf' if bf else 'sf'}-{pool}": dict(
        norm_first=nf, batch_first=bf, pool=pool, cls_token=pool == "cls",
        final_norm=("encoder" if bf else "module") if nf else None)
    for nf in (True, False) for bf in (True, False) for pool in ("cls", "mean")
}
MODELS["pre-bf-cls+patch-mean"] = dict(pool="mean", cls_token=True)  # a CLS token the head does not read
MODELS["post-sf-cls+mean-all"] = dict(pool="mean-all", cls_token=True, norm_first=False, batch_first=False,
                                      final_norm="module", activation="relu")
GRID = (4, 4)

CASES = [("attention", {}), ("attention", {"layer": 0})]
CASES += [("rollout", {"head_fusion": f, "discard_ratio": d}) for f in ("mean", "max", "min") for d in (0.0, 0.5)]
CASES += [("rollout", {"start_layer": 1, "residual": 0.5})]
CASES += [("gmar-l1", {}), ("gmar-l2", {"residual": 0.5, "start_layer": 1})]
CASES += [("gmar++", {"norm": n, "normalize": z}) for n in ("l1", "l2") for z in ("none", "layer")]
CASES += [("legrad", {"layers": la, "pool": p}) for la in ("all", 1, [0, 2]) for p in ("model", "mean")]
CASES += [("chefer", {}), ("chefer", {"start_layer": 1})]


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def setup(request):
    options = MODELS[request.param]
    module = user_vit(seed=len(request.param), **options)
    x = torch.randn(len(TARGETS), 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cap = reference_capture(module, x, TARGETS)
    model = vitlens.load_model(copy.deepcopy(module))
    return {"module": module, "model": model, "x": x, "cap": cap, "options": options}


def test_facts_found_by_the_dry_run(setup):
    model, options = setup["model"], setup["options"]
    prefix = int(options.get("cls_token", True))
    assert model.family == "torch-attention" and model.num_layers == 3 and model.num_classes == 5
    assert model.num_prefix_tokens == prefix and model.grid((32, 32)) == GRID and model.patch_size == (8, 8)
    assert model.survey.readout == options["pool"]
    assert model.preprocess.input_size == (32, 32)  # from the position embedding and the patch convolution
    norm_first = options.get("norm_first", True)
    assert model.block_norm_names() == [f"encoder.layers.{i}.norm{1 if norm_first else 2}" for i in range(3)]
    # Grad-CAM reads what enters the last attention: norm1 of the last block, or the previous block's output
    assert model.default_cam_layers() == ["encoder.layers.2.norm1" if norm_first else "encoder.layers.1.norm2"]
    n = prefix + 16
    np.testing.assert_array_equal(model.readout_weights(n, dtype=torch.float64).numpy(),
                                  readout_vector(options["pool"], prefix, n))


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}".replace(" ", "") for m, p in CASES])
def test_matches_independent_float64_reference(setup, method, params):
    options, cap = setup["options"], setup["cap"]
    prefix = int(options.get("cls_token", True))
    result = vitlens.explain(setup["model"], setup["x"], methods=[method], target=TARGETS,
                             params={method: params} if params else None)
    actual = result.patch_maps[method][:, 0]
    assert actual.dtype == torch.float64 and actual.shape == (2, *GRID)
    torch.testing.assert_close(result.probabilities, cap["logits"].float().softmax(-1), rtol=0, atol=1e-6)
    full = reference_params(method, REGISTRY[method].params(params))
    expected = general_reference(method, full, cap, readout_vector(options["pool"], prefix, prefix + 16), prefix, GRID)
    assert_scaled_close(actual.numpy(), expected)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3 * np.abs(expected).max()  # not degenerate
    if options["pool"] == "cls":
        # the general restatement is test_methods_reference.py's own formula for a CLS readout
        assert_scaled_close(expected, reference(method, dict(full, grid=GRID), cap), rel=1e-12)


def test_reference_capture_is_not_degenerate(setup):
    cap = setup["cap"]
    for a, g in zip(cap["A"], cap["G"]):
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-12)
        assert (g > 0).any() and (g < 0).any()
    # the last layer's own score is the logit: same gradient; earlier layers differ
    np.testing.assert_allclose(cap["LG"][("model", 2)], cap["G"][2], atol=1e-12)
    assert np.abs(cap["LG"][("model", 0)] - cap["G"][0]).max() > 1e-6


# --------------------------------------------------------------------------------------------------
# 2. AttnLRP / CP-LRP == an explicit relevance propagation (one block; rules as in test_lrp_reference.py)
# --------------------------------------------------------------------------------------------------

def _attention_relevance(q, kk, v, A, scores, scale, R_o, variant):
    """Relevance of q, k, v (K, N, d) from that of o = A v: uniform rule on A V and Q K^T, softmax rule."""
    o = A @ v
    contrib = A[..., None] * v[:, None, :, :] * (R_o / o)[:, :, None, :]  # (K, N_i, N_j, d)
    if variant == "cp-lrp":
        return torch.zeros_like(q), torch.zeros_like(kk), contrib.sum(dim=1)
    R_v = 0.5 * contrib.sum(dim=1)
    R_A = 0.5 * contrib.sum(dim=-1)
    R_scores = scores * (R_A - A * R_A.sum(-1, keepdim=True))
    c2 = (q * scale)[:, :, None, :] * kk[:, None, :, :] * (R_scores / scores)[..., None]
    return 0.5 * c2.sum(dim=2), 0.5 * c2.sum(dim=1), R_v


def reference_relevance(m, x, target, variant, conv_gamma, lin_gamma):
    """Pixel relevance (H, W) of one image for a one-layer UserViT, every rule written out."""
    p = m.patch_embed
    C, k = p.out_channels, p.kernel_size[0]
    ln = F.layer_norm
    # --- forward ---------------------------------------------------------------------------------
    patches = F.unfold(x[None], kernel_size=k, stride=k)[0].T
    Wc = p.weight.reshape(C, -1)
    t0 = patches @ Wc.T + p.bias
    prefix = m.prefix
    tokens = (torch.cat([m.cls_token[0], t0]) if prefix else t0) + m.pos_embed[0]
    layer = m.encoder.layers[0]
    mha = layer.self_attn
    N, K = tokens.shape[0], mha.num_heads
    d = C // K
    scale = d ** -0.5

    def attention(h):
        qkv = h @ mha.in_proj_weight.T + mha.in_proj_bias
        q, kk, v = qkv.reshape(N, 3, K, d).permute(1, 2, 0, 3)
        scores = (q * scale) @ kk.transpose(-1, -2)
        A = scores.softmax(-1)
        merged = (A @ v).permute(1, 0, 2).reshape(N, C)
        return (q, kk, v, A, scores, merged), merged @ mha.out_proj.weight.T + mha.out_proj.bias

    def norm(t, module):
        return ln(t, (C,), module.weight, module.bias, module.eps)

    act = layer.activation
    if layer.norm_first:
        h1 = norm(tokens, layer.norm1)
        parts, proj = attention(h1)
        r1 = tokens + proj
        h2 = norm(r1, layer.norm2)
        f1 = h2 @ layer.linear1.weight.T + layer.linear1.bias
        a = act(f1)
        f2 = a @ layer.linear2.weight.T + layer.linear2.bias
        z = r1 + f2
    else:
        parts, proj = attention(tokens)
        s1 = tokens + proj
        n1 = norm(s1, layer.norm1)
        f1 = n1 @ layer.linear1.weight.T + layer.linear1.bias
        a = act(f1)
        f2 = a @ layer.linear2.weight.T + layer.linear2.bias
        s2 = n1 + f2
        z = norm(s2, layer.norm2)
    final = m.encoder.norm
    n = norm(z, final) if final is not None else z
    pooled = n[0] if m.pool == "cls" else n[prefix:].mean(0)
    logits = pooled @ m.head.weight.T + m.head.bias
    # --- relevance ---------------------------------------------------------------------------------
    R_logits = torch.zeros_like(logits)
    R_logits[target] = logits[target]
    R_pooled = lrp_linear(pooled[None], m.head.weight, m.head.bias, R_logits[None], lin_gamma)[0]
    R_n = torch.zeros_like(n)
    if m.pool == "cls":
        R_n[0] = R_pooled
    else:  # z-rule through the mean
        R_n[prefix:] = n[prefix:] / (N - prefix) / pooled * R_pooled
    R_z = lrp_layer_norm(z, final, R_n) if final is not None else R_n
    if layer.norm_first:
        R_r1 = r1 / z * R_z
        R_f2 = f2 / z * R_z
        R_f1 = lrp_linear(a, layer.linear2.weight, layer.linear2.bias, R_f2, lin_gamma)  # identity rule on act
        R_h2 = lrp_linear(h2, layer.linear1.weight, layer.linear1.bias, R_f1, lin_gamma)
        R_r1 = R_r1 + lrp_layer_norm(r1, layer.norm2, R_h2)
        R_tokens, R_proj = tokens / r1 * R_r1, proj / r1 * R_r1
        attention_input = h1
    else:
        R_s2 = lrp_layer_norm(s2, layer.norm2, R_z)
        R_n1, R_f2 = n1 / s2 * R_s2, f2 / s2 * R_s2
        R_f1 = lrp_linear(a, layer.linear2.weight, layer.linear2.bias, R_f2, lin_gamma)
        R_n1 = R_n1 + lrp_linear(n1, layer.linear1.weight, layer.linear1.bias, R_f1, lin_gamma)
        R_s1 = lrp_layer_norm(s1, layer.norm1, R_n1)
        R_tokens, R_proj = tokens / s1 * R_s1, proj / s1 * R_s1
        attention_input = tokens
    q, kk, v, A, scores, merged = parts
    R_merged = lrp_linear(merged, mha.out_proj.weight, mha.out_proj.bias, R_proj, lin_gamma)
    R_o = R_merged.reshape(N, K, d).permute(1, 0, 2)
    R_q, R_k, R_v = _attention_relevance(q, kk, v, A, scores, scale, R_o, variant)
    R_qkv = torch.stack([R_q, R_k, R_v]).permute(2, 0, 1, 3).reshape(N, 3 * C)
    R_in = lrp_linear(attention_input, mha.in_proj_weight, mha.in_proj_bias, R_qkv, lin_gamma)
    if layer.norm_first:
        R_tokens = R_tokens + lrp_layer_norm(tokens, layer.norm1, R_in)
    else:
        R_tokens = R_tokens + R_in
    R_t0 = t0 / tokens[prefix:] * R_tokens[prefix:]  # the position embedding absorbs its share
    R_patches = lrp_linear(patches, Wc, p.bias, R_t0, conv_gamma)
    folded = F.fold(R_patches.T[None], output_size=x.shape[-2:], kernel_size=k, stride=k)[0]
    return folded.sum(0), logits


@pytest.fixture(scope="module", params=[(True, "cls", True), (False, "mean", False), (True, "mean", False)],
                ids=["pre-cls-bf", "post-mean-sf", "pre-mean-sf"])
def one_layer(request):
    norm_first, pool, batch_first = request.param
    module = user_vit(seed=7, img=16, depth=1, pool=pool, cls_token=pool == "cls", norm_first=norm_first,
                      batch_first=batch_first, final_norm="encoder" if norm_first else None)
    with torch.no_grad():
        if module.cls_token is not None:
            module.cls_token.normal_()
        module.pos_embed.normal_(std=0.5)
    return module


@pytest.mark.parametrize("variant", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("conv_gamma, lin_gamma", [(0.0, 0.0), (1.0, 0.5)])
def test_lrp_matches_explicit_relevance_propagation(one_layer, variant, conv_gamma, lin_gamma):
    check_lrp_against_reference(one_layer, reference_relevance, variant, conv_gamma, lin_gamma, min_scale=1e-6,
                                check_sum=False)


@pytest.mark.parametrize("norm_first", [True, False])
def test_sequence_first_layout_gives_the_same_maps(norm_first):
    """batch_first only changes the layout: the same weights give the same maps for every method,
    Grad-CAM included ((N, B, C) target-layer outputs are put on the grid like (B, N, C) ones)."""
    final = "encoder" if norm_first else None
    first = user_vit(seed=3, batch_first=True, norm_first=norm_first, final_norm=final)
    second = user_vit(seed=3, batch_first=False, norm_first=norm_first, final_norm=final)
    second.load_state_dict(first.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    methods = ["rollout", "gmar++", "legrad", "chefer", "gradcam", "gradcam++", "attnlrp"]
    a = vitlens.explain(vitlens.load_model(first), x, methods=methods, target=TARGETS)
    b = vitlens.explain(vitlens.load_model(second), x, methods=methods, target=TARGETS)
    for name in methods:
        assert_scaled_close(b.patch_maps[name].numpy(), a.patch_maps[name].numpy(), rel=1e-9)


def test_lrp_gelu_gets_the_identity_rule():
    """With F.gelu as the layer's plain-function activation, AttnLRP differs from the plain gradient
    rule only by the identity rule: checked by the reference above; here, that the swap is undone."""
    module = user_vit(depth=1)
    layer = module.encoder.layers[0]
    before = dict(layer.__dict__)
    vitlens.explain(vitlens.load_model(module), torch.randn(1, 3, 32, 32, dtype=torch.float64), methods=["attnlrp"])
    assert layer.activation is F.gelu and layer.__dict__.keys() == before.keys()
    assert all(layer.__dict__[k] is v for k, v in before.items())


# --------------------------------------------------------------------------------------------------
# 3. the model is an attention model and comes back exactly as it was given
# --------------------------------------------------------------------------------------------------

def test_detected_as_attention_model_not_cnn():
    module = user_vit()
    assert is_cnn(module)  # it has a Conv2d ...
    assert find_family(module, "image").name == "torch-attention"  # ... but attention is checked first
    model = vitlens.load_model(module)
    assert model.has_attention and model.family == "torch-attention"
    assert "rollout" in vitlens.explain(model, torch.randn(1, 3, 32, 32, dtype=torch.float64),
                                        methods=["rollout"]).patch_maps


def _snapshot(module):
    return {name: (sorted(m.__dict__), {k: m.__dict__[k] for k in ("activation", "activation_relu_or_gelu",
                                                                   "use_nested_tensor") if k in m.__dict__},
                   m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks), "forward" in m.__dict__)
            for name, m in module.named_modules()}


def test_model_returned_exactly_as_given():
    module = user_vit(norm_first=False, batch_first=False, final_norm=None)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    model = vitlens.load_model(module)
    assert model.module is module
    module.encoder.layers[1].train()  # a mixed mode of the user's own: restored after every call
    before = _snapshot(module)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    vitlens.explain(model, x, methods="all")
    vitlens.explain(model, x, methods=["attention"])  # no gradients: the fused paths would run if not turned off
    vitlens.explain(model, x, methods=["cp-lrp", "gradcam"])
    assert _snapshot(module) == before
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in module.parameters())


def test_fast_paths_are_turned_off_only_during_capture():
    """Without grad the encoder layer's fused C++ path would skip self_attn.forward: all 3 layers are captured."""
    module = user_vit()
    model = vitlens.load_model(module)
    recorder = vitlens.models.AttentionRecorder()
    with torch.no_grad(), model.eval_mode(), model.capture(recorder):
        assert all(layer.activation_relu_or_gelu == 0 for layer in module.encoder.layers)
        model.logits(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert len(recorder.attentions) == 3
    assert all(layer.activation_relu_or_gelu == 2 for layer in module.encoder.layers)


# --------------------------------------------------------------------------------------------------
# 4. the model's own preprocessing: a 32x32 model end to end from PIL images
# --------------------------------------------------------------------------------------------------

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _photo(size, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_own_preprocessing_end_to_end_from_pil():
    module = user_vit(pool="mean", cls_token=False).float()
    model = vitlens.load_model(module, input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, interpolation="bicubic")
    assert model.preprocess.input_size == (32, 32) and model.preprocess.mean == CIFAR_MEAN
    images = [_photo((32, 32), 1), _photo((40, 30), 2)]
    result = vitlens.explain(model, images, methods=["rollout", "gmar++", "legrad", "gradcam", "attnlrp"])
    assert result.patch_maps["rollout"].shape == (2, 1, 4, 4)
    # the logits are those of the model on the images preprocessed by hand with its own statistics
    manual = []
    for image in images:
        w, h = image.size
        scale = 32 / min(w, h)  # shorter side to 32 (no crop margin for a model of one's own), centre crop
        resized = image.resize((max(32, int(w * scale)), max(32, int(h * scale))), Image.Resampling.BICUBIC)
        left, top = round((resized.width - 32) / 2), round((resized.height - 32) / 2)
        array = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255
        manual.append((torch.from_numpy(array).permute(2, 0, 1) - torch.tensor(CIFAR_MEAN).view(3, 1, 1))
                      / torch.tensor(CIFAR_STD).view(3, 1, 1))
    with torch.no_grad():
        expected = module(torch.stack(manual)).softmax(-1)
    torch.testing.assert_close(result.probabilities, expected, rtol=0, atol=1e-5)
    assert (result.probabilities[0] - result.probabilities[1]).abs().max() > 1e-3  # two different images


def test_default_input_size_from_position_embedding():
    assert vitlens.load_model(user_vit(img=48, patch=8)).preprocess.input_size == (48, 48)
    assert vitlens.load_model(user_vit(img=48, patch=8, cls_token=False, pool="mean")).preprocess.input_size == (48, 48)


def test_forward_failing_at_the_default_size_is_one_line_error():
    module = user_vit()
    pos = module.pos_embed.detach()
    del module.pos_embed
    module.register_buffer("pos_embed", pos)  # not a parameter: no size can be read off it -> 224
    with pytest.raises(ModelError, match="fails on a 224x224 input.*pass input_size=") as info:
        vitlens.load_model(module)
    assert "\n" not in str(info.value)
    assert vitlens.load_model(module, input_size=32).num_layers == 3


def test_wrong_input_size_is_one_line_error():
    model = vitlens.load_model(user_vit())
    with pytest.raises(ModelError, match="loaded for 32x32: pass input_size="):
        vitlens.explain(model, torch.randn(1, 3, 48, 48, dtype=torch.float64), methods=["rollout"])


# --------------------------------------------------------------------------------------------------
# 5. attention_layers=: a custom attention module (not MHA), patterns, errors
# --------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """timm-style attention written by a user: softmax, then dropout applied to the probabilities."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(self.softmax(q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5))
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)), attn


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class CustomViT(nn.Module):
    def __init__(self, dim=16, depth=2, heads=2, classes=4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.5)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(t))[:, 0])


@pytest.mark.parametrize("pattern", ["blocks.*.attn.attn_drop", "blocks.*.attn.softmax"])
def test_named_custom_attention_captures_the_softmax_output(pattern):
    torch.manual_seed(0)
    module = CustomViT().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    seen = []
    handles = [b.attn.softmax.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
               for b in module.blocks]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    model = vitlens.load_model(module, attention_layers=[pattern])
    assert model.family == "torch-attention" and model.num_layers == 2 and model.num_prefix_tokens == 1
    assert model.survey.head is not None and model.block_norm_names() == ["blocks.0.norm1", "blocks.1.norm1"]
    result = vitlens.explain(model, x, methods=["attention", "rollout", "legrad", "chefer", "gradcam"], target=[0, 1])
    expected = ref_rollout([a.numpy() for a in seen], grid=GRID)
    assert_scaled_close(result.patch_maps["rollout"][:, 0].numpy(), expected)
    assert_scaled_close(result.patch_maps["attention"][:, 0].numpy(), ref_attention([a.numpy() for a in seen],
                                                                                    grid=GRID))
    # LRP cannot put its rule on a hooked module's Q K^T and A V: refused, one line
    with pytest.raises(MethodError, match="hooked module") as info:
        vitlens.explain(model, x, methods=["attnlrp"])
    assert "\n" not in str(info.value)
    assert not module.blocks[0].attn.attn_drop._forward_hooks  # hooks gone
    # 'all' means what this model can run: everything but the LRP methods
    everything = vitlens.explain(model, x, methods="all")
    assert "attnlrp" not in everything.methods and {"rollout", "legrad", "gradcam"} <= set(everything.methods)


def test_named_mha_and_comma_separated_patterns():
    module = user_vit()
    model = vitlens.load_model(module, attention_layers="encoder.layers.0.self_attn, encoder.layers.2.self_attn")
    assert model.survey.calls == ["encoder.layers.0.self_attn", "encoder.layers.2.self_attn"]


def test_pattern_matching_nothing_is_one_line_error():
    with pytest.raises(ModelError, match="matches no module.*candidates: .*encoder.layers.0.self_attn") as info:
        vitlens.load_model(user_vit(), attention_layers=["encoder.layer.*.attention"])
    assert "\n" not in str(info.value)


def test_named_module_without_probabilities_is_one_line_error():
    with pytest.raises(ModelError, match="'blocks.0.attn.qkv' outputs a tensor of shape .*not the attention"):
        vitlens.load_model(CustomViT(), attention_layers=["blocks.*.attn.qkv"])


def test_no_attention_is_one_line_error():
    convnet = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ModelError, match="has no nn.MultiheadAttention: name its attention layers"):
        vitlens.load_model(convnet, readout="cls")


def test_legrad_refused_when_the_head_cannot_be_traced():
    class Squashed(UserViT):  # a tanh between the pooled token and the head: no candidate reproduces the logits
        def pool_and_head(self, t):
            return self.head(torch.tanh(t[:, 0]))

    torch.manual_seed(0)
    model = vitlens.load_model(Squashed().double().eval())
    assert model.survey.head is None and model.survey.readout == "cls"
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert vitlens.explain(model, x, methods=["rollout", "chefer"]).patch_maps["rollout"].shape == (1, 1, 4, 4)
    with pytest.raises(MethodError, match="LeGrad cannot score the blocks of Squashed.*reproduces the logits"):
        vitlens.explain(model, x, methods=["legrad"])
    assert "legrad" not in vitlens.explain(model, x, methods="all").methods  # 'all' leaves it out


def test_readout_given_explicitly():
    module = user_vit(pool="mean", cls_token=True)
    assert vitlens.load_model(module).survey.readout == "mean"
    model = vitlens.load_model(module, readout="cls")  # what the user says is what rollout reads
    assert model.survey.readout == "cls" and model.survey.head is None
    with pytest.raises(ModelError, match="unknown readout 'token'"):
        vitlens.load_model(module, readout="token")


# --------------------------------------------------------------------------------------------------
# 6. the command line: the preprocessing options apply to any spec
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def test_vit_weights(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False).eval().state_dict(), path)
    return path


def test_cli_preprocessing_options(tmp_path, capsys, test_vit_weights):
    import json

    from vitlens import cli

    image = tmp_path / "a.png"
    _photo((50, 40), 3).save(image)
    out = tmp_path / "out"
    model = ["--model", "timm:test_vit", "--weights", str(test_vit_weights)]
    code = cli.main(["explain", str(image), *model, "--input-size", "160", "--mean", "0.5,0.4,0.3", "--std", "0.25",
                     "--interpolation", "bicubic", "--methods", "rollout", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    pre = json.dumps(manifest)
    assert '"mean": [0.5, 0.4, 0.3]' in pre and '"std": [0.25, 0.25, 0.25]' in pre and '"bicubic"' in pre
    for args, fragment in ((["--input-size", "0"], "must be one positive int"),
                           (["--std", "0,1,1"], "must be finite and > 0"),
                           (["--interpolation", "cubic"], "unknown interpolation"),
                           (["--attention-layers", "encoder.*.attention"], "matches no module")):
        capsys.readouterr()
        code = cli.main(["explain", str(image), *model, *args, "--methods", "rollout", "--out", str(tmp_path / "x"),
                         "--quiet"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and fragment in lines[0], err


def test_input_size_that_a_fixed_size_model_cannot_take():
    from tests.conftest import tiny_torchvision_vit

    with pytest.raises(ModelError, match="input_size 48x48 does not fit the model, which takes 32x32"):
        vitlens.load_model(tiny_torchvision_vit(), input_size=48)
    model = vitlens.load_model(tiny_torchvision_vit(), mean=0.5, std=(0.2, 0.3, 0.4))
    assert model.family == "torchvision" and model.preprocess.mean == (0.5, 0.5, 0.5)
    assert model.preprocess.std == (0.2, 0.3, 0.4) and model.preprocess.input_size == (32, 32)


def test_readout_math_helpers_agree():
    # the readout of the general restatement is not vacuous: a mean readout gives another map
    A = [np.random.default_rng(0).dirichlet(np.ones(17), size=(1, 2, 17))]
    w_cls, w_mean = readout_vector("cls", 1, 17), readout_vector("mean", 1, 17)
    cap = {"A": A, "G": None}
    assert np.abs(general_reference("rollout", {}, cap, w_cls, 1, GRID)
                  - general_reference("rollout", {}, cap, w_mean, 1, GRID)).max() > 1e-3
    assert math.isclose(w_mean.sum(), 1.0)
