"""The Python face of vitlens: ``explain(model, images, methods, target)``."""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from vitlens.cliargs import (check_count, check_overlay, check_params_requested, check_signed_display, check_target,
                             select_device)
from vitlens.diagnostics import degenerate_kind, flat_scores, likely_cause, summarise
from vitlens.engine import (check_precision, keeps_attention_gradients, keeps_head_means_only, precision_name,
                            run_batch)
from vitlens.errors import InputError, ResourceError
from vitlens.memory import bytes_per_image, default_budget, images_per_pass, parse_size
from vitlens.methods import check_params_for_model, get_method, parse_methods, to_pixels
from vitlens.models import ImageModel, load_model


@dataclass
class Prediction:
    """A class decision: index, human-readable name and softmax probability."""

    index: int
    name: str
    prob: float

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "prob": round(float(self.prob), 6)}


@dataclass
class InputRecord:
    """Where an explained image came from and how it was cropped for the model."""

    source: str | None
    image: Image.Image | None
    crop_box: tuple | None


@dataclass
class ExplainResult:
    """Maps and predictions for a batch of images.

    Attributes
    ----------
    methods : list of str
    maps : dict
        method -> (B, K, H, W) float tensor in [0, 1] at the model's input resolution.
    patch_maps : dict
        method -> (B, K, h, w) raw, un-normalised patch maps.
    targets : LongTensor
        (B, K) explained classes (K = 1 unless top-k targets were asked for).
    predictions : list of Prediction
        Top-1 prediction per image.
    probabilities : Tensor
        (B, classes) softmax probabilities.
    inputs : list of InputRecord
    params : dict
        method -> the parameters used.
    extras : dict
        method -> per-target diagnostics, (B, K) tensors (LRP: ``relevance_sum``, ``target_logit``).
    precision : str
        The precision the model computed in: ``'fp32'``, ``'bf16'`` or ``'fp16'`` (maps are float32
        either way).

    For signed methods (LRP) ``patch_maps`` holds the signed pixel relevance (B, K, H, W) and
    ``maps`` its positive part divided by its maximum.
    """

    model: ImageModel
    methods: list
    maps: dict
    patch_maps: dict
    targets: torch.Tensor
    predictions: list
    probabilities: torch.Tensor
    inputs: list
    params: dict = field(default_factory=dict)
    input_tensors: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    precision: str = "fp32"

    def __getitem__(self, method: str) -> torch.Tensor:
        """(B, H, W) maps of a method when there is one target per image, else (B, K, H, W)."""
        maps = self.maps[method]
        return maps[:, 0] if maps.shape[1] == 1 else maps

    def __len__(self) -> int:
        return self.targets.shape[0]

    def degenerate_maps(self, index: int | None = None) -> list[dict]:
        """The maps that show nothing (:mod:`vitlens.diagnostics`): constant, all-zero or non-finite raw maps.

        One dict per such map: ``index`` (image), ``slot`` (target), ``method``, ``kind``, ``cause`` (the
        likely reason in words) and ``image`` (the input's path, or ``input N``); only image ``index``'s
        maps when it is given.
        """
        found = []
        images = range(len(self)) if index is None else [index]
        for method in self.methods:
            raw = self.patch_maps[method]
            for index in images:
                flat = flat_scores(self.probabilities[index])
                for slot in range(raw.shape[1]):
                    kind = degenerate_kind(raw[index, slot])
                    if kind is not None:
                        found.append({"index": index, "slot": slot, "method": method, "kind": kind,
                                      "cause": likely_cause(kind, flat, self.precision),
                                      "image": self.inputs[index].source or f"input {index}"})
        return found

    def map_warnings(self) -> list[str]:
        """One line per method and kind of degenerate map (empty when every map shows something)."""
        return summarise((m["method"], m["kind"], m["cause"], m["image"]) for m in self.degenerate_maps())

    def target_predictions(self, i: int) -> list:
        """The explained targets of image ``i`` as :class:`Prediction` objects."""
        return [
            Prediction(int(t), self.model.class_name(int(t)), float(self.probabilities[i, int(t)]))
            for t in self.targets[i].tolist()
        ]

    def save(self, out_dir, cmap: str = "jet", alpha: float = 0.5, signed_display: str = "signed") -> Path:
        """Write overlays (PNG), raw maps (``.npy``) and ``manifest.json`` into ``out_dir``.

        ``signed_display``: the overlays of signed methods (AttnLRP, CP-LRP) show their ``'signed'``
        relevance on a diverging colormap centred at zero (default) or their ``'positive'`` part.
        """
        from vitlens.outputs import RunWriter

        check_overlay(cmap, alpha, prefix="")  # before RunWriter writes run.json
        check_signed_display(signed_display, option="signed_display")
        writer = RunWriter(out_dir, self.model, {m: self.params[m] for m in self.methods}, resume=False,
                           cmap=cmap, alpha=alpha, signed_display=signed_display)
        for i in range(len(self)):
            record = self.inputs[i]
            writer.write_image(_key_for(record.source, i), record.source, record.image, record.crop_box, self, i)
        writer.finish()
        return Path(out_dir)


