"""hf-dataset inputs: real ImageNet images stored as Hugging Face datasets (save_to_disk, parquet).

The datasets are built in tmp dirs with ``datasets`` itself from the real images of ../shared/data,
so what is read is what a user's ``save_to_disk`` / ``to_parquet`` wrote. The key check: the same
images from a dataset and from their files give the same pixels and identical maps.
"""

from __future__ import annotations

import csv
import io
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from vitlens.data import Sample, hf, load_image, load_sample, resolve_inputs
from vitlens.data.images import ORIGINAL_SIZE
from vitlens.errors import InputError

from .conftest import resolve_error as _error

datasets = pytest.importorskip("datasets", reason="pip install datasets")

# The real data shipped next to the repository (skipped when absent).
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
VAL_1300 = SHARED_DATA / "imagenet_val_1300"
FULLRES = SHARED_DATA / "imagenet_val_fullres_11"
SYNSETS = SHARED_DATA / "imagenet_meta" / "synset_words.txt"

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not (VAL_1300.is_dir() and FULLRES.is_dir() and SYNSETS.is_file()),
                       reason="../shared/data is not beside the checkout"),
]


# ------------------------------------------------------------------------------------ the datasets
def _labelled(folder: Path, count: int) -> list[tuple[Path, int, str]]:
    """The first ``count`` (file, ImageNet label, class name) of a shared folder's labels.csv."""
    with open(folder / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:count]
    return [(folder / row["file"], int(row["label"]), row["class_name"]) for row in rows]


@pytest.fixture(scope="module")
def class_names() -> list[str]:
    """The 1000 ImageNet class names in index order, as a ClassLabel holds them (unique: "crane (n03126707)")."""
    pairs = [line.split(" ", 1) for line in SYNSETS.read_text().splitlines()]
    words = [name for _, name in pairs]
    return [name if words.count(name) == 1 else f"{name} ({wnid})" for wnid, name in pairs]


@pytest.fixture(scope="module")
def images() -> dict:
    """Two real 227 px validation images for ``train``, four for ``validation`` (two full-resolution)."""
    return {"train": _labelled(VAL_1300, 2), "validation": _labelled(VAL_1300, 4)[2:] + _labelled(FULLRES, 2)}


def _features(class_names, **extra):
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names),
                              "file": datasets.Value("string"), **extra})


def _rows(files: list[tuple[Path, int, str]]) -> dict:
    """Columns as a Hub dataset stores them: the encoded file bytes (not decoded), label, file name."""
    return {"image": [{"bytes": path.read_bytes(), "path": path.name} for path, _, _ in files],
            "label": [label for _, label, _ in files], "file": [path.name for path, _, _ in files]}


