"""Adapter for timm ``Eva`` (EVA, EVA-02 and the timm models built on it with EVA's attention).

EVA is not a ``VisionTransformer``: its attention (``EvaAttention``) takes the model's rotary position
embedding as an argument (``forward(x, rope=..., attn_mask=...)``) and rotates the queries and keys of
the patch tokens (never of the class / register tokens) after the optional q/k norms; its qkv
projection is either one bias-free ``qkv`` linear applied with the packed bias ``cat(q_bias, k_bias,
v_bias)`` through ``F.linear`` (k_bias is a zero buffer), or three ``q_proj`` / ``k_proj`` /
``v_proj`` layers; the merged heads pass an optional inner norm (``scale_attn_inner``) before the
projection. Its MLP is a SwiGLU (``GluMlp`` with a packed ``fc1``, or ``SwiGLU`` with an inner norm)
or a plain ``Mlp``, and it pools the class token or the mean of the patch tokens (``fc_norm``).

During a vitlens call each block's ``EvaAttention`` *instance* gets an explicit forward that computes
exactly what timm's unfused path computes, with the softmax made explicit through
:func:`~vitlens.models.capture.explicit_attention`: the probabilities are recorded, and LRP's recorder
rules apply to q k^T and A v. The rotation is linear in q and k for a given position: under LRP it
keeps the plain gradient. Other attention classes (``AttentionRope``, grouped-query attention) are
refused with a one-line error, as are the poolings this adapter cannot read (attention pooling
``'map'``, ``'max'``, ``'avgmax'``, none).
"""

from __future__ import annotations

import torch
from torch import nn

from vitlens.errors import ModelError
from vitlens.models.capture import AttentionRecorder, explicit_attention
from vitlens.models.registry import Family, register_family
from vitlens.models.timm_blocks import TimmBlocksModel
from vitlens.models.timm_vit import timm_preprocess

SUPPORTED_POOLS = ("token", "avg")
#: the Eva methods whose behaviour ``_head``, ``readout_weights`` and the capture restate or rely on
READ_METHODS = ("forward", "forward_features", "forward_head", "pool")


def is_timm_eva(module: nn.Module) -> bool:
    try:
        from timm.models.eva import Eva
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(module, Eva)


def _check_model(module: nn.Module) -> None:
    from timm.models.eva import Eva, EvaAttention

    for name in READ_METHODS:
        if getattr(type(module), name, None) is not getattr(Eva, name, None):
            raise ModelError(f"unsupported EVA variant {type(module).__name__}: it overrides Eva.{name}, "
                             "which vitlens reads as timm writes it")
    pool = module.global_pool
    if pool not in SUPPORTED_POOLS or getattr(module, "attn_pool", None) is not None:
        # 'map' pools with an attention of its own that vitlens does not capture; 'max' / 'avgmax' read
        # no fixed token weights; '' returns per-token outputs, with no class score to explain
        raise ModelError(f"timm EVA global_pool={pool!r} is not supported: vitlens supports "
                         f"{', '.join(SUPPORTED_POOLS)}")
    if pool == "token" and getattr(module, "cls_token", None) is None:
        raise ModelError("timm EVA model pools the class token but has none")
    for i, block in enumerate(module.blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, EvaAttention) or type(attn).forward is not EvaAttention.forward:
            kind = f"{type(attn).__module__}.{type(attn).__name__}"
            raise ModelError(f"unsupported attention implementation {kind} in block {i}: vitlens reads timm's "
                             "EvaAttention (qkv or q/k/v projections, q/k norms, rotary embedding, proj)")


class TimmEva(TimmBlocksModel):
    """timm ``Eva`` (``eva_*``, ``eva02_*`` and other ``Eva`` models with ``EvaAttention``): token or avg pooling."""

    family = "timm-eva"

    def __init__(self, module, preprocess, class_names=None, info=None):
        super().__init__(module, preprocess, class_names, info)
        _check_model(module)

    def attention_forward(self, attn, layer, recorder):
        return _capturing_forward(attn, layer, recorder)


def _rotate(t: torch.Tensor, rope: torch.Tensor, half: bool) -> torch.Tensor:
    from timm.layers import apply_rot_embed_cat

    # timm's own rotation (interleaved pairs, or halves for rotate_half models such as DINOv3); older
    # timm versions only have the interleaved form and no ``half`` argument
    return apply_rot_embed_cat(t, rope, half=True) if half else apply_rot_embed_cat(t, rope)


def _mask_bias(N: int, scores_like: torch.Tensor, attn_mask, is_causal: bool):
    """timm's ``resolve_self_attn_mask``: an additive bias (-inf where masked), causal taking precedence."""
    if is_causal:
        return torch.full((N, N), float("-inf"), dtype=scores_like.dtype, device=scores_like.device).triu(1)
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=scores_like.dtype).masked_fill(~attn_mask, float("-inf"))


def _capturing_forward(attn: nn.Module, layer: int, recorder: AttentionRecorder):
    """timm ``EvaAttention.forward`` with the softmax made explicit (same parameters, same order)."""

    def forward(x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        gate_module = getattr(attn, "gate", None)
        gate = gate_module(x).sigmoid() if gate_module is not None else None
        if attn.qkv is not None:
            if attn.q_bias is None:
                qkv = attn.qkv(x)
            else:
                qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                if getattr(attn, "qkv_bias_separate", False):
                    qkv = attn.qkv(x) + qkv_bias  # timm adds in place: the same sum
                else:
                    # timm applies the packed bias with F.linear on qkv.weight, not through the module:
                    # the recorder applies it, so that LRP puts its linear rule on this projection too
                    qkv = recorder.linear(x, attn.qkv.weight, qkv_bias)
            q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = attn.q_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
            v = attn.v_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            # the class / register tokens keep their q and k; the patch tokens are rotated by position
            npt = getattr(attn, "num_prefix_tokens", 1)
            half = getattr(attn, "rotate_half", False)
            q = torch.cat([q[:, :, :npt, :], _rotate(q[:, :, npt:, :], rope, half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], _rotate(k[:, :, npt:, :], rope, half)], dim=2).type_as(v)
        # attn_drop is the identity in eval mode, where every explanation runs
        out = explicit_attention(q, k, v, attn.scale, layer, recorder, _mask_bias(N, q, attn_mask, is_causal))
        out = out.transpose(1, 2).reshape(B, N, C)
        out = attn.norm(out)
        if gate is not None:
            out = out * gate
        out = attn.proj(out)
        return attn.proj_drop(out)

    return forward


def wrap(module, preprocess=None, class_names=None, info=None) -> TimmEva:
    # timm_preprocess reads the pretrained config and the patch embedding's img_size, as for a timm ViT
    return TimmEva(module, preprocess or timm_preprocess(module), class_names, info)


register_family(Family("timm-eva", "image", is_timm_eva, wrap, priority=12,
                       description="timm EVA / EVA-02 (rotary embeddings, SwiGLU)"))
