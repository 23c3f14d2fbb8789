"""``vitlens finetune`` (vitlens.finetune): the output folder, resume, the split, the refusals.

Everything runs on timm's tiny random ``test_vit`` (the CLI tests' weights, 1000 classes) at 32 x 32
input (its position embedding resampled once by ``--input-size 32``) and a synthetic image folder of
three classes whose photos differ by colour, a few optimizer steps each, one thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from vitlens import cli
from vitlens.data.labelfiles import read_class_index
from vitlens.errors import InputError, ModelError, OutputError, UsageError
from vitlens.finetune import finetune, split_samples

from .conftest import TINY_SPEC

COLOURS = {"apple": (200, 40, 40), "leaf": (40, 190, 40), "sky": (40, 60, 210)}


def make_folder(root: Path, per_class: int = 8) -> Path:
    """An ImageFolder: one sub-folder per class, photos of the class colour with noise, of varied sizes."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 24 + i % 3 * 4, 28 + i % 2 * 6
            noise = rng.integers(-40, 40, (h, w, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data")


def run(folder, out, weights, **options):
    settings = dict(weights=weights, epochs=2, batch_size=6, lr=5e-4, input_size=32, progress=False,
                    log=lambda line: None)
    settings.update(options)
    return finetune(f"imagefolder:{folder}", TINY_SPEC, out, **settings)


def test_the_output_folder_loads_with_no_other_flag(folder, tmp_path, tiny_weights, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "ft"
    result = run(folder, out, tiny_weights)
    assert (result.train_images, result.val_images) == (18, 6)  # 2 of each class's 8 held out
    assert result.steps == 6 and result.seconds_per_step > 0  # 3 whole batches of 6 per epoch
    assert [entry["epoch"] for entry in result.history] == [0.0, 1.0, 2.0]  # the new head, then every epoch
    for name in ("model.safetensors", "class_index.txt", "vitlens_model.json", "finetune.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]

    index = read_class_index(str(out / "class_index.txt"))
    assert index.indices == {"apple": 0, "leaf": 1, "sky": 2}
    assert (out / "class_index.txt").read_text() == "0\tapple\tapple\n1\tleaf\tleaf\n2\tsky\tsky\n"

    model = vitlens.load_model(out)
    assert model.class_names == ["apple", "leaf", "sky"] and model.num_classes == 3
    assert model.family == "timm" and tuple(model.preprocess.input_size) == (32, 32)
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(value, saved[key]) for key, value in model.module.state_dict().items())
    from vitlens.models.weights import file_sha256

    assert model.info.weights_sha256 == file_sha256(out / "model.safetensors")  # in explain's run.json and manifest
    # the loaded model's accuracy on the held-out images is the last epoch's validation accuracy
    from vitlens.data import load_sample, resolve_inputs

    _, held_out = split_samples(resolve_inputs(f"imagefolder:{folder}"), 0.2, 0)
    x = torch.stack([model.preprocess(load_sample(s))[0] for s in held_out])
    with torch.no_grad():
        predicted = model.module(x).argmax(-1)
    accuracy = (predicted == torch.tensor([s.label for s in held_out])).float().mean().item()
    assert accuracy == pytest.approx(result.val_accuracy)

    capsys.readouterr()
    code = cli.main(["explain", str(folder / "sky"), "--model", str(out), "--methods", "rollout", "--out",
                     str(tmp_path / "run"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model"]["spec"] == str(out) and manifest["model"]["num_classes"] == 3
    assert {record["prediction"]["name"] for record in manifest["images"]} <= set(COLOURS)


def test_training_learns_the_colours(folder, tmp_path, tiny_weights):
    torch.set_num_threads(1)
    result = run(folder, tmp_path / "ft", tiny_weights, epochs=3, augment=False)
    assert result.history[-1]["val_accuracy"] == 1.0
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"] / 2


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_weights(folder, tmp_path, tiny_weights):
    """Killed in the middle of epoch 2 (step 5 of 6), the same call again resumes from the epoch-1 checkpoint
    (model, optimizer, scheduler, RNG states, sampler) and ends with the uninterrupted run's weights: equal
    within 1e-6 (exactly equal on this CPU), the same validation accuracy."""
    from transformers import TrainerCallback

    torch.set_num_threads(1)

    class KillAtStep5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise Interrupt

    class CountSteps(TrainerCallback):
        count = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.count += 1

    whole = run(folder, tmp_path / "whole", tiny_weights)
    with pytest.raises(Interrupt):
        run(folder, tmp_path / "cut", tiny_weights, callbacks=[KillAtStep5()])
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    assert json.loads((tmp_path / "cut" / "finetune.json").read_text())["finished"] is False
    steps = CountSteps()
    resumed = run(folder, tmp_path / "cut", tiny_weights, callbacks=[steps])
    assert resumed.resumed_from.endswith("checkpoint-3") and steps.count == 3  # steps 4..6 only
    assert resumed.val_accuracy == whole.val_accuracy
    assert [e["val_accuracy"] for e in resumed.history] == [e["val_accuracy"] for e in whole.history]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_the_split_is_seeded_and_stratified(folder):
    from vitlens.data import resolve_inputs

    samples = resolve_inputs(f"imagefolder:{folder}")
    train, val = split_samples(samples, 0.25, seed=3)
    assert [sum(s.label == c for s in val) for c in range(3)] == [2, 2, 2]
    assert len(train) == 18 and not {s.path for s in train} & {s.path for s in val}
    assert split_samples(samples, 0.25, seed=3) == (train, val)
    assert split_samples(samples, 0.25, seed=4)[1] != val


def test_a_separate_validation_dataset(folder, tmp_path, tiny_weights):
    """``val=``: all of the inputs train; every validation image counts, also the 3 beyond the last whole batch
    of 6 (training drops an epoch's incomplete batch, validation does not)."""
    torch.set_num_threads(1)
    other = make_folder(tmp_path / "val", per_class=3)
    result = run(folder, tmp_path / "ft", tiny_weights, epochs=1, val=f"imagefolder:{other}")
    assert (result.train_images, result.val_images, result.steps) == (24, 9, 4)
    from vitlens.data import load_sample, resolve_inputs

    model = vitlens.load_model(tmp_path / "ft")
    samples = resolve_inputs(f"imagefolder:{other}")
    with torch.no_grad():
        logits = model.module(torch.stack([model.preprocess(load_sample(s))[0] for s in samples]))
    labels = torch.tensor([s.label for s in samples])
    assert result.val_accuracy == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert result.history[-1]["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(),
                                                           rel=1e-5)


def test_a_hugging_face_vit(folder, tmp_path):
    from .conftest import tiny_hf_vit

    torch.set_num_threads(1)
    tiny_hf_vit().save_pretrained(tmp_path / "hf-vit")
    out = tmp_path / "ft"
    result = finetune(f"imagefolder:{folder}", str(tmp_path / "hf-vit"), out, epochs=1, batch_size=6, lr=5e-4,
                      progress=False, log=lambda line: None)
    assert result.steps == 3
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "apple", "1": "leaf", "2": "sky"}
    model = vitlens.load_model(out)
    assert model.family == "hf" and model.class_names == ["apple", "leaf", "sky"] and model.num_classes == 3


def test_refusals(folder, tmp_path, tiny_weights):
    with pytest.raises(InputError, match="has no labels"):
        finetune(str(folder / "sky"), TINY_SPEC, tmp_path / "a", weights=tiny_weights)
    with pytest.raises(ModelError, match="cannot fine-tune 'torchvision:vit_b_16'"):
        finetune(f"imagefolder:{folder}", "torchvision:vit_b_16", tmp_path / "a")
    with pytest.raises(UsageError, match="not a multiple"):
        finetune(f"imagefolder:{folder}", TINY_SPEC, tmp_path / "a", batch_size=5, grad_accum=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine\n")
    with pytest.raises(OutputError, match="not empty and holds no fine-tuning run"):
        finetune(f"imagefolder:{folder}", TINY_SPEC, tmp_path / "full", weights=tiny_weights, batch_size=6)
    with pytest.raises(UsageError, match="more than the 18 training images"):
        finetune(f"imagefolder:{folder}", TINY_SPEC, tmp_path / "a", weights=tiny_weights, batch_size=32)
    assert not (tmp_path / "a").exists()


def test_other_settings_in_the_same_out_are_refused(folder, tmp_path, tiny_weights):
    torch.set_num_threads(1)
    out = tmp_path / "ft"
    run(folder, out, tiny_weights, epochs=1)
    before = (out / "finetune.json").read_text()
    with pytest.raises(OutputError, match=r"holds another fine-tuning run \(different lr\)"):
        run(folder, out, tiny_weights, epochs=1, lr=1e-3)
    assert (out / "finetune.json").read_text() == before
    again = run(folder, out, tiny_weights, epochs=1, force=True, lr=1e-3)  # --force starts over
    assert again.resumed_from is None and again.steps == 3


# ------------------------------------------------------------------------------------ torchrun
def _environment() -> dict:
    """Without a torchrun of the caller's; one intra-op thread per process, the reference run too (as in
    tests/test_distributed.py: a float sum split over two threads may round differently)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_two_processes_follow_the_one_process_loss_curve(folder, tmp_path, tiny_weights):
    """``torchrun --nproc-per-node 2`` (gloo on this CPU): each process takes 3 of the 6 images of a step, the
    Trainer averages the gradients, so every step's loss equals the one-process run's within 1e-5 (float
    sums in another order: 1.2e-7 at most measured here) and the validation accuracy is the same. No
    augmentation: each process draws its own random crops."""
    import subprocess
    import sys

    options = ["finetune", f"imagefolder:{folder}", "--model", TINY_SPEC, "--weights", str(tiny_weights),
               "--epochs", "2", "--batch-size", "6", "--input-size", "32", "--lr", "5e-4", "--no-augment", "--quiet"]
    one = [sys.executable, "-m", "vitlens", *options, "--out", str(tmp_path / "one")]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", "-m", "vitlens", *options, "--out", str(tmp_path / "two")]
    for command in (one, two):
        done = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads((tmp_path / name / "finetune.json").read_text()) for name in ("one", "two")]
    curves = [[(e["step"], e["loss"]) for e in run_["losses"]] for run_ in runs]
    assert [step for step, _ in curves[0]] == [step for step, _ in curves[1]] == [1, 2, 3, 4, 5, 6]
    assert max(abs(a - b) for (_, a), (_, b) in zip(*curves)) <= 1e-5
    assert abs(curves[0][0][1] - curves[1][0][1]) <= 1e-6  # the first step: the same images, the same weights
    assert [e["val_accuracy"] for e in runs[0]["history"]] == [e["val_accuracy"] for e in runs[1]["history"]]
    model = vitlens.load_model(tmp_path / "two")  # the main process wrote the folder
    assert model.class_names == ["apple", "leaf", "sky"]


def test_bf16_on_the_cpu(folder, tmp_path, tiny_weights):
    """``precision='bf16'``: the Trainer's autocast on the CPU; the losses are finite and the folder holds float32
    weights that load as any other."""
    from transformers import TrainerCallback

    torch.set_num_threads(1)
    seen = set()

    class WatchTheMLP(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.module.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.add((m.training, o.dtype)))

    out = tmp_path / "ft"
    result = run(folder, out, tiny_weights, epochs=1, precision="bf16", callbacks=[WatchTheMLP()])
    assert seen == {(True, torch.bfloat16), (False, torch.bfloat16)}  # training and validation under autocast
    losses = [entry["loss"] for entry in json.loads((out / "finetune.json").read_text())["losses"]]
    assert len(losses) == result.steps == 3 and all(np.isfinite(losses))
    assert json.loads((out / "finetune.json").read_text())["settings"]["precision"] == "bf16"
    model = vitlens.load_model(out)
    assert next(model.module.parameters()).dtype == torch.float32
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        run(folder, tmp_path / "other", tiny_weights, precision="fp16", device="cpu")


def test_a_hugging_face_dataset_with_its_own_splits(folder, tmp_path, tiny_weights):
    """``hf-dataset:DIR:train`` with ``val='hf-dataset:DIR:validation'``: labels and class names from the
    ``ClassLabel`` column, each split as it is (no split of ours)."""
    datasets = pytest.importorskip("datasets")
    torch.set_num_threads(1)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(COLOURS))})
    splits = {}
    for split, chosen in (("train", range(0, 6)), ("validation", range(6, 8))):
        rows = [(folder / name / f"img{i}.png", label) for label, name in enumerate(COLOURS) for i in chosen]
        splits[split] = datasets.Dataset.from_dict(
            {"image": [{"bytes": path.read_bytes(), "path": path.name} for path, _ in rows],
             "label": [label for _, label in rows]}, features=features)
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "hf")
    out = tmp_path / "ft"
    result = finetune(f"hf-dataset:{tmp_path / 'hf'}:train", TINY_SPEC, out, weights=tiny_weights,
                      val=f"hf-dataset:{tmp_path / 'hf'}:validation", epochs=1, batch_size=6, input_size=32,
                      progress=False, log=lambda line: None)
    assert (result.train_images, result.val_images, result.steps) == (18, 6, 3)
    assert vitlens.load_model(out).class_names == list(COLOURS)
    assert read_class_index(str(out / "class_index.txt")).indices == {name: i for i, name in enumerate(COLOURS)}


def test_gradient_accumulation_trains_on_the_same_batches(folder, tmp_path, tiny_weights):
    """``grad_accum=2``: each step of 6 images is two forwards of 3; the loss of every step equals the one-forward
    run's within 1e-5 (float sums in another order) and so does the validation accuracy."""
    torch.set_num_threads(1)
    runs = [run(folder, tmp_path / f"accum{n}", tiny_weights, grad_accum=n, augment=False) for n in (1, 2)]
    curves = [[e["loss"] for e in json.loads((tmp_path / f"accum{n}" / "finetune.json").read_text())["losses"]]
              for n in (1, 2)]
    assert len(curves[0]) == len(curves[1]) == 6
    assert max(abs(a - b) for a, b in zip(*curves)) <= 1e-5
    assert [e["val_accuracy"] for e in runs[0].history] == [e["val_accuracy"] for e in runs[1].history]
