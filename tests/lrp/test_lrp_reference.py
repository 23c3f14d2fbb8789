"""AttnLRP / CP-LRP with Gamma rules against an explicit float64 relevance propagation.

The reference below propagates relevance layer by layer with the rules written out as formulas
(no autograd): Gamma / LRP-0 for every linear map (patch embedding, qkv, projection, MLP, head),
LayerNorm with a constant standard deviation, the identity rule through GELU, the z-rule at residual
sums, the uniform rule (half each) on Q K^T and A V, AttnLRP's softmax rule R_in = x (R - s sum R),
and for CP-LRP relevance only through V. vitlens realises the same rules as a modified gradient.
"""

from __future__ import annotations

import pytest
import torch

import vitlens
from tests.conftest import tiny_timm_vit, unit_scale
from vitlens.engine import run_batch

STAB = 1e-6


def stab(z):
    return z + STAB * torch.where(z >= 0, 1.0, -1.0).to(z)


def lrp_linear(x, W, b, R, gamma):
    """Relevance of the inputs x (n, i) of z = x W^T + b (n, o) given output relevance R (n, o)."""
    z = x @ W.T + (b if b is not None else 0)
    if gamma == 0:  # LRP-0
        return x * ((R / z) @ W)
    b = torch.zeros(W.shape[0], dtype=W.dtype) if b is None else b
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    Wu, Wd = W + gamma * W.clamp(min=0), W + gamma * W.clamp(max=0)
    bu, bd = b + gamma * b.clamp(min=0), b + gamma * b.clamp(max=0)
    s_pos = R * (z > 0) / stab(xp @ Wu.T + bu + xn @ Wd.T)
    s_neg = R * (z < 0) / stab(xp @ Wd.T + bd + xn @ Wu.T)
    return xp * (s_pos @ Wu) + xn * (s_pos @ Wd) + xp * (s_neg @ Wd) + xn * (s_neg @ Wu)


def lrp_layer_norm(x, ln, R):
    """y = (x - mean) / sigma * w + b with sigma constant: LRP-0 of that linear map, per token."""
    C = x.shape[-1]
    sigma = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + ln.eps)
    y = (x - x.mean(-1, keepdim=True)) / sigma * ln.weight + ln.bias
    g = R / y * ln.weight / sigma  # d/dy through the affine part
    centred_grad = g - g.sum(-1, keepdim=True) / C  # transpose of (I - 11^T / C)
    return x * centred_grad


