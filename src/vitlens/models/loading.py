"""``load_model``: from a spec string (or a module) to an :class:`ExplainableModel`.

Specs: ``timm:NAME[.TAG]``, ``hf:ORG/NAME`` or a local Hugging Face directory, ``torchvision:NAME``,
or an already-built ``nn.Module``. ``weights`` is a local ``.pth``/``.pt``/``.bin``/``.safetensors``
file, read with ``torch.load(weights_only=True)`` or safetensors, never an arbitrary unpickle.
Without ``weights`` the pretrained weights come from the model hub (or its local cache).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from vitlens.errors import ModelError
from vitlens.models.base import ExplainableModel, ModelInfo
from vitlens.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, interpolation_name

HUB_HINT = "pass --weights FILE, or pre-populate the Hugging Face cache (see `vitlens cache-weights --help`)"


def load_model(spec, weights: str | os.PathLike | None = None, num_classes: int | None = None,
               device: str | torch.device | None = None) -> ExplainableModel:
    """Build an explainable model.

    Parameters
    ----------
    spec : str or nn.Module
        ``timm:NAME[.TAG]``, ``hf:ORG/NAME``, a local Hugging Face model directory,
        ``torchvision:NAME``, or a module (timm / Hugging Face / torchvision ViT).
    weights : path, optional
        Local checkpoint. Without it, ``timm:``/``hf:``/``torchvision:`` specs load the
        pretrained weights from the hub or its local cache.
    num_classes : int, optional
        Size of the classifier head (defaults to the checkpoint's / pretrained config's).
    device : str or torch.device, optional
        Where to put the model (default: CPU).

    Returns
    -------
    ExplainableModel
        The adapter, in eval mode.
    """
    if isinstance(spec, ExplainableModel):
        model = spec
    elif isinstance(spec, nn.Module):
        if weights is not None:
            _load_state_dict(spec, read_weights(weights), weights, f"module:{type(spec).__name__}")
        model = wrap_module(spec, info=ModelInfo(spec=f"module:{type(spec).__name__}"))
    elif isinstance(spec, (str, os.PathLike)):
        model = _load_from_spec(str(spec), weights, num_classes)
    else:
        raise ModelError(f"cannot load a model from {type(spec).__name__}: give a spec string or an nn.Module")
    if weights is not None:
        model.info.weights = str(Path(weights).resolve())
        model.info.weights_sha256 = file_sha256(weights)
    model.module.eval()
    if device is not None:
        model.to(device)
    return model


def wrap_module(module: nn.Module, preprocess: Preprocess | None = None, class_names=None,
                info: ModelInfo | None = None) -> ExplainableModel:
    """Pick the adapter for a module's family."""
    from vitlens.models.cnn import CNNModel, is_cnn
    from vitlens.models.hf_vit import HFViT, is_hf_vit
    from vitlens.models.timm_vit import TimmViT, is_timm_vit
    from vitlens.models.torchvision_vit import TorchvisionViT, is_torchvision_vit

    if is_timm_vit(module):
        cls, default_pre = TimmViT, _timm_preprocess(module)
    elif is_hf_vit(module):
        cls, default_pre = HFViT, _hf_preprocess_from_config(module.config, None)
    elif is_torchvision_vit(module):
        cls, default_pre = TorchvisionViT, _torchvision_default_preprocess(module.image_size)
    elif is_cnn(module):
        cls, default_pre = CNNModel, _cnn_default_preprocess(module)
    else:
        raise ModelError(
            f"{type(module).__name__} is not a supported model: vitlens reads timm / Hugging Face / torchvision "
            "vision transformers and convolutional classifiers"
        )
    if class_names is None:
        class_names = _default_class_names(module)
    return cls(module, preprocess or default_pre, class_names, info)


def _load_from_spec(spec: str, weights, num_classes) -> ExplainableModel:
    kind, _, name = spec.partition(":")
    if kind == "timm" and name:
        return _load_timm(spec, name, weights, num_classes)
    if kind == "hf" and name:
        return _load_hf(spec, name, weights, num_classes)
    if kind == "torchvision" and name:
        return _load_torchvision(spec, name, weights, num_classes)
    if kind == "vitlens" and name:
        from vitlens.models.packaged import load_packaged

        return load_packaged(spec, name, weights)
    if Path(spec).is_dir() and (Path(spec) / "config.json").is_file():
        return _load_hf(spec, spec, weights, num_classes)
    if Path(spec).exists():
        raise ModelError(f"'{spec}' is not a model spec: a local model must be a Hugging Face directory with config.json "
                         "(for a checkpoint file use --model timm:NAME --weights FILE)")
    raise ModelError(f"unknown model spec '{spec}': use timm:NAME, hf:ORG/NAME, torchvision:NAME, vitlens:NAME "
                     "or a local HF directory")


