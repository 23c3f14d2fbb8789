"""Target layers for Grad-CAM-style methods: naming, automatic choice, and spatial reshaping.

A module's output is a map on the input's grid in one of three layouts: channel-first
``(B, C, h, w)`` (convolutions), channel-last ``(B, h, w, C)`` (timm Swin / Swin-V2 stages and
norms, ConvNeXt and MaxViT block internals), or a token sequence ``(B, h*w, C)`` in row-major order
(timm Swin's ``norm2``, which runs on flattened tokens; Hugging Face Swin stages). The tensor does not
say which: a dry run at the model's input size decides per layer, from evidence only
(:func:`scan_layers`), and a layer whose layout cannot be decided is refused by name instead of
being read the wrong way round.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from vitlens.errors import MethodError

_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)

#: layouts of a layer's output (timm's ``Format`` names); NCL is only a rival reading, never mapped
NCHW, NHWC, NLC, NCL = "NCHW", "NHWC", "NLC", "NCL"
_SHAPES = {NCHW: "(B, C, h, w)", NHWC: "(B, h, w, C)", NLC: "(B, h*w, C)", NCL: "(B, C, h*w)"}

# modules whose output is channel-first by definition: they treat dim 1 as channels of a 2-D map
_CHANNEL_FIRST = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm, nn.Dropout2d,
                  nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.LocalResponseNorm)
_TIMM_CHANNEL_FIRST = ("LayerNorm2d", "LayerNormAct2d", "RmsNorm2d", "RmsNormAct2d", "SimpleNorm2d", "BatchNormAct2d")


@dataclass(frozen=True)
class LayerLayout:
    """How one layer's output maps onto (B, C, h, w): its layout and its grid at the dry-run input size."""

    layout: str
    grid: tuple


@dataclass
class LayerScan:
    """What the dry run learnt about the model's modules.

    Attributes
    ----------
    names : list of str
        Modules whose output maps onto the input grid with h * w > 1, in completion order
        (pooling layers left out: Grad-CAM explains features, not their pooled copies).
    layouts : dict
        name -> :class:`LayerLayout` for every name in ``names``.
    problems : dict
        name -> why a module with a 3-D or 4-D output cannot be mapped (one clause, for errors).
    shapes : dict
        name -> the shape of every module's tensor output in the dry run.
    input_size : (int, int)
        The (H, W) of the dry run.
    """

    names: list = field(default_factory=list)
    layouts: dict = field(default_factory=dict)
    problems: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    input_size: tuple = (0, 0)


def fits_grid(h: int, w: int, size: tuple) -> bool:
    """Can (h, w) be the grid of an (H, W) input: one stride s for both axes, each off by less than a cell?

    A downsampling chain gives h = H/s rounded (floor or ceil at each step, padding), so
    |H/s - h| < 1 and |W/s - w| < 1 for the same s. The reading of a channel-last map as
    channel-first fails this by far: (1, 7, 7, 768) from a 224x224 input read as (C, h, w) has w = 768.
    """
    H, W = size
    if h < 1 or w < 1 or h * w < 2 or h > H or w > W:
        return False
    # |H/s - h| < 1  <=>  H/(h+1) < s < H/(h-1)   (no upper bound when h = 1)
    low = max(H / (h + 1), W / (w + 1))
    high = min(H / (h - 1) if h > 1 else float("inf"), W / (w - 1) if w > 1 else float("inf"))
    return low < high


