"""Attention capture for every Hugging Face ``transformers`` model (image and text adapters alike).

Capture uses the library's own extension point: an attention function registered in
``transformers.AttentionInterface`` under the name ``vitlens_capture``. For the duration of a call the
model's *own config objects* select it (their ``_attn_implementation``) and a ``ContextVar`` names the
active recorder; the global registry only gains one entry and no existing entry or class is changed.
The probabilities then come from :func:`vitlens.models.capture.explicit_attention` even when the model
normally runs SDPA or flash attention.

Padding and causal masks: Transformers builds the 4-D mask with the mask function registered for the
current attention implementation and silently builds *none* for an unknown name, so Transformers' own
``eager_mask`` is registered under the same name (``AttentionMaskInterface``; a new entry, nothing
existing is changed). Padded keys then get exactly zero probability, as in the eager model. Grouped-
query attention (Llama, Mistral, Qwen) has its keys and values repeated per head group, as the eager
code does. T5's relative position bias (the ``position_bias`` its attention passes, one (heads, q, k) table per
layer, zeros for cross-attention) is added to the mask, as its eager function adds it to the scores.
Registration is idempotent.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import torch
from torch import nn

from vitlens.errors import ModelError
from vitlens.models.capture import AttentionRecorder, attribute_set, explicit_attention

ATTENTION_NAME = "vitlens_capture"
_ACTIVE: contextvars.ContextVar[AttentionRecorder | None] = contextvars.ContextVar("vitlens_recorder", default=None)
_registered = False


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An ``AttentionInterface`` function: explicit softmax, probabilities reported in order."""
    recorder = _ACTIVE.get()
    if recorder is None:
        raise RuntimeError("vitlens attention function called outside a capture")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5's relative position bias (per head), added to the scores as eager does
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
        mask = position_bias if mask is None else position_bias + mask
    # The layer index is the call order: blocks run in sequence within one forward.
    out = explicit_attention(query, key, value, scaling, len(recorder.attentions), recorder, mask)
    # HF expects (B, N, heads, head_dim) back, plus the weights.
    return out.transpose(1, 2).contiguous(), recorder.attentions[-1]


def ensure_registered() -> None:
    """Register the capture function and the eager mask under :data:`ATTENTION_NAME` (once)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTENTION_NAME, _capture_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    _registered = True


def attention_configs(module: nn.Module) -> list:
    """The distinct Hugging Face config objects of a model's submodules (they select the attention)."""
    seen = {}
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen[id(cfg)] = cfg
    return list(seen.values())


@contextlib.contextmanager
def hf_capture(module: nn.Module, recorder: AttentionRecorder,
               layers: Sequence[nn.Module]) -> Iterator[AttentionRecorder]:
    """Within the block, every attention layer of ``module`` reports its probabilities to ``recorder``.

    ``layers`` are the model's blocks: when the recorder keeps block outputs (LeGrad), each block's
    output is reported in call order (ALBERT's shared layers fire once per use, so outputs append in
    the order the forward runs them). Configs and hooks are restored when the block ends.
    """
    ensure_registered()
    if any(getattr(m, "gradient_checkpointing", False) for m in module.modules()):
        raise ModelError("disable gradient checkpointing before explaining a Hugging Face model")
    token = _ACTIVE.set(recorder)
    try:
        with contextlib.ExitStack() as stack:
            for cfg in attention_configs(module):
                stack.enter_context(attribute_set(cfg, "_attn_implementation", ATTENTION_NAME))
            if recorder.keep_block_outputs:
                for layer in layers:
                    stack.callback(layer.register_forward_hook(_block_output_hook(recorder)).remove)
            yield recorder
    finally:
        _ACTIVE.reset(token)


def _block_output_hook(recorder: AttentionRecorder):
    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        recorder.on_block_output(len(recorder.block_outputs), hidden)

    return hook


__all__ = ["ATTENTION_NAME", "attention_configs", "ensure_registered", "hf_capture"]
