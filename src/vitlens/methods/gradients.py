"""Gradient baselines on the model's input: saliency, input x gradient, integrated gradients.

The input is what the gradient starts from (the engine's leaf): the preprocessed pixels (B, C, H, W)
of an image, the word embeddings (one (C, n) block per sequence, laid out as (1, C, 1, n)) of a text.
``x`` is that input, ``g = d y_c / d x`` the gradient of the target score at it (one backward of the
shared pass, with every other method's gradients). Per position (pixel or token) the C channels
(colours, embedding dimensions) are reduced:

* ``saliency`` (Simonyan, Vedaldi & Zisserman 2014): ``|g|`` per channel as captum's ``Saliency``
  (``abs=True``) returns it, then ``max`` over channels (the paper's image maps), ``l2`` (the
  Euclidean norm, inseq's default ``vnorm`` aggregation of token attributions) or ``sum``
  (captum's visualisation: the sum of absolute values). Unsigned.
* ``input-x-gradient`` (Shrikumar et al. 2016): ``sum_c x_c g_c``, captum's ``InputXGradient``
  summed over channels. Signed. (Equal to LRP-0 on a network of linear layers and ReLUs.)
* ``integrated-gradients`` (Sundararajan, Taly & Yan 2017), computed by captum's
  ``IntegratedGradients``: ``(x - x') * int_0^1 g(x' + a (x - x')) da`` per channel, the integral
  approximated with ``steps`` points of captum's rule ``method`` (default Gauss-Legendre, captum's),
  then summed over channels. Signed; the attributions sum to ``y_c(x) - y_c(x')`` up to the
  integration error. It runs the model itself: ``steps`` forwards and backwards on interpolated copies
  of the batch, ``batch`` copies per forward.
"""

from __future__ import annotations

from typing import Callable

import torch

from vitlens.errors import MethodError
from vitlens.methods.common import Captured

#: how saliency reduces the channels of |gradient| at one position
SALIENCY_REDUCTIONS = ("max", "l2", "sum")
#: captum's quadrature rules for integrated gradients
IG_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
#: the reference input x' of integrated gradients: zeros in the model's input space (images: the
#: normalisation mean colour; text: the zero embedding), black pixels (images), or the unknown token's
#: embedding at every position (text, end-of-sequence tokens kept: inseq's default)
IG_BASELINES = ("zero", "black", "unk")


def available_baselines(model) -> tuple:
    """The baselines integrated gradients has for a model's input: ``zero`` and ``black`` for images; ``zero``
    and, when the tokenizer has an unknown token, ``unk`` for text."""
    if hasattr(model, "text_family"):
        unk = getattr(getattr(model, "tokenizer", None), "unk_token_id", None)
        return ("zero", "unk") if unk is not None else ("zero",)
    return ("zero", "black")


def _input_gradient(captured: Captured) -> tuple:
    if captured.input_gradient is None:
        raise MethodError("the input gradient was not captured")
    return captured.input_gradient


def saliency(captured: Captured, reduce: str = "max") -> torch.Tensor:
    """Saliency (B, H, W): |d y_c / d x| reduced over the channels (dim 1) by ``reduce``."""
    _, grad = _input_gradient(captured)
    magnitude = grad.abs()
    if reduce == "max":
        return magnitude.amax(dim=1)
    if reduce == "l2":
        return grad.norm(dim=1)
    if reduce == "sum":
        return magnitude.sum(dim=1)
    raise MethodError(f"method 'saliency': unknown reduce {reduce!r}: expected one of {', '.join(SALIENCY_REDUCTIONS)}")


def input_x_gradient(captured: Captured) -> torch.Tensor:
    """Input x gradient (B, H, W): sum over channels of x * d y_c / d x, signed."""
    x, grad = _input_gradient(captured)
    return (x * grad).sum(dim=1)


def integrated_gradients(inputs: torch.Tensor, score_fn: Callable, baselines: dict, num_targets: int,
                         steps: int = 50, baseline: str = "zero", method: str = "gausslegendre",
                         batch: int = 64) -> torch.Tensor:
    """Integrated gradients of every target slot, per input element: (B, K, *inputs.shape[1:]).

    ``score_fn(x, rows)`` runs the model on copies ``x`` of the batch rows ``rows`` (a LongTensor, one per
    copy) and returns their (len(rows), K) target scores with the graph; ``baselines`` maps the baseline
    names this input has to tensors broadcastable to ``inputs``. The element-wise attributions are
    captum's ``IntegratedGradients(score_fn).attribute(inputs, x', target=slot, n_steps=steps,
    method=method, internal_batch_size=...)`` with all K target slots of all B rows in one call (B K copies
    per integration point); ``batch`` bounds the copies per forward (at least B K).
    """
    from captum.attr import IntegratedGradients

    if baseline not in baselines:
        raise MethodError(f"method 'integrated-gradients': baseline={baseline!r} is not available for this input: "
                          f"use {', '.join(baselines)}")
    reference = torch.as_tensor(baselines[baseline]).to(device=inputs.device, dtype=inputs.dtype)
    reference = reference.expand_as(inputs)
    # every target slot of every row at once: row b's copy for slot k is row b * K + k, explaining column k
    batch_size = inputs.shape[0]
    rows = torch.arange(batch_size, device=inputs.device).repeat_interleave(num_targets)
    slots = torch.arange(num_targets, device=inputs.device).repeat(batch_size)
    attribution = IntegratedGradients(score_fn).attribute(
        inputs.repeat_interleave(num_targets, dim=0), baselines=reference.repeat_interleave(num_targets, dim=0),
        target=slots, additional_forward_args=(rows,), n_steps=steps, method=method,
        internal_batch_size=max(int(batch), rows.numel()))
    return attribution.detach().reshape(batch_size, num_targets, *inputs.shape[1:])


__all__ = ["IG_BASELINES", "IG_RULES", "SALIENCY_REDUCTIONS", "available_baselines", "input_x_gradient",
           "integrated_gradients", "saliency"]
