"""``vitlens evaluate``: explain a dataset and score every method with faithfulness, localisation and
sanity metrics; write per-method tables with 95 % confidence intervals, curve plots and the report.

The run directory is an ``explain`` run directory (overlays, maps, records, manifest, report.html,
see :mod:`vitlens.outputs`) plus::

    metrics.csv          long form: method, metric, n, mean, ci_low, ci_high, better
    metrics.json         the same with the settings, the interval method and the mean curves
    metrics.md           methods x metrics, "mean ± half-width of the 95 % CI"
    plots/<curve>.png    mean deletion / insertion / perturbation / sanity curves per method

Per-image metric values and curves live in each image's record (``records/<key>.json``, keys
``metrics`` and ``curves``), written atomically together with the image's other outputs. A run
that is stopped and started again recomputes exactly the unfinished batches (the runner's resume),
and the tables are always aggregated from the records, so an interrupted and a straight run agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitlens.cliargs import OVERLAY_MAX_SIDE, check_count, parse_save
from vitlens.distributed import current
from vitlens.errors import InputError, TargetError
from vitlens.methods import get_method
from vitlens.metrics import (BOXES, MASKS, MODEL, OBJECTS, RANDOMIZE, REEXPLAIN, MetricError, boxes_to_input,
                             cascading_randomization, energy_in_box, get_metric, mask_to_input, mean_ci, parse_metrics,
                             perturbation_metrics, pointing_game, segmentation_scores)
from vitlens.metrics.perturbation import patch_size_of
from vitlens.render.atomic import write_atomic, write_text_atomic

CI_METHOD = "t"
PLOTTED = ("deletion", "insertion", "deletion_norm", "insertion_norm", "pos_perturbation", "neg_perturbation",
           "sanity_spearman", "sanity_ssim")
#: bar charts (mean and 95 % CI per method) of metric values without curves
BARS = {"sensitivity": ("max_sensitivity", "avg_sensitivity"), "lipschitz": ("lipschitz",),
        "specificity": ("contrast_rank_2nd", "contrast_rank_random", "contrast_l1_2nd", "contrast_l1_random"),
        "two_object": ("object_share", "object_contrast")}


@dataclass
class EvalSummary:
    """What an evaluation run did and wrote."""

    run: object  # runner.RunSummary
    rows: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    forwards: int = 0
    reexplained: int = 0  # images explained again by sensitivity / specificity (perturbed copies, other targets)


# ------------------------------------------------------------------------------------------ checks
def check_requirements(samples: list, metrics: list, masks_dir=None, source: str = "the inputs",
                       metric_params: dict | None = None) -> None:
    """One-line errors for metrics the data cannot support (boxes, masks)."""
    for name in metrics:
        needs = get_metric(name).needs
        if BOXES in needs and not any(s.boxes for s in samples):
            raise MetricError(f"metric '{name}' needs object boxes, and {source} have none "
                              "(use a dataset with boxes: tinyimagenet:PATH or cub200:PATH)")
        if OBJECTS in needs:
            options = (metric_params or {}).get(name, {})
            if not options.get("objects"):
                raise MetricError(f"metric '{name}' needs labelled objects: give --metric-param {name}.objects=FILE "
                                  "(JSON: image file name -> [[class, x0, y0, x1, y1], ...] in original pixels)")
            if not Path(options["objects"]).is_file():
                raise InputError(f"objects file '{options['objects']}' does not exist")
        if MASKS in needs:
            if masks_dir is None:
                raise MetricError(f"metric '{name}' needs segmentation masks: give --masks DIR "
                                  "(one PNG per image, named like the image file)")
            if not Path(masks_dir).is_dir():
                raise InputError(f"masks folder '{masks_dir}' does not exist")


def _single_target(target):
    text = str(target).strip().lower() if isinstance(target, str) else None
    if text and text.startswith("top") and text[3:].isdigit() and int(text[3:]) > 1:
        raise TargetError(f"evaluate explains one class per image: --target {target} asks for {text[3:]}")
    if isinstance(target, (list, tuple)):
        raise TargetError("evaluate explains one class per image: give pred, label, or one class index/name")
    return target


def load_objects(path) -> dict:
    """``{image file name or key: [[class, x0, y0, x1, y1], ...]}`` (original-image pixels) -> name -> [LabelledBox]."""
    from vitlens.metrics.specificity import LabelledBox

    try:
        data = json.loads(Path(path).read_text())
        return {str(name): [LabelledBox(int(o[0]), tuple(float(v) for v in o[1:5])) for o in objects]
                for name, objects in data.items()}
    except (ValueError, TypeError, IndexError, AttributeError) as error:
        raise InputError(f"objects file '{path}' must map image names to [[class, x0, y0, x1, y1], ...]: {error}") \
            from None


def _load_mask(masks_dir, sample) -> torch.Tensor | None:
    stem = Path(sample.path).stem
    for name in (f"{sample.key}.png", f"{stem}.png"):
        path = Path(masks_dir) / name
        if path.is_file():
            from PIL import Image

            return torch.from_numpy(np.asarray(Image.open(path).convert("L")) > 127)
    return None


def metric_options(metrics: list, metric_params: dict, steps: int | None = None, baseline: str | None = None) -> dict:
    """Merge ``--metric-param`` with the ``--steps`` / ``--baseline`` shortcuts (explicit params win)."""
    merged = {name: dict(values) for name, values in (metric_params or {}).items()}
    for name in metrics:
        defaults = get_metric(name).defaults
        if steps is not None and "steps" in defaults:
            merged.setdefault(name, {}).setdefault("steps", steps)
        if baseline is not None and "baseline" in defaults:
            merged.setdefault(name, {}).setdefault("baseline", baseline)
    for name in merged:
        if name not in metrics:
            raise MetricError(f"--metric-param for '{name}', which is not among --metrics")
        get_metric(name).params(merged[name])
    return merged


# ----------------------------------------------------------------------------- per-batch scoring
def _round(values) -> list:
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else round(float(v), 6)
            for v in values]


class BatchScorer:
    """The ``record_extra`` callback of the runner: per-image metrics of one explained batch."""

    def __init__(self, model, methods, params, metrics: list, metric_params: dict, seed: int = 0,
                 batch_size: int = 128, granularity: str = "pixel", masks_dir=None, sample_index=None,
                 precision="fp32"):
        self.model = model
        self.methods = list(methods)
        self.params = params or {}
        self.metrics = metrics
        self.options = {name: get_metric(name).params(metric_params.get(name)) for name in metrics}
        self.seed = seed
        self.batch_size = batch_size
        self.granularity = granularity
        self.masks_dir = masks_dir
        self.sample_index = sample_index or {}
        self.precision = precision
        self.forwards = 0
        self.reexplained = 0
        objects_file = self.options.get("two_object", {}).get("objects")
        self.objects = load_objects(objects_file) if objects_file else {}

    def _first(self, samples, limit) -> list:
        """Indices of the batch's samples among the first ``limit`` of the run (all when None)."""
        return [b for b, s in enumerate(samples) if limit is None or self.sample_index.get(s.key, 0) < limit]

    def _reexplain(self, samples, result, x, targets, maps, values, input_size) -> None:
        from vitlens.metrics.sensitivity import Explainer, sensitivity
        from vitlens.metrics.specificity import LabelledBox, class_contrast, two_object_share

        explainer = Explainer(self.model, self.methods, self.params, batch_size=min(self.batch_size, 32),
                              precision=self.precision)
        stats: dict = {}
        if "sensitivity" in self.metrics:
            opt = self.options["sensitivity"]
            chosen = self._first(samples, opt["limit"])
            if chosen:
                chosen_maps = {m: maps[m][chosen] for m in self.methods}
                out = sensitivity(x[chosen], targets[chosen], explainer, maps=chosen_maps,
                                  radius=float(opt["radius"]), samples=int(opt["samples"]), norm=opt["norm"],
                                  seed=self.seed, batch_size=self.batch_size, stats=stats)
                for m in self.methods:
                    for j, b in enumerate(chosen):
                        for key in ("max_sensitivity", "avg_sensitivity", "lipschitz"):
                            values[b][m][key] = float(out[m][key][j])
        if "specificity" in self.metrics:
            chosen = self._first(samples, self.options["specificity"]["limit"])
            if chosen:
                out = class_contrast(x[chosen], targets[chosen], explainer, logits=result.probabilities[chosen],
                                     seed=self.seed, stats=stats)
                for m in self.methods:
                    for j, b in enumerate(chosen):
                        for key, tensor in out[m].items():
                            values[b][m][key] = float(tensor[j])
        if "two_object" in self.metrics:
            objects = []
            for b, s in enumerate(samples):
                found = self.objects.get(Path(s.path).name, self.objects.get(s.key, []))
                crop = result.inputs[b].crop_box or (0, 0, input_size[1], input_size[0])
                placed = []
                for o in found:
                    box = boxes_to_input([o.box], crop, input_size)
                    if box:
                        placed.append(LabelledBox(o.label, box[0]))
                objects.append(placed)
            out = two_object_share(x, objects, explainer, stats=stats)
            for m in self.methods:
                for b in range(len(samples)):
                    for key, tensor in out.get(m, {}).items():
                        values[b][m][key] = float(tensor[b])
        self.reexplained += stats.get("explained", 0)

    def __call__(self, samples, result) -> list:
        B = len(samples)
        x = result.input_tensors
        input_size = tuple(x.shape[-2:])
        targets = result.targets[:, 0]
        maps = {m: result.maps[m][:, 0] for m in self.methods}
        values: list = [{m: {} for m in self.methods} for _ in range(B)]
        curves: list = [{m: {} for m in self.methods} for _ in range(B)]

        perturb = {n: self.options[n] for n in self.metrics if MODEL in get_metric(n).needs}
        if perturb:
            labels = torch.tensor([-1 if s.label is None else int(s.label) for s in samples])
            # signed relevance (AttnLRP, CP-LRP) is ranked by its signed values: the most negative pixel is the
            # least relevant. Its displayed map (the positive part) would tie every negative pixel at zero.
            source = {m: result.patch_maps[m][:, 0] if self.granularity == "patch" or get_method(m).signed
                      else maps[m] for m in self.methods}
            stats: dict = {}
            out = perturbation_metrics(self.model, x, source, targets, labels=labels, metrics=perturb,
                                       granularity=self.granularity, seed=self.seed, batch_size=self.batch_size,
                                       stats=stats)
            self.forwards += stats.get("forwards", 0)
            for m in self.methods:
                for name, res in out[m].items():
                    if name in ("deletion", "insertion"):
                        named = {f"{name}_auc": res["auc"], f"{name}_auc_norm": res["auc_norm"]}
                        curve = res["curve"]
                    elif name in ("pos_perturbation", "neg_perturbation"):
                        named = {f"{name}_auc": res["auc"]}
                        curve = res["curve"]
                    else:
                        named, curve = res, None
                    for b in range(B):
                        for key, tensor in named.items():
                            values[b][m][key] = float(tensor[b])
                        if curve is not None:
                            curves[b][m][name] = _round(curve[b].tolist())

        if any(BOXES in get_metric(n).needs for n in self.metrics):
            boxes = [boxes_to_input(s.boxes, result.inputs[b].crop_box or (0, 0, input_size[1], input_size[0]),
                                    input_size) for b, s in enumerate(samples)]
            for m in self.methods:
                if "pointing_game" in self.metrics:
                    hits = pointing_game(maps[m], boxes, **self.options["pointing_game"])
                    for b in range(B):
                        values[b][m]["pointing_game"] = float(hits[b])
                if "energy_in_box" in self.metrics:
                    energy = energy_in_box(maps[m], boxes)
                    for b in range(B):
                        values[b][m]["energy_in_box"] = float(energy[b])

        if "segmentation" in self.metrics:
            masks = [_load_mask(self.masks_dir, s) for s in samples]
            have = [b for b, mk in enumerate(masks) if mk is not None]
            if have:
                gt = torch.stack([mask_to_input(masks[b], result.inputs[b].crop_box or
                                                (0, 0, masks[b].shape[1], masks[b].shape[0]), input_size)
                                  for b in have])
                for m in self.methods:
                    scores = segmentation_scores(maps[m][have], gt)
                    for j, b in enumerate(have):
                        for key, tensor in scores.items():
                            values[b][m][f"seg_{key}"] = float(tensor[j])

        if any(REEXPLAIN in get_metric(n).needs for n in self.metrics):
            self._reexplain(samples, result, x, targets, maps, values, input_size)

        if "sanity" in self.metrics:
            limit = self.options["sanity"]["images"]
            chosen = [b for b, s in enumerate(samples) if self.sample_index.get(s.key, 0) < limit]
            if chosen:
                sanity = cascading_randomization(self.model, x[chosen], self.methods, targets=targets[chosen],
                                                 params=self.params,
                                                 original_maps={m: maps[m][chosen] for m in self.methods},
                                                 seed=self.seed, batch_size=len(chosen),
                                                 max_stages=self.options["sanity"]["max_stages"],
                                                 precision=self.precision)
                for m in self.methods:
                    for j, b in enumerate(chosen):
                        rho, sim = sanity.spearman[m][:, j], sanity.ssim[m][:, j]
                        values[b][m].update({"sanity_spearman_head": float(rho[0]),
                                             "sanity_spearman_all": float(rho[-1]),
                                             "sanity_ssim_head": float(sim[0]), "sanity_ssim_all": float(sim[-1])})
                        curves[b][m]["sanity_spearman"] = _round(rho.tolist())
                        curves[b][m]["sanity_ssim"] = _round(sim.tolist())
                        curves[b][m]["sanity_stages"] = sanity.stages

        return [{"metrics": {m: {k: (None if math.isnan(v) else round(v, 6)) for k, v in values[b][m].items()}
                             for m in self.methods},
                 "curves": curves[b]} for b in range(B)]


