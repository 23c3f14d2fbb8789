"""timm BEiT (v1 / v2) read by its own adapter, every method checked in float64 against computations without vitlens.

Tiny random-init ``beit_*`` / ``beitv2_*`` models (32x32 input, 8x8 patches) with O(1) weights, relative
position bias tables, q/v biases and layer-scale gammas, so that the bias really shapes the attention.
Attention probabilities and their gradients are captured as tests/methods/test_methods_reference.py does
for timm ViTs: a deep copy with ``fused_attn = False``, forward hooks on each block's ``attn.attn_drop``
(the tensor that multiplies the values), plain autograd. The method formulas are
tests/methods/general_reference.py's (test_methods_reference.py's with a general readout: BEiT pools the
mean of the patch tokens by default), checked equal to test_methods_reference.py's own on a CLS readout.
AttnLRP / CP-LRP are checked against an explicit relevance propagation written with
tests/lrp/test_lrp_reference.py's ``lrp_linear`` / ``lrp_layer_norm``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from tests.lrp.test_lrp_reference import lrp_layer_norm, lrp_linear
from tests.methods.general_reference import (CASES, general_reference, readout_vector)
from tests.methods.test_methods_reference import assert_scaled_close, reference
from tests.models.family_checks import (check_batched_equals_alone, check_bystander_untouched, check_gradcam_formula,
                                        check_gradient_checkpointing_restored, check_lrp_against_reference,
                                        check_module_as_given, explain_one)
from vitlens.engine import run_batch
from vitlens.errors import ModelError
from vitlens.models import AttentionRecorder
from vitlens.models.cnn import is_cnn
from vitlens.models.registry import find_family
from vitlens.models.timm_beit import TimmBeit, is_timm_beit
from vitlens.models.timm_vit import is_timm_vit

TARGETS = [3, 7]
GRID = (4, 4)
N = 1 + 16  # class token + 4x4 patches


def tiny_beit(seed=0, name="beit_base_patch16_224", unit_scale=True, **kwargs):
    """A small timm BEiT in float64, eval mode; ``unit_scale``: O(1) weights, biases, tables and gammas."""
    import timm

    torch.manual_seed(seed)
    options = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=10)
    options.update(kwargs)
    module = timm.create_model(name, pretrained=False, **options)
    if unit_scale:  # timm zero-initialises the tables and q/v biases and scales the head by 1e-3
        with torch.no_grad():
            for pname, p in module.named_parameters():
                if "relative_position_bias_table" in pname:
                    p.normal_(std=1.0)
                elif pname.split(".")[-1] in ("gamma_1", "gamma_2"):
                    p.uniform_(0.5, 1.5)
                elif pname.endswith("bias"):  # Linear, LayerNorm, q_bias, v_bias
                    p.normal_(std=0.1)
                elif pname == "cls_token":
                    p.normal_()
                elif pname == "pos_embed":
                    p.normal_(std=0.5)
                elif p.dim() >= 2:
                    p.normal_(std=p[0].numel() ** -0.5)
    return module.double().eval()


MODELS = {
    # BEiT v1: a relative position bias per block, layer scale, mean of the patch tokens -> fc_norm -> head
    "beit-avg": dict(name="beit_base_patch16_224"),
    # BEiT v2 with one bias shared by all blocks and an absolute position embedding
    "beitv2-shared": dict(name="beitv2_base_patch16_224", use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                          use_abs_pos_emb=True),
    # both biases, no layer scale, class-token pooling through the final norm
    "beit-token": dict(name="beit_base_patch16_224", global_pool="token", use_shared_rel_pos_bias=True,
                       init_values=None),
}


# --------------------------------------------------------------------------------------------------
# independent capture (no vitlens code)
# --------------------------------------------------------------------------------------------------

def pooled_logits(m, z):
    """The model's classifier on a (B, N, C) stream, written out: final norm, pooling, fc_norm, head."""
    n = m.norm(z)
    pooled = n[:, 1:].mean(dim=1) if m.global_pool == "avg" else n[:, 0]
    return m.head(m.fc_norm(pooled))


