"""Cost of single methods, each explained alone, as a ratio to a plain forward+backward measured in the same run.

Real ViT-Tiny/16 (../shared/data), 224 x 224, a batch of random images, CPU by default. For the
model-agnostic methods the time per perturbed forward is printed too (RISE: per mask; occlusion: per window).

    python benchmarks/method_cost.py [--batch 8] [--repeats 3] [--methods chefer,transformer-attribution,...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vitlens
from _timing import timed

DEFAULT_WEIGHTS = (Path(__file__).resolve().parents[2]
                   / "shared/data/vit_tiny_in1k_augreg/vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth")
METHODS = "chefer,attention-gradcam,transformer-attribution,attnlrp,saliency,input-x-gradient,rise,occlusion"
# parameters that keep the model-agnostic methods short; the per-mask / per-window time does not depend on them
PARAMS = {"rise": {"masks": 64}, "occlusion": {"window": 56, "stride": 56}, "integrated-gradients": {"steps": 16}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--libragrad", action="store_true", help="also chefer and gradcam with libragrad=true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = vitlens.load_model("timm:vit_tiny_patch16_224", weights=str(DEFAULT_WEIGHTS), device=args.device)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)

    def plain():
        model.module.zero_grad(set_to_none=True)
        logits = model.module(x)
        logits.gather(1, logits.argmax(-1, keepdim=True)).sum().backward()

    t_plain = timed(plain, args.repeats, args.device)
    print(f"device {args.device}, batch {args.batch}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"plain forward + backward {t_plain * 1000:9.1f} ms")
    runs = [(name, name, PARAMS.get(name, {})) for name in args.methods.split(",")]
    if args.libragrad:
        runs += [(f"{name} (libragrad)", name, {"libragrad": True}) for name in ("chefer", "gradcam")]
    for label, name, params in runs:
        def explain(name=name, params=params):
            vitlens.explain(model, x, methods=[name], batch_size=args.batch, params={name: params}, warn=False)

        t = timed(explain, args.repeats, args.device)
        extra = ""
        if name == "rise":
            extra = f"   {t / (params['masks'] * args.batch) * 1000:.2f} ms per mask and image"
        elif name == "occlusion":
            windows = ((224 - params["window"]) // params["stride"] + 1) ** 2 + 1
            extra = f"   {t / (windows * args.batch) * 1000:.2f} ms per window and image"
        print(f"{label:34s} {t * 1000:9.1f} ms   {t / t_plain:6.2f}x plain{extra}")


if __name__ == "__main__":
    main()
