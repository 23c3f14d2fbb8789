"""The TinyImageNet-200 layout (``tinyimagenet:PATH[:val|train]``).

The official archive unpacks to::

    tiny-imagenet-200/
        wnids.txt                      200 wnids, one per line (not sorted)
        words.txt                      wnid<TAB>words, for these and possibly many more wnids
        val/val_annotations.txt        file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1
        val/images/val_0.JPEG ...
        train/<wnid>/<wnid>_boxes.txt  file<TAB>x0<TAB>y0<TAB>x1<TAB>y1
        train/<wnid>/images/<wnid>_0.JPEG ...

PATH may be that root, or a folder holding ``val_annotations.txt`` and ``images/`` directly (the
``val/`` folder itself, or a copy of it with ``wnids.txt``/``words.txt`` beside it).

Boxes in the annotation files are inclusive pixel corners (``0 0 63 63`` is the whole 64x64
image); they are converted to the edge convention of :class:`~vitlens.data.Sample` by adding 1 to
``x1`` and ``y1``, which also keeps the one-pixel-wide boxes of the real data from having zero area.
"""

from __future__ import annotations

import os

from vitlens.data._layout import not_a_layout, parse_floats, read_records
from vitlens.data.labelfiles import ClassIndex, read_text_lines
from vitlens.data.listing import is_hidden, list_images, natural_key
from vitlens.data.samples import Box, Sample, make_key

__all__ = ["SPLITS", "resolve_tinyimagenet"]

LAYOUT = "TinyImageNet-200"
#: Accepted splits, the first being the default (the test split has no labels).
SPLITS = ("val", "train")


def resolve_tinyimagenet(
    root: str, split: str | None, spec: str, class_index: ClassIndex | None
) -> list[Sample]:
    """Samples of one TinyImageNet-200 split, with labels, class words and boxes.

    Parameters
    ----------
    root : str
        Absolute path of the dataset folder (see the module docstring for the accepted layouts).
    split : {"val", "train"} or None
        None means ``"val"``.
    spec : str
        The input spec, stored in each sample's ``source``.
    class_index : ClassIndex or None
        The model's class order. Without it, labels are positions in the sorted ``wnids.txt``.
        Images whose wnid the model does not know get label None.

    Returns
    -------
    list of Sample
        In natural file-name order (``val_2`` before ``val_10``); train samples grouped by wnid.

    Notes
    -----
    ``label_name`` is the full words line of the wnid (``"goldfish, Carassius auratus"``), taken
    from the class-index file when it has words, else from ``words.txt``, else the wnid itself.
    """
    split = split or SPLITS[0]
    flat_val = os.path.isfile(os.path.join(root, "val_annotations.txt")) and os.path.isdir(
        os.path.join(root, "images")
    )
    # In the flat (val-folder) form the class lists may sit beside it or one level up.
    meta_dirs = [root, os.path.dirname(root)] if flat_val else [root]
    meta_dir = next((d for d in meta_dirs if os.path.isfile(os.path.join(d, "wnids.txt"))), None)
    if meta_dir is None:
        raise not_a_layout(root, LAYOUT, "wnids.txt")

    wnids = _read_wnids(os.path.join(meta_dir, "wnids.txt"))
    words = _read_words(os.path.join(meta_dir, "words.txt"), wanted=set(wnids))
    if class_index is not None:
        order = class_index.indices
        words = {**words, **class_index.names}
    else:
        order = {wnid: i for i, wnid in enumerate(sorted(wnids))}

    def make(path: str, key_path: str, wnid: str, boxes: tuple[Box, ...]) -> Sample:
        return Sample(
            path=path,
            key=make_key(key_path),
            label=order.get(wnid),
            label_name=words.get(wnid, wnid),
            boxes=boxes,
            source=spec,
        )

    if split == "val":
        val_dir = root if flat_val else os.path.join(root, "val")
        return [make(*args) for args in _val_records(root, val_dir, flat_val)]
    return [make(*args) for args in _train_records(root)]


def _read_wnids(path: str) -> list[str]:
    wnids = [line.strip() for line in read_text_lines(path, f"{LAYOUT} wnids.txt")]
    return [w for w in wnids if w]


def _read_words(path: str, wanted: set[str]) -> dict[str, str]:
    """wnid -> words line from ``words.txt``; empty when the file is absent (names fall back to wnids).

    The official ``words.txt`` covers all 82k WordNet ids: keep only the ones the dataset uses.
    """
    if not os.path.isfile(path):
        return {}
    words = {}
    for _n, (wnid, text) in read_records(path, f"{LAYOUT} words.txt", fields=2):
        if wnid in wanted:
            words[wnid] = text.strip()
    return words


def _val_records(
    root: str, val_dir: str, flat: bool
) -> list[tuple[str, str, str, tuple[Box, ...]]]:
    """(image path, key path, wnid, boxes) for each line of ``val_annotations.txt``."""
    where = "" if flat else "val/"
    annotations = os.path.join(val_dir, "val_annotations.txt")
    if not os.path.isfile(annotations):
        raise not_a_layout(root, LAYOUT, f"{where}val_annotations.txt")
    images_dir = os.path.join(val_dir, "images")
    if not os.path.isdir(images_dir):
        raise not_a_layout(root, LAYOUT, f"{where}images/")

    what = f"{LAYOUT} annotations file"
    records = []
    for n, (file, wnid, *corners) in read_records(annotations, what, fields=6):
        box = _inclusive_to_edges(parse_floats(corners, annotations, what, n))
        # Files that are listed but absent are kept: loading reports them, like corrupt files.
        records.append((os.path.join(images_dir, file), file, wnid, (box,)))
    records.sort(key=lambda r: natural_key(r[1]))
    return records


def _train_records(root: str) -> list[tuple[str, str, str, tuple[Box, ...]]]:
    """(image path, key path, wnid, boxes) for each image under ``train/<wnid>/``."""
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise not_a_layout(root, LAYOUT, "train/")
    records = []
    class_dirs = sorted(
        d for d in os.listdir(train_dir)
        if not is_hidden(d) and os.path.isdir(os.path.join(train_dir, d))
    )  # fmt: skip
    for wnid in class_dirs:
        class_dir = os.path.join(train_dir, wnid)
        boxes = _read_train_boxes(os.path.join(class_dir, f"{wnid}_boxes.txt"))
        images_dir = os.path.join(class_dir, "images")
        for path in list_images(images_dir if os.path.isdir(images_dir) else class_dir):
            name = os.path.basename(path)
            box = boxes.get(name)
            records.append((path, f"{wnid}/{name}", wnid, (box,) if box else ()))
    return records


def _read_train_boxes(path: str) -> dict[str, Box]:
    """File name -> box from a ``<wnid>_boxes.txt``; empty when the file is absent."""
    if not os.path.isfile(path):
        return {}
    what = f"{LAYOUT} boxes file"
    return {
        file: _inclusive_to_edges(parse_floats(corners, path, what, n))
        for n, (file, *corners) in read_records(path, what, fields=5)
    }


def _inclusive_to_edges(corners: list[float]) -> Box:
    x0, y0, x1, y1 = corners
    return (x0, y0, x1 + 1.0, y1 + 1.0)
