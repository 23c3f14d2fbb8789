"""Dataset-scale runs: batches, a progress bar, per-image outputs, failures and resume.

Batches are cut from the full, ordered list of samples (batch i = samples[i*B:(i+1)*B]) whatever
is already done, so a resumed run computes every batch with exactly the same images as an
uninterrupted run and writes identical files. Images are decoded in a background thread while
the model works on the previous batch.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vitlens.api import explain
from vitlens.data import Sample, load_sample
from vitlens.errors import InputError, MethodError, TargetError, VitlensError
from vitlens.cliargs import check_count, check_overlay, check_params_requested, check_target
from vitlens.methods import check_params_for_model, get_method
from vitlens.outputs import RunWriter


@dataclass(frozen=True)
class EveryImage:
    """A target request meaning: explain each of these classes for every image."""

    classes: tuple

    def __init__(self, classes):
        object.__setattr__(self, "classes", tuple(int(c) for c in classes))

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.classes)


@dataclass
class RunSummary:
    """What a run did."""

    out_dir: Path
    total: int
    explained: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # (key, path, error)
    manifest: Path | None = None
    report: Path | None = None
    seconds: float = 0.0


def _load(sample: Sample):
    try:
        return load_sample(sample), None
    except InputError as exc:
        return None, str(exc)


def run_explain(samples: list, model, methods: list, params: dict | None = None, target=None, out_dir="results",
                batch_size: int = 16, resume: bool = True, progress: bool = True, cmap: str = "jet",
                alpha: float = 0.5, html: bool = False, settings: dict | None = None,
                record_extra=None) -> RunSummary:
    """Explain every sample and write the run directory (see :mod:`vitlens.outputs`).

    ``target`` is what :func:`vitlens.explain` accepts for one image, or ``'label'`` to explain each
    image's ground-truth class. A sample that cannot be decoded (or has no label when
    ``target='label'``) is recorded as failed and the run goes on.

    ``record_extra(samples, result)``, when given, is called once per explained batch with the
    batch's good samples and their :class:`~vitlens.api.ExplainResult`; it returns one dict per
    sample whose entries are added to that image's record (``vitlens evaluate`` puts its per-image
    metrics there, so they are written atomically with the record and resume with it).
    """
    from tqdm import tqdm

    # every mistake in the request is found here, before RunWriter creates run.json and records/
    check_count(batch_size, "batch_size")
    check_overlay(cmap, alpha, prefix="")
    check_params_requested(params, methods, option="params", among="the methods")
    resolved = {name: get_method(name).params((params or {}).get(name)) for name in methods}
    check_params_for_model(resolved, model.num_layers if model.has_attention else None, model)
    check_target(model, list(target.classes) if isinstance(target, EveryImage) else target, allow_label=True)
    run_settings = {"target": str(target if target is not None else "pred"), **(settings or {})}
    writer = RunWriter(out_dir, model, resolved, settings=run_settings, resume=resume, cmap=cmap, alpha=alpha)
    summary = RunSummary(out_dir=Path(out_dir), total=len(samples))
    started = time.perf_counter()
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    bar = tqdm(total=len(samples), unit="img", disable=not progress, desc="explaining", dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [s for s in batches[0] if not writer.done(s.key, s.path)] if batches else []
        future = pool.submit(lambda b: [_load(s) for s in b], batches[0]) if pending else None
        for number, batch in enumerate(batches):
            todo = [s for s in batch if not writer.done(s.key, s.path)]
            loaded = future.result() if future is not None else None
            nxt = batches[number + 1] if number + 1 < len(batches) else None
            future = None
            if nxt is not None and any(not writer.done(s.key, s.path) for s in nxt):
                future = pool.submit(lambda b: [_load(s) for s in b], nxt)
            summary.skipped += len(batch) - len(todo)
            for sample in batch:  # failures of an earlier run stay failures of this one
                if sample not in todo:
                    record = writer.read_record(sample.key)
                    if record is not None and record.get("status") != "ok":
                        summary.failed.append((sample.key, sample.path, record.get("error")))
            if not todo:
                bar.update(len(batch))
                continue
            if loaded is None:
                loaded = [_load(s) for s in batch]
            _explain_batch(batch, loaded, writer, model, methods, params, target, summary, record_extra)
            bar.update(len(batch))
    bar.close()
    summary.manifest = writer.finish(order=[s.key for s in samples])
    if html:
        from vitlens.render import write_report

        summary.report = write_report(writer.out)
    summary.seconds = time.perf_counter() - started
    return summary


def _explain_batch(batch, loaded, writer, model, methods, params, target, summary, record_extra=None) -> None:
    good, images, targets = [], [], []
    for sample, (image, error) in zip(batch, loaded):
        if error is None and target == "label" and sample.label is None:
            error = f"no label known for '{sample.path}' (needed by --target label)"
        if error is not None:
            if not writer.done(sample.key, sample.path):
                writer.write_failure(sample.key, sample.path, error, sample.label, sample.label_name)
            summary.failed.append((sample.key, sample.path, error))
            continue
        good.append(sample)
        images.append(image)
        targets.append(sample.label if target == "label" else None)
    if not good:
        return
    batch_target = targets if target == "label" else target
    if isinstance(target, EveryImage):
        import torch

        batch_target = torch.tensor([list(target.classes)] * len(images))
    try:
        result = explain(model, images, methods=methods, target=batch_target, batch_size=len(images), params=params)
    except (TargetError, MethodError):
        raise  # a wrong --target or method setting concerns the whole run, not these images: stop
    except VitlensError as exc:
        # a problem with these images (for example a size the model cannot take): record, go on
        for sample in good:
            writer.write_failure(sample.key, sample.path, str(exc), sample.label, sample.label_name)
            summary.failed.append((sample.key, sample.path, str(exc)))
        return
    extras = record_extra(good, result) if record_extra is not None else [None] * len(good)
    for index, sample in enumerate(good):
        if writer.done(sample.key, sample.path):
            continue
        extra = {"boxes": [list(b) for b in sample.boxes]} if sample.boxes else None
        if extras[index]:
            extra = {**(extra or {}), **extras[index]}
        writer.write_image(sample.key, sample.path, images[index], result.inputs[index].crop_box, result, index,
                           label=sample.label, label_name=sample.label_name or _name(model, sample.label),
                           extra=extra)
        summary.explained += 1


def _name(model, label):
    return None if label is None else model.class_name(label)
