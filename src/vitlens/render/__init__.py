"""Rendering: heatmap overlays, comparison grids and the static HTML report.

Everything here works without a display: figures use matplotlib's Agg canvas directly and
no global matplotlib state is changed.
"""

from vitlens.render.atomic import write_atomic, write_text_atomic
from vitlens.render.colors import ColormapError, RenderError, apply_colormap, signed_to_unit
from vitlens.render.grid import GridRow, compare_grid
from vitlens.render.overlay import (
    heatmap_image,
    overlay,
    resize_map,
    save_png_atomic,
    signed_overlay,
)
from vitlens.render.report import load_manifest, render_report, write_report

__all__ = [
    "ColormapError",
    "GridRow",
    "RenderError",
    "apply_colormap",
    "compare_grid",
    "heatmap_image",
    "load_manifest",
    "overlay",
    "render_report",
    "resize_map",
    "save_png_atomic",
    "signed_overlay",
    "signed_to_unit",
    "write_atomic",
    "write_report",
    "write_text_atomic",
]
