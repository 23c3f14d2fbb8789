"""Perturbation (faithfulness) metrics, with every perturbed copy pushed through the model in large batches.

All metrics here perturb the *preprocessed* input ``x`` (B, 3, H, W): a perturbed copy is
``keep * x + (1 - keep) * baseline``. ``keep`` is either a set of units (pixels, or patches for
``granularity='patch'``) chosen by the rank of the explanation map, or the map itself (Grad-CAM++'s
"explanation map" ``map * image``).

* **deletion / insertion** (Petsiuk et al., RISE 2018): ``steps`` + 1 points at fractions
  ``i / steps``; at step i the ``floor(i * U / steps)`` most relevant of the U units are removed
  (deletion: replaced by the baseline) or revealed (insertion: copied from ``x`` onto the baseline).
  Score = softmax probability (default) or logit of the explained class. ``auc`` is the trapezoid
  area of the raw curve over the fraction axis [0, 1]; ``auc_norm`` of the curve normalised as in
  the GMAR++ code, ``clamp((y - y_base) / max(1e-8, y_orig - y_base), 0, 1)``, with ``y_base`` the
  score of the fully perturbed image. Deletion: lower is better; insertion: higher is better.
* **positive / negative perturbation** (Chefer et al., CVPR 2021): remove (set to black pixels,
  ``baseline='zero'``) the ``floor(q * U)`` most relevant units (positive), or keep the
  ``floor((1 - q) * U)`` most relevant ones (negative: the ``ceil(q * U)`` least relevant are removed,
  at most one unit more than Chefer's ``floor``) for q = 0.1 ... 0.9 and record top-1 correctness
  against the label (against the original top-1 prediction where an image has no label). ``auc`` is
  the trapezoid area of accuracy in percent over q in [0, 0.9] including q = 0 (the unperturbed
  accuracy), as in the paper's tables (max 90).
  Positive: lower is better; negative: higher is better.
* **average drop / increase in confidence / average gain** (Chattopadhay et al., Grad-CAM++ 2018;
  gain: Zhang et al. 2023): with Y the score of ``x`` and O of the explanation map
  ``map * x + (1 - map) * baseline`` (black baseline by default, i.e. ``map * image``):
  AD = 100 max(0, Y - O) / Y, IC = 100 [O > Y], AG = 100 max(0, O - Y) / (1 - Y) (probabilities).
  ``score='logit'`` is the GMAR++ variant: AD = 100 max(0, Y - O) / (|Y| + 1e-8) on logits (AG stays
  probability based); ``mode='top'`` keeps the top ``keep`` share of pixels (map >= its
  (1 - keep)-quantile) instead of the soft product (GMAR++: keep 0.25 on a blurred baseline).

Sharing: the same perturbed image is built and run once whatever asks for it. With the zero
baseline, deletion at 10 or 20 steps contains every positive-perturbation image and insertion every
negative-perturbation image, so those come for free.

Units are ranked by the map's values, largest first. A signed map (LRP relevance) is ranked by its
signed values, so the most negative unit is the least relevant; Average Drop, which multiplies the
image by the map, uses a signed map's positive part over its maximum. Ties in a map are broken by a
fixed permutation seeded with ``seed`` (never by raster order, which would favour the top-left corner
for flat maps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

BASELINES = ("zero", "mean", "blur", "noise")
SCORES = ("prob", "logit")
GRANULARITIES = ("pixel", "patch")
CHEFER_FRACTIONS = tuple(Fraction(i, 10) for i in range(1, 10))
BLUR_KERNEL, BLUR_SIGMA = 21, 7.0


# ------------------------------------------------------------------------------------------ helpers
def pixel_stats(model, mean=None, std=None) -> tuple[tuple, tuple]:
    pre = getattr(model, "preprocess", None)
    mean = mean if mean is not None else (getattr(pre, "mean", None) or (0.0, 0.0, 0.0))
    std = std if std is not None else (getattr(pre, "std", None) or (1.0, 1.0, 1.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def fingerprint(image: torch.Tensor) -> int:
    return int(torch.round(image.double().abs().sum() * 1000).item()) % (2 ** 31)


def baseline_inputs(x: torch.Tensor, kind: str, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                    seed: int = 0) -> torch.Tensor:
    """The fully perturbed version of a preprocessed batch ``x`` (B, 3, H, W).

    ``zero``: black pixels (0 in [0, 1] pixel space, i.e. ``-mean/std`` after normalisation);
    ``mean``: each image's per-channel mean colour; ``blur``: Gaussian blur, kernel 21, sigma 7
    (the GMAR++ baseline; blurring commutes with the per-channel normalisation); ``noise``: uniform
    [0, 1] pixel noise, seeded per image from ``seed`` and the image content (so an image gets the
    same noise in any batch).
    """
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if kind == "zero":
        return ((0 - m) / s).expand_as(x).clone()
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        from torchvision.transforms.functional import gaussian_blur

        return gaussian_blur(x, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])
    if kind == "noise":
        out = []
        for image in x:
            g = torch.Generator().manual_seed((seed * 1_000_003 + fingerprint(image)) % (2 ** 63))
            out.append(torch.rand(image.shape, generator=g, dtype=torch.float64))
        return ((torch.stack(out).to(device=x.device, dtype=x.dtype)) - m) / s
    raise ValueError(f"unknown baseline {kind!r}: choose from {', '.join(BASELINES)}")


def unit_ranks(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Rank of every unit in descending order of relevance (0 = most relevant), ties broken by a
    permutation seeded with ``seed``.

    Parameters
    ----------
    maps : Tensor (N, h, w)

    Returns
    -------
    LongTensor (N, h * w)
    """
    flat = maps.reshape(maps.shape[0], -1).double()
    units = flat.shape[1]
    perm = torch.randperm(units, generator=torch.Generator().manual_seed(seed)).to(flat.device)
    order = torch.argsort(flat[:, perm], dim=1, descending=True, stable=True)
    order = perm[order]  # unit indices, most relevant first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(units, device=flat.device).expand_as(order).contiguous())
    return ranks


