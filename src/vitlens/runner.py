"""Dataset-scale runs: batches, a progress bar, per-image outputs, failures, resume, many processes.

Batches are cut from the full, ordered list of samples (batch i = samples[i*B:(i+1)*B]) whatever
is already done and however many processes share the run, so a resumed or distributed run
computes every batch with exactly the same images as an uninterrupted one-process run and writes
identical files.

The pipeline keeps the model busy: images of the next batches are decoded by a pool of threads
while the model works (Pillow releases the GIL while it decodes), and every image's overlays, maps
and record are written by another pool (PNG and zlib encoding release the GIL too). Both queues are
bounded (``PREFETCH_BATCHES`` batches ahead, ``WRITE_BACKLOG_BATCHES`` batches of results waiting to
be written), so memory stays flat however long the run.

Under ``torchrun`` (see :mod:`vitlens.distributed`) rank r explains batches r, r + N, r + 2N...;
the main rank prepares the run directory first and writes the manifest and report last, from the
records every rank sends it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vitlens.api import explain
from vitlens.data import Sample, load_sample
from vitlens.data.images import ORIGINAL_SIZE
from vitlens.distributed import Group, current
from vitlens.engine import check_precision, precision_name
from vitlens.errors import InputError, MethodError, TargetError, UsageError, VitlensError
from vitlens.memory import parse_size
from vitlens.cliargs import (OVERLAY_MAX_SIDE, check_count, check_overlay, check_params_requested,
                             check_signed_display, check_target, parse_save)
from vitlens.methods import check_params_for_model, get_method
from vitlens.outputs import RunWriter, overlay_size

#: batches decoded ahead of the model
PREFETCH_BATCHES = 2
#: batches of results that may wait for the writers before the model loop waits for them
WRITE_BACKLOG_BATCHES = 2


def default_io_workers() -> int:
    """Threads for decoding and for writing: up to 4, never more than the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


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
    """What a run did (over all processes of a distributed run)."""

    out_dir: Path
    total: int
    explained: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # (key, path, error)
    manifest: Path | None = None
    report: Path | None = None
    seconds: float = 0.0
    warnings: list = field(default_factory=list)  # one line per method and kind of map that shows nothing


def _load(sample: Sample, reduce=None):
    try:
        return load_sample(sample, reduce=reduce), None
    except InputError as exc:
        return None, str(exc)


def decoding_size(preprocess, overlay_max_side: int | None):
    """The smallest decoded size a run needs from an image of a given size, for ``load_image(reduce=)``.

    Twice what the model's resize keeps (so the resize still averages several decoded pixels into
    each input pixel) and the overlay's size; None (decode everything) for full-size overlays.
    """
    if overlay_max_side is None:
        return None

    def needed(size):
        (resized_w, resized_h), _ = preprocess.geometry(*size)
        overlay_w, overlay_h = overlay_size(size, overlay_max_side)
        return max(2 * resized_w, overlay_w), max(2 * resized_h, overlay_h)

    return needed


class _Writes:
    """Background writing with a bounded backlog; the first failure is raised in the model loop."""

    def __init__(self, workers: int, backlog: int):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vitlens-write")
        self.pending: deque = deque()
        self.backlog = backlog

    def submit(self, work, *args, **kwargs) -> None:
        while len(self.pending) >= self.backlog:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(work, *args, **kwargs))

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self, wait: bool = True) -> None:
        try:
            if wait:
                self.drain()
        finally:
            # an interrupted run still finishes what is queued: every file is whole, and a record
            # is only ever written after its image's files
            self.pool.shutdown(wait=True)


