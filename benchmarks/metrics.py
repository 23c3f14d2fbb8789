"""Deletion + insertion (20 steps) on 64 images: vitlens's batched metrics vs a per-image, per-step loop,
and vs torchcam's ``DeletionInsertionMetric`` when torchcam is importable, all on the same maps.

With ``--sensitivity-samples N`` (e.g. 10) it also measures the cost of max-sensitivity with N
perturbed copies per image relative to one explanation of the same batch (``--sensitivity-methods``,
default ``gmar-l2``; the original maps are given, as ``vitlens evaluate`` does, so the ratio counts
only the perturbed explanations; median of ``--repeats`` after a warm-up).

Before the metrics it measures the batching ceiling: raw model forwards of ``--batch-size`` copies of
one image, alone vs in one batch. No batched metric can beat the loop by much more than that ratio,
so it says whether a speed target is reachable on this device at all (``--skip-ceiling`` to omit).

Usage (from the repository root)::

    python benchmarks/metrics.py                      # 64 images, 20 steps, black baseline, CPU
    python benchmarks/metrics.py --images 16 --device cuda --json bench.json
    python benchmarks/metrics.py --images 16 --skip-loop --sensitivity-samples 10 --sensitivity-only

Model: the real ViT-Tiny from ``../shared/data`` when present (else a random-init timm ViT-Tiny, same
compute); images: the first ``--images`` of ``../shared/data/imagenet_val_1300`` (else random
tensors); maps: vitlens ``gmar-l2`` maps of those images, plus 1e-6 noise so that no two pixels tie
(the loop and torchcam break ties in raster order, vitlens with a seeded permutation).

All three score the softmax probability of the predicted class and put black pixels (0 in pixel
space) in both deletion and insertion. Timed: only the metric (explaining is done before).
The loop is the textbook implementation: for every image, for every step, build the perturbed
image and run one batch-1 forward. torchcam is used through a tiny extractor shim that returns the
precomputed maps (install it with ``pip install --no-deps --target DIR torchcam`` and pass
``--torchcam-path DIR`` if you do not want it in the environment).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = SHARED / "vit_tiny_in1k_augreg" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
IMAGES = SHARED / "imagenet_val_1300" / "images"


def load(device: str, count: int):
    import vitlens

    if WEIGHTS.is_file():
        model = vitlens.load_model("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k", weights=WEIGHTS, device=device)
        source = "real ViT-Tiny (vit_tiny_in1k_augreg)"
    else:  # pragma: no cover - without ../shared/data
        import timm

        model = vitlens.load_model(timm.create_model("vit_tiny_patch16_224", pretrained=False), device=device)
        source = "random-init timm vit_tiny_patch16_224"
    if IMAGES.is_dir():
        files = sorted(IMAGES.iterdir())[:count]
        from vitlens.api import prepare_inputs

        x, _ = prepare_inputs(model, [str(f) for f in files])
        images = f"first {count} of imagenet_val_1300"
    else:  # pragma: no cover
        x = torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        images = f"{count} random tensors"
    result = vitlens.explain(model, x, methods="gmar-l2", batch_size=16)
    maps = result.maps["gmar-l2"][:, 0].double()
    # float64, so that the noise really separates every pixel (in float32 large plateaus would keep ties)
    maps = maps + 1e-6 * torch.rand(maps.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, x, maps, result.targets[:, 0], source, images


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_vitlens(model, x, maps, targets, steps, batch_size):
    from vitlens.metrics import perturbation_metrics

    stats: dict = {}
    out = perturbation_metrics(model, x, {"m": maps}, targets, batch_size=batch_size, stats=stats,
                               metrics={"deletion": {"steps": steps, "baseline": "zero"},
                                        "insertion": {"steps": steps, "baseline": "zero"}})["m"]
    return out["deletion"]["auc"].numpy(), out["insertion"]["auc"].numpy(), stats["forwards"]


def run_loop(model, x, maps, targets, steps):
    from vitlens.metrics import baseline_inputs
    from vitlens.metrics.perturbation import per_image_reference

    black = baseline_inputs(x, "zero", model.preprocess.mean, model.preprocess.std)
    device = model.device
    net = model.module
    dele, ins = [], []
    xs = np.linspace(0, 1, steps + 1)
    with model.eval_mode():
        for i in range(x.shape[0]):
            xi, bi = x[i].to(device), black[i].to(device)
            d = per_image_reference(net, xi, maps[i].to(device), int(targets[i]), steps, bi, "deletion")
            n = per_image_reference(net, xi, maps[i].to(device), int(targets[i]), steps, bi, "insertion")
            dele.append(np.trapezoid(d, xs) if hasattr(np, "trapezoid") else np.trapz(d, xs))
            ins.append(np.trapezoid(n, xs) if hasattr(np, "trapezoid") else np.trapz(n, xs))
    return np.array(dele), np.array(ins), x.shape[0] * 2 * (steps + 1)


class FixedMaps:
    """A torchcam extractor stand-in that hands out precomputed maps (one batch at a time)."""

    def __init__(self, module, maps):
        self.model = module
        self.maps = maps

    def __call__(self, class_idx, scores=None, **kwargs):
        return [self.maps]

    @staticmethod
    def fuse_cams(cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def run_torchcam(model, x, maps, targets, steps, batch_size):
    from functools import partial

    from torchcam.metrics import DeletionInsertionMetric

    black = ((0 - torch.tensor(model.preprocess.mean)) / torch.tensor(model.preprocess.std)).view(1, 3, 1, 1)
    shim = FixedMaps(model.module, maps.to(model.device))
    metric = DeletionInsertionMetric(shim, partial(torch.softmax, dim=-1), steps=steps,
                                     baseline=black.to(model.device), batch_size=batch_size)
    with model.eval_mode():
        metric.update(x.to(model.device), class_idx=[int(t) for t in targets])
    summary = metric.summary()
    return summary["deletion_auc"], summary["insertion_auc"]


def batching_ceiling(model, x, batch_size, repeats, device):
    """The most that batching perturbed copies can gain on this device: one raw model forward of
    ``batch_size`` copies of an image vs ``batch_size`` forwards of that image alone (same work, no
    perturbing, no scoring). Returns milliseconds per image for both and their ratio."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _timing import timed

    net = model.module
    one = x[:1].to(device)
    batch = one.expand(batch_size, -1, -1, -1).contiguous()
    with model.eval_mode(), torch.inference_mode():
        alone = timed(lambda: [net(one) for _ in range(batch_size)], repeats, device)
        together = timed(lambda: net(batch), repeats, device)
    per_alone, per_together = 1000 * alone / batch_size, 1000 * together / batch_size
    return per_alone, per_together, per_alone / per_together


