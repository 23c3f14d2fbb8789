"""Convert ViT weights between the timm, Hugging Face and torchvision layouts.

The three libraries implement the same pre-norm ViT with different parameter names (and packed vs
separate q/k/v). Converting lets a user explain their timm checkpoint through any of the three
code paths, and lets the tests check that the adapters agree on identical weights. Only plain
class-token ViTs convert (no distillation or register tokens).
"""

from __future__ import annotations

import re

import torch

from vitlens.errors import ModelError


def _split_qkv(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.chunk(3, dim=0))


def timm_to_hf_vit(state: dict) -> dict:
    """timm ``vit_*`` state dict -> Hugging Face ``ViTForImageClassification`` (transformers 5 names)."""
    _require_plain_vit(state)
    out = {
        "vit.embeddings.cls_token": state["cls_token"],
        "vit.embeddings.position_embeddings": state["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "vit.layernorm.weight": state["norm.weight"],
        "vit.layernorm.bias": state["norm.bias"],
        "classifier.weight": state["head.weight"],
        "classifier.bias": state["head.bias"],
    }
    for i in _block_indices(state):
        src, dst = f"blocks.{i}.", f"vit.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = _split_qkv(state[f"{src}attn.qkv.{kind}"])
            out[f"{dst}attention.q_proj.{kind}"] = q
            out[f"{dst}attention.k_proj.{kind}"] = k
            out[f"{dst}attention.v_proj.{kind}"] = v
            out[f"{dst}attention.o_proj.{kind}"] = state[f"{src}attn.proj.{kind}"]
            out[f"{dst}layernorm_before.{kind}"] = state[f"{src}norm1.{kind}"]
            out[f"{dst}layernorm_after.{kind}"] = state[f"{src}norm2.{kind}"]
            out[f"{dst}mlp.fc1.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


def timm_to_torchvision_vit(state: dict) -> dict:
    """timm ``vit_*`` state dict -> torchvision ``VisionTransformer``."""
    _require_plain_vit(state)
    out = {
        "class_token": state["cls_token"],
        "conv_proj.weight": state["patch_embed.proj.weight"],
        "conv_proj.bias": state["patch_embed.proj.bias"],
        "encoder.pos_embedding": state["pos_embed"],
        "encoder.ln.weight": state["norm.weight"],
        "encoder.ln.bias": state["norm.bias"],
        "heads.head.weight": state["head.weight"],
        "heads.head.bias": state["head.bias"],
    }
    for i in _block_indices(state):
        src, dst = f"blocks.{i}.", f"encoder.layers.encoder_layer_{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}ln_1.{kind}"] = state[f"{src}norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = state[f"{src}norm2.{kind}"]
            out[f"{dst}self_attention.in_proj_{kind}"] = state[f"{src}attn.qkv.{kind}"]
            out[f"{dst}self_attention.out_proj.{kind}"] = state[f"{src}attn.proj.{kind}"]
            out[f"{dst}mlp.0.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.3.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


def _block_indices(state: dict) -> list[int]:
    found = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    return sorted(found)


def _require_plain_vit(state: dict) -> None:
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight", "norm.weight"):
        if key not in state:
            raise ModelError(f"not a plain timm ViT state dict: missing '{key}'")
    for key in ("dist_token", "reg_token"):
        if key in state:
            raise ModelError(f"cannot convert a timm ViT with '{key}': the target layouts have no such token")