def mean_logits(m, z):
    """LeGrad's 'mean' score: the mean of ALL tokens through the final norm(s) and the head."""
    return m.head(m.fc_norm(m.norm(z.mean(dim=1))))


def reference_capture(module, x, targets, cam_layer=None):
    m = copy.deepcopy(module).eval()
    attentions, outputs, handles, cam = [], [], [], []

    def attn_hook(mod, inputs, output):
        output.retain_grad()
        attentions.append(output)

    for blk in m.blocks:
        if hasattr(blk.attn, "fused_attn"):
            blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(attn_hook))
        handles.append(blk.register_forward_hook(lambda mod, i, o: outputs.append(o)))
    if cam_layer is not None:
        handles.append(m.get_submodule(cam_layer).register_forward_hook(lambda mod, i, o: cam.append(o)))
    logits = m(x)
    assert len(attentions) == len(outputs) == len(m.blocks)
    t = torch.tensor(targets).view(-1, 1)
    # the plain backward first: a retain_grad() tensor also accumulates into .grad during the
    # autograd.grad calls below that pass through it
    score = logits.gather(1, t).sum()
    score.backward(retain_graph=True)
    grads = [a.grad.detach().numpy().copy() for a in attentions]
    cam_grad = torch.autograd.grad(score, cam, retain_graph=True)[0] if cam else None
    layer_grads = {}
    for layer, (z, a) in enumerate(zip(outputs, attentions)):
        for pool, read in (("model", pooled_logits), ("mean", mean_logits)):
            s = read(m, z).gather(1, t).sum()
            layer_grads[(pool, layer)] = torch.autograd.grad(s, a, retain_graph=True)[0].numpy().copy()
    # the written-out classifier is the model's own
    assert torch.allclose(pooled_logits(m, outputs[-1]), logits, atol=1e-12, rtol=0)
    for h in handles:
        h.remove()
    return {"A": [a.detach().numpy().copy() for a in attentions], "G": grads, "LG": layer_grads,
            "logits": logits.detach(), "cam": (cam[0].detach(), cam_grad.detach()) if cam else None}


