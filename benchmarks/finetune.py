"""Fine-tuning the real ImageNet ViT-Tiny on CIFAR-10 photos on this CPU, then explaining with the result.

    python benchmarks/finetune.py [--out /tmp/vitlens-finetune-cifar10] [--epochs 5] [--batch-size 16]
                                  [--input-size 128] [--threads 2] [--explain 20]

The real ViT-Tiny/16 (ImageNet-1k, ../shared/data/vit_tiny_in1k_augreg) with a new 10-class head,
fine-tuned with ``vitlens.finetune.finetune`` (transformers' Trainer, AdamW, lr 1e-4, warm-up 10 %,
cosine, fp32) on ../shared/data/cifar10_test_jpg (``imagefolder:``, 1,000 real CIFAR-10 test photos,
100 per class): the seeded split holds out 20 per class (200 images, seed 0) and trains on the
other 800 (80 per class). Input 128 x 128 by default (the position embedding resampled once from
224; the CIFAR photos are 32 x 32, so nothing is lost) to keep the CPU time modest.

Prints the validation accuracy before training (the new head) and after every epoch, the median time
of one optimizer step (batch loading, forward, backward, AdamW) and the whole training time, and
then runs ``vitlens explain HELD-OUT-IMAGES --model OUT`` with no other flag on ``--explain``
held-out photos: the predictions carry the CIFAR-10 class names, and the share of them that match
the photos' folders is printed. Writes OUT/benchmark.json with all the figures.
A second run of the same command resumes (and finds the run finished); delete OUT to measure again.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = SHARED / "vit_tiny_in1k_augreg" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
CIFAR = SHARED / "cifar10_test_jpg"
SPEC = "timm:vit_tiny_patch16_224"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/vitlens-finetune-cifar10")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--explain", type=int, default=20, help="held-out photos explained with --model OUT")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vitlens import cli
    from vitlens.data import resolve_inputs
    from vitlens.finetune import finetune, split_samples

    out = Path(args.out)
    dataset = f"imagefolder:{CIFAR}"
    started = time.perf_counter()
    result = finetune(dataset, SPEC, out, weights=WEIGHTS, val_fraction=0.2, seed=0, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, input_size=args.input_size, precision=args.precision,
                      progress=not args.quiet)
    wall = time.perf_counter() - started
    for entry in result.history:
        print(f"epoch {entry['epoch']:g} (step {entry['step']}): val accuracy {entry['val_accuracy']:.4f}")
    print(f"{result.steps} steps of {args.batch_size} images at {args.input_size} px: median "
          f"{result.seconds_per_step:.3f} s/step ({args.threads} threads); training {result.seconds:.0f} s with the "
          f"validations and checkpoints, {wall:.0f} s with loading")

    # the held-out photos (the same seeded split), explained with the fine-tuned folder and no other flag
    _, held_out = split_samples(resolve_inputs(dataset), 0.2, 0)
    chosen = held_out[::max(1, len(held_out) // args.explain)][:args.explain]
    run_dir = out / "explain-held-out"
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["explain", *[s.path for s in chosen], "--model", str(out), "--methods", "rollout,legrad",
                         "--out", str(run_dir), "--quiet", "--force"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    names = {Path(s.path).name: Path(s.path).parent.name for s in chosen}
    predicted = [(names[Path(r["path"]).name], r["prediction"]["name"]) for r in manifest["images"]]
    right = sum(truth == name for truth, name in predicted)
    print(f"vitlens explain --model {out} on {len(predicted)} held-out photos: exit {code}, predictions "
          f"{sorted({name for _, name in predicted})}, {right}/{len(predicted)} match the photos' classes")
    figures = {"steps": result.steps, "seconds_per_step": result.seconds_per_step, "train_seconds": result.seconds,
               "threads": args.threads,
               "batch_size": args.batch_size, "input_size": args.input_size, "epochs": args.epochs, "lr": args.lr,
               "precision": args.precision, "train_images": result.train_images, "val_images": result.val_images,
               "history": result.history, "wall_seconds": wall, "explain_exit": code,
               "explain_predictions": predicted, "explain_correct": right}
    (out / "benchmark.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
