"""Reduced precision: how close bf16 / fp16 maps stay to fp32, and what they gain in speed, same run.

    python benchmarks/precision.py [--images 32] [--batch 16] [--repeats 3] [--device cpu] [--threads N]

The real ImageNet ViT-Tiny/16 (../shared/data/vit_tiny_in1k_augreg) on the first ``--images`` real
images of ../shared/data/imagenet_val_1300 (sorted by file name). Prints

  * per method, the Pearson correlation of the raw maps computed with ``precision='bf16'`` (and
    ``'fp16'`` where the device's autocast supports it) against the fp32 maps of the same images and
    the same target classes (the fp32 predictions): mean and min over the images; and how many
    top-1 predictions the reduced precision changes. For scale, a last pair of columns correlates fp32
    maps of the images with fp32 maps of the same images plus Gaussian noise of std ``--noise``
    (1e-3 in normalised units is about 1/8 of one 8-bit grey level for ViT-Tiny's mean = std = 0.5):
    a method that moves there is ill-conditioned by itself, whatever the precision;
  * speed: images/s of ``vitlens.explain`` with every method that runs in the shared pass (the
    rollout family, LeGrad, Chefer and the Grad-CAM family; AttnLRP / CP-LRP always run in fp32, so
    they are left out of the timing), fp32 vs bf16 (vs fp16), median of ``--repeats`` runs after one
    warm-up, all three measured in this run; ratio = images/s over the fp32 images/s.

Correlations do not depend on the machine's load; the speeds do (say how loaded it was).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vitlens
from _timing import timed
from vitlens.api import prepare_inputs
from vitlens.engine import check_precision
from vitlens.errors import UsageError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = SHARED / "vit_tiny_in1k_augreg" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
IMAGES = SHARED / "imagenet_val_1300" / "images"
SPEC = "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"

SHARED_PASS = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer",
               "gradcam", "gradcam++", "xgradcam", "layercam"]
LRP = ["attnlrp", "cp-lrp"]


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson correlation of two (B, ...) map batches, in float64."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--noise", type=float, default=1e-3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = vitlens.load_model(SPEC, weights=WEIGHTS, device=args.device)
    files = sorted(IMAGES.glob("*.JPEG"))[:args.images]
    x, _ = prepare_inputs(model, files)
    x = x.to(args.device)
    precisions = ["bf16"]
    try:
        check_precision("fp16", args.device)
        precisions.append("fp16")
    except UsageError as exc:
        print(f"fp16 not measured: {exc}")

    methods = SHARED_PASS + LRP
    reference = vitlens.explain(model, x, methods=methods, batch_size=args.batch)
    results = {p: vitlens.explain(model, x, methods=methods, batch_size=args.batch, precision=p,
                                  target=reference.targets) for p in precisions}
    torch.manual_seed(0)
    noisy = vitlens.explain(model, x + args.noise * torch.randn_like(x), methods=methods, batch_size=args.batch,
                            target=reference.targets)
    ref_top1 = reference.probabilities.argmax(1)
    print(f"ViT-Tiny/16 (real ImageNet weights), {len(files)} images of imagenet_val_1300, device {args.device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print()
    header = "| method | " + " | ".join(f"{p} vs fp32: mean | min" for p in precisions)
    print(header + f" | fp32 + noise {args.noise:g} vs fp32: mean | min |")
    print("|---|" + "---:|---:|" * (len(precisions) + 1))
    for name in methods:
        cells = []
        for p in precisions:
            r = pearson(results[p].patch_maps[name], reference.patch_maps[name])
            if torch.equal(results[p].patch_maps[name], reference.patch_maps[name]):
                cells += ["identical (runs in fp32)", ""]
            else:
                cells += [f"{r.mean().item():.4f}", f"{r.min().item():.4f}"]
        r = pearson(noisy.patch_maps[name], reference.patch_maps[name])
        cells += [f"{r.mean().item():.4f}", f"{r.min().item():.4f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    changed = ", ".join(f"{p} {(results[p].probabilities.argmax(1) != ref_top1).sum().item()}/{len(files)}"
                        for p in precisions)
    print(f"\ntop-1 predictions changed: {changed}")

    print()
    print(f"speed, {len(SHARED_PASS)} shared-pass methods, {len(files)} images in batches of {args.batch}, "
          f"median of {args.repeats}")
    print("| precision | s per run | images/s | vs fp32 |")
    print("|---|---:|---:|---:|")
    fp32_rate = None
    for p in ["fp32", *precisions]:
        seconds = timed(lambda p=p: vitlens.explain(model, x, methods=SHARED_PASS, batch_size=args.batch,
                                                    precision=p), args.repeats, args.device)
        rate = len(files) / seconds
        fp32_rate = fp32_rate or rate
        print(f"| {p} | {seconds:.2f} | {rate:.1f} | {rate / fp32_rate:.2f}x |")


if __name__ == "__main__":
    main()