def patch_size_of(model) -> tuple | None:
    """The model's patch size, or None for a model without patches (a CNN) or a plain callable."""
    try:
        return getattr(model, "patch_size", None)
    except NotImplementedError:  # ImageModel's default: the CNN adapter has no patch grid
        return None


def unit_maps(maps: torch.Tensor, input_size: tuple, granularity: str, patch: tuple | None) -> torch.Tensor:
    """Maps (N, h, w) at the resolution perturbation units are ranked at.

    ``pixel``: the maps must be at input resolution. ``patch``: maps already on a coarser grid are
    kept; input-resolution maps are average-pooled by ``patch``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}: choose pixel or patch")
    H, W = input_size
    if granularity == "pixel":
        if tuple(maps.shape[-2:]) != (H, W):
            raise ValueError(f"pixel granularity needs maps at the input size {H}x{W}, got {tuple(maps.shape[-2:])}")
        return maps
    if tuple(maps.shape[-2:]) == (H, W):
        if patch is None:
            raise ValueError("patch granularity on input-size maps needs a patch size")
        return F.avg_pool2d(maps.unsqueeze(1).double(), patch).squeeze(1)
    h, w = maps.shape[-2:]
    if H % h or W % w:
        raise ValueError(f"a {h}x{w} map does not tile a {H}x{W} input")
    return maps


def trapezoid(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of ``y`` (..., S) over the points ``x`` (S,)."""
    dx = (x[1:] - x[:-1]).to(y.dtype)
    return ((y[..., 1:] + y[..., :-1]) / 2 * dx).sum(dim=-1)


# ------------------------------------------------------------------------------ the batched engine
@dataclass
class _Outputs:
    logit: torch.Tensor
    prob: torch.Tensor
    top1: torch.Tensor


