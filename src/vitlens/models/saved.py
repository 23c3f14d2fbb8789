"""A model folder written by ``vitlens finetune``: ``vitlens_model.json`` beside the weights and ``class_index.txt``.

The JSON names what rebuilds the module without any flag: the family (``timm`` or ``hf``), the timm
architecture and the keyword arguments it was built with (``num_classes``, ``img_size``), the
preprocessing the model was trained with and the class names. A timm model's weights are
``model.safetensors``; a Hugging Face model is the folder itself (``config.json`` +
``model.safetensors`` written by ``save_pretrained``, with ``id2label``). :func:`load_saved_dir`
returns a :class:`~vitlens.models.registry.LoadedModule`, which :mod:`vitlens.models.loading` wraps
like any other spec's module, so the user's preprocessing overrides still apply.
"""

from __future__ import annotations

import json
from pathlib import Path

from vitlens.errors import ModelError, one_line
from vitlens.models.preprocess import Preprocess
from vitlens.models.registry import LoadedModule, spec_loader
from vitlens.models.weights import load_state_dict_checked, read_weights

#: the file that marks a folder as a vitlens model
MODEL_FILE = "vitlens_model.json"
#: the weights of a timm model in such a folder (Hugging Face: save_pretrained's own model.safetensors)
WEIGHTS_FILE = "model.safetensors"
CLASS_INDEX_FILE = "class_index.txt"
FORMAT_VERSION = 1
FAMILIES = ("timm", "hf")


def is_saved_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MODEL_FILE).is_file()


def write_model_json(folder, *, family: str, arch: str | None, model_kwargs: dict, preprocess: Preprocess,
                     class_names: list, class_ids: list, base: dict) -> Path:
    """Write ``vitlens_model.json`` (atomically: a reader never sees half a file)."""
    from vitlens.render.atomic import write_text_atomic

    record = {"format": "vitlens-model", "version": FORMAT_VERSION, "family": family, "arch": arch,
              "model_kwargs": model_kwargs, "num_classes": len(class_names), "preprocess": preprocess.to_dict(),
              "class_names": list(class_names), "class_ids": list(class_ids), "base": base}
    path = Path(folder) / MODEL_FILE
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def read_model_json(folder) -> dict:
    path = Path(folder) / MODEL_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read '{path}': {one_line(exc)}") from None
    if not isinstance(record, dict) or record.get("format") != "vitlens-model" or record.get("family") not in FAMILIES:
        raise ModelError(f"'{path}' is not a vitlens model file (format vitlens-model, family timm or hf)")
    if record.get("version") != FORMAT_VERSION:
        raise ModelError(f"'{path}' has version {record.get('version')!r}: this vitlens reads version {FORMAT_VERSION}")
    return record


def load_saved_dir(spec, folder, weights=None, num_classes=None) -> LoadedModule:
    """The module, preprocessing and class names of a ``vitlens finetune`` output folder (a spec loader)."""
    folder = Path(folder)
    if weights is not None:
        raise ModelError(f"'{folder}' holds its own weights ({MODEL_FILE}): drop --weights")
    record = read_model_json(folder)
    if num_classes is not None and int(num_classes) != int(record["num_classes"]):
        raise ModelError(f"'{folder}' has {record['num_classes']} classes, not {num_classes}: drop --num-classes")
    if record["family"] == "timm":
        import timm

        arch = record.get("arch") or ""
        if not timm.is_model(arch):
            raise ModelError(f"'{folder / MODEL_FILE}' names the timm model '{arch}', which this timm does not have")
        kwargs = dict(record.get("model_kwargs") or {})
        kwargs["num_classes"] = int(record["num_classes"])
        try:
            module = timm.create_model(arch, pretrained=False, **kwargs)
        except Exception as exc:
            raise ModelError(f"cannot build timm model '{arch}' from '{folder}': {one_line(exc)}") from None
        path = folder / WEIGHTS_FILE
        load_state_dict_checked(module, read_weights(path), path, f"timm:{arch}")
    else:
        module = spec_loader("image", "hf")(str(folder), str(folder), None, None).module
    preprocess_fields = dict(record["preprocess"])
    preprocess_fields["input_size"] = tuple(preprocess_fields["input_size"])
    preprocess_fields["mean"] = tuple(preprocess_fields["mean"])
    preprocess_fields["std"] = tuple(preprocess_fields["std"])
    names = [str(name) for name in record.get("class_names") or []]
    weights_path = folder / WEIGHTS_FILE
    return LoadedModule(module, preprocess=Preprocess(**preprocess_fields),
                        class_names=names if len(names) == int(record["num_classes"]) else None,
                        weights=str(weights_path.resolve()) if weights_path.is_file() else None)
