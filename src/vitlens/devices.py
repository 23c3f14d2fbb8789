"""Choosing the torch device: one function for the command lines, the API and the model loaders."""

from __future__ import annotations

import torch

from vitlens.errors import UsageError


def select_device(text=None, option: str = "--device"):
    """The torch device to run on: ``text`` (``cpu``, ``cuda``, ``cuda:1``, ``mps`` or a ``torch.device``),
    or None / ``auto`` for CUDA when there is one, else the CPU.

    A device that is not a torch device, or that this machine does not have, is a one-line
    UsageError here rather than a traceback from deep inside torch when the model moves.
    """
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shown = str(text).strip()
    try:
        device = text if isinstance(text, torch.device) else torch.device(shown)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{option} {shown}: not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {shown}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"{option} {shown}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                             f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"{option} {shown}: MPS (Apple GPU) is not available on this machine")
        return device
    raise UsageError(f"{option} {shown}: vitlens runs on cpu, cuda or mps")


__all__ = ["select_device"]
