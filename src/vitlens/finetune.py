"""``vitlens finetune``: a new classifier head on a pretrained ViT, trained on a labelled dataset.

The training loop is Hugging Face's ``transformers.Trainer`` (on ``accelerate``), not one of ours:
the same command runs on one CPU, one GPU, or several processes under ``torchrun`` /
``accelerate launch`` (DDP; the main process writes the outputs). What vitlens adds around it:

- the data: any input ``explain`` reads (:func:`vitlens.data.resolve_inputs`), every image labelled;
  a seeded split stratified by class (``val_fraction`` of each class held out) or a separate
  validation dataset (``val=``, e.g. the dataset's own ``:val`` / ``:test`` split);
- the model: ``timm:NAME`` (any timm model vitlens explains, the head replaced by
  ``reset_classifier(n)``) or ``hf:ORG/NAME`` / a local Hugging Face directory of a ViT, DeiT,
  DINOv2 or BEiT classifier (``classifier`` replaced by a new ``Linear``, ``num_labels`` /
  ``id2label`` set); other families are refused in one line;
- the preprocessing: the model's own :class:`~vitlens.models.Preprocess` for validation, and for
  training a random resized crop (scale 0.25..1, the model's interpolation) + horizontal flip before
  the same normalisation (torchvision transforms v2);
- the output folder: ``model.safetensors``, ``class_index.txt`` (``index<TAB>class id<TAB>name``,
  what ``--class-index`` reads), ``vitlens_model.json`` (what ``vitlens explain --model DIR`` loads
  with no other flag), ``finetune.json`` (the settings and the per-epoch history), and
  ``checkpoints/checkpoint-STEP`` at the end of every epoch (the Trainer's own: model, optimizer,
  scheduler, RNG states). Running the same command again resumes from the last checkpoint; other
  settings in the same ``out`` are refused (``force=True`` starts over).

``batch_size`` is the number of images per optimizer step over all processes together: each
process takes ``batch_size / (processes * grad_accum)`` per forward, so one or several processes,
with or without accumulation, train on the same batches (an epoch's last, incomplete batch is
dropped: a process's share of it would be padded with repeated images).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vitlens.errors import InputError, ModelError, OutputError, UsageError

__all__ = ["FinetuneResult", "finetune", "split_samples"]

SETTINGS_FILE = "finetune.json"
CHECKPOINTS = "checkpoints"
#: Hugging Face classifiers whose head is one ``classifier`` Linear (what ``hf`` fine-tuning replaces)
HF_CLASSIFIERS = ("ViTForImageClassification", "DeiTForImageClassification", "Dinov2ForImageClassification",
                  "Dinov2WithRegistersForImageClassification", "BeitForImageClassification")
PRECISIONS = ("fp32", "bf16", "fp16")
#: the random resized crop's area range
CROP_SCALE = (0.25, 1.0)


@dataclass
class FinetuneResult:
    """What a fine-tuning run did; ``history`` has one entry per evaluated epoch (epoch 0: before training).

    ``seconds`` is the Trainer's training time of this call (validation and checkpoints included);
    ``seconds_per_step`` the median time of one optimizer step (from one step's end to the next within an
    epoch: loading the batch, forward, backward, optimizer), 0 when this call made fewer than two steps.
    """

    out_dir: Path
    class_names: list
    train_images: int
    val_images: int
    steps: int
    seconds: float
    seconds_per_step: float
    history: list = field(default_factory=list)
    resumed_from: str | None = None
    #: False on the other processes of a distributed run (only the main one writes the folder)
    is_main: bool = True

    @property
    def val_accuracy(self) -> float | None:
        return self.history[-1]["val_accuracy"] if self.history else None

    @property
    def initial_accuracy(self) -> float | None:
        first = self.history[0] if self.history else None
        return first["val_accuracy"] if first is not None and first["epoch"] == 0 else None


# ------------------------------------------------------------------------------------------ data
def split_samples(samples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split stratified by label: ``round(n * val_fraction)`` images of each class are held out.

    The same samples, fraction and seed always give the same split; the order within each part is
    the input order.
    """
    by_label: dict = {}
    for i, sample in enumerate(samples):
        by_label.setdefault(sample.label, []).append(i)
    rng = random.Random(seed)
    held = set()
    for label in sorted(by_label):
        indices = list(by_label[label])
        rng.shuffle(indices)
        held.update(indices[:round(len(indices) * val_fraction)])
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    return train, val


