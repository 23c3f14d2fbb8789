"""Overlay PNG encoding: vitlens's photo encoder (ISA-L or zlib deflate) against Pillow's PNG writer.

Real ImageNet validation photos (../shared/data/imagenet_val_1300, 227 x 227) and the same photos enlarged
to 1024 px (the default overlay cap; smoother than a real 1024 px photo, so string matching finds more),
each drawn as a rollout-like overlay (a smooth 14 x 14 map), encoded by

  photo_png, ISA-L   vitlens's encoder (Sub filter, ISA-L deflate level 1: the ``isal`` package), the default
  photo_png, zlib    the same encoder with zlib Huffman-only (what it uses where isal is not installed)
  Pillow             ``image.save(format="PNG")`` (all five filters tried per row, zlib level 6)
  Pillow, Huffman    the same with ``compress_type=zlib.Z_HUFFMAN_ONLY``

Median milliseconds per image and mean kilobytes; every file decodes back to the same pixels (checked).

    python benchmarks/png.py [--images 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from vitlens.render import overlay

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet_val_1300" / "images"
encoder = importlib.import_module("vitlens.render.overlay")  # the package exports a function of that name


def photo_png_with(isal: bool):
    saved = encoder._isal_zlib

    def encode(image, handle):
        encoder._isal_zlib = saved if isal else None
        try:
            encoder.photo_png(image, handle)
        finally:
            encoder._isal_zlib = saved

    return encode


def measure(encode, overlays, repeats: int) -> tuple[float, float]:
    times, sizes = [], []
    for image in overlays:
        buffer = io.BytesIO()
        encode(image, buffer)
        with Image.open(io.BytesIO(buffer.getvalue())) as back:
            assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(image)), "not lossless"
        sizes.append(len(buffer.getvalue()))
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            encode(image, io.BytesIO())
            runs.append(time.perf_counter() - start)
        times.append(statistics.median(runs))
    return 1e3 * statistics.median(times), statistics.mean(sizes) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    photos = [Image.open(p).convert("RGB") for p in sorted(IMAGES.glob("*.JPEG"))[:args.images]]
    heat = np.outer(np.hanning(14), np.hanning(14))
    sets = {"227 px": [overlay(p, heat) for p in photos],
            "1024 px": [overlay(p.resize((1024, 1024), Image.Resampling.BICUBIC), heat) for p in photos]}
    encoders = {"photo_png, ISA-L": photo_png_with(isal=True), "photo_png, zlib": photo_png_with(isal=False),
                "Pillow": lambda im, fh: im.save(fh, format="PNG"),
                "Pillow, Huffman": lambda im, fh: im.save(fh, format="PNG", compress_type=zlib.Z_HUFFMAN_ONLY)}
    if encoder._isal_zlib is None:
        del encoders["photo_png, ISA-L"]
        print("isal is not installed: photo_png uses zlib")
    print(f"{len(photos)} ImageNet photos as overlays, median of {args.repeats} encodings each")
    print(f"{'encoder':18s} " + " ".join(f"{name + ' ms':>12s} {name + ' kB':>12s}" for name in sets))
    for name, encode in encoders.items():
        cells = [measure(encode, overlays, args.repeats) for overlays in sets.values()]
        print(f"{name:18s} " + " ".join(f"{ms:12.2f} {kb:12.1f}" for ms, kb in cells), flush=True)


if __name__ == "__main__":
    main()