def run_explain(samples: list, model, methods: list, params: dict | None = None, target=None, out_dir="results",
                batch_size: int = 16, resume: bool = True, progress: bool = True, cmap: str = "jet",
                alpha: float = 0.5, html: bool = False, settings: dict | None = None,
                record_extra=None, save=None, overlay_max_side: int | None = OVERLAY_MAX_SIDE,
                io_workers: int | None = None, group: Group | None = None,
                reduced_decoding: bool = True, precision="fp32", signed_display: str = "signed",
                memory_budget=None) -> RunSummary:
    """Explain every sample and write the run directory (see :mod:`vitlens.outputs`).

    ``target`` is what :func:`vitlens.explain` accepts for one image, or ``'label'`` to explain each
    image's ground-truth class. A sample that cannot be decoded (or has no label when
    ``target='label'``) is recorded as failed and the run goes on.

    ``save`` chooses what is written besides the records (``'maps'``, ``'overlays,maps'``...; default
    all); ``overlay_max_side`` caps the overlays' longest side (None: the original resolution).
    ``io_workers`` threads decode and as many write (default :func:`default_io_workers`).
    With ``reduced_decoding`` (and capped overlays) a JPEG far larger than the model and the overlay
    need is decoded at 1/2, 1/4 or 1/8 scale (:func:`decoding_size`), which bounds the memory a
    huge photo takes; records still give the file's size and the crop box in its pixels.
    ``memory_budget`` bounds what one pass of :func:`vitlens.explain` may use (a batch over it is explained
    in chunks; default 80 % of the free memory). ``signed_display`` is how the overlays of signed methods
    are drawn (see :class:`~vitlens.outputs.RunWriter`).
    ``precision`` (``fp32``, ``bf16``, ``fp16``) is the one :func:`vitlens.explain` computes in; it is
    a setting of the run (a run resumes only with the same precision).

    ``record_extra(samples, result)``, when given, is called once per explained batch with the
    batch's good samples and their :class:`~vitlens.api.ExplainResult`; it returns one dict per
    sample whose entries are added to that image's record (``vitlens evaluate`` puts its per-image
    metrics there, so they are written atomically with the record and resume with it).

    In a ``torch.distributed`` run (``group``, default: the initialised process group if any) every
    rank calls this with the same arguments; each explains its share of the batches, and the
    returned summary counts the images of all ranks.
    """
    from tqdm import tqdm

    group = group or current()
    # every mistake in the request is found here, before RunWriter creates run.json and records/
    check_count(batch_size, "batch_size")
    if io_workers is not None:
        check_count(io_workers, "io_workers")
    check_overlay(cmap, alpha, prefix="")
    signed_display = check_signed_display(signed_display, option="signed_display")
    parse_size(memory_budget)
    kinds = parse_save(save)
    if html and not {"overlays", "originals"} <= set(kinds):
        raise UsageError("the HTML report shows overlays on originals: keep overlays and originals in --save, "
                         "or write the report without --format html")
    check_params_requested(params, methods, option="params", among="the methods")
    resolved = {name: get_method(name).params((params or {}).get(name)) for name in methods}
    check_params_for_model(resolved, model.num_layers if model.has_attention else None, model)
    check_target(model, list(target.classes) if isinstance(target, EveryImage) else target, allow_label=True)
    precision = precision_name(precision)
    check_precision(precision, model.device)
    run_settings = {"target": str(target if target is not None else "pred"), "precision": precision,
                    **(settings or {})}

    def writer_for(prepare: bool) -> RunWriter:
        return RunWriter(out_dir, model, resolved, settings=run_settings, resume=resume, cmap=cmap, alpha=alpha,
                         save=kinds, overlay_max_side=overlay_max_side, prepare=prepare, signed_display=signed_display)

    # the main rank checks and prepares the directory; the others learn whether it could
    def prepare_directory() -> None:
        writer_for(prepare=True)

    group.run_on_main(prepare_directory)
    writer = writer_for(prepare=False)
    summary = RunSummary(out_dir=Path(out_dir), total=len(samples))
    started = time.perf_counter()
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    mine = group.share(batches)
    workers = io_workers or default_io_workers()
    reduce = decoding_size(model.preprocess, overlay_max_side) if reduced_decoding else None
    desc = "explaining" if not group.distributed else f"explaining (rank 0 of {group.world_size})"
    bar = tqdm(total=sum(len(b) for b in mine), unit="img", disable=not progress or not group.is_main, desc=desc,
               dynamic_ncols=True)
    decoding = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vitlens-decode")
    writes = _Writes(workers, backlog=WRITE_BACKLOG_BATCHES * batch_size)
    finished = False
    try:
        ahead: deque = deque()

        def decode_ahead(upto: int) -> None:
            while len(ahead) < PREFETCH_BATCHES and upto < len(mine):
                batch = mine[upto]
                todo = [s for s in batch if not writer.done(s.key, s.path)]
                # a batch with nothing left is not decoded at all
                ahead.append([decoding.submit(_load, s, reduce) for s in batch] if todo else None)
                upto += 1

        decode_ahead(0)
        for number, batch in enumerate(mine):
            futures = ahead.popleft()
            decode_ahead(number + 1 + len(ahead))
            todo = [s for s in batch if not writer.done(s.key, s.path)]
            summary.skipped += len(batch) - len(todo)
            for sample in batch:  # failures of an earlier run stay failures of this one
                if sample not in todo:
                    record = writer.read_record(sample.key)
                    if record is not None and record.get("status") != "ok":
                        summary.failed.append((sample.key, sample.path, record.get("error")))
            if todo:
                loaded = [f.result() for f in futures] if futures is not None else [_load(s, reduce) for s in batch]
                _explain_batch(batch, loaded, writer, model, methods, params, target, summary, record_extra,
                               writes, precision, memory_budget)
            bar.update(len(batch))
        writes.drain()
        finished = True
    finally:
        decoding.shutdown(wait=True, cancel_futures=True)
        writes.close(wait=finished)
        bar.close()

    # every rank sends the records of its batches (whoever wrote them, now or in an earlier run)
    records = {s.key: writer.read_record(s.key) for batch in mine for s in batch}
    if group.distributed:
        counts = group.gather((summary.explained, summary.skipped, summary.failed))
        summary.explained = sum(c[0] for c in counts)
        summary.skipped = sum(c[1] for c in counts)
        summary.failed = [f for c in counts for f in c[2]]
        shares = group.gather_to_main(records)
        records = {key: record for share in shares for key, record in share.items()} if group.is_main else {}

    def write_manifest():
        manifest = writer.finish(order=[s.key for s in samples], records=records)
        report = None
        if html:
            from vitlens.render import write_report

            report = write_report(writer.out)
        return manifest, report, writer.warnings

    summary.manifest, summary.report, summary.warnings = group.run_on_main(write_manifest)
    summary.seconds = time.perf_counter() - started
    return summary


def _explain_batch(batch, loaded, writer, model, methods, params, target, summary, record_extra=None,
                   writes: _Writes | None = None, precision="fp32", memory_budget=None) -> None:
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
        result = explain(model, images, methods=methods, target=batch_target, batch_size=len(images), params=params,
                         precision=precision, warn=False,  # the run sums degenerate maps up once, at its end
                         memory_budget=memory_budget)
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
        arguments = (sample.key, sample.path, images[index], result.inputs[index].crop_box, result, index)
        options = {"label": sample.label, "label_name": sample.label_name or _name(model, sample.label),
                   "extra": extra, "original_size": images[index].info.get(ORIGINAL_SIZE)}
        if writes is None:
            writer.write_image(*arguments, **options)
        else:
            writes.submit(writer.write_image, *arguments, **options)
        summary.explained += 1


def _name(model, label):
    return None if label is None else model.class_name(label)
