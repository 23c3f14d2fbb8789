"""How many images one pass may hold: a memory budget, an estimate of the peak per image, and sizes.

Unless every method reads the attention only through its head mean (see ``engine.keeps_head_means_only``), the
engine keeps every layer's attention (B, heads, N, N), and for some gradient methods its gradient, besides the
model's own activations: for ViT-L/16 at 384 px that is about 2 GB per image, so a batch that fits a ViT-B does not
fit a ViT-L. :func:`vitlens.explain`
splits a batch into chunks whose estimated peak stays within a budget (``memory_budget``), and on
CUDA halves a chunk and tries again when the device runs out of memory anyway.

The estimate (:func:`bytes_per_image`) comes from one dry forward of a single image (cached per model
and input size): the attention tensors' size ``S_A`` (sum over layers of heads x N x N x 4 bytes) and
the residual stream's size ``S_X`` (sum over layers of N x D x 4 bytes), combined as

    peak per image ~ (2 + g) S_A + 17 S_X      g = 1 when the pass keeps every layer's attention gradient
    peak per image ~ (6 / H + 3 / L) S_A + 17 S_X      when it keeps head means only (H heads, L layers)

(kept attention + the transient products of the explicit attention and of the backward; the gradients,
where a method reads them otherwise than through a layer term, see ``engine._reducing``; with head means only,
(B, 1, N, N) per layer for the means, the terms and LeGrad's gradients, and the transients of the one layer the
backward is at; 17 x the stream for the activations autograd keeps). Measured with ``benchmarks/memory.py`` on
CPU, six rollout-family methods (head means only): ViT-B/16 at 224 px 0.13 GiB estimated, 0.16 measured;
ViT-L/16 at 384 px 1.14 estimated, 1.25 measured (within 20 %). The estimate decides a split, it is not a
guarantee.
"""

from __future__ import annotations

import os
import re
import weakref
from typing import NamedTuple

import torch

from vitlens.errors import MethodError, UsageError

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}

#: the share of the free memory the default budget uses (the rest: the caller's own tensors, fragmentation)
DEFAULT_SHARE = 0.8
ACTIVATION_FACTOR = 17
#: with head means only: (B, 1, N, N) per layer for the means, each method's term and LeGrad's gradient (at most
#: six), and a few (B, heads, N, N) transients of the one layer the backward is at
HEAD_MEAN_COPIES = 6
LAYER_TRANSIENTS = 3

_SIZES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def parse_size(value, option: str = "memory_budget") -> int | None:
    """``'8GB'``, ``'512MiB'``, ``'1.5g'``, a number of bytes, or None -> bytes (None: no budget given)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise UsageError(f"{option} must be a size such as 8GB or 512MiB, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not found or found.group(2).lower() not in _UNITS:
            raise UsageError(f"{option} must be a size such as 8GB or 512MiB, got {value!r}")
        number, unit = float(found.group(1)), found.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"{option} must be a size such as 8GB or 512MiB, got {value!r}")
    return size


def free_memory(device) -> int | None:
    """Bytes free for this process on ``device`` now: CUDA's free memory, or the machine's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def default_budget(device) -> int | None:
    """:data:`DEFAULT_SHARE` of the memory free on ``device`` (None where it cannot be told)."""
    free = free_memory(device)
    return int(free * DEFAULT_SHARE) if free is not None else None


class Sizes(NamedTuple):
    """What one image at one input size occupies, from one dry forward."""

    attention: int  #: bytes of every layer's (heads, N, N) attention, float32
    stream: int     #: bytes of every layer's (N, D) residual stream, float32
    heads: int
    layers: int


def model_sizes(model, input_size) -> Sizes:
    """The :class:`Sizes` of one image at ``input_size``, from one dry forward (cached)."""
    key = tuple(int(v) for v in input_size)
    cached = _SIZES.setdefault(model, {})
    if key not in cached:
        x = torch.zeros(1, 3, *key, device=model.device, dtype=model.dtype)
        model.check_input(x)  # a size the model cannot take: its one-line error, not the model's assertion
        try:
            recorder = _dry_forward(model, x, keep_block_outputs=True)
        except MethodError:  # an adapter that cannot hand out its blocks (a head it cannot trace): no stream size
            recorder = _dry_forward(model, x, keep_block_outputs=False)
        attention = sum(a[0].numel() for a in recorder.attentions) * 4
        stream = sum(h[0].numel() for h in recorder.block_outputs) * 4
        heads = max((a.shape[1] for a in recorder.attentions if a.dim() == 4), default=1)
        cached[key] = Sizes(attention, stream, int(heads), len(recorder.attentions))
    return cached[key]


def _dry_forward(model, x: torch.Tensor, keep_block_outputs: bool):
    from vitlens.models.capture import AttentionRecorder

    recorder = AttentionRecorder(keep_block_outputs=keep_block_outputs)
    with torch.no_grad(), model.eval_mode(), model.capture(recorder):
        model.logits(x)
    return recorder


def bytes_per_image(model, kept_gradients: bool, input_size, head_means: bool = False) -> int:
    """The estimated peak of one image in one pass (see the module docstring); ``kept_gradients``: the pass holds
    every layer's attention gradient at once (:func:`vitlens.engine.keeps_attention_gradients`); ``head_means``:
    it keeps each layer's attention as its head mean only (:func:`vitlens.engine.keeps_head_means_only`)."""
    if not getattr(model, "has_attention", False):
        return 0  # CNNs: activations of an ordinary backward, which the caller's batch size already sizes
    sizes = model_sizes(model, input_size)
    if head_means:
        copies = HEAD_MEAN_COPIES / sizes.heads + LAYER_TRANSIENTS / max(1, sizes.layers)
    else:
        copies = 2 + int(kept_gradients)
    return int(copies * sizes.attention) + ACTIVATION_FACTOR * sizes.stream


def images_per_pass(batch_size: int, per_image: int, budget: int | None) -> int:
    """The largest chunk of at most ``batch_size`` images whose estimate fits ``budget`` (at least 1)."""
    if budget is None or per_image <= 0:
        return batch_size
    return max(1, min(batch_size, budget // per_image))


__all__ = ["DEFAULT_SHARE", "Sizes", "bytes_per_image", "default_budget", "free_memory", "images_per_pass",
           "model_sizes", "parse_size"]
