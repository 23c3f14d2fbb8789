"""The ``vitlens`` command line: inputs of every kind, the manifest, targets, reports, compare, errors, demo.

Most tests run ``vitlens.cli.main([...])`` in-process on timm's ``test_vit`` (a real timm
VisionTransformer: 160 px input, 10x10 patch grid, 6 blocks, 1000 ImageNet classes, 1.5 MB) with
random weights saved as a checkpoint, loaded through the same ``timm:NAME --weights FILE`` path as a
user's fine-tuned model. Tests marked ``requires_shared`` use the real ViT-Tiny checkpoints and images
in ``../shared/data``. A real subprocess is used where the process boundary matters (``python -m
vitlens.cli``, the console script, ``HF_HOME`` read at import time).

Methods are always named explicitly (``--methods ...``) except where ``all`` is what is tested, so
that these tests check the CLI, not every method.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from vitlens import cli
from vitlens.methods import DEFAULT_METHODS, REGISTRY, parse_methods
from vitlens.outputs import OVERLAY_MAX_SIDE, overlay_size

from .conftest import (SHARED_DATA, TINY_SPEC, VIT_TINY_SPEC, VIT_TINY_WEIGHTS, requires_shared, tiny_hf_vit,
                       tiny_timm_vit)

FAST = "rollout,chefer"  # one class-agnostic and one gradient method: the two code paths
TINYIMAGENET = SHARED_DATA / "tinyimagenet_val"
TIN_FT = SHARED_DATA / "vit_tiny_tinyimagenet_ft"
TIN_WEIGHTS = TIN_FT / "vit_tiny_patch16_224_tinyimagenet200.pth"
IMAGENET_VAL = SHARED_DATA / "imagenet_val_1300"
CATDOG = SHARED_DATA / "demo_images" / "chefer_catdog.png"


# --------------------------------------------------------------------------- helpers


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_process(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m vitlens.cli ARGS`` in a fresh interpreter."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vitlens.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def assert_one_line_error(err: str, *fragments: str) -> str:
    """stderr is exactly one non-empty line, no traceback, containing every fragment (case-insensitive)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def noise_image(size=(48, 36), seed=0) -> Image.Image:
    """A reproducible RGB image with some structure (a gradient plus a noisy square)."""
    width, height = size
    rng = np.random.default_rng(seed)
    array = np.zeros((height, width, 3), np.uint8)
    array[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    array[..., 1] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    array[..., 2] = rng.integers(0, 256)
    h0, w0 = height // 4, width // 4
    array[h0:h0 + max(height // 2, 1), w0:w0 + max(width // 2, 1)] = rng.integers(
        0, 256, (max(height // 2, 1), max(width // 2, 1), 3), dtype=np.uint8)
    return Image.fromarray(array)


def write_image(path: Path, size=(48, 36), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg", ".jfif") else None
    noise_image(size, seed).save(path, format=fmt)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    write_image(path, size=(64, 48), seed=99)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def images_by_key(manifest: dict) -> dict:
    return {image["key"]: image for image in manifest["images"]}


def assert_explained(out: Path, image: dict, methods, original_size=None, targets_per_method: int = 1,
                     overlay_max_side=OVERLAY_MAX_SIDE) -> None:
    """An ok image has, per method and target, an overlay at the original resolution (at most 1024 px, the
    default --overlay-max-side) and a raw map."""
    assert image["status"] == "ok" and image["error"] is None
    assert (out / image["original"]).is_file()
    assert (out / "records" / f"{image['key']}.json").is_file()
    outputs = image["outputs"]
    assert sorted(o["method"] for o in outputs) == sorted(m for m in methods for _ in range(targets_per_method))
    assert len(image["targets"]) == targets_per_method
    for o in outputs:
        assert o["target"] in [t["index"] for t in image["targets"]]
        overlay, raw = out / o["overlay"], out / o["map"]
        with Image.open(overlay) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == overlay_size(image["size"], overlay_max_side)
            if original_size is not None:
                assert im.size == overlay_size(original_size, overlay_max_side)
        array = np.load(raw)
        assert array.dtype == np.float32 and array.ndim == 2 and np.isfinite(array).all()


REAL = ["--model", VIT_TINY_SPEC, "--weights", str(VIT_TINY_WEIGHTS)]


# --------------------------------------------------------------------------- explain: inputs of every kind


def test_explain_single_files(tmp_path, capsys, tiny):
    a = write_image(tmp_path / "in" / "a.png", size=(50, 30), seed=1)
    b = write_image(tmp_path / "in" / "photo.jpg", size=(31, 47), seed=2)
    odd = tmp_path / "in" / "c.data"  # an explicitly named file is taken whatever its extension
    noise_image((40, 40), 3).save(odd, format="PNG")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "explain", a, b, odd, *tiny, "--methods", FAST, "--out", out, "--quiet")
    assert code == 0, err
    assert "explained 3 image(s), 0 already done, 0 failed" in stdout
    manifest = manifest_of(out)
    assert [im["key"] for im in manifest["images"]] == ["a", "photo", "c"]
    assert [im["path"] for im in manifest["images"]] == [str(a), str(b), str(odd)]
    for image, size in zip(manifest["images"], [(50, 30), (31, 47), (40, 40)]):
        assert_explained(out, image, ["rollout", "chefer"], original_size=size)
        # test_vit: 160 px input, 16 px patches -> a 10x10 raw map
        assert all(np.load(out / o["map"]).shape == (10, 10) for o in image["outputs"])
    assert manifest["summary"] == {"images": 3, "ok": 3, "failed": 0}
    assert not (out / "report.html").exists()  # --format files is the default


def test_explain_folder_with_corrupt_images(tmp_path, capsys, tiny):
    root = tmp_path / "photos"
    write_image(root / "img1.png", seed=1)
    write_image(root / "img2.jpg", seed=2)
    write_truncated_jpeg(root / "img3.jpg")  # in the middle of the natural order
    write_image(root / "img10.png", seed=4)
    write_image(root / "sub" / "deeper" / "img5.png", size=(20, 70), seed=5)
    (root / "sub" / "notes.jpg").write_text("this is not a JPEG\n")
    (root / "readme.txt").write_text("not an image extension: not listed\n")
    write_image(root / ".hidden.png", seed=6)  # hidden files are skipped
    out = tmp_path / "out"

    code, stdout, err = run_cli(capsys, "explain", root, *tiny, "--methods", FAST, "--out", out,
                                "--batch-size", "2", "--quiet")
    assert code == 1, err
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("explained 4 image(s), 0 already done, 2 failed")
    failed_lines = [line for line in lines if line.strip().startswith("failed:")]
    assert len(failed_lines) == 2
    assert "img3.jpg" in failed_lines[0] and "truncated or corrupt" in failed_lines[0]
    assert "notes.jpg" in failed_lines[1] and "not an image file" in failed_lines[1]
    assert lines[-1].startswith("outputs:")  # failures listed at the end of the summary, before the paths

    manifest = manifest_of(out)
    keys = [im["key"] for im in manifest["images"]]
    assert keys == ["img1", "img2", "img3", "img10", "sub__deeper__img5", "sub__notes"]
    images = images_by_key(manifest)
    for key in ("img3", "sub__notes"):
        assert images[key]["status"] == "failed"
        assert images[key]["outputs"] == [] and images[key]["prediction"] is None
        assert Path(images[key]["path"]).name in images[key]["error"]
        assert not list(out.glob(f"overlays/*/{key}__*"))
    for key, size in (("img1", (48, 36)), ("img2", (48, 36)), ("img10", (48, 36)), ("sub__deeper__img5", (20, 70))):
        assert_explained(out, images[key], ["rollout", "chefer"], original_size=size)
    assert manifest["summary"] == {"images": 6, "ok": 4, "failed": 2}


def test_explain_glob_patterns(tmp_path, capsys, tiny):
    root = tmp_path / "g"
    write_image(root / "x1.png", seed=1)
    write_image(root / "x2.jpg", seed=2)
    write_image(root / "nested" / "x3.png", seed=3)
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    code, _, err = run_cli(capsys, "explain", str(root / "*.png"), *tiny, "--methods", "rollout", "--out", out1,
                           "--quiet")
    assert code == 0, err
    assert [im["key"] for im in manifest_of(out1)["images"]] == ["x1"]
    code, _, err = run_cli(capsys, "explain", str(root / "**" / "*.png"), *tiny, "--methods", "rollout",
                           "--out", out2, "--quiet")
    assert code == 0, err
    assert [im["key"] for im in manifest_of(out2)["images"]] == ["nested__x3", "x1"]  # natural path order


def test_explain_imagefolder_dataset(tmp_path, capsys, tiny):
    root = tmp_path / "ds"
    write_image(root / "cat" / "c1.png", seed=1)
    write_image(root / "dog" / "d1.png", seed=2)
    write_image(root / "dog" / "d2.jpg", seed=3)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "explain", f"imagefolder:{root}", *tiny, "--methods", FAST, "--out", out,
                           "--target", "label", "--quiet")
    assert code == 0, err
    images = images_by_key(manifest_of(out))
    assert {k: (v["label"], v["label_name"]) for k, v in images.items()} == {
        "cat__c1": (0, "cat"), "dog__d1": (1, "dog"), "dog__d2": (1, "dog")}
    for image in images.values():
        assert_explained(out, image, ["rollout", "chefer"])
        assert [t["index"] for t in image["targets"]] == [image["label"]]  # --target label
        assert {o["target"] for o in image["outputs"]} == {image["label"]}


def _tinyimagenet_tree(root: Path) -> Path:
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("n0002\nn0001\n")  # unsorted, as in the real file
    (root / "words.txt").write_text("n0001\tgoldfish, Carassius auratus\nn0002\tEuropean fire salamander\n"
                                    "n9999\tnot in this dataset\n")
    rows = [("val_0.JPEG", "n0002", 1, 2, 10, 12), ("val_1.JPEG", "n0001", 0, 0, 63, 63),
            ("val_2.JPEG", "n0001", 5, 6, 5, 6)]
    (root / "val" / "val_annotations.txt").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    for i, row in enumerate(rows):
        write_image(root / "val" / "images" / row[0], size=(64, 64), seed=i)
    return root


def test_explain_tinyimagenet_synthetic(tmp_path, capsys, tiny):
    root = _tinyimagenet_tree(tmp_path / "tiny-imagenet-200")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "explain", f"tinyimagenet:{root}", *tiny, "--methods", "rollout", "--out", out,
                           "--quiet")
    assert code == 0, err
    images = manifest_of(out)["images"]
    assert [im["key"] for im in images] == ["val_0", "val_1", "val_2"]
    # labels: positions in the sorted wnids; names: words.txt; boxes: inclusive corners -> edges
    assert [im["label"] for im in images] == [1, 0, 0]
    assert [im["label_name"] for im in images] == ["European fire salamander", "goldfish, Carassius auratus",
                                                   "goldfish, Carassius auratus"]
    assert [im["boxes"] for im in images] == [[[1.0, 2.0, 11.0, 13.0]], [[0.0, 0.0, 64.0, 64.0]],
                                              [[5.0, 6.0, 6.0, 7.0]]]
    for image in images:
        assert_explained(out, image, ["rollout"], original_size=(64, 64))


@requires_shared
def test_explain_real_tinyimagenet_with_class_index(tmp_path, capsys):
    class_index = TIN_FT / "class_index.txt"
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "explain", f"tinyimagenet:{TINYIMAGENET}", "--limit", "3", "--class-index",
                           class_index, "--model", "timm:vit_tiny_patch16_224", "--weights", TIN_WEIGHTS,
                           "--methods", FAST, "--target", "label", "--out", out, "--quiet")
    assert code == 0, err
    manifest = manifest_of(out)
    assert manifest["model"]["num_classes"] == 200  # inferred from the checkpoint's head
    assert manifest["model"]["weights_sha256"] == hashlib.sha256(TIN_WEIGHTS.read_bytes()).hexdigest()
    index = {}
    for line in class_index.read_text().splitlines():
        i, wnid, words = line.split("\t")
        index[wnid] = (int(i), words)
    annotations = {}
    for line in (TINYIMAGENET / "val_annotations.txt").read_text().splitlines():
        name, wnid, *corners = line.split("\t")
        annotations[name] = (wnid, [float(c) for c in corners])
    images = manifest["images"]
    assert [im["key"] for im in images] == ["val_0", "val_1", "val_2"]
    for image in images:
        wnid, (x0, y0, x1, y1) = annotations[Path(image["path"]).name]
        assert (image["label"], image["label_name"]) == index[wnid]
        assert image["boxes"] == [[x0, y0, x1 + 1, y1 + 1]]
        assert [t["index"] for t in image["targets"]] == [image["label"]]
        assert_explained(out, image, ["rollout", "chefer"], original_size=(64, 64))
    # val_0 is a go-kart the fine-tuned model recognises with high confidence
    assert images[0]["prediction"]["index"] == images[0]["label"] and images[0]["prediction"]["prob"] > 0.5


@requires_shared
def test_class_index_names_the_predictions(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "explain", f"tinyimagenet:{TINYIMAGENET}", "--limit", "1", "--class-index",
                           TIN_FT / "class_index.txt", "--model", "timm:vit_tiny_patch16_224", "--weights",
                           TIN_WEIGHTS, "--methods", "rollout", "--out", out, "--quiet")
    assert code == 0, err
    image = manifest_of(out)["images"][0]
    assert image["prediction"]["index"] == image["label"]
    assert image["prediction"]["name"] == image["label_name"] == "go-kart"


def test_explain_cub200_synthetic(tmp_path, capsys, tiny):
    root = tmp_path / "CUB_200_2011"
    (root / "images.txt").parent.mkdir(parents=True)
    (root / "images.txt").write_text("1 001.Black_footed_Albatross/a_1.jpg\n2 002.Laysan_Albatross/b_2.jpg\n"
                                     "3 001.Black_footed_Albatross/a_3.jpg\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 2\n3 1\n")
    (root / "train_test_split.txt").write_text("1 0\n2 0\n3 1\n")
    (root / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    (root / "bounding_boxes.txt").write_text("1 2.0 3.0 10.0 20.0\n2 0 0 30 30\n3 1 1 1 1\n")
    write_image(root / "images" / "001.Black_footed_Albatross" / "a_1.jpg", size=(40, 30), seed=1)
    write_image(root / "images" / "002.Laysan_Albatross" / "b_2.jpg", size=(30, 40), seed=2)
    write_image(root / "images" / "001.Black_footed_Albatross" / "a_3.jpg", seed=3)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "explain", f"cub200:{tmp_path}", *tiny, "--methods", "rollout", "--out", out,
                           "--quiet")
    assert code == 0, err
    images = manifest_of(out)["images"]  # the test split by default: images 1 and 2
    assert [(im["key"], im["label"], im["label_name"]) for im in images] == [
        ("001.Black_footed_Albatross__a_1", 0, "Black footed Albatross"),
        ("002.Laysan_Albatross__b_2", 1, "Laysan Albatross")]
    assert [im["boxes"] for im in images] == [[[2.0, 3.0, 12.0, 23.0]], [[0.0, 0.0, 30.0, 30.0]]]
    for image, size in zip(images, [(40, 30), (30, 40)]):
        assert_explained(out, image, ["rollout"], original_size=size)
    code, _, err = run_cli(capsys, "explain", f"cub200:{tmp_path}:train", *tiny, "--methods", "rollout", "--out",
                           tmp_path / "train", "--quiet")
    assert code == 0, err
    assert [im["key"] for im in manifest_of(tmp_path / "train")["images"]] == ["001.Black_footed_Albatross__a_3"]


@requires_shared
def test_explain_real_imagenet_val_with_labels(tmp_path, capsys):
    labels = IMAGENET_VAL / "labels.csv"
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "explain", f"imagenet-val:{IMAGENET_VAL}", "--labels", labels,
                                "--limit", "2", *REAL, "--methods", FAST, "--target", "label", "--out", out,
                                "--quiet")
    assert code == 0, err
    assert "explained 2 image(s)" in stdout
    with open(labels, newline="") as fh:
        rows = list(csv.DictReader(fh))[:2]
    images = manifest_of(out)["images"]
    assert [im["key"] for im in images] == [Path(r["file"]).stem for r in rows]
    for image, row in zip(images, rows):
        assert image["path"] == str(IMAGENET_VAL / row["file"])
        assert (image["label"], image["label_name"]) == (int(row["label"]), row["class_name"])
        assert [t["index"] for t in image["targets"]] == [int(row["label"])]
        assert image["targets"][0]["name"] == row["class_name"]  # ImageNet names from the 1000-class model
        assert_explained(out, image, ["rollout", "chefer"], original_size=(227, 227))
        # the real model gets these two right
        assert image["prediction"]["index"] == image["label"]


def _odd_images(folder: Path) -> dict:
    """Images a real folder may hold; returns key -> size as a viewer shows it."""
    folder.mkdir(parents=True)
    sizes = {}
    noise_image((40, 30), 1).convert("L").save(folder / "gray.png")
    sizes["gray"] = (40, 30)
    rgba = noise_image((30, 40), 2).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((30, 40)))
    rgba.save(folder / "rgba.png")
    sizes["rgba"] = (30, 40)
    deep = (np.linspace(0, 65535, 36 * 52).reshape(36, 52)).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    with Image.open(folder / "deep16.png") as check:
        assert check.mode.startswith("I")  # really a 16-bit PNG
    sizes["deep16"] = (52, 36)
    noise_image((5, 5), 3).save(folder / "tiny5.png")
    sizes["tiny5"] = (5, 5)
    noise_image((3000, 2000), 4).save(folder / "large.jpg", quality=80)
    sizes["large"] = (3000, 2000)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    noise_image((40, 20), 5).save(folder / "rotated.jpg", exif=exif.tobytes())
    sizes["rotated"] = (20, 40)
    noise_image((33, 21), 6).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.gif")
    sizes["palette"] = (33, 21)
    noise_image((26, 26), 7).convert("CMYK").save(folder / "cmyk.jpg")
    sizes["cmyk"] = (26, 26)
    return sizes