# ---------------------------------------------------------------------------------- aggregation
def value_order(metrics: list) -> list:
    names = []
    for metric in metrics:
        names.extend(get_metric(metric).values)
    return names


def better(value_name: str):
    for spec in (get_metric(m) for m in parse_metrics("all") + ["segmentation", "two_object"]):
        if value_name in spec.values:
            return spec.values[value_name]
    return None


def aggregate(images: list, methods: list, metrics: list, ci_method: str = CI_METHOD, seed: int = 0) -> tuple:
    """Per (method, metric value): mean and CI over images; mean curves per method.

    Returns (rows, curves): rows are dicts (method, metric, n, mean, ci_low, ci_high, better);
    curves: curve name -> method -> mean curve (list) plus ``_x`` axes.
    """
    names = value_order(metrics)
    rows = []
    ok = [im for im in images if im.get("status") == "ok" and isinstance(im.get("metrics"), dict)]
    for method in methods:
        for name in names:
            present = [im["metrics"].get(method, {}) for im in ok]
            vals = [math.nan if d[name] is None else float(d[name]) for d in present if name in d]
            interval = mean_ci(vals, method=ci_method, seed=seed)
            if interval.n == 0:
                continue
            rows.append({"method": method, "metric": name, "n": interval.n, "mean": interval.mean,
                         "ci_low": interval.low, "ci_high": interval.high, "better": _better_text(better(name))})
    curves: dict = {}
    for method in methods:
        for im in ok:
            for cname, curve in (im.get("curves") or {}).get(method, {}).items():
                if cname == "sanity_stages" or not isinstance(curve, list):
                    continue
                values = [math.nan if v is None else float(v) for v in curve]
                curves.setdefault(cname, {}).setdefault(method, []).append(values)
                if cname in ("deletion", "insertion"):
                    normalized = normalized_curve(cname, values)
                    curves.setdefault(f"{cname}_norm", {}).setdefault(method, []).append(normalized)
            stages = (im.get("curves") or {}).get(method, {}).get("sanity_stages")
            if stages:
                curves.setdefault("_stages", stages)
    mean_curves: dict = {}
    for cname, per_method in curves.items():
        if cname == "_stages":
            mean_curves[cname] = per_method
            continue
        mean_curves[cname] = {}
        for method, rows_ in per_method.items():
            length = max(len(r) for r in rows_)
            arr = np.array([r + [math.nan] * (length - len(r)) for r in rows_], dtype=np.float64)
            with np.errstate(all="ignore"):
                mean_curves[cname][method] = [round(float(v), 6) for v in np.nanmean(arr, axis=0)]
    return rows, mean_curves


