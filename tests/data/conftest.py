"""Fixtures for the vitlens.data tests: tiny synthetic images written into tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from vitlens.data import resolve_inputs
from vitlens.errors import InputError


def resolve_error(match: str, *args, **kwargs) -> str:
    """Call resolve_inputs expecting a one-line InputError matching ``match``; return the message."""
    with pytest.raises(InputError, match=match) as info:
        resolve_inputs(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """Return ``write(path, size=(8, 6), color=(200, 30, 30))``: save a small solid RGB image."""

    def write(path: Path, size: tuple[int, int] = (8, 6), color=(200, 30, 30)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = "JPEG" if path.suffix.lower() in {".jpeg", ".jpg", ".jfif"} else None
        Image.new("RGB", size, color).save(path, format=fmt)
        return path

    return write