def reference_relevance(module, x, target, variant, conv_gamma, lin_gamma, attn_gamma=None):
    """Pixel relevance (H, W) of one image for a one-block timm ViT, rules written out.

    ``attn_gamma``: the Gamma of the attention's qkv and output projections (default ``lin_gamma``)."""
    attn_gamma = lin_gamma if attn_gamma is None else attn_gamma
    m = module
    p = m.patch_embed.proj
    C = p.out_channels
    k = p.kernel_size[0]
    # --- forward, keeping every intermediate --------------------------------------------------
    patches = torch.nn.functional.unfold(x[None], kernel_size=k, stride=k)[0].T  # (P, 3kk)
    Wc = p.weight.reshape(C, -1)
    t0 = patches @ Wc.T + p.bias
    tokens_raw = torch.cat([m.cls_token[0], t0])
    pos = m.pos_embed[0]
    tokens = tokens_raw + pos
    blk = m.blocks[0]
    h1 = torch.nn.functional.layer_norm(tokens, (C,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    qkv = h1 @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    K, d = blk.attn.num_heads, blk.attn.head_dim
    N = tokens.shape[0]
    q, kk, v = qkv.reshape(N, 3, K, d).permute(1, 2, 0, 3)  # each (K, N, d)
    scale = blk.attn.scale
    scores = (q * scale) @ kk.transpose(-1, -2)
    A = scores.softmax(-1)
    o = A @ v  # (K, N, d)
    merged = o.permute(1, 0, 2).reshape(N, C)
    proj = merged @ blk.attn.proj.weight.T + blk.attn.proj.bias
    r1 = tokens + proj
    h2 = torch.nn.functional.layer_norm(r1, (C,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    f1 = h2 @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    a = torch.nn.functional.gelu(f1)
    f2 = a @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    r2 = r1 + f2
    n = torch.nn.functional.layer_norm(r2, (C,), m.norm.weight, m.norm.bias, m.norm.eps)
    logits = n[0] @ m.head.weight.T + m.head.bias
    # --- relevance, from the target logit down ------------------------------------------------
    R_logits = torch.zeros_like(logits)
    R_logits[target] = logits[target]
    R_n = torch.zeros_like(n)
    R_n[0] = lrp_linear(n[0:1], m.head.weight, m.head.bias, R_logits[None], lin_gamma)[0]
    R_r2 = lrp_layer_norm(r2, m.norm, R_n)
    R_r1 = r1 / r2 * R_r2  # z-rule at the residual sum
    R_f2 = f2 / r2 * R_r2
    R_a = lrp_linear(a, blk.mlp.fc2.weight, blk.mlp.fc2.bias, R_f2, lin_gamma)
    R_f1 = R_a  # identity rule through GELU
    R_h2 = lrp_linear(h2, blk.mlp.fc1.weight, blk.mlp.fc1.bias, R_f1, lin_gamma)
    R_r1 = R_r1 + lrp_layer_norm(r1, blk.norm2, R_h2)
    R_tokens = tokens / r1 * R_r1
    R_proj = proj / r1 * R_r1
    R_merged = lrp_linear(merged, blk.attn.proj.weight, blk.attn.proj.bias, R_proj, attn_gamma)
    R_o = R_merged.reshape(N, K, d).permute(1, 0, 2)  # (K, N, d)
    # o[i, e] = sum_j A[i, j] v[j, e]; contribution c[i, j, e] = A_ij v_je R_o_ie / o_ie
    contrib = A[..., None] * v[:, None, :, :] * (R_o / o)[:, :, None, :]  # (K, N_i, N_j, d)
    if variant == "cp-lrp":
        R_v = contrib.sum(dim=1)  # all relevance to the values
        R_q = R_k = torch.zeros_like(q)
    else:
        R_v = 0.5 * contrib.sum(dim=1)
        R_A = 0.5 * contrib.sum(dim=-1)  # (K, N, N)
        R_scores = scores * (R_A - A * R_A.sum(-1, keepdim=True))  # softmax rule
        # scores[i, j] = sum_e (q_ie s) k_je, uniform rule: half to each side
        c2 = (q * scale)[:, :, None, :] * kk[:, None, :, :] * (R_scores / scores)[..., None]
        R_q = 0.5 * c2.sum(dim=2)
        R_k = 0.5 * c2.sum(dim=1)
    R_qkv = torch.stack([R_q, R_k, R_v]).permute(2, 0, 1, 3).reshape(N, 3 * C)
    R_h1 = lrp_linear(h1, blk.attn.qkv.weight, blk.attn.qkv.bias, R_qkv, attn_gamma)
    R_tokens = R_tokens + lrp_layer_norm(tokens, blk.norm1, R_h1)
    R_t0 = t0 / tokens[1:] * R_tokens[1:]  # the position embedding (a constant) absorbs its share
    R_patches = lrp_linear(patches, Wc, p.bias, R_t0, conv_gamma)
    folded = torch.nn.functional.fold(R_patches.T[None], output_size=x.shape[-2:], kernel_size=k, stride=k)[0]
    return folded.sum(0), logits


@pytest.fixture(scope="module")
def one_block():
    module = tiny_timm_vit(seed=4, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=5)
    return unit_scale(module)  # relevance of O(1), so that atol 1e-6 means something


@pytest.mark.parametrize("variant", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("conv_gamma, lin_gamma", [(0.0, 0.0), (1.0, 0.5), (0.25, 0.1)])
def test_matches_explicit_relevance_propagation(one_block, variant, conv_gamma, lin_gamma):
    model = vitlens.load_model(one_block)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[1, 4], [0, 2]])
    result = run_batch(model, x, {variant: {"conv_gamma": conv_gamma, "lin_gamma": lin_gamma}}, targets)
    relevance = result.patch_maps[variant]
    assert relevance.shape == (2, 2, 16, 16)
    for b in range(2):
        for slot in range(2):
            expected, logits = reference_relevance(one_block, x[b], int(targets[b, slot]), variant,
                                                   conv_gamma, lin_gamma)
            assert expected.abs().max() > 1e-3  # a real signal, 1000 x the tolerance
            assert torch.allclose(relevance[b, slot], expected, atol=1e-6), (variant, b, slot)
            assert torch.isclose(result.extras[variant]["target_logit"][b, slot], logits[targets[b, slot]])
