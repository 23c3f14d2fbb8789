"""AttnLRP cost, measured in the same run.

    python benchmarks/lrp.py [--batch 16] [--repeats 5] [--lin-gamma 0.5] [--conv-gamma 1.0]

Prints, for ViT-Tiny/16 at 224x224 on the CPU:
  * per-image time of attnlrp vs one plain forward + backward of the same image (target <= 1.5x),
    for gamma 0 (plain LRP rules) and for the requested gamma;
  * batched attnlrp (B images in one call) vs one image at a time (speed-up ratio).
"""

from __future__ import annotations

import argparse
import functools

import timm
import torch

import vitlens
from _timing import timed




def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--conv-gamma", type=float, default=1.0)
    parser.add_argument("--lin-gamma", type=float, default=0.5)
    args = parser.parse_args()
    torch.manual_seed(0)
    module = timm.create_model("vit_tiny_patch16_224").eval()
    model = vitlens.load_model(module)
    x = torch.randn(args.batch, 3, 224, 224)
    one = x[:1]

    def plain():
        module.zero_grad(set_to_none=True)
        logits = module(one)
        logits[0, logits[0].argmax()].backward()

    t_plain = timed(plain, args.repeats)
    print(f"ViT-Tiny/16, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"plain forward+backward, 1 image          {t_plain * 1000:8.1f} ms")
    for conv, lin in ((0.0, 0.0), (args.conv_gamma, args.lin_gamma)):
        params = {"attnlrp": {"conv_gamma": conv, "lin_gamma": lin}}
        t_one = timed(functools.partial(vitlens.explain, model, one, methods=["attnlrp"], params=params), args.repeats)
        print(f"attnlrp gamma conv {conv:g} / lin {lin:g}, 1 image  {t_one * 1000:8.1f} ms = "
              f"{t_one / t_plain:.2f}x plain   (target <= 1.5x)")
    params = {"attnlrp": {"conv_gamma": args.conv_gamma, "lin_gamma": args.lin_gamma}}
    t_batch = timed(lambda: vitlens.explain(model, x, methods=["attnlrp"], params=params, batch_size=args.batch),
                    max(1, args.repeats // 2))
    t_loop = timed(lambda: [vitlens.explain(model, x[i:i + 1], methods=["attnlrp"], params=params)
                            for i in range(args.batch)], max(1, args.repeats // 2))
    print(f"attnlrp, {args.batch} images: batched {t_batch * 1000:8.1f} ms, one at a time {t_loop * 1000:8.1f} ms,"
          f" batched is {t_loop / t_batch:.2f}x faster")


if __name__ == "__main__":
    main()
