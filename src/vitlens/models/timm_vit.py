"""Adapter for timm ``VisionTransformer`` and relatives (DeiT, distilled DeiT, register tokens)."""

from __future__ import annotations

import torch
from torch import nn

from vitlens.errors import ModelError, one_line
from vitlens.models.capture import AttentionRecorder, explicit_attention
from vitlens.models.preprocess import Preprocess, interpolation_name
from vitlens.models.registry import Family, LoadedModule, register_family, register_spec
from vitlens.models.timm_blocks import TimmBlocksModel
from vitlens.models.weights import (HUB_HINT, infer_num_classes, load_state_dict_checked, looks_like_hub_error,
                                    read_weights)

SUPPORTED_POOLS = ("token", "avg")


def is_timm_vit(module: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(module, VisionTransformer)


def _check_attention(block_index: int, attn: nn.Module) -> None:
    from timm.models.vision_transformer import Attention

    if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
        raise ModelError(
            f"unsupported attention implementation {type(attn).__module__}.{type(attn).__name__} "
            f"in block {block_index}: vitlens reads timm's standard Attention (qkv, q_norm, k_norm, proj)"
        )


class TimmViT(TimmBlocksModel):
    """timm ``VisionTransformer`` (``vit_*``, ``deit_*``, ``*_reg*``, distilled DeiT)."""

    family = "timm"

    def __init__(self, module, preprocess, class_names=None, info=None):
        super().__init__(module, preprocess, class_names, info)
        pool = getattr(module, "global_pool", "token")
        if pool not in SUPPORTED_POOLS:
            raise ModelError(
                f"timm global_pool={pool!r} is not supported: vitlens supports {', '.join(SUPPORTED_POOLS)}"
            )
        if pool == "token" and getattr(module, "cls_token", None) is None:
            raise ModelError("timm model pools the class token but has none")
        for i, block in enumerate(module.blocks):
            _check_attention(i, block.attn)

    def attention_forward(self, attn, layer, recorder):
        return _capturing_forward(attn, layer, recorder)

    @property
    def distilled(self) -> bool:
        return getattr(self.module, "dist_token", None) is not None

    def _token_readout(self, weights):
        if self.distilled:  # the head averages the class and distillation heads
            weights[0] = weights[1] = 0.5
        else:
            weights[0] = 1.0


def _capturing_forward(attn: nn.Module, layer: int, recorder: AttentionRecorder):
    """timm ``Attention.forward`` with the softmax made explicit (same parameters, same order)."""

    def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        gate_module = getattr(attn, "gate", None)
        gate = gate_module(x).sigmoid() if gate_module is not None else None
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        mask = attn_mask
        if is_causal:
            causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            mask = causal if mask is None else mask & causal
        out = explicit_attention(q, k, v, attn.scale, layer, recorder, mask)
        out = out.transpose(1, 2).reshape(B, N, getattr(attn, "attn_dim", C))
        out = attn.norm(out)
        if gate is not None:
            out = out * gate
        out = attn.proj(out)
        return attn.proj_drop(out)

    return forward


# --- loading --------------------------------------------------------------------------------


def load_timm_spec(spec, name, weights, num_classes):
    import timm

    from vitlens.models import hub

    base = name.split(".")[0]
    if not timm.is_model(base):
        raise ModelError(f"unknown timm model '{name}'")
    state = read_weights(weights) if weights is not None else None
    if num_classes is None and state is not None:
        num_classes = infer_num_classes(state, ("head.weight",))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if weights is None:
        cfg = timm.models.get_pretrained_cfg(name) if "." in name else timm.models.get_pretrained_cfg(base)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        cached = hub.hf_cached_file(hub_id) if hub_id else None
        if cached is not None:
            # read straight from the cache: no network round trip at all
            kwargs["pretrained_cfg_overlay"] = {"file": cached}
        elif not hub.reachable(hub.HF_HOST):
            raise ModelError(f"cannot fetch pretrained weights for '{spec}': the model hub is unreachable; {HUB_HINT}")
    try:
        module = timm.create_model(name, pretrained=weights is None, **kwargs)
    except Exception as exc:  # hub errors come in many types
        if weights is None and looks_like_hub_error(exc):
            raise ModelError(f"cannot fetch pretrained weights for '{spec}' (model hub unreachable?): "
                             f"{HUB_HINT}") from None
        raise ModelError(f"cannot build timm model '{name}': {one_line(exc)}") from None
    if state is not None:
        load_state_dict_checked(module, state, weights, spec)
    return LoadedModule(module)


def timm_preprocess(module) -> Preprocess:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=module)
    _, h, w = cfg["input_size"]
    fixed = getattr(module.patch_embed, "img_size", None)
    if fixed is not None and not getattr(module, "dynamic_img_size", False):
        # the model's real input size wins over a pretrained config of another resolution
        h, w = fixed
    return Preprocess(
        input_size=(int(h), int(w)),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=interpolation_name(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        resize_mode="shorter",
    )


def wrap(module, preprocess=None, class_names=None, info=None) -> TimmViT:
    return TimmViT(module, preprocess or timm_preprocess(module), class_names, info)


register_family(Family("timm", "image", is_timm_vit, wrap, priority=10,
                       description="timm VisionTransformer (ViT, DeiT, distilled DeiT, register tokens)"))
register_spec("image", "timm", load_timm_spec)
