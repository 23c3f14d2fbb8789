"""Explanation methods: pure functions of captured tensors, and the registry that names them.

Each method declares what it needs from the model run (``needs``): the engine captures exactly
that, once per batch, and hands the same tensors to every method.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Mapping

from vitlens.errors import MethodError
from vitlens.methods.attention_gradcam import attention_gradcam
from vitlens.methods.baselines import center_map, random_map
from vitlens.methods.chefer import chefer_rollout, chefer_term
from vitlens.methods.common import FILLS, SCORES, Captured, minmax, to_pixels
from vitlens.methods.gmar import gmar, gmar_term
from vitlens.methods.gmar_pp import gmar_plus_plus, gmar_plus_plus_term
from vitlens.methods.gradcam import gradcam, gradcam_pp, layercam, xgradcam
from vitlens.methods.gradients import (IG_BASELINES, IG_RULES, SALIENCY_REDUCTIONS, available_baselines,
                                       input_x_gradient, integrated_gradients, saliency)
from vitlens.methods.legrad import legrad, resolve_layers
from vitlens.methods.lrp import attnlrp, cp_lrp
from vitlens.methods.occlusion import occlusion
from vitlens.methods.rise import rise
from vitlens.methods.rollout import attention_rollout, raw_attention
from vitlens.methods.transformer_attribution import transformer_attribution

ATTENTIONS = "attentions"
GRADIENTS = "gradients"  # d(target logit)/dA per layer
LAYER_GRADIENTS = "layer_gradients"  # LeGrad: d(layer score)/dA of the same layer
CAM = "cam"  # activations of target layers and d(target logit)/d(activations)
LRP = "lrp"  # a separate pass with LRP rules: input and its modified gradient
#: LRP relevance at every attention map, from one relevance pass with Chefer's rules (``vitlens.lrp.chefer``)
ATTENTION_RELEVANCE = "attention_relevance"
#: model-agnostic: the method is called as ``function(inputs, score_fn, fills, **params)`` with the input batch,
#: a batched no-grad scorer of perturbed copies and the fill colours, and returns (B, K, H, W) maps for every
#: target slot at once (images only; see ``engine._perturbation_pass``)
PERTURB = "perturbation"
#: d(target score)/d(input) at the leaf, from the shared pass's backward (``Captured.input_gradient``)
INPUT_GRADIENT = "input_gradient"
#: gradients on inputs the method builds itself: called as ``function(inputs, score_fn, baselines, num_targets,
#: **params)`` with the leaf, a scorer with the graph ``score_fn(x, rows) -> (len(rows), K)`` of copies of the
#: batch rows ``rows`` and the task's baselines; returns (B, K, *inputs.shape[1:]) element-wise attributions,
#: which the engine sums over the channels of each view (see ``engine._path_pass``)
PATH_GRADIENTS = "path_gradients"

#: the kinds of values a parameter can take (see :class:`Param`)
PARAM_KINDS = ("float", "int", "choice", "layer", "layers", "module_names", "bool")


def show_value(value) -> str:
    """A value as a user would type it: strings quoted, numbers and lists as they are."""
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Param:
    """The values one method parameter accepts: checked when a request is parsed, listed by ``vitlens methods``.

    ``kind`` is one of

    * ``float``: a finite number (an int is taken as a float) within ``low``/``high``;
    * ``int``: a whole number within ``low``/``high``;
    * ``choice``: one of ``choices``;
    * ``layer``: one attention layer by index, negative counting from the end (the model's depth is
      checked by :func:`check_params_for_model`);
    * ``layers``: LeGrad's layer selection: ``'all'``, ``'lastN'``, an int N (the last N layers), or
      layer indices as a list or a comma-separated string (see :func:`resolve_layers`);
    * ``module_names``: Grad-CAM target layers by module name (``'default'``, ``'blocks.11.norm1'``,
      a comma-separated string or a list); the names are checked against the model;
    * ``bool``: True or False (``true`` / ``false`` on a command line), nothing else.

    ``low_open`` / ``high_open`` make a bound exclusive.
    """

    kind: str
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()

    def __post_init__(self):
        if self.kind not in PARAM_KINDS:
            raise ValueError(f"unknown parameter kind {self.kind!r}: expected one of {', '.join(PARAM_KINDS)}")

    def allowed(self) -> str:
        """What the parameter accepts, in words: ``a number in [0, 1)``, ``one of mean, max, min``..."""
        if self.kind in ("float", "int"):
            noun = "a number" if self.kind == "float" else "an integer"
            if self.low is not None and self.high is not None:
                return (f"{noun} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                        f"{')' if self.high_open else ']'}")
            if self.low is not None:
                return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
            if self.high is not None:
                return f"{noun} {'<' if self.high_open else '<='} {self.high:g}"
            return noun
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "layer":
            return "a layer index (negative counts from the end)"
        if self.kind == "layers":
            return "'all', 'lastN', N (the last N layers) or layer indices ('3,5' or [3, 5])"
        if self.kind == "bool":
            return "true or false"
        return "'default' or module names (comma-separated, or a list)"

    def validate(self, method: str, name: str, value):
        """``value`` as the method takes it (ints become floats for ``float``), or a one-line MethodError."""
        checked = self._checked(value)
        if checked is _INVALID:
            raise MethodError(f"method '{method}': {name} must be {self.allowed()}, got {show_value(value)}")
        return checked

    def _checked(self, value):
        if self.kind in ("float", "int", "layer"):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                return _INVALID
            if self.kind != "float":
                # 2.0 typed where 2 was meant is fine; 2.5 layers is not
                if not float(value).is_integer():
                    return _INVALID
                value = int(value)
            else:
                value = float(value)
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                return _INVALID
            if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
                return _INVALID
            return value
        if self.kind == "choice":
            return value if isinstance(value, str) and value in self.choices else _INVALID
        if self.kind == "layers":
            return _checked_layers(value)
        if self.kind == "bool":
            return value if isinstance(value, bool) else _INVALID
        return _checked_module_names(value)


_INVALID = object()


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _checked_layers(value):
    if value is None or value == "all":
        return value
    if _is_int(value):
        return int(value) if value >= 1 else _INVALID
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("last"):
            count = text[4:].strip(" -_:")
            return value if count.isdigit() and int(count) >= 1 else _INVALID
        parts = [part.strip() for part in text.split(",")]
        return value if parts and all(part.lstrip("-").isdigit() for part in parts) else _INVALID
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
        return [int(v) for v in value]
    return _INVALID


def _checked_module_names(value):
    if value is None or value == "default":
        return value
    if isinstance(value, str):
        return value if all(part.strip() for part in value.split(",")) else _INVALID
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return list(value)
    return _INVALID


def module_names(value) -> list:
    """A ``module_names`` value as a list of names (empty for the default)."""
    if value in (None, "default"):
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)


def _per_head(params: Mapping) -> bool:
    return False


def _head_means(params: Mapping) -> bool:
    return True


def _mean_fused(params: Mapping) -> bool:
    return params.get("head_fusion", "mean") == "mean"


@dataclass(frozen=True)
class MethodSpec:
    """A named method: its function, what it needs captured, its default parameters and what each accepts."""

    name: str
    function: Callable
    needs: frozenset
    class_specific: bool
    defaults: dict = field(default_factory=dict)
    summary: str = ""
    #: signed maps (relevance): overlays show the positive part, a diverging rendering shows both
    signed: bool = False
    #: parameter name -> :class:`Param`; a parameter without one is passed on unchecked
    declared: dict = field(default_factory=dict)
    #: ``term(attention, gradient, **params)``: all the method reads of each layer's gradient (with the
    #: parameters named in ``term_params``), read through :func:`~vitlens.methods.common.terms_of`; lets the
    #: engine reduce each gradient as the backward produces it instead of keeping them all
    layer_term: Callable | None = None
    term_params: tuple = ()
    #: ``reads_head_means(params)``: with these parameters the method reads each layer's attention only through its
    #: mean over heads, its ``layer_term`` or LeGrad's layer gradients, never one head on its own; the engine may
    #: then keep the head means alone (:class:`~vitlens.models.capture.HeadMeanRecorder`)
    reads_head_means: Callable = _per_head

    def check(self, overrides: Mapping | None) -> dict:
        """The given parameters, each checked against its declaration (one-line MethodError otherwise)."""
        if overrides is None:
            return {}
        if not isinstance(overrides, Mapping):
            raise MethodError(f"parameters of method '{self.name}' must be a dict of NAME: VALUE, "
                              f"got a {type(overrides).__name__}")
        checked = {}
        for key, value in overrides.items():
            if key not in self.defaults:
                valid = ", ".join(sorted(self.defaults)) or "none"
                raise MethodError(f"method '{self.name}' has no parameter '{key}' (parameters: {valid})")
            param = self.declared.get(key)
            checked[key] = param.validate(self.name, key, value) if param is not None else value
        return checked

    def params(self, overrides: Mapping | None = None) -> dict:
        """The defaults with ``overrides`` applied, every override checked."""
        return {**self.defaults, **self.check(overrides)}


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    REGISTRY[spec.name] = spec
    return spec


START_LAYER = Param("layer", "first layer of the product (earlier layers are skipped)")
RESIDUAL = Param("float", "weight of the identity added to each layer's attention (the residual path)", low=0)
HEAD_NORM = Param("choice", "norm of each head's gradient that weighs the heads", choices=("l1", "l2"))
CONV_GAMMA = Param("float", "Gamma rule strength of Conv2d layers (0: the plain LRP-0 rule)", low=0)
LIN_GAMMA = Param("float", "Gamma rule strength of Linear layers (0: the plain LRP-0 rule)", low=0)
ATTENTION_GAMMA = Param("bool", "Gamma(lin_gamma) also on the attention's q/k/v and output projections; false: "
                                "LRP-0 there, as LXT's torchvision setup")
LRP_DEFAULTS = {"conv_gamma": 1.0, "lin_gamma": 0.5, "attention_gamma": True}
LRP_DECLARED = {"conv_gamma": CONV_GAMMA, "lin_gamma": LIN_GAMMA, "attention_gamma": ATTENTION_GAMMA}
CAM_LAYERS = Param("module_names", "target layer(s), several are fused; None: the last block's norm of a ViT, the "
                                   "last spatial layer of a CNN")

register(MethodSpec("attention", raw_attention, frozenset({ATTENTIONS}), False, {"layer": -1},
                    "raw last-layer attention of the class token, mean over heads (baseline)",
                    declared={"layer": Param("layer", "the layer whose attention is shown")},
                    reads_head_means=_head_means))
register(MethodSpec("rollout", attention_rollout, frozenset({ATTENTIONS}), False,
                    {"head_fusion": "mean", "discard_ratio": 0.0, "start_layer": 0, "residual": 1.0},
                    "attention rollout (Abnar & Zuidema 2020)",
                    declared={"head_fusion": Param("choice", "how each layer's heads are combined",
                                                   choices=("mean", "max", "min")),
                              "discard_ratio": Param("float", "share of the weakest patch-to-patch attention set to "
                                                              "zero in each layer", low=0, high=1, high_open=True),
                              "start_layer": START_LAYER, "residual": RESIDUAL},
                    reads_head_means=_mean_fused))
register(MethodSpec("gmar-l1", gmar, frozenset({ATTENTIONS, GRADIENTS}), True,
                    {"norm": "l1", "residual": 1.0, "start_layer": 0},
                    "gradient-weighted head rollout, L1 head norms (Jo et al. 2025)",
                    declared={"norm": HEAD_NORM, "residual": RESIDUAL, "start_layer": START_LAYER},
                    layer_term=gmar_term, term_params=("norm",), reads_head_means=_head_means))
register(MethodSpec("gmar-l2", gmar, frozenset({ATTENTIONS, GRADIENTS}), True,
                    {"norm": "l2", "residual": 1.0, "start_layer": 0},
                    "gradient-weighted head rollout, L2 head norms (Jo et al. 2025)",
                    declared={"norm": HEAD_NORM, "residual": RESIDUAL, "start_layer": START_LAYER},
                    layer_term=gmar_term, term_params=("norm",), reads_head_means=_head_means))
register(MethodSpec("gmar++", gmar_plus_plus, frozenset({ATTENTIONS, GRADIENTS}), True,
                    {"norm": "l2", "residual": 1.0, "normalize": "none", "start_layer": 0},
                    "positive gradients x attention, per-layer head weights, residual rollout",
                    declared={"norm": HEAD_NORM, "residual": RESIDUAL, "start_layer": START_LAYER,
                              "normalize": Param("choice", "'layer' divides each layer's weighted attention by its "
                                                           "mean row sum", choices=("none", "layer"))},
                    layer_term=gmar_plus_plus_term, term_params=("norm", "normalize"),
                    reads_head_means=_head_means))
register(MethodSpec("legrad", legrad, frozenset({ATTENTIONS, LAYER_GRADIENTS}), True,
                    {"layers": "all", "pool": "model"},
                    "per-layer gradient of per-layer scores (Bousselham et al. 2025)",
                    declared={"layers": Param("layers", "the layers whose scores are explained and averaged"),
                              "pool": Param("choice", "read each layer's score as the model pools, or from the "
                                                      "mean of all tokens", choices=("model", "mean"))},
                    reads_head_means=_head_means))
register(MethodSpec("chefer", chefer_rollout, frozenset({ATTENTIONS, GRADIENTS}), True,
                    {"start_layer": 0},
                    "gradient x attention rollout (Chefer et al., ICCV 2021)",
                    declared={"start_layer": START_LAYER}, layer_term=chefer_term, reads_head_means=_head_means))

for _name, _fn, _summary in (
    ("gradcam", gradcam, "Grad-CAM: channels weighted by mean gradients (Selvaraju et al. 2017)"),
    ("gradcam++", gradcam_pp, "Grad-CAM++: positive-gradient weights, closed form (Chattopadhay et al. 2018)"),
    ("xgradcam", xgradcam, "XGrad-CAM: activation-normalised gradient weights (Fu et al. 2020)"),
    ("layercam", layercam, "LayerCAM: element-wise positive-gradient weights (Jiang et al. 2021)"),
):
    register(MethodSpec(_name, _fn, frozenset({CAM}), True, {"layers": None}, _summary,
                        declared={"layers": CAM_LAYERS}))

register(MethodSpec("attention-gradcam", attention_gradcam, frozenset({ATTENTIONS, GRADIENTS}), True, {"layer": -1},
                    "Grad-CAM on one layer's attention, the attn_gradcam baseline of Chefer et al. (CVPR 2021)",
                    declared={"layer": Param("layer", "the layer whose attention and gradient are used")}))

#: gradient methods that read their gradients from a LibraGrad pass with ``libragrad=True`` (Mehri et al., CVPR
#: 2025; ``vitlens.lrp.libragrad``): the paper's "Libra GenAtt" (chefer), "Libra GradCAM"... (LeGrad is left out:
#: its per-layer scores read the head after the forward, outside the pass's rules)
LIBRAGRAD_METHODS = ("gmar-l1", "gmar-l2", "gmar++", "chefer", "attention-gradcam", "gradcam", "gradcam++",
                     "xgradcam", "layercam")
LIBRAGRAD = Param("bool", "read the gradients from a LibraGrad pass (balanced gradient flow, Mehri et al. 2025)")
for _name in LIBRAGRAD_METHODS:
    REGISTRY[_name].defaults["libragrad"] = False
    REGISTRY[_name].declared["libragrad"] = LIBRAGRAD

PERTURB_SCORE = Param("choice", "the target score of each perturbed copy: softmax probability or logit",
                      choices=SCORES)
PERTURB_BATCH = Param("int", "perturbed images per forward pass (bounds memory)", low=1)
register(MethodSpec("rise", rise, frozenset({PERTURB}), True,
                    {"masks": 1000, "cells": 7, "keep": 0.5, "seed": 0, "mask_batch": 64, "score": "probability",
                     "baseline": "black"},
                    "RISE: scores of randomly masked copies, averaged per pixel (Petsiuk et al. 2018)",
                    declared={"masks": Param("int", "number of random masks N", low=1),
                              "cells": Param("int", "the masks' coarse grid is cells x cells", low=1),
                              "keep": Param("float", "probability that a grid cell is kept", low=0, high=1,
                                            low_open=True),
                              "seed": Param("int", "random seed (the same masks for every image)"),
                              "mask_batch": PERTURB_BATCH, "score": PERTURB_SCORE,
                              "baseline": Param("choice", "hidden pixels: black (the paper), or the "
                                                          "normalisation mean colour", choices=FILLS)}))
register(MethodSpec("occlusion", occlusion, frozenset({PERTURB}), True,
                    {"window": 32, "stride": 16, "baseline": "mean", "score": "probability", "mask_batch": 64},
                    "occlusion: score drop when a sliding window is hidden (Zeiler & Fergus 2014)",
                    declared={"window": Param("int", "side of the square window, in input pixels", low=1),
                              "stride": Param("int", "step between windows, in input pixels", low=1),
                              "baseline": Param("choice", "hidden pixels: the normalisation mean colour "
                                                          "(0 in input space), or black", choices=FILLS),
                              "score": PERTURB_SCORE, "mask_batch": PERTURB_BATCH}))

register(MethodSpec("attnlrp", attnlrp, frozenset({LRP}), True, dict(LRP_DEFAULTS),
                    "AttnLRP (Achtibat et al. 2024) with Gamma rules, signed pixel relevance", signed=True,
                    declared=dict(LRP_DECLARED)))
register(MethodSpec("cp-lrp", cp_lrp, frozenset({LRP}), True, dict(LRP_DEFAULTS),
                    "CP-LRP: relevance through the values only, Gamma rules, signed pixel relevance", signed=True,
                    declared=dict(LRP_DECLARED)))
register(MethodSpec("transformer-attribution", transformer_attribution,
                    frozenset({ATTENTIONS, GRADIENTS, ATTENTION_RELEVANCE}), True, {"start_layer": 1},
                    "LRP relevance x gradient of each attention map, rolled out (Chefer et al., CVPR 2021)",
                    declared={"start_layer": START_LAYER}))
register(MethodSpec("saliency", saliency, frozenset({INPUT_GRADIENT}), True, {"reduce": "max"},
                    "saliency: |d score / d input| reduced over channels (Simonyan et al. 2014)",
                    declared={"reduce": Param("choice", "how the channels of |gradient| at a pixel / token are "
                                                        "reduced: max (the paper), l2 norm (inseq), sum",
                                              choices=SALIENCY_REDUCTIONS)}))
register(MethodSpec("input-x-gradient", input_x_gradient, frozenset({INPUT_GRADIENT}), True, {},
                    "input x gradient summed over channels, signed (Shrikumar et al. 2016)", signed=True))
register(MethodSpec("integrated-gradients", integrated_gradients, frozenset({PATH_GRADIENTS}), True,
                    {"steps": 50, "baseline": "zero", "method": "gausslegendre", "batch": 64},
                    "integrated gradients from a baseline, captum's (Sundararajan et al. 2017), signed", signed=True,
                    declared={"steps": Param("int", "integration points (captum's n_steps)", low=1),
                              "baseline": Param("choice", "reference input: zero (images: the mean colour, text: "
                                                          "zero embeddings), black (images), unk (text: the "
                                                          "unknown token at every position, EOS kept: inseq's)",
                                                choices=IG_BASELINES),
                              "method": Param("choice", "captum's quadrature rule", choices=IG_RULES),
                              "batch": Param("int", "interpolated inputs per forward pass (captum's "
                                                    "internal_batch_size; bounds memory)", low=1)}))
register(MethodSpec("random", random_map, frozenset(), False, {"seed": 0},
                    "baseline: uniform noise per patch, seeded per image",
                    declared={"seed": Param("int", "random seed (mixed with each image's fingerprint)")}))
register(MethodSpec("center", center_map, frozenset(), False, {"sigma": 0.25},
                    "baseline: centred Gaussian (centre bias)",
                    declared={"sigma": Param("float", "spread as a share of the grid's longer side", low=0,
                                             low_open=True)}))
BASELINES = ("random", "center")

#: what ``all`` expands to for transformers and for CNNs, in display order
DEFAULT_METHODS = ("attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "gradcam", "gradcam++",
                   "attnlrp")
CNN_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam")


def get_method(name: str) -> MethodSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown method '{name}': choose from {', '.join(REGISTRY)}") from None


def expand_methods(methods, everything, check=None) -> list[str]:
    """``'all'``, a comma-separated string or a list -> validated method names (order kept, no repeats).

    ``everything`` is what ``all`` expands to; ``check(name, spec)`` may raise for a method the
    model cannot run.
    """
    if methods is None:
        methods = "all"
    if isinstance(methods, str):
        methods = methods.split(",")
    try:
        methods = list(methods)
    except TypeError:
        methods = [methods]
    if not all(isinstance(m, str) for m in methods):
        shown = methods[0] if len(methods) == 1 else methods
        raise MethodError(f"methods must be 'all', a comma-separated string or a list of names, got {shown!r}")
    names = []
    for raw in methods:
        name = raw.strip()
        if not name:
            continue
        for expanded in (everything if name == "all" else (name,)):
            spec = get_method(expanded)
            if check is not None:
                check(expanded, spec)
            if expanded not in names:
                names.append(expanded)
    if not names:
        raise MethodError("no methods given")
    return names


def check_params_for_model(methods: Mapping, num_layers: int | None, model=None) -> None:
    """One-line MethodError for parameter values the model cannot take, before anything runs or is written.

    ``methods`` maps method names to their (checked) parameters. Layer indices and LeGrad's layer
    selection are checked against ``num_layers`` (the model's attention layers; None skips them),
    and with ``model`` (an adapter) Grad-CAM target layer names against its modules.
    """
    if model is not None:
        check_baselines(methods, model)
    for name, params in methods.items():
        spec = get_method(name)
        if model is not None and (params or {}).get("libragrad"):
            from vitlens.lrp.libragrad import libragrad_refusal

            if libragrad_refusal(model):
                raise MethodError(f"method '{name}': libragrad: {libragrad_refusal(model)}")
        for key, value in (params or {}).items():
            param = spec.declared.get(key)
            if param is None:
                continue
            if param.kind == "layer" and num_layers is not None and not -num_layers <= value < num_layers:
                raise MethodError(f"method '{name}': {key}={value} is beyond the model's {num_layers} layers "
                                  f"(0 to {num_layers - 1}, or -1 to -{num_layers} from the end)")
            if param.kind == "layers" and num_layers is not None:
                try:
                    resolve_layers(value, num_layers)
                except MethodError as exc:
                    raise MethodError(f"method '{name}': {exc}") from None
            if param.kind == "module_names" and model is not None and module_names(value):
                for layer in module_names(value):
                    try:
                        _check_cam_layer(model, layer)
                    except MethodError as exc:
                        raise MethodError(f"method '{name}': {exc}") from None


def check_baselines(methods: Mapping, model) -> None:
    """One-line MethodError for an integrated-gradients baseline the model's input does not have (black pixels for
    text, the unknown token for images or a tokenizer without one), or for a plain text encoder (its objective is
    not re-scored at interpolated inputs), before anything runs."""
    for name, params in methods.items():
        baseline = (params or {}).get("baseline")
        if PATH_GRADIENTS in get_method(name).needs and hasattr(model, "text_family") and not model.is_classifier:
            raise MethodError(f"method '{name}' explains a target score of a classifier or a causal decoder; a plain "
                              "encoder's objective is not re-scored at interpolated inputs")
        if PATH_GRADIENTS in get_method(name).needs and baseline is not None:
            available = available_baselines(model)
            if baseline not in available:
                raise MethodError(f"method '{name}': baseline={baseline!r} is not available for this input: use "
                                  f"{', '.join(available)}")


def _check_cam_layer(model, layer: str) -> None:
    """A Grad-CAM target layer the model has: the adapter's own check where it has one (CNNs also
    know from a dry run whether the layer's output maps onto the image), else the name alone."""
    check = getattr(model, "check_cam_layer", None)
    if check is not None:
        check(layer)
        return
    from vitlens.models.layers import find_module

    find_module(model.module, layer, model.spatial_layer_names())


