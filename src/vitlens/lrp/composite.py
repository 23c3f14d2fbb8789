"""Where the LRP rules apply: a scoped preparation of one model instance.

Rules (``rules.py``) say *what* a layer does to relevance; this module says *where* each applies
(zennit's composite idea): every ``nn.Linear`` gets Gamma(``lin_gamma``) — including the attention
projections, which are called as modules in the adapters' explicit attention, and the packed
``in_proj`` of ``nn.MultiheadAttention`` through :meth:`LRPRecorder.linear` — every ``nn.Conv2d``
Gamma(``conv_gamma``), every LayerNorm the std-detached form, every element-wise activation
module the identity rule, and attention the AttnLRP (uniform rule on Q K^T and A V) or CP-LRP
(Q and K constant) form. Everything is undone when the block ends; no class is touched.
With ``attention_gamma=False`` the attention's projections (the linear layers inside attention modules,
:func:`attention_projections`, and the packed projections applied through :meth:`LRPRecorder.linear`) keep
the plain LRP-0 rule instead of Gamma(``lin_gamma``): LXT's torchvision setup, whose zennit hooks never fire
inside ``nn.MultiheadAttention`` (it uses its projection weights without calling them as modules).

Decoder language models add three module kinds: Hugging Face's ``Conv1D`` (GPT-2's projections,
``x @ W + b`` with W of shape (in, out): a linear layer, so Gamma(``lin_gamma``) on W^T), RMSNorm
(Llama, Mistral, Qwen, ``nn.RMSNorm``: the root mean square as a constant, like LayerNorm's
standard deviation) and the gated MLP ``down(act(gate(x)) * up(x))`` (the gate product is a
bilinear product: uniform rule). Rotary position embeddings are linear in q and k for a given
position and keep the plain gradient; grouped-query attention repeats keys and values per head
group, also plain gradient. RoBERTa-style classification heads call ``torch.tanh`` as a function;
their forward gets the identity rule on it. ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``
keep their activation as a plain function (``F.relu``, ``F.gelu``) in the instance attribute
``activation``: that attribute is swapped for the identity rule on the same function.

timm's gated MLPs (``SwiGLU``: ``fc2(norm(act(fc1_g(x)) * fc1_x(x)))``, ``GluMlp``: one packed ``fc1``
whose halves are the gate and the value; EVA-02, BEiT with ``swiglu_mlp``) get the same uniform rule on their
gate product; their activation module gets the identity rule like any other.

Hugging Face DINOv2's SwiGLU MLP (``use_swiglu_ffn``: ``Dinov2SwiGLUFFN``, ``down_proj(act_fn(gate_proj(x))
* up_proj(x))``, the same product as the gated MLP above under another name) gets the same rule.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from vitlens.lrp.rules import (gamma_conv2d, gamma_linear, identity_rule, layer_norm_std_detached,
                               rms_norm_std_detached, uniform_matmul, uniform_mul)
from vitlens.models.capture import AttentionRecorder, attribute_set, masked_scores, swapped_forward

ACTIVATIONS = (nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.Softplus, nn.ELU, nn.LeakyReLU, nn.Hardswish)
#: Hugging Face RMSNorm classes of the form ``weight * x * rsqrt(mean(x^2) + variance_epsilon)``
#: (Gemma's ``(1 + weight)`` form is deliberately not listed)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "T5LayerNorm")


@dataclass(frozen=True)
class LRPConfig:
    """Which LRP variant and Gamma strengths."""

    variant: str = "attnlrp"  # or "cp-lrp"
    conv_gamma: float = 1.0
    lin_gamma: float = 0.5
    #: Gamma(``lin_gamma``) on the attention's q/k/v and output projections too (True), or the plain LRP-0
    #: rule there (False: what LXT's torchvision setup computes, see :func:`attention_projections`)
    attention_gamma: bool = True

    def __post_init__(self):
        if self.variant not in ("attnlrp", "cp-lrp"):
            raise ValueError(f"unknown LRP variant {self.variant!r}")
        for name in ("conv_gamma", "lin_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.attention_gamma, bool):
            raise ValueError(f"attention_gamma must be True or False, got {self.attention_gamma!r}")

    @property
    def projection_gamma(self) -> float:
        """The Gamma of the attention projections: ``lin_gamma``, or 0 (LRP-0) without ``attention_gamma``."""
        return self.lin_gamma if self.attention_gamma else 0.0


class LRPRecorder(AttentionRecorder):
    """Attention with the AttnLRP / CP-LRP rules, projections with the Gamma rule."""

    rules_attention = True

    def __init__(self, config: LRPConfig):
        super().__init__()
        self.config = config

    def attend(self, q, k, v, scale, layer, mask=None):
        if self.config.variant == "cp-lrp":
            # queries and keys as constants: the attention weights only route relevance through V
            scores = (q.detach() * scale) @ k.detach().transpose(-2, -1)
            probs = masked_scores(scores, mask).softmax(dim=-1)
            self.on_probabilities(layer, probs)
            return probs @ v
        scores = uniform_matmul(q * scale, k.transpose(-2, -1))
        probs = masked_scores(scores, mask).softmax(dim=-1)  # softmax rule = its gradient x input
        self.on_probabilities(layer, probs)
        return uniform_matmul(probs, v)

    def linear(self, x, weight, bias):
        # only attention projections go through the recorder (packed in_proj, BEiT / EVA qkv)
        return gamma_linear(x, weight, bias, self.config.projection_gamma)

    def normalize(self, t):
        # cosine attention's q / ||q|| (Swin-V2) with the norm a constant, as LayerNorm's standard deviation:
        # the relevance passes through unchanged (F.normalize's forward: the norm clamped at 1e-12)
        return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12).detach()


def _is_activation(module: nn.Module) -> bool:
    if isinstance(module, ACTIVATIONS):
        return True
    # transformers' activation classes, and timm's own element-wise ones (timm.layers.activations.GELU is no
    # nn.GELU: Swin-V2's MLPs use it)
    return (type(module).__module__.startswith("transformers.activations")
            or type(module).__module__ == "timm.layers.activations")


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (a linear layer with a transposed weight)."""
    return (type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")
            and getattr(module, "weight", None) is not None and module.weight.dim() == 2)