# --- timm ----------------------------------------------------------------------------------
def _load_timm(spec, name, weights, num_classes):
    import timm

    from vitlens.models import hub

    base = name.split(".")[0]
    if not timm.is_model(base):
        raise ModelError(f"unknown timm model '{name}'")
    state = read_weights(weights) if weights is not None else None
    if num_classes is None and state is not None:
        num_classes = _infer_num_classes(state, ("head.weight",))
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
        if weights is None and _looks_like_hub_error(exc):
            raise ModelError(f"cannot fetch pretrained weights for '{spec}' (model hub unreachable?): {HUB_HINT}") from None
        raise ModelError(f"cannot build timm model '{name}': {_one_line(exc)}") from None
    if state is not None:
        _load_state_dict(module, state, weights, spec)
    return wrap_module(module, info=ModelInfo(spec=spec))


def _timm_preprocess(module) -> Preprocess:
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


# --- Hugging Face --------------------------------------------------------------------------
def _load_hf(spec, name, weights, num_classes):
    from vitlens.models import hub

    is_local = Path(name).is_dir()
    module = None
    # the local cache first: a pre-populated cache works offline without a network attempt
    for local_only in ((True,) if is_local else (True, False)):
        if not local_only and not hub.reachable(hub.HF_HOST):
            raise ModelError(f"cannot fetch '{spec}': the model hub is unreachable and it is not cached; {HUB_HINT}")
        try:
            module = _hf_build(spec, name, weights, num_classes, local_only)
            break
        except OSError as exc:
            if is_local:
                raise ModelError(f"cannot load Hugging Face model directory '{name}': {_one_line(exc)}") from None
            if not local_only:
                raise ModelError(f"cannot fetch '{spec}' (no such model, or the hub failed): {HUB_HINT}") from None
        except (ValueError, KeyError) as exc:
            raise ModelError(f"'{name}' is not an image classification model: {_one_line(exc)}") from None
    preprocess = _hf_preprocess_from_config(module.config, name)
    return wrap_module(module, preprocess=preprocess, info=ModelInfo(spec=spec))


def _hf_build(spec, name, weights, num_classes, local_files_only):
    from transformers import AutoConfig, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING
    from transformers.utils import logging as hf_logging

    if weights is None:
        kwargs = {} if num_classes is None else {"num_labels": num_classes, "ignore_mismatched_sizes": True}
        return AutoModelForImageClassification.from_pretrained(name, local_files_only=local_files_only, **kwargs)
    config = AutoConfig.from_pretrained(name, local_files_only=local_files_only,
                                        **({} if num_classes is None else {"num_labels": num_classes}))
    if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
        raise ValueError(f"{type(config).__name__} has no image classification model")
    cls = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING[type(config)]
    state = read_weights(weights)
    # transformers converts saved (hub) key names to its in-memory names itself
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        module, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = [(label, sorted(info.get(key) or [])) for label, key in
                (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("wrong-shape", "mismatched_keys"))]
    problems = [(label, [k if isinstance(k, str) else k[0] for k in keys]) for label, keys in problems if keys]
    if problems:
        parts = [f"{len(keys)} {label} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
                 for label, keys in problems]
        raise ModelError(f"weights '{weights}' do not fit {spec}: " + "; ".join(parts))
    return module


