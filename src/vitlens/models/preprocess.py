"""Image preprocessing described by the model's own configuration.

Every model family states its preprocessing somewhere different (a timm pretrained config, a Hugging
Face image-processor config, torchvision's weight metadata). Adapters translate theirs into one
:class:`Preprocess`, so the rest of vitlens never guesses a mean, a crop or an interpolation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from vitlens.errors import UsageError

_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Hugging Face processor configs store PIL's integer codes.
_PIL_CODE_TO_NAME = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How a PIL image becomes the model's input tensor.

    Parameters
    ----------
    input_size : (int, int)
        Height and width of the model input.
    mean, std : tuple of float
        Per-channel normalisation applied to values scaled to [0, 1].
    interpolation : str
        Resampling filter name: ``nearest``, ``bilinear``, ``bicubic``, ``lanczos``...
    crop_pct : float
        ``resize_mode='shorter'`` resizes the shorter side to ``size / crop_pct`` and then centre
        crops ``input_size`` (timm and torchvision convention); 1.0 means no margin is cropped.
    resize_mode : str
        ``'shorter'`` (resize shorter side, keep aspect, centre crop) or ``'exact'`` (resize both
        sides to ``input_size``, aspect not kept: the Hugging Face ViT processor convention).
    """

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    resize_mode: str = "shorter"
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if not d["extra"]:
            del d["extra"]
        return d

    def geometry(self, width: int, height: int) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
        """Resized size and the crop box in *original* pixel coordinates.

        Returns
        -------
        resized : (int, int)
            (width, height) the image is resized to before cropping.
        crop_box : (x0, y0, x1, y1)
            The region of the original image that ends up in the model input; explanation maps
            are placed back onto the original image through this box.
        """
        out_h, out_w = self.input_size
        if self.resize_mode == "exact":
            return (out_w, out_h), (0.0, 0.0, float(width), float(height))
        if self.resize_mode != "shorter":
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}")
        if out_h == out_w:
            # Same rule as timm / torchvision Resize(int): the shorter side becomes
            # floor(size / crop_pct), the longer side keeps the aspect ratio (truncated).
            target = math.floor(out_h / self.crop_pct)
            if width <= height:
                new_w, new_h = target, int(target * height / width)
            else:
                new_w, new_h = int(target * width / height), target
        else:
            # timm resizes non-square inputs to floor(size / crop_pct) per side.
            new_w, new_h = math.floor(out_w / self.crop_pct), math.floor(out_h / self.crop_pct)
        new_w, new_h = max(new_w, out_w), max(new_h, out_h)
        left, top = _crop_offset(new_w, out_w), _crop_offset(new_h, out_h)
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
        return (new_w, new_h), box

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
        """Preprocess one RGB PIL image; returns the (3, H, W) tensor and the crop box."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        (new_w, new_h), box = self.geometry(*image.size)
        resample = _PIL_RESAMPLE[self.interpolation]
        resized = image.resize((new_w, new_h), resample=resample)
        out_h, out_w = self.input_size
        left, top = _crop_offset(new_w, out_w), _crop_offset(new_h, out_h)
        cropped = resized.crop((left, top, left + out_w, top + out_h))
        array = np.asarray(cropped, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (tensor - mean) / std, box

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map a normalised (B, 3, H, W) batch back to [0, 1] pixel values."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x * std + mean

    def with_input_size(self, height: int, width: int) -> "Preprocess":
        return Preprocess((height, width), self.mean, self.std, self.interpolation, self.crop_pct, self.resize_mode,
                          self.extra)

    def with_overrides(self, input_size=None, mean=None, std=None, interpolation=None) -> "Preprocess":
        """This preprocessing with the given fields replaced (None keeps a field); values are checked.

        ``input_size`` is an int, (H, W) or a string ``'32'`` / ``'32x48'`` / ``'32,48'``; ``mean`` and
        ``std`` are one value or one per channel (a sequence or a comma-separated string).
        """
        return Preprocess(
            self.input_size if input_size is None else parse_input_size(input_size),
            self.mean if mean is None else parse_channel_values(mean, "mean"),
            self.std if std is None else parse_channel_values(std, "std", positive=True),
            self.interpolation if interpolation is None else parse_interpolation(interpolation),
            self.crop_pct, self.resize_mode, self.extra,
        )


def _crop_offset(size: int, crop: int) -> int:
    # torchvision CenterCrop rounds the same way
    return int(round((size - crop) / 2.0))


def parse_input_size(value) -> tuple[int, int]:
    """An input size given as an int, (H, W) or a string (``'32'``, ``'32x48'``, ``'32,48'``) -> (H, W)."""
    parts = value
    if isinstance(value, str):
        parts = [p for p in value.lower().replace("x", ",").split(",") if p.strip()]
    elif isinstance(value, int) or (hasattr(value, "__index__") and not hasattr(value, "__len__")):
        parts = [value]
    try:
        sizes = [int(p) for p in parts]
        if any(float(p) != size for p, size in zip(parts, sizes)):
            raise ValueError
    except (TypeError, ValueError):
        raise UsageError(f"input size {value!r} is not an int or H,W pair of ints") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise UsageError(f"input size {value!r} must be one positive int or two (height, width)")
    return sizes[0], sizes[1]


def parse_channel_values(value, name: str, channels: int = 3, positive: bool = False) -> tuple[float, ...]:
    """Per-channel normalisation values: one value (for every channel) or one per channel."""
    parts = value.split(",") if isinstance(value, str) else value
    if isinstance(parts, (int, float)):
        parts = [parts]
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UsageError(f"{name} {value!r} is not a number or a list of {channels} numbers") from None
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise UsageError(f"{name} needs 1 or {channels} values (one per channel), got {len(values)}")
    if not all(math.isfinite(v) for v in values) or (positive and min(values) <= 0):
        raise UsageError(f"{name} {value!r} must be finite{' and > 0' if positive else ''}")
    return values


def parse_interpolation(value) -> str:
    """A resampling filter name (``nearest``, ``bilinear``, ``bicubic``...), checked."""
    name = str(getattr(value, "value", value)).lower()
    if name not in _PIL_RESAMPLE:
        raise UsageError(f"unknown interpolation {value!r}: expected one of {', '.join(_PIL_RESAMPLE)}")
    return name


def interpolation_name(value) -> str:
    """Normalise an interpolation given as a name, a PIL code or a torchvision enum."""
    if isinstance(value, int):
        return _PIL_CODE_TO_NAME.get(value, "bilinear")
    name = getattr(value, "value", value)
    name = str(name).lower()
    if name not in _PIL_RESAMPLE:
        return "bilinear"
    return name


def hf_preprocess_from_config(config, name) -> Preprocess:
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


def torchvision_default_preprocess(image_size: int) -> Preprocess:
    return Preprocess(input_size=(image_size, image_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      interpolation="bilinear", crop_pct=224 / 256)
