"""Adapter for timm ``VisionTransformer`` and relatives (DeiT, distilled DeiT, register tokens)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from vitlens.errors import ModelError, one_line
from vitlens.models.base import ImageModel
from vitlens.models.capture import AttentionRecorder, attribute_set, explicit_attention, swapped_forward
from vitlens.models.preprocess import Preprocess, interpolation_name
from vitlens.models.registry import Family, LoadedModule, register_family, register_spec
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


class TimmViT(ImageModel):
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

    @property
    def num_classes(self) -> int:
        return int(self.module.num_classes)

    @property
    def num_layers(self) -> int:
        return len(self.module.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.module.num_prefix_tokens)

    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.module.patch_embed.patch_size
        return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))

    @property
    def distilled(self) -> bool:
        return getattr(self.module, "dist_token", None) is not None

    def grid(self, input_hw):
        patch_embed = self.module.patch_embed
        if hasattr(patch_embed, "dynamic_feat_size") and getattr(self.module, "dynamic_img_size", False):
            return tuple(int(v) for v in patch_embed.dynamic_feat_size(input_hw))
        return super().grid(input_hw)

    def block_norm_names(self):
        return [f"blocks.{i}.norm1" for i in range(self.num_layers)]

    def fixed_input_size(self):
        if getattr(self.module, "dynamic_img_size", False):
            return None
        size = getattr(self.module.patch_embed, "img_size", None)
        return None if size is None else (int(size[0]), int(size[1]))

    def readout_weights(self, num_tokens, device=None, dtype=torch.float32):
        weights = torch.zeros(num_tokens, device=device, dtype=dtype)
        if self.module.global_pool == "avg":
            prefix = self.num_prefix_tokens
            weights[prefix:] = 1.0 / (num_tokens - prefix)
        elif self.distilled:
            weights[0] = weights[1] = 0.5
        else:
            weights[0] = 1.0
        return weights

    def logits(self, x):
        return self.module(x)

    def _head(self, hidden):
        return self.module.forward_head(self.module.norm(hidden))

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        with contextlib.ExitStack() as stack:
            for i, block in enumerate(self.module.blocks):
                attn = block.attn
                stack.enter_context(swapped_forward(attn, _capturing_forward(attn, i, recorder)))
                if recorder.keep_block_outputs:
                    handle = block.register_forward_hook(_block_hook(i, recorder))
                    stack.callback(handle.remove)
            # checkpoint_seq would re-run blocks during backward and record twice
            if getattr(self.module, "grad_checkpointing", False):
                stack.enter_context(attribute_set(self.module, "grad_checkpointing", False))
            yield recorder


def _block_hook(index: int, recorder: AttentionRecorder):
    def hook(module, inputs, output):
        recorder.on_block_output(index, output)

    return hook


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
