"""Sensitivity and specificity of every method on real ImageNet validation images with the real ViT-Tiny.

Calls the same functions as ``vitlens evaluate --metrics sensitivity,specificity``
(:func:`vitlens.metrics.sensitivity.sensitivity`, :func:`vitlens.metrics.specificity.class_contrast`,
:func:`vitlens.metrics.specificity.two_object_share`) but lets each part use its own number of
images, so that a loaded CPU box can afford AttnLRP (about 4x the cost of all other methods
together). Per-image values are appended to ``OUT/values.jsonl`` batch by batch (a stopped run
keeps what it finished), the table (mean ± half-width of the 95 % Student-t CI) goes to
``OUT/table.md``.

Usage (from the repository root)::

    python benchmarks/sensitivity_specificity.py --out ss-run \
        --contrast-images 200 --sens-images 64 --samples 4 \
        --lrp-contrast-images 24 --lrp-sens-images 12 --lrp-samples 3
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = SHARED / "vit_tiny_in1k_augreg" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
VAL = SHARED / "imagenet_val_1300"
CATDOG = SHARED / "demo_images" / "chefer_catdog.png"
SPEC = "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"
CHEAP = ("attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "gradcam", "gradcam++",
         "random", "center")
LRP = ("attnlrp",)


def write(out: Path, record: dict) -> None:
    with (out / "values.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def main(argv=None) -> int:
    import vitlens
    from vitlens.api import prepare_inputs
    from vitlens.metrics.sensitivity import Explainer, sensitivity
    from vitlens.metrics.specificity import CATDOG as CATDOG_BOXES
    from vitlens.metrics.specificity import class_contrast, two_object_share

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="ss-run")
    p.add_argument("--contrast-images", type=int, default=200)
    p.add_argument("--sens-images", type=int, default=64)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--radius", type=float, default=0.05)
    p.add_argument("--lrp-contrast-images", type=int, default=24)
    p.add_argument("--lrp-sens-images", type=int, default=12)
    p.add_argument("--lrp-samples", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sens-from", type=int, default=0, help="sensitivity only from this image on (to extend a run)")
    p.add_argument("--no-lrp", action="store_true", help="only the non-LRP methods")
    p.add_argument("--only-lrp", action="store_true", help="only AttnLRP (its own image counts)")
    p.add_argument("--contrast-from", type=int, default=0, help="class contrast only from this image on")
    p.add_argument("--no-two-object", action="store_true")
    p.add_argument("--append", action="store_true", help="append to OUT/values.jsonl instead of starting it anew")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.append:
        (out / "values.jsonl").write_text("")
    with (out / "args.json").open("a") as fh:
        fh.write(json.dumps(vars(args)) + "\n")
    model = vitlens.load_model(SPEC, weights=WEIGHTS)
    with (VAL / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    files = [str(VAL / r["file"]) for r in rows]
    start = time.time()

    def log(text):
        print(f"[{time.time() - start:7.1f} s] {text}", flush=True)

    # two objects: chefer_catdog.png (224 x 224, preprocessing = resize 248 + centre crop 224)
    cd, records = prepare_inputs(model, [str(CATDOG)])
    crop = records[0].crop_box
    from vitlens.metrics.localisation import boxes_to_input
    from vitlens.metrics.specificity import LabelledBox

    objects = [[LabelledBox(o.label, boxes_to_input([o.box], crop, tuple(cd.shape[-2:]))[0]) for o in CATDOG_BOXES]]
    two_object_sets = (() if args.no_two_object else (CHEAP,) if args.no_lrp else (LRP,) if args.only_lrp
                       else (CHEAP, LRP))
    for methods in two_object_sets:
        res = two_object_share(cd, objects, Explainer(model, list(methods)))
        for m, v in res.items():
            write(out, {"part": "two_object", "method": m, "image": "chefer_catdog.png",
                        **{k: float(t[0]) for k, t in v.items()}})
    log("two-object test done")

    plan = [(CHEAP, args.contrast_images, args.sens_images, args.samples),
            (LRP, args.lrp_contrast_images, args.lrp_sens_images, args.lrp_samples)]
    plan = plan[1 if args.only_lrp else 0:1 if args.no_lrp else 2]
    for methods, n_contrast, n_sens, samples in plan:
        ex = Explainer(model, list(methods), batch_size=args.batch_size)
        starts = [a for a, n in ((args.contrast_from, n_contrast), (args.sens_from, n_sens)) if n > a]
        first = min(starts, default=0)
        first -= first % args.batch_size
        for s0 in range(first, max(n_contrast, n_sens), args.batch_size):
            chunk = files[s0:min(s0 + args.batch_size, max(n_contrast, n_sens))]
            x, _ = prepare_inputs(model, chunk)
            logits = ex.logits(x)
            targets = logits.argmax(1)
            keep_c = [i for i in range(len(chunk)) if args.contrast_from <= s0 + i < n_contrast]
            keep_s = [i for i in range(len(chunk)) if args.sens_from <= s0 + i < n_sens]
            original = None
            if keep_c:
                con = class_contrast(x[keep_c], targets[keep_c], ex, logits=logits[keep_c], seed=args.seed)
                if set(keep_s) <= set(keep_c):  # the explained class's maps come with the contrast call
                    original = {m: v[[keep_c.index(i) for i in keep_s]] for m, v in con["_maps"].items()}
                for m in methods:
                    for j, i in enumerate(keep_c):
                        write(out, {"part": "contrast", "method": m, "image": Path(chunk[i]).name,
                                    **{k: float(t[j]) for k, t in con[m].items()}})
            if keep_s and samples:
                sens = sensitivity(x[keep_s], targets[keep_s], ex, radius=args.radius, samples=samples,
                                   seed=args.seed, batch_size=args.batch_size, maps=original)
                for m in methods:
                    for j, i in enumerate(keep_s):
                        write(out, {"part": "sensitivity", "method": m, "image": Path(chunk[i]).name,
                                    **{k: float(t[j]) for k, t in sens[m].items() if k != "distances"}})
            log(f"{','.join(methods)[:40]}: images {s0 + len(chunk)} (contrast {len(keep_c)}, sensitivity "
                f"{len(keep_s)} x {samples})")
    table(out)
    log("done")
    return 0


def table(out: Path) -> str:
    from vitlens.metrics.stats import mean_ci

    values: dict = {}
    for line in (out / "values.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k, v in r.items():
            if k in ("part", "method", "image"):
                continue
            values.setdefault(r["method"], {}).setdefault(k, []).append(math.nan if v is None else v)
    names = ["max_sensitivity", "avg_sensitivity", "lipschitz", "contrast_rank_2nd", "contrast_l1_2nd",
             "contrast_rank_random", "contrast_l1_random", "object_share", "object_contrast"]
    lines = ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for method, per in values.items():
        cells = []
        for n in names:
            iv = mean_ci(per.get(n, []))
            if iv.n == 0:
                cells.append("—")
            elif iv.n == 1:
                cells.append(f"{iv.mean:.3f}")
            else:
                cells.append(f"{iv.mean:.3f} ± {iv.half_width:.3f} (n={iv.n})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--table":
        print(table(Path(sys.argv[2])))
        sys.exit(0)
    sys.exit(main())
