"""timm EVA / EVA-02 (``timm.models.eva.Eva``: rotary embeddings, SwiGLU) read by the ``timm-eva`` family.

Every attention method is checked in float64 against an independent computation: attention
probabilities are read without any vitlens code, from timm's own unfused path (``fused_attn = False``
on a deep copy, a forward hook on ``attn.attn_drop``, which receives the softmax output), gradients
come from plain autograd, and the method formulas are those of tests/methods/test_methods_reference.py
restated for any readout and any number of prefix tokens (tests/methods/general_reference.py). AttnLRP /
CP-LRP are checked against an explicit relevance propagation through one EVA block whose forward (rotary
embedding included) is written out here and checked against the model's logits; CP-LRP conserves the
target logit of a model without additive constants.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from tests.lrp.test_lrp_reference import lrp_layer_norm, lrp_linear
from tests.methods.general_reference import CASES, general_reference, readout_vector, reference_params
from tests.methods.test_methods_reference import assert_scaled_close, reference
from tests.models.test_torch_attention import _attention_relevance
from tests.models.family_checks import check_lrp_against_reference
from vitlens.engine import run_batch
from vitlens.errors import ModelError
from vitlens.methods import REGISTRY
from vitlens.models import AttentionRecorder
from vitlens.models.cnn import is_cnn
from vitlens.models.registry import find_family

TARGETS = [3, 1]


def _unit_scale(module: torch.nn.Module) -> torch.nn.Module:
    """O(1) weights and biases (timm's init is std 0.02 with a 0.001 head: near-uniform attention, tiny logits)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(k in name for k in ("pos_embed", "cls_token", "reg_token")):
                p.normal_(std=0.5)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
            elif p.dim() >= 2:
                p.normal_(std=p[0].numel() ** -0.5)
            else:  # norm weights and layer scales (DINOv3 starts them at 1e-5: blocks would be near identity)
                p.normal_(mean=1.0, std=0.1)
    return module


def tiny_eva(seed=0, name="eva02_tiny_patch14_224", **kwargs):
    """A small random EVA in float64, eval mode, unit-scale weights."""
    import timm

    torch.manual_seed(seed)
    options = dict(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    options.update(kwargs)
    return _unit_scale(timm.create_model(name, pretrained=False, **options)).double().eval()


MODELS = {
    # EVA-02 as timm builds it: packed qkv with q/v biases, SwiGLU as GluMlp (packed fc1), interleaved
    # rotary embedding, mean of the patch tokens through fc_norm
    "eva02-avg": dict(),
    # EVA-02 base/large style: q/k/v projections, SwiGLU with an inner norm, plus q/k norms, an inner
    # attention norm, layer scale, half-rotation rope, class-token pooling through the final norm
    "eva02-token": dict(name="eva02_base_patch14_224", img_size=32, patch_size=8, num_heads=4, global_pool="token",
                        qk_norm=True, scale_attn_inner=True, init_values=0.5, rope_rotate_half=True),
    # DINOv3 on Eva: class + 4 register tokens, its own rope, layer scale, dynamic input size
    "registers-dynamic": dict(name="vit_small_patch16_dinov3", img_size=32, patch_size=8),
}
#: pooling ('cls' or 'mean' of the patch tokens), prefix tokens, input size, patch grid
FACTS = {"eva02-avg": ("mean", 1, (28, 28), (4, 4)), "eva02-token": ("cls", 1, (32, 32), (4, 4)),
         "registers-dynamic": ("mean", 5, (32, 40), (4, 5))}


# --------------------------------------------------------------------------------------------------
# independent capture: timm's unfused attention, hooks and plain autograd (no vitlens code)
# --------------------------------------------------------------------------------------------------

def _pooled_logits(m, z, pool, prefix):
    """Final norm, the model's pooling (restated), fc_norm and head on a (B, N, C) stream."""
    n = m.norm(z)
    pooled = n[:, 0] if pool == "cls" else n[:, prefix:].mean(dim=1)
    return m.head(m.fc_norm(pooled))


def reference_capture(module, x, targets, pool, prefix):
    m = copy.deepcopy(module).eval()
    attentions, outputs = [], []

    def attn_hook(mod, inputs, output):
        output.retain_grad()
        attentions.append(output)

    for blk in m.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(attn_hook)
        blk.register_forward_hook(lambda mod, inputs, output: outputs.append(output))
    logits = m(x)
    assert len(attentions) == len(outputs) == len(m.blocks)
    t = torch.tensor(targets).view(-1, 1)
    # the plain backward first (a retain_grad() tensor would also accumulate the LeGrad calls below)
    logits.gather(1, t).sum().backward(retain_graph=True)
    grads = [a.grad.detach().numpy().copy() for a in attentions]
    layer_grads = {}
    for layer, (z, a) in enumerate(zip(outputs, attentions)):
        score_model = _pooled_logits(m, z, pool, prefix).gather(1, t).sum()
        # 'mean': the mean of ALL tokens -> norm -> fc_norm -> head (any token pooling reads that mean)
        score_mean = m.head(m.fc_norm(m.norm(z.mean(dim=1)))).gather(1, t).sum()
        layer_grads[("model", layer)] = torch.autograd.grad(score_model, a, retain_graph=True)[0].numpy().copy()
        layer_grads[("mean", layer)] = torch.autograd.grad(score_mean, a, retain_graph=True)[0].numpy().copy()
    assert torch.allclose(_pooled_logits(m, outputs[-1], pool, prefix), logits, rtol=0, atol=1e-12)
    return {"A": [a.detach().numpy().copy() for a in attentions], "G": grads, "LG": layer_grads,
            "logits": logits.detach()}


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def setup(request):
    name = request.param
    module = tiny_eva(seed=len(name), **MODELS[name])
    pool, prefix, size, grid = FACTS[name]
    x = torch.randn(len(TARGETS), 3, *size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cap = reference_capture(module, x, TARGETS, pool, prefix)
    model = vitlens.load_model(copy.deepcopy(module))
    return {"name": name, "module": module, "model": model, "x": x, "cap": cap, "pool": pool, "prefix": prefix,
            "grid": grid}


def test_facts_of_the_adapter(setup):
    model, name = setup["model"], setup["name"]
    pool, prefix, size, grid = FACTS[name]
    assert model.family == "timm-eva" and type(model).__name__ == "TimmEva"
    assert model.num_layers == 3 and model.num_classes == 10 and model.num_prefix_tokens == prefix
    assert model.grid(size) == grid
    assert model.block_norm_names() == ["blocks.0.norm1", "blocks.1.norm1", "blocks.2.norm1"]
    assert model.default_cam_layers() == ["blocks.2.norm1"]
    if name == "registers-dynamic":
        assert model.fixed_input_size() is None and model.grid((48, 32)) == (6, 4)
    else:
        assert model.fixed_input_size() == size == model.preprocess.input_size
        assert model.patch_size == (size[0] // 4, size[0] // 4)
    n = prefix + grid[0] * grid[1]
    weights = model.readout_weights(n, dtype=torch.float64).numpy()
    np.testing.assert_array_equal(weights, readout_vector(pool, prefix, n))


def test_capture_keeps_the_logits_and_records_timms_own_probabilities(setup):
    model, module, x, cap = setup["model"], setup["module"], setup["x"], setup["cap"]
    with torch.no_grad():
        plain = module(x)  # timm's fused path
    assert torch.allclose(plain, cap["logits"], rtol=0, atol=1e-10)
    recorder = AttentionRecorder(keep_block_outputs=True)
    with model.capture(recorder):
        logits = model.logits(x)
    assert (logits - plain).abs().max() <= 1e-10
    assert len(recorder.attentions) == len(recorder.block_outputs) == 3
    t = torch.tensor(TARGETS).view(-1, 1)
    grads = torch.autograd.grad(logits.gather(1, t).sum(), recorder.attentions, retain_graph=True)
    for mine, ref, grad, ref_grad in zip(recorder.attentions, cap["A"], grads, cap["G"]):
        np.testing.assert_allclose(mine.detach().numpy(), ref, rtol=0, atol=1e-12)
        assert_scaled_close(grad.numpy(), ref_grad, rel=1e-9)
    # LeGrad's read-out of the last block is the model's own logit; 'mean' reads something else
    assert (model.layer_logits(recorder.block_outputs[-1]) - plain).abs().max() <= 1e-10
    assert (model.layer_logits(recorder.block_outputs[-1], pool="mean") - plain).abs().max() > 1e-3


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}".replace(" ", "") for m, p in CASES])
def test_matches_independent_float64_reference(setup, method, params):
    cap, prefix, grid, pool = setup["cap"], setup["prefix"], setup["grid"], setup["pool"]
    result = vitlens.explain(setup["model"], setup["x"], methods=[method], target=TARGETS,
                             params={method: params} if params else None)
    actual = result.patch_maps[method][:, 0]
    assert actual.dtype == torch.float64 and actual.shape == (2, *grid)
    full = reference_params(method, REGISTRY[method].params(params))
    n = prefix + grid[0] * grid[1]
    expected = general_reference(method, full, cap, readout_vector(pool, prefix, n), prefix, grid)
    assert_scaled_close(actual.numpy(), expected)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3 * np.abs(expected).max()  # not degenerate
    if pool == "cls":  # one class token: test_methods_reference.py's own formulas apply as they are
        assert_scaled_close(expected, reference(method, dict(full, grid=grid), cap), rel=1e-12)


def test_reference_capture_is_not_degenerate(setup):
    cap = setup["cap"]
    for a, g in zip(cap["A"], cap["G"]):
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-12)
        assert a.max() > 2 * a.min() + 0.05  # attention is far from uniform
        assert (g > 0).any() and (g < 0).any()
    np.testing.assert_allclose(cap["LG"][("model", 2)], cap["G"][2], atol=1e-12)
    assert np.abs(cap["LG"][("model", 0)] - cap["G"][0]).max() > 1e-6


def test_gradcam_default_layer_is_the_last_norm1(setup):
    """Grad-CAM on blocks[-1].norm1 (prefix tokens dropped, patches on the grid) == the formula on hooked tensors."""
    module, x, prefix, grid = setup["module"], setup["x"], setup["prefix"], setup["grid"]
    m = copy.deepcopy(module)
    kept = []
    m.blocks[-1].norm1.register_forward_hook(lambda mod, inputs, output: kept.append(output))
    logits = m(x)
    (g,) = torch.autograd.grad(logits.gather(1, torch.tensor(TARGETS).view(-1, 1)).sum(), kept[0])
    a = kept[0][:, prefix:].detach().reshape(2, *grid, -1).permute(0, 3, 1, 2)
    g = g[:, prefix:].reshape(2, *grid, -1).permute(0, 3, 1, 2)
    expected = torch.einsum("bk,bkhw->bhw", g.mean(dim=(2, 3)), a).clamp_min(0)
    result = vitlens.explain(setup["model"], x, methods=["gradcam"], target=TARGETS)
    assert result.params["gradcam"]["layers"] in (None, "default", ["blocks.2.norm1"])
    assert_scaled_close(result.patch_maps["gradcam"][:, 0].numpy(), expected.numpy())


def test_batched_equals_one_at_a_time(setup):
    methods = ["rollout", "gmar-l2", "gmar++", "legrad", "chefer", "gradcam", "attnlrp", "cp-lrp"]
    model, x = setup["model"], setup["x"]
    batched = vitlens.explain(model, x, methods=methods, target=TARGETS)
    for i in range(2):
        alone = vitlens.explain(model, x[i:i + 1], methods=methods, target=TARGETS[i])
        for name in methods:
            assert_scaled_close(batched.patch_maps[name][i].numpy(), alone.patch_maps[name][0].numpy(), rel=1e-9)


# --------------------------------------------------------------------------------------------------
# AttnLRP / CP-LRP == an explicit relevance propagation through one EVA block (rules written out)
# --------------------------------------------------------------------------------------------------

def _rot(t, half):
    """timm's rotation partner of each channel: interleaved pairs (-x1, x0, -x3, x2, ...) or halves (-x2, x1)."""
    if half:
        h = t.shape[-1] // 2
        return torch.cat([-t[..., h:], t[..., :h]], dim=-1)
    out = torch.empty_like(t)
    out[..., 0::2], out[..., 1::2] = -t[..., 1::2], t[..., 0::2]
    return out


def _rot_transposed(t, half):
    """The transpose of the linear map ``_rot``."""
    if half:
        h = t.shape[-1] // 2
        return torch.cat([t[..., h:], -t[..., :h]], dim=-1)
    out = torch.empty_like(t)
    out[..., 0::2], out[..., 1::2] = t[..., 1::2], -t[..., 0::2]
    return out


def reference_relevance(m, x, target, variant, conv_gamma, lin_gamma):
    """Pixel relevance (H, W) of one image for a one-block EVA with one class token, every rule written out."""
    p = m.patch_embed.proj
    C, k = p.out_channels, p.kernel_size[0]
    blk, attn = m.blocks[0], m.blocks[0].attn
    K = attn.num_heads
    d = C // K
    half = attn.rotate_half

    def ln(t, module):
        return F.layer_norm(t, module.normalized_shape, module.weight, module.bias, module.eps)

    def norm_or_identity(t, module):
        return t if isinstance(module, torch.nn.Identity) else ln(t, module)

    def lrp_norm_or_identity(t, module, R):
        return R if isinstance(module, torch.nn.Identity) else lrp_layer_norm(t, module, R)

    # --- forward -----------------------------------------------------------------------------------
    patches = F.unfold(x[None], kernel_size=k, stride=k)[0].T
    Wc = p.weight.reshape(C, -1)
    t0 = patches @ Wc.T + p.bias
    tokens = torch.cat([m.cls_token[0], t0]) + m.pos_embed[0]
    N = tokens.shape[0]
    h1 = ln(tokens, blk.norm1)
    if attn.qkv is not None:
        qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        q, kk, v = (h1 @ attn.qkv.weight.T + qkv_bias).reshape(N, 3, K, d).permute(1, 2, 0, 3)
    else:
        def project(layer):
            out = h1 @ layer.weight.T + (layer.bias if layer.bias is not None else 0)
            return out.reshape(N, K, d).permute(1, 0, 2)

        q, kk, v = project(attn.q_proj), project(attn.k_proj), project(attn.v_proj)
    qn, kn = norm_or_identity(q, attn.q_norm), norm_or_identity(kk, attn.k_norm)
    sin, cos = m.rope.get_embed().chunk(2, dim=-1)  # (patches, d) each

    def rotate(t):  # the class token keeps its q and k
        return torch.cat([t[:, :1], t[:, 1:] * cos + _rot(t[:, 1:], half) * sin], dim=1)

    qr, kr = rotate(qn), rotate(kn)
    scale = d ** -0.5
    scores = (qr * scale) @ kr.transpose(-1, -2)
    A = scores.softmax(-1)
    merged = (A @ v).permute(1, 0, 2).reshape(N, C)
    mn = norm_or_identity(merged, attn.norm)
    proj = mn @ attn.proj.weight.T + attn.proj.bias
    s1 = proj * blk.gamma_1 if blk.gamma_1 is not None else proj
    r1 = tokens + s1
    h2 = ln(r1, blk.norm2)
    mlp = blk.mlp
    if type(mlp).__name__ == "GluMlp":  # act(first half) * second half, as EVA-02 builds it (gate_last=False)
        gate_in, value = (h2 @ mlp.fc1.weight.T + mlp.fc1.bias).chunk(2, dim=-1)
    else:  # SwiGLU
        gate_in, value = h2 @ mlp.fc1_g.weight.T + mlp.fc1_g.bias, h2 @ mlp.fc1_x.weight.T + mlp.fc1_x.bias
    hidden = F.silu(gate_in) * value
    hn = norm_or_identity(hidden, mlp.norm)
    f2 = hn @ mlp.fc2.weight.T + mlp.fc2.bias
    s2 = f2 * blk.gamma_2 if blk.gamma_2 is not None else f2
    r2 = r1 + s2
    n = norm_or_identity(r2, m.norm)
    pooled = n[0] if m.global_pool == "token" else n[1:].mean(0)
    fn = norm_or_identity(pooled, m.fc_norm)
    logits = fn @ m.head.weight.T + m.head.bias
    # --- relevance -----------------------------------------------------------------------------------
    R_logits = torch.zeros_like(logits)
    R_logits[target] = logits[target]
    R_fn = lrp_linear(fn[None], m.head.weight, m.head.bias, R_logits[None], lin_gamma)[0]
    R_pooled = lrp_norm_or_identity(pooled, m.fc_norm, R_fn)
    R_n = torch.zeros_like(n)
    if m.global_pool == "token":
        R_n[0] = R_pooled
    else:  # z-rule through the mean of the patch tokens
        R_n[1:] = n[1:] / (N - 1) / pooled * R_pooled
    R_r2 = lrp_norm_or_identity(r2, m.norm, R_n)
    R_r1, R_s2 = r1 / r2 * R_r2, s2 / r2 * R_r2  # z-rule at the residual sum; layer scale keeps relevance
    R_hn = lrp_linear(hn, mlp.fc2.weight, mlp.fc2.bias, R_s2, lin_gamma)
    R_hidden = lrp_norm_or_identity(hidden, mlp.norm, R_hn)
    R_gate_in = R_value = 0.5 * R_hidden  # uniform rule on the gate product, identity rule through SiLU
    if type(mlp).__name__ == "GluMlp":
        R_h2 = lrp_linear(h2, mlp.fc1.weight, mlp.fc1.bias, torch.cat([R_gate_in, R_value], dim=-1), lin_gamma)
    else:
        R_h2 = (lrp_linear(h2, mlp.fc1_g.weight, mlp.fc1_g.bias, R_gate_in, lin_gamma)
                + lrp_linear(h2, mlp.fc1_x.weight, mlp.fc1_x.bias, R_value, lin_gamma))
    R_r1 = R_r1 + lrp_layer_norm(r1, blk.norm2, R_h2)
    R_tokens, R_s1 = tokens / r1 * R_r1, s1 / r1 * R_r1
    R_mn = lrp_linear(mn, attn.proj.weight, attn.proj.bias, R_s1, lin_gamma)
    R_merged = lrp_norm_or_identity(merged, attn.norm, R_mn)
    R_o = R_merged.reshape(N, K, d).permute(1, 0, 2)
    R_qr, R_kr, R_v = _attention_relevance(qr, kr, v, A, scores, scale, R_o, variant)

    def unrotate(t, R):  # the rotation is linear: LRP-0 (the plain gradient), the class token unchanged
        g = R[:, 1:] / (t[:, 1:] * cos + _rot(t[:, 1:], half) * sin)
        return torch.cat([R[:, :1], t[:, 1:] * (g * cos + _rot_transposed(g * sin, half))], dim=1)

    R_q = lrp_norm_or_identity(q, attn.q_norm, unrotate(qn, R_qr))
    R_k = lrp_norm_or_identity(kk, attn.k_norm, unrotate(kn, R_kr))
    if attn.qkv is not None:
        R_qkv = torch.stack([R_q, R_k, R_v]).permute(2, 0, 1, 3).reshape(N, 3 * C)
        R_h1 = lrp_linear(h1, attn.qkv.weight, qkv_bias, R_qkv, lin_gamma)
    else:
        R_h1 = sum(lrp_linear(h1, layer.weight, layer.bias, R.permute(1, 0, 2).reshape(N, C), lin_gamma)
                   for layer, R in ((attn.q_proj, R_q), (attn.k_proj, R_k), (attn.v_proj, R_v)))
    R_tokens = R_tokens + lrp_layer_norm(tokens, blk.norm1, R_h1)
    R_t0 = t0 / tokens[1:] * R_tokens[1:]  # the position embedding absorbs its share
    R_patches = lrp_linear(patches, Wc, p.bias, R_t0, conv_gamma)
    folded = F.fold(R_patches.T[None], output_size=x.shape[-2:], kernel_size=k, stride=k)[0]
    return folded.sum(0), logits


ONE_BLOCK = {
    "glu-avg": dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=5),
    "swiglu-token": dict(name="eva02_base_patch14_224", img_size=16, patch_size=8, embed_dim=16, depth=1,
                         num_heads=2, num_classes=5, global_pool="token", qk_norm=True, scale_attn_inner=True,
                         init_values=0.5, rope_rotate_half=True),
}


@pytest.fixture(scope="module", params=list(ONE_BLOCK), ids=list(ONE_BLOCK))
def one_block(request):
    return tiny_eva(seed=7, **ONE_BLOCK[request.param])


@pytest.mark.parametrize("variant", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("conv_gamma, lin_gamma", [(0.0, 0.0), (1.0, 0.5)])
def test_lrp_matches_explicit_relevance_propagation(one_block, variant, conv_gamma, lin_gamma):
    # the written-out forward is EVA's own (logits_of)
    check_lrp_against_reference(one_block, reference_relevance, variant, conv_gamma, lin_gamma, min_scale=1e-6,
                                check_sum=False, logits_of=lambda module, x: module(x))


def _without_additive_constants(module):
    """Zero every bias and every added constant (class / register tokens, position embedding)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias") or any(k in name for k in ("pos_embed", "cls_token", "reg_token")):
                param.zero_()
    return module


@pytest.mark.parametrize("name", list(MODELS))
def test_cp_lrp_conserves_the_target_logit(name):
    """Without biases every rule on the way (Gamma-0 linear maps, detached norms, identity rule on SiLU,
    uniform gate product, the rotation's plain gradient, relevance through V only) is conservative."""
    module = _without_additive_constants(tiny_eva(seed=2, **MODELS[name]))
    _, _, size, _ = FACTS[name]
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = run_batch(vitlens.load_model(module), x, {"cp-lrp": {"conv_gamma": 0.0, "lin_gamma": 0.0}},
                       target="top2")
    sums, logits = result.extras["cp-lrp"]["relevance_sum"], result.extras["cp-lrp"]["target_logit"]
    with torch.no_grad():
        assert torch.allclose(logits, module(x).gather(1, result.targets), rtol=0, atol=1e-12)
    assert torch.allclose(result.patch_maps["cp-lrp"].flatten(2).sum(-1), sums, rtol=1e-12, atol=0)
    assert logits.abs().min() > 1e-3
    assert ((sums - logits).abs() / logits.abs()).max() <= 1e-6
    # AttnLRP's softmax rule is not conservative by design (tests/lrp/test_lrp.py): the share is reported
    attn = run_batch(vitlens.load_model(module), x, {"attnlrp": {"conv_gamma": 0.0, "lin_gamma": 0.0}},
                     target=result.targets)
    assert torch.allclose(attn.extras["attnlrp"]["target_logit"], logits, rtol=0, atol=1e-12)
    assert torch.isfinite(attn.extras["attnlrp"]["relevance_sum"]).all()


def test_lrp_gate_product_gets_the_uniform_rule(monkeypatch):
    """Without the rule for timm's SwiGLU the gate product would pass the plain gradient (both factors
    get the full relevance), and CP-LRP would no longer conserve the logit."""
    from vitlens.lrp import composite

    module = _without_additive_constants(tiny_eva(seed=3, depth=1))
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = {"cp-lrp": {"conv_gamma": 0.0, "lin_gamma": 0.0}}
    with_rule = run_batch(vitlens.load_model(module), x, params, target=TARGETS).extras["cp-lrp"]
    assert torch.allclose(with_rule["relevance_sum"], with_rule["target_logit"], rtol=1e-6, atol=0)
    assert composite._is_timm_glu(module.blocks[0].mlp)
    monkeypatch.setattr(composite, "_is_timm_glu", lambda m: False)
    without = run_batch(vitlens.load_model(module), x, params, target=TARGETS).extras["cp-lrp"]
    assert not torch.allclose(without["relevance_sum"], without["target_logit"], rtol=1e-3, atol=0)


# --------------------------------------------------------------------------------------------------
# the family: detection, loading, refusals, the model returned exactly as given
# --------------------------------------------------------------------------------------------------

def test_detected_as_eva_not_cnn():
    module = tiny_eva()
    assert is_cnn(module)  # a Conv2d patch embedding ...
    assert find_family(module, "image").name == "timm-eva"  # ... but the EVA family is asked first
    model = vitlens.load_model(module)
    assert model.family == "timm-eva" and model.has_attention and model.module is module


def test_timm_spec_with_a_weights_file_picks_the_eva_family(tmp_path):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=7)
    path = tmp_path / "eva02_tiny.pth"
    torch.save(source.state_dict(), path)
    model = vitlens.load_model("timm:eva02_tiny_patch14_224", weights=path)
    assert model.family == "timm-eva" and model.num_classes == 7 and model.num_layers == 12
    assert model.preprocess.input_size == (224, 224) and model.grid((224, 224)) == (16, 16)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.module.state_dict().items())


def _one_line_error(module, match):
    with pytest.raises(ModelError, match=match) as info:
        vitlens.load_model(module)
    assert "\n" not in str(info.value)


def test_unsupported_variants_are_one_line_errors():
    import timm

    rope_attention = timm.create_model("vit_small_patch16_rope_224", pretrained=False, img_size=32, patch_size=8,
                                       embed_dim=32, depth=2, num_heads=2, num_classes=10)
    _one_line_error(rope_attention, r"unsupported attention implementation timm\.layers\.attention\.AttentionRope "
                                    r"in block 0: vitlens reads timm's EvaAttention")
    for pool in ("map", "max", "avgmax", ""):
        _one_line_error(tiny_eva(depth=1, global_pool=pool),
                        f"timm EVA global_pool='{pool}' is not supported: vitlens supports token, avg")

    module = tiny_eva(depth=2)

    class OddAttention(type(module.blocks[1].attn)):
        def forward(self, x, rope=None, attn_mask=None, is_causal=False):
            return super().forward(x, rope=rope)

    module.blocks[1].attn.__class__ = OddAttention
    _one_line_error(module, "unsupported attention implementation .*OddAttention in block 1")

    class OwnHead(type(tiny_eva(depth=1))):
        def forward_head(self, x, pre_logits=False):
            return super().forward_head(x, pre_logits)

    own = tiny_eva(depth=1)
    own.__class__ = OwnHead
    _one_line_error(own, "unsupported EVA variant OwnHead: it overrides Eva.forward_head")


def _snapshot(module):
    """Everything a call could leave behind: instance attributes, hooks, modes, fused-attention flags."""
    return [(name, sorted(k for k in m.__dict__ if not k.startswith("_")), "forward" in m.__dict__,
             len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), m.training,
             getattr(m, "fused_attn", None), getattr(m, "grad_checkpointing", None))
            for name, m in module.named_modules()]


