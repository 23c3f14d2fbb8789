"""What a user typed, parsed and checked: one copy for ``vitlens``, ``vitlens text`` and the Python API.

Every check here raises a :class:`~vitlens.errors.VitlensError` subclass with a one-line message
naming the problem, and writes nothing, so a command can run all of them before it creates its
output directory. This module imports neither command-line module (``vitlens.cli`` imports
``vitlens.text.cli``, which needs only this module) nor the ``vitlens`` package itself (the API
imports this module); torch and matplotlib are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from vitlens.devices import select_device
from vitlens.errors import MethodError, OutputError, TargetError, UsageError

#: target words every model understands (see ``vitlens.engine.resolve_targets``)
PREDICTED = ("pred", "predicted", "top1")


# ------------------------------------------------------------------------------ method parameters
def parse_value(text: str):
    """A --param value: JSON when it parses (numbers, lists, true/false), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(items, option: str = "--param", form: str = "METHOD.NAME=VALUE",
                 example: str = "rollout.discard_ratio=0.9") -> dict:
    """``['rollout.discard_ratio=0.9', 'legrad.layers=last2']`` -> ``{'rollout': {'discard_ratio': 0.9}, ...}``.

    Only the form is checked here (``--metric-param`` uses it too); see :func:`parse_method_params`.
    """
    params: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        method, dot, name = key.rpartition(".")
        if not sep or not dot or not method or not name:
            raise MethodError(f"{option} '{item}' must look like {form} (e.g. {example})")
        params.setdefault(method, {})[name] = parse_value(value)
    return params


def parse_method_params(items, option: str = "--param") -> dict:
    """:func:`parse_params` for explanation methods, every value checked against its method's declaration.

    An unknown method, an unknown parameter or a value out of range is an error here, before any
    model is loaded; the values come back as the methods take them (``2`` for a float becomes ``2.0``).
    """
    from vitlens.methods import get_method

    return {method: get_method(method).check(values) for method, values in parse_params(items, option).items()}


