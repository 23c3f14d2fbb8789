"""Adapter for torchvision ``VisionTransformer`` (``vit_b_16`` and friends).

torchvision's encoder blocks call ``nn.MultiheadAttention`` with ``need_weights=False``, which takes
the fused path. During capture each block's attention instance gets the explicit forward of
:mod:`vitlens.models.mha` (the same packed ``in_proj`` weights and ``out_proj``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from vitlens.errors import ModelError, one_line
from vitlens.models import hub
from vitlens.models.base import ImageModel
from vitlens.models.capture import AttentionRecorder, swapped_forward
from vitlens.models.mha import mha_capturing_forward
from vitlens.models.preprocess import Preprocess, interpolation_name, torchvision_default_preprocess
from vitlens.models.registry import Family, LoadedModule, register_family, register_spec
from vitlens.models.weights import (HUB_HINT, infer_num_classes, load_state_dict_checked, looks_like_hub_error,
                                    read_weights)


def is_torchvision_vit(module: nn.Module) -> bool:
    from torchvision.models.vision_transformer import VisionTransformer

    return isinstance(module, VisionTransformer)


class TorchvisionViT(ImageModel):
    """torchvision ``VisionTransformer``."""

    family = "torchvision"

    @property
    def num_classes(self) -> int:
        return int(self.module.num_classes)

    @property
    def num_layers(self) -> int:
        return len(self.module.encoder.layers)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def patch_size(self):
        return (self.module.patch_size, self.module.patch_size)

    def block_norm_names(self):
        return [self.module_name(block.ln_1) for block in self.module.encoder.layers]

    def fixed_input_size(self):
        return (self.module.image_size, self.module.image_size)

    def logits(self, x):
        return self.module(x)

    def _head(self, hidden):
        return self.module.heads(self.module.encoder.ln(hidden)[:, 0])

    @contextlib.contextmanager
    def capture(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        with contextlib.ExitStack() as stack:
            for i, block in enumerate(self.module.encoder.layers):
                mha = block.self_attention
                stack.enter_context(swapped_forward(mha, mha_capturing_forward(mha, i, recorder)))
                if recorder.keep_block_outputs:
                    handle = block.register_forward_hook(_block_hook(i, recorder))
                    stack.callback(handle.remove)
            yield recorder


def _block_hook(index, recorder):
    def hook(module, inputs, output):
        recorder.on_block_output(index, output)

    return hook


# --- loading --------------------------------------------------------------------------------
def load_torchvision_spec(spec, name, weights, num_classes):
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise ModelError(f"unknown torchvision model '{name}'") from None
    preprocess, class_names = None, None
    state = read_weights(weights) if weights is not None else None
    if num_classes is None and state is not None:
        num_classes = infer_num_classes(state, ("heads.head.weight", "fc.weight", "classifier.1.weight"))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if weights is None:
        enum = torchvision.models.get_model_weights(name).DEFAULT
        if hub.torch_hub_cached_file(enum.url) is None and not hub.reachable(hub.TORCH_HOST):
            raise ModelError(f"cannot fetch pretrained weights for '{spec}': {hub.TORCH_HOST} is unreachable; "
                             "pass --weights FILE or put the file in torch's hub cache")
        try:
            module = builder(weights=enum, **kwargs)
        except Exception as exc:
            if looks_like_hub_error(exc):
                raise ModelError(f"cannot fetch pretrained weights for '{spec}' (download unreachable?): "
                                 f"{HUB_HINT}") from None
            raise ModelError(f"cannot build torchvision model '{name}': {one_line(exc)}") from None
        t = enum.transforms()
        preprocess = Preprocess(
            input_size=(t.crop_size[0], t.crop_size[0]), mean=tuple(t.mean), std=tuple(t.std),
            interpolation=interpolation_name(t.interpolation), crop_pct=t.crop_size[0] / t.resize_size[0],
        )
        class_names = enum.meta.get("categories")
    else:
        module = builder(weights=None, **kwargs)
        load_state_dict_checked(module, state, weights, spec)
    return LoadedModule(module, preprocess=preprocess, class_names=class_names)


def wrap(module, preprocess=None, class_names=None, info=None) -> TorchvisionViT:
    return TorchvisionViT(module, preprocess or torchvision_default_preprocess(module.image_size), class_names, info)


register_family(Family("torchvision", "image", is_torchvision_vit, wrap, priority=30,
                       description="torchvision VisionTransformer"))
# torchvision:NAME builds any torchvision classifier; the registry picks its adapter (ViT or CNN)
register_spec("image", "torchvision", load_torchvision_spec)