# --------------------------------------------------------------------------------------------------
# 1. the family, its facts, capture
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def setup(request):
    module = tiny_beit(seed=len(request.param), **MODELS[request.param])
    x = torch.randn(len(TARGETS), 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cap = reference_capture(module, x, TARGETS, cam_layer="blocks.2.norm1")
    return {"module": module, "model": vitlens.load_model(copy.deepcopy(module)), "x": x, "cap": cap,
            "pool": module.global_pool}


def test_family_and_facts(setup):
    model, module = setup["model"], setup["module"]
    assert isinstance(model, TimmBeit) and model.family == "timm-beit"
    assert is_timm_beit(module) and not is_timm_vit(module)
    assert is_cnn(module)  # the Conv2d patch embedding: why BEiT used to fall to the CNN adapter
    assert find_family(module, "image").name == "timm-beit"
    assert model.num_layers == 3 and model.num_classes == 10 and model.num_prefix_tokens == 1
    assert model.patch_size == (8, 8) and model.grid((32, 32)) == GRID and model.fixed_input_size() == (32, 32)
    assert model.block_norm_names() == ["blocks.0.norm1", "blocks.1.norm1", "blocks.2.norm1"]
    assert model.default_cam_layers() == ["blocks.2.norm1"]
    np.testing.assert_array_equal(model.readout_weights(N, dtype=torch.float64).numpy(),
                                  readout_vector(setup["pool"], 1, N))
    # timm's preprocessing: the pretrained config's statistics (v1: 0.5, v2: ImageNet), the model's own size
    expected_mean = (0.485, 0.456, 0.406) if "v2" in module.pretrained_cfg["architecture"] else (0.5, 0.5, 0.5)
    assert model.preprocess.input_size == (32, 32) and model.preprocess.mean == expected_mean
    assert model.preprocess.interpolation == "bicubic" and model.preprocess.crop_pct == 0.9


@pytest.mark.parametrize("grad", [True, False])
def test_capture_keeps_the_logits_and_records_the_models_own_probabilities(setup, grad):
    model, x, cap = setup["model"], setup["x"], setup["cap"]
    assert all(block.attn.fused_attn for block in model.module.blocks)  # timm's default: SDPA, no probabilities
    with torch.no_grad():
        plain = model.logits(x)
    torch.testing.assert_close(plain, cap["logits"], rtol=0, atol=1e-10)  # fused SDPA vs the explicit path
    recorder = AttentionRecorder()
    with torch.set_grad_enabled(grad), model.capture(recorder):
        captured = model.logits(x)
    assert (captured - plain).abs().max() <= 1e-10
    assert len(recorder.attentions) == 3
    for mine, theirs in zip(recorder.attentions, cap["A"]):
        assert mine.shape == (2, 4, N, N)
        np.testing.assert_allclose(mine.detach().numpy(), theirs, rtol=0, atol=1e-12)


def test_the_relative_position_bias_shapes_the_attention(setup):
    """Not vacuous: without its bias tables the same model attends differently."""
    module = copy.deepcopy(setup["module"])
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if "relative_position_bias_table" in pname:
                p.zero_()
    recorder = AttentionRecorder()
    model = vitlens.load_model(module)
    with torch.no_grad(), model.capture(recorder):
        model.logits(setup["x"])
    assert np.abs(recorder.attentions[0].numpy() - setup["cap"]["A"][0]).max() > 0.05


# --------------------------------------------------------------------------------------------------
# 2. every attention method == the independent float64 computation
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}".replace(" ", "") for m, p in CASES])
def test_matches_independent_float64_reference(setup, method, params):
    cap = setup["cap"]
    actual, full = explain_one(setup["model"], setup["x"], method, params, TARGETS, GRID)
    expected = general_reference(method, full, cap, readout_vector(setup["pool"], 1, N))
    assert_scaled_close(actual.numpy(), expected)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3 * np.abs(expected).max()  # two images, two maps
    if setup["pool"] == "token":
        # the restatement is test_methods_reference.py's own formula on a CLS readout
        assert_scaled_close(expected, reference(method, full, cap), rel=1e-12)
    elif method not in ("legrad", "attention"):
        # and the readout matters: the CLS row would give another map
        other = general_reference(method, full, cap, readout_vector("cls", 1, N))
        assert np.abs(other - expected).max() > 1e-3 * np.abs(expected).max()


def test_reference_capture_is_not_degenerate(setup):
    cap = setup["cap"]
    for a, g in zip(cap["A"], cap["G"]):
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-12)
        assert (g > 0).any() and (g < 0).any()
    # LeGrad's last-layer 'model' score is the logit itself; earlier layers and 'mean' differ
    np.testing.assert_allclose(cap["LG"][("model", 2)], cap["G"][2], atol=1e-12)
    assert np.abs(cap["LG"][("model", 0)] - cap["G"][0]).max() > 1e-6
    assert np.abs(cap["LG"][("mean", 2)] - cap["G"][2]).max() > 1e-6


def test_gradcam_default_layer_matches_hooks(setup):
    """Grad-CAM on the last block's norm1 (patch tokens on the grid) == the formula on hooked tensors."""
    check_gradcam_formula(setup["model"], setup["x"], TARGETS, setup["cap"]["cam"], GRID)


# --------------------------------------------------------------------------------------------------
# 3. batches, the model as given
# --------------------------------------------------------------------------------------------------

ALL = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "gradcam", "attnlrp", "cp-lrp"]


def test_batched_equals_one_at_a_time(setup):
    check_batched_equals_alone(setup["model"], setup["x"], ALL)


# what timm's blocks may carry besides parameters and modes: restored after every call
TIMM_FLAGS = (lambda m: getattr(m, "fused_attn", None), lambda m: getattr(m, "grad_checkpointing", None))


def test_model_returned_exactly_as_given():
    module = tiny_beit(seed=3, **MODELS["beitv2-shared"])
    state = {k: v.clone() for k, v in module.state_dict().items()}
    model = vitlens.load_model(module)
    assert model.module is module
    module.blocks[1].train()  # a mixed mode of the user's own: restored after every call
    check_module_as_given(model, module, state, *TIMM_FLAGS, also=[["cp-lrp", "gradcam"]])


