"""Checks every model family's tests run the same way: one copy, called with the family's own model.

Each takes what only the family knows (its module, its explicit relevance propagation, how to call it)
and asserts what every adapter must guarantee.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

import vitlens
from tests.methods.general_reference import batched_and_alone, general_reference, module_snapshot, reference_params
from tests.methods.test_methods_reference import assert_scaled_close
from vitlens.engine import run_batch
from vitlens.methods import REGISTRY
from vitlens.models import AttentionRecorder


def layer_norm(t, ln):
    """``ln`` (a LayerNorm module) applied from its parameters."""
    return F.layer_norm(t, (t.shape[-1],), ln.weight, ln.bias, ln.eps)


def linear(t, lin):
    """``lin`` (a Linear module) applied from its parameters."""
    return F.linear(t, lin.weight, lin.bias)


def eager_copy(module):
    """A deep copy of a Hugging Face model with every config's attention implementation set to 'eager'."""
    eager = copy.deepcopy(module)
    for m in eager.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"
    return eager


def reference_gradients(m, targets, logits, attentions, outputs, normed, model_score, mean_score):
    """The reference capture from a restated forward: attention probabilities ``A``, the target logits'
    gradients ``G`` with respect to them, LeGrad's per-layer gradients ``LG`` of ``model_score(m, z)`` /
    ``mean_score(m, z)`` on each block output, the logits, and Grad-CAM's (activation, gradient) of the last
    pre-attention norm."""
    t = torch.tensor(targets).view(-1, 1)
    grads = torch.autograd.grad(logits.gather(1, t).sum(), attentions + [normed[-1]], retain_graph=True)
    layer_grads = {}
    for layer, (z, a) in enumerate(zip(outputs, attentions)):
        for pool, read in (("model", model_score), ("mean", mean_score)):
            s = read(m, z).gather(1, t).sum()
            layer_grads[(pool, layer)] = torch.autograd.grad(s, a, retain_graph=True)[0].numpy().copy()
    return {"A": [a.detach().numpy().copy() for a in attentions], "G": [g.numpy().copy() for g in grads[:-1]],
            "LG": layer_grads, "logits": logits.detach(), "cam": (normed[-1].detach(), grads[-1])}


def explain_one(model, x, method, params, targets, grid=None):
    """One method's (B, H, W) map for ``targets`` and its fully resolved parameters; with ``grid``, the map is
    float64 on that grid."""
    result = vitlens.explain(model, x, methods=[method], target=targets, params={method: params} if params else None)
    actual = result.patch_maps[method][:, 0]
    if grid is not None:
        assert actual.dtype == torch.float64 and actual.shape == (x.shape[0], *grid)
    return actual, reference_params(method, REGISTRY[method].params(params))


def per_image_reference(method, params, cap, prefix):
    """general_reference read with each image's own readout row (``cap['readout']``, (B, N): a pooling head's)."""
    out = []
    for b in range(cap["A"][0].shape[0]):
        one = {"A": [a[b:b + 1] for a in cap["A"]], "G": [g[b:b + 1] for g in cap["G"]],
               "LG": {key: g[b:b + 1] for key, g in cap["LG"].items()}}
        out.append(general_reference(method, params, one, cap["readout"][b], prefix)[0])
    return np.stack(out)


def check_per_image_reference(model, x, method, params, targets, cap, prefix, grid):
    """One method's map equals :func:`per_image_reference` (to float64 rounding of its scale) and differs between
    the two images; returns (the method's resolved parameters, the reference)."""
    actual, full = explain_one(model, x, method, params, targets, grid=grid)
    expected = per_image_reference(method, full, cap, prefix)
    assert_scaled_close(actual.numpy(), expected)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3 * np.abs(expected).max()  # not degenerate
    return full, expected


def check_gradcam_formula(model, x, targets, cam, grid, prefix=1):
    """Grad-CAM on the default layer == the formula on the reference's (activation, gradient) of that layer,
    its ``prefix`` tokens dropped and the patch tokens laid on ``grid``."""
    result = vitlens.explain(model, x, methods=["gradcam"], target=targets)
    activation, gradient = cam
    a = activation[:, prefix:].reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2)
    g = gradient[:, prefix:].reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2)
    expected = (g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1).clamp_min(0)
    assert_scaled_close(result.patch_maps["gradcam"][:, 0].numpy(), expected.numpy())