def test_explain_odd_images_in_one_folder(tmp_path, capsys, tiny):
    sizes = _odd_images(tmp_path / "odd")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "explain", tmp_path / "odd", *tiny, "--methods", FAST, "--out", out, "--quiet",
                           "--overlay-max-side", "full")
    assert code == 0, err
    images = images_by_key(manifest_of(out))
    assert set(images) == set(sizes)
    for key, size in sizes.items():
        assert images[key]["size"] == list(size)
        assert_explained(out, images[key], ["rollout", "chefer"], original_size=size, overlay_max_side=None)
    # the report copy of a large image is small; the overlay keeps the full resolution on request
    with Image.open(out / images["large"]["original"]) as thumb:
        assert max(thumb.size) <= 512
    # the centre crop of the 3000x2000 image: the model saw the middle, the margins stay original pixels
    x0, y0, x1, y1 = images["large"]["crop_box"]
    assert 0 < x0 < x1 < 3000 and y0 >= 0 and y1 <= 2000
    with Image.open(out / images["large"]["outputs"][0]["overlay"]) as overlay:
        original = np.asarray(noise_image((3000, 2000), 4).convert("RGB"), dtype=np.int16)
        drawn = np.asarray(overlay, dtype=np.int16)
        left = slice(0, int(x0) - 2)
        assert np.abs(drawn[:, left] - original[:, left]).mean() < 8  # JPEG noise only
        assert np.abs(drawn[:, int(x0) + 2:int(x1) - 2] - original[:, int(x0) + 2:int(x1) - 2]).mean() > 20


