"""A 12000 x 9000 photo through ``vitlens explain``: overlay size, output size and peak memory.

The photo is a real ImageNet validation JPEG (../shared/data/imagenet_val_fullres_11) enlarged to
12000 x 9000 and saved as a JPEG (quality 90) in a temporary folder. Each setting runs
``python -m vitlens explain`` in a fresh process with the real ViT-Tiny and rollout, Grad-CAM and
AttnLRP; peak memory is the process's maximum resident set size.

  default      overlays capped at 1024 px; the JPEG is decoded at the reduction the model and the
               overlay still allow (1/8 here)
  full         ``--overlay-max-side full``: full-resolution overlays, so a full decode (what every run
               did before the cap)

and, for scale, the original 500 x 375 photo with the default settings (the memory of the
interpreter, torch and the model alone).

    python benchmarks/large_input.py [--side 12000x9000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # the benchmark opens its own 108-megapixel overlay

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = SHARED / "vit_tiny_in1k_augreg" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
PHOTO = SHARED / "imagenet_val_fullres_11" / "images" / "ILSVRC2012_val_00000008.JPEG"
SPEC = "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"

# run in a child so that its peak memory is measured alone
MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if done.returncode != 0:
    sys.exit(done.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", default="12000x9000", help="WIDTHxHEIGHT of the photo")
    args = parser.parse_args()
    width, height = (int(v) for v in args.side.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        folder, small = Path(tmp) / "in", Path(tmp) / "small"
        folder.mkdir()
        small.mkdir()
        with Image.open(PHOTO) as photo:
            photo.convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(folder / "huge.jpg",
                                                                                          quality=90)
            photo.save(small / "photo.jpg", quality=90)
        print(f"{width} x {height} JPEG ({(folder / 'huge.jpg').stat().st_size / 1e6:.1f} MB), methods rollout, "
              "gradcam, attnlrp, real ViT-Tiny, CPU")
        print(f"{'setting':16s} {'overlay size':>14s} {'one overlay':>12s} {'all outputs':>12s} {'peak memory':>12s} "
              f"{'wall':>7s}")
        settings = (("500x375 default", small, []), ("huge default", folder, []),
                    ("huge full", folder, ["--overlay-max-side", "full"]))
        for name, inputs, extra in settings:
            out = Path(tmp) / name.replace(" ", "-")
            command = [sys.executable, "-m", "vitlens", "explain", str(inputs), "--model", SPEC, "--weights",
                       str(WEIGHTS), "--methods", "rollout,gradcam,attnlrp", "--out", str(out), "--quiet", *extra]
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            peak_mb = int(done.stdout.split()[-1]) / 1024
            overlay = next((out / "overlays" / "rollout").glob("*.png"))
            with Image.open(overlay) as im:
                size = f"{im.width} x {im.height}"
            total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            print(f"{name:16s} {size:>14s} {overlay.stat().st_size / 1e6:9.1f} MB {total / 1e6:9.1f} MB "
                  f"{peak_mb:9.0f} MB {wall:6.1f}s", flush=True)


if __name__ == "__main__":
    main()