def normalized_curve(kind: str, curve: list) -> list:
    """A raw deletion/insertion curve normalised like its ``auc_norm``: 0 = fully perturbed, 1 = original.

    The end points are the original image (deletion: first, insertion: last) and the fully perturbed
    one (the other end).
    """
    original, base = (curve[0], curve[-1]) if kind == "deletion" else (curve[-1], curve[0])
    span = max(1e-8, original - base)
    return [min(1.0, max(0.0, (v - base) / span)) for v in curve]


def _better_text(flag) -> str:
    return {True: "higher", False: "lower"}.get(flag, "-")


def _fmt(row) -> str:
    if row["n"] > 1 and not math.isnan(row["ci_high"]):
        return f"{row['mean']:.4g} ± {(row['ci_high'] - row['ci_low']) / 2:.2g}"
    return f"{row['mean']:.4g}"


def wide_table(rows: list, methods: list, metrics: list) -> dict:
    """methods x metric values, cells "mean ± half-CI": the ``manifest['metrics']`` the report renders."""
    names = [n for n in value_order(metrics) if any(r["metric"] == n for r in rows)]
    cell = {(r["method"], r["metric"]): _fmt(r) for r in rows}
    columns = ["method"] + [f"{n} ({_better_text(better(n))[0] if better(n) is not None else '-'})" for n in names]
    table_rows = [[m] + [cell.get((m, n), "—") for n in names] for m in methods if any(r["method"] == m for r in rows)]
    counts = sorted({r["n"] for r in rows})
    return {"columns": columns, "rows": table_rows,
            "note": f"mean ± half-width of the 95 % Student-t CI over images (n = {', '.join(map(str, counts))}); "
                    "(h) higher is better, (l) lower is better"}