# --------------------------------------------------------------------------- manifest and targets


def test_manifest_contents(tmp_path, capsys, tiny, tiny_weights, tiny_model):
    folder = tmp_path / "in"
    write_image(folder / "one.png", size=(60, 40), seed=1)
    write_image(folder / "two.png", size=(40, 60), seed=2)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label,class_name\none.png,281,tabby cat\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "explain", folder, *tiny, "--methods", "rollout,legrad,chefer",
                           "--param", "rollout.discard_ratio=0.5", "--param", "legrad.layers=last2",
                           "--labels", labels, "--cmap", "viridis", "--alpha", "0.4", "--out", out, "--quiet")
    assert code == 0, err
    manifest = manifest_of(out)
    model = manifest["model"]
    assert model["spec"] == TINY_SPEC and model["family"] == "timm" and model["num_classes"] == 1000
    assert model["weights"] == str(tiny_weights.resolve())
    assert model["weights_sha256"] == hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    assert model["preprocess"] == {"input_size": [160, 160], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                   "interpolation": "bicubic", "crop_pct": 0.95, "resize_mode": "shorter"}
    assert list(manifest["methods"]) == ["rollout", "legrad", "chefer"]
    assert manifest["methods"]["rollout"] == {"head_fusion": "mean", "discard_ratio": 0.5, "start_layer": 0,
                                              "residual": 1.0}
    assert manifest["methods"]["legrad"] == {"layers": "last2", "pool": "model"}
    assert manifest["methods"]["chefer"] == REGISTRY["chefer"].defaults
    assert manifest["overlay"] == {"cmap": "viridis", "alpha": 0.4, "max_side": 1024, "signed": "signed"}
    assert manifest["save"] == ["overlays", "maps", "originals"]
    assert manifest["target"] == "pred" and manifest["vitlens_version"] == vitlens.__version__
    run_json = json.loads((out / "run.json").read_text())
    assert {k: v for k, v in manifest.items() if k not in ("images", "summary", "warnings")} == run_json

    expected = vitlens.explain(tiny_model, [folder / "one.png", folder / "two.png"], methods="rollout")
    images = manifest["images"]
    assert [im["path"] for im in images] == [str(folder / "one.png"), str(folder / "two.png")]
    assert (images[0]["label"], images[0]["label_name"]) == (281, "tabby cat")
    assert (images[1]["label"], images[1]["label_name"]) == (None, None)
    for image, prediction, size in zip(images, expected.predictions, [(60, 40), (40, 60)]):
        assert image["prediction"] == {"index": prediction.index, "name": prediction.name,
                                       "prob": round(prediction.prob, 6)}
        assert image["prediction"]["name"] == tiny_model.class_name(prediction.index)  # an ImageNet class
        assert image["targets"] == [image["prediction"]]
        assert_explained(out, image, ["rollout", "legrad", "chefer"], original_size=size)
        for o in image["outputs"]:
            assert o["overlay"] == f"overlays/{o['method']}/{image['key']}__{o['target']}.png"
            assert o["map"] == f"maps/{o['method']}/{image['key']}__{o['target']}.npy"
        record = json.loads((out / "records" / f"{image['key']}.json").read_text())
        assert record == image
    # the raw map of rollout is the API's patch map, unnormalised
    raw = np.load(out / images[0]["outputs"][0]["map"])
    api = vitlens.explain(tiny_model, folder / "one.png", methods="rollout", params={"rollout": {"discard_ratio": 0.5}})
    np.testing.assert_allclose(raw, api.patch_maps["rollout"][0, 0].numpy(), rtol=1e-5, atol=1e-7)
    # every file in the run directory is accounted for by the manifest
    listed = {"manifest.json", "run.json"} | {f"records/{im['key']}.json" for im in images}
    listed |= {im["original"] for im in images} | {p for im in images for o in im["outputs"]
                                                   for p in (o["overlay"], o["map"])}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == listed