class PerturbationBatch:
    """Perturbed copies of one batch of images: requested, deduplicated, then run in big chunks.

    Parameters
    ----------
    model : ExplainableModel or callable
        Anything with ``.logits(x)``, or a callable returning logits.
    inputs : Tensor (B, 3, H, W)
        Preprocessed images.
    mean, std : pixel normalisation (default: the model's preprocessing).
    seed : int
        Seeds the noise baseline.
    batch_size : int
        Perturbed images per forward pass (bounds memory).
    """

    def __init__(self, model, inputs: torch.Tensor, mean=None, std=None, seed: int = 0, batch_size: int = 128):
        self.model = model
        self.x = inputs.detach()
        self.mean, self.std = pixel_stats(model, mean, std)
        self.seed = seed
        self.batch_size = max(1, int(batch_size))
        self._baselines: dict = {}
        self._ranks: dict = {}  # key -> (LongTensor (B, U), unit grid (h, w))
        self._keys: dict = {}
        self._requests: list = []
        self._outputs: _Outputs | None = None
        self.forwards = 0

    # --- building requests ----------------------------------------------------------------------
    def baseline(self, kind: str) -> torch.Tensor:
        if kind not in self._baselines:
            self._baselines[kind] = baseline_inputs(self.x, kind, self.mean, self.std, self.seed)
        return self._baselines[kind]

    def add_ranking(self, key, maps: torch.Tensor, seed: int = 0) -> tuple:
        """Register unit maps (B, h, w) under ``key``; returns their grid."""
        if key not in self._ranks:
            self._ranks[key] = (unit_ranks(maps, seed).cpu(), tuple(maps.shape[-2:]))
        return self._ranks[key][1]

    def units(self, key) -> int:
        h, w = self._ranks[key][1]
        return h * w

    def _request(self, dedup, spec) -> int:
        if dedup in self._keys:
            return self._keys[dedup]
        if self._outputs is not None:
            raise RuntimeError("requests must be made before run()")
        self._keys[dedup] = len(self._requests)
        self._requests.append(spec)
        return self._keys[dedup]

    def keep_range(self, image: int, target: int, key, lo: int, hi: int, baseline: str) -> int:
        """Units ranked in [lo, hi) keep the image, the rest become ``baseline``."""
        units = self.units(key)
        lo, hi = max(0, lo), min(units, hi)
        if lo == 0 and hi == units:
            return self._request(("orig", image, target), ("orig", image, target))
        if hi <= lo:
            self.baseline(baseline)
            return self._request(("empty", image, target, baseline), ("empty", image, target, baseline))
        self.baseline(baseline)
        request = ("range", image, target, key, lo, hi, baseline)
        return self._request(request, request)

    def original(self, image: int, target: int) -> int:
        return self._request(("orig", image, target), ("orig", image, target))

    def blend(self, image: int, target: int, key, weights: torch.Tensor, baseline: str) -> int:
        """``weights * x + (1 - weights) * baseline`` with weights (H, W) in [0, 1]."""
        self.baseline(baseline)
        return self._request(("blend", image, target, key, baseline),
                             ("blend", image, target, weights.detach().cpu().float(), baseline))

    # --- running ------------------------------------------------------------------------------
    def _build(self, spec) -> torch.Tensor:
        kind, image, _target = spec[0], spec[1], spec[2]
        x = self.x[image]
        if kind == "orig":
            return x
        if kind == "empty":
            return self.baseline(spec[3])[image]
        if kind == "blend":
            weights = spec[3].to(device=x.device, dtype=x.dtype)
            base = self.baseline(spec[4])[image]
            return weights * x + (1 - weights) * base
        _, _, _, key, lo, hi, baseline = spec
        ranks, (h, w) = self._ranks[key]
        r = ranks[image]
        keep = ((r >= lo) & (r < hi)).view(1, 1, h, w).to(device=x.device, dtype=x.dtype)
        H, W = x.shape[-2:]
        if (h, w) != (H, W):
            keep = F.interpolate(keep, size=(H, W), mode="nearest")
        return torch.where(keep[0] > 0.5, x, self.baseline(baseline)[image])

    def _build_chunk(self, chunk: list) -> torch.Tensor:
        """All perturbed images of a chunk with a handful of large tensor operations.

        Same values as :meth:`_build` one by one (``torch.where`` for kept units, ``w x + (1 - w) b``
        for blends), but without hundreds of small operations, which are slow on a busy CPU.
        """
        n = len(chunk)
        images = torch.tensor([spec[1] for spec in chunk], dtype=torch.long, device=self.x.device)
        x = self.x.index_select(0, images)
        H, W = x.shape[-2:]
        base = x.clone()  # 'orig' rows keep x
        keep = torch.ones(n, 1, H, W, dtype=torch.bool, device=x.device)
        kinds: dict = {}
        for row, spec in enumerate(chunk):
            if spec[0] == "empty":
                kinds.setdefault(spec[3], []).append(row)
            elif spec[0] in ("range", "blend"):
                kinds.setdefault(spec[-1], []).append(row)
        for kind, rows in kinds.items():
            idx = torch.tensor(rows, dtype=torch.long, device=x.device)
            base[idx] = self.baseline(kind).index_select(0, images[idx])
        empty = [row for row, spec in enumerate(chunk) if spec[0] == "empty"]
        if empty:
            keep[empty] = False
        groups: dict = {}
        for row, spec in enumerate(chunk):
            if spec[0] == "range":
                groups.setdefault(self._ranks[spec[3]][1], []).append(row)
        for (h, w), rows in groups.items():
            ranks = torch.stack([self._ranks[chunk[row][3]][0][chunk[row][1]] for row in rows])
            lo = torch.tensor([chunk[row][4] for row in rows])[:, None]
            hi = torch.tensor([chunk[row][5] for row in rows])[:, None]
            mask = ((ranks >= lo) & (ranks < hi)).view(len(rows), 1, h, w)
            if (h, w) != (H, W):
                mask = F.interpolate(mask.to(x.dtype), size=(H, W), mode="nearest") > 0.5
            keep[rows] = mask.to(x.device)
        out = torch.where(keep, x, base)
        blends = [row for row, spec in enumerate(chunk) if spec[0] == "blend"]
        if blends:
            weights = torch.stack([chunk[row][3] for row in blends]).to(device=x.device, dtype=x.dtype)[:, None]
            out[blends] = weights * x[blends] + (1 - weights) * base[blends]
        return out

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        model = self.model
        if hasattr(model, "logits") and hasattr(model, "module"):
            batch = batch.to(device=model.device, dtype=model.dtype)
            with model.eval_mode():
                return model.logits(batch)
        if hasattr(model, "logits"):
            return model.logits(batch)
        return model(batch)

    def run(self) -> None:
        """Push every requested copy through the model, ``batch_size`` at a time (no gradients)."""
        if self._outputs is not None:
            return
        logits, probs, top1 = [], [], []
        with torch.no_grad():
            for start in range(0, len(self._requests), self.batch_size):
                chunk = self._requests[start:start + self.batch_size]
                batch = self._build_chunk(chunk)
                out = self._forward(batch).detach().double().cpu()
                self.forwards += len(chunk)
                targets = torch.tensor([spec[2] for spec in chunk], dtype=torch.long)
                logits.append(out.gather(1, targets[:, None])[:, 0])
                probs.append(out.softmax(dim=-1).gather(1, targets[:, None])[:, 0])
                top1.append(out.argmax(dim=-1))
        empty = torch.zeros(0)
        self._outputs = _Outputs(torch.cat(logits) if logits else empty, torch.cat(probs) if probs else empty,
                                 torch.cat(top1) if top1 else empty.long())

    def score(self, ids, kind: str = "prob") -> torch.Tensor:
        """Scores of requests ``ids`` (any shape of ints): ``prob`` or ``logit`` of their target."""
        self.run()
        index = torch.as_tensor(ids, dtype=torch.long)
        source = {"prob": self._outputs.prob, "logit": self._outputs.logit}.get(kind)
        if source is None:
            raise ValueError(f"unknown score {kind!r}: expected prob or logit")
        return source.double()[index]

    def top1(self, ids) -> torch.Tensor:
        self.run()
        return self._outputs.top1[torch.as_tensor(ids, dtype=torch.long)]


