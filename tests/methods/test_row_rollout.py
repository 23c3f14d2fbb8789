"""The rollout family reads only the readout rows of the rollout, applied right to left as a row vector
(methods/common.py): the maps equal the previous implementation, which built every layer's row-normalised
(N, N) matrix with an identity and multiplied the matrices, to float32 rounding."""

from __future__ import annotations

import pytest
import torch

from vitlens.methods.chefer import chefer_rollout
from vitlens.methods.common import Captured, readout_rows
from vitlens.methods.gmar import gmar, normalized_head_weights
from vitlens.methods.gmar_pp import gmar_plus_plus, gradient_weighted_attention
from vitlens.methods.rollout import attention_rollout, discard_lowest
from vitlens.methods.transformer_attribution import transformer_attribution

B, K, N, L, PREFIX, GRID = 3, 4, 1 + 2 + 16, 5, 3, (4, 4)


def previous_add_residual(matrix, alpha):
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype)
    augmented = matrix + alpha * eye
    return augmented / augmented.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(matrix.dtype).tiny)


def previous_compose(matrices):
    result = matrices[0]
    for m in matrices[1:]:
        result = m @ result
    return result


def previous_identity_rollout(layers):
    relevance = torch.eye(layers[0].shape[-1], dtype=layers[0].dtype).expand_as(layers[0]).clone()
    for layer in layers:
        relevance = relevance + layer @ relevance
    return relevance


@pytest.fixture(params=["cls", "per-image", "mean"])
def captured(request):
    g = torch.Generator().manual_seed(0)
    attentions = [torch.softmax(3 * torch.randn(B, K, N, N, generator=g), dim=-1) for _ in range(L)]
    gradients = [torch.randn(B, K, N, N, generator=g) * 1e-3 for _ in range(L)]
    relevance = [torch.randn(B, K, N, N, generator=g) * 1e-2 for _ in range(L)]
    if request.param == "cls":
        readout = torch.zeros(N)
        readout[0] = 1.0
    elif request.param == "per-image":  # SigLIP-style pooling attention: one readout row per image
        readout = torch.softmax(torch.randn(B, N, generator=g), dim=-1)
    else:  # average pooling over the patches
        readout = torch.cat([torch.zeros(PREFIX), torch.full((N - PREFIX,), 1.0 / (N - PREFIX))])
    return Captured(attentions=attentions, gradients=gradients, readout=readout, num_prefix=PREFIX, grid=GRID,
                    attention_relevance=relevance)


def close(mine, previous):
    scale = previous.abs().amax().clamp_min(1e-30)
    torch.testing.assert_close(mine / scale, previous / scale, atol=2e-6, rtol=0)


@pytest.mark.parametrize("fusion, discard, residual, start", [("mean", 0.0, 1.0, 0), ("max", 0.5, 1.0, 1),
                                                              ("min", 0.9, 0.0, 0), ("mean", 0.3, 0.5, 2)])
def test_rollout(captured, fusion, discard, residual, start):
    matrices = [previous_add_residual(discard_lowest(a.mean(1) if fusion == "mean" else
                                                     (a.amax(1) if fusion == "max" else a.amin(1)), discard, PREFIX),
                                      residual) for a in captured.attentions[start:]]
    previous = readout_rows(previous_compose(matrices), captured)
    close(attention_rollout(captured, fusion, discard, start, residual), previous)


@pytest.mark.parametrize("norm, residual", [("l1", 1.0), ("l2", 0.25)])
def test_gmar(captured, norm, residual):
    matrices = [previous_add_residual(torch.einsum("bk,bknm->bnm", normalized_head_weights(g, norm), a), residual)
                for a, g in zip(captured.attentions, captured.gradients)]
    close(gmar(captured, norm, residual), readout_rows(previous_compose(matrices), captured))


@pytest.mark.parametrize("normalize", ["none", "layer"])
def test_gmar_plus_plus(captured, normalize):
    matrices = []
    for a, g in zip(captured.attentions[1:], captured.gradients[1:]):
        weighted = gradient_weighted_attention(a, g, "l2")
        if normalize == "layer":
            weighted = weighted / (weighted.sum(-1).mean(-1)[:, None, None] + 1e-8)
        matrices.append(previous_add_residual(weighted, 1.0))
    previous = readout_rows(previous_compose(matrices), captured)
    close(gmar_plus_plus(captured, "l2", 1.0, normalize, start_layer=1), previous)