def _check_labelled(samples: list, what: str) -> None:
    missing = sum(1 for s in samples if s.label is None)
    if missing == len(samples):
        raise InputError(f"'{what}' has no labels: fine-tuning needs labelled images (imagefolder:PATH, "
                         "tinyimagenet:PATH:train, cub200:PATH:train, imagenet-val:PATH --labels FILE, hf-dataset:...)")
    if missing:
        example = next(s.path for s in samples if s.label is None)
        raise InputError(f"{missing} of {len(samples)} images of '{what}' have no label (e.g. '{example}')")


def _class_key(sample) -> str:
    """The class id that the dataset's ``--class-index`` matching uses, where the path says it."""
    path = Path(sample.path)
    kind, _, rest = sample.source.partition(":")
    kind = kind.lower()
    if kind == "imagefolder":
        root = Path(os.path.abspath(os.path.expanduser(rest)))
        try:
            return path.relative_to(root).parts[0]
        except ValueError:
            pass
    elif kind == "cub200":
        return path.parent.name  # images/001.Black_footed_Albatross/xxx.jpg
    elif kind == "tinyimagenet" and path.parent.name == "images" and path.parent.parent.parent.name == "train":
        return path.parent.parent.name  # train/<wnid>/images/xxx.JPEG
    return " ".join(str(sample.label_name or sample.label).split())


def class_table(samples: list) -> tuple[list, list]:
    """(class names, class ids), one per output of the new head: labels 0..max label."""
    count = max(s.label for s in samples) + 1
    names, ids = [None] * count, [None] * count
    for s in samples:
        if names[s.label] is None:
            names[s.label] = " ".join(str(s.label_name).split()) if s.label_name else None
            ids[s.label] = _class_key(s)
    names = [name if name is not None else f"class_{i}" for i, name in enumerate(names)]
    ids = [key if key is not None else str(i) for i, key in enumerate(ids)]
    return names, ids


class ImageDataset(torch.utils.data.Dataset):
    """Samples decoded with :func:`vitlens.data.load_sample`, as ``{"pixel_values", "labels"}`` for the Trainer."""

    def __init__(self, samples, transform):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        from vitlens.data import load_sample

        sample = self.samples[index]
        return {"pixel_values": self.transform(load_sample(sample)), "labels": int(sample.label)}


def eval_transform(preprocess):
    """The model's own preprocessing, exactly as ``explain`` applies it."""
    return lambda image: preprocess(image)[0]


