"""Fixtures shared by the render tests."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from render_fakes import build_run_dir


@pytest.fixture
def run_dir(tmp_path) -> SimpleNamespace:
    return build_run_dir(tmp_path / "run")


@pytest.fixture
def gradient_map() -> np.ndarray:
    """A 14x14 map rising from 0 (left) to 1 (right), like a patch-level heatmap."""
    return np.tile(np.linspace(0.0, 1.0, 14, dtype=np.float32), (14, 1))