@pytest.mark.parametrize("start", [0, 2])
def test_chefer_and_transformer_attribution(captured, start):
    layers = [(g * a).clamp_min(0).mean(1) for a, g in zip(captured.attentions[start:], captured.gradients[start:])]
    close(chefer_rollout(captured, start), readout_rows(previous_identity_rollout(layers), captured))
    layers = [(g * r).clamp_min(0).mean(1)
              for r, g in zip(captured.attention_relevance[start:], captured.gradients[start:])]
    close(transformer_attribution(captured, start), readout_rows(previous_identity_rollout(layers), captured))


def test_a_zero_row_without_residual_stays_zero(captured):
    """residual 0 and a discard that empties rows: no NaN (a zero row of M + 0 I is a zero row of the rollout)."""
    for a in captured.attentions:
        a[:, :, 5] = 0.0  # token 5 attends to nothing in any layer
    matrices = [previous_add_residual(a.mean(1), 0.0) for a in captured.attentions]
    mine = attention_rollout(captured, residual=0.0)
    assert torch.isfinite(mine).all()
    close(mine, readout_rows(previous_compose(matrices), captured))


def test_the_engine_reduces_the_attention_gradients_during_the_backward(monkeypatch):
    """Images: with only rollout-family gradient methods, the methods get each layer's term (computed by a hook as
    the backward produces the gradient) and no gradients; a method without a term keeps the full gradients. The
    maps are those of the terms computed from the full gradients."""
    import vitlens
    import vitlens.methods as registry
    from tests.conftest import tiny_timm_vit

    seen = []
    spec = registry.REGISTRY["chefer"]
    original = spec.function

    def spy(captured, **params):
        seen.append((captured.gradients is None, len(captured.layer_terms)))
        return original(captured, **params)

    monkeypatch.setitem(registry.REGISTRY, "chefer", type(spec)(**{**spec.__dict__, "function": spy}))
    model = vitlens.load_model(tiny_timm_vit())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reduced = vitlens.explain(model, x, methods="chefer,gmar-l2,gmar++", target="top2", warn=False)
    assert seen == [(True, 3), (True, 3)]  # per target slot: no gradients, one term list per (term, params)
    seen.clear()
    full = vitlens.explain(model, x, methods="chefer,gmar-l2,gmar++,attention-gradcam", target="top2", warn=False)
    assert seen == [(False, 0), (False, 0)]  # attention-gradcam reads the gradient itself
    for name in ("chefer", "gmar-l2", "gmar++"):
        torch.testing.assert_close(reduced.patch_maps[name], full.patch_maps[name], atol=1e-6, rtol=1e-5)


def test_a_layer_the_backward_does_not_reach_gets_its_own_backward():
    """_reducing asks the backward for the first attention only; a later attention that does not lead to it gets
    its gradient from one more backward, reduced the same way (no layer is left without its term)."""
    from vitlens.engine import _grads, _reducing
    from vitlens.models import AttentionRecorder

    first = torch.rand(1, 2, 3, 3, requires_grad=True)
    second = torch.rand(1, 2, 3, 3, requires_grad=True)  # independent of the first
    score = (2 * first).sum() + (first * second * 3).sum()
    recorder = AttentionRecorder()
    recorder.on_probabilities(0, first)
    recorder.on_probabilities(1, second)

    def term(attention, gradient):
        return (gradient * attention).sum(dim=1)

    terms, store = [(term, ())], {}
    with _reducing(recorder, terms, store, lambda t: t, score):
        _grads(score, [first])
    expected_first = ((2 + 3 * second.detach()) * first.detach()).sum(dim=1)
    expected_second = (3 * first.detach() * second.detach()).sum(dim=1)
    torch.testing.assert_close(store[(term, ())][0], expected_first)
    torch.testing.assert_close(store[(term, ())][1], expected_second)
