"""vitlens AttnLRP / CP-LRP on a timm Swin against HiLRP (PyPI ``hilrp``): a throw-away agreement check.

HiLRP is no dependency of vitlens. Install it and its backend outside the project, then run:

    pip install --target /tmp/hilrppkgs --no-deps --ignore-requires-python hilrp "lxt==2.1" zennit
    PYTHONPATH=/tmp/hilrppkgs OMP_NUM_THREADS=1 python benchmarks/hilrp_swin.py [--float64] [--stabilised-zero]

(``--ignore-requires-python``: hilrp 0.2.0 asks for Python >= 3.11.11; it runs on 3.11.7.) For three random
tiny timm Swins (32x32 input, 4x4 windows, two stages of two blocks: shifted windows and a patch merging; O(1)
weights and biases) and gamma 0, 0.25, 1 (the same Gamma on every Linear and Conv2d), it prints the pixel relevance
of ``hilrp.swin_lxt.attribute_swin`` (``attn_mode='cp'`` / ``'attnlrp'``: LXT's identity rules on LayerNorm and GELU,
zennit's Gamma composite, HiLRP's window attention) against vitlens' ``cp-lrp`` / ``attnlrp`` with
``conv_gamma = lin_gamma = gamma``: the largest difference over the largest HiLRP value, and the correlation.
zennit's Gamma(0) still divides by a stabilised z + 1e-6 sign(z) where vitlens' gamma 0 is the exact gradient;
``--stabilised-zero`` gives vitlens gamma 1e-12 instead of 0 (the stabilised rule) to show that this is the whole
difference at gamma 0.
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch

import vitlens
from vitlens.engine import run_batch


def build(seed: int, dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                               window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=10)
    with torch.no_grad():  # O(1) weights: timm's init gives near-uniform attention and tiny logits
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
            elif p.dim() >= 2:
                p.normal_(std=p[0].numel() ** -0.5)
            else:
                p.normal_(mean=1.0, std=0.1)
    return module.to(dtype).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--stabilised-zero", action="store_true")
    args = parser.parse_args()
    from hilrp import swin_lxt  # patches timm's Swin classes process-wide: run in its own process

    dtype = torch.float64 if args.float64 else torch.float32
    worst = {}
    for seed in range(3):
        module = build(seed, dtype)
        x = torch.randn(1, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(seed))
        for gamma in (0.0, 0.25, 1.0):
            ours_gamma = gamma or (1e-12 if args.stabilised_zero else 0.0)
            for mode, variant in (("cp", "cp-lrp"), ("attnlrp", "attnlrp")):
                theirs = swin_lxt.attribute_swin(copy.deepcopy(module), x, target=3, gamma=gamma, attn_mode=mode)
                ours = run_batch(vitlens.load_model(copy.deepcopy(module)), x,
                                 {variant: {"conv_gamma": ours_gamma, "lin_gamma": ours_gamma}}, torch.tensor([[3]]))
                a, b = ours.patch_maps[variant][0, 0].double(), theirs["pixel_map"].double()
                err = float((a - b).abs().max() / b.abs().max())
                corr = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
                worst[gamma] = max(worst.get(gamma, 0.0), err)
                print(f"seed {seed} gamma {gamma:<4} {variant:7s} logit {theirs['logit']:+.5f} sum vitlens "
                      f"{float(a.sum()):+.6f} hilrp {float(b.sum()):+.6f} max|diff|/max|hilrp| {err:.2e} "
                      f"corr {corr:.8f}")
    print(f"{dtype}: worst max|diff|/max|hilrp| per gamma: " + ", ".join(f"{g}: {e:.1e}" for g, e in worst.items()))


if __name__ == "__main__":
    main()
