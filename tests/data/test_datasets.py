"""resolve_inputs: files, folders, globs and the four dataset layouts, built small in tmp_path."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import pytest

from vitlens.data import Sample, resolve_inputs
from vitlens.data.samples import make_key

from .conftest import resolve_error as _error

# The real data shipped next to the repository (skipped when absent).
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _names(samples: list[Sample]) -> list[str]:
    return [Path(s.path).name for s in samples]


# ---------------------------------------------------------------- plain files, folders, globs


@pytest.fixture
def photos(tmp_path, write_image) -> Path:
    root = tmp_path / "photos"
    for name in ["img10.jpg", "img2.jpg", "img1.PNG", "sub/deep/a.webp", "sub/b.bmp", "z.jfif"]:
        write_image(root / name)
    write_image(root / ".hidden.jpg")
    write_image(root / ".cache" / "thumb.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_is_recursive_sorted_and_skips_hidden_and_non_images(photos):
    samples = resolve_inputs([str(photos)])
    assert [s.key for s in samples] == ["img1", "img2", "img10", "sub__b", "sub__deep__a", "z"]
    assert all(Path(s.path).is_absolute() and Path(s.path).is_file() for s in samples)
    assert all(s.source == str(photos) for s in samples)
    assert all(s.label is None and s.label_name is None and s.boxes == () for s in samples)


def test_single_file_any_extension(tmp_path, write_image):
    photo = write_image(tmp_path / "one.jpg")
    (tmp_path / "mystery.dat").write_bytes(b"decided when loading")
    samples = resolve_inputs([str(photo), str(tmp_path / "mystery.dat")])
    assert [s.key for s in samples] == ["one", "mystery"]
    assert samples[0].path == str(photo.resolve())


def test_glob_patterns(photos):
    flat = resolve_inputs([str(photos / "*.jpg")])
    assert _names(flat) == ["img2.jpg", "img10.jpg"]
    deep = resolve_inputs([str(photos / "**" / "*.*")])
    assert [s.key for s in deep] == ["img1", "img2", "img10", "sub__b", "sub__deep__a", "z"]
    assert all(s.source == str(photos / "**" / "*.*") for s in deep)


def test_relative_glob(photos, monkeypatch):
    monkeypatch.chdir(photos)
    assert _names(resolve_inputs(["sub/*.bmp"])) == ["b.bmp"]


def test_spec_order_is_kept_and_duplicates_dropped(photos):
    samples = resolve_inputs([str(photos / "z.jfif"), str(photos)])
    assert samples[0].key == "z"
    assert len(samples) == 6
    assert len({s.path for s in samples}) == 6


def test_existing_path_with_colon_is_a_file_not_a_dataset(tmp_path, write_image, monkeypatch):
    write_image(tmp_path / "foo:bar.png")
    write_image(tmp_path / "imagefolder:x" / "a.png")
    monkeypatch.chdir(tmp_path)
    assert _names(resolve_inputs(["foo:bar.png"])) == ["foo:bar.png"]
    assert _names(resolve_inputs(["imagefolder:x"])) == ["a.png"]


def test_windows_drive_path_is_not_a_dataset_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _error("does not exist", ["C:\\data\\cat.jpg"])
    assert "dataset kind" not in message


def test_missing_path():
    _error(r"^'/no/such/place\.jpg' does not exist$", ["/no/such/place.jpg"])


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    _error(r"no images found in '.*empty'", [str(tmp_path / "empty")])


def test_glob_without_matches(tmp_path):
    _error(r"no images match '.*\*\.png'", [str(tmp_path / "*.png")])


def test_unknown_dataset_prefix(tmp_path):
    message = _error(r"'foo' is not a dataset kind", [f"foo:{tmp_path}"])
    assert "imagefolder" in message and "tinyimagenet" in message and "cub200" in message


def test_no_specs_and_bad_limit(photos):
    _error("no input given", [])
    _error("limit must be a positive", [str(photos)], limit=0)
    _error("limit must be a positive", [str(photos)], limit=-3)


def test_a_single_string_spec_is_accepted(photos):
    assert len(resolve_inputs(str(photos))) == 6


def test_limit_keeps_first_n_and_keys_do_not_change(tmp_path, write_image):
    for name in ["a.jpg", "a.png", "b.png", "c.png"]:
        write_image(tmp_path / "d" / name)
    everything = resolve_inputs([str(tmp_path / "d")])
    first_two = resolve_inputs([str(tmp_path / "d")], limit=2)
    assert first_two == everything[:2]
    assert resolve_inputs([str(tmp_path / "d")], limit=100) == everything


# ---------------------------------------------------------------- keys


def digest(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def test_colliding_keys_each_get_a_hash_of_their_file(tmp_path, write_image):
    write_image(tmp_path / "one" / "a.jpg")
    write_image(tmp_path / "one" / "a.png")
    write_image(tmp_path / "one" / "a-2.png")  # a name that numbering would have handed to a.png
    write_image(tmp_path / "two" / "A.jpg")  # differs only by case: clashes on Windows/macOS
    specs = [str(tmp_path / "one"), str(tmp_path / "two")]
    samples = resolve_inputs(specs)
    keys = {Path(s.path).relative_to(tmp_path).as_posix(): s.key for s in samples}
    # a.png's file name is its own within the clash; a.jpg and A.jpg are the same name on Windows / macOS
    assert keys == {"one/a.jpg": f"a-{digest(str(tmp_path / 'one' / 'a.jpg'))}", "one/a.png": f"a-{digest('a.png')}",
                    "one/a-2.png": "a-2", "two/A.jpg": f"A-{digest(str(tmp_path / 'two' / 'A.jpg'))}"}
    assert [s.key for s in samples] == [s.key for s in resolve_inputs(specs)]
    assert len({k.lower() for k in keys.values()}) == len(keys)


def test_the_same_relative_path_under_two_roots_is_told_apart_by_the_whole_path(tmp_path, write_image):
    for root in ("one", "two"):
        write_image(tmp_path / root / "cat.jpg")
    samples = resolve_inputs([str(tmp_path / "one"), str(tmp_path / "two")])
    assert [s.key for s in samples] == [f"cat-{digest(s.path)}" for s in samples]
    assert len({s.key for s in samples}) == 2


def test_an_images_key_does_not_depend_on_the_other_files(tmp_path, write_image):
    """Names that lose characters never share a key, so adding files never renames an image's outputs (it did:
    'café.jpg', 'naïve.jpg' and a third such name were 'caf', 'na_ve'... and then re-numbered)."""
    folder = tmp_path / "photos"
    names = ["café 猫.jpg", "naïve.jpg", "a b.jpg", "a_b.jpg", "a?b.jpg", "Ελλάδα.png", "plain.jpg"]
    keys_alone = {}
    for name in names:
        write_image(folder / name)
        keys_alone[name] = {Path(s.path).name: s.key for s in resolve_inputs([str(folder)])}[name]
    keys_together = {Path(s.path).name: s.key for s in resolve_inputs([str(folder)])}
    assert keys_together == keys_alone
    assert keys_together["café 猫.jpg"] == f"café_猫-{digest('café 猫.jpg')}"
    assert keys_together["naïve.jpg"] == "naïve" and keys_together["Ελλάδα.png"] == "Ελλάδα"
    assert keys_together["a_b.jpg"] == "a_b" and keys_together["plain.jpg"] == "plain"
    assert len(set(keys_together.values())) == len(names)


@pytest.mark.parametrize(
    ("relative", "key"),
    [
        ("cats/img_01.JPEG", "cats__img_01"),
        ("cats/img 01.JPEG", f"cats__img_01-{digest('cats/img 01.JPEG')}"),
        ("a\\b\\c.png", "a__b__c"),
        ("ünïcode (1)/x&y.jpg", f"ünïcode_1___x_y-{digest('ünïcode (1)/x&y.jpg')}"),
        ("ünïcode/猫.jpg", "ünïcode__猫"),
        ("cafe\u0301.jpg", "café"),  # macOS' decomposed form: the same key as the composed one
        (".secret.png", f"_secret-{digest('.secret.png')}"),
        ("con.jpg", f"con_-{digest('con.jpg')}"),
        ("noext", "noext"),
        ("___.png", "___"),
    ],
)
def test_make_key_is_file_name_safe(relative, key):
    assert make_key(relative) == key


def test_make_key_shortens_long_names_uniquely():
    a, b = make_key("x" * 300 + "a.png"), make_key("x" * 300 + "b.png")
    assert len(a) <= 120 and len(b) <= 120 and a != b
    c, d = make_key("猫" * 100 + "a.png"), make_key("猫" * 100 + "b.png")
    assert len(c.encode("utf-8")) <= 120 and c != d and c.startswith("猫" * 37)


def test_sample_is_frozen_and_normalises_boxes():
    sample = Sample(path="/x.png", key="x", boxes=[[1, 2, 3, 4]])
    assert sample.boxes == ((1.0, 2.0, 3.0, 4.0),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.label = 3  # type: ignore[misc]


# ---------------------------------------------------------------- class-index files


def test_imagefolder_sorted_classes(tmp_path, write_image):
    root = tmp_path / "train"
    for name in ["dog/d1.jpg", "dog/nested/d2.jpg", "cat/c10.png", "cat/c9.png", "bird/b.png"]:
        write_image(root / name)
    write_image(root / "stray.png")  # images outside class folders are not part of the dataset
    (root / ".git").mkdir()
    (root / "empty_class").mkdir()
    samples = resolve_inputs([f"imagefolder:{root}"])
    assert [(s.key, s.label, s.label_name) for s in samples] == [
        ("bird__b", 0, "bird"),
        ("cat__c9", 1, "cat"),
        ("cat__c10", 1, "cat"),
        ("dog__d1", 2, "dog"),
        ("dog__nested__d2", 2, "dog"),
    ]
    assert all(s.source == f"imagefolder:{root}" for s in samples)


def test_imagefolder_with_indexed_class_index(tmp_path, write_image):
    for name in ["n01/a.jpg", "n02/b.jpg", "n99/c.jpg"]:
        write_image(tmp_path / "data" / name)
    index = tmp_path / "classes.txt"
    index.write_text("# model output order\n1\tn01\tgoldfish, Carassius auratus\n0\tn02\ttench\n\n")
    samples = resolve_inputs([f"imagefolder:{tmp_path / 'data'}"], class_index=str(index))
    assert [(s.label, s.label_name) for s in samples] == [
        (1, "goldfish, Carassius auratus"),
        (0, "tench"),
        (None, "n99"),  # a class the model does not have: no label, not an error
    ]


def test_imagefolder_with_plain_class_list(tmp_path, write_image):
    for name in ["cat/a.jpg", "dog/b.jpg"]:
        write_image(tmp_path / "data" / name)
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    samples = resolve_inputs(
        [f"imagefolder:{tmp_path / 'data'}"], class_index=str(tmp_path / "classes.txt")
    )
    assert [(s.label_name, s.label) for s in samples] == [("cat", 1), ("dog", 0)]


def test_imagefolder_errors(tmp_path, write_image):
    write_image(tmp_path / "flat" / "a.jpg")
    _error(
        "is not an image folder dataset: it has no class sub-folders",
        [f"imagefolder:{tmp_path / 'flat'}"],
    )
    (tmp_path / "classes_only" / "cat").mkdir(parents=True)
    _error("no images found in", [f"imagefolder:{tmp_path / 'classes_only'}"])
    _error(
        r"'.*nowhere' does not exist \(in 'imagefolder:", [f"imagefolder:{tmp_path / 'nowhere'}"]
    )
    _error("is not a folder", [f"imagefolder:{tmp_path / 'flat' / 'a.jpg'}"])
    _error("names no folder", ["imagefolder:"])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "is empty"),
        ("0\tn01\n0\tn02\n", "line 2: index 0 is listed twice"),
        ("0\tn01\n1\tn01\n", "line 2: class 'n01' is listed twice"),
        ("0\tn01\nbanana\n", "line 2: expected 'index<TAB>class"),
        ("cat\ndog\ncat\n", "line 3: class 'cat' is listed twice"),
    ],
)
def test_malformed_class_index(tmp_path, write_image, content, match):
    write_image(tmp_path / "data" / "cat" / "a.jpg")
    (tmp_path / "idx.txt").write_text(content)
    message = _error(
        match, [f"imagefolder:{tmp_path / 'data'}"], class_index=str(tmp_path / "idx.txt")
    )
    assert str(tmp_path / "idx.txt") in message


def test_unreadable_class_index(tmp_path, write_image):
    write_image(tmp_path / "data" / "cat" / "a.jpg")
    spec = [f"imagefolder:{tmp_path / 'data'}"]
    _error(
        "cannot read class-index file '.*missing.txt': no such file",
        spec,
        class_index=str(tmp_path / "missing.txt"),
    )
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81garbage")
    _error(
        "cannot read class-index file .*: not a UTF-8 text file",
        spec,
        class_index=str(tmp_path / "bin.txt"),
    )


# ---------------------------------------------------------------- TinyImageNet-200

TINY_WNIDS = ["n02000002", "n01000001", "n03000003"]  # wnids.txt is not sorted in the real data
TINY_WORDS = {
    "n01000001": "goldfish, Carassius auratus",
    "n02000002": "tench, Tinca tinca",
    "n03000003": "go-kart",
    "n09999999": "unused entry, as in the full 82k-line words.txt",
}
# file, wnid, inclusive corners x0 y0 x1 y1 (as in val_annotations.txt)
TINY_VAL = [(f"val_{i}.JPEG", TINY_WNIDS[i % 3], i, 2 * i, 40 + i, 63) for i in range(12)]


def _write_tiny_meta(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\t{t}\n" for w, t in TINY_WORDS.items()))


def _write_tiny_val(val_dir: Path, write_image) -> None:
    lines = [f"{f}\t{w}\t{x0}\t{y0}\t{x1}\t{y1}\n" for f, w, x0, y0, x1, y1 in TINY_VAL]
    val_dir.mkdir(parents=True, exist_ok=True)
    (val_dir / "val_annotations.txt").write_text("".join(reversed(lines)))
    for name, *_ in TINY_VAL:
        write_image(val_dir / "images" / name, size=(64, 64))


@pytest.fixture
def tiny_root(tmp_path, write_image) -> Path:
    """The official ``tiny-imagenet-200`` layout: wnids, words, val/ and train/."""
    root = tmp_path / "tiny-imagenet-200"
    _write_tiny_meta(root)
    _write_tiny_val(root / "val", write_image)
    for wnid in ["n01000001", "n02000002"]:
        for i in range(2):
            write_image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", size=(64, 64))
    (root / "train" / "n01000001" / "n01000001_boxes.txt").write_text(
        "n01000001_0.JPEG\t1\t2\t30\t40\nn01000001_1.JPEG\t0\t0\t63\t63\n"
    )
    return root


def _expected_sorted_label(wnid: str) -> int:
    return sorted(TINY_WNIDS).index(wnid)


def test_tinyimagenet_val_from_root(tiny_root):
    samples = resolve_inputs([f"tinyimagenet:{tiny_root}"])
    assert [s.key for s in samples] == [f"val_{i}" for i in range(12)]  # natural, not file order
    for sample, (name, wnid, x0, y0, x1, y1) in zip(samples, TINY_VAL, strict=True):
        assert sample.path == str(tiny_root / "val" / "images" / name)
        assert sample.label == _expected_sorted_label(wnid)
        assert sample.label_name == TINY_WORDS[wnid]
        # inclusive corners -> pixel edges
        assert sample.boxes == ((x0, y0, x1 + 1, y1 + 1),)
    assert samples[0].source == f"tinyimagenet:{tiny_root}"
    assert resolve_inputs([f"tinyimagenet:{tiny_root}:val"]) == [
        dataclasses.replace(s, source=f"tinyimagenet:{tiny_root}:val") for s in samples
    ]


def test_tinyimagenet_train_split(tiny_root):
    samples = resolve_inputs([f"tinyimagenet:{tiny_root}:train"])
    assert [s.key for s in samples] == [
        "n01000001__n01000001_0",
        "n01000001__n01000001_1",
        "n02000002__n02000002_0",
        "n02000002__n02000002_1",
    ]
    assert [s.label for s in samples] == [0, 0, 1, 1]
    assert samples[0].boxes == ((1, 2, 31, 41),)
    assert samples[1].boxes == ((0, 0, 64, 64),)
    assert samples[2].boxes == ()  # no <wnid>_boxes.txt for that class
    assert samples[2].label_name == "tench, Tinca tinca"


def test_tinyimagenet_flat_val_folder(tmp_path, write_image):
    """A copy of val/ with wnids.txt and words.txt beside val_annotations.txt (the shared layout)."""
    flat = tmp_path / "tinyimagenet_val"
    _write_tiny_meta(flat)
    _write_tiny_val(flat, write_image)
    samples = resolve_inputs([f"tinyimagenet:{flat}"])
    assert len(samples) == 12
    assert samples[3].path == str(flat / "images" / "val_3.JPEG")
    assert samples[3].label == _expected_sorted_label(TINY_VAL[3][1])
    assert samples[3].boxes == ((3, 6, 44, 64),)
    _error(r"is not a TinyImageNet-200 folder: missing train/", [f"tinyimagenet:{flat}:train"])


def test_tinyimagenet_val_subfolder_of_official_root(tiny_root):
    samples = resolve_inputs([f"tinyimagenet:{tiny_root / 'val'}"])  # wnids.txt is one level up
    assert [s.label for s in samples] == [_expected_sorted_label(v[1]) for v in TINY_VAL]


def test_tinyimagenet_with_class_index(tiny_root, tmp_path):
    index = tmp_path / "class_index.txt"
    index.write_text("0\tn03000003\tgo-kart\n1\tn01000001\tgoldfish\n")  # not sorted order
    samples = resolve_inputs([f"tinyimagenet:{tiny_root}"], class_index=str(index))
    by_wnid = {v[1]: s for v, s in zip(TINY_VAL, samples, strict=True)}
    assert by_wnid["n03000003"].label == 0
    assert by_wnid["n01000001"].label == 1
    assert by_wnid["n01000001"].label_name == "goldfish"  # words from the class-index file
    assert by_wnid["n02000002"].label is None  # not a model class
    assert by_wnid["n02000002"].label_name == "tench, Tinca tinca"


def test_tinyimagenet_does_not_open_images(tiny_root):
    (tiny_root / "val" / "images" / "val_5.JPEG").write_bytes(b"corrupt")
    (tiny_root / "val" / "images" / "val_6.JPEG").unlink()
    assert len(resolve_inputs([f"tinyimagenet:{tiny_root}"])) == 12  # loading reports them later


def test_tinyimagenet_layout_errors(tiny_root):
    spec = f"tinyimagenet:{tiny_root}"
    _error(r"unknown tinyimagenet split 'test' .*expected val or train", [f"{spec}:test"])
    (tiny_root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01000001\t1\t2\n")
    _error(r"annotations file '.*val_annotations.txt' line 1: expected 6 fields", [spec])
    (tiny_root / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn01000001\t1\t2\tthree\t4\n"
    )
    _error(r"line 1: expected numbers", [spec])
    (tiny_root / "val" / "val_annotations.txt").unlink()
    message = _error("missing val/val_annotations.txt", [spec])
    assert (
        message
        == f"'{tiny_root}' is not a TinyImageNet-200 folder: missing val/val_annotations.txt"
    )
    (tiny_root / "wnids.txt").unlink()
    message = _error("missing wnids.txt", [spec])
    assert message == f"'{tiny_root}' is not a TinyImageNet-200 folder: missing wnids.txt"


# ---------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


@pytest.fixture
def cub_parent(tmp_path, write_image) -> Path:
    """``<parent>/CUB_200_2011/`` with 11 images; odd ids are training images."""
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    images, labels, split, boxes = [], [], [], []
    for image_id in range(1, 12):
        class_id = (image_id - 1) % 3 + 1
        rel = f"{CUB_CLASSES[class_id - 1]}/{CUB_CLASSES[class_id - 1][4:]}_{image_id:04d}_{image_id}.jpg"
        write_image(root / "images" / rel)
        images.append(f"{image_id} {rel}\n")
        labels.append(f"{image_id} {class_id}\n")
        split.append(f"{image_id} {image_id % 2}\n")
        boxes.append(f"{image_id} {image_id}.5 2.0 10.25 {image_id * 3}.0\n")
    (root / "images.txt").write_text("".join(images))
    (root / "image_class_labels.txt").write_text("".join(labels))
    (root / "train_test_split.txt").write_text("".join(split))
    (root / "bounding_boxes.txt").write_text("".join(boxes))
    (root / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(CUB_CLASSES, 1)))
    return tmp_path


def _cub_id(sample: Sample) -> int:
    return int(Path(sample.path).stem.rsplit("_", 1)[1])


def test_cub200_test_split_by_default(cub_parent):
    samples = resolve_inputs([f"cub200:{cub_parent}"])
    assert [_cub_id(s) for s in samples] == [2, 4, 6, 8, 10]  # image-id order, test = is_train 0
    for sample in samples:
        image_id = _cub_id(sample)
        class_id = (image_id - 1) % 3 + 1
        assert sample.label == class_id - 1
        assert sample.label_name == CUB_CLASSES[class_id - 1][4:].replace("_", " ")
        # x y width height -> x0 y0 x1 y1
        assert sample.boxes == ((image_id + 0.5, 2.0, image_id + 0.5 + 10.25, 2.0 + image_id * 3),)
    assert samples[0].key == "002.Laysan_Albatross__Laysan_Albatross_0002_2"
    assert samples[0].label_name == "Laysan Albatross"


def test_cub200_train_split_and_direct_folder(cub_parent):
    train = resolve_inputs([f"cub200:{cub_parent / 'CUB_200_2011'}:train"])
    assert [_cub_id(s) for s in train] == [1, 3, 5, 7, 9, 11]  # 11 after 9: numeric id order
    assert Path(train[0].path).is_file()
    test = resolve_inputs([f"cub200:{cub_parent / 'CUB_200_2011'}:test"])
    assert [s.path for s in test] == [s.path for s in resolve_inputs([f"cub200:{cub_parent}"])]


def test_cub200_without_boxes_file(cub_parent):
    (cub_parent / "CUB_200_2011" / "bounding_boxes.txt").unlink()
    assert all(s.boxes == () for s in resolve_inputs([f"cub200:{cub_parent}"]))


def test_cub200_with_class_index(cub_parent, tmp_path):
    (tmp_path / "birds.txt").write_text("003.Sooty_Albatross\n001.Black_footed_Albatross\n")
    samples = resolve_inputs([f"cub200:{cub_parent}"], class_index=str(tmp_path / "birds.txt"))
    labels = {_cub_id(s): s.label for s in samples}
    assert labels == {2: None, 4: 1, 6: 0, 8: None, 10: 1}


def test_cub200_layout_errors(cub_parent):
    root = cub_parent / "CUB_200_2011"
    spec = f"cub200:{cub_parent}"
    _error(r"unknown cub200 split 'val'", [f"{spec}:val"])
    (root / "image_class_labels.txt").write_text("1 1\n")
    _error(r"image_class_labels.txt' has no line for id 2", [spec])
    (root / "image_class_labels.txt").unlink()
    message = _error("missing image_class_labels.txt", [spec])
    assert message == f"'{root}' is not a CUB-200-2011 folder: missing image_class_labels.txt"
    (root / "images.txt").unlink()
    _error(rf"^'{cub_parent}' is not a CUB-200-2011 folder: missing images.txt$", [spec])


# ---------------------------------------------------------------- ImageNet-val with a labels file


@pytest.fixture
def imagenet_val(tmp_path, write_image) -> Path:
    root = tmp_path / "imagenet_val"
    for i in (1, 2, 3, 10):
        write_image(root / "images" / f"ILSVRC2012_val_{i:08d}.JPEG")
    return root


def test_imagenet_val_with_csv(imagenet_val):
    labels = imagenet_val / "labels.csv"
    labels.write_text(
        "file,label,synset,class_name\n"
        'images/ILSVRC2012_val_00000001.JPEG,65,n01751748,"sea snake"\n'
        'images/ILSVRC2012_val_00000002.JPEG,970,n09193705,"alp"\n'
        'images/ILSVRC2012_val_00000010.JPEG,260,n02112137,"chow, chow chow"\n'
    )
    samples = resolve_inputs([f"imagenet-val:{imagenet_val}"], labels=str(labels))
    assert [s.key for s in samples] == [f"ILSVRC2012_val_{i:08d}" for i in (1, 2, 3, 10)]
    assert [(s.label, s.label_name) for s in samples] == [
        (65, "sea snake"),
        (970, "alp"),
        (None, None),  # not in the labels file
        (260, "chow, chow chow"),
    ]
    # PATH may also be the images folder itself: then files match by name.
    direct = resolve_inputs([f"imagenet-val:{imagenet_val / 'images'}"], labels=str(labels))
    assert [s.label for s in direct] == [65, 970, None, 260]


@pytest.mark.parametrize("compressed", [False, True])
def test_imagenet_val_with_filename_index_list(imagenet_val, tmp_path, compressed):
    text = "".join(f"ILSVRC2012_val_{i:08d}.JPEG {i * 7}\n" for i in range(1, 20))
    path = tmp_path / ("val.txt.gz" if compressed else "val.txt")
    path.write_bytes(gzip.compress(text.encode()) if compressed else text.encode())
    samples = resolve_inputs([f"imagenet-val:{imagenet_val}"], labels=str(path))
    assert [(s.label, s.label_name) for s in samples] == [
        (7, None),
        (14, None),
        (21, None),
        (70, None),
    ]


def test_labels_are_also_applied_to_plain_folders(imagenet_val, tmp_path):
    (tmp_path / "l.txt").write_text("ILSVRC2012_val_00000003.JPEG 5\n")
    samples = resolve_inputs([str(imagenet_val)], labels=str(tmp_path / "l.txt"))
    assert [s.label for s in samples] == [None, None, 5, None]


def test_ambiguous_file_names_only_match_by_full_path(tmp_path, write_image):
    write_image(tmp_path / "set" / "a" / "x.jpg")
    write_image(tmp_path / "set" / "b" / "x.jpg")
    write_image(tmp_path / "set" / "c" / "x.jpg")
    (tmp_path / "l.csv").write_text("file,label\na/x.jpg,1\nb/x.jpg,2\n")
    samples = resolve_inputs([f"imagenet-val:{tmp_path / 'set'}"], labels=str(tmp_path / "l.csv"))
    assert [s.label for s in samples] == [1, 2, None]
    assert [s.key for s in samples] == ["a__x", "b__x", "c__x"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "is empty"),
        ("name,index\nx.JPEG,1\n", "is a CSV without 'file' and 'label' columns"),
        ("file,label\nx.JPEG,dog\n", "line 2: label 'dog' is not a non-negative integer"),
        ("file,label\nx.JPEG,1\nx.JPEG,2\n", "line 3: 'x.JPEG' already has another label"),
        ("file,label,extra\nonlyone\n", "line 2: too few columns"),
        ("x.JPEG 1\nlonely\n", "line 2: expected 'filename label'"),
        ("x.JPEG -4\n", "label '-4' is not a non-negative integer"),
    ],
)
def test_malformed_labels_file(imagenet_val, tmp_path, content, match):
    (tmp_path / "bad.txt").write_text(content)
    message = _error(match, [f"imagenet-val:{imagenet_val}"], labels=str(tmp_path / "bad.txt"))
    assert str(tmp_path / "bad.txt") in message


def test_imagenet_val_errors(imagenet_val, tmp_path):
    spec = [f"imagenet-val:{imagenet_val}"]
    _error("needs a labels file", spec)
    _error(
        r"cannot read labels file '.*nothere.csv': no such file",
        spec,
        labels=str(tmp_path / "nothere.csv"),
    )
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b\x08\x00broken gzip")
    _error(
        r"cannot read labels file .*broken.gz': corrupt or unreadable",
        spec,
        labels=str(tmp_path / "broken.gz"),
    )
    (tmp_path / "other.txt").write_text("unrelated.JPEG 3\n")
    _error(r"names none of the 4 images in", spec, labels=str(tmp_path / "other.txt"))


# ---------------------------------------------------------------- the real data, when present

needs_real = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")


@pytest.mark.real_data
@needs_real
def test_real_tinyimagenet_with_model_class_index():
    folder = SHARED_DATA / "tinyimagenet_val"
    class_index = SHARED_DATA / "vit_tiny_tinyimagenet_ft" / "class_index.txt"
    samples = resolve_inputs([f"tinyimagenet:{folder}"], class_index=str(class_index))
    assert len(samples) == 10_000
    assert all(len(s.boxes) == 1 and s.label is not None for s in samples)
    assert len({s.key for s in samples}) == 10_000

    first = (folder / "val_annotations.txt").read_text().splitlines()[0].split("\t")
    assert first[0] == "val_0.JPEG"
    wnid = first[1]
    expected = {
        line.split("\t")[1]: int(line.split("\t")[0])
        for line in class_index.read_text().splitlines()
    }[wnid]
    val_0 = samples[0]
    assert Path(val_0.path).name == "val_0.JPEG" and val_0.key == "val_0"
    assert val_0.label == expected
    x0, y0, x1, y1 = map(float, first[2:])
    assert val_0.boxes == ((x0, y0, x1 + 1, y1 + 1),)

    # Without the class index, labels follow sorted wnids: a different order for this model.
    plain = resolve_inputs([f"tinyimagenet:{folder}"])
    wnids = sorted((folder / "wnids.txt").read_text().split())
    assert plain[0].label == wnids.index(wnid)
    assert [s.label for s in plain] != [s.label for s in samples]


@pytest.mark.real_data
@needs_real
def test_real_imagenet_val_1300():
    folder = SHARED_DATA / "imagenet_val_1300"
    samples = resolve_inputs([f"imagenet-val:{folder}"], labels=str(folder / "labels.csv"))
    assert len(samples) == 1300
    assert all(s.label is not None and 0 <= s.label < 1000 and s.label_name for s in samples)
    caffe = SHARED_DATA / "imagenet_meta" / "val_labels_caffe.txt.gz"
    if caffe.is_file():
        from_caffe = resolve_inputs([f"imagenet-val:{folder}"], labels=str(caffe))
        assert [s.label for s in from_caffe] == [s.label for s in samples]


@pytest.mark.real_data
@needs_real
def test_real_demo_images_folder():
    samples = resolve_inputs([str(SHARED_DATA / "demo_images")])
    names = _names(samples)
    assert len(samples) == 12
    assert "gradcam_dog_cat.jfif" in names
    assert "labels.csv" not in names and "README.md" not in names
