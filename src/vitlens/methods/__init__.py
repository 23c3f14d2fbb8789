"""Explanation methods: pure functions of captured tensors, and the registry that names them.

Each method declares what it needs from the model run (``needs``): the engine captures exactly
that, once per batch, and hands the same tensors to every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from vitlens.errors import MethodError
from vitlens.methods.baselines import center_map, random_map
from vitlens.methods.chefer import chefer_rollout
from vitlens.methods.common import Captured, minmax, to_pixels
from vitlens.methods.gmar import gmar
from vitlens.methods.gmar_pp import gmar_plus_plus
from vitlens.methods.gradcam import gradcam, gradcam_pp, layercam, xgradcam
from vitlens.methods.legrad import legrad, resolve_layers
from vitlens.methods.lrp import attnlrp, cp_lrp
from vitlens.methods.rollout import attention_rollout, raw_attention

ATTENTIONS = "attentions"
GRADIENTS = "gradients"  # d(target logit)/dA per layer
LAYER_GRADIENTS = "layer_gradients"  # LeGrad: d(layer score)/dA of the same layer
CAM = "cam"  # activations of target layers and d(target logit)/d(activations)
LRP = "lrp"  # a separate pass with LRP rules: input and its modified gradient


@dataclass(frozen=True)
class MethodSpec:
    """A named method: its function, what it needs captured, and its default parameters."""

    name: str
    function: Callable
    needs: frozenset
    class_specific: bool
    defaults: dict = field(default_factory=dict)
    summary: str = ""
    #: signed maps (relevance): overlays show the positive part, a diverging rendering shows both
    signed: bool = False

    def params(self, overrides: dict | None = None) -> dict:
        params = dict(self.defaults)
        for key, value in (overrides or {}).items():
            if key not in params:
                valid = ", ".join(sorted(params)) or "none"
                raise MethodError(f"method '{self.name}' has no parameter '{key}' (parameters: {valid})")
            params[key] = value
        return params


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    REGISTRY[spec.name] = spec
    return spec


register(MethodSpec("attention", raw_attention, frozenset({ATTENTIONS}), False, {"layer": -1},
                    "raw last-layer attention of the class token, mean over heads (baseline)"))
register(MethodSpec("rollout", attention_rollout, frozenset({ATTENTIONS}), False,
                    {"head_fusion": "mean", "discard_ratio": 0.0, "start_layer": 0, "residual": 1.0},
                    "attention rollout (Abnar & Zuidema 2020)"))
register(MethodSpec("gmar-l1", gmar, frozenset({ATTENTIONS, GRADIENTS}), True,
                    {"norm": "l1", "residual": 1.0, "start_layer": 0},
                    "gradient-weighted head rollout, L1 head norms (Jo et al. 2025)"))
register(MethodSpec("gmar-l2", gmar, frozenset({ATTENTIONS, GRADIENTS}), True,
                    {"norm": "l2", "residual": 1.0, "start_layer": 0},
                    "gradient-weighted head rollout, L2 head norms (Jo et al. 2025)"))
register(MethodSpec("gmar++", gmar_plus_plus, frozenset({ATTENTIONS, GRADIENTS}), True,
                    {"norm": "l2", "residual": 1.0, "normalize": "none", "start_layer": 0},
                    "positive gradients x attention, per-layer head weights, residual rollout"))
register(MethodSpec("legrad", legrad, frozenset({ATTENTIONS, LAYER_GRADIENTS}), True,
                    {"layers": "all", "pool": "model"},
                    "per-layer gradient of per-layer scores (Bousselham et al. 2025)"))
register(MethodSpec("chefer", chefer_rollout, frozenset({ATTENTIONS, GRADIENTS}), True,
                    {"start_layer": 0},
                    "gradient x attention rollout (Chefer et al., ICCV 2021)"))

for _name, _fn, _summary in (
    ("gradcam", gradcam, "Grad-CAM: channels weighted by mean gradients (Selvaraju et al. 2017)"),
    ("gradcam++", gradcam_pp, "Grad-CAM++: positive-gradient weights, closed form (Chattopadhay et al. 2018)"),
    ("xgradcam", xgradcam, "XGrad-CAM: activation-normalised gradient weights (Fu et al. 2020)"),
    ("layercam", layercam, "LayerCAM: element-wise positive-gradient weights (Jiang et al. 2021)"),
):
    register(MethodSpec(_name, _fn, frozenset({CAM}), True, {"layers": None}, _summary))

register(MethodSpec("attnlrp", attnlrp, frozenset({LRP}), True, {"conv_gamma": 1.0, "lin_gamma": 0.5},
                    "AttnLRP (Achtibat et al. 2024) with Gamma rules, signed pixel relevance", signed=True))
register(MethodSpec("cp-lrp", cp_lrp, frozenset({LRP}), True, {"conv_gamma": 1.0, "lin_gamma": 0.5},
                    "CP-LRP: relevance through the values only, Gamma rules, signed pixel relevance", signed=True))
register(MethodSpec("random", random_map, frozenset(), False, {"seed": 0},
                    "baseline: uniform noise per patch, seeded per image"))
register(MethodSpec("center", center_map, frozenset(), False, {"sigma": 0.25},
                    "baseline: centred Gaussian (centre bias)"))
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


def parse_methods(methods, model=None) -> list[str]:
    """Method names for an image model: see :func:`expand_methods`.

    With a ``model``, ``all`` means the methods that apply to it and a method that needs attention
    is refused for a model without any (a CNN).
    """
    has_attention = getattr(model, "has_attention", True)

    def check(name, spec):
        if not has_attention and (ATTENTIONS in spec.needs or LAYER_GRADIENTS in spec.needs or LRP in spec.needs):
            raise MethodError(
                f"method '{name}' needs attention maps, which this {type(model.module).__name__} does not "
                f"have: use {', '.join(CNN_METHODS)}"
            )

    return expand_methods(methods, DEFAULT_METHODS if has_attention else CNN_METHODS, check)


__all__ = [
    "ATTENTIONS",
    "BASELINES",
    "CAM",
    "CNN_METHODS",
    "Captured",
    "DEFAULT_METHODS",
    "GRADIENTS",
    "LAYER_GRADIENTS",
    "LRP",
    "MethodSpec",
    "REGISTRY",
    "expand_methods",
    "get_method",
    "minmax",
    "parse_methods",
    "register",
    "resolve_layers",
    "to_pixels",
]
