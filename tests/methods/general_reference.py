"""The attention methods in float64 numpy for any readout and any number of prefix tokens.

One statement of the formulas that the model-family tests (tests/models/test_timm_beit.py,
test_hf_image.py, test_timm_cait.py, test_timm_eva.py, test_torch_attention.py) check vitlens
against. It is written from docs/methods.md and the papers it cites (Abnar & Zuidema 2020 for
rollout, Jo, Jang & Park 2025 for GMAR, the GMAR-Plus research code corrected as documented for
GMAR++, Bousselham et al. 2025 for LeGrad, Chefer, Gur & Wolf 2021), not from vitlens code: this
module imports numpy and torch only, nothing of vitlens or of the tests that import it. The
CLS-readout statement of the same formulas is tests/methods/test_methods_reference.py's ``ref_*``
functions; the family tests check on their CLS-pooled models that both agree, so neither is trusted
alone.

Conventions:

* ``A[l]`` (B, K, N, N): layer l's post-softmax attention probabilities, row = query, column = key;
  ``G[l]``: the gradient of the target logit with respect to them. ``LG[(pool, l)]``: LeGrad's
  gradient of layer l's own score with respect to ``A[l]``.
* Tokens: the ``prefix`` tokens (CLS, distillation, registers) come first, then the P patches of
  the (height, width) grid in row-major order: the patch in row r, column c is token
  ``prefix + r * width + c``, and a map is the P patch columns reshaped to the grid.
* Composition over layers is a LEFT product, ``R = M^L ... M^s`` (the token update z = A v + z).
* Readout: a token-to-token matrix M becomes a patch map through the weights ``w`` (N,) of the
  token rows the classifier reads, ``(w @ M)[prefix:]`` reshaped to the grid. ``w`` is the one-hot
  CLS row for CLS pooling (the usual ``M[0, 1:]``), the mean of the patch rows for average pooling
  (see :func:`readout_vector`). LeGrad reads per-key columns directly: no readout.

The formulas (per image b; ``rownorm`` divides each row by its sum; EPS = 1e-8):

* attention: the mean over heads of the chosen layer's attention (default the last).
* rollout: fuse the heads (mean | max | min); with ``discard_ratio`` zero the lowest
  ``int(ratio * P * P)`` patch-to-patch entries of the fused matrix (prefix rows and columns never
  touched); step = rownorm(fused + residual * I); left product from ``start_layer``.
* gmar-l1 / gmar-l2: head scores g_h = sum |G_h| or ||G_h||_F, weights g_h / (sum g + EPS), the
  weighted sum of the heads' attention, then as rollout (no discard).
* gmar++: G+ = relu(G), g_h from G+ (L1 or L2), W = sum_h w_h G+_h * A_h; ``normalize='layer'``
  divides W by (its mean row sum + EPS); step = rownorm(W + residual * I), left product.
* legrad: per chosen layer, the mean over heads and ALL N query rows of relu(LG), on the patch
  key columns (prefix columns dropped); the mean over the chosen layers ('all', the last k, or a
  list).
* chefer: R = I; per layer from ``start_layer``, R <- R + (mean_h relu(G_h * A_h)) @ R.

The formulas take their parameters as keywords with no hidden defaults beyond the documented ones;
:func:`reference_params` turns a method's full parameter set into them. ``CASES`` is the table of
(method, parameters) cases the family tests with three-layer models compare on. The last section is
scaffolding those tests share: :func:`batched_and_alone` (``vitlens.explain`` is passed in) and
:func:`module_snapshot`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

EPS = 1e-8
GRID = (4, 4)
FUSIONS = {"mean": np.mean, "max": np.max, "min": np.min}

#: (method, parameters) cases a three-layer model's maps are compared on (the tests fill in the defaults)
CASES = [("attention", {}), ("attention", {"layer": 0})]
CASES += [("rollout", {"head_fusion": f, "discard_ratio": d}) for f in ("mean", "max", "min") for d in (0.0, 0.5)]
CASES += [("rollout", {"start_layer": 1, "residual": 0.5})]
CASES += [("gmar-l1", {}), ("gmar-l2", {}), ("gmar-l2", {"residual": 0.5, "start_layer": 1})]
CASES += [("gmar++", {"norm": n, "normalize": z}) for n in ("l1", "l2") for z in ("none", "layer")]
CASES += [("legrad", {"layers": la, "pool": p}) for la in ("all", 1, [0, 2]) for p in ("model", "mean")]
CASES += [("chefer", {}), ("chefer", {"start_layer": 1})]


def rownorm(m):
    """Each row divided by its own sum."""
    return m / m.sum(axis=-1, keepdims=True)


def head_scores(gradients, norm):
    """GMAR's score of each head: the L1 norm or the Frobenius norm of its gradient."""
    if norm == "l1":
        return [np.abs(g).sum() for g in gradients]
    return [math.sqrt((g ** 2).sum()) for g in gradients]


