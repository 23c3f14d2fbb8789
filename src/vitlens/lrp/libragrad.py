"""LibraGrad (Mehri, Soleymani Baghshah & Pilehvar, CVPR 2025): the backward of a transformer with its gradient
flow balanced, for the gradient methods that read it.

LibraGrad keeps the forward and changes only the backward, by pruning and scaling backward paths, as its
public code does (``notebooks/llama3.ipynb`` of NightMachinery/LibraGrad, "the primary reference
implementation", and the ``LibraGrad`` preset of NightMachinery/decompv-libragrad-v1 = gradient brand ``LX1``
with ``DU`` in NightMachinery/pytorch-image-models-libragrad-v1):

* attention: queries and keys detached, so no gradient flows through the softmax; the values and the
  attention weights as constants carry it (``fair_qkv``, gradient mode ``LineX_1``);
* LayerNorm / RMSNorm: the variance (the root mean square) detached, mean-centring and the affine map
  differentiable (``LayerNormDecomposed``, ``LineX_1``);
* gated activations x * g(x) (GELU = x Phi(x), SiLU = x sigmoid(x)): the gate g(x) detached, so the
  gradient is g(x) = f(x) / x (``GELUDecomposed``, ``LineX_ZO``);
* the element-wise product of a gated MLP (SwiGLU, Llama): the gradient halved (``DU``, ``swap_backward(x, x / 2)``);
* linear layers and convolutions: the ordinary gradient.

These are, rule for rule, the rules :mod:`vitlens.lrp.composite` applies for CP-LRP with gamma 0 (Q and K
constant, LayerNorm with a constant standard deviation, the identity rule f(x)/x for element-wise
activations, the uniform rule on the gate product, LRP-0 = the plain gradient for every linear map), so
LibraGrad's pass is a pass with :data:`LIBRAGRAD` set on the instance (:func:`vitlens.lrp.lrp_rules` and a
:class:`LibraRecorder`), restored when it ends. What a gradient method reads in that pass (the
gradient at the attention maps, at a Grad-CAM layer) is its LibraGrad version; x * gradient at the input would
be Libra Input x Gradient, which is ``cp-lrp`` with ``conv_gamma=0, lin_gamma=0``.
"""

from __future__ import annotations

import torch

from vitlens.lrp.composite import LRPConfig, LRPRecorder
from vitlens.models.capture import masked_scores

#: LibraGrad's backward as a rule set (see the module docstring)
LIBRAGRAD = LRPConfig("cp-lrp", conv_gamma=0.0, lin_gamma=0.0)


class LibraRecorder(LRPRecorder):
    """Attention with queries and keys detached; the probabilities a gradient method differentiates.

    The probabilities are computed from constants, so no gradient reaches q or k; they still multiply the
    values, and with grad enabled they are marked as requiring grad, so that d(score)/dA exists for the
    methods that read it (Libra GenAtt, GMAR...). Projections keep the plain gradient (gamma 0).
    """

    def __init__(self):
        super().__init__(LIBRAGRAD)

    def attend(self, q, k, v, scale, layer, mask=None):
        scores = (q.detach() * scale) @ k.detach().transpose(-2, -1)
        probs = masked_scores(scores, mask).softmax(dim=-1)
        if torch.is_grad_enabled():
            probs.requires_grad_(True)
        self.on_probabilities(layer, probs)
        return probs @ v


def libragrad_refusal(model) -> str | None:
    """Why ``model`` cannot run a LibraGrad pass (one line), or None when it can.

    The pass needs the model's attention computed by vitlens (the recorder detaches queries and keys), the
    same condition as CP-LRP: a model that refuses ``cp-lrp`` refuses LibraGrad for the same reason, and a
    model without attention (a CNN) has no gradient flow for it to balance.
    """
    if not getattr(model, "has_attention", True):
        return (f"LibraGrad balances the gradient flow of transformers (attention, LayerNorm, GELU); "
                f"{type(model.module).__name__} has no attention")
    refused = model.unsupported_methods() if hasattr(model, "unsupported_methods") else {}
    if "cp-lrp" in refused:
        return f"LibraGrad needs the attention rules of cp-lrp here: {refused['cp-lrp']}"
    return None


__all__ = ["LIBRAGRAD", "LibraRecorder", "libragrad_refusal"]
