"""Side-by-side comparison figure: one row per image, one column per explanation method.

Built with ``matplotlib.figure.Figure`` and the Agg canvas directly, so no pyplot state or
global backend is touched (safe inside notebooks, servers and other people's programs).
Cells are placed at absolute inch positions rather than with a layout engine so the output
size is predictable: it depends only on the number of rows/columns and ``cell_size``.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from vitlens.render.colors import RenderError
from vitlens.render.overlay import overlay, save_png_atomic, signed_overlay

# Inches. Small fixed gaps read better in papers than gaps proportional to the cell.
_GAP = 0.08
_MARGIN = 0.1
_NA_FACE = "#eeeeee"


@dataclass
class GridRow:
    """One row of a comparison grid.

    Attributes
    ----------
    image : PIL.Image.Image
        The original image, any size and mode.
    title : str
        Row label, e.g. ``"tiger cat 0.62"``; drawn left of the original. Empty for none.
    maps : dict of str to np.ndarray
        Column (method) name -> 2-D heatmap in [0, 1], or signed relevance for columns in
        ``signed``. Columns without an entry are drawn as a blank "n/a" cell.
    signed : set of str
        Column names whose maps in this row are signed relevance (drawn with ``bwr``).
    """

    image: Image.Image
    title: str = ""
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    signed: set[str] = field(default_factory=set)


def _font_size(cell_size: float) -> float:
    # ~9.4 pt at the default 2.6 in cell; bounded so tiny or huge cells stay legible.
    return float(min(14.0, max(7.0, 3.6 * cell_size)))


def _fit_text(text: str, width_in: float, font_pt: float, max_lines: int) -> str:
    """Wrap ``text`` to a box ``width_in`` wide, cutting with an ellipsis after ``max_lines``."""
    text = " ".join(str(text).split())
    if not text:
        return ""
    # DejaVu Sans averages ~0.6 em per character; wide glyphs (CJK) may overflow a little,
    # which is preferable to cutting short names too eagerly.
    chars = max(4, int(width_in * 72.0 / (0.6 * font_pt)))
    lines = textwrap.wrap(text, width=chars, break_long_words=True, break_on_hyphens=True)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, chars - 1)].rstrip() + "…"
    return "\n".join(lines)


def _thumbnail(image: Image.Image, max_px: int) -> Image.Image:
    # Blending a 4000 px photo only to have Agg shrink it again is wasted work; 2x the cell's
    # pixel size keeps the result sharp after matplotlib's own antialiased resampling.
    image = image.convert("RGB")
    if max(image.size) > max_px:
        image = image.copy()
        image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    return image


def compare_grid(
    rows: Sequence[GridRow],
    columns: Sequence[str],
    path: str | os.PathLike | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    cell_size: float = 2.6,
    *,
    signed: Iterable[str] = (),
    signed_cmap: str = "bwr",
    original_title: str = "original",
    dpi: int = 100,
) -> Image.Image:
    """Draw a rows x (1 + methods) grid of overlays, the first column being the original image.

    Parameters
    ----------
    rows : sequence of GridRow
        At least one row.
    columns : sequence of str
        Method (column) names, in display order; the original-image column is added in front
        and must not be listed.
    path : path-like, optional
        If given, the PNG is also written there atomically.
    cmap : str, default "jet"
        Colormap for unsigned maps (values in [0, 1]; clipped, NaN as 0).
    alpha : float, default 0.5
        Heatmap weight in each overlay.
    cell_size : float, default 2.6
        Edge of one square cell in inches.
    signed : iterable of str, optional
        Column names whose maps are signed relevance in every row (merged with each row's
        own ``signed`` set). Those cells use :func:`~vitlens.render.overlay.signed_overlay`
        with ``signed_cmap``.
    signed_cmap : str, default "bwr"
    original_title : str, default "original"
        Header of the first column.
    dpi : int, default 100

    Returns
    -------
    PIL.Image.Image
        RGB image at ``dpi``. Its width is ``left + (1 + len(columns)) * cell_size + gaps``
        (the left label band exists only if some row has a title); its height is the header
        plus, per row, ``cell_size * clamp(image height / width, 0.4, 2.0)`` plus gaps, so
        cells fit the images without letterboxing (images beyond the clamp are letterboxed,
        never stretched).

    Raises
    ------
    RenderError
        No rows, non-positive ``cell_size``/``dpi``, bad ``alpha`` or unknown colormap.
    OutputError
        ``path`` cannot be written.
    """
    rows = list(rows)
    columns = [str(c) for c in columns]
    if not rows:
        raise RenderError("compare_grid needs at least one row")
    if not cell_size > 0 or not dpi > 0:
        raise RenderError(f"cell_size and dpi must be positive, got {cell_size:g} and {dpi}")
    signed_all = {str(c) for c in signed}

    font_pt = _font_size(cell_size)
    line_in = font_pt * 1.3 / 72.0
    headers = [original_title] + columns
    header_text = [_fit_text(name, cell_size, font_pt, 2) for name in headers]
    n_cols = len(headers)
    header_in = max(1, max(t.count("\n") + 1 for t in header_text)) * line_in + 0.06
    # Each row is as tall as its image's aspect ratio asks, so cells carry no letterbox
    # bands and column titles sit right on top of the pictures; clamped so panoramas and
    # very tall images still leave a usable cell.
    row_h = [cell_size * min(2.0, max(0.4, r.image.height / max(1, r.image.width))) for r in rows]
    row_top = [_MARGIN + header_in + sum(row_h[:i]) + i * _GAP for i in range(len(rows))]
    has_titles = any(str(r.title).strip() for r in rows)
    label_in = 0.6 * cell_size if has_titles else 0.0
    width_in = 2 * _MARGIN + label_in + n_cols * cell_size + (n_cols - 1) * _GAP
    height_in = row_top[-1] + row_h[-1] + _MARGIN

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    max_px = int(2 * cell_size * dpi)
    # Text from users (class names, file names) must be shown verbatim: no mathtext for "$".
    text_kw = {"fontsize": font_pt, "parse_math": False}

    def cell_axes(row_i: int, col_i: int):
        x = _MARGIN + label_in + col_i * (cell_size + _GAP)
        bottom = height_in - row_top[row_i] - row_h[row_i]
        ax = fig.add_axes(
            (x / width_in, bottom / height_in, cell_size / width_in, row_h[row_i] / height_in)
        )
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        return ax

    with warnings.catch_warnings():
        # Names in scripts DejaVu Sans lacks (CJK, emoji) render as boxes; one warning per
        # glyph would drown the user's console.
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        for r_i, row in enumerate(rows):
            base = _thumbnail(row.image, max_px)
            row_signed = signed_all | {str(c) for c in row.signed}
            for c_i, name in enumerate(headers):
                ax = cell_axes(r_i, c_i)
                if r_i == 0:
                    ax.set_title(header_text[c_i], pad=3, **text_kw)
                if c_i == 0:
                    ax.imshow(np.asarray(base))
                    continue
                heatmap = row.maps.get(name)
                if heatmap is None:
                    ax.set_facecolor(_NA_FACE)
                    ax.text(0.5, 0.5, "n/a", ha="center", va="center", color="#777777",
                            transform=ax.transAxes, **text_kw)
                    continue
                if name in row_signed:
                    cell = signed_overlay(base, heatmap, cmap=signed_cmap, alpha=alpha)
                else:
                    cell = overlay(base, heatmap, cmap=cmap, alpha=alpha)
                ax.imshow(np.asarray(cell))
            if label_in:
                y = height_in - row_top[r_i] - row_h[r_i] / 2
                max_lines = max(1, int(row_h[r_i] / line_in) - 1)
                fig.text(
                    (_MARGIN + label_in / 2) / width_in,
                    y / height_in,
                    _fit_text(row.title, label_in - 0.1, font_pt, max_lines),
                    ha="center",
                    va="center",
                    multialignment="center",
                    **text_kw,
                )
        canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    result = Image.fromarray(np.ascontiguousarray(rgba[..., :3]))
    if path is not None:
        save_png_atomic(result, path)
    return result