# ------------------------------------------------------------------------------------- the metrics
@dataclass
class MetricPlan:
    """A metric's requests on a :class:`PerturbationBatch` and how to turn outputs into values."""

    finish: Callable[[], dict]
    curves: dict = field(default_factory=dict)


def _counts(fractions, units: int) -> list[int]:
    return [int(Fraction(f).limit_denominator(10 ** 6) * units) for f in fractions]


def _step_fractions(steps: int) -> list[Fraction]:
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [Fraction(i, int(steps)) for i in range(int(steps) + 1)]


def plan_deletion_insertion(pb: PerturbationBatch, key, targets, mode: str, steps: int = 20, baseline: str = "zero",
                            score: str = "prob") -> MetricPlan:
    """Deletion (``mode='deletion'``) or insertion curves for the maps registered under ``key``."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(mode)
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}: expected prob or logit")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}: choose from {', '.join(BASELINES)}")
    fractions = _step_fractions(steps)
    units = pb.units(key)
    counts = _counts(fractions, units)
    ids = []
    for image, target in enumerate(targets.tolist()):
        row = []
        for k in counts:
            row.append(pb.keep_range(image, target, key, k, units, baseline) if mode == "deletion"
                       else pb.keep_range(image, target, key, 0, k, baseline))
        ids.append(row)
    originals = [pb.original(i, t) for i, t in enumerate(targets.tolist())]
    empties = [pb.keep_range(i, t, key, 0, 0, baseline) for i, t in enumerate(targets.tolist())]
    x = torch.tensor([float(f) for f in fractions], dtype=torch.float64)

    def finish() -> dict:
        curve = pb.score(ids, score)
        y_orig, y_base = pb.score(originals, score)[:, None], pb.score(empties, score)[:, None]
        norm = ((curve - y_base) / torch.clamp(y_orig - y_base, min=1e-8)).clamp(0, 1)
        return {"fractions": x, "curve": curve, "curve_norm": norm, "auc": trapezoid(curve, x),
                "auc_norm": trapezoid(norm, x)}

    return MetricPlan(finish)


def plan_perturbation(pb: PerturbationBatch, key, targets, labels, positive: bool = True,
                      fractions=CHEFER_FRACTIONS, baseline: str = "zero") -> MetricPlan:
    """Chefer's positive (most relevant removed first) or negative perturbation accuracy curve."""
    fr = [Fraction(0)] + [Fraction(f).limit_denominator(10 ** 6) for f in fractions]
    units = pb.units(key)
    counts = _counts(fr, units)
    target_list = targets.tolist()
    reference = [int(l) if l is not None and int(l) >= 0 else t for l, t in zip(labels.tolist(), target_list)]
    # negative: keep the floor((1 - q) U) most relevant units, i.e. remove ceil(q U) (Chefer: floor(q U), at
    # most one unit apart); this makes every negative-perturbation image an insertion image on the same canvas
    kept = _counts([1 - f for f in fr], units)
    ids = []
    for image, target in enumerate(target_list):
        ids.append([pb.keep_range(image, target, key, k, units, baseline) for k in counts] if positive
                   else [pb.keep_range(image, target, key, 0, k, baseline) for k in kept])
    x = torch.tensor([float(f) for f in fr], dtype=torch.float64)

    def finish() -> dict:
        hits = (pb.top1(ids) == torch.tensor(reference)[:, None]).double() * 100.0
        return {"fractions": x, "curve": hits, "auc": trapezoid(hits, x)}

    return MetricPlan(finish)