@pytest.mark.parametrize("target", ["pred", "7", "tiger cat", "top2", "label"])
def test_target_variants(tmp_path, capsys, tiny, tiny_model, target):
    folder = tmp_path / "in"
    write_image(folder / "p.png", seed=1)
    write_image(folder / "q.png", seed=2)
    labels = tmp_path / "labels.txt"
    labels.write_text("p.png 5\nq.png 999\n")  # 'file index' lines
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "explain", folder, *tiny, "--methods", FAST, "--labels", labels, "--target",
                           target, "--out", out, "--quiet")
    assert code == 0, err
    manifest = manifest_of(out)
    assert manifest["target"] == target
    expected = vitlens.explain(tiny_model, [folder / "p.png", folder / "q.png"], methods="rollout", target="top2")
    per_method = 2 if target == "top2" else 1
    for i, image in enumerate(manifest["images"]):
        assert_explained(out, image, ["rollout", "chefer"], targets_per_method=per_method)
        wanted = {"pred": [expected.predictions[i].index], "7": [7], "tiger cat": [282],
                  "top2": expected.targets[i].tolist(), "label": [image["label"]]}[target]
        assert [t["index"] for t in image["targets"]] == wanted
        assert sorted(o["target"] for o in image["outputs"]) == sorted(wanted * 2)
        probs = expected.probabilities[i]
        for t in image["targets"]:
            assert t["name"] == tiny_model.class_name(t["index"])
            assert t["prob"] == pytest.approx(float(probs[t["index"]]), abs=1e-6)
    if target == "top2":
        first = manifest["images"][0]
        assert first["targets"][0] == first["prediction"]
        assert first["targets"][0]["prob"] >= first["targets"][1]["prob"]
        # two overlays and two maps per method, named by class
        assert len(list((out / "overlays" / "chefer").glob("p__*.png"))) == 2
        assert len(list((out / "maps" / "rollout").glob("q__*.npy"))) == 2


