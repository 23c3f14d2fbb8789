"""Independent float64 check of every attention method against research/algorithms.md.

The references below are written from the specification (algorithms.md sections 0, 2, 4.1, 5,
6.2, 7.2 and the "Recommended correct choices" of section 11) with explicit loops over images,
layers and heads in numpy float64. Attention probabilities and their gradients are captured
here without any vitlens code: a deep copy of the timm model runs with ``fused_attn = False``
and forward hooks on ``attn.attn_drop`` (the tensor that multiplies the values), and the
gradients come from plain ``backward`` / ``torch.autograd.grad`` calls.

Conventions the references follow (spec + vitlens's documented choices):

* CLS readout: map = R[0, 1:] reshaped row-major to the (h, w) grid (one prefix token here).
* rollout: fuse heads (mean | max | min), optionally zero the lowest ``int(ratio * P * P)``
  patch-to-patch entries of the fused matrix (prefix rows/columns never touched), then
  row-normalise (A + alpha I), compose by LEFT multiplication R = A^L ... A^s.
* GMAR: g_h = L1/L2 norm of dy_c/dA_h, w_h = g_h / (sum g + 1e-8), A = sum_h w_h A_h, then as rollout.
* GMAR++: G+ = relu(G), g_h from G+, w_h = g_h / (sum g + 1e-8), W = sum_h w_h G+_h * A_h;
  normalize='layer' divides W by (mean row sum of W + 1e-8); then row-normalise (W + alpha I), left product.
* LeGrad: s^l = head(norm(pool(z^l)))_c, G^l = ds^l/dA^l (own layer only); E^l = mean over heads
  and ALL N query rows of relu(G^l), patch key columns; map = mean over chosen layers.
  pool='model' = CLS token; pool='mean' = mean over all N tokens, then final norm, then head.
* Chefer (ICCV'21): R = I; R <- R + mean_h relu(G_h * A_h) @ R; map = R[0, 1:].

Tolerances: model comparisons in float64 use ``|vitlens - reference| <= 1e-6 * max|reference|``
(i.e. atol 1e-6 relative to the map's scale, since raw maps of different methods live on very
different scales, e.g. GMAR++ 'none' maps are products of small gradients); hand-computed cases
use atol 1e-9 unless an eps of 1e-8 enters, then 1e-7.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from tests.conftest import tiny_timm_vit
from vitlens.methods import REGISTRY, to_pixels
from vitlens.methods.common import Captured

EPS = 1e-8
GRID = (4, 4)  # tiny_timm_vit: 32x32 input, 8x8 patches
TARGETS = [3, 7]


# ------------------------------------------------------------------------------------------
# independent capture (no vitlens code)
# ------------------------------------------------------------------------------------------

def _reference_capture(model: torch.nn.Module, x: torch.Tensor, targets: list) -> dict:
    """A^l, dy_c/dA^l and, per pool, ds^l/dA^l captured with plain hooks on a deep copy."""
    m = copy.deepcopy(model).eval()
    attentions, outputs, handles = [], [], []

    def attn_hook(module, inputs, output):
        output.retain_grad()
        attentions.append(output)
        return None

    def block_hook(module, inputs, output):
        outputs.append(output)
        return None

    for blk in m.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(attn_hook))
        handles.append(blk.register_forward_hook(block_hook))
    assert isinstance(m.fc_norm, torch.nn.Identity) and m.global_pool == "token"
    logits = m(x)
    assert len(attentions) == len(m.blocks) and len(outputs) == len(m.blocks)
    t = torch.tensor(targets).view(-1, 1)

    # the plain backward FIRST: in torch 2.x a retain_grad() tensor also accumulates into .grad
    # during torch.autograd.grad calls that pass through it, so the LeGrad calls below would
    # otherwise pollute A.grad
    logits.gather(1, t).sum().backward(retain_graph=True)
    grads = [a.grad.detach().numpy().copy() for a in attentions]

    layer_grads = {}
    for layer, (z, a) in enumerate(zip(outputs, attentions)):
        score_model = m.forward_head(m.norm(z)).gather(1, t).sum()  # CLS pooling, the model's own
        score_mean = m.head(m.norm(z.mean(dim=1))).gather(1, t).sum()  # mean of ALL tokens -> norm -> head
        layer_grads[("model", layer)] = torch.autograd.grad(score_model, a, retain_graph=True)[0].numpy().copy()
        layer_grads[("mean", layer)] = torch.autograd.grad(score_mean, a, retain_graph=True)[0].numpy().copy()
    # the last layer's 'model' score is the true logit
    assert torch.allclose(m.forward_head(m.norm(outputs[-1])), logits, atol=1e-12)

    for h in handles:
        h.remove()
    return {
        "A": [a.detach().numpy().copy() for a in attentions],
        "G": grads,
        "LG": layer_grads,
        "logits": logits.detach(),
    }


# ------------------------------------------------------------------------------------------
# numpy float64 references, explicit loops
# ------------------------------------------------------------------------------------------

def _rownorm(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    for i in range(m.shape[0]):
        out[i] = m[i] / m[i].sum()
    return out


def _cls_map(r: np.ndarray, grid: tuple) -> np.ndarray:
    return r[0, 1:].reshape(grid)


def ref_attention(A, layer=-1, grid=GRID):
    a = A[layer]
    B, K, N, _ = a.shape
    out = []
    for b in range(B):
        row = np.zeros(N)
        for h in range(K):
            row += a[b, h, 0] / K
        out.append(row[1:].reshape(grid))
    return np.stack(out)


def ref_rollout(A, head_fusion="mean", discard_ratio=0.0, start_layer=0, residual=1.0, grid=GRID):
    B, K, N, _ = A[0].shape
    P = N - 1
    out = []
    for b in range(B):
        R = None
        for layer in range(start_layer, len(A)):
            fused = np.zeros((N, N))
            for i in range(N):
                for j in range(N):
                    values = [A[layer][b, h, i, j] for h in range(K)]
                    fused[i, j] = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion](values)
            if discard_ratio > 0:
                count = int(discard_ratio * P * P)
                entries = sorted((fused[i, j], i, j) for i in range(1, N) for j in range(1, N))
                for _, i, j in entries[:count]:
                    fused[i, j] = 0.0
            step = _rownorm(fused + residual * np.eye(N))
            R = step if R is None else step @ R  # left multiplication
        out.append(_cls_map(R, grid))
    return np.stack(out)


def _head_scores(G_bh_list, norm):
    if norm == "l1":
        return [np.abs(g).sum() for g in G_bh_list]
    return [math.sqrt((g ** 2).sum()) for g in G_bh_list]


def ref_gmar(A, G, norm="l2", residual=1.0, start_layer=0, grid=GRID):
    B, K, N, _ = A[0].shape
    out = []
    for b in range(B):
        R = None
        for layer in range(start_layer, len(A)):
            scores = _head_scores([G[layer][b, h] for h in range(K)], norm)
            total = sum(scores)
            fused = np.zeros((N, N))
            for h in range(K):
                fused += scores[h] / (total + EPS) * A[layer][b, h]
            step = _rownorm(fused + residual * np.eye(N))
            R = step if R is None else step @ R
        out.append(_cls_map(R, grid))
    return np.stack(out)


def ref_gmar_pp(A, G, norm="l2", residual=1.0, normalize="none", start_layer=0, grid=GRID):
    B, K, N, _ = A[0].shape
    out = []
    for b in range(B):
        R = None
        for layer in range(start_layer, len(A)):
            positive = [np.maximum(G[layer][b, h], 0.0) for h in range(K)]
            scores = _head_scores(positive, norm)
            total = sum(scores)
            W = np.zeros((N, N))
            for h in range(K):
                W += scores[h] / (total + EPS) * positive[h] * A[layer][b, h]
            if normalize == "layer":
                mean_row_sum = np.mean([W[i].sum() for i in range(N)])
                W = W / (mean_row_sum + EPS)
            step = _rownorm(W + residual * np.eye(N))
            R = step if R is None else step @ R
        out.append(_cls_map(R, grid))
    return np.stack(out)


def ref_legrad(LG, num_layers, layers="all", pool="model", grid=GRID):
    if layers == "all":
        chosen = list(range(num_layers))
    elif isinstance(layers, int):
        chosen = list(range(num_layers - layers, num_layers))
    else:
        chosen = list(layers)
    B, K, N, _ = LG[(pool, chosen[0])].shape
    out = []
    for b in range(B):
        total = np.zeros(N - 1)
        for layer in chosen:
            g = LG[(pool, layer)]
            per_key = np.zeros(N)
            for h in range(K):
                for i in range(N):  # ALL query rows, CLS included
                    per_key += np.maximum(g[b, h, i], 0.0)
            per_key /= K * N
            total += per_key[1:]  # drop the CLS key column
        out.append((total / len(chosen)).reshape(grid))
    return np.stack(out)


def ref_chefer(A, G, start_layer=0, grid=GRID):
    B, K, N, _ = A[0].shape
    out = []
    for b in range(B):
        R = np.eye(N)
        for layer in range(start_layer, len(A)):
            bar = np.zeros((N, N))
            for h in range(K):
                bar += np.maximum(G[layer][b, h] * A[layer][b, h], 0.0) / K  # clamp before the mean
            R = R + bar @ R
        out.append(_cls_map(R, grid))
    return np.stack(out)


def reference(method: str, params: dict, cap: dict) -> np.ndarray:
    A, G = cap["A"], cap["G"]
    if method == "attention":
        return ref_attention(A, **params)
    if method == "rollout":
        return ref_rollout(A, **params)
    if method in ("gmar-l1", "gmar-l2"):
        return ref_gmar(A, G, norm=method[-2:], **params)
    if method == "gmar++":
        return ref_gmar_pp(A, G, **params)
    if method == "legrad":
        return ref_legrad(cap["LG"], len(A), **params)
    if method == "chefer":
        return ref_chefer(A, G, **params)
    raise AssertionError(method)


def assert_scaled_close(actual, expected, rel=1e-6):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual))
    scale = np.abs(expected).max()
    assert scale > 0, "reference map is all zeros: the check would be vacuous"
    err = np.abs(actual - expected).max()
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel:g} * scale {scale:.3e}"


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def f64():
    model = tiny_timm_vit(seed=0).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(TARGETS), 3, 32, 32, generator=gen).float().double()
    cap = _reference_capture(model, x, TARGETS)
    explained = copy.deepcopy(model)
    return {"model": vitlens.load_model(explained), "x": x, "cap": cap}


def _explain(setup, method, params, target=TARGETS):
    result = vitlens.explain(setup["model"], setup["x"], methods=[method], target=target,
                             params={method: params} if params else None)
    maps = result.patch_maps[method]
    assert maps.shape == (len(TARGETS), 1, *GRID)
    return maps[:, 0]


# ------------------------------------------------------------------------------------------
# 1. float64 model: vitlens == independent reference
# ------------------------------------------------------------------------------------------

CASES = [("attention", {}), ("attention", {"layer": 0})]
CASES += [("rollout", {"head_fusion": f, "discard_ratio": d}) for f in ("mean", "max", "min") for d in (0.0, 0.5)]
CASES += [("rollout", {"start_layer": 1}), ("rollout", {"residual": 0.5}),
          ("rollout", {"head_fusion": "max", "discard_ratio": 0.5, "start_layer": 1, "residual": 0.5})]
CASES += [("gmar-l1", {}), ("gmar-l2", {}), ("gmar-l1", {"residual": 0.5, "start_layer": 1}),
          ("gmar-l2", {"residual": 0.5})]
CASES += [("gmar++", {"norm": n, "normalize": z}) for n in ("l1", "l2") for z in ("none", "layer")]
CASES += [("gmar++", {"normalize": "layer", "residual": 0.5, "start_layer": 1})]
CASES += [("legrad", {"layers": la, "pool": p}) for la in ("all", 2, [0, 2]) for p in ("model", "mean")]
CASES += [("chefer", {}), ("chefer", {"start_layer": 1})]


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}".replace(" ", "") for m, p in CASES])
def test_matches_float64_reference(f64, method, params):
    full = REGISTRY[method].params(params)
    assert full.pop("libragrad", False) is False  # the ordinary gradients (LibraGrad: tests/methods/test_libragrad.py)
    if method in ("gmar-l1", "gmar-l2"):
        full.pop("norm")
    expected = reference(method, full, f64["cap"])
    actual = _explain(f64, method, params)
    assert actual.dtype == torch.float64
    assert_scaled_close(actual.numpy(), expected)
    # the two images give different maps, so the comparison is not degenerate
    assert np.abs(expected[0] - expected[1]).max() > 1e-3 * np.abs(expected).max()


def test_reference_capture_is_not_degenerate(f64):
    cap = f64["cap"]
    for a, g in zip(cap["A"], cap["G"]):
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-12)
        assert (g > 0).any() and (g < 0).any()
    # LeGrad's last-layer 'model' score is the logit itself -> same gradient there
    np.testing.assert_allclose(cap["LG"][("model", 2)], cap["G"][2], atol=1e-12)
    # ... but not at earlier layers (per-layer scores differ from the final logit)
    assert np.abs(cap["LG"][("model", 0)] - cap["G"][0]).max() > 1e-6
    assert np.abs(cap["LG"][("mean", 2)] - cap["G"][2]).max() > 1e-6


def test_defaults_match_reference(f64):
    """All attention methods at their registry defaults in one call (one shared pass).

    The Grad-CAM family is checked against pytorch-grad-cam in test_gradcam.py, LRP in tests/lrp.
    """
    attention_methods = [m for m in vitlens.DEFAULT_METHODS if "cam" not in m and not vitlens.METHODS[m].signed]
    result = vitlens.explain(f64["model"], f64["x"], methods=attention_methods, target=TARGETS)
    for name in result.methods:
        params = REGISTRY[name].params()
        assert params.pop("libragrad", False) is False  # the ordinary gradients
        if name in ("gmar-l1", "gmar-l2"):
            params.pop("norm")
        assert_scaled_close(result.patch_maps[name][:, 0].numpy(), reference(name, params, f64["cap"]))
    # and the pixel maps are the min-max'ed bilinear upsampling of those raw maps. The raw maps
    # are float32 and min-max magnifies their rounding (~6e-8 * |map|) by |map| / range(map),
    # which is ~100 for the nearly uniform rollout maps of a random model: scale the tolerance.
    for name in result.methods:
        raw = result.patch_maps[name][:, 0].numpy()
        for b in range(raw.shape[0]):
            tol = 1e-6 + 1e-6 * np.abs(raw[b]).max() / (raw[b].max() - raw[b].min())
            np.testing.assert_allclose(result.maps[name][b, 0].numpy(), ref_to_pixels(raw[b:b + 1], (32, 32))[0],
                                       atol=tol, err_msg=name)


def test_explain_float64_model_without_cast():
    model = tiny_timm_vit().double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    result = vitlens.explain(model, x, methods=["rollout"])
    assert result.patch_maps["rollout"].dtype == torch.float64


# ------------------------------------------------------------------------------------------
# 2. hand-computed cases on hand-made Captured tensors (1 prefix token, N = 3, grid (1, 2))
# ------------------------------------------------------------------------------------------

def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def _captured(attentions, gradients=None, layer_gradients=None):
    """attentions / gradients: list over layers of lists over heads of 3x3 nested lists."""
    def to(layers):
        return [_t(heads).unsqueeze(0) for heads in layers]  # (1, K, 3, 3)

    return Captured(to(attentions), to(gradients) if gradients is not None else None,
                    _t([1.0, 0.0, 0.0]), 1, (1, 2),
                    {k: _t(v).unsqueeze(0) for k, v in (layer_gradients or {}).items()})


def _run(name, captured, **params):
    spec = REGISTRY[name]
    params = spec.params(params)
    assert params.pop("libragrad", False) is False  # the engine's pass choice, not the function's parameter
    out = spec.function(captured, **params)
    assert out.shape == (1, 1, 2)
    return out[0, 0].numpy()


A_ONE = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]


def test_hand_rollout_one_layer():
    # (A + I) / 2, row 0 = [0.75, 0.15, 0.10] -> patches [0.15, 0.10]
    np.testing.assert_allclose(_run("rollout", _captured([[A_ONE]])), [0.15, 0.10], atol=1e-12)
    # residual 0.5: rownorm(A + 0.5 I) row 0 = [1.0, 0.3, 0.2] / 1.5
    np.testing.assert_allclose(_run("rollout", _captured([[A_ONE]]), residual=0.5), [0.2, 0.2 / 1.5], atol=1e-12)
    # attention baseline: the raw CLS row
    np.testing.assert_allclose(_run("attention", _captured([[A_ONE]])), [0.3, 0.2], atol=1e-12)


def test_hand_rollout_left_multiplication():
    # layer 1: A1 = [[0,1,0],[0,0,1],[1,0,0]] -> Â1 = [[.5,.5,0],[0,.5,.5],[.5,0,.5]]
    # layer 2: A2 = [[0,1,0],[0,1,0],[0,0,1]] -> Â2 = [[.5,.5,0],[0,1,0],[0,0,1]]
    # left  (spec): (Â2 Â1)[0] = .5 Â1[0] + .5 Â1[1] = [.25, .50, .25] -> [0.50, 0.25]
    # right (B1)  : (Â1 Â2)[0] = .5 Â2[0] + .5 Â2[1] = [.25, .75, .00] -> [0.75, 0.00]
    a1 = [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    a2 = [[0, 1, 0], [0, 1, 0], [0, 0, 1]]
    got = _run("rollout", _captured([[a1], [a2]]))
    np.testing.assert_allclose(got, [0.50, 0.25], atol=1e-12)
    assert np.abs(got - [0.75, 0.0]).max() > 0.1
    # start_layer 1 keeps only Â2: row 0 = [.5, .5, 0]
    np.testing.assert_allclose(_run("rollout", _captured([[a1], [a2]]), start_layer=1), [0.5, 0.0], atol=1e-12)


def test_hand_rollout_head_fusion():
    # head 0 row 0 = [.5,.5,0], head 1 row 0 = [.2,.2,.6]
    h0 = [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    h1 = [[0.2, 0.2, 0.6], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    cap = _captured([[h0, h1]])
    # mean: [.35,.35,.30] -> (A+I)/2 row 0 -> [.175, .15]
    np.testing.assert_allclose(_run("rollout", cap, head_fusion="mean"), [0.175, 0.15], atol=1e-12)
    # max: [.5,.5,.6] + I = [1.5,.5,.6] / 2.6
    np.testing.assert_allclose(_run("rollout", cap, head_fusion="max"), [0.5 / 2.6, 0.6 / 2.6], atol=1e-12)
    # min: [.2,.2,0] + I = [1.2,.2,0] / 1.4
    np.testing.assert_allclose(_run("rollout", cap, head_fusion="min"), [0.2 / 1.4, 0.0], atol=1e-12)


def test_hand_rollout_discard_keeps_prefix_entries():
    # layer 1 = A_ONE; its patch block [[.6,.3],[.2,.6]]: int(0.5 * 2*2) = 2 lowest (.3, .2) -> 0.
    # The CLS column entries .1 and .2 are smaller but are never discarded.
    #   Â1 row 0 = [.75, .15, .10]; row 1 = [.1, 1.6, 0] / 1.7; row 2 = [.2, 0, 1.6] / 1.8
    # layer 2 = B with an all-zero patch block -> Â2 = [[.5,.25,.25],[.5,.5,0],[.5,0,.5]]
    #   R[0] = .5 Â1[0] + .25 Â1[1] + .25 Â1[2]
    #   patch 1: .075 + .25 * 1.6/1.7 = 0.3102941176...; patch 2: .05 + .25 * 1.6/1.8 = 0.2722222...
    # (without discarding: [.075+.2+.025, .05+.0375+.2] = [.3, .2875])
    b = [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    cap = _captured([[A_ONE], [b]])
    np.testing.assert_allclose(_run("rollout", cap, discard_ratio=0.5),
                               [0.075 + 0.25 * 1.6 / 1.7, 0.05 + 0.25 * 1.6 / 1.8], atol=1e-12)
    np.testing.assert_allclose(_run("rollout", cap, discard_ratio=0.0), [0.3, 0.2875], atol=1e-12)


GMAR_A = [[[0.5, 0.5, 0.0], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]],
          [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4], [0.0, 0.5, 0.5]]]


def test_hand_gmar_head_weights():
    # head 0 gradient: entries -2 and 1 -> L1 3, L2 sqrt(5); head 1: one entry 1 -> L1 1, L2 1
    g0 = [[0, -2, 0], [0, 0, 1], [0, 0, 0]]
    g1 = [[0, 0, 0], [0, 0, 0], [1, 0, 0]]
    cap = _captured([GMAR_A], [[g0, g1]])
    # L1: w = [3, 1] / (4 + 1e-8); fused row 0 = .75*[.5,.5,0] + .25*[.2,.2,.6] = [.425,.425,.15]
    #     -> (A + I) / 2 row 0 patches [.2125, .075]
    np.testing.assert_allclose(_run("gmar-l1", cap), [0.2125, 0.075], atol=1e-8)
    # L2: w = [sqrt5, 1] / (sqrt5 + 1) = [0.690983..., 0.309016...]
    w0, w1 = math.sqrt(5) / (math.sqrt(5) + 1), 1 / (math.sqrt(5) + 1)
    np.testing.assert_allclose(_run("gmar-l2", cap), [(0.5 * w0 + 0.2 * w1) / 2, 0.6 * w1 / 2], atol=1e-8)


def test_hand_gmar_plus_plus_relu_of_negative_gradients():
    a0 = [[0.4, 0.4, 0.2], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]
    a1 = [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4], [0.0, 0.5, 0.5]]
    # G+ keeps only head 0 [0,1] = 2 and head 1 [0,2] = 2 -> g = [2, 2] (L1 and L2; without the
    # ReLU L1 would be [7, 3]) -> w = [.5, .5]
    g0 = [[0, 2, -5], [0, 0, 0], [0, 0, 0]]
    g1 = [[0, -1, 2], [0, 0, 0], [0, 0, 0]]
    cap = _captured([[a0, a1]], [[g0, g1]])
    # W row 0 = .5*[0, 2*.4, 0] + .5*[0, 0, 2*.6] = [0, .4, .6]; other rows 0
    # 'none':  (W + I) row 0 = [1, .4, .6] / 2 -> [.2, .3]
    for norm in ("l1", "l2"):
        np.testing.assert_allclose(_run("gmar++", cap, norm=norm), [0.2, 0.3], atol=1e-7)
    # 'layer': mean row sum of W = 1/3 -> W row 0 = [0, 1.2, 1.8]; + I -> [1, 1.2, 1.8] / 4
    np.testing.assert_allclose(_run("gmar++", cap, normalize="layer"), [0.3, 0.45], atol=1e-7)
    # a layer whose gradients are all <= 0: weights 0 / (0 + eps) = 0, W = 0, identity step, no NaN
    neg = [[[-1, -2, -3], [0, -1, 0], [0, 0, -4]]] * 2
    got = _run("gmar++", _captured([[a0, a1]], [neg]))
    np.testing.assert_array_equal(got, [0.0, 0.0])


def test_hand_legrad_mean_over_heads_and_all_query_rows():
    # relu, sum over the 3 query rows, per head: h0 keys (1, 2) -> (3, 6); h1 -> (3, 4)
    # mean over 2 heads x 3 rows: key 1 -> 6/6 = 1, key 2 -> 10/6; CLS key column (1,5,0 / 0,0,7) dropped
    # (CLS query row only would give [2, .5])
    g0 = [[1, 3, -2], [5, 0, 6], [0, -1, 0]]
    g1 = [[0, 1, 1], [0, 2, 0], [7, 0, 3]]
    # layer 1: only key 1 gets anything: (6 + 0) / 6 = 1, key 2: 0
    g2 = [[0, 6, -1], [0, 0, 0], [0, 0, 0]]
    zeros = [[0, 0, 0]] * 3
    cap = _captured([[A_ONE, A_ONE], [A_ONE, A_ONE]], None,
                    {("model", 0): [g0, g1], ("model", 1): [g2, zeros],
                     ("mean", 0): [g2, zeros], ("mean", 1): [g0, g1]})
    np.testing.assert_allclose(_run("legrad", cap, layers=[0]), [1.0, 10 / 6], atol=1e-12)
    np.testing.assert_allclose(_run("legrad", cap, layers=1), [1.0, 0.0], atol=1e-12)  # last 1 layer
    np.testing.assert_allclose(_run("legrad", cap, layers="all"), [1.0, 5 / 6], atol=1e-12)  # mean of layers
    np.testing.assert_allclose(_run("legrad", cap, layers=[1], pool="mean"), [1.0, 10 / 6], atol=1e-12)


def test_hand_chefer():
    third = [[1 / 3] * 3] * 3
    # layer 1: G*A per head: h0 [[0,1,-1],[0,0,1],0], h1 [[0,-1,1],[0,0,1],0]
    #   relu then mean: Ā1 = [[0,.5,.5],[0,0,1],[0,0,0]]  (mean then relu would give row 0 = 0)
    g1a = [[0, 3, -3], [0, 0, 3], [0, 0, 0]]
    g1b = [[0, -3, 3], [0, 0, 3], [0, 0, 0]]
    # layer 2: Ā2 = [[0,1,0],0,0]
    g2 = [[0, 3, 0], [0, 0, 0], [0, 0, 0]]
    cap = _captured([[third, third], [third, third]], [[g1a, g1b], [g2, g2]])
    # R = (I + Ā2)(I + Ā1); row 0 = e0 + Ā1[0] + Ā2[0] + Ā1[1] = [1, 1.5, 1.5] -> [1.5, 1.5]
    # (right product: Ā1 Ā2 row 0 = 0 -> [1.5, .5]; mean-then-relu: [1, 1])
    np.testing.assert_allclose(_run("chefer", cap), [1.5, 1.5], atol=1e-12)
    np.testing.assert_allclose(_run("chefer", cap, start_layer=1), [1.0, 0.0], atol=1e-12)


# ------------------------------------------------------------------------------------------
# 3./4. batches: per-image maps do not depend on the rest of the batch
# ------------------------------------------------------------------------------------------

VARIANTS = [None, {"rollout": {"head_fusion": "max", "discard_ratio": 0.5},
                   "gmar++": {"norm": "l1", "normalize": "layer"},
                   "legrad": {"layers": 2, "pool": "mean"},
                   "chefer": {"start_layer": 1}}]
ALL = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer"]


@pytest.fixture(scope="module")
def f32():
    model = vitlens.load_model(tiny_timm_vit(seed=2))
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return model, x


def _close32(a, b, atol=1e-5):
    # float32: atol 1e-5, and also at most 1e-4 of the map's scale (raw LeGrad / Chefer / GMAR++
    # maps are ~1e-3, where atol 1e-5 alone would allow a 1% error)
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    assert err <= atol and err <= 1e-4 * scale, f"max |diff| {err:.3e} (map scale {scale:.3e})"


@pytest.mark.parametrize("params", VARIANTS, ids=["defaults", "variants"])
def test_batched_equals_per_image(f32, params):
    model, x = f32
    targets = [1, 4, 7]
    batch = vitlens.explain(model, x[:3], methods=ALL, target=targets, params=params)
    for i, t in enumerate(targets):
        single = vitlens.explain(model, x[i:i + 1], methods=ALL, target=t, params=params)
        for name in ALL:
            _close32(batch.patch_maps[name][i], single.patch_maps[name][0])
            _close32(batch.maps[name][i], single.maps[name][0], atol=1e-4)


def test_per_image_target_independent_of_batch(f32):
    model, x = f32
    # image 0 with target 6 in two different batches, and duplicated with another target
    a = vitlens.explain(model, x[[0, 1, 2]], methods=ALL, target=[6, 2, 9])
    b = vitlens.explain(model, x[[3, 0, 4]], methods=ALL, target=[0, 6, 6])
    c = vitlens.explain(model, x[[0, 0]], methods=ALL, target=[6, 8])
    d = vitlens.explain(model, x[[0]], methods=ALL, target=8)
    for name in ALL:
        _close32(a.patch_maps[name][0], b.patch_maps[name][1])
        _close32(a.patch_maps[name][0], c.patch_maps[name][0])
        _close32(c.patch_maps[name][1], d.patch_maps[name][0])
    # class-specific methods really depend on the target (else the above proves nothing)
    for name in ("gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer"):
        diff = float((c.patch_maps[name][0] - c.patch_maps[name][1]).abs().max())
        assert diff > 1e-4 * float(c.patch_maps[name].abs().max()), name


def test_topk_slots_equal_single_targets(f32):
    model, x = f32
    top = vitlens.explain(model, x[:2], methods=ALL, target="top2")
    assert top.targets.shape == (2, 2)
    for slot in range(2):
        single = vitlens.explain(model, x[:2], methods=ALL, target=top.targets[:, slot])
        for name in ALL:
            _close32(top.patch_maps[name][:, slot], single.patch_maps[name][:, 0])


# ------------------------------------------------------------------------------------------
# 5. invariances
# ------------------------------------------------------------------------------------------

def test_gmar_pp_layer_normalisation_is_logit_scale_free(f64):
    base = f64["model"]
    scaled_module = copy.deepcopy(base.module)
    with torch.no_grad():
        scaled_module.head.weight.mul_(10.0)
        scaled_module.head.bias.mul_(10.0)
    scaled = vitlens.load_model(scaled_module)
    x = f64["x"]

    def maps(model, normalize):
        r = vitlens.explain(model, x, methods=["gmar++"], target=TARGETS, params={"gmar++": {"normalize": normalize}})
        return r.patch_maps["gmar++"].numpy()

    layer_base, layer_scaled = maps(base, "layer"), maps(scaled, "layer")
    none_base, none_scaled = maps(base, "none"), maps(scaled, "none")
    # 'layer': unchanged up to the 1e-8 eps in the head-weight and row-sum denominators
    assert_scaled_close(layer_scaled, layer_base, rel=1e-4)
    # 'none' (the reference GMAR++) depends on the logit scale (oddity O1)
    rel_change = np.abs(none_scaled - none_base).max() / np.abs(none_base).max()
    assert rel_change > 0.1, rel_change


def test_rollout_and_attention_do_not_depend_on_target(f64):
    for name, params in (("rollout", None), ("rollout", {"discard_ratio": 0.5}), ("attention", None)):
        a = _explain(f64, name, params, target=[0, 1])
        b = _explain(f64, name, params, target=[9, 5])
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# 6. to_pixels
# ------------------------------------------------------------------------------------------

def _bilinear_1d_weights(n_in: int, n_out: int):
    """align_corners=False source coordinates: src = (i + .5) * n_in / n_out - .5, clamped at 0."""
    rows = []
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        rows.append((i0, i1, lam))
    return rows


def ref_to_pixels(maps: np.ndarray, size: tuple) -> np.ndarray:
    B, h, w = maps.shape
    H, W = size
    ys, xs = _bilinear_1d_weights(h, H), _bilinear_1d_weights(w, W)
    out = np.zeros((B, H, W))
    for b in range(B):
        for i, (y0, y1, ly) in enumerate(ys):
            for j, (x0, x1, lx) in enumerate(xs):
                top = (1 - lx) * maps[b, y0, x0] + lx * maps[b, y0, x1]
                bottom = (1 - lx) * maps[b, y1, x0] + lx * maps[b, y1, x1]
                out[b, i, j] = (1 - ly) * top + ly * bottom
        lo, hi = out[b].min(), out[b].max()
        out[b] = (out[b] - lo) / (hi - lo + EPS)
    return out


@pytest.mark.parametrize("grid,size", [((4, 4), (32, 32)), ((3, 5), (7, 11)), ((2, 3), (16, 24))])
def test_to_pixels_matches_numpy(grid, size):
    gen = torch.Generator().manual_seed(4)
    maps = torch.rand(3, *grid, generator=gen, dtype=torch.float64) * 5 - 1
    got = to_pixels(maps, size)
    assert got.shape == (3, *size)
    np.testing.assert_allclose(got.numpy(), ref_to_pixels(maps.numpy(), size), atol=1e-6)
    assert float(got.min()) == 0.0 and abs(float(got.max()) - 1.0) < 1e-6
    # and equals torch's own bilinear, align_corners=False, then min-max with eps
    up = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    np.testing.assert_allclose(got.numpy(), ((up - lo) / (hi - lo + EPS)).numpy(), atol=1e-6)


def test_to_pixels_zero_map_is_zero_not_nan():
    maps = torch.zeros(2, 4, 4)
    maps[1] = 1.0  # interpolates exactly in float32 too
    got = to_pixels(maps, (32, 32))
    assert not torch.isnan(got).any()
    assert torch.equal(got, torch.zeros(2, 32, 32))
    # 14x14 -> 224 (patch 16): a constant 0.05 map also gives zeros
    assert torch.equal(to_pixels(torch.full((1, 14, 14), 0.05), (224, 224)), torch.zeros(1, 224, 224))


@pytest.mark.parametrize("value", [0.05, 3.7])
def test_to_pixels_constant_map_is_zero(value):
    maps = torch.full((2, 4, 4), value)
    got = to_pixels(maps, (32, 32))
    assert not torch.isnan(got).any()
    assert float(got.abs().max()) < 1e-6  # the numpy (float64) restatement gives ~1e-9 at most
    np.testing.assert_allclose(got.numpy(), ref_to_pixels(maps.double().numpy(), (32, 32)), atol=1e-6)


def test_to_pixels_hot_patch():
    # a single hot patch: max 1 at that patch's centre, 0 far away; the per-image scale
    # does not leak between images of a batch
    hot = torch.zeros(2, 4, 4)
    hot[0, 1, 2] = 1.0
    hot[1, 3, 0] = 1000.0
    got = to_pixels(hot, (32, 32))
    assert abs(float(got[0, 12, 20]) - 1.0) < 1e-6 and float(got[0, 0, 0]) == 0.0
    assert abs(float(got[1, 28, 3]) - 1.0) < 1e-6 and float(got[1, 0, 31]) == 0.0
    np.testing.assert_allclose(got.numpy(), ref_to_pixels(hot.double().numpy(), (32, 32)), atol=1e-6)
