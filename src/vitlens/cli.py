"""The ``vitlens`` command line.

Exit codes: 0 all went well, 1 some inputs failed (listed at the end and in the manifest),
2 a usage error (bad option, unknown method or model, unreadable weights...), 130 interrupted.
User mistakes print one line, never a traceback, and are found before anything is written (the
table of them: docs/errors.md). What both this module and ``vitlens text`` parse and check lives in
:mod:`vitlens.cliargs`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vitlens.cliargs import (OVERLAY_MAX_SIDE, SIGNED_CMAP, SIGNED_DISPLAYS, check_count, check_out_dir, check_overlay,
                             check_overlay_max_side,
                             check_params_requested, check_prompts_given, check_target, class_indices,
                             parse_method_params, parse_params, parse_save, parse_target, prompt_options,
                             select_device)
from vitlens.text import cli as text_cli

DEFAULT_MODEL = "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"
FALLBACK_MODEL = "vitlens:efficientnet_lite0"
DEMO_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


class ArgumentError(Exception):
    """Raised by the argument parser instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage block
        raise ArgumentError(f"{self.prog}: {message}")


def with_shared_options(params: dict, methods: list, args) -> dict:
    """Apply ``--target-layer`` to the Grad-CAM family and ``--conv-gamma/--lin-gamma`` to LRP."""
    from vitlens.methods import CAM, LRP, get_method

    layers = getattr(args, "target_layer", None)
    for name in methods:
        needs = get_method(name).needs
        if layers and CAM in needs:
            params.setdefault(name, {})["layers"] = list(layers)
        if LRP in needs:
            for option in ("conv_gamma", "lin_gamma"):
                value = getattr(args, option, None)
                if value is not None:
                    params.setdefault(name, {})[option] = value
    return params


def _add_model_options(p):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="timm:NAME[.TAG], hf:ORG/NAME, a local HF directory, torchvision:NAME, "
                        "or vitlens:efficientnet_lite0 (default: %(default)s)")
    p.add_argument("--weights", help="local checkpoint (.pth/.pt/.bin/.safetensors) instead of hub weights")
    p.add_argument("--num-classes", type=int, help="classifier size, when it differs from the pretrained config")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--input-size", metavar="SIZE", help="model input size, N or HxW (default: the model's own)")
    p.add_argument("--mean", help="normalisation mean of [0, 1] pixels: one value or R,G,B (default: the model's own)")
    p.add_argument("--std", help="normalisation std: one value or R,G,B (default: the model's own)")
    p.add_argument("--interpolation", help="resize filter: nearest, bilinear, bicubic, lanczos, box, hamming "
                                           "(default: the model's own)")
    p.add_argument("--attention-layers", action="append", metavar="PATTERN",
                   help="glob pattern of the attention modules, e.g. 'encoder.layers.*.self_attn' (repeatable or "
                        "comma-separated): read the model with the generic attention adapter")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="CLIP-style models (CLIP, SigLIP, OpenCLIP): a text prompt, one class per prompt (repeatable); "
                        "--target is a prompt's index or text, or pred")
    p.add_argument("--classes", metavar="FILE_OR_LIST",
                   help="CLIP-style models: zero-shot class names, a file with one per line or a comma-separated list, "
                        "each filled into --template; --target is a class name or index")
    p.add_argument("--template", metavar="TEXT",
                   help="the zero-shot prompt of --classes, with {} for the class name (default: 'a photo of a {}.')")


def _add_method_options(p, default="all"):
    p.add_argument("--methods", default=default, help="comma-separated method names, or 'all' (default: %(default)s)")
    p.add_argument("--param", action="append", metavar="METHOD.NAME=VALUE",
                   help="method parameter, e.g. rollout.discard_ratio=0.9 (repeatable)")
    p.add_argument("--target", default=None,
                   help="pred (default), a class INDEX or NAME, topK (e.g. top3), or label (the ground truth)")
    p.add_argument("--target-layer", action="append", metavar="NAME",
                   help="Grad-CAM target layer (e.g. layer4, features.7, blocks.11.norm1); repeat to fuse several")
    p.add_argument("--conv-gamma", type=float, help="LRP Gamma of Conv2d layers (attnlrp, cp-lrp; default 1.0)")
    p.add_argument("--lin-gamma", type=float, help="LRP Gamma of Linear layers (attnlrp, cp-lrp; default 0.5)")


