"""Checks every model family's tests run the same way: one copy, called with the family's own model.

Each takes what only the family knows (its module, its explicit relevance propagation, how to call it)
and asserts what every adapter must guarantee.
"""

from __future__ import annotations

import copy

import torch

import vitlens
from tests.methods.test_methods_reference import assert_scaled_close
from vitlens.engine import run_batch
from vitlens.models import AttentionRecorder


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
