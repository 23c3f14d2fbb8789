"""Swin and Swin-V2 (timm ``SwinTransformer`` / ``SwinTransformerV2``, Hugging Face ``SwinForImageClassification`` /
``Swinv2ForImageClassification``): the Grad-CAM family as any channel-last backbone, plus AttnLRP / CP-LRP.

Everything the convolutional adapter does (:class:`~vitlens.models.cnn.CNNModel`: target layers and their layouts
from a dry run) holds unchanged. What this family adds is a capture through which the LRP rules reach window
attention: during a vitlens call each window-attention instance gets a forward that is the model's own with the
softmax made explicit and routed through the recorder (:meth:`~vitlens.models.capture.AttentionRecorder.attend`),
so :class:`vitlens.lrp.LRPRecorder` applies the uniform rule on Q K^T and A V (AttnLRP) or holds Q and K constant
(CP-LRP), as for the ViT families. The relative position bias (a learnt table in Swin, ``16 sigmoid(cpb_mlp(.))``
in Swin-V2) and the shifted-window mask are added to the scores as one additive constant. Swin-V2's cosine
attention normalises queries and keys (:meth:`~vitlens.models.capture.AttentionRecorder.normalize`: under the LRP
rules their norms are constants, as LayerNorm's standard deviation) and scales them by its clamped
``exp(logit_scale)``; its packed q/v bias goes through :meth:`~vitlens.models.capture.AttentionRecorder.linear`
(Gamma rule). Patch merging is a LayerNorm and a Linear, the MLPs Linear + GELU, the head a mean and a Linear: the
rules every family gets from :func:`vitlens.lrp.lrp_rules`; shifts, window partitions and the merging regroup are
permutations, which the gradient carries exactly.

The rollout family stays refused: windowed attention has no token-to-token matrix over the whole image to roll out.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import nn

from vitlens.models.capture import AttentionRecorder, explicit_attention, swapped_forward
from vitlens.models.cnn import CNNModel, cnn_default_preprocess
from vitlens.models.registry import Family, register_family

#: Hugging Face classifiers read here (exactly these classes of transformers)
HF_CLASSIFIERS = ("SwinForImageClassification", "Swinv2ForImageClassification")


def _timm_attention_kinds() -> dict:
    from timm.models import swin_transformer, swin_transformer_v2

    return {swin_transformer.WindowAttention: _timm_v1_forward, swin_transformer_v2.WindowAttention: _timm_v2_forward}


def _hf_attention_kinds() -> dict:
    try:
        from transformers.models.swin.modeling_swin import SwinAttention
        from transformers.models.swinv2.modeling_swinv2 import Swinv2SelfAttention
    except ImportError:  # pragma: no cover - another transformers layout: read as a CNN
        return {}
    return {SwinAttention: _hf_v1_forward, Swinv2SelfAttention: _hf_v2_forward}


#: what an instance must have for its forward to be the one restated here (transformers' layouts have changed)
PARTS = {"_hf_v1_forward": ("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias", "head_dim", "scaling"),
         "_hf_v2_forward": ("query", "key", "value", "continuous_position_bias_mlp", "logit_scale",
                            "relative_coords_table", "relative_position_index")}


def _is_swin_root(module: nn.Module) -> bool:
    cls = type(module)
    if cls.__module__.startswith("transformers.") and cls.__name__ in HF_CLASSIFIERS:
        return True
    try:
        from timm.models.swin_transformer import SwinTransformer
        from timm.models.swin_transformer_v2 import SwinTransformerV2
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(module, (SwinTransformer, SwinTransformerV2))


def window_attentions(module: nn.Module) -> list[tuple[nn.Module, Callable]]:
    """(instance, explicit-forward factory) of every window attention of ``module``, in forward order; None when one
    is not a class read here (or a subclass with its own forward)."""
    kinds = {**_timm_attention_kinds(), **_hf_attention_kinds()}
    found = []
    for sub in module.modules():
        cls = type(sub)
        if cls in kinds:
            if not all(hasattr(sub, part) for part in PARTS.get(kinds[cls].__name__, ())):
                return None
            found.append((sub, kinds[cls]))
        elif any(isinstance(sub, kind) for kind in kinds):
            return None  # a subclass: its forward may compute something else
    return found or None


def is_swin(module: nn.Module) -> bool:
    return _is_swin_root(module) and window_attentions(module) is not None


class SwinModel(CNNModel):
    """Swin / Swin-V2: Grad-CAM as a channel-last backbone, AttnLRP / CP-LRP through window attention."""

    family = "swin"
    #: AttnLRP / CP-LRP run although the rollout family does not (no global attention)
    lrp_supported = True

    def __init__(self, module, preprocess, class_names=None, info=None):
        super().__init__(module, preprocess, class_names, info)
        self.window_attentions = window_attentions(module)

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        """Within the block every window attention computes its softmax explicitly through ``recorder`` (one map
        per block, (B * windows, heads, n, n), in forward order)."""
        with contextlib.ExitStack() as stack:
            for layer, (attn, factory) in enumerate(self.window_attentions):
                stack.enter_context(swapped_forward(attn, factory(attn, layer, recorder)))
            yield recorder


def _windowed_mask(bias: torch.Tensor, mask: torch.Tensor | None, batch_windows: int,
                   repeat: int = 1) -> torch.Tensor:
    """The (B * windows, heads, n, n) additive constant of the scores: the position bias (1, heads, n, n) plus the
    shifted-window mask (windows, n, n), ``repeat`` times (Hugging Face Swin-V2 adds its mask twice), laid out as the
    models lay out their windows (image-major)."""
    if mask is None:
        return bias
    windows, n = mask.shape[0], mask.shape[-1]
    combined = bias.unsqueeze(1)  # (1, 1, heads, n, n)
    for _ in range(repeat):
        combined = combined + mask.unsqueeze(1).unsqueeze(0)
    return combined.expand(batch_windows // windows, -1, -1, -1, -1).reshape(batch_windows, -1, n, n)


def _timm_v1_forward(attn: nn.Module, layer: int, recorder: AttentionRecorder):
    """timm ``swin_transformer.WindowAttention.forward`` (same modules, same order), softmax explicit."""

    def forward(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = attn.qkv(x).reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        constant = _windowed_mask(attn._get_rel_pos_bias(), mask, B_)
        out = explicit_attention(q, k, v, attn.scale, layer, recorder, constant)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B_, N, -1)))

    return forward


def _cosine_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """Swin-V2's per-head temperature exp(min(logit_scale, log 100)), (heads, 1, 1)."""
    return torch.clamp(logit_scale, max=math.log(1.0 / 0.01)).exp()