def chosen_layers(num_layers, layers):
    """LeGrad's ``layers``: 'all', the last k (an int) or a list of indices."""
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, int):
        return list(range(num_layers - layers, num_layers))
    return list(layers)


# --------------------------------------------------------------------------------------------------
# the (N, N) token-to-token matrix of each method, image b
# --------------------------------------------------------------------------------------------------

def attention_matrix(A, b, layer=-1):
    K = A[layer].shape[1]
    return sum(A[layer][b, h] for h in range(K)) / K


def rollout_matrix(A, b, prefix, head_fusion="mean", discard_ratio=0.0, start_layer=0, residual=1.0):
    n = A[0].shape[-1]
    R = None
    for layer in range(start_layer, len(A)):
        fused = FUSIONS[head_fusion](A[layer][b], axis=0)
        if discard_ratio > 0:  # the lowest patch-to-patch entries; prefix rows and columns kept
            entries = sorted((fused[i, j], i, j) for i in range(prefix, n) for j in range(prefix, n))
            for _, i, j in entries[:int(discard_ratio * (n - prefix) ** 2)]:
                fused[i, j] = 0.0
        step = rownorm(fused + residual * np.eye(n))
        R = step if R is None else step @ R  # left multiplication
    return R


def gmar_matrix(A, G, b, norm="l2", residual=1.0, start_layer=0):
    K, n = A[0].shape[1], A[0].shape[-1]
    R = None
    for layer in range(start_layer, len(A)):
        scores = head_scores([G[layer][b, h] for h in range(K)], norm)
        fused = sum(scores[h] / (sum(scores) + EPS) * A[layer][b, h] for h in range(K))
        step = rownorm(fused + residual * np.eye(n))
        R = step if R is None else step @ R
    return R


def gmar_pp_matrix(A, G, b, norm="l2", residual=1.0, normalize="none", start_layer=0):
    K, n = A[0].shape[1], A[0].shape[-1]
    R = None
    for layer in range(start_layer, len(A)):
        positive = [np.maximum(G[layer][b, h], 0.0) for h in range(K)]
        scores = head_scores(positive, norm)
        W = sum(scores[h] / (sum(scores) + EPS) * positive[h] * A[layer][b, h] for h in range(K))
        if normalize == "layer":
            W = W / (np.mean([W[i].sum() for i in range(n)]) + EPS)
        step = rownorm(W + residual * np.eye(n))
        R = step if R is None else step @ R
    return R


def chefer_matrix(A, G, b, start_layer=0):
    K, n = A[0].shape[1], A[0].shape[-1]
    R = np.eye(n)
    for layer in range(start_layer, len(A)):
        R = R + sum(np.maximum(G[layer][b, h] * A[layer][b, h], 0.0) for h in range(K)) / K @ R
    return R


def token_matrix(method, params, A, G, b, prefix=1):
    """The (N, N) matrix whose readout rows give the map of image b; ``params`` as :func:`reference_params`."""
    if method == "attention":
        return attention_matrix(A, b, **params)
    if method == "rollout":
        return rollout_matrix(A, b, prefix, **params)
    if method in ("gmar-l1", "gmar-l2"):
        return gmar_matrix(A, G, b, norm=method[-2:], **params)
    if method == "gmar++":
        return gmar_pp_matrix(A, G, b, **params)
    if method == "chefer":
        return chefer_matrix(A, G, b, **params)
    raise AssertionError(method)


# --------------------------------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------------------------------

