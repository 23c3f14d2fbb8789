"""Reading checkpoints safely and the facts every family loader needs (no family imported here).

``read_weights`` reads ``.pth``/``.pt``/``.bin`` with ``torch.load(weights_only=True)`` and
``.safetensors`` with safetensors, never an arbitrary unpickle.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import torch
from torch import nn

from vitlens.errors import ModelError, one_line

HUB_HINT = "pass --weights FILE, or pre-populate the Hugging Face cache (see `vitlens cache-weights --help`)"


def read_weights(path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely into a flat ``{name: tensor}`` dict."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelError(f"cannot read weights '{path}': {one_line(exc)}") from None
    prefix = f"cannot read weights '{path}' as a plain tensor checkpoint (weights_only=True)"
    if not _is_torch_save_file(path):
        raise ModelError(f"{prefix}: the file is not a torch.save checkpoint (nor .safetensors)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{prefix}: {one_line(exc)}") from None
    # common wrappers: {"state_dict": ...}, {"model": ...}
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights '{path}' are not a state dict of tensors")
    return state


def _is_torch_save_file(path: Path) -> bool:
    """torch.save writes a zip archive (a pickle stream, starting with the PROTO opcode, before torch 1.6):
    anything else would only give the unpickler's meaningless errors ('pop from empty list', '101')."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as fh:
        return fh.read(1) == b"\x80"


def load_state_dict_checked(module: nn.Module, state: dict, path, spec: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
                parts.append(f"{len(keys)} {label} ({shown})")
        raise ModelError(f"weights '{path}' do not fit {spec}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def infer_num_classes(state: dict, keys) -> int | None:
    for key in keys:
        if key in state and state[key].ndim == 2:
            return int(state[key].shape[0])
    return None


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_class_names(module) -> list[str] | None:
    config = getattr(module, "config", None)
    id2label = getattr(config, "id2label", None)
    if id2label and not all(str(v).startswith("LABEL_") for v in id2label.values()):
        return [str(id2label[i]) for i in range(len(id2label))]
    n = getattr(module, "num_classes", None) or getattr(config, "num_labels", None)
    if n == 1000:
        return imagenet_class_names()
    return None


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in index order (shipped with timm)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def looks_like_hub_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    markers = ("connection", "offline", "resolve", "network", "timed out", "timeout", "hub", "urlopen",
               "max retries", "name or service", "localentrynotfound", "cannot find the requested files",
               "couldn't connect", "unreachable", "temporary failure", "ssl", "http")
    return any(m in text for m in markers)
