"""Sanity check: cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018).

A copy of the model is re-initialised stage by stage from the top down — first everything after the
last block (final norm and classifier head: stage ``head``), then ``block{L-1}``, ..., ``block0``,
then the patch embedding, position embedding and prefix tokens (``embedding``); for a CNN the
top-level child modules in reverse execution order. After each stage (cumulatively) the same images
are explained again for the same target classes, and each method's new map is compared with its
original map by Spearman rank correlation and SSIM. A method whose maps stay the same while the
model it explains is destroyed is not explaining the model (the ``random`` and ``center``
baselines, which ignore the model, score 1.0 at every stage by construction).

Re-initialisation: every module of a stage that owns parameters calls its own
``reset_parameters()`` (PyTorch's default initialisation of Linear, Conv, LayerNorm...); parameters
of modules without one (class token, position embedding, layer scales) are drawn from
N(0, 0.02^2). Each stage is seeded (``seed``, stage index); the user's model is never touched.

Similarities (per image, on the [0, 1] maps at input resolution):
* Spearman: Pearson correlation of the average ranks (ties share their mean rank); NaN when a map
  is constant (the correlation is undefined).
* SSIM (Wang et al. 2004): Gaussian window 11 (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1,
  zero padding excluded (only "valid" windows), mean over the map.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------ similarities
def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based, ties share their mean rank) along the last dimension of (B, N)."""
    v = values.double()
    sorted_v, _ = torch.sort(v, dim=-1)
    left = torch.searchsorted(sorted_v.contiguous(), v.contiguous(), right=False).double()
    right = torch.searchsorted(sorted_v.contiguous(), v.contiguous(), right=True).double()
    return (left + right + 1) / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per image of two (B, ...) batches of maps; NaN for a constant map."""
    ra = average_ranks(a.reshape(a.shape[0], -1))
    rb = average_ranks(b.reshape(b.shape[0], -1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denominator = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    return torch.where(denominator > 0, (ra * rb).sum(dim=1) / denominator.clamp(min=1e-300),
                       torch.full_like(denominator, float("nan")))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per image of two (B, H, W) batches (Wang et al. 2004, Gaussian window, valid region)."""
    x = a.double()[:, None]
    y = b.double()[:, None]
    w = _gaussian_window(window, sigma).to(x.device)
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mu_x ** 2
    syy = F.conv2d(y * y, w) - mu_y ** 2
    sxy = F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------ randomisation
@dataclass
class Stage:
    """One step of the cascade: a name and the modules re-initialised in it."""

    name: str
    modules: list


def _param_modules(module: nn.Module) -> list:
    return [(name, m) for name, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]


def _execution_order(model) -> dict:
    """name -> position of the first call of every module during a dry forward."""
    order: dict = {}
    handles = []
    def note(name):
        def hook(module, inputs):
            order.setdefault(name, len(order))  # returns None: the inputs are left alone

        return hook

    for name, m in model.module.named_modules():
        handles.append(m.register_forward_pre_hook(note(name)))
    try:
        H, W = model.fixed_input_size() or model.preprocess.input_size
        x = torch.zeros(1, 3, H, W, device=model.device, dtype=model.dtype)
        with torch.no_grad(), model.eval_mode():
            model.logits(x)
    finally:
        for h in handles:
            h.remove()
    return order


def randomization_stages(model) -> list[Stage]:
    """The cascade, top stage first (see the module docstring)."""
    order = _execution_order(model)
    owners = _param_modules(model.module)
    late = max(order.values(), default=0) + 1
    stages: list[Stage] = []
    if getattr(model, "has_attention", False):
        blocks = [name.rsplit(".", 1)[0] for name in model.block_norm_names()]
        first_block = min(order.get(b, late) for b in blocks)
        assigned = {b: [] for b in blocks}
        head, embedding = [], []
        for name, m in owners:
            block = next((b for b in blocks if name == b or name.startswith(b + ".")), None)
            if block is not None:
                assigned[block].append(m)
            elif name == "" or order.get(name, late) < first_block:
                embedding.append(m)
            else:
                head.append(m)
        stages.append(Stage("head", head))
        for i in reversed(range(len(blocks))):
            stages.append(Stage(f"block{i}", assigned[blocks[i]]))
        stages.append(Stage("embedding", embedding))
    else:
        groups: dict = {}
        for name, m in owners:
            top = name.split(".", 1)[0] if name else ""
            groups.setdefault(top, []).append(m)
        first = {top: min((order.get(n, late) for n, _ in owners if (n.split(".", 1)[0] if n else "") == top),
                          default=late) for top in groups}
        for top in sorted(groups, key=lambda t: first[t], reverse=True):
            stages.append(Stage(top or "root", groups[top]))
    return [s for s in stages if s.modules]