@pytest.mark.parametrize("name", list(MODELS))
def test_model_returned_exactly_as_given(name):
    module = tiny_eva(**MODELS[name])
    _, _, size, _ = FACTS[name]
    state = {k: v.clone() for k, v in module.state_dict().items()}
    model = vitlens.load_model(module)
    assert model.module is module
    module.blocks[1].train()  # a mixed mode of the user's own: restored after every call
    module.set_grad_checkpointing(True)  # turned off for the call only (a re-run block would record twice)
    before = _snapshot(module)
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    everything = vitlens.explain(model, x, methods="all", target=TARGETS)
    assert set(vitlens.DEFAULT_METHODS) <= set(everything.methods)
    cp = vitlens.explain(model, x, methods=["cp-lrp"], target=TARGETS)
    vitlens.explain(model, x, methods=["attention"])  # no gradients
    assert _snapshot(module) == before
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in module.parameters())
    module.set_grad_checkpointing(False)
    module.eval()
    again = vitlens.explain(model, x, methods=["chefer", "attnlrp", "cp-lrp"], target=TARGETS)
    for method in ("chefer", "attnlrp"):
        assert torch.equal(again.patch_maps[method], everything.patch_maps[method]), method
    assert torch.equal(again.patch_maps["cp-lrp"], cp.patch_maps["cp-lrp"])
