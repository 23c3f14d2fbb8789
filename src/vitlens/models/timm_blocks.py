"""What timm's token transformers share, whatever their attention: the base of the timm families.

timm's ``VisionTransformer``, ``Eva`` and ``Beit`` have the same outer shape: ``patch_embed``, a
list ``blocks`` whose blocks each own an ``attn`` module, ``num_prefix_tokens`` (class, distillation
and register tokens) in front of the patches, ``global_pool`` ``'token'`` or ``'avg'``, and
``forward_head(norm(x))`` after the last block. :class:`TimmBlocksModel` implements everything an
adapter needs from that shape; a family file adds only its :meth:`~TimmBlocksModel.attention_forward`
(the family's attention with the softmax made explicit) and what differs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from vitlens.models.base import ImageModel
from vitlens.models.capture import AttentionRecorder, attribute_set, swapped_forward


class TimmBlocksModel(ImageModel):
    """Base of the timm token-transformer adapters (subclasses: timm ViT, EVA, BEiT)."""

    def attention_forward(self, attn: nn.Module, layer: int, recorder: AttentionRecorder):
        """The ``forward`` that replaces block ``layer``'s attention instance during a capture."""
        raise NotImplementedError

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

    def grid(self, input_hw):
        patch_embed = self.module.patch_embed
        if getattr(self.module, "dynamic_img_size", False) and hasattr(patch_embed, "dynamic_feat_size"):
            # also right with dynamic_img_pad, where a partial patch at the border counts
            return tuple(int(v) for v in patch_embed.dynamic_feat_size(tuple(input_hw)))
        return super().grid(input_hw)

    def fixed_input_size(self):
        if getattr(self.module, "dynamic_img_size", False):
            return None  # position (and rotary) embeddings are resampled to the input's grid
        size = getattr(self.module.patch_embed, "img_size", None)
        return None if size is None else (int(size[0]), int(size[1]))

    def block_norm_names(self):
        return [f"blocks.{i}.norm1" for i in range(self.num_layers)]

    def readout_weights(self, num_tokens, device=None, dtype=torch.float32):
        weights = torch.zeros(num_tokens, device=device, dtype=dtype)
        if self.module.global_pool == "avg":
            # the pooling reads x[:, num_prefix_tokens:].mean(dim=1): class and register tokens are not read
            prefix = self.num_prefix_tokens
            weights[prefix:] = 1.0 / (num_tokens - prefix)
        else:
            self._token_readout(weights)
        return weights

    def _token_readout(self, weights: torch.Tensor) -> None:
        """Token pooling reads the class token."""
        weights[0] = 1.0

    def logits(self, x):
        return self.module(x)

    def _head(self, hidden):
        # forward_features ends with self.norm (Identity when fc_norm is used), forward_head pools,
        # applies fc_norm, head_drop and the head: the model's own modules, in its own order
        return self.module.forward_head(self.module.norm(hidden))

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        with contextlib.ExitStack() as stack:
            for i, block in enumerate(self.module.blocks):
                attn = block.attn
                stack.enter_context(swapped_forward(attn, self.attention_forward(attn, i, recorder)))
                if recorder.keep_block_outputs:
                    stack.callback(block.register_forward_hook(_block_hook(i, recorder)).remove)
            # checkpointing would re-run blocks during backward and record twice
            if getattr(self.module, "grad_checkpointing", False):
                stack.enter_context(attribute_set(self.module, "grad_checkpointing", False))
            yield recorder


def _block_hook(index: int, recorder: AttentionRecorder):
    def hook(module, inputs, output):
        recorder.on_block_output(index, output)

    return hook


__all__ = ["TimmBlocksModel"]