def _rms_norm_eps(module: nn.Module):
    """The epsilon of a supported RMSNorm module, or None when ``module`` is not one."""
    if isinstance(module, getattr(nn, "RMSNorm", ())):
        if tuple(module.normalized_shape) != tuple(module.normalized_shape[-1:]):
            return None  # only the last dimension is handled
        return module.eps if module.eps is not None else torch.finfo(torch.float32).eps
    if type(module).__name__ in RMS_NORMS and hasattr(module, "variance_epsilon"):
        return float(module.variance_epsilon)
    return None


def _is_gated_mlp(module: nn.Module) -> bool:
    """``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: Llama, Mistral, Qwen2/3 MLPs."""
    return type(module).__name__.endswith("MLP") and all(
        isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


#: Hugging Face gated MLPs not named ``*MLP`` whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
HF_GATED_FFNS = ("Dinov2SwiGLUFFN", "Dinov2WithRegistersSwiGLUFFN")


def _is_hf_gated_ffn(module: nn.Module) -> bool:
    """DINOv2's SwiGLU FFN (exactly these transformers classes: a subclass may compute something else)."""
    return (type(module).__name__ in HF_GATED_FFNS and type(module).__module__.startswith("transformers.")
            and all(isinstance(getattr(module, name, None), nn.Module)
                    for name in ("gate_proj", "up_proj", "down_proj", "act_fn")))


#: timm's gated MLPs (``timm.layers.mlp``), read by their attribute names
TIMM_GLU_PARTS = {"SwiGLU": ("fc1_g", "fc1_x", "act", "drop1", "norm", "fc2", "drop2"),
                  "GluMlp": ("fc1", "act", "drop1", "norm", "fc2", "drop2")}


def _is_timm_glu(module: nn.Module) -> bool:
    """timm's ``SwiGLU`` or ``GluMlp`` (not a subclass: its forward is the one restated below)."""
    parts = TIMM_GLU_PARTS.get(type(module).__name__)
    return (parts is not None and type(module).__module__.startswith("timm.")
            and all(isinstance(getattr(module, name, None), nn.Module) for name in parts))


def _timm_glu_forward(module: nn.Module):
    """The module's own forward with the gate product under the uniform rule (same modules, same order)."""
    if type(module).__name__ == "SwiGLU":
        def forward(x):
            hidden = uniform_mul(module.act(module.fc1_g(x)), module.fc1_x(x))
            return module.drop2(module.fc2(module.norm(module.drop1(hidden))))
    else:
        def forward(x):
            x1, x2 = module.fc1(x).chunk(2, dim=getattr(module, "chunk_dim", -1))
            # gate_last: x1 * act(x2); otherwise act(x1) * x2 (SwiGLU packed, as EVA-02 builds it)
            if getattr(module, "gate_last", True):
                hidden = uniform_mul(x1, module.act(x2))
            else:
                hidden = uniform_mul(module.act(x1), x2)
            return module.drop2(module.fc2(module.norm(module.drop1(hidden))))
    return forward


#: heads that apply tanh as a function (not a module): same forward with the identity rule on it
TANH_HEADS = ("RobertaClassificationHead", "XLMRobertaClassificationHead", "CamembertClassificationHead")


def _is_tanh_head(module: nn.Module) -> bool:
    return type(module).__name__ in TANH_HEADS and all(
        isinstance(getattr(module, name, None), nn.Module) for name in ("dense", "out_proj", "dropout"))


def _tanh_head_forward(module: nn.Module):
    def forward(features, **kwargs):
        x = module.dense(module.dropout(features[:, 0, :]))
        return module.out_proj(module.dropout(identity_rule(torch.tanh, x)))

    return forward


def _conv1d_forward(module: nn.Module, gamma: float):
    return lambda x: gamma_linear(x, module.weight.t(), module.bias, gamma)


def _rms_norm_forward(module: nn.Module, eps: float):
    return lambda x: rms_norm_std_detached(x, module.weight, eps)


def _gated_mlp_forward(module: nn.Module):
    return lambda x: module.down_proj(uniform_mul(module.act_fn(module.gate_proj(x)), module.up_proj(x)))


def _linear_forward(module: nn.Linear, gamma: float):
    return lambda x: gamma_linear(x, module.weight, module.bias, gamma)


def _conv_forward(module: nn.Conv2d, gamma: float):
    return lambda x: gamma_conv2d(x, module, gamma)


def _layer_norm_forward(module: nn.LayerNorm):
    return lambda x: layer_norm_std_detached(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _functional_activation(module: nn.Module):
    """The activation function a torch transformer layer stores as a plain attribute, or None.

    An activation given as a module (``activation=nn.GELU()``) is a child module and gets the rule
    of its own kind; a plain function is no module, so no forward of it could be swapped.
    """
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        activation = module.__dict__.get("activation")
        if callable(activation) and not isinstance(activation, nn.Module):
            return activation
    return None


def _identity_rule_function(function):
    return lambda x: identity_rule(function, x)


def _activation_forward(module: nn.Module):
    original = type(module).forward

    def forward(x, *args, **kwargs):
        return identity_rule(lambda t: original(module, t, *args, **kwargs), x)

    return forward


def is_attention_module(module: nn.Module) -> bool:
    """``nn.MultiheadAttention``, or a module whose class name ends in ``Attention`` (timm ``Attention`` /
    ``EvaAttention``, Hugging Face ``ViTAttention``, ``BertAttention``, ``GPT2Attention``, ``LlamaAttention``...)."""
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")


def attention_projections(model: nn.Module) -> set:
    """The ids of the linear layers (``nn.Linear``, Hugging Face ``Conv1D``) inside attention modules: the
    q/k/v (or packed qkv) and output projections, which ``attention_gamma=False`` leaves to LRP-0.

    Packed projections that are parameters, not modules (``nn.MultiheadAttention.in_proj_weight``, BEiT's and
    EVA's biased qkv), go through :meth:`LRPRecorder.linear`, which applies the same choice.
    """
    found = set()
    for module in model.modules():
        if is_attention_module(module):
            found.update(id(sub) for sub in module.modules() if isinstance(sub, nn.Linear) or _is_conv1d(sub))
    return found


@contextlib.contextmanager
def lrp_rules(model: nn.Module, config: LRPConfig) -> Iterator[None]:
    """Within the block, ``model`` computes the same outputs with LRP rules in its backward."""
    projections = set() if config.attention_gamma else attention_projections(model)

    def lin_gamma(module):
        return config.projection_gamma if id(module) in projections else config.lin_gamma

    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                stack.enter_context(swapped_forward(module, _linear_forward(module, lin_gamma(module))))
            elif isinstance(module, nn.Conv2d):
                stack.enter_context(swapped_forward(module, _conv_forward(module, config.conv_gamma)))
            elif isinstance(module, nn.LayerNorm):
                stack.enter_context(swapped_forward(module, _layer_norm_forward(module)))
            elif _is_conv1d(module):
                stack.enter_context(swapped_forward(module, _conv1d_forward(module, lin_gamma(module))))
            elif _rms_norm_eps(module) is not None:
                stack.enter_context(swapped_forward(module, _rms_norm_forward(module, _rms_norm_eps(module))))
            elif _is_gated_mlp(module):
                stack.enter_context(swapped_forward(module, _gated_mlp_forward(module)))
            elif _is_hf_gated_ffn(module):
                stack.enter_context(swapped_forward(module, _gated_mlp_forward(module)))
            elif _is_timm_glu(module):
                stack.enter_context(swapped_forward(module, _timm_glu_forward(module)))
            elif _is_tanh_head(module):
                stack.enter_context(swapped_forward(module, _tanh_head_forward(module)))
            elif _is_activation(module):
                stack.enter_context(swapped_forward(module, _activation_forward(module)))
            elif _functional_activation(module) is not None:
                rule = _identity_rule_function(_functional_activation(module))
                stack.enter_context(attribute_set(module, "activation", rule))
        yield


def input_relevance(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Pixel relevance (B, H, W): the sum over channels of input x (modified) gradient."""
    return (x * grad).sum(dim=1)
