"""Turn scalar maps into colours.

Only the colormap registry of matplotlib is used here: no figure, no backend, nothing global.
"""

from __future__ import annotations

import functools

import numpy as np
from matplotlib import colormaps
from PIL import Image

from vitlens.errors import VitlensError

# Shown in the error message so a typo can be fixed without opening the matplotlib docs.
_SUGGESTED_CMAPS = ("jet", "viridis", "inferno", "magma", "turbo", "bwr", "seismic", "coolwarm", "gray")


class RenderError(VitlensError, ValueError):
    """An invalid rendering argument (colormap name, alpha, cell size ...).

    Also a ``ValueError`` so callers that treat bad arguments generically still catch it.
    """


class ColormapError(RenderError):
    """An unknown colormap name."""


def get_cmap(name: str):
    """Look up a matplotlib colormap by name.

    Parameters
    ----------
    name : str
        Any name registered with matplotlib (``"jet"``, ``"bwr"``, ``"viridis_r"`` ...).

    Returns
    -------
    matplotlib.colors.Colormap

    Raises
    ------
    ColormapError
        If the name is unknown; the one-line message lists a few valid names.
    """
    try:
        return colormaps[name]
    except (KeyError, TypeError):
        raise ColormapError(
            f"unknown colormap {name!r}; try one of: {', '.join(_SUGGESTED_CMAPS)}"
        ) from None


def clean_unit(values: np.ndarray) -> np.ndarray:
    """Return ``values`` as float32 with NaN/±inf replaced and everything clipped to [0, 1].

    NaN counts as "no evidence" (0); +inf as 1 and -inf as 0, which is what clipping a huge
    value would give anyway.
    """
    arr = np.asarray(values, dtype=np.float32)
    arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(arr, 0.0, 1.0)


def apply_colormap(values: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Colour-map a 2-D map of values in [0, 1].

    Parameters
    ----------
    values : np.ndarray, shape (H, W)
        Values in [0, 1]; values outside are clipped and NaN is treated as 0.
    cmap : str, default "jet"
        Name of a matplotlib colormap.

    Returns
    -------
    np.ndarray, shape (H, W, 3), dtype uint8
        RGB colours (the colormap's alpha channel is dropped): what matplotlib's
        ``colormap(values, bytes=True)`` gives.

    Raises
    ------
    ColormapError
        Unknown colormap name.
    ValueError
        ``values`` is not two-dimensional (a programming error, not a user error).
    """
    return np.array(colormap_image(values, cmap))


def colormap_image(values: np.ndarray, cmap: str = "jet") -> Image.Image:
    """:func:`apply_colormap` as an RGB image, which is how overlays use it (same values, same checks).

    matplotlib quantises a float in [0, 1] to one of the colormap's N entries (``floor(v * N)``, 1.0 the
    last one) and looks its colour up in a byte table. For the usual N <= 256 the entry numbers fit a
    byte, and Pillow looks them up as a palette image's colours, five times faster than numpy's indexing.
    """
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ValueError(f"apply_colormap expects a 2-D map, got shape {arr.shape}")
    lut = _byte_lut(cmap)
    # clean_unit makes every value >= 0, and floor(min(x, N - 1)) == min(floor(x), N - 1) for an integer N - 1
    index = np.minimum(clean_unit(arr) * len(lut), len(lut) - 1)
    if len(lut) > 256:
        return Image.fromarray(lut[index.astype(np.int64)])
    palette = Image.fromarray(index.astype(np.uint8), mode="P")
    palette.putpalette(lut.tobytes())
    return palette.convert("RGB")


@functools.lru_cache(maxsize=32)
def _byte_lut(cmap: str) -> np.ndarray:
    """(N, 3) uint8: the colormap's entries as matplotlib gives them with ``bytes=True`` (integers index the table)."""
    colormap = get_cmap(cmap)
    return np.ascontiguousarray(colormap(np.arange(colormap.N), bytes=True)[:, :3], dtype=np.uint8)


#: Percentile of |R| at which the signed colour scale saturates. Relevance is heavy-tailed (a few
#: pixels hold most of it): scaled by its maximum, almost every pixel would be drawn at the neutral
#: colour. Above this percentile the colour is the colormap's end colour (LRP tools do the same).
SIGNED_PERCENTILE = 99.0


def signed_bound(relevance: np.ndarray, percentile: float = SIGNED_PERCENTILE) -> float:
    """The |R| that the signed colour scale ends at: ``percentile`` of the finite |R|.

    When that percentile is 0 (more than ``100 - percentile`` % of the map is exactly zero) the
    largest |R| is used instead, so a sparse map still shows its few non-zero pixels. 0 for a map
    without any finite non-zero value.
    """
    arr = np.asarray(relevance, dtype=np.float64)
    magnitude = np.abs(arr[np.isfinite(arr)])
    if magnitude.size == 0:
        return 0.0
    bound = float(np.percentile(magnitude, percentile))
    return bound if bound > 0.0 else float(magnitude.max())


def signed_to_unit(relevance: np.ndarray, percentile: float = SIGNED_PERCENTILE) -> np.ndarray:
    """Map a signed relevance map to [0, 1] with 0.5 meaning zero relevance.

    Scaling is symmetric, by :func:`signed_bound` (the ``percentile`` of |R|), so that positive and
    negative evidence of equal magnitude get equally strong colours on a diverging colormap (red
    positive, blue negative with ``bwr``/``seismic``) and the bulk of a heavy-tailed map is not
    crushed onto the neutral colour by a few extreme pixels; values beyond the bound saturate.
    An all-zero (or all-NaN) map maps to all 0.5. NaN counts as 0, +-inf as +-the bound.

    Parameters
    ----------
    relevance : np.ndarray
        Signed values of any shape.
    percentile : float
        Percentile of |R| that maps to 0 and 1 (100: the maximum).

    Returns
    -------
    np.ndarray
        float32 array of the same shape, values in [0, 1].
    """
    bound = signed_bound(relevance, percentile)
    arr = np.nan_to_num(np.asarray(relevance, dtype=np.float64), nan=0.0, posinf=bound, neginf=-bound)
    if bound == 0.0:
        return np.full(arr.shape, 0.5, dtype=np.float32)
    return np.clip(0.5 + 0.5 * arr / bound, 0.0, 1.0).astype(np.float32)
