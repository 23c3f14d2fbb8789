"""The one engine: capture what the requested methods need, once per batch, and run them all.

Every kind of input (images here, token sequences in :mod:`vitlens.text.task`) describes one batch
as an :class:`ExplainTask`: where the gradient starts (the leaf: the images, or the word
embeddings), the forward, the explained scores, the score a block's output gives (LeGrad), and how
the captured batch is cut into the views the methods see (the whole image batch at once; one view
per text sequence, padding removed). :func:`run_task` is the only loop:

1. one forward with attention capture (and, for image tasks, the Grad-CAM target layers hooked);
2. per target slot, at most one ``torch.autograd.grad`` of the summed target scores with respect to
   every layer's attention and every Grad-CAM activation (shared by GMAR, GMAR++, Chefer and the
   Grad-CAM family), and, for LeGrad, one partial backward per requested layer (each traverses one
   block and the head);
3. every method function on every view; gradient methods asked for with ``libragrad=True`` get steps 1-3
   once more with LibraGrad's backward on the instance (:mod:`vitlens.lrp.libragrad`);
4. methods with a modified backward (AttnLRP / CP-LRP) get one more forward per distinct rule set,
   inside :func:`vitlens.lrp.lrp_rules`, and one backward per target slot to the leaf;
5. transformer attribution (Chefer, CVPR 2021) gets, before the shared pass, one forward with the rules of
   :mod:`vitlens.lrp.chefer` and one backward per target slot to every attention map (the LRP relevance
   at each map, :func:`_attention_relevance_pass`); its function then runs in the shared pass with the
   ordinary gradients;
6. model-agnostic perturbation methods (RISE, occlusion) get a batched scorer of perturbed copies of
   the input (no gradients, no capture) for the targets the first pass resolved
   (:func:`_perturbation_pass`; image tasks only);
7. integrated gradients gets a scorer with the graph of interpolated copies of the leaf
   (:func:`_path_pass`, images and text); saliency and input x gradient read d(target score)/d(leaf)
   from step 2's backward (the leaf is one more tensor of the same ``autograd.grad`` call).

``precision`` (``'fp32'``, ``'bf16'``, ``'fp16'``; see :func:`check_precision`) says how the *model*
computes: with bf16 or fp16 the shared pass's forward and LeGrad's head readouts run under
``torch.autocast`` on the model's device type, and the backward passes follow the dtypes autocast
chose (they are taken outside the autocast region, as torch recommends). Everything captured
(attention, its gradients, Grad-CAM activations and gradients, the logits) is cast up to float32
before any method combines it, so the rollout products, GMAR, LeGrad, Chefer and Grad-CAM are
computed in float32 whatever the precision. The LRP passes stay in float32 (see :func:`run_task`).
``'fp32'`` (the default) enters no autocast region and casts nothing: results are bit-identical
to a call without ``precision``.

Gradients are taken with ``torch.autograd.grad`` with respect to the captured tensors (or the leaf)
only, so no parameter gradient is computed and the model's ``.grad`` fields are never touched.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field, replace

import torch

from vitlens.errors import MethodError, TargetError, UsageError, one_line
from vitlens.lrp import LRPConfig, LRPRecorder, lrp_rules
from vitlens.lrp.libragrad import LIBRAGRAD, LibraRecorder, libragrad_refusal
from vitlens.lrp.chefer import CheferRecorder, chefer_rules
from vitlens.methods import (ATTENTION_RELEVANCE, ATTENTIONS, CAM, GRADIENTS, INPUT_GRADIENT, LAYER_GRADIENTS, LRP,
                             PATH_GRADIENTS, PERTURB, Captured, get_method, resolve_layers)
from vitlens.models.base import ExplainableModel, ImageModel
from vitlens.models.capture import AttentionRecorder, HeadMeanRecorder
from vitlens.models.layers import find_module

# ------------------------------------------------------------------------------------------ precision
#: the precisions the engine runs a model in -> the autocast dtype (None: float32, no autocast)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the same precisions as torch spells its dtypes (``torch.float32`` ... are accepted as well)
PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
#: reduced-precision float dtypes that are cast up to float32 before the methods combine anything
_REDUCED = (torch.bfloat16, torch.float16)


def precision_name(precision="fp32", option: str = "precision") -> str:
    """The canonical name (``'fp32'``, ``'bf16'`` or ``'fp16'``) of a precision request.

    Accepts those names, torch's spellings ``'float32'``, ``'bfloat16'``, ``'float16'`` (any case,
    surrounding spaces ignored), the dtypes ``torch.float32``, ``torch.bfloat16``, ``torch.float16``,
    and None (fp32). Anything else is a one-line :class:`~vitlens.errors.UsageError` whose message
    starts with ``option`` (``'--precision'`` on a command line).
    """
    if precision is None:
        return "fp32"
    if isinstance(precision, torch.dtype) and precision in _DTYPE_NAMES:
        return _DTYPE_NAMES[precision]
    if isinstance(precision, str):
        text = precision.strip().lower()
        text = PRECISION_ALIASES.get(text, text)
        if text in PRECISIONS:
            return text
    raise UsageError(f"{option} must be fp32, bf16 or fp16, got {precision!r}")


def check_precision(precision="fp32", device=None, option: str = "precision") -> torch.dtype | None:
    """Check a precision request before any work; returns the autocast dtype, or None for fp32.

    Parameters
    ----------
    precision : str, torch.dtype or None
        See :func:`precision_name` for the accepted spellings.
    device : str or torch.device, optional
        With a device, also check that torch's autocast supports the dtype on that device type
        (e.g. bf16 on a CUDA GPU without bfloat16); an unsupported combination is a one-line
        :class:`~vitlens.errors.UsageError` too.
    option : str
        How the message names the setting (``'--precision'`` for a command line).
    """
    name = precision_name(precision, option)
    dtype = PRECISIONS[name]
    if dtype is not None and device is not None:
        device_type = torch.device(device).type
        if not torch.amp.is_autocast_available(device_type):
            raise UsageError(f"{option} {name}: torch has no autocast on {device_type}")
        with warnings.catch_warnings():
            # torch only warns (and turns autocast off) for a dtype a device type does not support
            warnings.simplefilter("error")
            try:
                torch.autocast(device_type=device_type, dtype=dtype)
            except (RuntimeError, UserWarning, AssertionError) as exc:
                raise UsageError(f"{option} {name} on {device_type}: {one_line(exc)}") from None
    return dtype


def _autocast(model: ExplainableModel, dtype: torch.dtype | None):
    """The region the model computes in: autocast on the model's device type, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=model.device.type, dtype=dtype)


