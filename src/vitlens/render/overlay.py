"""Blend explanation heatmaps onto the images they explain.

Heatmaps come out of a model at patch resolution (e.g. 14x14) while the image can be any
size; everything here is drawn at the image's own resolution so overlays line up with the
picture a user actually looked at, not with the model's 224x224 crop.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from vitlens.render.atomic import write_atomic
from vitlens.render.colors import RenderError, clean_unit, colormap_image, signed_to_unit

try:  # ISA-L's deflate: twice as fast as zlib's Huffman-only coding on photographs, files about as large (photo_png)
    from isal import isal_zlib as _isal_zlib
except ImportError:  # a platform without its wheel: zlib, the same PNG pixels
    _isal_zlib = None


def resize_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a 2-D map.

    Parameters
    ----------
    heatmap : np.ndarray, shape (h, w)
        Any real values. NaN propagates to neighbouring output pixels, so clean maps first
        (:func:`overlay` does).
    size : tuple of int
        ``(width, height)`` of the result, PIL order.

    Returns
    -------
    np.ndarray, shape (height, width), dtype float32
        Every output value is a convex combination of input values, so the result stays
        within ``[heatmap.min(), heatmap.max()]``.
    """
    arr = np.ascontiguousarray(heatmap, dtype=np.float32)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"resize_map expects a non-empty 2-D map, got shape {arr.shape}")
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"resize_map target size must be positive, got {size}")
    if arr.shape == (height, width):
        return arr.copy()
    # PIL's mode "F" keeps float32 precision; its bilinear filter uses pixel-centre alignment
    # and non-negative weights (also when shrinking), hence no overshoot.
    resized = Image.fromarray(arr).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise RenderError(f"alpha must be between 0 and 1, got {alpha:g}")
    return alpha