def test_target_label_fails_images_without_a_label(tmp_path, capsys, tiny):
    folder = tmp_path / "in"
    write_image(folder / "known.png", seed=1)
    write_image(folder / "unknown.png", seed=2)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nknown.png,3\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "explain", folder, *tiny, "--methods", "rollout", "--labels", labels,
                                "--target", "label", "--out", out, "--quiet")
    assert code == 1, err
    assert "no label known" in stdout and "unknown.png" in stdout
    images = images_by_key(manifest_of(out))
    assert images["known"]["status"] == "ok" and images["known"]["targets"][0]["index"] == 3
    assert images["unknown"]["status"] == "failed" and "--target label" in images["unknown"]["error"]


def test_explain_comma_separated_targets_explain_each_class_of_each_image(tmp_path, capsys, tiny):
    a = write_image(tmp_path / "a.png", seed=1)
    b = write_image(tmp_path / "b.png", seed=2)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "explain", a, b, *tiny, "--methods", "rollout", "--target", "243,282",
                           "--out", out, "--quiet")
    assert code == 0, err
    for image in manifest_of(out)["images"]:
        assert [t["index"] for t in image["targets"]] == [243, 282]
        assert sorted(o["target"] for o in image["outputs"]) == [243, 282]


# --------------------------------------------------------------------------- html report


def test_format_html_and_report_command(tmp_path, capsys, tiny):
    folder = tmp_path / "in"
    write_image(folder / "r1.png", seed=1)
    write_image(folder / "r2.png", seed=2)
    write_truncated_jpeg(folder / "r3.jpg")
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "explain", folder, *tiny, "--methods", FAST, "--format", "html", "--out",
                              out, "--quiet")
    assert code == 1  # r3 is corrupt
    report = out / "report.html"
    assert f"report: {report}" in stdout
    page = report.read_text()
    assert page.lstrip().lower().startswith("<!doctype html")
    for name in ("r1.png", "r2.png", "r3.jpg", TINY_SPEC, "overlays/rollout/r1__", "overlays/chefer/r2__"):
        assert name in page
    assert "truncated or corrupt" in page  # the failed input and its error are listed
    assert page.count('class="cell"') == 2 * 3  # 2 ok images x (original + 2 methods)

    report.unlink()
    code, stdout, err = run_cli(capsys, "report", out)
    assert code == 0, err
    assert stdout.strip() == f"wrote {report}"
    assert report.read_text() == page  # regenerated identically from the manifest

    code, _, err = run_cli(capsys, "report", out, "--title", "My <run>")
    assert code == 0, err
    assert "My &lt;run&gt;" in report.read_text()

    code, _, err = run_cli(capsys, "report", tmp_path / "in")  # no manifest there
    assert code == 2
    assert_one_line_error(err, "manifest")


# --------------------------------------------------------------------------- compare


def test_compare_grid_grows_with_rows(tmp_path, capsys, tiny):
    a = write_image(tmp_path / "a.png", size=(60, 40), seed=1)
    b = write_image(tmp_path / "b.jpg", size=(40, 60), seed=2)
    one, two, wide = tmp_path / "one.png", tmp_path / "two.png", tmp_path / "wide.png"
    code, stdout, err = run_cli(capsys, "compare", a, *tiny, "--methods", FAST, "--out", one)
    assert code == 0, err
    assert stdout.strip() == f"wrote {one} (1 row(s) x 3 columns)"
    code, stdout, err = run_cli(capsys, "compare", a, b, *tiny, "--methods", FAST, "--out", two)
    assert code == 0, err
    assert "(2 row(s) x 3 columns)" in stdout
    code, stdout, err = run_cli(capsys, "compare", a, *tiny, "--methods", "attention,rollout,chefer", "--out", wide)
    assert code == 0, err
    with Image.open(one) as i1, Image.open(two) as i2, Image.open(wide) as i3:
        assert i1.format == i2.format == "PNG"
        assert i2.height > i1.height * 1.5 and i2.width == i1.width  # one more row, same columns
        assert i3.width > i1.width and i3.height == i1.height  # one more column
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == ["a.png", "one.png", "two.png",
                                                                                  "wide.png"]