def test_gradient_checkpointing_is_off_only_during_the_call():
    check_gradient_checkpointing_restored(tiny_beit(seed=4), ["rollout", "chefer", "legrad", "attnlrp"])


def test_another_beit_inside_the_capture_is_untouched():
    check_bystander_untouched(vitlens.load_model(tiny_beit(seed=0)), tiny_beit(seed=1))


# --------------------------------------------------------------------------------------------------
# 4. AttnLRP / CP-LRP
# --------------------------------------------------------------------------------------------------

def _rel_pos_bias(table, index, n):
    """(heads, n, n) bias read from a relative position table, as BEiT defines it."""
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


def reference_relevance(m, x, target, variant, conv_gamma, lin_gamma):
    """Pixel relevance (H, W) of one image for a one-block BEiT, every rule written out (no autograd)."""
    p = m.patch_embed.proj
    C, k = p.out_channels, p.kernel_size[0]
    blk = m.blocks[0]
    attn = blk.attn
    K = attn.num_heads
    d = C // K

    def norm(t, module):
        return F.layer_norm(t, (C,), module.weight, module.bias, module.eps)

    # --- forward ---------------------------------------------------------------------------------
    patches = F.unfold(x[None], kernel_size=k, stride=k)[0].T
    Wc = p.weight.reshape(C, -1)
    t0 = patches @ Wc.T + p.bias
    tokens = torch.cat([m.cls_token[0], t0])
    if m.pos_embed is not None:
        tokens = tokens + m.pos_embed[0]
    n_tok = tokens.shape[0]
    h1 = norm(tokens, blk.norm1)
    qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    qkv = h1 @ attn.qkv.weight.T + qkv_bias
    q, kk, v = qkv.reshape(n_tok, 3, K, d).permute(1, 2, 0, 3)
    s = (q * attn.scale) @ kk.transpose(-1, -2)
    bias = torch.zeros_like(s)
    if attn.relative_position_bias_table is not None:
        bias = bias + _rel_pos_bias(attn.relative_position_bias_table, attn.relative_position_index, n_tok)
    if m.rel_pos_bias is not None:
        bias = bias + _rel_pos_bias(m.rel_pos_bias.relative_position_bias_table,
                                    m.rel_pos_bias.relative_position_index, n_tok)
    z = s + bias
    A = z.softmax(-1)
    o = A @ v
    merged = o.permute(1, 0, 2).reshape(n_tok, C)
    proj = merged @ attn.proj.weight.T + attn.proj.bias
    g1 = blk.gamma_1 if blk.gamma_1 is not None else torch.ones(C, dtype=x.dtype)
    g2 = blk.gamma_2 if blk.gamma_2 is not None else torch.ones(C, dtype=x.dtype)
    scaled_proj = g1 * proj
    r1 = tokens + scaled_proj
    h2 = norm(r1, blk.norm2)
    f1 = h2 @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    a = F.gelu(f1)
    f2 = a @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    scaled_mlp = g2 * f2
    r2 = r1 + scaled_mlp
    final = m.norm if isinstance(m.norm, torch.nn.LayerNorm) else None
    nrm = norm(r2, final) if final is not None else r2
    pooled = nrm[1:].mean(0) if m.global_pool == "avg" else nrm[0]
    fc = m.fc_norm if isinstance(m.fc_norm, torch.nn.LayerNorm) else None
    u = norm(pooled, fc) if fc is not None else pooled
    logits = u @ m.head.weight.T + m.head.bias
    # --- relevance ---------------------------------------------------------------------------------
    R_logits = torch.zeros_like(logits)
    R_logits[target] = logits[target]
    R_u = lrp_linear(u[None], m.head.weight, m.head.bias, R_logits[None], lin_gamma)[0]
    R_pooled = lrp_layer_norm(pooled[None], fc, R_u[None])[0] if fc is not None else R_u
    R_n = torch.zeros_like(nrm)
    if m.global_pool == "avg":  # z-rule through the mean of the patch tokens
        R_n[1:] = nrm[1:] / (n_tok - 1) / pooled * R_pooled
    else:
        R_n[0] = R_pooled
    R_r2 = lrp_layer_norm(r2, final, R_n) if final is not None else R_n
    R_r1 = r1 / r2 * R_r2  # z-rule at the residual sum
    R_f2 = scaled_mlp / r2 * R_r2  # the layer scale (a constant factor) passes relevance unchanged
    R_a = lrp_linear(a, blk.mlp.fc2.weight, blk.mlp.fc2.bias, R_f2, lin_gamma)
    R_h2 = lrp_linear(h2, blk.mlp.fc1.weight, blk.mlp.fc1.bias, R_a, lin_gamma)  # identity rule on GELU
    R_r1 = R_r1 + lrp_layer_norm(r1, blk.norm2, R_h2)
    R_tokens, R_proj = tokens / r1 * R_r1, scaled_proj / r1 * R_r1
    R_merged = lrp_linear(merged, attn.proj.weight, attn.proj.bias, R_proj, lin_gamma)
    R_o = R_merged.reshape(n_tok, K, d).permute(1, 0, 2)
    contrib = A[..., None] * v[:, None, :, :] * (R_o / o)[:, :, None, :]  # o = A v: (K, N_i, N_j, d)
    if variant == "cp-lrp":
        R_q, R_k, R_v = torch.zeros_like(q), torch.zeros_like(kk), contrib.sum(dim=1)
    else:
        R_v = 0.5 * contrib.sum(dim=1)  # uniform rule on A V
        R_A = 0.5 * contrib.sum(dim=-1)
        R_z = z * (R_A - A * R_A.sum(-1, keepdim=True))  # softmax rule on the biased scores
        R_s = s / z * R_z  # z-rule at s + bias: the bias (a constant) absorbs its share
        c2 = (q * attn.scale)[:, :, None, :] * kk[:, None, :, :] * (R_s / s)[..., None]
        R_q, R_k = 0.5 * c2.sum(dim=2), 0.5 * c2.sum(dim=1)  # uniform rule on Q K^T
    R_qkv = torch.stack([R_q, R_k, R_v]).permute(2, 0, 1, 3).reshape(n_tok, 3 * C)
    R_h1 = lrp_linear(h1, attn.qkv.weight, qkv_bias, R_qkv, lin_gamma)
    R_tokens = R_tokens + lrp_layer_norm(tokens, blk.norm1, R_h1)
    R_t0 = t0 / tokens[1:] * R_tokens[1:]  # the position embedding (a constant) absorbs its share
    R_patches = lrp_linear(patches, Wc, p.bias, R_t0, conv_gamma)
    folded = F.fold(R_patches.T[None], output_size=x.shape[-2:], kernel_size=k, stride=k)[0]
    return folded.sum(0), logits


