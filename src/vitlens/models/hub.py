"""Model hubs and their local caches.

Users with internet get pretrained weights from the Hugging Face hub (timm and transformers models)
or download.pytorch.org (torchvision). vitlens looks in the local caches first, so a pre-populated
cache works offline with no network attempt, and checks in a few seconds whether a hub answers
before starting a download, so an offline machine gets a one-line message instead of minutes of
retries.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from pathlib import Path
from typing import Iterator

HF_HOST = "huggingface.co"
TORCH_HOST = "download.pytorch.org"
# A fixed, obviously-local revision name for snapshots written by `vitlens cache-weights`.
LOCAL_REVISION = "0" * 40


@functools.lru_cache(maxsize=None)
def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``host`` can be opened (DNS failure answers at once)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") and host == HF_HOST:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hf_cached_file(repo_id: str, filenames=("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")):
    """Path of a cached weights file of a hub repository, or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        path = try_to_load_from_cache(repo_id, name)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def populate_hf_cache(repo_id: str, state: dict, filename: str = "model.safetensors") -> Path:
    """Write a state dict into the standard Hugging Face cache as ``repo_id``'s main revision.

    This is exactly the layout ``huggingface_hub`` creates when it downloads, so timm and
    transformers (and vitlens) find the weights offline as if they had been downloaded.
    """
    from huggingface_hub import constants
    from safetensors.torch import save_file

    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / LOCAL_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    target = snapshot / filename
    tmp = target.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, target)
    (repo_dir / "refs" / "main").write_text(LOCAL_REVISION)
    return target


def torch_hub_cached_file(url: str) -> str | None:
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return str(path) if path.is_file() else None


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No "Loading weights" progress bar for a small local model; the user's setting is restored."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