def write_tables(out: Path, rows: list, curves: dict, methods: list, metrics: list, settings: dict) -> dict:
    """metrics.csv / metrics.json / metrics.md and the curve PNGs; returns name -> path."""
    files = {}
    header = "method,metric,n,mean,ci_low,ci_high,better\n"
    lines = [f"{r['method']},{r['metric']},{r['n']},{r['mean']:.6g},{r['ci_low']:.6g},{r['ci_high']:.6g},{r['better']}"
             for r in rows]
    files["csv"] = write_text_atomic(out / "metrics.csv", header + "\n".join(lines) + ("\n" if lines else ""))
    payload = {"settings": settings, "interval": "95 % Student-t (mean ± t_{0.975, n-1} s / sqrt(n))",
               "rows": rows, "curves": curves}
    files["json"] = write_text_atomic(out / "metrics.json", json.dumps(payload, indent=1, default=_json_default) + "\n")
    table = wide_table(rows, methods, metrics)
    md = ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in table["rows"]]
    md.append("")
    md.append(table["note"])
    files["md"] = write_text_atomic(out / "metrics.md", "\n".join(md) + "\n")
    files.update(plot_curves(out / "plots", curves))
    files.update(plot_bars(out / "plots", rows, methods))
    return files


def plot_bars(folder: Path, rows: list, methods: list) -> dict:
    """One PNG per group of :data:`BARS` present in ``rows``: per method the mean with its 95 % CI."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    files = {}
    cell = {(r["method"], r["metric"]): r for r in rows}
    for name, values in BARS.items():
        present = [v for v in values if any((m, v) in cell for m in methods)]
        if not present:
            continue
        shown = [m for m in methods if any((m, v) in cell for v in present)]
        fig = Figure(figsize=(max(6.4, 0.55 * len(shown) * len(present) + 2), 4.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        palette = matplotlib.colormaps["tab10"]
        width = 0.8 / len(present)
        for k, value in enumerate(present):
            xs, means, errs = [], [], []
            for i, m in enumerate(shown):
                row = cell.get((m, value))
                if row is None or math.isnan(row["mean"]):
                    continue
                half = 0.0 if math.isnan(row["ci_high"]) else (row["ci_high"] - row["ci_low"]) / 2
                xs.append(i + (k - (len(present) - 1) / 2) * width)
                means.append(row["mean"])
                errs.append(half)
            ax.bar(xs, means, width=width, yerr=errs, capsize=2, label=value, color=palette(k % palette.N))
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=45, ha="right", fontsize=8)
        flag = better(present[0])
        ax.set_ylabel({True: "higher is better", False: "lower is better"}.get(flag, "value"))
        ax.set_title(f"{name.replace('_', ' ')} (mean, 95 % CI)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
        fig.tight_layout()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        write_atomic(path, lambda fh, fig=fig: fig.savefig(fh, format="png"))
        files[name] = path
    return files


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def plot_curves(folder: Path, curves: dict) -> dict:
    """One PNG per curve kind, a line per method (matplotlib Figure + Agg canvas, no pyplot)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    files = {}
    labels = {
        "deletion": ("fraction of most relevant pixels removed", "score of the explained class"),
        "insertion": ("fraction of most relevant pixels revealed", "score of the explained class"),
        "deletion_norm": ("fraction of most relevant pixels removed", "normalised score (1 = original, 0 = baseline)"),
        "insertion_norm": ("fraction of most relevant pixels revealed",
                           "normalised score (1 = original, 0 = baseline)"),
        "pos_perturbation": ("fraction of most relevant pixels removed", "top-1 accuracy (%)"),
        "neg_perturbation": ("fraction of least relevant pixels removed", "top-1 accuracy (%)"),
        "sanity_spearman": ("layers randomised (cascading, top first)", "Spearman rank correlation"),
        "sanity_ssim": ("layers randomised (cascading, top first)", "SSIM"),
    }
    stages = curves.get("_stages")
    for name in PLOTTED:
        per_method = curves.get(name)
        if not per_method:
            continue
        fig = Figure(figsize=(6.4, 4.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        palette = matplotlib.colormaps["tab20"] if len(per_method) > 10 else matplotlib.colormaps["tab10"]
        for index, (method, curve) in enumerate(per_method.items()):
            n = len(curve)
            if name.startswith("sanity"):
                xs = list(range(n))
            elif name.endswith("perturbation"):
                xs = [i / 10 for i in range(n)]
            else:
                xs = [i / max(n - 1, 1) for i in range(n)]
            style = "--" if method in ("random", "center") else "-"
            ax.plot(xs, curve, style, label=method, linewidth=1.6, color=palette(index % palette.N))
        if name.startswith("sanity") and stages:
            ax.set_xticks(range(len(stages)))
            ax.set_xticklabels(stages, rotation=60, fontsize=7)
        ax.set_xlabel(labels[name][0])
        ax.set_ylabel(labels[name][1])
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = folder / f"{name}.png"
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda fh, fig=fig: fig.savefig(fh, format="png"))
        files[name] = path
    return files


def _add_plots_to_report(report: Path, plots: dict, out: Path) -> None:
    if not plots or not report.is_file():
        return
    from vitlens.render.report import esc, file_url

    figures = "".join(
        f'<figure style="display:inline-block;margin:0 12px 12px 0">'
        f'<img src="{esc(file_url(str(p.relative_to(out))))}" '
        f'alt="{esc(name)}" style="max-width:640px;width:100%"><figcaption>{esc(name.replace("_", " "))}</figcaption>'
        "</figure>"
        for name, p in plots.items()
    )
    html = report.read_text(encoding="utf-8")
    section = f'<section id="metric-curves"><h2>Metric curves</h2>{figures}</section>'
    marker = '<div id="lightbox"'
    if marker in html:
        html = html.replace(marker, section + marker, 1)
    else:
        html = html.replace("</body>", section + "</body>", 1)
    write_text_atomic(report, html)


# ----------------------------------------------------------------------------------------- the run
def run_evaluate(samples: list, model, methods: list, params: dict | None = None, metrics="faithfulness",
                 metric_params: dict | None = None, target=None, out_dir="evaluation", batch_size: int = 16,
                 perturb_batch_size: int = 128, granularity: str = "pixel", resume: bool = True,
                 progress: bool = True, seed: int = 0, html: bool = True, masks_dir=None,
                 source: str = "the inputs", save=None, overlay_max_side: int | None = OVERLAY_MAX_SIDE,
                 io_workers: int | None = None, group=None, precision="fp32",
                 signed_display: str = "signed", memory_budget=None) -> EvalSummary:
    """Explain ``samples`` and score every method; write the run directory and the metric tables.

    Parameters
    ----------
    samples : list of Sample
        From :func:`vitlens.data.resolve_inputs` (labels for the perturbation accuracy, boxes for
        localisation).
    model : ExplainableModel
    methods : list of str
    params : dict, optional
        Method parameters.
    metrics : str or list
        Metric names or groups (``faithfulness``, ``localisation``, ``all``).
    metric_params : dict, optional
        metric -> parameter overrides (e.g. ``{'deletion': {'steps': 10}}``).
    target : None / 'pred' / 'label' / class index or name
        One class per image.
    batch_size : int
        Images explained per batch (the unit of resume).
    perturb_batch_size : int
        Perturbed copies per forward pass.
    granularity : 'pixel' or 'patch'
        Units removed/revealed by the perturbation metrics.
    seed : int
        Tie-breaking in the rankings, the noise baseline, the randomisation of the sanity check.
    masks_dir : path, optional
        ``<key>.png`` or ``<image stem>.png`` foreground masks for ``segmentation``.
    save, overlay_max_side, io_workers, group, precision, signed_display, memory_budget
        As for :func:`vitlens.runner.run_explain`. ``precision`` is that of every explanation (the
        re-explanations of sensitivity, specificity and sanity too); the perturbed images of the
        faithfulness metrics are scored in the model's own precision, so that a metric measures the
        maps and not the scoring. In a distributed run every rank explains and
        scores its share of the batches; the main rank computes the tables from every image's
        record, so they are those of a one-process run.
    """
    from vitlens.render import write_report
    from vitlens.runner import run_explain

    metric_names = parse_metrics(metrics)
    metric_params = metric_params or {}
    unknown = set(metric_params) - set(metric_names)
    if unknown:
        raise MetricError(f"--metric-param for '{sorted(unknown)[0]}', which is not among --metrics")
    options = {name: get_metric(name).params(metric_params.get(name)) for name in metric_names}
    if granularity not in ("pixel", "patch"):
        raise MetricError(f"unknown granularity '{granularity}': choose pixel or patch")
    if granularity == "patch" and patch_size_of(model) is None:
        raise MetricError(f"--granularity patch needs a model with patches (a ViT); {type(model.module).__name__} "
                          "has none: use --granularity pixel")
    check_count(perturb_batch_size, "perturb_batch_size")  # before run_explain writes anything
    target = _single_target(target)
    check_requirements(samples, metric_names, masks_dir, source, metric_params)
    if RANDOMIZE in set().union(*(get_metric(n).needs for n in metric_names)) and not hasattr(model, "module"):
        raise MetricError("the sanity check needs a vitlens model adapter")
    settings = {"evaluate": {"metrics": options, "seed": seed, "granularity": granularity,
                             "masks": str(masks_dir) if masks_dir else None}}
    scorer = BatchScorer(model, methods, params, metric_names, metric_params, seed=seed,
                         batch_size=perturb_batch_size, granularity=granularity, masks_dir=masks_dir,
                         sample_index={s.key: i for i, s in enumerate(samples)}, precision=precision)
    group = group or current()
    run = run_explain(samples, model, methods, params, target, out_dir, batch_size=batch_size, resume=resume,
                      progress=progress, html=False, settings=settings, record_extra=scorer, save=save,
                      overlay_max_side=overlay_max_side, io_workers=io_workers, group=group,
                      # boxes and masks are in the file's pixels
                      reduced_decoding=False, precision=precision, signed_display=signed_display,
                      memory_budget=memory_budget)
    out = Path(out_dir)
    report_wanted = html and {"overlays", "originals"} <= set(parse_save(save))

    def tables():
        manifest = json.loads((out / "manifest.json").read_text())
        rows, curves = aggregate(manifest.get("images", []), methods, metric_names, seed=seed)
        all_settings = {"model": manifest.get("model"), "methods": manifest.get("methods"),
                        "target": manifest.get("target"), **settings}
        files = write_tables(out, rows, curves, methods, metric_names, all_settings)
        manifest["metrics"] = wide_table(rows, methods, metric_names)
        write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        if report_wanted:
            report = write_report(out)
            _add_plots_to_report(report, {k: v for k, v in files.items() if k in PLOTTED or k in BARS}, out)
            files["report"] = report
        return rows, files

    rows, files = group.run_on_main(tables)
    run.report = files.get("report")
    forwards, reexplained = (sum(v) for v in zip(*group.gather((scorer.forwards, scorer.reexplained))))
    return EvalSummary(run=run, rows=rows, files=files, forwards=forwards, reexplained=reexplained)


__all__ = ["BatchScorer", "EvalSummary", "aggregate", "check_requirements", "run_evaluate", "wide_table",
           "write_tables"]
