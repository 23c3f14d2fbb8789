"""Static attention views for text (PNG and SVG): matplotlib ``Figure`` + Agg canvas, never pyplot.

* :func:`heads_figure`  all heads of one layer, a grid of token x token heatmaps
* :func:`overview_figure`  layers x heads, one small heatmap per head
* :func:`query_figure`  where one query token attends, followed across layers (mean over heads, and
  every head)
* :func:`stats_figure`  per-head statistics as layers x heads heatmaps, plus the synthetic
  reference patterns' values for comparison
* :func:`tokens_figure`  coloured tokens (token attributions), wrapped like text

Long inputs: tick labels are thinned to every k-th token, k = ceil(n / ``MAX_LABELS``), so that at
most 64 labels share an axis (a 512-token input is labelled every 8th token) and every heatmap keeps
its full resolution. Attention heatmaps take a colour ``scale`` (:func:`scale_attention`); the
default ``auto`` is linear up to ``AUTO_LINEAR_UP_TO`` tokens and the percentile scale above, where rows
of 512 weights around 1/512 next to an attention sink of 0.6 would otherwise be drawn black.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vitlens.errors import InputError
from vitlens.render.atomic import ensure_dir, write_atomic, write_text_atomic
from vitlens.render.colors import get_cmap
from vitlens.text.stats import PATTERNS, SHOWN, STATS, HeadStatistics, reference_statistics, stats_rows

MAX_LABELS = 64
FORMATS = ("png", "svg")
ATTENTION_CMAP = "viridis"
STAT_TITLES = {
    "entropy": "entropy (nats)", "entropy_norm": "entropy / ln n", "distance": "mean distance (tokens)",
    "special": "to special tokens", "cls": "to [CLS]", "sep": "to [SEP]", "local": "local (|i-j| <= w)",
    "previous": "to previous token", "global": "global (top key share)", "causal": "to past and self (j <= i)",
    "induction": "induction (after an earlier copy)", "dilated": "dilated (best d >= 2)",
}
#: colour scales of the attention heatmaps (see :func:`scale_attention`)
SCALES = ("auto", "linear", "sqrt", "log", "percentile")
#: ``auto`` draws maps of more tokens than this on the percentile scale
AUTO_LINEAR_UP_TO = 64
#: the log scale spans this many decades below each map's maximum
LOG_DECADES = 3.0


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path, formats=FORMATS) -> list:
    """Write ``fig`` atomically as ``path`` with each extension in ``formats``; returns the paths."""
    base = Path(path)
    written = []
    for fmt in formats:
        if fmt not in FORMATS:
            from vitlens.render.colors import RenderError

            raise RenderError(f"unknown figure format {fmt!r}: use png or svg")
        target = base.with_suffix(f".{fmt}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing")
            write_atomic(target, lambda handle, fmt=fmt: fig.savefig(handle, format=fmt, dpi=100,
                                                                     bbox_inches="tight", pad_inches=0.1))
        written.append(target)
    return written


def _tick_positions(n: int, limit: int = MAX_LABELS) -> np.ndarray:
    step = max(1, math.ceil(n / limit))
    return np.arange(0, n, step)


def _label_axes(ax, labels, rows=True, cols=True, fontsize=None):
    n = len(labels)
    ticks = _tick_positions(n)
    size = fontsize or (8 if n <= 24 else 6 if n <= 48 else 5)
    if cols:
        ax.set_xticks(ticks)
        ax.set_xticklabels([labels[t] for t in ticks], rotation=90, fontsize=size)
    else:
        ax.set_xticks([])
    if rows:
        ax.set_yticks(ticks)
        ax.set_yticklabels([labels[t] for t in ticks], fontsize=size)
    else:
        ax.set_yticks([])


def _cell_inches(n: int) -> float:
    return float(np.clip(0.16 * n + 1.2, 2.2, 6.0))


def resolve_scale(scale: str, n: int) -> str:
    """The colour scale a heatmap of ``n`` tokens is drawn with (``auto`` -> linear or log)."""
    if scale not in SCALES:
        from vitlens.errors import UsageError

        raise UsageError(f"unknown attention scale {scale!r}: use {', '.join(SCALES)}")
    if scale == "auto":
        return "percentile" if n > AUTO_LINEAR_UP_TO else "linear"
    return scale


def scale_attention(values, scale: str = "auto") -> np.ndarray:
    """One attention map (n, n) (or any array) mapped to [0, 1] for colour, relative to its own maximum m.

    * ``linear``: a / m (the weights as they are; long maps look dark: a row's typical weight is 1/n)
    * ``sqrt``: (a / m) ** 0.5 (a power scale, gamma 0.5)
    * ``log``: 1 + log10(a / m) / 3, clipped to [0, 1]: three decades below the maximum (m / 1000 and
      less is drawn as 0)
    * ``percentile``: a / q99 clipped to 1, q99 = the 99th percentile of the map's non-zero weights (the
      top 1 % saturate)
    * ``auto`` (default): linear up to ``AUTO_LINEAR_UP_TO`` (64) tokens, percentile above (a sink or a
      diagonal saturates, the spread of the other weights shows)
    """
    a = np.asarray(values, dtype=np.float64)
    scale = resolve_scale(scale, a.shape[-1] if a.ndim else 1)
    top = float(a.max()) if a.size else 0.0
    if top <= 0:
        return np.zeros_like(a)
    if scale == "linear":
        return np.clip(a / top, 0, 1)
    if scale == "sqrt":
        return np.sqrt(np.clip(a / top, 0, 1))
    if scale == "log":
        with np.errstate(divide="ignore"):
            return np.clip(1.0 + np.log10(np.clip(a / top, 0, 1)) / LOG_DECADES, 0, 1)
    positive = a[a > 0]
    q = float(np.percentile(positive, 99)) if positive.size else top
    return np.clip(a / (q if q > 0 else top), 0, 1)


def scale_caption(scale: str, n: int) -> str:
    """How the colours of an attention map were scaled, for a figure's title."""
    return {"linear": "colour 0 to each head's max", "sqrt": "colour: sqrt of weight / head max",
            "log": f"colour: log scale, {LOG_DECADES:g} decades below each head's max",
            "percentile": "colour 0 to each head's 99th percentile"}[resolve_scale(scale, n)]


