"""The one-pass engine: capture what the requested methods need, once per batch, and run them all.

For a batch it runs one forward with attention capture, then, per target, at most one backward of
the target logits to every layer's attention (shared by GMAR, GMAR++ and Chefer) and, for LeGrad,
one partial backward per layer (each traverses one block and the head). Gradients are taken with
``torch.autograd.grad`` with respect to the captured attention tensors only, so no parameter
gradients are computed and the model's ``.grad`` fields are never touched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from vitlens.errors import MethodError, TargetError
from vitlens.lrp import LRPConfig, LRPRecorder, lrp_rules
from vitlens.methods import ATTENTIONS, CAM, GRADIENTS, LAYER_GRADIENTS, LRP, Captured, get_method, resolve_layers
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
        method name -> (B, K, h, w) raw (un-normalised) patch maps; signed (B, K, H, W) pixel
        relevance for LRP methods.
    grid : (int, int)
    input_size : (int, int)
    extras : dict
        method name -> per-target diagnostics (LRP: ``relevance_sum`` and ``target_logit``, (B, K)).
    """

    logits: torch.Tensor
    targets: torch.Tensor
    patch_maps: dict
    grid: tuple
    input_size: tuple
    extras: dict = field(default_factory=dict)


def plan(methods: dict, num_layers: int, default_cam_layers=()) -> tuple[set, set, list]:
    """What one pass must capture for these methods.

    Returns the union of the methods' needs, the (pool, layer) scores LeGrad-style methods need,
    and the Grad-CAM target layers (names) to hook.
    """
    needs: set = set()
    layer_requests: set = set()
    cam_layers: list = []
    for name, params in methods.items():
        spec = get_method(name)
        needs |= spec.needs
        if LAYER_GRADIENTS in spec.needs:
            for layer in resolve_layers(params.get("layers", "all"), num_layers):
                layer_requests.add((params.get("pool", "model"), layer))
        if CAM in spec.needs:
            requested = params.get("layers")
            if requested in (None, "default"):
                requested = list(default_cam_layers)
            elif isinstance(requested, str):
                requested = [part.strip() for part in requested.split(",") if part.strip()]
            cam_layers.extend(n for n in requested if n not in cam_layers)
    return needs, layer_requests, cam_layers


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
    input_size = tuple(x.shape[-2:])
    # baselines need a grid on CNNs too: a 16-pixel grid, like a ViT's patches
    grid = model.grid(input_size) if model.has_attention else (input_size[0] // 16, input_size[1] // 16)
    lrp_methods = {n: p for n, p in methods.items() if LRP in get_method(n).needs}
    shared_methods = {n: p for n, p in methods.items() if n not in lrp_methods}
    logits = targets = None
    patch_maps: dict = {}
    extras: dict = {}
    if shared_methods or not lrp_methods:
        logits, targets, patch_maps = _shared_pass(model, x, shared_methods, target, grid)
    # LRP changes the backward of the whole model: one extra pass per distinct rule set
    by_config: dict = {}
    for name, params in lrp_methods.items():
        by_config.setdefault((name, params["conv_gamma"], params["lin_gamma"]), []).append(name)
    for (variant, conv_gamma, lin_gamma), names in by_config.items():
        config = LRPConfig(variant, conv_gamma, lin_gamma)
        lrp_logits, targets, pairs = _lrp_pass(model, x, config, target, targets)
        logits = lrp_logits if logits is None else logits
        for name in names:
            maps, sums = [], []
            for slot, pair in enumerate(pairs):
                captured = Captured([], None, None, model.num_prefix_tokens, grid, inputs=x.detach(),
                                    input_relevance={(variant, conv_gamma, lin_gamma): pair})
                relevance = get_method(name).function(captured, **methods[name]).detach()
                maps.append(relevance)
                sums.append(relevance.flatten(1).sum(1))
            patch_maps[name] = torch.stack(maps, dim=1)
            extras[name] = {"relevance_sum": torch.stack(sums, dim=1),
                            "target_logit": lrp_logits.gather(1, targets).detach()}
    ordered = {name: patch_maps[name] for name in methods}
    return BatchResult(logits, targets, ordered, grid, input_size, extras)


def _shared_pass(model, x, methods, target, grid):
    """One forward (+ one backward per target) shared by every non-LRP method."""
    default_cam = model.default_cam_layers() if any(CAM in get_method(m).needs for m in methods) else []
    needs, layer_requests, cam_names = plan(methods, model.num_layers, default_cam)
    want_gradients = bool({GRADIENTS, LAYER_GRADIENTS, CAM} & needs)
    with model.eval_mode(), torch.set_grad_enabled(want_gradients), contextlib.ExitStack() as stack:
        if want_gradients:
            # keeps a graph even when the user froze the parameters
            x = x.detach().requires_grad_(True)
        recorder = AttentionRecorder(keep_block_outputs=LAYER_GRADIENTS in needs)
        if ATTENTIONS in needs:
            stack.enter_context(model.capture(recorder))
        activations = _hook_layers(model, cam_names, stack)
        logits = model.logits(x)
        stack.close()  # the model is back to normal before any method runs
        if ATTENTIONS in needs and len(recorder.attentions) != model.num_layers:
            raise RuntimeError(f"captured {len(recorder.attentions)} attention maps for {model.num_layers} layers")
        targets = resolve_targets(model, logits.detach(), target)
        attentions = [a.detach() for a in recorder.attentions]
        readout = None
        if attentions:
            readout = model.readout_weights(attentions[0].shape[-1], device=x.device, dtype=attentions[0].dtype)
        missing = [name for name in cam_names if name not in activations]
        if missing:
            raise MethodError(f"target layer '{missing[0]}' is not used by the model's forward pass")
        cam_inputs = [activations[name] for name in cam_names]
        spatial_acts = {name: model.cam_spatial(act.detach(), grid, name) for name, act in zip(cam_names, cam_inputs)}
        patch_maps: dict = {name: [] for name in methods}
        for slot in range(targets.shape[1]):
            column = targets[:, slot:slot + 1]
            gradients, cam = None, {}
            shared = (recorder.attentions if GRADIENTS in needs else []) + cam_inputs
            if shared:
                # one backward for every method that needs d(target logit)/d(something)
                grads = _grads(logits.gather(1, column).sum(), shared)
                if GRADIENTS in needs:
                    gradients = grads[:len(recorder.attentions)]
                for name, grad in zip(cam_names, grads[len(shared) - len(cam_inputs):]):
                    cam[name] = (spatial_acts[name], model.cam_spatial(grad, grid, name))
            layer_gradients = {}
            for pool, layer in sorted(layer_requests):
                layer_score = model.layer_logits(recorder.block_outputs[layer], pool).gather(1, column).sum()
                layer_gradients[(pool, layer)] = _grads(layer_score, [recorder.attentions[layer]])[0]
            captured = Captured(attentions, gradients, readout, model.num_prefix_tokens, grid, layer_gradients,
                                cam, list(default_cam), x.detach())
            for name, params in methods.items():
                patch_maps[name].append(get_method(name).function(captured, **params).detach())
        del recorder
    stacked = {name: torch.stack(maps, dim=1) for name, maps in patch_maps.items()}
    return logits.detach(), targets, stacked


def _lrp_pass(model, x, config, target, resolved=None):
    """Forward with LRP rules on the model, one backward per target: (logits, targets, [(x, grad)]).

    ``resolved`` are targets already resolved by an earlier pass over the same batch.
    """
    with model.eval_mode(), torch.enable_grad():
        x = x.detach().requires_grad_(True)
        recorder = LRPRecorder(config)
        with lrp_rules(model.module, config), model.capture(recorder):
            logits = model.logits(x)
        targets = resolved if resolved is not None else resolve_targets(model, logits.detach(), target)
        pairs = []
        for slot in range(targets.shape[1]):
            grad = _grads(logits.gather(1, targets[:, slot:slot + 1]).sum(), [x])[0]
            pairs.append((x.detach(), grad))
    return logits.detach(), targets, pairs


def _hook_layers(model: ExplainableModel, names: list, stack: contextlib.ExitStack) -> dict:
    """Record the outputs of the named modules during the forward (hooks removed with ``stack``).

    The hook hands a copy downstream, so a later in-place operation (``ReLU(inplace=True)``) cannot
    modify the tensor we differentiate with respect to.
    """
    from vitlens.models.layers import find_module

    outputs: dict = {}
    valid = model.spatial_layer_names() if names else []
    for name in names:
        module = find_module(model.module, name, valid)

        def hook(mod, inputs, output, name=name):
            if not isinstance(output, torch.Tensor):
                raise MethodError(f"target layer '{name}' does not output a tensor: choose one of {', '.join(valid[-8:])}")
            outputs[name] = output
            return output.clone()

        stack.callback(module.register_forward_hook(hook).remove)
    return outputs


def _grads(score: torch.Tensor, tensors: list) -> list:
    grads = torch.autograd.grad(score, tensors, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(tensors, grads)]


__all__ = ["ATTENTIONS", "BatchResult", "plan", "resolve_targets", "run_batch"]
