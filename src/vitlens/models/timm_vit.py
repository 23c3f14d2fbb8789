"""Adapter for timm ``VisionTransformer`` and relatives (DeiT, distilled DeiT, register tokens, attention pooling).

``global_pool='map'`` (SigLIP's image towers in timm, ``vit_so400m_patch14_siglip_*``, any ViT built with it) pools
the tokens with an attention-pooling head, timm's ``AttentionPoolLatent``: learnt latent queries attend over the
tokens (the patch tokens, or all tokens with ``pool_include_prefix``), then ``proj`` and a LayerNorm + MLP residual.
Read as the SigLIP adapter reads Hugging Face's pooling head: during a capture the head runs with its softmax
explicit and reports each image's pooling attention as the rollout-style readout row (mean over heads and over the
latent queries the head reads: all of them for ``pool_type='avg'``, the first for ``'token'``; prefix tokens the head
does not see get weight 0), and LeGrad's ``pool='model'`` re-applies the head to a layer's tokens. AttnLRP / CP-LRP
are refused: the pooling head's attention gets no LRP rule.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from vitlens.errors import ModelError, one_line
from vitlens.models.capture import AttentionRecorder, explicit_attention, masked_scores, swapped_forward
from vitlens.models.preprocess import Preprocess, interpolation_name
from vitlens.models.registry import Family, LoadedModule, register_family, register_spec
from vitlens.models.timm_blocks import TimmBlocksModel
from vitlens.models.weights import (HUB_HINT, infer_num_classes, load_state_dict_checked, looks_like_hub_error,
                                    read_weights)

SUPPORTED_POOLS = ("token", "avg", "map")
#: why AttnLRP / CP-LRP are refused for attention pooling (one line)
MAP_LRP_REASON = ("timm's attention-pooling head (global_pool='map') has no LRP rule in vitlens: its softmax over "
                  "the tokens is outside the rules; use the attention methods or Grad-CAM")


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
        if pool == "map":
            _check_attention_pool(getattr(module, "attn_pool", None))
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

    # --- attention pooling (global_pool='map') ---------------------------------------------------
    @property
    def attention_pooled(self) -> bool:
        return self.module.global_pool == "map"

    def readout_weights(self, num_tokens, device=None, dtype=torch.float32):
        if not self.attention_pooled:
            return super().readout_weights(num_tokens, device, dtype)
        # outside a capture (no pooling attention recorded): the mean of the tokens the head sees
        seen = 0 if getattr(self.module, "pool_include_prefix", False) else self.num_prefix_tokens
        weights = torch.zeros(num_tokens, device=device, dtype=dtype)
        weights[seen:] = 1.0 / (num_tokens - seen)
        return weights

    def unsupported_methods(self) -> dict:
        if self.attention_pooled:
            return {"attnlrp": MAP_LRP_REASON, "cp-lrp": MAP_LRP_REASON}
        return {}

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        with super().capture(recorder) as active:
            if not self.attention_pooled:
                yield active
                return
            skipped = 0 if getattr(self.module, "pool_include_prefix", False) else self.num_prefix_tokens
            pool = self.module.attn_pool
            with swapped_forward(pool, _pooling_forward(pool, skipped, recorder)):
                yield active


def _check_attention_pool(pool) -> None:
    from timm.layers import AttentionPoolLatent

    if not isinstance(pool, AttentionPoolLatent) or type(pool).forward is not AttentionPoolLatent.forward:
        raise ModelError(f"unsupported attention pooling {type(pool).__name__} (global_pool='map'): vitlens reads "
                         "timm's AttentionPoolLatent")
    if pool.pool not in ("token", "avg"):
        raise ModelError(f"timm AttentionPoolLatent with pool_type={pool.pool!r} is not supported: vitlens reads "
                         "'token' or 'avg'")


def _pooling_forward(pool: nn.Module, skipped: int, recorder: AttentionRecorder):
    """timm ``AttentionPoolLatent.forward`` with the softmax explicit; reports the (B, N) pooling attention.

    The readout is the mean over heads of the latent queries' attention rows that the output reads (all latents for
    ``pool_type='avg'``, the first for ``'token'``), with zeros in front for the ``skipped`` prefix tokens the head
    was not given. Same modules, same order as timm's forward.
    """

    def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        if pool.pos_embed is not None:
            x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
        q_latent = pool.latent.expand(B, -1, -1)
        q = pool.q(q_latent).reshape(B, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
        kv = pool.kv(x).reshape(B, N, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        q, k = pool.q_norm(q), pool.k_norm(k)
        probs = masked_scores((q * pool.scale) @ k.transpose(-2, -1), attn_mask).softmax(dim=-1)  # (B, heads, L, N)
        read = probs[:, :, :1] if pool.pool == "token" else probs
        recorder.on_readout(torch.nn.functional.pad(read.mean(dim=(1, 2)), (skipped, 0)))
        x = (probs @ v).transpose(1, 2).reshape(B, pool.latent_len, C)
        x = pool.proj_drop(pool.proj(x))
        if pool.mlp is not None:
            x = x + pool.mlp(pool.norm(x))
        return x[:, 0] if pool.pool == "token" else x.mean(1)

    return forward


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
                       description="timm VisionTransformer (ViT, DeiT, distilled DeiT, register tokens, "
                                   "attention pooling)"))
register_spec("image", "timm", load_timm_spec)