def heads_figure(attention, labels, layer: int, title: str = "", scale: str = "auto") -> Figure:
    """All heads of one layer: ``attention`` (H, n, n), rows = queries, columns = keys.

    Every heatmap is labelled, every k-th token for long inputs (:func:`_tick_positions`), and drawn on
    the colour ``scale`` (:func:`scale_attention`), each head relative to its own maximum."""
    a = np.asarray(attention, dtype=np.float32)
    heads, n = a.shape[0], a.shape[-1]
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    cell = _cell_inches(n)
    fig = _figure(cols * cell + 1.0, rows * cell + 0.8)
    cmap = get_cmap(ATTENTION_CMAP)
    for h in range(heads):
        ax = fig.add_subplot(rows, cols, h + 1)
        top = max(float(a[h].max()), 1e-6)
        ax.imshow(scale_attention(a[h], scale), cmap=cmap, vmin=0.0, vmax=1.0,
                  interpolation="nearest" if n <= 128 else "antialiased")
        ax.set_title(f"head {h} (max {top:.2f})", fontsize=9)
        _label_axes(ax, labels, rows=h % cols == 0, cols=h >= heads - cols)
    caption = scale_caption(scale, n)
    fig.suptitle(f"{title} ({caption})" if title else
                 f"layer {layer}: attention of every head (rows attend to columns; {caption})", fontsize=11)
    return fig


def head_figure(attention, labels, layer: int, head: int, title: str = "", scale: str = "auto",
                stats: dict | None = None) -> Figure:
    """One head: ``attention`` (n, n), a large labelled heatmap with a colour bar, and the head's statistics
    (``stats``: name -> value) under the title."""
    a = np.asarray(attention, dtype=np.float32)
    n = a.shape[-1]
    side = float(np.clip(0.2 * n + 2.0, 4.0, 10.0))
    fig = _figure(side + 1.6, side + 1.4)
    ax = fig.add_axes((0.14, 0.1, 0.72, 0.72))
    image = ax.imshow(scale_attention(a, scale), cmap=get_cmap(ATTENTION_CMAP), vmin=0.0, vmax=1.0,
                      interpolation="nearest" if n <= 128 else "antialiased")
    _label_axes(ax, labels, fontsize=9 if n <= 24 else None)
    ax.set_xlabel("key (attended to)", fontsize=8)
    ax.set_ylabel("query", fontsize=8)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.ax.tick_params(labelsize=6)
    bar.set_label(scale_caption(scale, n) + f" (max {float(a.max()):.2f})", fontsize=7)
    lines = [title or f"layer {layer}, head {head}"]
    if stats:
        lines.append(", ".join(f"{name} {value:.2f}" if name != "dilation" else f"{name} {int(value)}"
                               for name, value in stats.items()))
    fig.suptitle("\n".join(lines), fontsize=10)
    return fig