def legrad_reference(LG, num_layers, prefix=1, layers="all", pool="model", grid=GRID):
    """(B, h, w): relu(LG) averaged over heads and all query rows, patch key columns, mean over layers."""
    chosen = chosen_layers(num_layers, layers)
    B, K, n, _ = LG[(pool, chosen[0])].shape
    out = []
    for b in range(B):
        total = np.zeros(n - prefix)
        for layer in chosen:
            per_key = sum(np.maximum(LG[(pool, layer)][b, h, i], 0.0) for h in range(K) for i in range(n)) / (K * n)
            total += per_key[prefix:]
        out.append((total / len(chosen)).reshape(grid))
    return np.stack(out)


def read_patches(M, w, prefix, grid=GRID):
    """The readout: the ``w``-weighted rows of M on the patch columns, on the grid."""
    return (w @ M)[prefix:].reshape(grid)


def general_reference(method, params, cap, w, prefix=1, grid=GRID):
    """(B, h, w) maps of ``method`` from a capture ``cap`` ({"A", "G", "LG"}) read with the row weights w."""
    if method == "legrad":  # reads every query row: no readout
        return legrad_reference(cap["LG"], len(cap["A"]), prefix, grid=grid, **params)
    B = cap["A"][0].shape[0]
    return np.stack([read_patches(token_matrix(method, params, cap["A"], cap["G"], b, prefix), w, prefix, grid)
                     for b in range(B)])


def reference_params(method, resolved):
    """The keyword arguments of the formulas above from a method's full parameters (defaults filled in):
    GMAR's norm is in the method's name, not a parameter."""
    params = dict(resolved)
    assert params.pop("libragrad", False) is False  # the ordinary gradients (LibraGrad: test_libragrad.py)
    if method in ("gmar-l1", "gmar-l2"):
        params.pop("norm")
    return params


def readout_vector(pool, prefix, n):
    """The row weights (N,) of a pooling: 'cls' (timm's 'token'): the CLS row; 'mean' (timm's 'avg'): the
    mean of the patch rows; 'mean-all': the mean of every row; 'cls+mean': half each of 'cls' and 'mean'
    (Hugging Face DINOv2's head on cat(CLS, mean of the patch tokens))."""
    w = np.zeros(n)
    if pool in ("cls", "token"):
        w[0] = 1.0
    elif pool in ("mean", "avg"):
        w[prefix:] = 1.0 / (n - prefix)
    elif pool == "mean-all":
        w[:] = 1.0 / n
    elif pool == "cls+mean":
        w[0] = 0.5
        w[prefix:] = 0.5 / (n - prefix)
    else:
        raise AssertionError(pool)
    return w


# --------------------------------------------------------------------------------------------------
# scaffolding of the family tests
# --------------------------------------------------------------------------------------------------

def batched_and_alone(explain, model, x, methods):
    """(map of image i in a batch, map of image i explained alone) pairs, numpy, for every method and image:
    the two images of ``x`` and one more random one, targets 1, 4, 7, with LeGrad's 'mean' score and
    rollout's discard. ``explain`` is ``vitlens.explain``, passed in: this module imports no vitlens."""
    x = torch.cat([x, torch.randn(1, *x.shape[1:], dtype=x.dtype, generator=torch.Generator().manual_seed(8))])
    targets = [1, 4, 7]
    params = {name: value for name, value in {"legrad": {"pool": "mean"}, "rollout": {"discard_ratio": 0.5}}.items()
              if name in methods}
    batch = explain(model, x, methods=methods, target=targets, params=params)
    pairs = []
    for i, t in enumerate(targets):
        single = explain(model, x[i:i + 1], methods=methods, target=t, params=params)
        pairs += [(batch.patch_maps[name][i].numpy(), single.patch_maps[name][0].numpy()) for name in methods]
    return pairs


def module_snapshot(module, *extra):
    """Everything a call could leave behind on each submodule: attribute names, mode, forward / pre / backward
    hooks, an instance ``forward``, and ``f(submodule)`` for each family-specific ``f`` in ``extra``."""
    return {name: (sorted(m.__dict__), m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks),
                   dict(m._backward_hooks), "forward" in m.__dict__, *(f(m) for f in extra))
            for name, m in module.named_modules()}