def parse_methods(methods, model=None) -> list[str]:
    """Method names for an image model: see :func:`expand_methods`.

    With a ``model``, ``all`` means the methods that apply to it: a method that needs attention is
    refused for a model without any (a CNN), and so is one the model's adapter cannot run
    (``model.unsupported_methods()``, e.g. LeGrad on a model whose head vitlens cannot trace). A model
    without attention maps may still run AttnLRP / CP-LRP (``model.lrp_supported``: Swin's window attention).
    """
    has_attention = getattr(model, "has_attention", True)
    lrp_supported = bool(getattr(model, "lrp_supported", has_attention))
    usable = CNN_METHODS + (("attnlrp", "cp-lrp") if lrp_supported else ())
    refused = dict(model.unsupported_methods()) if model is not None and has_attention else {}
    if "attnlrp" in refused:  # the relevance pass needs the same rules on the model as AttnLRP
        for name, spec in REGISTRY.items():
            if ATTENTION_RELEVANCE in spec.needs:
                refused.setdefault(name, f"its LRP relevance pass is refused as AttnLRP is: {refused['attnlrp']}")

    def check(name, spec):
        if not has_attention and (ATTENTIONS in spec.needs or LAYER_GRADIENTS in spec.needs
                                  or (LRP in spec.needs and not lrp_supported)):
            raise MethodError(
                f"method '{name}' needs attention maps, which this {type(model.module).__name__} does not "
                f"have: use {', '.join(usable)}"
            )
        if name in refused:
            raise MethodError(f"method '{name}': {refused[name]}")

    # 'all' without attention maps: the CAM methods, and AttnLRP where it runs (as 'all' of a ViT has it)
    default = DEFAULT_METHODS if has_attention else CNN_METHODS + (("attnlrp",) if lrp_supported else ())
    everything = [name for name in default if name not in refused]
    return expand_methods(methods, everything, check)


__all__ = [
    "ATTENTIONS",
    "ATTENTION_RELEVANCE",
    "BASELINES",
    "CAM",
    "CNN_METHODS",
    "Captured",
    "DEFAULT_METHODS",
    "GRADIENTS",
    "INPUT_GRADIENT",
    "LAYER_GRADIENTS",
    "LRP",
    "MethodSpec",
    "PATH_GRADIENTS",
    "PERTURB",
    "Param",
    "REGISTRY",
    "check_baselines",
    "check_params_for_model",
    "expand_methods",
    "get_method",
    "minmax",
    "parse_methods",
    "register",
    "resolve_layers",
    "to_pixels",
]