ONE_BLOCK = {
    "avg-both-biases": dict(name="beit_base_patch16_224", use_shared_rel_pos_bias=True, use_abs_pos_emb=True),
    "token-no-layer-scale": dict(name="beitv2_base_patch16_224", global_pool="token", init_values=None),
}


@pytest.fixture(scope="module", params=list(ONE_BLOCK), ids=list(ONE_BLOCK))
def one_block(request):
    return tiny_beit(seed=7, img_size=16, depth=1, **ONE_BLOCK[request.param])


@pytest.mark.parametrize("variant", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("conv_gamma, lin_gamma", [(0.0, 0.0), (1.0, 0.5)])
def test_lrp_matches_explicit_relevance_propagation(one_block, variant, conv_gamma, lin_gamma):
    # min_scale: the Gamma rules give maps of ~1e-3 here
    check_lrp_against_reference(one_block, reference_relevance, variant, conv_gamma, lin_gamma, min_scale=1e-4)


def _without_additive_constants(module):
    """Zero every bias (q/v biases included), the class token and the position embedding.

    The relative position bias tables stay: CP-LRP holds the attention weights constant, so a bias
    on the scores has nothing to absorb.
    """
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if pname.endswith("bias") or pname in ("cls_token", "pos_embed"):
                p.zero_()
    return module


@pytest.mark.parametrize("options", [MODELS["beit-avg"], MODELS["beit-token"],
                                     dict(name="beitv2_base_patch16_224", swiglu_mlp=True, scale_mlp=True)],
                         ids=["beit-avg", "beit-token", "swiglu"])
def test_cp_lrp_conserves_the_target_logit(options):
    module = _without_additive_constants(tiny_beit(seed=6, **options))
    assert any(p.abs().max() > 0.1 for n, p in module.named_parameters() if "relative_position_bias_table" in n)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = run_batch(vitlens.load_model(module), x, {"cp-lrp": {"conv_gamma": 0.0, "lin_gamma": 0.0}},
                       target="top2")
    sums, logits = result.extras["cp-lrp"]["relevance_sum"], result.extras["cp-lrp"]["target_logit"]
    assert torch.allclose(result.patch_maps["cp-lrp"].flatten(2).sum(-1), sums, rtol=1e-12, atol=0)
    assert logits.abs().min() > 1e-2
    assert ((sums - logits).abs() / logits.abs()).max() <= 1e-6


def test_attnlrp_absorbs_a_share_by_design():
    """AttnLRP's softmax rule is not conservative (tests/lrp/test_lrp.py): the sum is reported beside the logit."""
    module = _without_additive_constants(tiny_beit(seed=6))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = run_batch(vitlens.load_model(module), x, {"attnlrp": {"conv_gamma": 0.0, "lin_gamma": 0.0}}, target=0)
    share = result.extras["attnlrp"]["relevance_sum"] / result.extras["attnlrp"]["target_logit"]
    assert torch.isfinite(share).all() and not torch.allclose(share, torch.ones_like(share), atol=1e-3)


# --------------------------------------------------------------------------------------------------
# 5. what is refused, in one line
# --------------------------------------------------------------------------------------------------

def _one_line_error(build, match, **load_options):
    with pytest.raises(ModelError, match=match) as info:
        vitlens.load_model(build(), **load_options)
    assert "\n" not in str(info.value)


def test_no_pooling_is_refused():
    _one_line_error(lambda: tiny_beit(global_pool=""), r"global_pool='' is not supported: vitlens supports avg, token")


def test_own_attention_forward_is_refused():
    from timm.models.beit import Attention

    class LoggingAttention(Attention):
        def forward(self, x, shared_rel_pos_bias=None):
            return super().forward(x, shared_rel_pos_bias)

    def build():
        module = tiny_beit()
        module.blocks[1].attn.__class__ = LoggingAttention
        return module

    _one_line_error(build, r"unsupported attention implementation .*LoggingAttention in block 1")


def test_overridden_head_is_refused():
    from timm.models.beit import Beit

    class Tanh(Beit):
        def forward_head(self, x, pre_logits=False):
            return torch.tanh(super().forward_head(x, pre_logits))

    def build():
        module = tiny_beit()
        module.__class__ = Tanh
        return module

    _one_line_error(build, r"unsupported BEiT variant Tanh: it overrides Beit.forward_head")


def test_input_size_is_fixed():
    _one_line_error(tiny_beit, "input_size 48x48 does not fit the model, which takes 32x32", input_size=48)
    model = vitlens.load_model(tiny_beit())
    with pytest.raises(ModelError, match="input of 48x48 pixels does not fit the model, which takes 32x32"):
        vitlens.explain(model, torch.randn(1, 3, 48, 48, dtype=torch.float64), methods=["rollout"])


def test_explain_from_a_pil_image_with_the_models_preprocessing():
    from PIL import Image

    module = tiny_beit(seed=2).float()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    result = vitlens.explain(module, [image], methods=["rollout", "legrad", "gradcam", "attnlrp"])
    assert result.patch_maps["rollout"].shape == (1, 1, *GRID) and result.maps["attnlrp"].shape == (1, 1, 32, 32)
    assert all(torch.isfinite(m).all() for m in result.patch_maps.values())