def run_sensitivity_cost(model, x, targets, methods, samples, batch_size, repeats, device):
    """Seconds of one explanation of the batch vs max-sensitivity with ``samples`` perturbed copies per image
    (the original maps given, as ``vitlens evaluate`` does), and their ratio."""
    import vitlens
    from vitlens.metrics.sensitivity import Explainer, sensitivity

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _timing import timed

    explainer = Explainer(model, methods, batch_size=batch_size)
    maps = explainer(x, targets)
    one = timed(lambda: vitlens.explain(model, x, methods=methods, target=targets, batch_size=batch_size),
                repeats, device)
    sens = timed(lambda: sensitivity(x, targets, explainer, maps=maps, samples=samples, batch_size=batch_size),
                 repeats, device)
    return one, sens, sens / one


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128, help="perturbed images per forward (vitlens, torchcam)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--torchcam-path", help="folder with torchcam installed (pip --target)")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--sensitivity-samples", type=int, default=0,
                        help="also time max-sensitivity with this many perturbed copies per image (e.g. 10)")
    parser.add_argument("--sensitivity-methods", default="gmar-l2",
                        help="methods explained for the sensitivity cost (comma-separated; 'all' allowed)")
    parser.add_argument("--sensitivity-only", action="store_true", help="only the sensitivity cost")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed repeats of the sensitivity cost and of the batching ceiling (median)")
    parser.add_argument("--skip-ceiling", action="store_true",
                        help="do not measure the batching ceiling (raw forwards, batch 1 vs --batch-size)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.torchcam_path:
        sys.path.insert(0, args.torchcam_path)
    model, x, maps, targets, source, images = load(args.device, args.images)
    report = {"model": source, "images": images, "steps": args.steps, "device": args.device,
              "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "torch": torch.__version__}

    if args.sensitivity_samples:
        from vitlens.methods import parse_methods

        for spec in args.sensitivity_methods.split(";"):
            methods = parse_methods(spec, model)
            one, sens, ratio = run_sensitivity_cost(model, x, targets, methods, args.sensitivity_samples, 16,
                                                    args.repeats, args.device)
            report.setdefault("sensitivity", []).append(
                {"methods": methods, "samples": args.sensitivity_samples, "images": x.shape[0],
                 "explain_s": one, "max_sensitivity_s": sens, "ratio": ratio})
            print(f"max-sensitivity, {args.sensitivity_samples} samples/image, {x.shape[0]} images, "
                  f"{','.join(methods)}: {sens:.1f} s vs one explanation {one:.1f} s -> {ratio:.2f}x", flush=True)
        if args.sensitivity_only:
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
            return 0

    if not args.skip_ceiling:
        alone, together, ceiling = batching_ceiling(model, x, args.batch_size, args.repeats, args.device)
        report["forward_ms_per_image"] = {"batch_1": alone, f"batch_{args.batch_size}": together}
        report["batching_ceiling"] = ceiling
        print(f"ceiling : a raw forward costs {alone:.1f} ms/image alone and {together:.1f} ms/image in batches of "
              f"{args.batch_size} -> batching alone can gain at most about {ceiling:.2f}x here", flush=True)

    sync(args.device)
    start = time.perf_counter()
    v_del, v_ins, v_forwards = run_vitlens(model, x, maps, targets, args.steps, args.batch_size)
    sync(args.device)
    report["vitlens_s"] = time.perf_counter() - start
    report["vitlens_forwards"] = v_forwards
    report["vitlens_auc"] = [float(v_del.mean()), float(v_ins.mean())]
    print(f"vitlens : {report['vitlens_s']:.1f} s ({v_forwards} perturbed images) deletion {v_del.mean():.4f} "
          f"insertion {v_ins.mean():.4f}", flush=True)

    if not args.skip_loop:
        start = time.perf_counter()
        l_del, l_ins, l_forwards = run_loop(model, x, maps, targets, args.steps)
        sync(args.device)
        report["loop_s"] = time.perf_counter() - start
        report["loop_forwards"] = l_forwards
        report["speedup_vs_loop"] = report["loop_s"] / report["vitlens_s"]
        report["max_abs_auc_diff_vs_loop"] = float(max(np.abs(l_del - v_del).max(), np.abs(l_ins - v_ins).max()))
        print(f"loop    : {report['loop_s']:.1f} s ({l_forwards} forwards of one image) -> vitlens is "
              f"{report['speedup_vs_loop']:.2f}x faster; max |AUC difference| {report['max_abs_auc_diff_vs_loop']:.2e}",
              flush=True)

    try:
        import torchcam  # noqa: F401
    except ImportError:
        print("torchcam: not importable (pip install --no-deps --target DIR torchcam; --torchcam-path DIR)")
    else:
        start = time.perf_counter()
        t_del, t_ins = run_torchcam(model, x, maps, targets, args.steps, args.batch_size)
        sync(args.device)
        report["torchcam_s"] = time.perf_counter() - start
        report["torchcam_version"] = torchcam.__version__ if hasattr(torchcam, "__version__") else "?"
        report["torchcam_auc"] = [t_del, t_ins]
        report["speedup_vs_torchcam"] = report["torchcam_s"] / report["vitlens_s"]
        print(f"torchcam: {report['torchcam_s']:.1f} s -> ratio torchcam/vitlens {report['speedup_vs_torchcam']:.2f}; "
              f"deletion {t_del:.4f} insertion {t_ins:.4f} (its step sizes are ceil(U/steps))", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
