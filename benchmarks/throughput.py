"""Dataset-run throughput: how close ``vitlens explain`` gets to the bare explain step, and 1 vs 2 processes.

Real ViT-Tiny/16 (ImageNet, ../shared/data/vit_tiny_in1k_augreg) on real ImageNet validation JPEGs
(../shared/data/imagenet_val_1300), CPU by default. Per method set (one method, all methods):

  bare       ``vitlens.explain(model, images, methods)`` on the same batches, images decoded beforehand
             and nothing written: the model's work alone
  pipeline   ``vitlens.runner.run_explain`` (what ``vitlens explain`` runs once the model is loaded):
             decoding, the same explain step, and writing overlays + maps + originals + records
             (``--save all``, the default) or maps + records (``--save maps``)

pipeline efficiency = pipeline images/s / bare images/s (target >= 0.9). Repeats are interleaved; the
efficiency is the median of each repeat's ratio to the bare rate measured just before it, with the
range over the repeats (a shared machine's speed drifts too much for a ratio of medians). On a CPU
whose cores all compute (the default), decoding and writing can only take their CPU time from the
model; ``--torch-threads 1`` on a 2-core machine leaves one core to them, as a GPU run leaves the CPU,
and shows whether the pipeline hides them.

``--processes`` also runs the command line end to end: ``python -m vitlens explain`` in one
process against ``torchrun --nproc-per-node 2 -m vitlens explain`` (one thread per process, as
torchrun sets it), comparing the images/s each prints (model loading excluded).

    python benchmarks/throughput.py [--images 64] [--batch 16] [--repeats 3] [--device cpu] [--processes]
                                    [--torch-threads N] [--io-cost]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import vitlens
from vitlens.data import load_sample, resolve_inputs
from vitlens.runner import run_explain

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = SHARED / "vit_tiny_in1k_augreg" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
IMAGES = SHARED / "imagenet_val_1300" / "images"
SPEC = "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def bare_rate(model, images, methods, batch, device) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        vitlens.explain(model, images[i:i + batch], methods=methods, batch_size=batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def pipeline_rate(model, samples, methods, batch, save) -> float:
    out = Path(tempfile.mkdtemp(prefix="vitlens-throughput-"))
    try:
        summary = run_explain(samples, model, methods, out_dir=out / "run", batch_size=batch, progress=False,
                              save=save)
        assert summary.explained == len(samples) and not summary.failed
        return summary.explained / summary.seconds
    finally:
        shutil.rmtree(out, ignore_errors=True)


def io_cost(model, samples, images, methods, batch) -> tuple[float, float]:
    """CPU milliseconds per image, on one thread, of decoding and of writing every file (``--save all``).

    The work the pipeline must fit beside the model: a steadier figure than the efficiency on a shared
    machine, since it is the calling thread's own time (its CPU time, not the process's).
    """
    from vitlens.cliargs import OVERLAY_MAX_SIDE
    from vitlens.outputs import RunWriter
    from vitlens.runner import decoding_size

    reduce = decoding_size(model.preprocess, OVERLAY_MAX_SIDE)  # what a default run decodes
    start = time.thread_time()
    for sample in samples:
        load_sample(sample, reduce=reduce)
    decode = (time.thread_time() - start) / len(samples)
    out = Path(tempfile.mkdtemp(prefix="vitlens-throughput-"))
    try:
        writer = RunWriter(out, model, {m: {} for m in methods}, save="all")
        spent = 0.0
        for i in range(0, len(images), batch):
            result = vitlens.explain(model, images[i:i + batch], methods=methods, batch_size=batch)
            start = time.thread_time()
            for j, sample in enumerate(samples[i:i + batch]):
                writer.write_image(sample.key, sample.path, images[i + j], result.inputs[j].crop_box, result, j)
            spent += time.thread_time() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return 1e3 * decode, 1e3 * spent / len(images)


def command_rate(command: list[str], env: dict) -> float:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return float(re.search(r"\(([\d.]+) img/s\)", done.stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", action="store_true", help="also time 1 vs 2 processes (torchrun, gloo)")
    parser.add_argument("--io-cost", action="store_true",
                        help="also report the CPU time per image of decoding and of writing every file, on one thread")
    parser.add_argument("--torch-threads", type=int,
                        help="torch's intra-op threads (default: torch's own choice, all cores); fewer leave cores "
                             "to the decoding and writing threads, as a GPU run does")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    model = vitlens.load_model(SPEC, weights=WEIGHTS, device=args.device)
    samples = resolve_inputs([str(IMAGES)], limit=args.images)
    images = [load_sample(s) for s in samples]
    sets = {"one method (rollout)": ["rollout"], "one method (attnlrp)": ["attnlrp"],
            "all methods": vitlens.methods.parse_methods("all", model)}
    print(f"{args.images} ImageNet val images, batch {args.batch}, {args.device}, torch threads "
          f"{torch.get_num_threads()}, median of {args.repeats} interleaved runs")
    print("efficiency: the median of each repeat's pipeline rate over the bare rate measured just before it "
          "(min-max over the repeats in brackets)")
    print(f"{'methods':22s} {'bare img/s':>11s} {'save all':>9s} {'eff.':>16s} {'save maps':>10s} {'eff.':>16s}")
    for name, methods in sets.items():
        bare_rate(model, images[:args.batch], methods, args.batch, args.device)  # warm-up
        rates: dict = {"bare": [], "all": [], "maps": []}
        for _ in range(args.repeats):
            rates["bare"].append(bare_rate(model, images, methods, args.batch, args.device))
            rates["all"].append(pipeline_rate(model, samples, methods, args.batch, "all"))
            rates["maps"].append(pipeline_rate(model, samples, methods, args.batch, "maps"))
        cells = []
        for kind in ("all", "maps"):
            # paired ratios: a shared machine's speed drifts by 10-20 % within minutes, a pair's much less
            ratios = [pipeline / bare for pipeline, bare in zip(rates[kind], rates["bare"])]
            spread = f"({min(ratios):.2f}-{max(ratios):.2f})"
            cells.append(f"{statistics.median(rates[kind]):9.2f} {statistics.median(ratios):5.2f} {spread:>10s}")
        print(f"{name:22s} {statistics.median(rates['bare']):11.2f} {cells[0]} {cells[1]:>27s}", flush=True)
    if args.io_cost:
        torch.set_num_threads(1)  # the writing is timed on the calling thread alone
        print(f"\nCPU ms per image on one thread, median of {args.repeats} passes: decoding, and writing every file "
              "(--save all)")
        for name, methods in sets.items():
            costs = [io_cost(model, samples, images, methods, args.batch) for _ in range(args.repeats)]
            decode, write = (statistics.median(c[k] for c in costs) for k in (0, 1))
            print(f"{name:22s} decode {decode:6.2f}   write {write:6.2f}", flush=True)

    if args.processes:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        common = ["explain", str(IMAGES), "--limit", str(args.images), "--model", SPEC, "--weights", str(WEIGHTS),
                  "--batch-size", str(args.batch), "--quiet", "--device", args.device]
        print("\ncommand line, 1 process vs torchrun 2 processes (images/s printed by vitlens, model loading excluded)")
        for name, methods in sets.items():
            one, two = [], []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    one.append(command_rate([sys.executable, "-m", "vitlens", *common, "--methods", ",".join(methods),
                                             "--out", f"{tmp}/one"], env))
                    two.append(command_rate([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                             "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "-m",
                                             "vitlens", *common, "--methods", ",".join(methods), "--out",
                                             f"{tmp}/two"], env))
            a, b = statistics.median(one), statistics.median(two)
            print(f"{name:22s} 1 process {a:7.2f} img/s   2 processes {b:7.2f} img/s   ratio {b / a:4.2f}", flush=True)


if __name__ == "__main__":
    main()