def _mosaic(cells: np.ndarray, gap: int, scale: str = "linear") -> np.ndarray:
    """(R, C, n, n) cells, each scaled to its own maximum (on the colour ``scale``), into one
    (R*(n+gap)-gap, C*(n+gap)-gap) image with NaN gaps (drawn in the background colour)."""
    rows, cols, n = cells.shape[0], cells.shape[1], cells.shape[-1]
    scaled = np.stack([np.stack([scale_attention(cells[r, c], scale) for c in range(cols)]) for r in range(rows)])
    out = np.full((rows * (n + gap) - gap, cols * (n + gap) - gap), np.nan, dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            out[r * (n + gap):r * (n + gap) + n, c * (n + gap):c * (n + gap) + n] = scaled[r, c]
    return out


def overview_figure(attentions, title: str = "", scale: str = "auto") -> Figure:
    """Layers x heads: ``attentions`` (L, H, n, n), one small heatmap per head, each on its own scale.

    Drawn as one mosaic image (fast in PNG and SVG, even for 12 x 12 heads of 512 tokens)."""
    a = np.asarray(attentions, dtype=np.float32)
    layers, heads, n = a.shape[0], a.shape[1], a.shape[-1]
    gap = max(1, n // 8)
    mosaic = _mosaic(a, gap, scale)
    cell = 0.9
    fig = _figure(heads * cell + 1.2, layers * cell + 1.0)
    ax = fig.add_axes((0.08, 0.04, 0.9, 0.86))
    cmap = get_cmap(ATTENTION_CMAP).with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest" if n <= 64 else "antialiased")
    ax.set_xticks([h * (n + gap) + (n - 1) / 2 for h in range(heads)])
    ax.set_xticklabels([f"H{h}" for h in range(heads)], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([l * (n + gap) + (n - 1) / 2 for l in range(layers)])
    ax.set_yticklabels([f"L{l}" for l in range(layers)], fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.suptitle(title or "attention of every layer (rows) and head (columns)", fontsize=10)
    return fig


def query_figure(attentions, labels, query: int, title: str = "") -> Figure:
    """Where token ``query`` attends in every layer: mean over heads (L x n) and every head (L*H x n)."""
    a = np.asarray(attentions, dtype=np.float32)
    layers, heads, n = a.shape[0], a.shape[1], a.shape[-1]
    rows = a[:, :, query, :]  # (L, H, n)
    width = float(np.clip(0.22 * n + 2.0, 6.0, 40.0))
    height = 1.8 + 0.3 * layers + 0.08 * layers * heads
    fig = _figure(width, height)
    cmap = get_cmap(ATTENTION_CMAP)
    # 0.7 inch above the panels for the title and the first panel's title, also for a 2-layer model
    grid = fig.add_gridspec(2, 1, height_ratios=[layers, layers * heads * 0.3 + 1], top=min(0.92, 1 - 0.7 / height),
                            bottom=0.12, hspace=0.12 if height > 6 else 0.3)
    ax = fig.add_subplot(grid[0])
    image = ax.imshow(rows.mean(axis=1), cmap=cmap, vmin=0.0, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(layers))
    ax.set_yticklabels([f"layer {l}" for l in range(layers)], fontsize=7)
    ax.set_xticks([])
    ax.set_title("mean over heads", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    ax = fig.add_subplot(grid[1])
    image = ax.imshow(rows.reshape(layers * heads, n), cmap=cmap, vmin=0.0, aspect="auto", interpolation="nearest")
    for l in range(1, layers):
        ax.axhline(l * heads - 0.5, color="white", linewidth=0.8)
    ax.set_yticks([l * heads + (heads - 1) / 2 for l in range(layers)])
    ax.set_yticklabels([f"layer {l}" for l in range(layers)], fontsize=7)
    _label_axes(ax, labels, rows=False, cols=True)
    ax.set_yticks([l * heads + (heads - 1) / 2 for l in range(layers)])
    ax.set_yticklabels([f"layer {l}" for l in range(layers)], fontsize=7)
    ax.set_title(f"every head ({heads} rows per layer)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    fig.suptitle(title or f"where '{labels[query]}' (token {query}) attends, layer by layer", fontsize=11)
    return fig


def stats_figure(stats: dict, reference: dict | None = None, shown=SHOWN, title: str = "") -> Figure:
    """Per-head statistics (stat -> (L, H)) as heatmaps, and a table of the reference patterns."""
    layers, heads = np.asarray(stats[shown[0]]).shape
    panels = len(shown) + (1 if reference else 0)
    cols = 3
    rows = math.ceil(panels / cols)
    cell_w = max(3.2, 0.32 * heads + 1.4)
    cell_h = max(2.6, 0.3 * layers + 1.2)
    fig = _figure(cols * cell_w, rows * cell_h + 0.6)
    annotate = layers * heads <= 160
    for p, name in enumerate(shown):
        values = np.asarray(stats[name], dtype=np.float64)
        ax = fig.add_subplot(rows, cols, p + 1)
        top = 1.0 if name != "distance" else max(float(values.max()), 1e-6)
        image = ax.imshow(values, cmap=get_cmap("magma"), vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
        ax.set_title(STAT_TITLES.get(name, name), fontsize=9)
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        ax.set_xticks(range(heads))
        ax.set_yticks(range(layers))
        ax.tick_params(labelsize=6)
        if annotate:
            for l in range(layers):
                for h in range(heads):
                    v = values[l, h]
                    ax.text(h, l, _short_number(v, 1 if name == "distance" else 2), ha="center", va="center",
                            fontsize=5, color="black" if v / top > 0.6 else "white")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    if reference:
        ax = fig.add_subplot(rows, cols, len(shown) + 1)
        names = [p for p in PATTERNS if p in reference]
        table = np.array([[reference[p][s] for s in shown] for p in names])
        scale = np.where(table.max(0) > 0, table.max(0), 1.0)
        ax.imshow(table / scale, cmap=get_cmap("Greys"), vmin=0, vmax=1.6, aspect="auto", interpolation="nearest")
        for r in range(len(names)):
            for c in range(len(shown)):
                ax.text(c, r, f"{table[r, c]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([s.replace("entropy_norm", "entropy/ln n") for s in shown], rotation=45, ha="right",
                           fontsize=6)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_title("reference patterns (same length)", fontsize=9)
    fig.suptitle(title or "attention statistics per layer and head", fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.97, bottom=0.08, top=0.9, wspace=0.45, hspace=0.55)
    return fig


def _short_number(value: float, digits: int) -> str:
    """Compact cell label: 0.53 -> '.53', 1.0 -> '1.00', 2.71 -> '2.7'."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("0.") else text


def token_colours(values, signed: bool = False, cmap: str | None = None) -> list:
    """RGB tuples (0..1) for values already scaled to [0, 1] (or [-1, 1] when signed)."""
    colormap = get_cmap(cmap or ("bwr" if signed else "Reds"))
    out = []
    for v in values:
        v = float(np.nan_to_num(v))
        x = 0.5 + 0.5 * np.clip(v, -1, 1) if signed else 0.85 * np.clip(v, 0, 1)
        out.append(tuple(float(c) for c in colormap(x)[:3]))
    return out


def scale_scores(values, special, signed: bool = False) -> np.ndarray:
    """Scores scaled for colouring: over the non-special tokens, x / max (or x / max|x| when signed).

    Non-negative maps whose minimum is well above zero (rollout's residual share) are min-max scaled
    so that the differences show; special tokens get the same scale (clipped), rendered dimmed.
    """
    v = np.asarray(values, dtype=np.float64)
    special = np.asarray(special, dtype=bool)
    pool = v[~special] if (~special).any() else v
    if signed:
        bound = float(np.abs(pool).max()) if pool.size else 0.0
        return v / bound if bound > 0 else np.zeros_like(v)
    lo, hi = float(pool.min()), float(pool.max())
    if lo < 0 or hi <= 0:
        return np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)
    base = lo if lo > 0.5 * hi else 0.0
    return np.clip((v - base) / (hi - base), 0, 1) if hi > base else np.zeros_like(v)


def _text_width(text: str, fontsize: float, cache: dict) -> float:
    """Width of ``text`` in points at ``fontsize`` (matplotlib's default font), memoised."""
    width = cache.get(text)
    if width is None:
        from matplotlib.textpath import TextPath

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing")
            width = TextPath((0, 0), text, size=fontsize).get_extents().width
        cache[text] = width
    return width


def tokens_figure(rows: list, title: str = "", width_in: float = 10.0) -> Figure:
    """Coloured tokens. ``rows``: dicts with ``label``, ``tokens`` (display strings), ``space`` (bool per
    token: a space before it), ``values`` (scaled, see :func:`scale_scores`), ``special`` and ``signed``.

    Lines wrap at ``width_in``; all token backgrounds are one collection (fast for 512-token inputs)."""
    from matplotlib.collections import PolyCollection

    fontsize = 10.0
    pad = 2.5
    line_h = fontsize * 1.9  # points
    label_h = fontsize * 1.5
    width_pt = width_in * 72
    widths: dict = {}
    layout = []
    total = 0.0
    for row in rows:
        x, line = 0.0, 0
        items = []
        colours = token_colours(row["values"], row.get("signed", False))
        for text, space, colour, special in zip(row["tokens"], row["space"], colours, row["special"]):
            shown = text if text.strip() else "\u2423"
            w = _text_width(shown, fontsize, widths) + 2 * pad
            gap = 4.0 if space and x > 0 else 1.0
            if x + gap + w > width_pt and x > 0:
                line += 1
                x, gap = 0.0, 0.0
            items.append((x + gap, w, line, shown, colour, special))
            x += gap + w
        layout.append((row, items, line + 1))
        total += label_h + (line + 1) * line_h + 6
    margin, head = 10.0, (26.0 if title else 6.0)
    used = max([x + w for _, items, _ in layout for x, w, *_ in items] + [1.0])
    if title:
        used = max(used, _text_width(title, 11, widths) * 1.1)
    for row, _, _ in layout:
        used = max(used, _text_width(row["label"], 8, widths))
    fig_w, fig_h = min(used, width_pt) + 2 * margin, total + head + 6
    fig = _figure(fig_w / 72, fig_h / 72)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, fig_w)
    ax.set_ylim(0, fig_h)
    ax.set_axis_off()
    if title:
        ax.text(margin, fig_h - 14, title, fontsize=11, va="center", ha="left", weight="bold")
    boxes, faces = [], []
    y = fig_h - head
    for row, items, lines in layout:
        y -= label_h
        ax.text(margin, y + 3, row["label"], fontsize=8, color="#444444", va="bottom")
        for x, w, line, text, colour, special in items:
            top = y - line * line_h - 2
            bottom = top - line_h + 4
            boxes.append([(margin + x, bottom), (margin + x + w, bottom), (margin + x + w, top), (margin + x, top)])
            faces.append((0.94, 0.94, 0.94) if special else colour)
            luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
            ax.text(margin + x + pad, (top + bottom) / 2, text, fontsize=fontsize, va="center_baseline", ha="left",
                    color="#999999" if special else ("white" if luminance < 0.45 else "black"))
        y -= lines * line_h + 6
    ax.add_collection(PolyCollection(boxes, facecolors=faces, edgecolors="none", zorder=0))
    return fig


__all__ = ["FORMATS", "SCALES", "head_figure", "heads_figure", "overview_figure", "query_figure", "resolve_scale",
           "save_figure", "scale_attention", "scale_scores", "stats_figure", "token_colours", "tokens_figure"]


#: what `vitlens text` can write for an input
VIEWS = ("tokens", "heads", "overview", "query", "headview", "stats")


def parse_views(views) -> list:
    if views is None or views == "all":
        return list(VIEWS)
    if isinstance(views, str):
        views = views.split(",")
    out = []
    for raw in views:
        name = raw.strip().lower()
        if not name:
            continue
        if name == "all":
            out.extend(v for v in VIEWS if v not in out)
            continue
        if name not in VIEWS:
            raise InputError(f"unknown view '{name}': choose from {', '.join(VIEWS)} or all")
        if name not in out:
            out.append(name)
    if not out:
        raise InputError("no views given")
    return out


def write_stats(acc: HeadStatistics, out, sequences, formats=("png", "svg"), title: str = "") -> list:
    """stats.csv (layer, head, every statistic), stats.json (with the reference patterns), stats.png/svg."""
    out = ensure_dir(out)
    stats = acc.result()
    lengths = [len(seq.tokens) for seq in sequences]
    n = max(1, int(round(float(np.mean(lengths)))))
    longest = max(sequences, key=lambda seq: len(seq.tokens))
    if len(longest.tokens) == n:
        special, cls, sep = longest.special, longest.cls, longest.sep
    else:  # a typical layout at the mean length: [CLS] ... [SEP]
        special = [j in (0, n - 1) for j in range(n)]
        cls, sep = [j == 0 for j in range(n)], [j == n - 1 and n > 1 for j in range(n)]
    reference = reference_statistics(n, special, cls, sep, window=acc.window)
    rows = stats_rows(stats)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["layer", "head", *STATS], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    paths = [write_text_atomic(out / "stats.csv", buffer.getvalue())]
    payload = {"window": acc.window, "sequences": acc.sequences, "rows": rows,
               "reference": {"length": n, "patterns": reference}}
    paths.append(write_text_atomic(out / "stats.json", json.dumps(payload, indent=1)))
    fig = stats_figure(stats, reference, title=title)
    paths.extend(save_figure(fig, out / "stats", formats))
    return paths
