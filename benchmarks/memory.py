"""Peak memory of `explain` with the six rollout-family methods, divided by that of a plain forward+backward.

Each measurement runs in a fresh subprocess, so that neither the allocator's cache nor another
measurement's peak is counted: on CPU the process's peak resident set size (``ru_maxrss``), which
includes the weights and the torch runtime of both; on CUDA ``torch.cuda.max_memory_allocated``.
The models are random-init timm ViTs built from their configs (no weights needed), the input random.

  plain     one ordinary forward + backward of the predicted classes' logits (parameter gradients included)
  explain   vitlens.explain with rollout, gmar-l1, gmar-l2, gmar++, legrad, chefer on the same batch

Target (issue #17): explain <= 1.2x plain. On CPU the peak resident set size varies from run to run by up to
0.25 GiB (which of glibc's per-thread arenas a freed block returns to depends on thread scheduling): each mode is
measured ``--repeats`` times (fresh processes, interleaved) and the medians are compared.

    python benchmarks/memory.py [--cases vit_base_patch16_224:8,vit_large_patch16_384:2] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

METHODS = ["rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer"]


def measure(name: str, batch: int, mode: str, device: str) -> dict:
    """Run in the child: build the model, run ``mode`` once, report the peak (bytes) and the baseline."""
    import resource

    import timm
    import torch

    import vitlens

    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False).eval().to(device)
    size = module.default_cfg["input_size"][1:]
    x = torch.randn(batch, 3, *size, device=device)
    model = vitlens.load_model(module)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if mode == "plain":
        logits = module(x)
        logits.gather(1, logits.argmax(-1, keepdim=True)).sum().backward()
    else:
        vitlens.explain(model, x, methods=METHODS, batch_size=batch, warn=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak": peak, "before": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="vit_base_patch16_224:8,vit_large_patch16_384:2",
                        help="comma-separated timm model:batch pairs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per mode; the medians are compared")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "BATCH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, batch, mode = args.child
        print(json.dumps(measure(name, int(batch), mode, args.device)))
        return

    import torch

    print(f"device {args.device}, torch {torch.__version__}, methods {', '.join(METHODS)}")
    for case in args.cases.split(","):
        name, batch = case.split(":")
        peaks: dict = {"plain": [], "explain": []}
        for _ in range(args.repeats):
            for mode in ("plain", "explain"):
                out = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", name, batch, mode],
                                     capture_output=True, text=True, env={**os.environ}, check=True)
                peaks[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        plain = statistics.median(p["peak"] for p in peaks["plain"])
        explain = statistics.median(p["peak"] for p in peaks["explain"])
        runs = ", ".join(f"{p['peak'] / 2**30:.2f}" for p in peaks["explain"])
        print(f"{name} batch {batch}: plain {plain / 2**30:6.2f} GiB   explain {explain / 2**30:6.2f} GiB "
              f"(runs {runs})   = {explain / plain:.2f}x plain   (before the call: "
              f"{peaks['plain'][0]['before'] / 2**30:.2f} GiB)   target <= 1.2x")


if __name__ == "__main__":
    main()