@pytest.fixture(scope="module")
def stored(tmp_path_factory, images, class_names) -> dict:
    """The same images as a saved DatasetDict, a saved Dataset and a folder of parquet files."""
    root = tmp_path_factory.mktemp("hf")
    features = _features(class_names)
    splits = {name: datasets.Dataset.from_dict(_rows(files), features=features) for name, files in images.items()}
    datasets.DatasetDict(splits).save_to_disk(root / "dict")
    splits["validation"].save_to_disk(root / "single")
    for name, split in splits.items():  # the Hub's layout: data/<split>-00000-of-00001.parquet
        split.to_parquet(str(root / "parquet" / "data" / f"{name}-00000-of-00001.parquet"))
    return {"root": root, "dict": root / "dict", "single": root / "single", "parquet": root / "parquet"}


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """load_dataset("parquet") writes its arrow cache here, not into ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        yield


@pytest.fixture
def fresh(monkeypatch):
    """A process that has opened no dataset yet (as a decoding worker of another process)."""
    monkeypatch.setattr(hf, "_OPENED", {})


def _save(root: Path, name: str, columns: dict, features=None) -> Path:
    path = root / name
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(path)
    return path


# ------------------------------------------------------------------------------------ samples
def test_saved_dataset_dict_defaults_to_validation(stored, images):
    spec = f"hf-dataset:{stored['dict']}"
    samples = resolve_inputs([spec])
    assert [s.key for s in samples] == ["validation_0", "validation_1", "validation_2", "validation_3"]
    assert [s.path for s in samples] == [f"hf-dataset:{stored['dict']}:validation#{i}" for i in range(4)]
    assert [(s.label, s.label_name) for s in samples] == [(label, name) for _, label, name in images["validation"]]
    assert all(s.boxes == () and s.source == spec for s in samples)

    train = resolve_inputs([f"{spec}:train"])
    assert [s.key for s in train] == ["train_0", "train_1"]
    assert [s.path for s in train] == [f"hf-dataset:{stored['dict']}:train#{i}" for i in range(2)]
    assert [s.label for s in train] == [label for _, label, _ in images["train"]]


def test_saved_dataset_parquet_folder_and_file_give_the_same_samples(stored):
    single = resolve_inputs([f"hf-dataset:{stored['single']}"])
    assert [s.key for s in single] == ["train_0", "train_1", "train_2", "train_3"]  # a lone Dataset: datasets' "train"
    assert single[0].path == f"hf-dataset:{stored['single']}:train#0"

    default = resolve_inputs([f"hf-dataset:{stored['parquet']}"])
    assert [s.key for s in default] == [f"validation_{i}" for i in range(4)]
    assert default[3].path == f"hf-dataset:{stored['parquet']}:validation#3"
    train = resolve_inputs([f"hf-dataset:{stored['parquet']}:train"])
    one_file = stored["parquet"] / "data" / "train-00000-of-00001.parquet"
    alone = resolve_inputs([f"hf-dataset:{one_file}"])
    assert [s.key for s in alone] == [s.key for s in train] == ["train_0", "train_1"]

    reference = resolve_inputs([f"hf-dataset:{stored['dict']}"])
    for samples in (single, default):
        assert [(s.label, s.label_name) for s in samples] == [(s.label, s.label_name) for s in reference]


def test_a_split_folder_inside_a_saved_dataset_dict_keeps_its_name(stored):
    samples = resolve_inputs([f"hf-dataset:{stored['dict'] / 'train'}"])
    assert [s.key for s in samples] == ["train_0", "train_1"]


def test_paths_are_stable_and_keys_unique_across_specs(stored):
    specs = [f"hf-dataset:{stored['dict']}", f"hf-dataset:{stored['parquet']}", f"hf-dataset:{stored['dict']}"]
    samples = resolve_inputs(specs)
    assert len(samples) == 8  # the same rows named twice are kept once
    assert len({s.key for s in samples}) == 8
    # the rows of both datasets clash: each gets a hash of its own row name (source file name, split, row)
    import hashlib
    import os

    for sample in samples:
        name = os.path.basename(sample.path)
        assert sample.key == f"validation_{sample.path[-1]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    assert resolve_inputs(specs) == samples


def test_keys_are_zero_padded_to_the_split_length(tmp_path):
    tiny = Image.new("RGB", (4, 4)).tobytes()  # never decoded here
    path = _save(tmp_path, "eleven", {"image": [{"bytes": tiny, "path": None}] * 11},
                 datasets.Features({"image": datasets.Image()}))
    samples = resolve_inputs([f"hf-dataset:{path}"])
    assert [s.key for s in samples][:2] == ["train_00", "train_01"] and samples[-1].key == "train_10"
    assert all(s.label is None and s.label_name is None for s in samples)


def test_resolving_decodes_no_image_also_with_a_limit(stored, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded while resolving")

    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(datasets.Image, "decode_example", refuse)
    every = resolve_inputs([f"hf-dataset:{stored['dict']}"])
    first = resolve_inputs([f"hf-dataset:{stored['parquet']}"], limit=2)
    assert [s.key for s in first] == [s.key for s in every[:2]]


def test_class_index_maps_class_label_names(stored, images, tmp_path):
    (_, label, name), *_ = images["validation"]
    index = tmp_path / "classes.txt"
    index.write_text(f"0\t{name}\tthe first of the model\n")  # a model that has only this class
    samples = resolve_inputs([f"hf-dataset:{stored['dict']}"], class_index=str(index))
    assert (samples[0].label, samples[0].label_name) == (0, "the first of the model")
    assert all(s.label is None for s in samples[1:])


def test_label_column_by_feature_name_or_plain_integers(tmp_path, images):
    path, _, _ = images["train"][0]
    image = {"bytes": path.read_bytes(), "path": None}
    plain = _save(tmp_path, "plain", {"img": [image, image], "labels": [3, -1]},
                  datasets.Features({"img": datasets.Image(), "labels": datasets.Value("int64")}))
    samples = resolve_inputs([f"hf-dataset:{plain}"])
    assert [(s.label, s.label_name) for s in samples] == [(3, None), (None, None)]  # -1: the Hub's "no label"

    two = _save(tmp_path, "two", {"img": [image], "coarse": [1], "fine": [2]},
                datasets.Features({"img": datasets.Image(), "coarse": datasets.ClassLabel(names=["a", "b"]),
                                   "fine": datasets.ClassLabel(names=["x", "y", "z"])}))
    _error(r"^'hf-dataset:.*two' has several label columns \(coarse, fine\): name one with label_column= "
           r"\(--label-column\)$", [f"hf-dataset:{two}"])
    fine = resolve_inputs([f"hf-dataset:{two}"], label_column="fine")
    assert (fine[0].label, fine[0].label_name) == (2, "z")


# ------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("kind", ["dict", "single", "parquet"])
def test_load_sample_gives_the_pixels_of_the_file(stored, images, kind, fresh):
    samples = resolve_inputs([f"hf-dataset:{stored[kind]}"])
    for sample, (path, _, _) in zip(samples, images["validation"]):
        from_dataset, from_file = load_sample(sample), load_image(path)
        assert from_dataset.mode == "RGB" and from_dataset.size == from_file.size
        assert np.array_equal(np.asarray(from_dataset), np.asarray(from_file))


def test_reduced_decoding_is_the_same_as_for_the_file(stored, images):
    """The runner's ``reduce`` (JPEG draft decoding of large photos) works on dataset rows too."""
    samples = resolve_inputs([f"hf-dataset:{stored['dict']}"])
    path = images["validation"][3][0]  # full resolution

    def reduce(size):
        return size[0] // 4, size[1] // 4

    from_dataset, from_file = load_sample(samples[3], reduce=reduce), load_image(path, reduce=reduce)
    assert from_file.info.get(ORIGINAL_SIZE) == load_image(path).size != from_file.size  # really reduced
    assert from_dataset.info.get(ORIGINAL_SIZE) == from_file.info.get(ORIGINAL_SIZE)
    assert np.array_equal(np.asarray(from_dataset), np.asarray(from_file))