def _constant_table(mlp: nn.Module, coords: torch.Tensor) -> torch.Tensor:
    """Swin-V2's position-bias MLP on the fixed relative coordinates: it does not depend on the image, so it is
    computed as the constant it is (without a graph: under the LRP rules its Linear layers would carry a Gamma rule,
    and its in-place ReLU may not modify their outputs)."""
    with torch.no_grad():
        return mlp(coords)


def _table_bias(table: torch.Tensor, index: torch.Tensor, window_area: int) -> torch.Tensor:
    """Swin-V2's continuous position bias 16 sigmoid(table[index]) as (1, heads, n, n)."""
    bias = table[index.view(-1)].view(window_area, window_area, -1).permute(2, 0, 1).contiguous()
    return (16 * torch.sigmoid(bias)).unsqueeze(0)


def _timm_v2_forward(attn: nn.Module, layer: int, recorder: AttentionRecorder):
    """timm ``swin_transformer_v2.WindowAttention.forward``: cosine attention, continuous position bias."""

    def forward(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, C = x.shape
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x) + qkv_bias
            else:
                qkv = recorder.linear(x, attn.qkv.weight, qkv_bias)
        q, k, v = qkv.reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        table = _constant_table(attn.cpb_mlp, attn.relative_coords_table).view(-1, attn.num_heads)
        bias = _table_bias(table, attn.relative_position_index, attn.window_size[0] * attn.window_size[1])
        constant = _windowed_mask(bias, mask, B_)
        out = explicit_attention(recorder.normalize(q), recorder.normalize(k), v, _cosine_scale(attn.logit_scale),
                                 layer, recorder, constant)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B_, N, C)))

    return forward


def _hf_v1_forward(attn: nn.Module, layer: int, recorder: AttentionRecorder):
    """transformers ``SwinAttention.forward``: q/k/v/o projections, relative position bias + shift mask."""

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        constant = _windowed_mask(attn.relative_position_bias(), attention_mask, input_shape[0])
        out = explicit_attention(q, k, v, attn.scaling, layer, recorder, constant)
        out = attn.o_proj(out.transpose(1, 2).reshape(*input_shape, -1).contiguous())
        return out, recorder.attentions[-1]

    return forward


def _hf_v2_forward(attn: nn.Module, layer: int, recorder: AttentionRecorder):
    """transformers ``Swinv2SelfAttention.forward``: cosine attention, continuous position bias, the shift mask
    added twice as the model does."""

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_attentions: bool | None = False):
        batch, n, _ = hidden_states.shape
        heads, size = attn.num_attention_heads, attn.attention_head_size

        def split(t):
            return t.view(batch, -1, heads, size).transpose(1, 2)

        q, k, v = split(attn.query(hidden_states)), split(attn.key(hidden_states)), split(attn.value(hidden_states))
        table = _constant_table(attn.continuous_position_bias_mlp, attn.relative_coords_table).view(-1, heads)
        bias = _table_bias(table, attn.relative_position_index, attn.window_size[0] * attn.window_size[1])
        constant = _windowed_mask(bias, attention_mask, batch, repeat=2)
        out = explicit_attention(recorder.normalize(q), recorder.normalize(k), v, _cosine_scale(attn.logit_scale),
                                 layer, recorder, constant)
        context = out.permute(0, 2, 1, 3).contiguous().view(batch, n, heads * size)
        return (context, recorder.attentions[-1]) if output_attentions else (context,)

    return forward


def wrap(module, preprocess=None, class_names=None, info=None) -> SwinModel:
    return SwinModel(module, preprocess or cnn_default_preprocess(module), class_names, info)


# after the ViT families, before the generic attention family and the CNN catch-all (which reads every other
# convolutional or channel-last backbone)
register_family(Family("swin", "image", is_swin, wrap, priority=70,
                       description="timm SwinTransformer / SwinTransformerV2, Hugging Face "
                                   "SwinForImageClassification / Swinv2ForImageClassification"))