def _blend(image: Image.Image, colors: Image.Image, alpha) -> Image.Image:
    """``(1 - alpha) * image + alpha * colors``; ``alpha`` a number or an (H, W, 1) array of them.

    Both blend in Pillow's C code, ten times faster than numpy here: a number by ``Image.blend`` (it rounds
    down), an array as a mask of ``round(255 * alpha)`` by ``Image.composite`` (alpha in steps of 1/255, the
    result rounded). Either is at most one grey level from the rounded exact value; an alpha of 0 keeps the
    image's pixel exactly.
    """
    if np.ndim(alpha) == 0:
        return Image.blend(image.convert("RGB"), colors, float(alpha))
    mask = np.rint(np.clip(np.asarray(alpha, dtype=np.float32)[..., 0], 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.composite(colors, image.convert("RGB"), Image.fromarray(mask, mode="L"))


def overlay(
    image: Image.Image, heatmap: np.ndarray, cmap: str = "jet", alpha: float = 0.5
) -> Image.Image:
    """Alpha-blend a colour-mapped heatmap onto an image at the image's original resolution.

    Parameters
    ----------
    image : PIL.Image.Image
        Any mode; converted to RGB (transparency is dropped).
    heatmap : np.ndarray, shape (h, w)
        Values in [0, 1], any resolution. Before resizing, NaN is treated as 0 (no
        evidence) and values outside [0, 1] are clipped, so a slightly-off map never
        wraps around the colormap.
    cmap : str, default "jet"
        Matplotlib colormap name.
    alpha : float, default 0.5
        Weight of the heatmap: 0 returns the image pixels unchanged, 1 the pure colormap.

    Returns
    -------
    PIL.Image.Image
        RGB image of size ``image.size``.

    Raises
    ------
    RenderError
        ``alpha`` outside [0, 1] or unknown colormap (:class:`~vitlens.render.colors.ColormapError`).
    """
    alpha = _check_alpha(alpha)
    values = resize_map(clean_unit(heatmap), image.size)
    return _blend(image, colormap_image(values, cmap), alpha)


def signed_overlay(
    image: Image.Image, relevance: np.ndarray, cmap: str = "bwr", alpha: float = 0.7
) -> Image.Image:
    """Overlay a signed relevance map (e.g. LRP) with a diverging colormap centred at zero.

    The map is scaled symmetrically by a high percentile of ``|R|``
    (:func:`~vitlens.render.colors.signed_to_unit`): with ``bwr`` positive relevance is red, negative
    blue. Each pixel is tinted in proportion to its relevance, ``alpha * min(1, |R| / bound)``, so zero
    relevance leaves the photo exactly as it is (a constant-opacity blend would wash the whole photo
    out with the colormap's white) and relevance at or beyond the bound gets ``alpha``. NaN counts as 0.

    Parameters
    ----------
    image : PIL.Image.Image
    relevance : np.ndarray, shape (h, w)
        Signed values, any resolution.
    cmap : str, default "bwr"
        A diverging colormap (its middle is what zero relevance would be drawn in).
    alpha : float, default 0.7
        Opacity of the colour where the relevance reaches the scale's bound.

    Returns
    -------
    PIL.Image.Image
        RGB image of size ``image.size``.
    """
    alpha = _check_alpha(alpha)
    # Scale before resizing: the sign-to-colour mapping must not depend on output size.
    unit = resize_map(signed_to_unit(relevance), image.size)
    weight = alpha * np.abs(2.0 * unit - 1.0)
    return _blend(image, colormap_image(unit, cmap), weight[..., None])


def heatmap_image(heatmap: np.ndarray, cmap: str = "jet") -> Image.Image:
    """Colour-map a heatmap on its own, at its own resolution.

    Parameters
    ----------
    heatmap : np.ndarray, shape (h, w)
        Values in [0, 1]; clipped, NaN treated as 0.
    cmap : str, default "jet"

    Returns
    -------
    PIL.Image.Image
        RGB image of size ``(w, h)``.
    """
    return colormap_image(heatmap, cmap)


def save_png_atomic(image: Image.Image, path: str | os.PathLike, photo: bool = False, durable: bool = True) -> Path:
    """Save ``image`` as PNG without ever leaving a half-written file at ``path``.

    The PNG is written to a hidden temp file in the same directory and moved into place
    with ``os.replace``. Parent directories are created.

    Parameters
    ----------
    image : PIL.Image.Image
    path : path-like
        Destination; the format is PNG whatever the suffix.
    photo : bool
        The image is a photograph (an overlay): encoded by :func:`photo_png` (one filter for every row, ISA-L or
        zlib deflate), several times faster than Pillow's default for files of about the same size; drawings
        with flat areas keep Pillow's default.
    durable : bool
        On the disk before it is in place (see :func:`~vitlens.render.atomic.write_atomic`).

    Returns
    -------
    Path

    Raises
    ------
    OutputError
        One-line message when the directory cannot be created or the file cannot be written.
    """
    if photo:
        return write_atomic(path, lambda handle: photo_png(image, handle), durable=durable)
    return write_atomic(path, lambda handle: image.save(handle, format="PNG"), durable=durable)


#: rows per block that :func:`photo_png` filters and compresses at once (memory stays bounded for huge images)
_PNG_BLOCK_ROWS = 256


def photo_png(image: Image.Image, handle) -> None:
    """Write ``image`` (converted to RGB) to the binary file ``handle`` as an 8-bit RGB PNG, encoded for speed.

    Every row gets PNG's Sub filter (each byte minus the same channel of the pixel to its left, modulo 256): Pillow's
    encoder tries all five filters on every row, which costs more than the compression. The filtered rows are
    compressed by ISA-L's deflate at level 1 (the ``isal`` package) where it is installed, else by zlib with Huffman
    coding only (zlib's string matching finds almost nothing in camera noise and costs most of its time). A 227 x
    227 ImageNet overlay: 0.8 ms and 99 kB with ISA-L, 1.8 ms and 98 kB with zlib, against 3.2 ms and 91 kB for
    Pillow's Huffman-only PNG and 15 ms and 90 kB for Pillow's default (``benchmarks/png.py``). The image is stored
    losslessly; rows are taken out of the image, filtered, compressed and written a block at a time (one IDAT chunk
    each), so a huge image never has a second full-size copy.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size
    compressor = _photo_compressor()
    handle.write(b"\x89PNG\r\n\x1a\n")
    handle.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))  # 8-bit RGB
    for top in range(0, height, _PNG_BLOCK_ROWS):
        # one block of rows out of the image at a time: no full-size copy of a huge overlay
        block_rows = rgb.crop((0, top, width, min(height, top + _PNG_BLOCK_ROWS)))
        rows = np.asarray(block_rows, dtype=np.uint8).reshape(-1, width * 3)
        block = np.empty((rows.shape[0], width * 3 + 1), dtype=np.uint8)
        block[:, 0] = 1  # the filter type byte: Sub
        block[:, 1:4] = rows[:, :3]
        np.subtract(rows[:, 3:], rows[:, :-3], out=block[:, 4:])  # uint8 arithmetic wraps modulo 256, as PNG's does
        compressed = compressor.compress(block.tobytes())
        if compressed:  # consecutive IDAT chunks are one zlib stream: each block goes out as it is compressed
            handle.write(_png_chunk(b"IDAT", compressed))
    handle.write(_png_chunk(b"IDAT", compressor.flush()))
    handle.write(_png_chunk(b"IEND", b""))


def _photo_compressor():
    """A deflate stream (zlib format, as PNG's IDAT data is) for photographs: ISA-L level 1, or zlib Huffman-only."""
    if _isal_zlib is not None:
        return _isal_zlib.compressobj(1)
    return zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
