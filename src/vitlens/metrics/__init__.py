"""Evaluation metrics: faithfulness (perturbation), localisation and the randomisation sanity check.

Pure, batched functions of (model, preprocessed inputs, maps, targets, labels, boxes, masks); see
``perturbation.py``, ``localisation.py``, ``sanity.py`` and ``stats.py`` (mean and 95 % Student-t
confidence intervals). The registry below names each metric, the values it reports per image (and
whether higher is better), the curves it keeps, and what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vitlens.errors import VitlensError
from vitlens.metrics.localisation import (average_precision, box_mask, boxes_to_input, energy_in_box, mask_to_input,
                                          pointing_game, segmentation_scores)
from vitlens.metrics.perturbation import (BASELINES, PerturbationBatch, baseline_inputs, deletion, drop_increase,
                                          insertion, negative_perturbation, perturbation_metrics, positive_perturbation,
                                          trapezoid, unit_ranks)
from vitlens.metrics.sanity import SanityResult, cascading_randomization, randomization_stages, spearman, ssim
from vitlens.metrics.sensitivity import Explainer, sensitivity
from vitlens.metrics.specificity import CATDOG, LabelledBox, class_contrast, object_share, two_object_share
from vitlens.metrics.stats import Interval, mean_ci

MODEL = "model"  # forwards of perturbed images through the model
BOXES = "boxes"
MASKS = "masks"
RANDOMIZE = "randomize"  # re-explains with randomised copies of the model
REEXPLAIN = "reexplain"  # re-explains perturbed inputs or other target classes with the same model
OBJECTS = "objects"  # two labelled objects per image (metric parameter ``objects``: a JSON file)


class MetricError(VitlensError):
    """A metric request that cannot be met (unknown name, missing boxes or masks)."""


@dataclass(frozen=True)
class MetricSpec:
    """A named metric family.

    Attributes
    ----------
    name : str
    needs : frozenset
        ``model`` (perturbed forwards), ``boxes``, ``masks``, ``randomize``.
    values : dict
        per-image value name -> True when higher is better (False: lower is better; None: neither).
    curves : tuple
        Curve names kept per image (plotted as mean curves).
    defaults : dict
        Parameters and their defaults.
    summary : str
    """

    name: str
    needs: frozenset
    values: dict
    curves: tuple = ()
    defaults: dict = field(default_factory=dict)
    summary: str = ""

    def params(self, overrides: dict | None = None) -> dict:
        params = dict(self.defaults)
        for key, value in (overrides or {}).items():
            if key not in params:
                raise MetricError(f"metric '{self.name}' has no parameter '{key}' "
                                  f"(parameters: {', '.join(sorted(params)) or 'none'})")
            params[key] = value
        for key, value in params.items():
            problem = _check_value(key, value)
            if problem:
                raise MetricError(f"metric '{self.name}': {key}={value!r} {problem}")
        return params


def _check_value(key: str, value) -> str | None:
    """Why a metric parameter value is invalid, or None."""
    def whole(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    if key == "steps" and not whole(value, 1):
        return "must be a whole number >= 1"
    if key == "baseline" and value not in BASELINES:
        return f"is not a baseline (choose from {', '.join(BASELINES)})"
    if key == "score" and value not in ("prob", "logit"):
        return "must be prob or logit"
    if key == "mode" and value not in ("multiply", "top"):
        return "must be multiply or top"
    if key == "keep" and not (isinstance(value, (int, float)) and 0 < value <= 1):
        return "must be in (0, 1]"
    if key == "tolerance" and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        return "must be a number >= 0"
    if key == "images" and not whole(value, 0):
        return "must be a whole number >= 0"
    if key == "max_stages" and value is not None and not whole(value, 1):
        return "must be a whole number >= 1 (or null)"
    if key == "limit" and value is not None and not whole(value, 1):
        return "must be a whole number >= 1 (or null: every image)"
    if key == "samples" and not whole(value, 1):
        return "must be a whole number >= 1"
    if key == "radius" and not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1):
        return "must be in (0, 1] (pixel values are in [0, 1])"
    if key == "norm" and value not in ("rms", "relative"):
        return "must be rms or relative"
    if key == "objects" and value is not None and not isinstance(value, str):
        return "must be the path of a JSON file"
    return None


METRICS: dict[str, MetricSpec] = {}


def _register(spec: MetricSpec) -> None:
    METRICS[spec.name] = spec


_register(MetricSpec("deletion", frozenset({MODEL}), {"deletion_auc": False, "deletion_auc_norm": False},
                     ("deletion",), {"steps": 20, "baseline": "zero", "score": "prob"},
                     "probability vs fraction of most relevant pixels removed (RISE); AUC lower is better"))
_register(MetricSpec("insertion", frozenset({MODEL}), {"insertion_auc": True, "insertion_auc_norm": True},
                     ("insertion",), {"steps": 20, "baseline": "blur", "score": "prob"},
                     "probability vs fraction of most relevant pixels revealed (RISE); AUC higher is better"))
_register(MetricSpec("pos_perturbation", frozenset({MODEL}), {"pos_perturbation_auc": False}, ("pos_perturbation",),
                     {"baseline": "zero"},
                     "Chefer: top-1 accuracy (%) with the most relevant 10..90 % removed; AUC lower is better"))
_register(MetricSpec("neg_perturbation", frozenset({MODEL}), {"neg_perturbation_auc": True}, ("neg_perturbation",),
                     {"baseline": "zero"},
                     "Chefer: top-1 accuracy (%) with the least relevant 10..90 % removed; AUC higher is better"))
_register(MetricSpec("drop_increase", frozenset({MODEL}),
                     {"average_drop": False, "increase_confidence": True, "average_gain": True}, (),
                     {"score": "prob", "mode": "multiply", "baseline": "zero", "keep": 0.25},
                     "Grad-CAM++ Average Drop / Increase in Confidence (+ Average Gain), "
                     "explanation map = map x image"))
_register(MetricSpec("pointing_game", frozenset({BOXES}), {"pointing_game": True}, (), {"tolerance": 15.0},
                     "map maximum inside (or within tolerance px of) an object box"))
_register(MetricSpec("energy_in_box", frozenset({BOXES}), {"energy_in_box": True}, (), {},
                     "share of positive relevance inside the object boxes"))
_register(MetricSpec("segmentation", frozenset({MASKS}),
                     {"seg_pixel_accuracy": True, "seg_iou": True, "seg_miou": True, "seg_ap": True}, (), {},
                     "Chefer's protocol: threshold at the map mean; pixel accuracy, IoU, mIoU, AP against masks"))
_register(MetricSpec("sanity", frozenset({RANDOMIZE}),
                     {"sanity_spearman_head": None, "sanity_spearman_all": None,
                      "sanity_ssim_head": None, "sanity_ssim_all": None},
                     ("sanity_spearman", "sanity_ssim"), {"images": 16, "max_stages": None},
                     "cascading randomisation (Adebayo et al. 2018): similarity to the original maps; lower = the "
                     "method depends on the model"))

_register(MetricSpec("sensitivity", frozenset({REEXPLAIN}),
                     {"max_sensitivity": False, "avg_sensitivity": False, "lipschitz": False}, (),
                     {"samples": 10, "radius": 0.05, "norm": "rms", "limit": None},
                     "Yeh et al. 2019: largest / mean RMS change of the [0, 1] map under uniform pixel noise of "
                     "L-inf radius r, and the local Lipschitz estimate; lower is more robust"))
_register(MetricSpec("specificity", frozenset({REEXPLAIN}),
                     {"contrast_rank_2nd": True, "contrast_l1_2nd": True, "contrast_rank_random": True,
                      "contrast_l1_random": True}, (), {"limit": None},
                     "class contrast: 1 - Spearman and mean |difference| between the map of the explained class "
                     "and of the 2nd-ranked / a random other class; 0 = the map ignores the target"))
_register(MetricSpec("two_object", frozenset({REEXPLAIN, OBJECTS}), {"object_share": True, "object_contrast": True},
                     (), {"objects": None},
                     "two objects of different classes: share of the relevance on the explained object "
                     "(0.5 = target-independent) and its shift when the target changes (0 = independent)"))

GROUPS = {
    "faithfulness": ("deletion", "insertion", "pos_perturbation", "neg_perturbation", "drop_increase"),
    "localisation": ("pointing_game", "energy_in_box"),
    "all": ("deletion", "insertion", "pos_perturbation", "neg_perturbation", "drop_increase", "pointing_game",
            "energy_in_box", "sanity", "sensitivity", "specificity"),
    "robustness_specificity": ("sensitivity", "specificity"),
}


def get_metric(name: str) -> MetricSpec:
    try:
        return METRICS[name]
    except KeyError:
        raise MetricError(f"unknown metric '{name}': choose from {', '.join(list(METRICS) + list(GROUPS))}") from None


def parse_metrics(metrics) -> list[str]:
    """A comma-separated string or list of metric names and groups -> metric names (order kept)."""
    if metrics is None:
        metrics = "faithfulness"
    if isinstance(metrics, str):
        metrics = metrics.split(",")
    names: list[str] = []
    for raw in metrics:
        name = raw.strip()
        if not name:
            continue
        for expanded in GROUPS.get(name, (name,)):
            get_metric(expanded)
            if expanded not in names:
                names.append(expanded)
    if not names:
        raise MetricError("no metrics given")
    return names


__all__ = [
    "BASELINES",
    "CATDOG",
    "Explainer",
    "LabelledBox",
    "OBJECTS",
    "REEXPLAIN",
    "class_contrast",
    "object_share",
    "sensitivity",
    "two_object_share",
    "BOXES",
    "GROUPS",
    "Interval",
    "MASKS",
    "METRICS",
    "MODEL",
    "MetricError",
    "MetricSpec",
    "PerturbationBatch",
    "RANDOMIZE",
    "SanityResult",
    "average_precision",
    "baseline_inputs",
    "box_mask",
    "boxes_to_input",
    "cascading_randomization",
    "deletion",
    "drop_increase",
    "energy_in_box",
    "get_metric",
    "insertion",
    "mask_to_input",
    "mean_ci",
    "negative_perturbation",
    "parse_metrics",
    "perturbation_metrics",
    "pointing_game",
    "positive_perturbation",
    "randomization_stages",
    "segmentation_scores",
    "spearman",
    "ssim",
    "trapezoid",
    "unit_ranks",
]
