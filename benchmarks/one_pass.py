"""One-pass engine vs baselines, measured in the same run.

ViT-Tiny/16 (224x224), a batch of 16, CPU by default. Prints three times and two ratios:

  together   all methods from vitlens.explain on the batch (one forward, one backward,
             LeGrad's per-layer partial backwards)
  (a) plain  one ordinary forward + backward of the target logits (parameter gradients included)
  (b) apart  every method computed separately, one image at a time

Targets (issue #2): together <= 1.3x (a), and >= 5x faster than (b).

    python benchmarks/one_pass.py [--batch 16] [--repeats 5] [--device cpu] [--weights FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vitlens
from _timing import timed

DEFAULT_WEIGHTS = (Path(__file__).resolve().parents[2]
                   / "shared/data/vit_tiny_in1k_augreg/vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth")




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS) if DEFAULT_WEIGHTS.is_file() else None)
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.weights:
        model = vitlens.load_model("timm:vit_tiny_patch16_224", weights=args.weights, device=args.device)
    else:
        model = vitlens.load_model(__import__("timm").create_model("vit_tiny_patch16_224"), device=args.device)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    # the six rollout-family methods of issue #2, plus the raw-attention baseline
    methods = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer"]

    def plain():
        model.module.zero_grad(set_to_none=True)
        logits = model.module(x)
        logits.gather(1, logits.argmax(-1, keepdim=True)).sum().backward()

    def together():
        vitlens.explain(model, x, methods=methods, batch_size=args.batch)

    def apart():
        for name in methods:
            for i in range(args.batch):
                vitlens.explain(model, x[i:i + 1], methods=[name])

    t_plain = timed(plain, args.repeats, args.device)
    t_together = timed(together, args.repeats, args.device)
    t_apart = timed(apart, max(1, args.repeats // 2), args.device)
    model.module.zero_grad(set_to_none=True)
    print(f"device {args.device}, batch {args.batch}, methods {', '.join(methods)}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"(a) plain forward+backward      {t_plain * 1000:9.1f} ms")
    print(f"    all methods together        {t_together * 1000:9.1f} ms   = {t_together / t_plain:.2f}x (a)   "
          f"target <= 1.3x")
    print(f"(b) each method, image by image {t_apart * 1000:9.1f} ms   "
          f"together is {t_apart / t_together:.1f}x faster   target >= 5x")


if __name__ == "__main__":
    main()
