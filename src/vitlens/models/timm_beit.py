"""Adapter for timm ``Beit`` (BEiT v1 and v2: relative position bias, layer scale, q/v biases).

BEiT is not a ``VisionTransformer``: its attention takes the block's relative position bias (or the
model-wide shared one) as an additive term on the scores, its qkv projection is applied as
``F.linear(x, qkv.weight, cat(q_bias, 0, v_bias))`` (no k bias, and not through the module), and it
pools the mean of the patch tokens through ``fc_norm`` by default. During a vitlens call each block's
``Attention`` *instance* gets an explicit forward with the same parameters in the same order; the
biases are passed as the additive mask of :func:`~vitlens.models.capture.explicit_attention`, so the
recorded probabilities are exactly the softmax the model computes, and LRP's recorder rules apply to
q k^T and A v with the bias a constant term of the scores (its gradient is the plain one).
"""

from __future__ import annotations

import torch
from torch import nn

from vitlens.errors import ModelError
from vitlens.models.capture import AttentionRecorder, explicit_attention
from vitlens.models.registry import Family, register_family
from vitlens.models.timm_blocks import TimmBlocksModel
from vitlens.models.timm_vit import timm_preprocess

SUPPORTED_POOLS = ("avg", "token")
#: the Beit methods whose behaviour ``_head``, ``readout_weights`` and the capture restate
READ_METHODS = ("forward", "forward_features", "forward_head")


def is_timm_beit(module: nn.Module) -> bool:
    try:
        from timm.models.beit import Beit
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(module, Beit)


def _check_model(module: nn.Module) -> None:
    from timm.models.beit import Attention, Beit

    for name in READ_METHODS:
        if getattr(type(module), name) is not getattr(Beit, name):
            raise ModelError(f"unsupported BEiT variant {type(module).__name__}: it overrides Beit.{name}, "
                             "which vitlens reads as timm writes it")
    pool = module.global_pool
    if pool not in SUPPORTED_POOLS:
        # global_pool='' returns per-token outputs: there is no class score to explain
        raise ModelError(f"timm BEiT global_pool={pool!r} is not supported: vitlens supports "
                         f"{', '.join(SUPPORTED_POOLS)}")
    for i, block in enumerate(module.blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
            kind = f"{type(attn).__module__}.{type(attn).__name__}"
            raise ModelError(f"unsupported attention implementation {kind} in block {i}: vitlens reads timm's "
                             "BEiT Attention (qkv with q/v biases, relative position bias, proj)")
        if attn.relative_position_bias_table is not None and not hasattr(attn, "_get_rel_pos_bias"):
            raise ModelError(f"block {i}: this timm version's BEiT Attention has no _get_rel_pos_bias: "
                             "vitlens reads timm >= 1.0.9")


class TimmBeit(TimmBlocksModel):
    """timm ``Beit`` (``beit_*``, ``beitv2_*``): per-block or shared relative position bias, avg or token pooling."""

    family = "timm-beit"

    def __init__(self, module, preprocess, class_names=None, info=None):
        super().__init__(module, preprocess, class_names, info)
        _check_model(module)

    def attention_forward(self, attn, layer, recorder):
        return _capturing_forward(attn, layer, recorder)

    def fixed_input_size(self):
        # the relative position tables (and the absolute position embedding, when there is one) are
        # built for one patch grid: BEiT takes exactly the input size it was built for
        h, w = self.module.patch_embed.img_size
        return int(h), int(w)


def _capturing_forward(attn: nn.Module, layer: int, recorder: AttentionRecorder):
    """timm BEiT ``Attention.forward`` with the softmax made explicit (same parameters, same order)."""

    def forward(x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            # timm applies the packed bias with F.linear on qkv.weight, not through the module (with
            # qkv_bias_separate it adds it after a bias-free qkv(x): the same x W^T + b). The recorder
            # applies it, so that LRP puts its linear rule on this projection as on any other.
            qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = recorder.linear(x, attn.qkv.weight, qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        # timm's fused path passes (block bias + shared bias) as SDPA's additive mask; its explicit
        # path adds them to the scores one after the other: the same sum
        bias = None
        if attn.relative_position_bias_table is not None:
            bias = attn._get_rel_pos_bias()
            if shared_rel_pos_bias is not None:
                bias = bias + shared_rel_pos_bias
        elif shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias
        out = explicit_attention(q, k, v, attn.scale, layer, recorder, bias)
        out = out.transpose(1, 2).reshape(B, N, C)
        out = attn.proj(out)
        return attn.proj_drop(out)

    return forward


def wrap(module, preprocess=None, class_names=None, info=None) -> TimmBeit:
    # timm_preprocess reads the pretrained config and the patch embedding's img_size, as for a timm ViT
    return TimmBeit(module, preprocess or timm_preprocess(module), class_names, info)


register_family(Family("timm-beit", "image", is_timm_beit, wrap, priority=14,
                       description="timm BEiT (relative position bias)"))