def train_transform(preprocess):
    """Random resized crop to the input size (the model's interpolation) + horizontal flip, then normalise."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2

    interpolation = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
                     "bicubic": InterpolationMode.BICUBIC, "lanczos": InterpolationMode.LANCZOS,
                     "box": InterpolationMode.BOX, "hamming": InterpolationMode.HAMMING}[preprocess.interpolation]
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(tuple(preprocess.input_size), scale=CROP_SCALE, interpolation=interpolation,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(preprocess.mean), list(preprocess.std)),
    ])


# ------------------------------------------------------------------------------------------ model
class Classifier(nn.Module):
    """What the Trainer trains: ``forward(pixel_values, labels)`` -> ``{"loss", "logits"}`` (cross-entropy)."""

    def __init__(self, module: nn.Module, hf: bool):
        super().__init__()
        self.module = module
        self.hf = hf

    def forward(self, pixel_values, labels=None):
        logits = self.module(pixel_values=pixel_values).logits if self.hf else self.module(pixel_values)
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits.float(), labels), "logits": logits}


def _family_of(spec) -> str:
    from vitlens.models.saved import is_saved_dir

    if not isinstance(spec, (str, os.PathLike)):
        raise ModelError(f"finetune takes a model spec (timm:NAME, hf:ORG/NAME or a Hugging Face directory), not "
                         f"a {type(spec).__name__}")
    text = str(spec)
    if is_saved_dir(text):
        return "vitlens-dir"
    kind, _, name = text.partition(":")
    if kind in ("timm", "hf") and name:
        return kind
    if Path(text).is_dir() and (Path(text) / "config.json").is_file():
        return "hf"
    raise ModelError(f"cannot fine-tune '{text}': vitlens finetune supports timm:NAME (timm ViT, DeiT, BEiT, EVA, "
                     f"CaiT) and hf:ORG/NAME or a Hugging Face directory ({', '.join(HF_CLASSIFIERS)})")


def build_model(spec, weights, num_classes: int, class_names: list, seed: int, input_size=None):
    """The pretrained model with a new ``num_classes`` head: (module, preprocess, family, arch, model kwargs)."""
    import vitlens
    from vitlens.models.preprocess import parse_input_size
    from vitlens.models.saved import read_model_json

    family = _family_of(spec)
    base = vitlens.load_model(spec, weights=weights)
    module, preprocess = base.module, base.preprocess
    if family == "vitlens-dir":  # fine-tuning a fine-tuned model again
        family = read_model_json(spec)["family"]
    model_kwargs: dict = {}
    arch = None
    torch.manual_seed(seed)  # the new head's initial weights
    if family == "timm":
        if not hasattr(module, "reset_classifier") or not base.family.startswith("timm"):
            raise ModelError(f"cannot fine-tune '{spec}': a timm {type(module).__name__} has no classifier head "
                             "that vitlens replaces")
        arch = module.pretrained_cfg.get("architecture") or str(spec).partition(":")[2].split(".")[0]
        if input_size is not None:
            size = parse_input_size(input_size)
            if tuple(size) != tuple(preprocess.input_size):
                if not hasattr(module, "set_input_size"):
                    raise ModelError(f"cannot change the input size of timm {type(module).__name__}: drop --input-size")
                module.set_input_size(img_size=size)  # the position embedding resampled once, here
                preprocess = preprocess.with_overrides(input_size=size)
        fixed = getattr(getattr(module, "patch_embed", None), "img_size", None)
        if fixed is not None:
            model_kwargs["img_size"] = list(fixed)
        module.reset_classifier(num_classes)
    else:
        kind = type(module).__name__
        if kind not in HF_CLASSIFIERS:
            raise ModelError(f"cannot fine-tune a Hugging Face {kind}: vitlens finetune supports "
                             f"{', '.join(HF_CLASSIFIERS)}")
        if input_size is not None and tuple(parse_input_size(input_size)) != tuple(preprocess.input_size):
            raise UsageError("--input-size is for timm models: a Hugging Face model is fine-tuned at its own size")
        module.classifier = nn.Linear(module.classifier.in_features if isinstance(module.classifier, nn.Linear)
                                      else module.config.hidden_size * (2 if "Dinov2" in kind else 1), num_classes)
        module.config.num_labels = num_classes
        module.config.id2label = dict(enumerate(class_names))
        module.config.label2id = {name: i for i, name in enumerate(class_names)}
        module.num_labels = num_classes
    module.train()
    return module, preprocess, family, arch, model_kwargs


# ------------------------------------------------------------------------------------------ run
def _settings(**values) -> dict:
    return json.loads(json.dumps(values, default=str))


def _check_out(out: Path, settings: dict, force: bool) -> str | None:
    """Check ``out``, writing nothing (a previous run of the same settings is resumed, another run refused); the
    checkpoint to resume from, or None."""
    path = out / SETTINGS_FILE
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path '{out}' exists and is not a directory")
    if path.is_file() and not force:
        try:
            previous = json.loads(path.read_text()).get("settings")
        except (OSError, ValueError):
            previous = None
        if previous != settings:
            changed = sorted(k for k in set(settings) | set(previous or {})
                             if (previous or {}).get(k) != settings.get(k))
            what = ", ".join(changed[:4]) or "file"
            raise OutputError(f"--out '{out}' holds another fine-tuning run (different {what}): use another --out, "
                              "or --force to start over")
    elif out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"--out '{out}' is not empty and holds no fine-tuning run: use an empty or new folder")
    if force:
        return None
    found = sorted((p for p in (out / CHECKPOINTS).glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                   key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    return str(found[-1]) if found else None


def finetune(dataset, model, out, *, weights=None, val=None, val_fraction: float = 0.2, epochs: int = 3,
             max_steps: int | None = None, lr: float = 1e-4, batch_size: int = 32, grad_accum: int = 1,
             weight_decay: float = 0.05, warmup: float = 0.1, precision: str = "fp32", seed: int = 0,
             input_size=None, augment: bool = True, labels=None, class_index=None, limit: int | None = None,
             image_column=None, label_column=None, device=None, workers: int = 0, progress: bool = True,
             force: bool = False, callbacks=None, log=None) -> FinetuneResult:
    """Fine-tune ``model`` on ``dataset`` and write a model folder ``out`` that ``vitlens.load_model(out)`` reads.

    Parameters
    ----------
    dataset : str or list of str
        What ``explain`` reads (``imagefolder:PATH``, ``tinyimagenet:PATH:train``, ``cub200:PATH:train``,
        ``imagenet-val:PATH`` with ``labels``, ``hf-dataset:NAME:train``, labelled folders with ``labels``);
        every image needs a label.
    model : str
        ``timm:NAME[.TAG]`` (with ``weights``, or the hub's pretrained weights), ``hf:ORG/NAME`` or a local
        Hugging Face directory, or the folder of an earlier fine-tuning run.
    out : path
        The output folder (see the module docstring); the same call again resumes.
    val : str or list of str, optional
        A validation dataset (e.g. the dataset's own ``:val`` split); without it ``val_fraction`` of each
        class of ``dataset`` is held out, chosen with ``seed``.
    epochs, max_steps : int
        Training length; ``max_steps`` (optimizer steps), when given, wins over ``epochs``.
    lr, weight_decay, warmup : float
        AdamW learning rate and weight decay; linear warm-up over this fraction of the steps, then cosine decay.
    batch_size, grad_accum : int
        Images per optimizer step over all processes, and the forwards it is accumulated from.
    precision : {'fp32', 'bf16', 'fp16'}
        Mixed precision of the forward and backward (bf16 on CPU and GPU, fp16 on CUDA only).
    input_size : int or (H, W), optional
        Train and run at another input size (timm models: the position embedding is resampled once).
    augment : bool
        Random resized crop + horizontal flip for training (False: the validation preprocessing).
    callbacks : list of transformers.TrainerCallback, optional
        Passed to the Trainer.
    log : callable, optional
        Where the one-line messages go (default: ``tqdm.write`` to stdout).

    Returns
    -------
    FinetuneResult
    """
    from vitlens.cliargs import check_count, select_device
    from vitlens.data import resolve_inputs
    from vitlens.engine import precision_name

    if log is None:
        from tqdm import tqdm

        log = tqdm.write  # between the progress bars, not through them
    out = Path(out)
    for value, option in ((batch_size, "--batch-size"), (grad_accum, "--grad-accum"), (epochs, "--epochs")):
        check_count(value, option)
    if max_steps is not None:
        check_count(max_steps, "--max-steps")
    if workers is None or isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a number > 0, got {lr!r}")
    if not 0.0 <= warmup < 1.0:
        raise UsageError(f"--warmup must be a fraction in [0, 1), got {warmup!r}")
    precision = precision_name(precision, option="--precision")
    device = select_device(device)
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device: use bf16 on the CPU")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if batch_size % (world * grad_accum):
        raise UsageError(f"--batch-size {batch_size} is not a multiple of {world} process(es) x --grad-accum "
                         f"{grad_accum}")
    if val is None and not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {val_fraction!r}")
    _family_of(model)

    columns = {"image_column": image_column, "label_column": label_column}
    samples = resolve_inputs(dataset, labels=labels, class_index=class_index, limit=limit, **columns)
    what = " ".join(dataset) if isinstance(dataset, (list, tuple)) else str(dataset)
    _check_labelled(samples, what)
    if val is not None:
        val_samples = resolve_inputs(val, labels=labels, class_index=class_index, **columns)
        _check_labelled(val_samples, " ".join(val) if isinstance(val, (list, tuple)) else str(val))
        train_samples = samples
    else:
        train_samples, val_samples = split_samples(samples, val_fraction, seed)
        if not val_samples or not train_samples:
            raise UsageError(f"--val-fraction {val_fraction} of {len(samples)} images leaves no "
                             f"{'validation' if not val_samples else 'training'} images")
    class_names, class_ids = class_table(train_samples + val_samples)

    settings = _settings(dataset=dataset, val=val, val_fraction=None if val is not None else val_fraction,
                         model=str(model), weights=str(Path(weights).resolve()) if weights else None,
                         epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                         weight_decay=weight_decay, warmup=warmup, precision=precision, seed=seed,
                         input_size=input_size, augment=augment, labels=labels, class_index=class_index, limit=limit,
                         train_images=len(train_samples), val_images=len(val_samples))
    resume = _check_out(out, settings, force)
    if len(train_samples) < batch_size:
        raise UsageError(f"--batch-size {batch_size} is more than the {len(train_samples)} training images")

    module, preprocess, family, arch, model_kwargs = build_model(model, weights, len(class_names), class_names,
                                                                 seed, input_size)
    train_data = ImageDataset(train_samples, train_transform(preprocess) if augment else eval_transform(preprocess))
    val_data = ImageDataset(val_samples, eval_transform(preprocess))
    steps_per_epoch = len(train_samples) // batch_size  # the last incomplete batch of an epoch is dropped
    total_steps = max_steps or steps_per_epoch * epochs
    timer = StepTimer()
    trainer = _trainer(Classifier(module, hf=family == "hf"), train_data, val_data, out, device=device,
                       per_device=batch_size // (world * grad_accum), grad_accum=grad_accum, epochs=epochs,
                       max_steps=max_steps, lr=lr, weight_decay=weight_decay,
                       warmup_steps=int(round(warmup * total_steps)), precision=precision, seed=seed,
                       workers=workers, progress=progress, callbacks=[timer, *(callbacks or [])], log=log,
                       eval_on_start=resume is None)
    trainer.accelerator.wait_for_everyone()  # every process has looked at --out before the main one writes
    if trainer.is_world_process_zero():
        if force and (out / CHECKPOINTS).is_dir():  # starting over: the other run's checkpoints go
            shutil.rmtree(out / CHECKPOINTS)
        out.mkdir(parents=True, exist_ok=True)
        _write_settings(out, settings, trainer.state.log_history)
        log(f"fine-tuning {model} on {len(train_samples)} images ({len(class_names)} classes), validating on "
            f"{len(val_samples)}; {total_steps} steps of {batch_size} images"
            + (f"; resuming from {resume}" if resume else ""))
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    history = epoch_history(trainer.state.log_history)
    if trainer.is_world_process_zero():
        _export(out, module, family, arch, model_kwargs, preprocess, class_names, class_ids,
                base={"spec": str(model), "weights": settings["weights"]})
        _write_settings(out, settings, trainer.state.log_history, done=True)
    runtime = float(output.metrics.get("train_runtime", seconds))
    return FinetuneResult(out_dir=out, class_names=class_names, train_images=len(train_samples),
                          val_images=len(val_samples), steps=trainer.state.global_step, seconds=runtime,
                          seconds_per_step=timer.median(), history=history,
                          resumed_from=resume, is_main=trainer.is_world_process_zero())


def _step_timer_class():
    import statistics

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds from one optimizer step's end to the next, within an epoch (validation and checkpoints excluded)."""

        def __init__(self):
            self.seconds, self.last = [], None

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.last is not None:
                self.seconds.append(now - self.last)
            self.last = now

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.last = None

        def on_evaluate(self, args, state, control, **kwargs):
            self.last = None

        def on_save(self, args, state, control, **kwargs):
            self.last = None

        def median(self) -> float:
            return statistics.median(self.seconds) if self.seconds else 0.0

    return StepTimer


def StepTimer():  # noqa: N802 (a class made when transformers is imported)
    return _step_timer_class()()


def epoch_history(log_history: list) -> list:
    """One entry per evaluation: epoch, step, val accuracy and loss, the mean training loss since the last one."""
    history, losses = [], []
    for entry in log_history:
        if "loss" in entry:
            losses.append(float(entry["loss"]))
        if "eval_accuracy" in entry:
            history.append({"epoch": round(float(entry.get("epoch", 0.0)), 4), "step": int(entry.get("step", 0)),
                            "val_accuracy": float(entry["eval_accuracy"]), "val_loss": float(entry["eval_loss"]),
                            "train_loss": sum(losses) / len(losses) if losses else None})
            losses = []
    return history


def _write_settings(out: Path, settings: dict, log_history: list, done: bool = False) -> None:
    from vitlens.render.atomic import write_text_atomic

    record = {"settings": settings, "finished": done, "history": epoch_history(log_history),
              "losses": [{"step": int(e["step"]), "loss": float(e["loss"])} for e in log_history if "loss" in e]}
    write_text_atomic(out / SETTINGS_FILE, json.dumps(record, indent=2) + "\n")


def _export(out: Path, module, family, arch, model_kwargs, preprocess, class_names, class_ids, base) -> None:
    """The model folder: weights, class_index.txt, vitlens_model.json (written last: it makes the folder a model)."""
    from safetensors.torch import save_file

    from vitlens.models.saved import CLASS_INDEX_FILE, WEIGHTS_FILE, write_model_json
    from vitlens.render.atomic import write_text_atomic

    module.eval()
    if family == "hf":
        module.save_pretrained(out, safe_serialization=True)
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, out / WEIGHTS_FILE)
    write_text_atomic(out / CLASS_INDEX_FILE,
                      "".join(f"{i}\t{key}\t{name}\n" for i, (key, name) in enumerate(zip(class_ids, class_names))))
    write_model_json(out, family=family, arch=arch, model_kwargs=model_kwargs, preprocess=preprocess,
                     class_names=class_names, class_ids=class_ids, base=base)


def _trainer(model, train_data, val_data, out: Path, *, device, per_device, grad_accum, epochs, max_steps, lr,
             weight_decay, warmup_steps, precision, seed, workers, progress, callbacks, log, eval_on_start):
    import numpy as np
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the Trainer's notices are not the command's output
    QuietProgress = _quiet_progress_class()

    class EpochLine(TrainerCallback):
        """One line per epoch on the main process: validation accuracy and loss."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.is_world_process_zero and metrics:
                when = f"epoch {state.epoch or 0:g} (step {state.global_step})" if state.global_step else "new head"
                log(f"{when}: val accuracy {metrics['eval_accuracy']:.4f}, val loss {metrics['eval_loss']:.4f}")

    def accuracy(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}

    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS), per_device_train_batch_size=per_device,
        per_device_eval_batch_size=max(per_device, 1), gradient_accumulation_steps=grad_accum,
        num_train_epochs=epochs, max_steps=max_steps if max_steps is not None else -1, learning_rate=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, lr_scheduler_type="cosine",
        eval_strategy="epoch", save_strategy="epoch", eval_on_start=eval_on_start, logging_strategy="steps",
        logging_steps=1,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device.type == "cpu", seed=seed, data_seed=seed,
        dataloader_num_workers=workers, disable_tqdm=not progress, report_to="none", label_names=["labels"],
        remove_unused_columns=False, save_only_model=False, log_level="error", ddp_find_unused_parameters=False,
        dataloader_drop_last=True,  # whole batches only: the same batches on one process or several
    )
    class WholeValidation(Trainer):
        """Whole training batches only, but every validation image counts (no drop_last for evaluation)."""

        def get_eval_dataloader(self, eval_dataset=None):
            self.args.dataloader_drop_last = False
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.args.dataloader_drop_last = True

    trainer = WholeValidation(model=model, args=args, train_dataset=train_data, eval_dataset=val_data,
                              compute_metrics=accuracy, callbacks=[EpochLine(), *(callbacks or [])])
    # the bars without the Trainer's printed log dicts (every step is logged, for the loss curve in finetune.json)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(QuietProgress())
    return trainer


def _quiet_progress_class():
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        """The Trainer's progress bars, without printing every log dict."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    return QuietProgress