def _up(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A reduced-precision tensor as float32 (anything else as it is), before the methods combine it."""
    if tensor is not None and tensor.dtype in _REDUCED:
        return tensor.float()
    return tensor


class ExplainTask:
    """One batch of one kind of input, as the engine sees it.

    A subclass fills in the five methods below; Grad-CAM is an optional capability
    (:meth:`default_cam_layers` / :meth:`cam_spatial`), available where a task has spatial layers.

    Attributes
    ----------
    model : ExplainableModel
    targets : LongTensor or None
        (B, K) explained classes once resolved (None for tasks that explain another scalar).
    num_views : int
        How many views :meth:`views` returns (the methods' outputs are collected per view).
    keep_attentions : bool
        Capture attention even when no method needs it (text attention views).
    reduces_in_backward : bool
        Each view is a block of the batch's tensors (:meth:`view_blocks`), so the attention gradients can be
        reduced in the backward and the attention kept as head means; False where a view assembles several
        attention calls into one map (encoder-decoders).
    """

    model: ExplainableModel
    targets: torch.Tensor | None = None
    num_views: int = 1
    keep_attentions: bool = False
    reduces_in_backward: bool = True

    def view_blocks(self, slot: int = 0) -> list | None:
        """Per view of ``slot``, the (batch row, token positions) it cuts out of the batch's (B, ..., N, N)
        tensors (text: a sequence's real tokens); None: the one view is the batch as captured (images).

        The attention gradients are reduced to what the methods read while the backward produces them
        (``Captured.layer_terms``), each view's part from that view's block, so that a view reads the terms of
        its own tokens."""
        return None

    def leaf(self) -> torch.Tensor:
        """The batch input the gradients start from, as a fresh detached tensor."""
        raise NotImplementedError

    def forward(self, leaf: torch.Tensor) -> torch.Tensor:
        """Run the model from the leaf; returns its output (logits, or hidden states)."""
        raise NotImplementedError

    def scores(self, output: torch.Tensor, lrp: bool = False) -> torch.Tensor:
        """(B, K) explained scalars on the graph, one column per target slot; resolves the targets on the
        first call. ``lrp`` asks for the form a modified-backward pass differentiates."""
        raise NotImplementedError

    def layer_score(self, hidden: torch.Tensor, pool: str, slot: int) -> torch.Tensor:
        """The slot's target score read out of one block's output, summed over the batch (LeGrad)."""
        raise NotImplementedError

    def views(self, captured: Captured, slot: int = 0) -> list:
        """The batch-level capture of target slot ``slot`` -> one :class:`Captured` per view, ready for the method
        functions (a task whose slots read different tokens, a continuation's steps, cuts each slot its own way)."""
        raise NotImplementedError

    def lrp_views(self, leaf: torch.Tensor, grad: torch.Tensor, key: tuple, slot: int = 0) -> list:
        """The leaf and its modified gradient -> one :class:`Captured` per view (``input_relevance[key]``)."""
        raise NotImplementedError

    # --- optional: Grad-CAM ----------------------------------------------------------------------
    def default_cam_layers(self) -> list:
        raise MethodError("Grad-CAM methods need spatial layers, which this kind of input does not have")

    def cam_spatial(self, activation: torch.Tensor, layer: str) -> torch.Tensor:
        raise NotImplementedError

    # --- optional: gradients at inputs a method builds (integrated gradients) --------------------
    def score_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), K) target scores, with the graph, of inputs ``x`` that stand in for the leaf's rows
        ``rows`` (x[i] replaces row rows[i]: an interpolated copy of it)."""
        raise MethodError("this kind of input cannot be re-scored at other inputs")

    def baselines(self) -> dict:
        """Reference inputs of integrated gradients: name -> tensor broadcastable to the leaf."""
        raise MethodError("this kind of input has no baselines for integrated gradients")

    def input_views(self, leaf: torch.Tensor, values: torch.Tensor, slot: int = 0) -> list:
        """The leaf and a tensor of its shape (a gradient, an attribution) -> per view ``(x, values)`` with the
        channels in dim 1: the whole batch (B, C, H, W) for images, (1, C, 1, n) per text sequence."""
        raise NotImplementedError

    # --- optional: perturbation methods ----------------------------------------------------------
    def perturbation_inputs(self) -> tuple:
        """(inputs, fills): the batch the perturbation methods perturb, as the forward takes it, and the
        fill values of hidden inputs (``{'black': (C,), 'mean': (C,)}``, see ``methods.common.FILLS``)."""
        raise MethodError("perturbation methods (rise, occlusion) need image inputs")


@dataclass
class PassResult:
    """What :func:`run_task` produced for one batch.

    Attributes
    ----------
    output : Tensor
        The model output of the first pass, detached.
    values : Tensor
        (B, K) explained scalars, detached.
    maps : dict
        method -> list over views of the list over target slots of the method's output.
    lrp_values : dict
        LRP method -> (B, K) explained scalars of its own (rule-modified) pass.
    attentions : list or None
        The captured attention probabilities (detached), when the shared pass captured any.
    """

    output: torch.Tensor | None = None
    values: torch.Tensor | None = None
    maps: dict = field(default_factory=dict)
    lrp_values: dict = field(default_factory=dict)
    attentions: list | None = None


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


def run_task(task: ExplainTask, methods: dict, precision="fp32") -> PassResult:
    """Run every requested method on one batch: the shared pass, then one pass per LRP rule set.

    Parameters
    ----------
    task : ExplainTask
    methods : dict
        method name -> resolved parameter dict.
    precision : str
        ``'fp32'`` (default), ``'bf16'`` or ``'fp16'`` (see :func:`check_precision`): the shared pass's
        forwards run under ``torch.autocast`` with that dtype, the methods combine float32 copies of
        what was captured, and the returned tensors (output, values, maps) are float32.
        AttnLRP / CP-LRP always run their rule-modified pass in float32 (the model's own dtype),
        whatever the precision: their Gamma rule's backward multiplies the tensors its forward saved,
        which autocast leaves in mixed dtypes (bf16 activations, float32 weights), so it cannot run
        under autocast as it is. Their maps are exactly the fp32 maps.
    """
    dtype = check_precision(precision, task.model.device)
    lrp_methods = {n: p for n, p in methods.items() if LRP in get_method(n).needs}
    perturb_methods = {n: p for n, p in methods.items() if PERTURB in get_method(n).needs}
    path_methods = {n: p for n, p in methods.items() if PATH_GRADIENTS in get_method(n).needs}
    shared_methods = {n: p for n, p in methods.items()
                      if n not in lrp_methods and n not in perturb_methods and n not in path_methods}
    # LibraGrad versions of gradient methods: a second shared pass with LibraGrad's backward (lrp/libragrad.py)
    libra_methods = {n: p for n, p in shared_methods.items() if p.get("libragrad")}
    shared_methods = {n: p for n, p in shared_methods.items() if n not in libra_methods}
    if libra_methods and libragrad_refusal(task.model):
        raise MethodError(f"method '{next(iter(libra_methods))}': libragrad: {libragrad_refusal(task.model)}")
    result = PassResult(maps={name: [[] for _ in range(task.num_views)] for name in methods})
    # Chefer's relevance pass first: the shared pass hands its relevance to the methods with the gradients
    relevance = None
    if any(ATTENTION_RELEVANCE in get_method(n).needs for n in shared_methods):
        relevance = _attention_relevance_pass(task)
    # with perturbation methods alone the shared pass is one plain forward: it resolves the targets
    if shared_methods or not (lrp_methods or libra_methods) or task.keep_attentions:
        _shared_pass(task, _without_libragrad(shared_methods), result, dtype, relevance)
    if libra_methods:
        _shared_pass(task, _without_libragrad(libra_methods), result, dtype, libra=True)
    # LRP changes the backward of the whole model: one extra pass per distinct rule set
    by_config: dict = {}
    for name, params in lrp_methods.items():
        key = (name, params["conv_gamma"], params["lin_gamma"], params.get("attention_gamma", True))
        by_config.setdefault(key, []).append(name)
    for key, names in by_config.items():
        _lrp_pass(task, LRPConfig(*key), key, {n: methods[n] for n in names}, result)
    if path_methods:
        _path_pass(task, path_methods, result, dtype)
    if perturb_methods:
        _perturbation_pass(task, perturb_methods, result, dtype)
    return result


def _without_libragrad(methods: dict) -> dict:
    """The parameters the method functions take: ``libragrad`` says which pass runs them, nothing more."""
    return {name: {k: v for k, v in params.items() if k != "libragrad"} for name, params in methods.items()}


def _shared_pass(task: ExplainTask, methods: dict, result: PassResult, dtype=None, relevance=None,
                 libra: bool = False) -> None:
    """One forward (+ one backward per target) shared by every method without a modified backward.

    With ``libra`` the same pass runs with LibraGrad's backward (:data:`vitlens.lrp.libragrad.LIBRAGRAD` set on
    the instance for the forward, attention always computed by vitlens with queries and keys detached): the
    gradients every method reads are then LibraGrad's. Outputs are the same; the methods' maps are their
    LibraGrad versions.

    ``relevance`` (from :func:`_attention_relevance_pass`, per target slot) goes to the methods as
    ``Captured.attention_relevance``.

    With an autocast ``dtype`` the forward and LeGrad's head readouts run under autocast, the
    backward passes outside it. ``up`` casts what was captured in a reduced precision (autocast, or a
    model loaded in bf16 / fp16) to float32 for the methods; float32 tensors are passed as they are.
    """
    model = task.model
    up = _up
    default_cam = task.default_cam_layers() if any(CAM in get_method(m).needs for m in methods) else []
    needs, layer_requests, cam_names = plan(methods, model.num_layers, default_cam)
    want_gradients = bool({GRADIENTS, LAYER_GRADIENTS, CAM, INPUT_GRADIENT} & needs)
    capture = ATTENTIONS in needs or task.keep_attentions or libra
    with model.eval_mode(), torch.set_grad_enabled(want_gradients), contextlib.ExitStack() as stack:
        # Chefer, GMAR and GMAR++ read each layer through a term computed in the backward; without LibraGrad or a
        # caller that wants the attention itself, the per-head attention need not be kept at all. (LibraGrad
        # detaches queries and keys: a layer's attention no longer leads to the earlier ones, so its gradients are
        # kept, as reducing them in the backward would take one backward per layer.)
        terms = _layer_terms(task, methods) if GRADIENTS in needs and not libra else None
        if libra:
            recorder = LibraRecorder()
            stack.enter_context(lrp_rules(model.module, LIBRAGRAD))
        elif _head_means_suffice(task, methods, terms):
            recorder = HeadMeanRecorder(keep_block_outputs=LAYER_GRADIENTS in needs)
        else:
            recorder = AttentionRecorder(keep_block_outputs=LAYER_GRADIENTS in needs)
        if capture:
            stack.enter_context(model.capture(recorder))
        activations = _hook_layers(model, cam_names, stack)
        leaf = task.leaf()
        if want_gradients:
            leaf.requires_grad_(True)  # a graph even when the user froze every parameter
        with _autocast(model, dtype):
            output = task.forward(leaf)
        stack.close()  # the model is back to normal before any method runs
        if capture and len(recorder.attentions) != model.num_layers:
            raise RuntimeError(f"captured {len(recorder.attentions)} attention maps for {model.num_layers} layers")
        values = task.scores(output)
        result.output, result.values = up(output.detach()), up(values.detach())
        attentions = [up(a.detach()) for a in recorder.attentions]
        result.attentions = attentions if capture else None
        missing = [name for name in cam_names if name not in activations]
        if missing:
            raise MethodError(f"target layer '{missing[0]}' is not used by the model's forward pass")
        cam_inputs = [activations[name] for name in cam_names]
        spatial_acts = {name: task.cam_spatial(up(act.detach()), name) for name, act in zip(cam_names, cam_inputs)}
        sources = recorder.gradient_sources
        # with head means only every layer's gradient source is asked for (each is small, (B, heads, N, d)): no layer
        # is left to an extra backward, so the pass's last backward may free the graph as it goes
        every_source = not terms or isinstance(recorder, HeadMeanRecorder)
        slots = values.shape[1] if methods else 0
        for slot in range(slots):
            # LeGrad's partial backwards first, so that the slot's shared backward is the last to need the graph
            layer_gradients = {}
            for pool, layer in sorted(layer_requests):
                with _autocast(model, dtype):  # the final norm and head are the model's computation
                    score = task.layer_score(recorder.block_outputs[layer], pool, slot)
                # reduced at once to what LeGrad reads, the positive part's mean over heads: the per-head
                # gradient of every layer is never held (H times the memory), and a view still cuts its rows
                gradient = recorder.attention_gradient(layer, _grads(score, [sources[layer]])[0])
                layer_gradients[(pool, layer)] = up(gradient).clamp_min(0).mean(dim=1, keepdim=True)
                del gradient
            gradients, cam, layer_terms = None, {}, {}
            inputs = [leaf] if INPUT_GRADIENT in needs else []
            wanted = [] if GRADIENTS not in needs else sources if every_source else sources[:1]
            shared = wanted + cam_inputs + inputs
            input_gradient = None
            if shared:
                # one backward for every method that needs d(target score)/d(something); the pass's last frees
                # each saved tensor once it has been used, as a plain backward does
                score = values[:, slot].sum()
                last = slot == slots - 1 and every_source
                with _reducing(recorder, terms, layer_terms, up, score, asked_every_layer=every_source,
                               blocks=task.view_blocks(slot)):
                    grads = _grads(score, shared, retain=not last)
                if GRADIENTS in needs and not terms:
                    gradients = [up(g) for g in grads[:len(sources)]]
                for name, grad in zip(cam_names, grads[len(shared) - len(cam_inputs) - len(inputs):]):
                    cam[name] = (spatial_acts[name], task.cam_spatial(up(grad), name))
                if inputs:  # d(target score)/d(input): saliency, input x gradient
                    input_gradient = (up(leaf.detach()), up(grads[-1]))
                del grads
            readout = up(recorder.readout) if recorder.readout is not None else None  # an image-dependent head
            captured = Captured(attentions, gradients, readout, model.num_prefix_tokens, (0, 0), layer_gradients,
                                cam, list(default_cam),
                                attention_relevance=relevance[slot] if relevance is not None else None,
                                input_gradient=input_gradient, layer_terms=layer_terms)
            for view, view_captured in enumerate(task.views(captured, slot)):
                for name, params in methods.items():
                    result.maps[name][view].append(get_method(name).function(view_captured, **params).detach())
        del recorder


def _lrp_pass(task: ExplainTask, config: LRPConfig, key: tuple, methods: dict, result: PassResult) -> None:
    """A forward with LRP rules from the leaf, one backward per target slot, the LRP methods on every view.

    Targets resolved by an earlier pass over the same batch are kept, so every method explains the
    same scores. Always in the model's own dtype (never under autocast, see :func:`run_task`); a model in
    bf16 / fp16 hands float32 copies of its input and modified gradient to the methods.
    """
    model = task.model
    with model.eval_mode(), torch.enable_grad():
        leaf = task.leaf().requires_grad_(True)
        recorder = LRPRecorder(config)
        with lrp_rules(model.module, config), model.capture(recorder):
            output = task.forward(leaf)
        values = task.scores(output, lrp=True)
        if result.values is None:
            result.output, result.values = _up(output.detach()), _up(values.detach())
        for slot in range(values.shape[1]):
            grad = _grads(values[:, slot].sum(), [leaf])[0]
            for view, captured in enumerate(task.lrp_views(_up(leaf.detach()), _up(grad), key, slot)):
                for name, params in methods.items():
                    result.maps[name][view].append(get_method(name).function(captured, **params).detach())
        for name in methods:
            result.lrp_values[name] = _up(values.detach())
        del recorder


def _attention_relevance_pass(task: ExplainTask) -> list:
    """LRP relevance at every attention map with Chefer's rules, per target slot: a list over slots of lists
    over layers of (B, heads, N, N) tensors R^A = A * (modified gradient at A), detached.

    One forward from the leaf with :func:`vitlens.lrp.chefer.chefer_rules` on the model and its attention
    under :class:`~vitlens.lrp.chefer.CheferRecorder`, then per slot one backward of sum_b y_c / y_c (the
    initial relevance one-hot at the target, whatever the logit's value) to the attention maps only. Resolves
    the targets when no pass has yet. Always in the model's own dtype (never under autocast), like LRP.
    """
    model = task.model
    try:  # each block's pre-attention norm: its input is the residual stream
        stream = [find_module(model.module, name) for name in model.block_norm_names()]
    except MethodError as exc:
        raise MethodError(f"transformer-attribution needs the blocks' pre-attention norms: {exc}") from None
    with model.eval_mode(), torch.enable_grad():
        leaf = task.leaf().requires_grad_(True)
        recorder = CheferRecorder()
        # a generic attention model's dry run knows whether its blocks take (N, B, C) (sequence first)
        seq_first = any(getattr(getattr(model, "survey", None), "seq_first", {}).values())
        with chefer_rules(model.module, stream, leaf.shape[0], seq_first) as adds, model.capture(recorder):
            output = task.forward(leaf)
        if adds.found != 2 * model.num_layers:
            raise MethodError(f"transformer-attribution: found {adds.found} residual connections in "
                              f"{type(model.module).__name__} where {2 * model.num_layers} (two per block) were "
                              "expected: its blocks are not pre-norm residual blocks")
        values = task.scores(output, lrp=True)
        attentions = [a.detach() for a in recorder.attentions]
        relevance = []
        for slot in range(values.shape[1]):
            value = values[:, slot]
            # d/dy_c of y_c / y_c is 1 / y_c: in Gradient x Input form the relevance at the logit is then 1
            one_hot = torch.where(value != 0, value / torch.where(value != 0, value, 1).detach(), 0).sum()
            grads = _grads(one_hot, recorder.attentions)
            relevance.append([_up(a) * _up(g) for a, g in zip(attentions, grads)])
        del recorder
    return relevance


def _perturbation_pass(task: ExplainTask, methods: dict, result: PassResult, dtype=None) -> None:
    """Model-agnostic methods: each gets the input, a batched scorer of perturbed copies and the fills.

    The scorer explains the targets an earlier pass resolved: ``score_fn(perturbed, kind)`` takes
    (B, G, ...) copies of the B inputs (G per input), runs them through ``task.forward`` in one pass
    under ``no_grad`` (and autocast for bf16 / fp16), and returns (B, G, K) target scores, the softmax
    probability (``kind='probability'``, computed in at least float32) or the logit. The method bounds G.
    """
    model = task.model
    inputs, fills = task.perturbation_inputs()
    targets = task.targets

    def score_fn(perturbed: torch.Tensor, kind: str = "probability") -> torch.Tensor:
        batch, group = perturbed.shape[:2]
        with _autocast(model, dtype):
            logits = task.forward(perturbed.reshape(batch * group, *perturbed.shape[2:]))
        logits = _up(logits) if dtype is not None else logits
        if kind == "probability":
            logits = logits.softmax(dim=-1)
        elif kind != "logit":
            raise MethodError(f"unknown score {kind!r}: expected probability or logit")
        return logits.gather(1, targets.repeat_interleave(group, dim=0)).reshape(batch, group, -1)

    with model.eval_mode(), torch.no_grad():
        for name, params in methods.items():
            maps = get_method(name).function(inputs, score_fn, fills, **params)
            for slot in range(maps.shape[1]):
                result.maps[name][0].append(maps[:, slot].detach())


def _path_pass(task: ExplainTask, methods: dict, result: PassResult, dtype=None) -> None:
    """Methods that differentiate the model at inputs they build (integrated gradients).

    Each gets the leaf, a scorer with the graph ``score_fn(x, rows)`` -> (len(rows), K) target scores of copies
    ``x`` of the batch rows ``rows`` (``task.score_rows``, under autocast for bf16 / fp16, scores in float32),
    the task's baselines and the number of target slots, and returns element-wise attributions
    (B, K, *leaf.shape[1:]); the engine cuts them into views like the input gradient and sums each view over
    its channels (dim 1). Explains the targets an earlier pass resolved.
    """
    model = task.model

    def score_fn(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with _autocast(model, dtype):
            scores = task.score_rows(x, rows)
        return scores.float() if dtype is not None else scores

    with model.eval_mode(), torch.enable_grad():
        leaf = task.leaf()
        baselines = task.baselines()
        for name, params in methods.items():
            attributions = get_method(name).function(leaf, score_fn, baselines, result.values.shape[1], **params)
            for slot in range(attributions.shape[1]):
                for view, (_, part) in enumerate(task.input_views(leaf, attributions[:, slot], slot)):
                    result.maps[name][view].append(part.sum(dim=1).detach())


def _hook_layers(model: ExplainableModel, names: list, stack: contextlib.ExitStack) -> dict:
    """Record the outputs of the named modules during the forward (hooks removed with ``stack``).

    The hook hands a copy downstream, so a later in-place operation (``ReLU(inplace=True)``) cannot
    modify the tensor we differentiate with respect to.
    """
    outputs: dict = {}
    valid = model.spatial_layer_names() if names else []
    for name in names:
        module = find_module(model.module, name, valid)

        def hook(mod, inputs, output, name=name):
            if not isinstance(output, torch.Tensor):
                raise MethodError(f"target layer '{name}' does not output a tensor: "
                                  f"choose one of {', '.join(valid[-8:])}")
            outputs[name] = output
            return output.clone()

        stack.callback(module.register_forward_hook(hook).remove)
    return outputs


def _layer_terms(task: ExplainTask, methods: dict) -> list | None:
    """The (term, params) every gradient method of the pass reads each layer through, or None to keep the gradients.

    Only where every method that needs the attention gradients declares a ``layer_term`` and the task's views are
    blocks of the batch (:attr:`ExplainTask.reduces_in_backward`).
    """
    if not task.reduces_in_backward:
        return None
    wanted = []
    for name, params in methods.items():
        spec = get_method(name)
        if GRADIENTS not in spec.needs:
            continue
        if spec.layer_term is None:
            return None
        key = (spec.layer_term, tuple(sorted((p, params[p]) for p in spec.term_params)))
        if key not in wanted:
            wanted.append(key)
    return wanted


def keeps_attention_gradients(methods: dict) -> bool:
    """Whether an image pass with these methods holds every layer's attention gradient at once (for the memory
    estimate): some method needs them and reads them otherwise than through a layer term, or runs with LibraGrad."""
    if not any(GRADIENTS in get_method(name).needs for name in methods):
        return False
    if any(params.get("libragrad") for params in methods.values()):
        return True
    return any(GRADIENTS in get_method(name).needs and get_method(name).layer_term is None for name in methods)


@contextlib.contextmanager
def _reducing(recorder: AttentionRecorder, terms, store: dict, up, score: torch.Tensor,
              asked_every_layer: bool = False, blocks: list | None = None):
    """While the backward runs, reduce each attention gradient to the ``terms`` as it is produced.

    A hook on every layer's gradient source (the attention, or with :class:`HeadMeanRecorder` the attention's
    output) reads the layer's attention and gradient (:meth:`~AttentionRecorder.attention_and_gradient`) and
    computes ``term(attention, gradient, **params)`` for each (term, params) into ``store[(term, params)][layer]``;
    the gradient is then freed by autograd, so the per-head gradients of all layers are never held at once. The
    backward is asked for the first layer's gradient only: in a ViT every later attention lies on the way to it,
    so every hook runs. A layer whose attention does not depend on the first one's (not a ViT of the usual kind)
    gets its gradient from one more backward of ``score``, reduced the same way; when the backward was asked for
    every layer's source (``asked_every_layer``), a layer whose hook did not run is one the score does not depend
    on, and its gradient is zero. With view ``blocks`` (:meth:`ExplainTask.view_blocks`) each view's term is
    computed from its block alone and put in its place of a (B, N, N) tensor (zero elsewhere), so that cutting the
    view out of the stored term gives exactly the term of the view.
    """
    if not terms:
        yield
        return
    sources = recorder.gradient_sources
    for key in terms:
        store[key] = [None] * len(sources)

    def reduce(layer: int, gradient: torch.Tensor) -> None:
        attention, gradient = recorder.attention_and_gradient(layer, gradient.detach())
        attention, gradient = up(attention), up(gradient)
        if blocks is None:
            for term, params in terms:
                store[(term, params)][layer] = term(attention, gradient, **dict(params)).detach()
            return
        placed = {key: attention.new_zeros(attention.shape[0], *attention.shape[-2:]) for key in terms}
        for row, idx in blocks:
            whole = _whole_row(idx, attention.shape[-1])
            a, g = (attention[row:row + 1], gradient[row:row + 1]) if whole else \
                (_block(attention, row, idx), _block(gradient, row, idx))
            for term, params in terms:
                part = term(a, g, **dict(params)).detach()[0]
                if whole:
                    placed[(term, params)][row] = part
                else:
                    placed[(term, params)][row, idx.unsqueeze(1), idx.unsqueeze(0)] = part
        for key, value in placed.items():
            store[key][layer] = value

    handles = [tensor.register_hook(lambda gradient, layer=layer: reduce(layer, gradient))
               for layer, tensor in enumerate(sources)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        recorder.backward_done()
    missing = [layer for layer in range(len(sources)) if store[terms[0]][layer] is None]
    for layer in missing:
        reduce(layer, torch.zeros_like(sources[layer]) if asked_every_layer else _grads(score, [sources[layer]])[0])
    recorder.backward_done()


def _head_means_suffice(task: ExplainTask, methods: dict, terms) -> bool:
    """Whether the pass may keep each layer's attention as its head mean only (:class:`HeadMeanRecorder`): an
    image pass whose caller does not want the attention, every gradient method reading a layer through its term
    (``terms``) and every method reading the attention itself only through its mean over heads."""
    if task.keep_attentions or not task.reduces_in_backward:
        return False
    if any(GRADIENTS in get_method(name).needs for name in methods) and not terms:
        return False
    return _reads_head_means_only(methods)


def _reads_head_means_only(methods: dict) -> bool:
    return all(ATTENTIONS not in get_method(name).needs or get_method(name).reads_head_means(params)
               for name, params in methods.items())


def keeps_head_means_only(methods: dict) -> bool:
    """Whether an image pass with these methods keeps each layer's attention as its head mean only (for the memory
    estimate; LibraGrad passes keep the attention and its gradients)."""
    if any(params.get("libragrad") for params in methods.values()):
        return False
    return not keeps_attention_gradients(methods) and _reads_head_means_only(methods)


def _whole_row(idx: torch.Tensor, n: int) -> bool:
    """Do the positions ``idx`` cover a row of ``n`` tokens in order (a sequence without padding)?"""
    return idx.numel() == n and bool((idx == torch.arange(n, device=idx.device)).all())


def _block(t: torch.Tensor, row: int, idx: torch.Tensor) -> torch.Tensor:
    """Batch row ``row`` of a (B, ..., N, N) tensor, restricted to the token positions ``idx``: (1, ..., n, n)."""
    return t[row:row + 1].index_select(-2, idx).index_select(-1, idx)


def _grads(score: torch.Tensor, tensors: list, retain: bool = True) -> list:
    grads = torch.autograd.grad(score, tensors, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(tensors, grads)]


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


# ------------------------------------------------------------------------------------------ images
class ImageTask(ExplainTask):
    """A batch of preprocessed images (B, 3, H, W): the methods see the whole batch as one view.

    Targets are class logits; the gradient starts from the pixels; rollout-style maps are read with
    the model's own token readout on its patch grid; Grad-CAM reads any spatial layer.
    """

    def __init__(self, model: ImageModel, x: torch.Tensor, target=None):
        model.check_input(x)
        self.model, self.x, self.target = model, x, target
        self.input_size = tuple(x.shape[-2:])
        # baselines need a grid on models without attention too: a 16-pixel grid, like a ViT's patches
        # (at least one cell, for inputs smaller than 16 pixels)
        self.grid = model.grid(self.input_size) if model.has_attention \
            else (max(1, self.input_size[0] // 16), max(1, self.input_size[1] // 16))
        self.targets = None

    def leaf(self):
        return self.x.detach()

    def forward(self, leaf):
        return self.model.logits(leaf)

    def scores(self, output, lrp=False):
        if self.targets is None:
            self.targets = resolve_targets(self.model, output.detach(), self.target)
        return output.gather(1, self.targets)

    def layer_score(self, hidden, pool, slot):
        return self.model.layer_logits(hidden, pool).gather(1, self.targets[:, slot:slot + 1]).sum()

    def views(self, captured, slot=0):
        readout = captured.readout  # per image, when the head's pooling depends on it
        if captured.attentions and readout is None:
            first = captured.attentions[0]
            readout = self.model.readout_weights(first.shape[-1], device=first.device, dtype=first.dtype)
        return [replace(captured, readout=readout, grid=self.grid, inputs=self.x.detach())]

    def lrp_views(self, leaf, grad, key, slot=0):
        return [Captured([], None, None, self.model.num_prefix_tokens, self.grid, inputs=leaf,
                         input_relevance={key: (leaf, grad)})]

    def score_rows(self, x, rows):
        return self.model.logits(x).gather(1, self.targets[rows])

    def baselines(self):
        _, fills = self.perturbation_inputs()
        return {"zero": torch.zeros((), device=self.x.device, dtype=self.x.dtype),
                "black": fills["black"].view(1, -1, 1, 1)}

    def input_views(self, leaf, values, slot=0):
        return [(leaf, values)]

    def default_cam_layers(self):
        return self.model.default_cam_layers()

    def cam_spatial(self, activation, layer):
        return self.model.cam_spatial(activation, self.grid, layer)

    def perturbation_inputs(self):
        x = self.x.detach()
        mean = torch.tensor(self.model.preprocess.mean, dtype=torch.float64)
        std = torch.tensor(self.model.preprocess.std, dtype=torch.float64)
        # the normalised value of a 0 ('black') pixel; the preprocessing's mean colour is 0
        fills = {"black": ((0 - mean) / std).to(device=x.device, dtype=x.dtype),
                 "mean": torch.zeros(len(mean), device=x.device, dtype=x.dtype)}
        return x, fills


@dataclass
class BatchResult:
    """Everything one image batch produced.

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


def run_batch(model: ImageModel, x: torch.Tensor, methods: dict, target=None, precision="fp32") -> BatchResult:
    """Explain one preprocessed image batch with every requested method.

    Parameters
    ----------
    model : ImageModel
    x : Tensor
        (B, 3, H, W) preprocessed images on the model's device.
    methods : dict
        method name -> resolved parameter dict.
    target : see :func:`resolve_targets`.
    precision : str
        ``'fp32'`` (default), ``'bf16'`` or ``'fp16'``: the dtype the model computes in (autocast);
        with bf16 / fp16 maps and logits are float32. See :func:`check_precision` and :func:`run_task`.
    """
    task = ImageTask(model, x, target)
    result = run_task(task, methods, precision)
    patch_maps = {name: torch.stack(result.maps[name][0], dim=1) for name in methods}
    extras = {name: {"relevance_sum": patch_maps[name].flatten(2).sum(2), "target_logit": values}
              for name, values in result.lrp_values.items()}
    return BatchResult(result.output, task.targets, patch_maps, task.grid, task.input_size, extras)


__all__ = ["BatchResult", "ExplainTask", "ImageTask", "PRECISIONS", "PassResult", "check_precision", "plan",
           "precision_name", "resolve_targets", "run_batch", "run_task"]