def positive_part(relevance: torch.Tensor, size) -> torch.Tensor:
    """Signed relevance (N, h, w) -> its positive part over its maximum, (N, H, W) in [0, 1]."""
    import torch.nn.functional as F

    positive = relevance.double().clamp_min(0)
    if tuple(positive.shape[-2:]) != tuple(size):
        positive = F.interpolate(positive.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    top = positive.flatten(1).amax(1).clamp_min(1e-12)
    return (positive / top[:, None, None]).float()


def _key_for(source: str | None, index: int) -> str:
    from vitlens.data.samples import make_key

    name = Path(source).name if source else "image"
    return f"{index:04d}_{make_key(name)}"


def prepare_inputs(model: ImageModel, images) -> tuple[torch.Tensor, list]:
    """Turn paths, encoded bytes, PIL images, arrays or tensors into one preprocessed batch.

    A float torch tensor is taken as already preprocessed model input, (3, H, W) or (B, 3, H, W).
    Everything else is an image and goes through :func:`vitlens.data.images.to_rgb_image`, the
    decoding of image files: a PIL image in any mode, a numpy array or an integer tensor of any
    supported dtype ((H, W[, C]) or (C, H, W): uint8, uint16, bool, floats in [0, 1]) gives the
    pixels its file would.
    """
    from vitlens.data.images import to_rgb_image

    if isinstance(images, torch.Tensor) and images.is_floating_point():
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise InputError(f"a tensor input must be (B, 3, H, W) preprocessed images, got {tuple(images.shape)}")
        return batch.float(), [InputRecord(None, None, None) for _ in range(batch.shape[0])]
    if not isinstance(images, (list, tuple)) and not inspect.isgenerator(images):
        images = [images]  # one image, whatever its form
    tensors, records = [], []
    for index, item in enumerate(images):
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            if item.dim() != 3:
                raise InputError("a tensor in a list of images must be one (3, H, W) preprocessed image")
            tensors.append(item.float())
            records.append(InputRecord(None, None, None))
            continue
        source = str(item) if isinstance(item, (str, os.PathLike)) else None
        image = to_rgb_image(item, name=None if source else f"input {index}")
        tensor, box = model.preprocess(image)
        tensors.append(tensor)
        records.append(InputRecord(source, image, box))
    if not tensors:
        raise InputError("no images given")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise InputError(f"images of different preprocessed sizes cannot share a batch: {sorted(shapes)}")
    return torch.stack(tensors), records


class DegenerateMapWarning(UserWarning):
    """Some explanation maps are constant, all zero or not finite (see :meth:`ExplainResult.map_warnings`)."""


def explain(model, images, methods=None, target=None, batch_size: int = 16, device=None,
            params: dict | None = None, precision="fp32", warn: bool = True, memory_budget=None) -> ExplainResult:
    """Explain images with one or more methods, all from one pass per batch.

    Parameters
    ----------
    model : ImageModel, nn.Module or str
        An adapter from :func:`vitlens.load_model`, a supported module, or a model spec.
    images : path, bytes, PIL image, array, tensor, or a sequence of them
        Float tensors are taken as preprocessed model input; every other form is decoded as its image
        file would be (see :func:`prepare_inputs`).
    methods : str or sequence of str, optional
        Method names, ``'all'`` (default) or a comma-separated string.
    target : optional
        None / ``'pred'`` (predicted class), an index, a class name, ``'topK'``, or one
        index/name per image.
    batch_size : int
        Images per forward pass.
    device : str or torch.device, optional
        Defaults to the model's device.
    params : dict, optional
        Per-method parameter overrides, e.g. ``{'rollout': {'discard_ratio': 0.9}}``.
    precision : str
        What the model computes in: ``'fp32'`` (default, exactly as without the argument), ``'bf16'``
        or ``'fp16'`` (torch's spellings ``'float32'``, ``'bfloat16'``, ``'float16'`` and the torch
        dtypes are accepted too). With bf16 / fp16 the model's forward passes run under
        ``torch.autocast(device_type=<the model's device type>, dtype=...)`` and the backward passes
        follow autocast's dtypes; the captured attention, gradients and activations are cast up to
        float32 before any method combines them, so only the model's own computation is in reduced
        precision. The parameters are never cast and nothing is left on the model. AttnLRP and
        CP-LRP always run in float32 (their maps are the fp32 maps): their Gamma rule's backward
        cannot run on autocast's mixed dtypes. A dtype torch's autocast does not support on the model's
        device type (bf16 on a GPU without bfloat16, fp16 where torch's CPU autocast lacks it) and an unknown name are
        one-line ``UsageError``s, raised before any work.

    memory_budget : int, str or None
        The most memory one pass may use, in bytes or as ``'8GB'`` / ``'512MiB'``; default 80 % of the
        memory free on the model's device. A batch whose estimated peak (:mod:`vitlens.memory`) exceeds
        it is explained in smaller chunks (the maps are the same); on CUDA a chunk that still runs out of
        memory is halved and tried again, down to one image.
    warn : bool
        Emit one :class:`DegenerateMapWarning` when some maps are constant, all zero or not finite, naming
        the methods, the first image and the likely cause (:meth:`ExplainResult.map_warnings`; default True).

    Returns
    -------
    ExplainResult
    """
    check_count(batch_size, "batch_size")
    precision = precision_name(precision)
    if not isinstance(model, ImageModel):
        model = load_model(model)
    names = parse_methods(methods, model)
    check_params_requested(params, names, option="params", among="the methods")
    resolved = {name: get_method(name).params((params or {}).get(name)) for name in names}
    # layer indices depend on the model: refused here, before the first batch. Grad-CAM layers are left
    # to the engine, which names the batch's own shapes (this writes nothing; run_explain and the CLI,
    # which do, check them against the adapter's dry run first)
    check_params_for_model(resolved, model.num_layers if model.has_attention else None)
    check_target(model, target)
    if device is not None:
        model.to(select_device(device, option="device"))
    check_precision(precision, model.device)  # autocast supports the dtype on this device type
    budget = parse_size(memory_budget)
    batch, records = prepare_inputs(model, images)
    if budget is None:
        budget = default_budget(model.device)
    per_image = bytes_per_image(model, keeps_attention_gradients(resolved), tuple(batch.shape[-2:]),
                                head_means=keeps_head_means_only(resolved))
    chunk_size = images_per_pass(batch_size, per_image, budget)
    per_image_targets = isinstance(target, (list, tuple)) or (isinstance(target, torch.Tensor) and target.dim() >= 1)
    maps: dict = {n: [] for n in names}
    patch_maps: dict = {n: [] for n in names}
    extras: dict = {}
    targets, logits = [], []
    start = 0
    while start < batch.shape[0]:
        chunk = batch[start:start + chunk_size].to(device=model.device, dtype=model.dtype)
        chunk_target = target[start:start + chunk.shape[0]] if per_image_targets else target
        try:
            result = run_batch(model, chunk, resolved, chunk_target, precision=precision)
        except torch.OutOfMemoryError:
            if chunk.shape[0] == 1:
                raise ResourceError(f"out of memory explaining one image on {model.device} with "
                                    f"{', '.join(names)}: try fewer methods, --precision bf16 or a smaller "
                                    "input") from None
            chunk_size = max(1, chunk.shape[0] // 2)  # and the same images again
            del chunk
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        start += chunk.shape[0]
        for name in names:
            raw = result.patch_maps[name]
            b, k, h, w = raw.shape
            patch_maps[name].append(raw.cpu())
            pixels = positive_part(raw.reshape(b * k, h, w), result.input_size) if get_method(name).signed \
                else to_pixels(raw.reshape(b * k, h, w), result.input_size)
            maps[name].append(pixels.reshape(b, k, *result.input_size).cpu())
        for name, values in result.extras.items():
            for key, tensor in values.items():
                extras.setdefault(name, {}).setdefault(key, []).append(tensor.cpu())
        targets.append(result.targets.cpu())
        logits.append(result.logits.cpu())
    all_logits = torch.cat(logits)
    probabilities = all_logits.float().softmax(dim=-1)
    top = probabilities.argmax(dim=-1)
    predictions = [Prediction(int(i), model.class_name(int(i)), float(probabilities[b, i])) for b, i in enumerate(top)]
    result = ExplainResult(
        model=model,
        methods=names,
        maps={n: torch.cat(v) for n, v in maps.items()},
        patch_maps={n: torch.cat(v) for n, v in patch_maps.items()},
        targets=torch.cat(targets),
        predictions=predictions,
        probabilities=probabilities,
        inputs=records,
        params=resolved,
        input_tensors=batch.cpu(),
        extras={n: {k: torch.cat(v) for k, v in d.items()} for n, d in extras.items()},
        precision=precision,
    )
    if warn:
        lines = result.map_warnings()
        if lines:
            warnings.warn("maps that show nothing: " + "; ".join(lines), DegenerateMapWarning, stacklevel=2)
    return result


__all__ = ["DegenerateMapWarning", "ExplainResult", "InputRecord", "Prediction", "explain", "prepare_inputs"]