def check_params_requested(params, methods, option: str = "--param", among: str = "--methods") -> None:
    """Parameters given for a method that will not run are a mistake (a typo in either list), not ignored."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise MethodError(f"{option} must be a dict of method -> {{parameter: value}}, got a {type(params).__name__}")
    unknown = [name for name in params if name not in methods]
    if unknown:
        names = ", ".join(f"'{name}'" for name in unknown)
        raise MethodError(f"{option} for {names}, which {'is' if len(unknown) == 1 else 'are'} not among {among} "
                          f"({', '.join(methods) or 'none'})")


# ------------------------------------------------------------------------------ targets
def parse_target(text: str | None, model=None):
    """CLI target: pred | INDEX | NAME | topK | label | comma-separated indices/names (several per image).

    With ``model``, a text that is one of its class names (or prompts) as a whole stays one target even
    when it holds commas: ImageNet's ``hook, claw`` or a prompt ``a dog, running`` is not two classes.
    """
    if text is None:
        return None
    text = text.strip()
    if "," in text and model is not None and _whole_class_name(model, text):
        return text
    if "," in text and not text.lower().startswith("top"):
        return [part.strip() for part in text.split(",") if part.strip()]
    return int(text) if text.lstrip("-").isdigit() else text


def _whole_class_name(model, text: str) -> bool:
    names = getattr(model, "class_names", None) or []
    return any(str(name).strip().lower() == text.lower() for name in names)


def class_indices(model, items) -> list[int]:
    """Class indices or names -> indices checked against the model (TargetError otherwise)."""
    return [model.check_class_index(int(t)) if str(t).lstrip("-").isdigit() else model.class_index(str(t))
            for t in items]


def check_target(model, target, allow_label: bool = False) -> None:
    """A target request the model cannot satisfy is a one-line TargetError, found before any work.

    ``target`` as :func:`parse_target` returns it (or as the API takes it): None, ``'pred'``, an
    index, a class name, ``'topK'``, or a list of them; ``'label'`` (each image's ground truth) only
    with ``allow_label``. The messages are the engine's, which resolves the same request later.
    """
    if target is None:
        return
    if isinstance(target, (list, tuple)):
        for item in target:
            check_target(model, item, allow_label)
        return
    if isinstance(target, bool):
        raise TargetError(f"cannot use {target} as a target: give an index, a name, 'pred' or 'topK'")
    if isinstance(target, int):
        model.check_class_index(target)
        return
    if not isinstance(target, str):
        return  # tensors and other per-image requests are checked when the batch is resolved
    text = target.strip()
    word = text.lower()
    if word in PREDICTED or (allow_label and word == "label"):
        return
    if word.startswith("top") and text[3:].isdigit():
        k = int(text[3:])
        if not 1 <= k <= model.num_classes:
            raise TargetError(f"target '{text}': k must be between 1 and {model.num_classes}")
        return
    class_indices(model, [text])


# ------------------------------------------------------------------------------ options
def check_count(value, option: str) -> int:
    """A batch size, a limit...: a whole number of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{option} must be at least 1, got {value!r}")
    return value


def check_overlay(cmap, alpha, prefix: str = "--") -> None:
    """Overlay colormap (a matplotlib name) and opacity (0..1), checked before any overlay is drawn."""
    from vitlens.render.colors import ColormapError, get_cmap

    try:
        alpha_value = float(alpha)
    except (TypeError, ValueError):
        alpha_value = float("nan")
    if not 0.0 <= alpha_value <= 1.0:  # also refuses nan
        raise UsageError(f"{prefix}alpha must be between 0 and 1, got {alpha!r}")
    try:
        get_cmap(cmap)
    except ColormapError as exc:
        raise UsageError(f"{prefix}cmap: {exc}") from None


# ------------------------------------------------------------------------------------ outputs
#: Longest side of an overlay by default: a 12000 x 9000 photo gets a 1024 x 768 overlay, not 310 MB.
OVERLAY_MAX_SIDE = 1024
#: What a run can write besides its records, and the default: all of it.
SAVE_KINDS = ("overlays", "maps", "originals")


def parse_save(save) -> tuple:
    """``'maps'``, ``'overlays,maps'``, ``'all'``, a list of kinds, or None (all) -> the kinds, in
    :data:`SAVE_KINDS` order; ``'records'`` may be named (records are always written)."""
    if save is None:
        return SAVE_KINDS
    items = save.split(",") if isinstance(save, str) else list(save)
    kinds = {str(item).strip().lower() for item in items if str(item).strip()}
    if "all" in kinds:
        return SAVE_KINDS
    unknown = sorted(kinds - set(SAVE_KINDS) - {"records"})
    if unknown:
        raise UsageError(f"--save: unknown output '{unknown[0]}' (choose from {', '.join(SAVE_KINDS)}, records, "
                         "all)")
    return tuple(kind for kind in SAVE_KINDS if kind in kinds)


#: How overlays draw signed maps (AttnLRP, CP-LRP): signed relevance centred at zero, or the positive part
SIGNED_DISPLAYS = ("signed", "positive")
#: The diverging colormap of signed overlays: red positive, blue negative, white (the photo) at zero
SIGNED_CMAP = "bwr"


def check_signed_display(value, option: str = "--signed-display") -> str:
    """``'signed'`` (diverging colours centred at zero) or ``'positive'`` (the positive part, like other maps)."""
    name = str(value).strip().lower() if isinstance(value, str) else value
    if name not in SIGNED_DISPLAYS:
        raise UsageError(f"{option} must be one of {', '.join(SIGNED_DISPLAYS)}, got {value!r}")
    return name


def check_overlay_max_side(value) -> int | None:
    """``--overlay-max-side``: a positive number of pixels, or ``full`` / 0 / None for the original size."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("full", "0")):
        return None
    try:
        side = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--overlay-max-side must be a number of pixels or 'full', got '{value}'") from None
    if side < 0 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise UsageError(f"--overlay-max-side must be a number of pixels or 'full', got '{value}'")
    return side or None


def check_out_dir(path) -> Path:
    """Fail early, in one line, when ``path`` could not become an output directory, without creating it.

    Nothing is created: a mistake found later (a target the model does not have...) leaves no empty
    directory behind. The probe file lives for an instant in the nearest directory that exists.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path '{path}' exists and is not a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create output directory '{path}': '{existing}' is not a directory")
    try:
        handle, probe = tempfile.mkstemp(prefix=".vitlens-write-test-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write into output directory '{path}': {exc.strerror or exc}") from None
    return path


__all__ = ["check_count", "check_out_dir", "check_overlay", "check_params_requested", "check_target",
           "class_indices", "parse_method_params", "parse_params", "parse_target", "parse_value", "select_device"]


# ------------------------------------------------------------------------------ CLIP-style prompts
def prompt_options(args) -> dict:
    """``--prompt`` / ``--classes`` / ``--template`` as ``load_model`` keywords (``prompts``, ``classes``,
    ``template``), checked without a model. ``--classes`` is a file with one class name per line (blank
    lines skipped) when such a file exists, else a comma-separated list."""
    prompts, classes, template = (getattr(args, name, None) for name in ("prompt", "classes", "template"))
    if prompts is not None and classes is not None:
        raise UsageError("give --prompt (the prompts themselves) or --classes (filled into --template), not both")
    if template is not None and classes is None:
        raise UsageError("--template needs --classes: the class names it is filled with")
    if template is not None and "{}" not in template:
        raise UsageError(f"--template {template!r} has no {{}} for the class name")
    options = {}
    if prompts is not None:
        if any(not p.strip() for p in prompts):
            raise UsageError("--prompt must be a non-empty text")
        options["prompts"] = list(prompts)
    if classes is not None:
        if os.path.isfile(classes):
            names = [line.strip() for line in Path(classes).read_text().splitlines() if line.strip()]
        else:
            names = [name.strip() for name in classes.split(",")]
        if not names or any(not name for name in names):
            raise UsageError(f"--classes {classes!r}: give a file with one class name per line or a comma-separated "
                             "list of non-empty names")
        options["classes"] = names
        if template is not None:
            options["template"] = template
    return options


def check_prompts_given(model) -> None:
    """A CLIP-style model loaded without prompts has no classes to explain: a one-line usage error."""
    if getattr(model, "prompt_embeddings", False) is None:
        raise UsageError(f"{model.kind} is explained for text prompts: give --prompt TEXT (repeatable) or "
                         "--classes FILE_OR_LIST (with --template)")