def _odd_images(folder: Path) -> list[Path]:
    """Files load_image converts: EXIF-rotated JPEG, transparent PNG, 16-bit PNG, palette GIF, CMYK JPEG."""
    folder.mkdir()
    photo = Image.open(_labelled(VAL_1300, 1)[0][0]).convert("RGB").crop((0, 0, 90, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show upright
    photo.save(folder / "rotated.jpg", exif=exif)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(folder / "transparent.png")
    deep = (np.arange(60 * 90, dtype=np.uint16).reshape(60, 90) * 12).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.gif", transparency=0)
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    return sorted(folder.iterdir())


def test_odd_images_are_converted_exactly_as_files(tmp_path):
    files = _odd_images(tmp_path / "odd")
    path = _save(tmp_path, "odd-dataset", {"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files]},
                 datasets.Features({"image": datasets.Image()}))
    samples = resolve_inputs([f"hf-dataset:{path}"])
    assert load_sample(samples[files.index(tmp_path / "odd" / "rotated.jpg")]).size == (60, 90)
    for sample, file in zip(samples, files):
        assert np.array_equal(np.asarray(load_sample(sample)), np.asarray(load_image(file))), file.name


def test_an_image_stored_as_a_local_path_is_read_from_its_file(tmp_path, images):
    """As in the arrow files of load_dataset("imagefolder"): the image column holds only the file's path."""
    import pyarrow as pa

    path = images["train"][1][0]
    table = datasets.Dataset.from_dict({"image": [str(path)]}).cast_column("image", datasets.Image()).data.table
    assert table.column("image")[0].as_py() == {"bytes": None, "path": str(path)}
    with pa.OSFile(str(tmp_path / "paths.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (sample,) = resolve_inputs([f"hf-dataset:{tmp_path / 'paths.arrow'}"])
    assert np.array_equal(np.asarray(load_sample(sample)), np.asarray(load_image(path)))


def test_a_row_without_a_decodable_image_is_an_error_naming_the_sample(tmp_path, images):
    good = images["train"][0][0].read_bytes()
    rows = [{"bytes": good, "path": None}, None, {"bytes": good[:-20000], "path": None},
            {"bytes": b"not an image", "path": "x.jpg"}]
    path = _save(tmp_path, "broken", {"image": rows}, datasets.Features({"image": datasets.Image()}))
    samples = resolve_inputs([f"hf-dataset:{path}"])
    assert load_sample(samples[0]).size == (227, 227)
    for sample, reason in zip(samples[1:], ["the row has no image", "truncated or corrupt image data",
                                            "not an image file"]):
        with pytest.raises(InputError) as info:
            load_sample(sample)
        message = str(info.value)
        assert message.startswith(f"cannot read image '{sample.path}': {reason}") and "\n" not in message


def test_decoding_opens_the_dataset_once_per_process_from_many_threads(stored, images, monkeypatch):
    samples = resolve_inputs([f"hf-dataset:{stored['dict']}"])
    monkeypatch.setattr(hf, "_OPENED", {})  # as a worker process that did not resolve
    opened, real = [], datasets.load_from_disk

    def counting(*args, **kwargs):
        opened.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_from_disk", counting)
    start = threading.Barrier(4)

    def decode(sample):
        start.wait()
        return np.asarray(load_sample(sample))

    with ThreadPoolExecutor(4) as pool:
        decoded = list(pool.map(decode, samples))
    assert len(opened) == 1
    for pixels, (path, _, _) in zip(decoded, images["validation"]):
        assert np.array_equal(pixels, np.asarray(load_image(path)))


def test_a_named_image_column_is_part_of_the_path(tmp_path, images, fresh):
    (first, _, _), (second, _, _) = images["train"]
    columns = {"photo": [{"bytes": first.read_bytes(), "path": None}],
               "thumb": [{"bytes": second.read_bytes(), "path": None}]}
    path = _save(tmp_path, "two-images", columns,
                 datasets.Features({"photo": datasets.Image(), "thumb": datasets.Image()}))
    _error(r"^'hf-dataset:.*two-images' has several image columns \(photo, thumb\): name one with image_column= "
           r"\(--image-column\)$", [f"hf-dataset:{path}"])
    photo, thumb = (resolve_inputs([f"hf-dataset:{path}"], image_column=c)[0] for c in ("photo", "thumb"))
    assert (photo.path, thumb.path) == (f"hf-dataset:{path}:train#0@photo", f"hf-dataset:{path}:train#0@thumb")
    hf._OPENED.clear()
    assert np.array_equal(np.asarray(load_sample(thumb)), np.asarray(load_image(second)))
    assert np.array_equal(np.asarray(load_sample(photo)), np.asarray(load_image(first)))
    # naming the column a dataset has anyway changes nothing
    auto = resolve_inputs([f"hf-dataset:{stored_path(tmp_path, images)}"], image_column="image")
    assert "@" not in auto[0].path


def stored_path(tmp_path: Path, images) -> Path:
    path, _, _ = images["train"][0]
    return _save(tmp_path, "one-image", {"image": [{"bytes": path.read_bytes(), "path": None}]},
                 datasets.Features({"image": datasets.Image()}))


def test_hub_names_go_to_load_dataset(stored, monkeypatch, fresh):
    """Hub datasets (never downloaded in tests): the split names are asked for, then only the chosen split."""
    local = datasets.load_from_disk(str(stored["dict"]))
    calls = []

    def split_names(name):
        calls.append(("splits", name))
        return list(local)

    def load_dataset(name, split=None):
        calls.append(("load", name, split))
        return local[split]

    monkeypatch.setattr(datasets, "get_dataset_split_names", split_names)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    samples = resolve_inputs(["hf-dataset:someorg/imagenet-mini"])
    assert calls == [("splits", "someorg/imagenet-mini"), ("load", "someorg/imagenet-mini", "validation")]
    assert samples[0].path == "hf-dataset:someorg/imagenet-mini:validation#0"
    train = resolve_inputs(["hf-dataset:someorg/imagenet-mini:train"])
    assert calls[2:] == [("load", "someorg/imagenet-mini", "train")]
    hf._OPENED.clear()
    assert load_sample(train[1]).size == (227, 227)
    assert calls[3:] == [("load", "someorg/imagenet-mini", "train")]


# ------------------------------------------------------------------------------------ errors
def test_unknown_split_lists_the_splits(stored):
    _error(r"^unknown split 'val' in 'hf-dataset:.*dict:val' \(splits: train, validation\)$",
           [f"hf-dataset:{stored['dict']}:val"])
    _error(r"^unknown split 'test' in 'hf-dataset:.*parquet:test' \(splits: train, validation\)$",
           [f"hf-dataset:{stored['parquet']}:test"])


def test_no_default_split_asks_for_one(tmp_path, stored):
    local = datasets.load_from_disk(str(stored["dict"]))
    datasets.DatasetDict({"a": local["train"], "b": local["validation"]}).save_to_disk(tmp_path / "ab")
    _error(r"^'hf-dataset:.*ab' has no validation, test or train split: name one of a, b "
           r"\(hf-dataset:PATH_OR_NAME:SPLIT\)$", [f"hf-dataset:{tmp_path / 'ab'}"])
    assert [s.key for s in resolve_inputs([f"hf-dataset:{tmp_path / 'ab'}:b"])][:1] == ["b_0"]


def test_named_columns_that_do_not_exist_or_do_not_fit(stored):
    spec = f"hf-dataset:{stored['dict']}"
    _error(r"^'hf-dataset:.*' has no column 'img' \(columns: image, label, file\)$", [spec], image_column="img")
    _error(r"^'hf-dataset:.*' has no column 'class' \(columns: image, label, file\)$", [spec], label_column="class")
    _error(r"^column 'label' of 'hf-dataset:.*' holds ClassLabel, not images \(datasets.Image\)$", [spec],
           image_column="label")
    _error(r"^column 'file' of 'hf-dataset:.*' holds Value\('string'\), not class labels \(ClassLabel or "
           r"integers\)$", [spec], label_column="file")
    _error(r"^column 'image' of 'hf-dataset:.*' holds Image, not class labels \(ClassLabel or integers\)$", [spec],
           label_column="image")


def test_no_image_column(tmp_path):
    path = _save(tmp_path, "text", {"text": ["a"], "label": [0]})
    _error(r"^'hf-dataset:.*text' has no image column \(columns: text, label\)$", [f"hf-dataset:{path}"])


def test_paths_that_are_not_datasets(tmp_path, stored):
    _error(r"^'hf-dataset:' names no dataset: expected hf-dataset:PATH_OR_NAME\[:split\]$", ["hf-dataset:"])
    _error(r"^'.*nope' does not exist \(in 'hf-dataset:.*nope:validation'\)$",
           [f"hf-dataset:{tmp_path / 'nope'}:validation"])
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(_labelled(VAL_1300, 1)[0][0], photos / "a.jpg")
    _error(r"^'hf-dataset:.*photos' is not a Hugging Face dataset: no save_to_disk folder \(dataset_dict.json, "
           r"state.json\) and no .parquet or .arrow files$", [f"hf-dataset:{photos}"])
    broken = tmp_path / "broken"
    shutil.copytree(stored["single"], broken)
    (broken / "state.json").write_text("{ not json")
    _error(r"^cannot load 'hf-dataset:.*broken': ", [f"hf-dataset:{broken}"])


def test_without_the_datasets_library(stored, monkeypatch, fresh):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    _error(r"^hf-dataset inputs need the Hugging Face datasets library: pip install datasets$",
           [f"hf-dataset:{stored['dict']}"])
    sample = Sample(path=f"hf-dataset:{stored['dict']}:validation#0", key="validation_0")
    with pytest.raises(InputError, match="pip install datasets"):
        load_sample(sample)


# ------------------------------------------------------------------------------------ same maps
def test_the_same_images_from_a_dataset_and_from_files_give_identical_maps(stored, images, tiny_model, fresh):
    files = [str(path) for path, _, _ in images["validation"]]
    from_files = vitlens.explain(tiny_model, files, methods="all")
    assert len(from_files.methods) >= 10
    for kind in ("dict", "parquet"):
        samples = resolve_inputs([f"hf-dataset:{stored[kind]}"])
        from_dataset = vitlens.explain(tiny_model, [load_sample(s) for s in samples], methods="all")
        assert [p.index for p in from_dataset.predictions] == [p.index for p in from_files.predictions]
        for method in from_files.methods:
            assert torch.equal(from_dataset[method], from_files[method]), (kind, method)
            assert torch.equal(from_dataset.patch_maps[method], from_files.patch_maps[method]), (kind, method)


def test_a_run_from_a_dataset_writes_the_maps_of_a_run_from_files(stored, images, tiny_model, tmp_path):
    from vitlens.runner import run_explain

    methods = ["rollout", "gmar-l2", "legrad", "chefer", "attnlrp"]
    by_files = resolve_inputs([str(path) for path, _, _ in images["validation"]])
    by_rows = resolve_inputs([f"hf-dataset:{stored['parquet']}"])
    runs = {}
    for name, samples in (("files", by_files), ("rows", by_rows)):
        summary = run_explain(samples, tiny_model, methods, out_dir=tmp_path / name, batch_size=3, progress=False)
        assert (summary.explained, summary.failed) == (4, [])
        runs[name] = samples
    for method in methods:
        for file_sample, row_sample in zip(runs["files"], runs["rows"]):
            (a,) = (tmp_path / "files" / "maps" / method).glob(f"{file_sample.key}__*.npy")
            (b,) = (tmp_path / "rows" / "maps" / method).glob(f"{row_sample.key}__*.npy")
            assert a.name.split("__")[1] == b.name.split("__")[1]  # the same target class
            assert a.read_bytes() == b.read_bytes(), (method, a.name)
    records = [p.read_text() for p in sorted((tmp_path / "rows" / "records").iterdir())]
    assert all(f'"hf-dataset:{stored["parquet"]}:validation#' in r for r in records)
    again = run_explain(by_rows, tiny_model, methods, out_dir=tmp_path / "rows", batch_size=3, progress=False)
    assert (again.explained, again.skipped) == (0, 4)  # resumed: the record paths are the rows' paths


def test_a_broken_row_fails_alone_in_a_run(tmp_path, images, tiny_model):
    from vitlens.runner import run_explain

    good = [path.read_bytes() for path, _, _ in images["train"]]
    rows = [{"bytes": good[0], "path": None}, {"bytes": b"\xff\xd8 not really", "path": None},
            {"bytes": good[1], "path": None}]
    path = _save(tmp_path, "one-broken", {"image": rows}, datasets.Features({"image": datasets.Image()}))
    samples = resolve_inputs([f"hf-dataset:{path}"])
    summary = run_explain(samples, tiny_model, ["rollout"], out_dir=tmp_path / "out", progress=False)
    assert summary.explained == 2
    assert [(key, p) for key, p, _ in summary.failed] == [("train_1", f"hf-dataset:{path}:train#1")]
    assert "cannot read image 'hf-dataset:" in summary.failed[0][2]


def test_encoded_bytes_are_what_the_file_holds(stored, images):
    """Guard for the tests above: the datasets store the files' own bytes, not re-encoded pixels."""
    undecoded = datasets.load_from_disk(str(stored["dict"]))["validation"].cast_column(
        "image", datasets.Image(decode=False))
    for row, (path, _, _) in zip(undecoded, images["validation"]):
        assert row["image"]["bytes"] == path.read_bytes()
        assert Image.open(io.BytesIO(row["image"]["bytes"])).format == "JPEG"


def test_the_command_line_names_the_columns(tmp_path, images, tiny, capsys, fresh):
    """`vitlens explain hf-dataset:... --image-column --label-column --target label`: the labels of the named column
    are explained; an unknown column is one line, exit 2, nothing written."""
    import json

    from vitlens import cli

    files = images["validation"][:2]
    columns = {"photo": [{"bytes": f.read_bytes(), "path": None} for f, _, _ in files],
               "thumb": [{"bytes": f.read_bytes(), "path": None} for f, _, _ in files],
               "coarse": [0, 1], "fine": [7, 9]}
    path = _save(tmp_path, "named", columns, datasets.Features({"photo": datasets.Image(), "thumb": datasets.Image(),
                                                                "coarse": datasets.Value("int64"),
                                                                "fine": datasets.Value("int64")}))
    out = tmp_path / "out"
    code = cli.main(["explain", f"hf-dataset:{path}", *tiny, "--image-column", "thumb", "--label-column", "fine",
                     "--target", "label", "--methods", "rollout", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [im["label"] for im in manifest["images"]] == [7, 9]
    assert [im["targets"][0]["index"] for im in manifest["images"]] == [7, 9]
    assert all(im["path"].endswith("@thumb") for im in manifest["images"])
    capsys.readouterr()
    code = cli.main(["explain", f"hf-dataset:{path}", *tiny, "--image-column", "nosuch", "--out",
                     str(tmp_path / "never"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "has no column 'nosuch'" in err
    assert not (tmp_path / "never").exists()
