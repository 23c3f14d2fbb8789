"""The one-pass engine: capture what the requested methods need, once per batch, and run them all.

For a batch it runs one forward with attention capture, then, per target, at most one backward of
the target logits to every layer's attention (shared by GMAR, GMAR++ and Chefer) and, for LeGrad,
one partial backward per layer (each traverses one block and the head). Gradients are taken with
``torch.autograd.grad`` with respect to the captured attention tensors only, so no parameter
gradients are computed and the model's ``.grad`` fields are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlens.errors import TargetError
from vitlens.methods import ATTENTIONS, GRADIENTS, LAYER_GRADIENTS, Captured, get_method, resolve_layers
from vitlens.models.base import ExplainableModel
from vitlens.models.capture import AttentionRecorder


@dataclass
class BatchResult:
    """Everything one batch produced.

    Attributes
    ----------
    logits : Tensor
        (B, classes), detached.
    targets : LongTensor
        (B, K) target classes, K = number of targets per image (1, or k for top-k).
    patch_maps : dict
        method name -> (B, K, h, w) raw (un-normalised) patch maps.
    grid : (int, int)
    input_size : (int, int)
    """

    logits: torch.Tensor
    targets: torch.Tensor
    patch_maps: dict
    grid: tuple
    input_size: tuple


def plan(methods: dict, num_layers: int) -> tuple[set, set]:
    """Union of the needs of the methods, and the (pool, layer) scores LeGrad-style methods need."""
    needs: set = set()
    layer_requests: set = set()
    for name, params in methods.items():
        spec = get_method(name)
        needs |= spec.needs
        if LAYER_GRADIENTS in spec.needs:
            for layer in resolve_layers(params.get("layers", "all"), num_layers):
                layer_requests.add((params.get("pool", "model"), layer))
    return needs, layer_requests


def resolve_targets(model: ExplainableModel, logits: torch.Tensor, target) -> torch.Tensor:
    """Turn a target request into a (B, K) LongTensor of class indices.

    ``target`` may be None or ``'pred'`` (predicted class), an int, a class name, ``'topK'``
    (e.g. ``'top3'``: the K highest logits), a sequence with one int/name per image, or a
    tensor of shape (B,) or (B, K).
    """
    batch = logits.shape[0]
    device = logits.device
    if target is None or (isinstance(target, str) and target.strip().lower() in ("pred", "predicted", "top1")):
        return logits.argmax(dim=-1, keepdim=True)
    if isinstance(target, torch.Tensor):
        t = target.to(device=device, dtype=torch.long)
        if t.dim() == 0:
            t = t.view(1, 1).expand(batch, 1)
        elif t.dim() == 1:
            t = t.view(batch, 1)
        for value in t.flatten().tolist():
            model.check_class_index(value)
        return t
    if isinstance(target, str):
        text = target.strip()
        if text.lower().startswith("top") and text[3:].isdigit():
            k = int(text[3:])
            if not 1 <= k <= model.num_classes:
                raise TargetError(f"target '{text}': k must be between 1 and {model.num_classes}")
            return logits.topk(k, dim=-1).indices
        index = int(text) if text.lstrip("-").isdigit() else model.class_index(text)
        return torch.full((batch, 1), model.check_class_index(index), dtype=torch.long, device=device)
    if isinstance(target, int):
        return torch.full((batch, 1), model.check_class_index(target), dtype=torch.long, device=device)
    if isinstance(target, (list, tuple)):
        if len(target) != batch:
            raise TargetError(f"{len(target)} targets given for {batch} images: give one per image")
        rows = [resolve_targets(model, logits[i:i + 1], t)[0] for i, t in enumerate(target)]
        if len({r.numel() for r in rows}) != 1:
            raise TargetError("every image needs the same number of targets")
        return torch.stack(rows)
    raise TargetError(f"cannot use {type(target).__name__} as a target: give an index, a name, 'pred' or 'topK'")


def run_batch(model: ExplainableModel, x: torch.Tensor, methods: dict, target=None) -> BatchResult:
    """Explain one preprocessed batch with every requested method.

    Parameters
    ----------
    model : ExplainableModel
    x : Tensor
        (B, 3, H, W) preprocessed images on the model's device.
    methods : dict
        method name -> resolved parameter dict.
    target : see :func:`resolve_targets`.
    """
    model.check_input(x)
    needs, layer_requests = plan(methods, model.num_layers)
    want_gradients = GRADIENTS in needs or LAYER_GRADIENTS in needs
    input_size = tuple(x.shape[-2:])
    grid = model.grid(input_size)
    with model.eval_mode(), torch.set_grad_enabled(want_gradients):
        if want_gradients:
            # keeps a graph even when the user froze the parameters
            x = x.detach().requires_grad_(True)
        recorder = AttentionRecorder(keep_block_outputs=LAYER_GRADIENTS in needs)
        with model.capture(recorder):
            logits = model.logits(x)
        if len(recorder.attentions) != model.num_layers:
            raise RuntimeError(
                f"captured {len(recorder.attentions)} attention maps for {model.num_layers} layers"
            )
        targets = resolve_targets(model, logits.detach(), target)
        attentions = [a.detach() for a in recorder.attentions]
        readout = model.readout_weights(attentions[0].shape[-1], device=x.device, dtype=attentions[0].dtype)
        patch_maps: dict = {name: [] for name in methods}
        for slot in range(targets.shape[1]):
            column = targets[:, slot:slot + 1]
            gradients = None
            if GRADIENTS in needs:
                score = logits.gather(1, column).sum()
                gradients = _grads(score, recorder.attentions)
            layer_gradients = {}
            for pool, layer in sorted(layer_requests):
                layer_score = model.layer_logits(recorder.block_outputs[layer], pool).gather(1, column).sum()
                layer_gradients[(pool, layer)] = _grads(layer_score, [recorder.attentions[layer]])[0]
            captured = Captured(attentions, gradients, readout, model.num_prefix_tokens, grid, layer_gradients)
            for name, params in methods.items():
                patch_maps[name].append(get_method(name).function(captured, **params).detach())
        del recorder
    stacked = {name: torch.stack(maps, dim=1) for name, maps in patch_maps.items()}
    return BatchResult(logits.detach(), targets, stacked, grid, input_size)


def _grads(score: torch.Tensor, tensors: list) -> list:
    grads = torch.autograd.grad(score, tensors, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(tensors, grads)]


__all__ = ["ATTENTIONS", "BatchResult", "plan", "resolve_targets", "run_batch"]