def reinitialize(modules: list, seed: int) -> None:
    """Re-initialise the parameters of ``modules`` in place, reproducibly."""
    devices = sorted({p.device.index or 0 for m in modules for p in m.parameters(recurse=False) if p.is_cuda})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for m in modules:
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
            else:
                for p in m.parameters(recurse=False):
                    p.normal_(0.0, 0.02)


def randomized_copies(model, stages: list[Stage] | None = None, seed: int = 0):
    """Yield (stage name, model copy) with the stages re-initialised cumulatively, top first.

    One deep copy is made and modified stage after stage; the caller must use each copy before
    asking for the next.
    """
    stages = randomization_stages(model) if stages is None else stages
    clone = copy.deepcopy(model)
    # map the stage modules of the original onto the copy
    names = {id(m): n for n, m in model.module.named_modules()}
    clone_modules = dict(clone.module.named_modules())
    for index, stage in enumerate(stages):
        reinitialize([clone_modules[names[id(m)]] for m in stage.modules], seed * 1009 + index)
        yield stage.name, clone


@dataclass
class SanityResult:
    """Per method: similarity of the maps after each cumulative stage to the original maps."""

    stages: list
    spearman: dict  # method -> (S, B)
    ssim: dict  # method -> (S, B)


def cascading_randomization(model, inputs: torch.Tensor, methods, targets=None, params: dict | None = None,
                            original_maps: dict | None = None, stages: list | None = None, seed: int = 0,
                            batch_size: int = 16, max_stages: int | None = None, precision="fp32") -> SanityResult:
    """Adebayo et al.'s cascading randomisation for a batch of preprocessed images.

    Parameters
    ----------
    model : ExplainableModel
    inputs : Tensor (B, 3, H, W)
    methods : list of method names
    targets : LongTensor (B,), optional
        Classes explained (default: the original model's predictions). They stay fixed while the
        model is randomised.
    params : dict, optional
        Per-method parameters, as for :func:`vitlens.explain`.
    original_maps : dict, optional
        method -> (B, H, W) maps of the intact model, when already computed.
    stages : list of Stage, optional
        Default: :func:`randomization_stages`.
    max_stages : int, optional
        Stop after this many stages.
    precision : str
        Of every explanation, as for :func:`vitlens.explain`.
    """
    from vitlens.api import explain

    methods = list(methods)
    if targets is None or original_maps is None:
        result = explain(model, inputs, methods=methods, target=targets, batch_size=batch_size, params=params,
                         precision=precision, warn=False)
        targets = result.targets[:, 0] if targets is None else targets
        original_maps = {m: result.maps[m][:, 0] for m in methods} if original_maps is None else original_maps
    targets = torch.as_tensor(targets, dtype=torch.long).view(-1)
    names, rho, sim = [], {m: [] for m in methods}, {m: [] for m in methods}
    for count, (name, clone) in enumerate(randomized_copies(model, stages, seed)):
        if max_stages is not None and count >= max_stages:
            break
        # a randomised model may well give maps that show nothing: that is what the check measures
        result = explain(clone, inputs, methods=methods, target=targets, batch_size=batch_size, params=params,
                         precision=precision, warn=False)
        names.append(name)
        for m in methods:
            new = result.maps[m][:, 0].double()
            old = original_maps[m].double()
            if old.dim() == 4:
                old = old[:, 0]
            rho[m].append(spearman(old, new))
            sim[m].append(ssim(old, new))
    return SanityResult(names, {m: torch.stack(v) for m, v in rho.items()},
                        {m: torch.stack(v) for m, v in sim.items()})


__all__ = ["SanityResult", "Stage", "average_ranks", "cascading_randomization", "randomization_stages",
           "randomized_copies", "reinitialize", "spearman", "ssim"]