@requires_shared
def test_compare_two_targets_on_the_real_catdog(tmp_path, capsys, real_vit):
    single, double = tmp_path / "single.png", tmp_path / "double.png"
    code, stdout, err = run_cli(capsys, "compare", CATDOG, *REAL, "--methods", FAST, "--target", "243",
                                "--out", single)
    assert code == 0, err
    assert "(1 row(s) x 3 columns)" in stdout
    code, stdout, err = run_cli(capsys, "compare", CATDOG, *REAL, "--methods", FAST, "--target", "243,282",
                                "--out", double)
    assert code == 0, err
    assert "(2 row(s) x 3 columns)" in stdout
    with Image.open(single) as s, Image.open(double) as d:
        assert d.height > s.height * 1.5 and d.width == s.width
    # the two rows really explain different classes: the class-specific maps differ
    result = vitlens.explain(real_vit, CATDOG, methods="chefer", target=torch.tensor([[243, 282]]))
    maps = result.maps["chefer"][0]
    assert [p.name for p in result.target_predictions(0)] == ["bull mastiff", "tiger cat"]
    assert not torch.allclose(maps[0], maps[1], atol=0.05)


def test_compare_corrupt_image_is_a_one_line_error(tmp_path, capsys, tiny):
    bad = write_truncated_jpeg(tmp_path / "bad.jpg")
    code, _, err = run_cli(capsys, "compare", bad, *tiny, "--methods", "rollout", "--out", tmp_path / "c.png")
    assert code == 2
    assert_one_line_error(err, "bad.jpg")
    assert not (tmp_path / "c.png").exists()


# --------------------------------------------------------------------------- usage errors: one line, exit 2


def _weights_that_do_not_fit(tmp_path: Path) -> Path:
    state = tiny_timm_vit().state_dict()  # 48-dim, 3 blocks, 10 classes: not test_vit's 64-dim, 6 blocks
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    return path