def plan_drop_increase(pb: PerturbationBatch, key, maps: torch.Tensor, targets, score: str = "prob",
                       mode: str = "multiply", baseline: str = "zero", keep: float = 0.25) -> MetricPlan:
    """Average Drop, Increase in Confidence and Average Gain per image.

    ``maps`` (B, H, W) in [0, 1] at input resolution.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}: expected prob or logit")
    ids, originals = [], []
    for image, target in enumerate(targets.tolist()):
        m = maps[image].double().clamp(0, 1)
        if mode == "multiply":
            weights = m
        elif mode == "top":
            threshold = torch.quantile(m.flatten(), 1.0 - keep)
            weights = (m >= threshold).double()
        else:
            raise ValueError(f"unknown mode {mode!r}: expected multiply or top")
        ids.append(pb.blend(image, target, (key, mode, keep), weights, baseline))
        originals.append(pb.original(image, target))

    def finish() -> dict:
        y, o = pb.score(originals, score), pb.score(ids, score)
        py, po = pb.score(originals, "prob"), pb.score(ids, "prob")
        denominator = y.clamp(min=1e-12) if score == "prob" else y.abs() + 1e-8
        drop = 100.0 * (y - o).clamp(min=0) / denominator
        increase = 100.0 * (o > y).double()
        gain = 100.0 * (po - py).clamp(min=0) / (1 - py).clamp(min=1e-8)
        return {"average_drop": drop, "increase_confidence": increase, "average_gain": gain}

    return MetricPlan(finish)


#: metric name -> (planner, what its values are called)
PERTURBATION_METRICS = ("deletion", "insertion", "pos_perturbation", "neg_perturbation", "drop_increase")


def perturbation_metrics(model, inputs: torch.Tensor, maps: dict, targets: torch.Tensor, labels=None,
                         metrics: dict | None = None, granularity: str = "pixel", patch=None, seed: int = 0,
                         batch_size: int = 128, mean=None, std=None, stats: dict | None = None) -> dict:
    """Every requested perturbation metric for every method's maps, sharing one batched session.

    Parameters
    ----------
    model : ExplainableModel or callable returning logits
    inputs : Tensor (B, 3, H, W)
        Preprocessed images.
    maps : dict
        method -> (B, H, W) maps at input resolution, larger = more relevant: maps in [0, 1]
        (``ExplainResult.maps[m][:, 0]``) or signed relevance (``ExplainResult.patch_maps[m][:, 0]`` of
        AttnLRP / CP-LRP), ranked by its signed values; or (B, h, w) patch maps with
        ``granularity='patch'``. ``drop_increase`` multiplies the image by a map with negative values
        through its positive part over its maximum.
    targets : LongTensor (B,)
        The explained classes.
    labels : LongTensor (B,), optional
        Ground truth for the positive/negative perturbation accuracy (-1 = unknown: the original
        prediction is used).
    metrics : dict
        metric name (see :data:`PERTURBATION_METRICS`) -> parameter dict; default: deletion and
        insertion with their defaults.
    granularity : 'pixel' or 'patch'
    patch : (int, int), optional
        Patch size for ``granularity='patch'`` on input-size maps (default: the model's).
    seed : int
        Tie-breaking permutation and noise baseline.
    batch_size : int
        Perturbed images per forward pass.
    stats : dict, optional
        Receives ``forwards``: the number of perturbed images that went through the model.

    Returns
    -------
    dict
        method -> metric -> dict of per-image tensors (and the fraction axis for curves).
    """
    metrics = {"deletion": {}, "insertion": {}} if metrics is None else metrics
    targets = torch.as_tensor(targets, dtype=torch.long).view(-1)
    B = inputs.shape[0]
    if labels is None:
        labels = torch.full((B,), -1, dtype=torch.long)
    labels = torch.as_tensor([(-1 if l is None else int(l)) for l in list(labels)], dtype=torch.long)
    if patch is None and granularity == "patch":
        patch = patch_size_of(model)
    pb = PerturbationBatch(model, inputs, mean=mean, std=std, seed=seed, batch_size=batch_size)
    input_size = tuple(inputs.shape[-2:])
    plans: dict = {}
    for method, method_maps in maps.items():
        method_maps = method_maps.detach().cpu()
        if method_maps.dim() == 4:
            method_maps = method_maps[:, 0]
        key = (method, granularity)
        pb.add_ranking(key, unit_maps(method_maps, input_size, granularity, patch), seed)
        for name, options in metrics.items():
            options = dict(options or {})
            if name in ("deletion", "insertion"):
                plan = plan_deletion_insertion(pb, key, targets, name, **options)
            elif name in ("pos_perturbation", "neg_perturbation"):
                plan = plan_perturbation(pb, key, targets, labels, positive=name == "pos_perturbation", **options)
            elif name == "drop_increase":
                if tuple(method_maps.shape[-2:]) != input_size:
                    pixel = F.interpolate(method_maps[:, None].double(), size=input_size, mode="bilinear",
                                          align_corners=False)[:, 0]
                else:
                    pixel = method_maps
                if (pixel < 0).any():  # signed relevance: the image times its positive part over its maximum
                    positive = pixel.double().clamp_min(0)
                    pixel = positive / positive.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
                plan = plan_drop_increase(pb, method, pixel, targets, **options)
            else:
                raise ValueError(f"unknown perturbation metric {name!r}: choose from {', '.join(PERTURBATION_METRICS)}")
            plans[(method, name)] = plan
    pb.run()
    results: dict = {m: {} for m in maps}
    for (method, name), plan in plans.items():
        results[method][name] = plan.finish()
    if stats is not None:
        stats["forwards"] = stats.get("forwards", 0) + pb.forwards
    return results


def _single(model, inputs, maps, targets, name, options, labels=None, granularity="pixel", seed=0, batch_size=128):
    out = perturbation_metrics(model, inputs, {"map": maps}, targets, labels=labels, metrics={name: options},
                               granularity=granularity, seed=seed, batch_size=batch_size)
    return out["map"][name]


def deletion(model, inputs, maps, targets, steps: int = 20, baseline: str = "zero", score: str = "prob",
             granularity: str = "pixel", seed: int = 0, batch_size: int = 128) -> dict:
    """Deletion curves and AUCs (see the module docstring); maps (B, H, W) or patch maps (B, h, w)."""
    return _single(model, inputs, maps, targets, "deletion", {"steps": steps, "baseline": baseline, "score": score},
                   granularity=granularity, seed=seed, batch_size=batch_size)


def insertion(model, inputs, maps, targets, steps: int = 20, baseline: str = "blur", score: str = "prob",
              granularity: str = "pixel", seed: int = 0, batch_size: int = 128) -> dict:
    """Insertion curves and AUCs (see the module docstring)."""
    return _single(model, inputs, maps, targets, "insertion", {"steps": steps, "baseline": baseline, "score": score},
                   granularity=granularity, seed=seed, batch_size=batch_size)


def positive_perturbation(model, inputs, maps, targets, labels=None, baseline: str = "zero",
                          granularity: str = "pixel", seed: int = 0, batch_size: int = 128) -> dict:
    """Chefer's positive perturbation: accuracy (%) after removing the most relevant 0 ... 90 %."""
    return _single(model, inputs, maps, targets, "pos_perturbation", {"baseline": baseline}, labels=labels,
                   granularity=granularity, seed=seed, batch_size=batch_size)


def negative_perturbation(model, inputs, maps, targets, labels=None, baseline: str = "zero",
                          granularity: str = "pixel", seed: int = 0, batch_size: int = 128) -> dict:
    """Chefer's negative perturbation: accuracy (%) after removing the least relevant 0 ... 90 %."""
    return _single(model, inputs, maps, targets, "neg_perturbation", {"baseline": baseline}, labels=labels,
                   granularity=granularity, seed=seed, batch_size=batch_size)


def drop_increase(model, inputs, maps, targets, score: str = "prob", mode: str = "multiply", baseline: str = "zero",
                  keep: float = 0.25, seed: int = 0, batch_size: int = 128) -> dict:
    """Average Drop, Increase in Confidence, Average Gain per image (see the module docstring)."""
    return _single(model, inputs, maps, targets, "drop_increase",
                   {"score": score, "mode": mode, "baseline": baseline, "keep": keep}, seed=seed,
                   batch_size=batch_size)


def per_image_reference(model, x: torch.Tensor, pixel_map: torch.Tensor, target: int, steps: int,
                        baseline: torch.Tensor, mode: str = "deletion") -> np.ndarray:
    """A straightforward per-image, per-step loop (the benchmark and test reference): one forward per step.

    ``pixel_map`` (H, W); ``baseline`` (3, H, W). Returns the probability curve (steps + 1,).
    """
    H, W = pixel_map.shape
    units = H * W
    order = torch.argsort(pixel_map.flatten(), descending=True, stable=True)
    curve = []
    for i in range(steps + 1):
        k = i * units // steps
        mask = torch.zeros(units, dtype=torch.bool)
        mask[order[:k]] = True
        mask = mask.view(1, H, W)
        image = torch.where(mask, baseline, x) if mode == "deletion" else torch.where(mask, x, baseline)
        with torch.no_grad():
            logits = model(image[None])
        curve.append(float(logits.softmax(-1)[0, target]))
    return np.array(curve)


__all__ = [
    "BASELINES",
    "PERTURBATION_METRICS",
    "PerturbationBatch",
    "baseline_inputs",
    "deletion",
    "drop_increase",
    "insertion",
    "negative_perturbation",
    "patch_size_of",
    "perturbation_metrics",
    "positive_perturbation",
    "trapezoid",
    "unit_ranks",
]