def check_capture_keeps_the_logits(model, x, reference_attentions, grad, shape=None):
    """Inside a capture (with or without gradients) the logits are unchanged, the recorded attention
    probabilities are the reference's (of ``shape``), and LeGrad's score of the last block output is the logit
    with the model's pooling and another one with the mean of all tokens. Returns the plain logits."""
    with torch.no_grad():
        plain = model.logits(x)
    recorder = AttentionRecorder(keep_block_outputs=True)
    with torch.set_grad_enabled(grad), model.capture(recorder):
        captured = model.logits(x)
    assert (captured - plain).abs().max() <= 1e-12
    assert len(recorder.attentions) == len(recorder.block_outputs) == len(reference_attentions)
    for mine, theirs in zip(recorder.attentions, reference_attentions):
        if shape is not None:
            assert mine.shape == shape
        np.testing.assert_allclose(mine.detach().numpy(), theirs, rtol=0, atol=1e-12)
    last = recorder.block_outputs[-1]
    assert (model.layer_logits(last) - plain).abs().max() <= 1e-12
    assert (model.layer_logits(last, pool="mean") - plain).abs().max() > 1e-2
    return plain


def check_batched_equals_alone(model, x, methods):
    """Each image's maps in a batch equal its maps explained alone (to 1e-9 of their scale)."""
    for batched, alone in batched_and_alone(vitlens.explain, model, x, methods):
        assert_scaled_close(batched, alone, rel=1e-9)


def check_module_as_given(model, module, state, *snapshot_extra, also=()):
    """Explaining with every method, then without gradients (and with each method list in ``also``), leaves
    ``module`` as it was: its :func:`module_snapshot` (with ``snapshot_extra``: modes, fused-attention and
    checkpointing flags...), its ``state`` (taken before loading), which parameters require gradients, and no
    gradients. Returns the (2, 3, 32, 32) float64 batch it explained."""
    before = module_snapshot(module, *snapshot_extra)
    trainable = [p.requires_grad for p in module.parameters()]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for methods in ("all", ["attention"], *also):  # ["attention"]: a call without gradients
        vitlens.explain(model, x, methods=methods)
    assert module_snapshot(module, *snapshot_extra) == before
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())
    assert [p.requires_grad for p in module.parameters()] == trainable
    return x


def check_lrp_against_reference(module, reference_relevance, variant, conv_gamma, lin_gamma, min_scale,
                                check_sum=True, logits_of=None):
    """AttnLRP / CP-LRP on a (2, 3, 16, 16) float64 batch with two targets per image equal
    ``reference_relevance(module, x_b, target, variant, conv_gamma, lin_gamma) -> (relevance, logits)``
    to 1e-7 of the map's scale; the reported target logit (and relevance sum) are the reference's.
    ``logits_of(module, x)``, when given, checks that the written-out reference forward is the model's."""
    model = vitlens.load_model(copy.deepcopy(module))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[1, 4], [0, 2]])
    result = run_batch(model, x, {variant: {"conv_gamma": conv_gamma, "lin_gamma": lin_gamma}}, targets)
    relevance = result.patch_maps[variant]
    assert relevance.shape == (2, 2, 16, 16)
    model_logits = None
    if logits_of is not None:
        with torch.no_grad():
            model_logits = logits_of(module, x)
    for b in range(2):
        for slot in range(2):
            with torch.no_grad():
                expected, logits = reference_relevance(module, x[b], int(targets[b, slot]), variant, conv_gamma,
                                                       lin_gamma)
            if model_logits is not None:
                assert torch.allclose(logits, model_logits[b], rtol=0, atol=1e-12)
            scale = float(expected.abs().max())
            assert scale > min_scale  # a real signal
            err = float((relevance[b, slot] - expected).abs().max())
            assert err <= 1e-7 * scale, (variant, b, slot, err, scale)
            assert torch.isclose(result.extras[variant]["target_logit"][b, slot], logits[targets[b, slot]])
            if check_sum:
                assert torch.isclose(result.extras[variant]["relevance_sum"][b, slot], expected.sum())


def check_bystander_untouched(explained, bystander, call=None):
    """Another model of the same class runs unchanged (and reports nothing) inside ``explained``'s capture."""
    call = call or (lambda module, x: module(x))
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = call(bystander, x)
        recorder = AttentionRecorder()
        with explained.capture(recorder):
            assert torch.equal(call(bystander, x), expected)
    assert recorder.attentions == []


def check_gradient_checkpointing_restored(module, methods):
    """With timm gradient checkpointing on, the maps are those without it and the user's setting is back."""
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    plain = vitlens.explain(vitlens.load_model(copy.deepcopy(module)), x, methods=methods, target=2)
    module.set_grad_checkpointing(True)
    result = vitlens.explain(vitlens.load_model(module), x, methods=methods, target=2)
    assert module.grad_checkpointing is True  # the user's setting is back
    for name in methods:
        assert_scaled_close(result.patch_maps[name].numpy(), plain.patch_maps[name].numpy(), rel=1e-12)