ERROR_CASES = {
    # name: (args after 'explain' with {img}, {tmp}, {tiny} placeholders, fragments expected in the message)
    "empty folder": (["{tmp}/empty"], ["no images found", "empty"]),
    "missing file": (["{tmp}/nope.jpg"], ["nope.jpg", "does not exist"]),
    "unknown method": (["{img}", "--methods", "rollout,nosuch"], ["unknown method 'nosuch'"]),
    "unknown dataset kind": (["foo:{tmp}/empty"], ["'foo' is not a dataset kind"]),
    "dataset without layout": (["tinyimagenet:{tmp}/empty"], ["not a TinyImageNet-200 folder", "wnids.txt"]),
    "imagenet-val without labels": (["imagenet-val:{tmp}"], ["needs a labels file"]),
    "unwritable out": (["{img}", "--out", "{tmp}/afile/run"], ["cannot create output directory", "afile"]),
    "unknown timm model": (["{img}", "--model", "timm:no_such_model_xyz"], ["unknown timm model"]),
    "unknown model spec": (["{img}", "--model", "banana"], ["unknown model spec 'banana'"]),
    "missing weights": (["{img}", "--model", TINY_SPEC, "--weights", "{tmp}/missing.pth"],
                        ["missing.pth", "does not exist"]),
    "weights not a checkpoint": (["{img}", "--model", TINY_SPEC, "--weights", "{tmp}/afile"],
                                 ["cannot read weights"]),
    "weights that do not fit": (["{img}", "--model", TINY_SPEC, "--weights", "{tmp}/other.pth"],
                                ["do not fit", "missing (blocks.3.", "unexpected (extra.weight)", "wrong-shape"]),
    "target out of range": (["{img}", "{tiny}", "--target", "5000"],
                            ["target class 5000 is out of range", "1000 classes"]),
    "unknown target name": (["{img}", "{tiny}", "--target", "no such animal"], ["unknown target class name"]),
    "topk too large": (["{img}", "{tiny}", "--target", "top1001"], ["between 1 and 1000"]),
    "unknown parameter": (["{img}", "{tiny}", "--param", "rollout.nope=1"], ["has no parameter 'nope'"]),
    "param for another method": (["{img}", "{tiny}", "--param", "legrad.layers=all"], ["not among --methods"]),
    "malformed param": (["{img}", "{tiny}", "--param", "discard_ratio"], ["METHOD.NAME=VALUE"]),
    "bad alpha": (["{img}", "{tiny}", "--alpha", "7"], ["alpha"]),
    "bad colormap": (["{img}", "{tiny}", "--cmap", "nosuchmap"], ["colormap 'nosuchmap'"]),
    "bad limit": (["{img}", "{tiny}", "--limit", "0"], ["limit"]),
    "not a number": (["{img}", "{tiny}", "--batch-size", "many"], ["--batch-size", "invalid int"]),
    "unknown option": (["{img}", "--frobnicate"], ["unrecognized arguments"]),
    "cuda on a cpu machine": (["{img}", "{tiny}", "--device", "cuda"], ["--device cuda", "not available"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_usage_errors_are_one_line_with_exit_code_2(tmp_path, capsys, tiny, case):
    args, fragments = ERROR_CASES[case]
    if case == "cuda on a cpu machine" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("a regular file, not a folder (and not a checkpoint)")
    _weights_that_do_not_fit(tmp_path)
    image = write_image(tmp_path / "img.png")
    expanded = []
    for arg in args:
        if arg == "{tiny}":
            expanded += tiny
        else:
            expanded.append(arg.format(img=image, tmp=tmp_path))
    if "--methods" not in expanded:
        expanded += ["--methods", "rollout"]
    out_given = "--out" in expanded
    if not out_given:
        expanded += ["--out", str(tmp_path / "out")]
    code, stdout, err = run_cli(capsys, "explain", *expanded, "--quiet")
    assert code == 2, (stdout, err)
    assert_one_line_error(err, *fragments)
    assert "explained" not in stdout


@pytest.mark.parametrize("size", ["0", "-2"])
def test_non_positive_batch_size_is_a_usage_error(tmp_path, capsys, tiny, size):
    image = write_image(tmp_path / "img.png")
    code, _, err = run_cli(capsys, "explain", image, *tiny, "--methods", "rollout", "--batch-size", size,
                           "--out", tmp_path / "out", "--quiet")
    assert code == 2
    assert_one_line_error(err, "batch")


def test_weights_error_lists_the_keys(tmp_path, capsys):
    """The 'do not fit' message names how many keys are missing/unexpected and shows some of them."""
    weights = _weights_that_do_not_fit(tmp_path)
    image = write_image(tmp_path / "img.png")
    code, _, err = run_cli(capsys, "explain", image, "--model", TINY_SPEC, "--weights", weights, "--methods",
                           "rollout", "--out", tmp_path / "out", "--quiet")
    assert code == 2
    line = assert_one_line_error(err, str(weights))
    assert "1 unexpected (extra.weight)" in line
    missing = [k for k in __import__("timm").create_model("test_vit", num_classes=10).state_dict()
               if not k.startswith(("blocks.0.", "blocks.1.", "blocks.2.")) and k.startswith("blocks.")]
    assert f"{len(missing)} missing (" in line


def test_hf_directory_of_a_text_model_is_a_one_line_error(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               vocab_size=100).save_pretrained(tmp_path / "bert")
    image = write_image(tmp_path / "img.png")
    code, _, err = run_cli(capsys, "explain", image, "--model", tmp_path / "bert", "--methods", "rollout",
                           "--out", tmp_path / "out", "--quiet")
    assert code == 2
    assert_one_line_error(err, "not an image classification model")


def test_model_without_attention_with_attention_methods(tmp_path, capsys):
    """A convolutional network cannot give attention maps: a one-line error, exit 2, never a traceback."""
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), weights)
    image = write_image(tmp_path / "img.png")
    code, _, err = run_cli(capsys, "explain", image, "--model", "torchvision:squeezenet1_1", "--weights", weights,
                           "--methods", "rollout", "--out", tmp_path / "out", "--quiet")
    assert code == 2
    line = assert_one_line_error(err)
    assert "rollout" in line or "transformer" in line or "attention" in line


def test_hf_model_accepts_its_own_saved_checkpoint(tmp_path, capsys):
    module = tiny_hf_vit()
    module.save_pretrained(tmp_path / "hf")
    image = write_image(tmp_path / "img.png")
    code, _, err = run_cli(capsys, "explain", image, "--model", tmp_path / "hf", "--weights",
                           tmp_path / "hf" / "model.safetensors", "--methods", "rollout", "--out", tmp_path / "out",
                           "--quiet")
    assert code == 0, err


def test_hf_directory_with_in_memory_state_dict(tmp_path, capsys):
    """A local HF directory loads, and so does --weights with the module's own state_dict()."""
    module = tiny_hf_vit()
    module.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf_state.pth"
    torch.save(module.state_dict(), weights)
    image = write_image(tmp_path / "img.png", size=(50, 30))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "explain", image, "--model", tmp_path / "hf", "--weights", weights, "--methods",
                           FAST, "--out", out, "--quiet")
    assert code == 0, err
    manifest = manifest_of(out)
    assert manifest["model"]["family"] == "hf" and manifest["model"]["num_classes"] == 10
    assert manifest["model"]["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert_explained(out, manifest["images"][0], ["rollout", "chefer"], original_size=(50, 30))
    assert np.load(out / manifest["images"][0]["outputs"][0]["map"]).shape == (4, 4)  # 32 px / 8 px patches


def test_errors_in_a_real_process(tmp_path):
    """Across the process boundary: exit status 2 and one stderr line, for a usage and an input error."""
    missing = run_process("explain", tmp_path / "missing.png", "--out", tmp_path / "o")
    assert missing.returncode == 2
    assert_one_line_error(missing.stderr, "missing.png", "does not exist")
    assert missing.stdout == ""
    usage = run_process("explain")
    assert usage.returncode == 2
    assert_one_line_error(usage.stderr, "the following arguments are required: inputs")


# --------------------------------------------------------------------------- demo and cache-weights


def _clean_env(extra: dict) -> dict:
    """The current environment without any HF cache location of the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
                                                             "TRANSFORMERS_CACHE")}
    env.update(extra)
    return env


def test_demo_without_hub_or_cache_says_how_to_continue_offline(tmp_path):
    """Offline and nothing cached: a short note (no traceback) naming the unreachable hub and the two ways to
    get the ViT offline; the demo then goes on with the packaged CNN instead of failing."""
    from vitlens.models import hub

    if hub.reachable(hub.HF_HOST):
        pytest.skip("the model hub is reachable from here: this test needs an offline machine")
    home = tmp_path / "hf-home"
    home.mkdir()
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "vitlens.cli", "demo", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300,
                          env=_clean_env({"HF_HOME": str(home), "TORCH_HOME": str(home / "torch")}))
    err = proc.stderr
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, err
    assert "unreachable" in err and cli.DEFAULT_MODEL in err
    assert "--weights FILE" in err and f"cache-weights {cli.DEFAULT_MODEL}" in err
    assert not list(home.rglob("*.safetensors"))  # nothing was (half-)downloaded
    assert proc.returncode == 0, err
    manifest = _check_demo_dir(out, methods=None)
    assert manifest["model"]["spec"] == cli.FALLBACK_MODEL
    assert f"model: {cli.FALLBACK_MODEL}" in proc.stdout


def _check_demo_dir(out: Path, methods=None) -> dict:
    """compare.png (4 rows), run/report.html, and every method's overlay of the 4 photos at full size."""
    assert (out / "run" / "report.html").is_file()
    manifest = manifest_of(out / "run")
    methods = list(manifest["methods"]) if methods is None else methods
    assert list(manifest["methods"]) == list(methods)
    with Image.open(out / "compare.png") as grid:
        assert grid.format == "PNG"
        rows, columns = 4, 1 + len(methods)
        assert 0.6 < (grid.height / rows) / (grid.width / columns) < 1.6  # square-ish cells: 4 rows
    images = images_by_key(manifest)
    assert sorted(images) == sorted(cli.DEMO_PHOTOS)
    for key, image in images.items():
        with Image.open(out / "inputs" / f"{key}.png") as photo:
            size = photo.size
        assert_explained(out / "run", image, list(methods), original_size=size)
    return manifest


@requires_shared
def test_demo_with_local_weights_works_offline(tmp_path, capsys, real_vit):
    out = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "demo", "--weights", VIT_TINY_WEIGHTS, "--out", out, "--quiet")
    assert code == 0, err
    assert "explained 4 image(s)" in stdout and "comparison grid:" in stdout and "report.html" in stdout
    manifest = _check_demo_dir(out, methods=parse_methods("all", real_vit))
    assert manifest["model"]["spec"] == cli.DEFAULT_MODEL
    assert manifest["model"]["weights_sha256"] == hashlib.sha256(VIT_TINY_WEIGHTS.read_bytes()).hexdigest()
    # the real model recognises the cat photo as some cat
    chelsea = images_by_key(manifest)["chelsea"]
    assert "cat" in chelsea["prediction"]["name"]