def token_grids(count: int, size: tuple) -> list:
    """Every (h, w) with h * w = count that fits an (H, W) input."""
    return [(h, count // h) for h in range(1, min(count, size[0]) + 1)
            if count % h == 0 and fits_grid(h, count // h, size)]


def readings(shape: tuple, size: tuple) -> dict:
    """layout -> grids: every way a (B, ...) output of ``shape`` fits an (H, W) input."""
    found: dict = {}
    if len(shape) == 4:
        _, a, b, c = shape
        if fits_grid(b, c, size):
            found[NCHW] = [(b, c)]
        if fits_grid(a, b, size):
            found[NHWC] = [(a, b)]
    elif len(shape) == 3:
        _, a, b = shape
        for layout, count in ((NLC, a), (NCL, b)):
            grids = token_grids(count, size)
            if grids:
                found[layout] = grids
    return found


def _channels(shape: tuple, layout: str) -> int:
    return shape[{NCHW: 1, NHWC: 3, NLC: 2, NCL: 1}[layout]]


def _channel_first_types() -> tuple:
    # timm's channel-first norms subclass nn.LayerNorm (whose own output has no fixed layout); they are
    # only looked up when timm is already imported, i.e. when the model may contain them
    timm_layers = sys.modules.get("timm.layers")
    extra = () if timm_layers is None else tuple(
        t for t in (getattr(timm_layers, n, None) for n in _TIMM_CHANNEL_FIRST) if isinstance(t, type))
    return _CHANNEL_FIRST + extra


def declared_layout(module: nn.Module, channel_first: tuple | None = None) -> str | None:
    """The layout a module states for its output (timm ``output_fmt``) or has by construction (Conv2d...)."""
    fmt = getattr(module, "output_fmt", None)
    if fmt is not None:
        fmt = str(getattr(fmt, "value", fmt)).upper()
        if fmt in _SHAPES:
            return fmt
    if isinstance(module, channel_first or _channel_first_types()):
        return NCHW
    return None


def _model_feature_format(module: nn.Module) -> str | None:
    """The layout of the features a timm model hands its ``head`` (its ``output_fmt``: 'NHWC' for Swin)."""
    fmt = getattr(module, "output_fmt", None)
    head = getattr(module, "head", None)
    if fmt is None or not isinstance(head, nn.Module):
        return None
    fmt = str(getattr(fmt, "value", fmt)).upper()
    return fmt if fmt in (NCHW, NHWC) else None


def _describe(layouts) -> str:
    return " and ".join(_SHAPES[layout] for layout in layouts)


def scan_layers(module: nn.Module, example: torch.Tensor, second_size: tuple | None = None) -> LayerScan:
    """One forward of ``example`` under temporary hooks (removed afterwards): every module's output layout.

    A 3-D or 4-D output whose first dimension is the batch is read in every layout whose grid fits
    the input (:func:`fits_grid`). One fitting reading decides. Several are settled only by evidence:
    the module's declared layout (a convolution, timm's ``output_fmt``), the declared layout of an
    inner module that produced the very same tensor (a container returning its last child's output,
    an in-place activation), the model's ``output_fmt`` for the tensor it feeds its ``head``, and,
    when ``second_size`` is given and the model accepts an input of that size, a second dry run
    (spatial dimensions follow the input, channels do not). Otherwise the layer is not mappable and
    the reason is kept for the error message.
    """
    batch, size = example.shape[0], tuple(example.shape[-2:])
    scan = LayerScan(input_size=size)
    order, shapes, found, evidence = [], {}, {}, {}
    undecided: dict = {}  # name -> output, kept alive so the head's input can be matched by identity
    marks: dict = {}      # id(tensor) -> (weak reference, declared layout)
    channel_first = _channel_first_types()

    def mark(tensor, layout):
        marks[id(tensor)] = (weakref.ref(tensor), layout)

    def marked(tensor):
        entry = marks.get(id(tensor))
        # the weak reference guards against a freed tensor whose id was reused
        return entry[1] if entry is not None and entry[0]() is tensor else None

    handles = []
    for name, sub in module.named_modules():
        if not name:
            continue

        def hook(mod, inputs, output, name=name):
            if not isinstance(output, torch.Tensor):
                return
            own = declared_layout(mod, channel_first)
            if own is not None:
                mark(output, own)
            scan.shapes[name] = tuple(output.shape)
            if output.dim() not in (3, 4) or isinstance(mod, _POOLING):
                return
            order.append(name)
            shapes[name] = tuple(output.shape)
            found[name] = readings(tuple(output.shape), size) if output.shape[0] == batch else {}
            evidence[name] = own or marked(output)
            if len(found[name]) > 1 and evidence[name] is None:
                undecided[name] = output
            else:
                undecided.pop(name, None)

        handles.append(sub.register_forward_hook(hook))
    feature_format = _model_feature_format(module)
    if feature_format is not None:
        handles.append(module.head.register_forward_pre_hook(lambda mod, args: mark(args[0], feature_format)
                                                             if args and isinstance(args[0], torch.Tensor) else None))
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    for name, output in undecided.items():
        evidence[name] = marked(output)
    undecided.clear()

    ambiguous = [name for name in shapes if len(found[name]) > 1 and evidence[name] is None]
    if ambiguous and second_size is not None:
        _second_run(module, example, second_size, ambiguous, shapes, found)

    seen = set()
    for name in order:
        if name in seen:
            continue
        seen.add(name)
        shape, options, declared = shapes[name], found[name], evidence[name]
        if shape[0] != batch:
            scan.problems[name] = "its first dimension is not the batch"
            continue
        if declared in options:
            options = {declared: options[declared]}
        elif declared in (NCHW, NHWC) and len(shape) == 4:
            # a declared layout outweighs an odd geometry (valid convolutions on a non-square input)
            grid = shape[2:] if declared == NCHW else shape[1:3]
            if grid[0] <= size[0] and grid[1] <= size[1] and grid[0] * grid[1] > 1:
                options = {declared: [tuple(grid)]}
        where = f"a {size[0]}x{size[1]} input"
        if len(options) > 1:
            scan.problems[name] = f"ambiguous: {_describe(options)} both fit {where}"
        elif not options or NCL in options:
            # (B, C, h*w) only ever makes a token reading ambiguous; it is not mapped on its own: a
            # (B, 1 + h*w, C) sequence with a class token and a square width (C = 256 = 16x16) reads so
            scan.problems[name] = (f"neither {_SHAPES[NCHW]} nor {_SHAPES[NHWC]} fits {where}" if len(shape) == 4
                                   else f"{shape[1]} tokens fit no grid of {where}")
        else:
            (layout, grids), = options.items()
            if len(grids) > 1:
                scan.problems[name] = f"ambiguous: {shape[1]} tokens fit several grids of {where}"
            else:
                scan.layouts[name] = LayerLayout(layout, tuple(grids[0]))
                scan.names.append(name)
    return scan


def _second_run(module, example, second_size, names, shapes, found) -> None:
    """Keep only the readings of ``names`` that also hold for an input of ``second_size``."""
    second: dict = {}
    handles = []
    for name, sub in module.named_modules():
        if name in names:
            def hook(mod, inputs, output, name=name):
                if isinstance(output, torch.Tensor):
                    second[name] = tuple(output.shape)

            handles.append(sub.register_forward_hook(hook))
    probe = torch.zeros(*example.shape[:-2], *second_size, device=example.device, dtype=example.dtype)
    try:
        with torch.no_grad():
            module(probe)
    except Exception:  # noqa: BLE001 - a model that refuses another input size (timm Swin asserts) gives no evidence
        return
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        shape = second.get(name)
        if shape is None or len(shape) != len(shapes[name]) or shape[0] != shapes[name][0]:
            continue
        again = readings(shape, second_size)
        # channels do not depend on the input size, the grid does: only a reading true at both sizes stays
        found[name] = {layout: grids for layout, grids in found[name].items()
                       if layout in again and _channels(shape, layout) == _channels(shapes[name], layout)}


def spatial_layers(module: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules whose output maps onto the input grid (h * w > 1), in completion order."""
    return scan_layers(module, example).names


def suggest(valid: list[str] | None, count: int = 10) -> str:
    """A short list of layer names for error messages: shallow names first, the last ones kept."""
    valid = valid or []
    shallow = [name for name in valid if name.count(".") <= 1] or valid
    return ", ".join(shallow[-count:]) or "none: the model has no layer whose output maps onto the input grid"


def find_module(module: nn.Module, name: str, valid: list[str] | None = None) -> nn.Module:
    """Resolve a dotted module name (``layer4.1``, ``features.7``, ``blocks.-1.norm1``)."""
    current = module
    for part in name.split("."):
        try:
            if part.lstrip("-").isdigit() and isinstance(current, (nn.Sequential, nn.ModuleList)):
                current = current[int(part)]
            else:
                current = getattr(current, part)
        except (AttributeError, IndexError, TypeError):
            current = None
        if not isinstance(current, nn.Module):
            raise MethodError(f"unknown target layer '{name}': valid choices include {suggest(valid)}")
    return current


def unmappable(layer: str, shape: tuple, reason: str | None, valid: list | None) -> MethodError:
    """The one-line error for a target layer whose output does not map onto the input grid."""
    if len(shape) not in (3, 4):
        return MethodError(f"target layer '{layer}' has no spatial output (shape {shape}): "
                           f"choose one of {suggest(valid)}")
    return MethodError(f"target layer '{layer}' gives shape {shape}, which cannot be placed on the input's grid "
                       f"({reason or 'it did not run in the dry run'}): choose one of {suggest(valid)}")


def canonical_name(module: nn.Module, name: str, valid: list[str] | None = None) -> str:
    """The ``named_modules`` name of the module a user's name points at (``layers.-1`` -> ``layers.1``);
    ``valid`` are the names an unknown one's error suggests."""
    target = find_module(module, name, valid)
    for candidate, sub in module.named_modules():
        if sub is target:
            return candidate
    return name


def to_spatial(activation: torch.Tensor, layer: str, scan: LayerScan | None = None,
               input_size: tuple | None = None, key: str | None = None) -> torch.Tensor:
    """A target layer's output (or its gradient, same layout) as a (B, C, h, w) map.

    The layout comes from the dry run (``scan``, looked up under ``key``, the layer's canonical
    name, default ``layer``); a token sequence is laid on the grid that fits ``input_size`` (the
    batch's (H, W)). A layer that cannot be mapped is a one-line MethodError naming the layer, its
    shape and valid choices.
    """
    scan = scan or LayerScan()
    valid = scan.names
    shape = tuple(activation.shape)
    key = key or layer
    entry = scan.layouts.get(key)
    if entry is None:
        raise unmappable(layer, shape, scan.problems.get(key), valid)
    wanted = 4 if entry.layout in (NCHW, NHWC) else 3
    if activation.dim() != wanted:
        raise MethodError(f"target layer '{layer}' gives shape {shape}, not {_SHAPES[entry.layout]} as in the dry run: "
                          f"choose one of {suggest(valid)}")
    if entry.layout == NCHW:
        return activation
    if entry.layout == NHWC:
        return activation.permute(0, 3, 1, 2)
    count = shape[1]
    size = tuple(input_size or scan.input_size)
    grids = [entry.grid] if size == tuple(scan.input_size) and count == entry.grid[0] * entry.grid[1] \
        else token_grids(count, size)
    if len(grids) != 1:
        raise MethodError(f"target layer '{layer}' gives {count} tokens, which fit no single grid of a "
                          f"{size[0]}x{size[1]} input: choose one of {suggest(valid)}")
    h, w = grids[0]
    # tokens are the grid's cells in row-major order (Swin's norm2, Hugging Face Swin stages)
    return activation.reshape(shape[0], h, w, shape[2]).permute(0, 3, 1, 2)