def _add_dataset_options(p):
    p.add_argument("--image-column", help="hf-dataset: the column of the images (default: the one Image feature)")
    p.add_argument("--label-column",
                   help="hf-dataset: the column of the labels (default: the one ClassLabel, or an integer 'label')")


def _add_output_options(p):
    p.add_argument("--save", default="all", metavar="KINDS",
                   help="what to write besides the per-image records: comma-separated overlays, maps, originals, "
                        "or all (default: %(default)s; 'maps' alone for large runs)")
    p.add_argument("--overlay-max-side", default=str(OVERLAY_MAX_SIDE), metavar="PIXELS",
                   help="longest side of the overlays, or 'full' for the original resolution (default: %(default)s)")
    p.add_argument("--io-workers", type=int, metavar="N",
                   help="threads that decode images and as many that write outputs (default: up to 4)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="most memory one pass may use, e.g. 8GB or 512MiB: a batch over it is explained in chunks "
                        "(default: 80%% of the free memory)")
    p.add_argument("--signed-display", choices=SIGNED_DISPLAYS, default="signed",
                   help="overlays of signed methods (AttnLRP, CP-LRP): 'signed' relevance, red positive and blue "
                        "negative around the untouched photo, or its 'positive' part like other maps (default: "
                        "%(default)s)")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (default), bf16 or fp16: the model's forward and backward under autocast, maps combined "
                        "in float32 (AttnLRP / CP-LRP always run in fp32)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitlens",
                     description="Explain vision transformers: heatmaps, overlays, comparisons, reports.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("explain", help="explain images, folders or datasets; write overlays, maps and a manifest")
    p.add_argument("inputs", nargs="+",
                   help="image files, folders, globs, or imagefolder:/tinyimagenet:/cub200:/imagenet-val:/hf-dataset: "
                        "specs")
    _add_model_options(p)
    _add_method_options(p)
    p.add_argument("--out", default="results", help="output directory (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--labels",
                   help="labels file for imagenet-val: or plain inputs (CSV file,label or 'file index' lines)")
    p.add_argument("--class-index",
                   help="mapping from the model's output index to class ids (index<TAB>wnid<TAB>words)")
    p.add_argument("--limit", type=int, help="explain only the first N inputs")
    _add_dataset_options(p)
    p.add_argument("--cmap", default="jet", help="overlay colormap (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity 0..1 (default: %(default)s)")
    p.add_argument("--format", choices=["files", "html"], default="files", help="html also writes report.html")
    _add_output_options(p)
    p.add_argument("--resume", action="store_true",
                   help="continue a run in --out (also the default when settings match)")
    p.add_argument("--force", action="store_true", help="recompute everything even if --out holds finished work")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("evaluate",
                       help="score methods on a dataset: deletion/insertion, perturbation, localisation, sanity")
    p.add_argument("inputs", nargs="+", help="dataset, folder, glob or files (as for explain)")
    _add_model_options(p)
    _add_method_options(p)
    p.add_argument("--metrics", default="faithfulness",
                   help="comma-separated metrics or groups: faithfulness, localisation, all, deletion, insertion, "
                        "pos_perturbation, neg_perturbation, drop_increase, pointing_game, energy_in_box, "
                        "segmentation, sanity, sensitivity, specificity, two_object (default: %(default)s)")
    p.add_argument("--metric-param", action="append", metavar="METRIC.NAME=VALUE",
                   help="metric parameter, e.g. deletion.steps=10, insertion.baseline=zero (repeatable)")
    p.add_argument("--steps", type=int, help="deletion and insertion steps (default 20)")
    p.add_argument("--baseline", choices=["zero", "mean", "blur", "noise"],
                   help="baseline of every perturbation metric (default: deletion zero, insertion blur)")
    p.add_argument("--granularity", choices=["pixel", "patch"], default="pixel", help="perturbation units")
    p.add_argument("--masks", help="folder of foreground masks (<image stem>.png) for the segmentation metric")
    p.add_argument("--seed", type=int, default=0, help="ties, noise baseline, sanity randomisation (default 0)")
    p.add_argument("--out", default="evaluation", help="output directory (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images explained per batch")
    p.add_argument("--perturb-batch-size", type=int, default=128, help="perturbed images per forward pass")
    _add_output_options(p)
    p.add_argument("--labels", help="labels file for imagenet-val: or plain inputs")
    p.add_argument("--class-index", help="mapping from the model's output index to class ids")
    p.add_argument("--limit", type=int, help="evaluate only the first N inputs")
    _add_dataset_options(p)
    p.add_argument("--force", action="store_true", help="recompute everything even if --out holds finished work")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("compare", help="one grid PNG: rows = images (x targets), columns = original + each method")
    p.add_argument("inputs", nargs="+", help="image files")
    _add_model_options(p)
    _add_method_options(p)
    p.add_argument("--out", default="compare.png", help="output PNG (default: %(default)s)")
    p.add_argument("--gamma-sweep", metavar="CONV:LIN,...",
                   help="instead of --methods: one attnlrp column per Gamma setting, e.g. 0.1:0,1:0.5,100:1")
    p.add_argument("--cmap", default="jet")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--signed-display", choices=SIGNED_DISPLAYS, default="signed",
                   help="columns of signed methods (AttnLRP, CP-LRP): 'signed' relevance or its 'positive' part "
                        "(default: %(default)s)")

    p = sub.add_parser("report", help="write RUN_DIR/report.html from a run's manifest")
    p.add_argument("run_dir")
    p.add_argument("--title")

    p = sub.add_parser("demo", help="explain a few real photos with the default model and write a report")
    _add_model_options(p)
    p.add_argument("--out", default="vitlens-demo", help="output directory (default: %(default)s)")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("methods", help="list the explanation methods and their parameters")

    p = sub.add_parser("cache-weights", help="put a local checkpoint into the Hugging Face cache so SPEC loads offline")
    p.add_argument("spec", help="timm:NAME.TAG the weights belong to")
    p.add_argument("file", help="checkpoint file (.pth/.pt/.bin/.safetensors)")

    p = sub.add_parser("download", help="fetch TinyImageNet-200 or CUB-200-2011: verify, resume, extract, check")
    p.add_argument("dataset", help="tinyimagenet or cub200")
    p.add_argument("dir", help="folder that receives tiny-imagenet-200/ or CUB_200_2011/ (created if needed)")
    p.add_argument("--base-url", metavar="URL",
                   help="fetch URL/<archive name> instead of the official server (default: $VITLENS_DOWNLOAD_BASE, "
                        "else the official URL)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("finetune", help="train a new classifier head (and the backbone) on a labelled dataset; "
                                        "writes a model folder that --model DIR loads")
    p.add_argument("inputs", nargs="+", help="labelled dataset: imagefolder:/tinyimagenet:/cub200:/imagenet-val:/"
                                             "hf-dataset: specs, or files/folders with --labels")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="timm:NAME[.TAG], hf:ORG/NAME or a local HF directory (default: %(default)s)")
    p.add_argument("--weights", help="local checkpoint of the pretrained model instead of hub weights")
    p.add_argument("--out", required=True, help="output folder: weights, class_index.txt, vitlens_model.json, "
                                                "checkpoints/ (the same command again resumes)")
    p.add_argument("--val", action="append", metavar="DATASET",
                   help="validation dataset, e.g. the dataset's own :val split (default: a seeded split of the inputs)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of each class held out for validation without --val (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="default: %(default)s")
    p.add_argument("--max-steps", type=int, help="optimizer steps in all (wins over --epochs)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="default: %(default)s")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="share of the steps with a linear warm-up, then cosine decay (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per optimizer step over all processes (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="forwards accumulated per step (default: %(default)s)")
    p.add_argument("--precision", default="fp32", help="fp32 (default), bf16 (CPU and GPU) or fp16 (CUDA)")
    p.add_argument("--seed", type=int, default=0, help="split, head, shuffling, augmentation (default: %(default)s)")
    p.add_argument("--input-size", metavar="SIZE", help="train at another input size, N or HxW (timm models)")
    p.add_argument("--no-augment", action="store_true", help="no random resized crop and flip")
    p.add_argument("--labels", help="labels file for imagenet-val: or plain inputs")
    p.add_argument("--class-index", help="class order of the dataset's classes (index<TAB>class id[<TAB>words])")
    p.add_argument("--limit", type=int, help="use only the first N inputs")
    _add_dataset_options(p)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (also the default when its settings match)")
    p.add_argument("--force", action="store_true", help="start over even if --out holds checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("text", help="text transformers: attention views, head statistics, token attributions")
    text_cli.add_arguments(p)
    return parser


def main(argv=None) -> int:
    from vitlens.errors import VitlensError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.version:
            import vitlens

            print(f"vitlens {vitlens.__version__}")
            return 0
        if args.command is None:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except ArgumentError as exc:
        _error_line(f"{exc}  (see vitlens --help)")
        return 2
    except VitlensError as exc:
        # one line even if a library's message spans several
        _error_line("vitlens: error: " + " ".join(str(exc).split()))
        return exc.exit_code
    except KeyboardInterrupt:
        _error_line("vitlens: interrupted; run the same command again to resume")
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (`vitlens methods | head`): not an error; stdout is pointed
        # at devnull so that Python's flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _error_line(text: str) -> None:
    """One line on stderr in one write: the ranks of a torchrun run share the stream, and their lines must not
    run into each other."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _load(args):
    """The model the options name (--model, --weights, --num-classes, --device, preprocessing, attention layers): the
    one place they become a model. Under torchrun a plain ``cuda`` is this process's GPU (``LOCAL_RANK``)."""
    import vitlens
    from vitlens.distributed import local_device

    device = local_device(select_device(args.device))
    model = vitlens.load_model(args.model, weights=args.weights, num_classes=args.num_classes, device=device,
                               input_size=args.input_size, mean=args.mean, std=args.std,
                               interpolation=args.interpolation, attention_layers=args.attention_layers,
                               **prompt_options(args))
    check_prompts_given(model)
    return model


def _check_options(args) -> None:
    """The options that need no model: checked before inputs are read, a model is loaded or anything is written."""
    for option in ("batch_size", "perturb_batch_size", "limit"):
        value = getattr(args, option, None)
        if value is not None:
            check_count(value, "--" + option.replace("_", "-"))
    if hasattr(args, "alpha"):
        check_overlay(args.cmap, args.alpha)
    if hasattr(args, "save"):
        parse_save(args.save)
        args.overlay_max_side = check_overlay_max_side(args.overlay_max_side)
        if args.io_workers is not None:
            check_count(args.io_workers, "--io-workers")
        from vitlens.engine import precision_name

        args.precision = precision_name(args.precision, option="--precision")
        from vitlens.memory import parse_size

        parse_size(args.memory_budget, option="--memory-budget")
    select_device(getattr(args, "device", None))
    prompt_options(args)


def _dataset(args):
    """The samples the inputs name (checked, nothing written), and a check of --out; then the torchrun process group
    of a distributed run (one process otherwise) as a context: joined after every check that needs neither the model
    nor the group, so a usage mistake never waits for the other ranks."""
    from vitlens.data import resolve_inputs
    from vitlens.distributed import joined, local_device

    samples = resolve_inputs(args.inputs, labels=args.labels, class_index=args.class_index, limit=args.limit,
                             image_column=args.image_column, label_column=args.label_column)
    check_out_dir(args.out)
    return samples, joined(local_device(select_device(args.device)))


def _check_for_model(model, methods: list, params: dict, target, allow_label: bool = False) -> None:
    """What depends on the loaded model (layer indices, Grad-CAM layer names, target classes), checked
    right after loading it and before anything is written."""
    from vitlens.methods import check_params_for_model, get_method

    check_params_requested(params, methods)
    resolved = {name: get_method(name).params(params.get(name)) for name in methods}
    check_params_for_model(resolved, model.num_layers if model.has_attention else None, model)
    check_target(model, target, allow_label=allow_label)


def cmd_explain(args) -> int:
    from vitlens.methods import parse_methods
    from vitlens.runner import EveryImage, run_explain

    methods = parse_methods(args.methods)
    params = parse_method_params(args.param)
    check_params_requested(params, methods)
    _check_options(args)
    samples, group_context = _dataset(args)
    with group_context as group:
        model = _load(args)
        if args.class_index:
            _name_classes_from_index(model, args.class_index)
        methods = parse_methods(args.methods, model)
        params = with_shared_options(params, methods, args)
        target = parse_target(args.target, model)
        _check_for_model(model, methods, params, target, allow_label=True)
        if isinstance(target, list):  # several classes, each explained for every image
            target = EveryImage(class_indices(model, target))
        summary = run_explain(samples, model, methods, params, target, args.out, batch_size=args.batch_size,
                              resume=not args.force, progress=not args.quiet, cmap=args.cmap, alpha=args.alpha,
                              html=args.format == "html", save=args.save, overlay_max_side=args.overlay_max_side,
                              io_workers=args.io_workers, group=group, precision=args.precision,
                              signed_display=args.signed_display, memory_budget=args.memory_budget)
    if group.is_main:
        _print_summary(summary)
    return 1 if summary.failed else 0


def cmd_evaluate(args) -> int:
    from vitlens.evaluate import metric_options, run_evaluate
    from vitlens.methods import parse_methods
    from vitlens.metrics import parse_metrics

    methods = parse_methods(args.methods)
    metrics = parse_metrics(args.metrics)
    params = parse_method_params(args.param)
    check_params_requested(params, methods)
    metric_params = metric_options(metrics, parse_params(args.metric_param, "--metric-param", "METRIC.NAME=VALUE",
                                                         "deletion.steps=10"), args.steps, args.baseline)
    _check_options(args)
    samples, group_context = _dataset(args)
    with group_context as group:
        model = _load(args)
        methods = parse_methods(args.methods, model)
        params = with_shared_options(params, methods, args)
        target = parse_target(args.target, model)
        _check_for_model(model, methods, params, target, allow_label=True)
        summary = run_evaluate(samples, model, methods, params, metrics, metric_params, target,
                               args.out, batch_size=args.batch_size, perturb_batch_size=args.perturb_batch_size,
                               granularity=args.granularity, resume=not args.force, progress=not args.quiet,
                               seed=args.seed, masks_dir=args.masks, source=f"'{' '.join(args.inputs)}'",
                               save=args.save, overlay_max_side=args.overlay_max_side, io_workers=args.io_workers,
                               group=group, precision=args.precision, signed_display=args.signed_display,
                               memory_budget=args.memory_budget)
    if group.is_main:
        _print_summary(summary.run)
        print(f"tables: {summary.files['md']}  {summary.files['csv']}  {summary.files['json']}")
    return 1 if summary.run.failed else 0


def _print_summary(summary) -> None:
    done = summary.explained
    rate = done / summary.seconds if summary.seconds > 0 and done else 0.0
    print(f"explained {done} image(s), {summary.skipped} already done, {len(summary.failed)} failed "
          f"in {summary.seconds:.1f}s ({rate:.2f} img/s)")
    for _key, _path, error in summary.failed:
        print(f"  failed: {error}")
    print(f"outputs: {summary.out_dir}  manifest: {summary.manifest}")
    if summary.report:
        print(f"report: {summary.report}")
    _print_warnings(summary.warnings)


def _print_warnings(lines: list) -> None:
    """Maps that show nothing, one line each on stderr (also in the manifest and the report)."""
    for line in lines:
        print(f"vitlens: warning: {line}", file=sys.stderr)


def _name_classes_from_index(model, path) -> None:
    """Name the model's classes from a --class-index file when the model has no names of its own."""
    from vitlens.data.labelfiles import read_class_index

    if model.class_names is not None and len(model.class_names) == model.num_classes:
        return
    index = read_class_index(path)
    names = [None] * model.num_classes
    for key, position in index.indices.items():
        if 0 <= position < len(names):
            names[position] = index.names.get(key, key)
    if all(name is not None for name in names):
        model.class_names = names


def cmd_compare(args, model=None) -> int:
    import torch

    import vitlens
    from vitlens.data import load_image
    from vitlens.methods import get_method, parse_methods
    from vitlens.outputs import crop_box_pixels
    from vitlens.render import GridRow, compare_grid

    if getattr(args, "gamma_sweep", None):
        return _gamma_sweep(args, model)
    methods = parse_methods(args.methods)
    params = parse_method_params(args.param)
    check_params_requested(params, methods)
    _check_options(args)
    _check_grid_out(args.out)
    images = [load_image(path) for path in args.inputs]
    model = model or _load(args)
    methods = parse_methods(args.methods, model)
    params = with_shared_options(params, methods, args)
    target = parse_target(args.target, model)
    _check_for_model(model, methods, params, target)
    if isinstance(target, list):  # several classes of each image: one row per (image, class)
        target = torch.tensor([class_indices(model, target)] * len(images))
    result = vitlens.explain(model, images, methods=methods, target=target, params=params, warn=False)
    _print_warnings(result.map_warnings())
    signed = {m for m in methods if get_method(m).signed and args.signed_display == "signed"}
    rows = []
    for i, image in enumerate(images):
        # the grid shows what the model saw: the crop of the original image
        seen = image.crop(crop_box_pixels(result.inputs[i].crop_box, image.size))
        for slot, prediction in enumerate(result.target_predictions(i)):
            # signed methods (LRP) are drawn with a diverging colormap: red positive, blue negative
            maps = {m: (result.patch_maps[m] if m in signed else result.maps[m])[i, slot].numpy() for m in methods}
            title = f"{Path(args.inputs[i]).name}\n{prediction.name} {prediction.prob:.2f}"
            rows.append(GridRow(image=seen, title=title, maps=maps))
    compare_grid(rows, methods, path=args.out, cmap=args.cmap, alpha=args.alpha, signed=signed,
                 signed_cmap=SIGNED_CMAP)
    print(f"wrote {args.out} ({len(rows)} row(s) x {len(methods) + 1} columns)")
    return 0


def _check_grid_out(out) -> None:
    """compare writes one PNG: its folder must be writable, and --out must not be a folder itself."""
    from vitlens.errors import OutputError

    path = Path(out)
    if path.is_dir():
        raise OutputError(f"--out '{path}' is a directory: give the PNG file to write, e.g. {path / 'compare.png'}")
    check_out_dir(path.parent)


def parse_gamma_sweep(text: str) -> list:
    from vitlens.errors import MethodError
    from vitlens.methods import get_method

    settings = []
    for item in text.split(","):
        conv, sep, lin = item.strip().partition(":")
        try:
            settings.append((float(conv), float(lin)))
        except ValueError:
            raise MethodError(f"--gamma-sweep item '{item}' must look like CONV:LIN, e.g. 1:0.5") from None
        if not sep:
            raise MethodError(f"--gamma-sweep item '{item}' must look like CONV:LIN, e.g. 1:0.5")
        get_method("attnlrp").check({"conv_gamma": settings[-1][0], "lin_gamma": settings[-1][1]})
    return settings


def _gamma_sweep(args, model=None) -> int:
    """One grid: rows = images (x targets), columns = AttnLRP at each (conv_gamma, lin_gamma)."""
    import vitlens
    from vitlens.data import load_image
    from vitlens.outputs import crop_box_pixels
    from vitlens.render import GridRow, compare_grid

    settings = parse_gamma_sweep(args.gamma_sweep)
    _check_options(args)
    _check_grid_out(args.out)
    images = [load_image(path) for path in args.inputs]
    model = model or _load(args)
    target = parse_target(args.target, model)
    check_target(model, target)
    if isinstance(target, list):
        import torch

        target = torch.tensor([class_indices(model, target)] * len(images))
    signed = args.signed_display == "signed"
    columns, results = [], []
    for conv, lin in settings:
        columns.append(f"conv {conv:g} / lin {lin:g}")
        results.append(vitlens.explain(model, images, methods=["attnlrp"], target=target,
                                       params={"attnlrp": {"conv_gamma": conv, "lin_gamma": lin}}))
    rows = []
    for i, image in enumerate(images):
        seen = image.crop(crop_box_pixels(results[0].inputs[i].crop_box, image.size))
        for slot, prediction in enumerate(results[0].target_predictions(i)):
            maps = {col: (r.patch_maps["attnlrp"] if signed else r.maps["attnlrp"])[i, slot].numpy()
                    for col, r in zip(columns, results)}
            title = f"{Path(args.inputs[i]).name}\n{prediction.name} {prediction.prob:.2f}"
            rows.append(GridRow(image=seen, title=title, maps=maps))
    compare_grid(rows, columns, path=args.out, cmap=args.cmap, alpha=args.alpha,
                 signed=set(columns) if signed else set(), signed_cmap=SIGNED_CMAP)
    print(f"wrote {args.out} ({len(rows)} row(s) x {len(columns) + 1} columns: AttnLRP Gamma sweep)")
    return 0


def cmd_report(args) -> int:
    from vitlens.render import write_report

    path = write_report(args.run_dir, title=args.title)
    print(f"wrote {path}")
    return 0


def cmd_methods(args) -> int:
    from vitlens.methods import CNN_METHODS, DEFAULT_METHODS, REGISTRY

    ordered = list(DEFAULT_METHODS) + [name for name in REGISTRY if name not in DEFAULT_METHODS]
    for name in ordered:
        spec = REGISTRY[name]
        kind = "class-specific" if spec.class_specific else "class-agnostic"
        params = ", ".join(f"{k}={v}" for k, v in spec.defaults.items()) or "-"
        in_all = [label for label, group in (("ViTs", DEFAULT_METHODS), ("CNNs", CNN_METHODS)) if name in group]
        also = f"; in 'all' for {' and '.join(in_all)}" if in_all else ""
        print(f"{name:10s} {kind:15s} {spec.summary}\n{'':10s} parameters: {params}{also}")
        width = max((len(key) for key in spec.defaults), default=0)
        for key, value in spec.defaults.items():
            declared = spec.declared.get(key)
            if declared is not None:  # what --param accepts, so a mistake is not found by trial
                print(f"{'':12s} {key:{width}s}  {declared.help}: {declared.allowed()}, default {value}")
    return 0


def cmd_cache_weights(args) -> int:
    import timm

    from vitlens.errors import ModelError
    from vitlens.models import hub, load_model, read_weights

    kind, _, name = args.spec.partition(":")
    if kind != "timm" or not name:
        raise ModelError("cache-weights takes a timm:NAME.TAG spec (Hugging Face directories load offline as they are)")
    load_model(args.spec, weights=args.file)  # refuses weights that do not fit the model
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        raise ModelError(f"timm has no hub id for '{name}': use --weights FILE instead")
    path = hub.populate_hf_cache(hub_id, read_weights(args.file))
    print(f"cached {args.file} as {hub_id} -> {path}")
    return 0


def cmd_demo(args) -> int:
    from PIL import Image
    from skimage import data as photos

    from vitlens.data import resolve_inputs
    from vitlens.errors import ModelError
    from vitlens.methods import parse_methods
    from vitlens.render import save_png_atomic
    from vitlens.runner import run_explain

    _check_options(args)
    out = check_out_dir(args.out)
    try:
        model = _load(args)
    except ModelError:
        if args.weights is not None or args.model != DEFAULT_MODEL:
            raise
        # the default ViT needs the hub (or a cache); the packaged CNN always works offline
        print(f"vitlens demo: {DEFAULT_MODEL} cannot be loaded offline (hub unreachable, not cached); continuing "
              f"with the packaged EfficientNet-Lite0 and Grad-CAM. For the ViT: `vitlens demo --weights FILE` or "
              f"`vitlens cache-weights {DEFAULT_MODEL} FILE` once.", file=sys.stderr)
        args.model = FALLBACK_MODEL
        model = _load(args)
    inputs = out / "inputs"
    paths = []
    for name in DEMO_PHOTOS:
        path = inputs / f"{name}.png"
        if not path.is_file():
            save_png_atomic(Image.fromarray(getattr(photos, name)()).convert("RGB"), path)
        paths.append(str(path))
    methods = parse_methods("all", model)
    samples = resolve_inputs([str(inputs)])
    summary = run_explain(samples, model, methods, None, None, out / "run", batch_size=4,
                          progress=not args.quiet, html=True)
    compare_args = argparse.Namespace(inputs=paths, methods=",".join(methods), param=None, target=None,
                                      out=str(out / "compare.png"), cmap="jet", alpha=0.5, signed_display="signed")
    cmd_compare(compare_args, model=model)
    _print_summary(summary)
    print(f"model: {model.info.spec}; comparison grid: {out / 'compare.png'}")
    print(f"open {summary.report} in a browser to see every image and method")
    return 1 if summary.failed else 0


def cmd_download(args) -> int:
    from vitlens.data.download import download_dataset

    result = download_dataset(args.dataset, args.dir, base_url=args.base_url, progress=not args.quiet)
    if result.downloaded:
        print(f"{result.name}: downloaded {result.archive} ({result.bytes / 1e6:.1f} MB), md5 verified, extracted "
              f"to {result.root}")
    else:
        print(f"{result.name}: already downloaded and verified in {result.root}; nothing to do")
    counts = ", ".join(f"{count} {split}" for split, count in result.images.items())
    print(f"layout checked: {counts} images, each with its box")
    print(f"use: {result.spec}")
    return 0


def cmd_finetune(args) -> int:
    from vitlens import distributed
    from vitlens.finetune import finetune

    result = finetune(args.inputs, args.model, args.out, weights=args.weights, val=args.val,
                      val_fraction=args.val_fraction, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, weight_decay=args.weight_decay,
                      warmup=args.warmup, precision=args.precision, seed=args.seed, input_size=args.input_size,
                      augment=not args.no_augment, labels=args.labels, class_index=args.class_index,
                      limit=args.limit, image_column=args.image_column, label_column=args.label_column,
                      device=args.device, workers=args.workers, progress=not args.quiet, force=args.force)
    if result.is_main:
        accuracy = result.val_accuracy
        print(f"fine-tuned {result.steps} steps ({result.seconds_per_step:.3f} s/step) on {result.train_images} "
              f"images, {len(result.class_names)} classes; val accuracy {accuracy:.4f} on {result.val_images} images"
              if accuracy is not None else f"fine-tuned {result.steps} steps")
        print(f"model: {result.out_dir} (vitlens explain IMAGES --model {result.out_dir})")
    group = distributed.current()
    if group.distributed:  # the Trainer's process group (torchrun): left like explain's, see exit_process
        group.owned = True
        distributed.leave(group)
    return 0


def cmd_text(args) -> int:
    return text_cli.run(args)


COMMANDS = {
    "explain": cmd_explain,
    "evaluate": cmd_evaluate,
    "compare": cmd_compare,
    "report": cmd_report,
    "demo": cmd_demo,
    "methods": cmd_methods,
    "cache-weights": cmd_cache_weights,
    "download": cmd_download,
    "finetune": cmd_finetune,
    "text": cmd_text,
}


def entry_point() -> None:
    """The ``vitlens`` console script and ``python -m vitlens``: :func:`main`, then exit with its code."""
    from vitlens.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":  # pragma: no cover
    entry_point()