@requires_shared
def test_cache_weights_then_demo_offline_in_a_fresh_process(tmp_path, real_vit):
    home = tmp_path / "hf-home"
    env = _clean_env({"HF_HOME": str(home), "TORCH_HOME": str(home / "torch")})
    cached = subprocess.run([sys.executable, "-m", "vitlens.cli", "cache-weights", cli.DEFAULT_MODEL,
                             str(VIT_TINY_WEIGHTS)], capture_output=True, text=True, timeout=300, env=env)
    assert cached.returncode == 0, cached.stderr
    assert "cached" in cached.stdout and str(home) in cached.stdout
    assert list(home.rglob("model.safetensors"))

    out = tmp_path / "demo"
    demo = subprocess.run([sys.executable, "-m", "vitlens.cli", "demo", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"})
    assert demo.returncode == 0, demo.stderr
    assert "Traceback" not in demo.stderr
    manifest = _check_demo_dir(out, methods=parse_methods("all", real_vit))
    assert manifest["model"]["spec"] == cli.DEFAULT_MODEL and manifest["model"]["weights"] is None
    # the cached weights are the real ones: same predictions as the checkpoint loaded directly
    for key, image in images_by_key(manifest).items():
        expected = vitlens.explain(real_vit, out / "inputs" / f"{key}.png", methods="rollout").predictions[0]
        assert image["prediction"]["index"] == expected.index
        assert image["prediction"]["prob"] == pytest.approx(expected.prob, abs=1e-4)


def test_cache_weights_refuses_weights_that_do_not_fit(tmp_path, capsys):
    weights = _weights_that_do_not_fit(tmp_path)
    code, _, err = run_cli(capsys, "cache-weights", cli.DEFAULT_MODEL, weights)
    assert code == 2
    assert_one_line_error(err, "do not fit")
    code, _, err = run_cli(capsys, "cache-weights", "hf:google/vit-base-patch16-224", weights)
    assert code == 2
    assert_one_line_error(err, "timm:NAME.TAG")


# --------------------------------------------------------------------------- methods, version, help


def _listed_methods(capsys) -> tuple[list[str], list[str]]:
    code, stdout, _ = run_cli(capsys, "methods")
    assert code == 0
    lines = stdout.splitlines()
    return [line.split()[0] for line in lines if line and not line.startswith(" ")], lines


def test_methods_lists_the_default_methods_with_their_parameters(capsys):
    names, lines = _listed_methods(capsys)
    assert names[:len(DEFAULT_METHODS)] == list(DEFAULT_METHODS)
    assert set(names) <= set(REGISTRY)
    for name in names:
        spec = REGISTRY[name]
        line = next(i for i, text in enumerate(lines) if text.split()[:1] == [name])
        assert spec.summary in lines[line]
        assert ("class-specific" if spec.class_specific else "class-agnostic") in lines[line]
        assert lines[line + 1].split()[0] == "parameters:"
        for key, value in spec.defaults.items():
            assert f"{key}={value}" in lines[line + 1]


def test_methods_lists_every_registered_method(capsys):
    names, _ = _listed_methods(capsys)
    assert sorted(names) == sorted(REGISTRY)


def test_version_in_process_and_console_script(capsys):
    code, stdout, _ = run_cli(capsys, "--version")
    assert code == 0 and stdout.strip() == f"vitlens {vitlens.__version__}"
    script = Path(sys.executable).with_name("vitlens")
    if script.is_file():
        proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    else:  # installed without console scripts: the module entry point
        proc = run_process("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"vitlens {vitlens.__version__}"
    assert proc.stderr == ""


def test_no_command_prints_help_and_exits_2(capsys):
    code, stdout, _ = run_cli(capsys)
    assert code == 2
    for command in ("explain", "compare", "report", "demo", "methods", "cache-weights"):
        assert command in stdout


def test_a_closed_pipe_is_not_an_error():
    """`vitlens methods | head -1`: the reader goes away; no traceback, exit 0.

    The child's stdout is a pipe whose reading end is already closed, so every write fails with
    EPIPE (Python ignores SIGPIPE): the path is taken whatever the pipe buffer's size.
    """
    child = ("import os, sys\n"
             "from vitlens import cli\n"
             "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"
             "sys.exit(cli.main(['methods']))\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_a_class_name_with_commas_is_one_target(tmp_path, capsys, tiny, tiny_model):
    """ImageNet's 'hook, claw' (and a prompt with a comma) is one class when the model has that name, not two;
    a comma-separated list of names is still several classes."""
    from vitlens.cliargs import parse_target

    assert parse_target("hook, claw", tiny_model) == "hook, claw"
    assert parse_target("hook, claw") == ["hook", "claw"]  # without the model: a list, as before
    assert parse_target("tench, goldfish", tiny_model) == ["tench", "goldfish"]
    folder = tmp_path / "in"
    folder.mkdir()
    noise_image((48, 48), 3).save(folder / "a.png")
    out = tmp_path / "run"
    code = cli.main(["explain", str(folder), *tiny, "--methods", "rollout", "--target", "hook, claw", "--out", str(out),
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    image = json.loads((out / "manifest.json").read_text())["images"][0]
    assert [t["index"] for t in image["targets"]] == [600] and image["targets"][0]["name"] == "hook, claw"