def _hf_preprocess_from_config(config, name) -> Preprocess:
    """Translate a Hugging Face image-processor config (ViT/DeiT style) into a :class:`Preprocess`."""
    proc = {}
    if name is not None:
        try:
            from transformers.image_processing_base import ImageProcessingMixin

            proc, _ = ImageProcessingMixin.get_image_processor_dict(name, local_files_only=True)
        except Exception:  # no processor config saved: fall back to the model config
            proc = {}
    size = proc.get("size") or {}
    image_size = getattr(config, "image_size", 224)
    image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if "height" in size:
        resize_to = (int(size["height"]), int(size["width"]))
    elif "shortest_edge" in size:
        resize_to = (int(size["shortest_edge"]),) * 2
    else:
        resize_to = image_size
    crop = proc.get("crop_size") or {}
    if proc.get("do_center_crop") and "height" in crop:
        input_size = (int(crop["height"]), int(crop["width"]))
        crop_pct = input_size[0] / resize_to[0]
        mode = "shorter"
    else:
        input_size = resize_to
        crop_pct = 1.0
        mode = "exact"
    return Preprocess(
        input_size=input_size,
        mean=tuple(proc.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(proc.get("image_std", (0.5, 0.5, 0.5))),
        interpolation=interpolation_name(proc.get("resample", 2)),
        crop_pct=crop_pct,
        resize_mode=mode,
    )


# --- torchvision ---------------------------------------------------------------------------
def _load_torchvision(spec, name, weights, num_classes):
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise ModelError(f"unknown torchvision model '{name}'") from None
    preprocess, class_names = None, None
    state = read_weights(weights) if weights is not None else None
    if num_classes is None and state is not None:
        num_classes = _infer_num_classes(state, ("heads.head.weight", "fc.weight", "classifier.1.weight"))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if weights is None:
        from vitlens.models import hub

        enum = torchvision.models.get_model_weights(name).DEFAULT
        if hub.torch_hub_cached_file(enum.url) is None and not hub.reachable(hub.TORCH_HOST):
            raise ModelError(f"cannot fetch pretrained weights for '{spec}': {hub.TORCH_HOST} is unreachable; "
                             "pass --weights FILE or put the file in torch's hub cache")
        try:
            module = builder(weights=enum, **kwargs)
        except Exception as exc:
            if _looks_like_hub_error(exc):
                raise ModelError(f"cannot fetch pretrained weights for '{spec}' (download unreachable?): {HUB_HINT}") from None
            raise ModelError(f"cannot build torchvision model '{name}': {_one_line(exc)}") from None
        t = enum.transforms()
        preprocess = Preprocess(
            input_size=(t.crop_size[0], t.crop_size[0]), mean=tuple(t.mean), std=tuple(t.std),
            interpolation=interpolation_name(t.interpolation), crop_pct=t.crop_size[0] / t.resize_size[0],
        )
        class_names = enum.meta.get("categories")
    else:
        module = builder(weights=None, **kwargs)
        _load_state_dict(module, state, weights, spec)
    return wrap_module(module, preprocess=preprocess, class_names=class_names, info=ModelInfo(spec=spec))


def _cnn_default_preprocess(module) -> Preprocess:
    if getattr(module, "pretrained_cfg", None):  # a timm CNN knows its preprocessing
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=module)
        _, h, w = cfg["input_size"]
        return Preprocess((int(h), int(w)), tuple(cfg["mean"]), tuple(cfg["std"]),
                          interpolation_name(cfg.get("interpolation", "bilinear")), float(cfg.get("crop_pct", 0.875)))
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "num_labels"):
        return _hf_preprocess_from_config(config, getattr(config, "_name_or_path", None) or None)
    return _torchvision_default_preprocess(224)


def _torchvision_default_preprocess(image_size: int) -> Preprocess:
    return Preprocess(input_size=(image_size, image_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      interpolation="bilinear", crop_pct=224 / 256)


# --- weights files -------------------------------------------------------------------------
def read_weights(path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely into a flat ``{name: tensor}`` dict."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelError(f"cannot read weights '{path}': {_one_line(exc)}") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"cannot read weights '{path}' as a plain tensor checkpoint (weights_only=True): {_one_line(exc)}"
        ) from None
    # common wrappers: {"state_dict": ...}, {"model": ...}
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights '{path}' are not a state dict of tensors")
    return state


def _load_state_dict(module: nn.Module, state: dict, path, spec: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
                parts.append(f"{len(keys)} {label} ({shown})")
        raise ModelError(f"weights '{path}' do not fit {spec}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def _infer_num_classes(state: dict, keys) -> int | None:
    for key in keys:
        if key in state and state[key].ndim == 2:
            return int(state[key].shape[0])
    return None


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _default_class_names(module) -> list[str] | None:
    config = getattr(module, "config", None)
    id2label = getattr(config, "id2label", None)
    if id2label and not all(str(v).startswith("LABEL_") for v in id2label.values()):
        return [str(id2label[i]) for i in range(len(id2label))]
    n = getattr(module, "num_classes", None) or getattr(config, "num_labels", None)
    if n == 1000:
        return imagenet_class_names()
    return None


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in index order (shipped with timm)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def _looks_like_hub_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    markers = ("connection", "offline", "resolve", "network", "timed out", "timeout", "hub", "urlopen",
               "max retries", "name or service", "localentrynotfound", "cannot find the requested files",
               "couldn't connect", "unreachable", "temporary failure", "ssl", "http")
    return any(m in text for m in markers)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def describe(model: ExplainableModel) -> dict:
    """Provenance of a model for manifests."""
    return {
        "spec": model.info.spec,
        "family": model.family,
        "weights": model.info.weights,
        "weights_sha256": model.info.weights_sha256,
        "preprocess": model.preprocess.to_dict(),
        "num_classes": model.num_classes,
    }

