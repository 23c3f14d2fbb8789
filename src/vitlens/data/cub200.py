"""The CUB-200-2011 layout (``cub200:PATH[:test|train]``).

The official archive unpacks to ``CUB_200_2011/`` holding::

    images.txt               <image_id> <relative path under images/>
    image_class_labels.txt   <image_id> <class_id>            (class ids 1..200)
    train_test_split.txt     <image_id> <is_training_image>   (1 = train, 0 = test)
    classes.txt              <class_id> <class name>          (e.g. 001.Black_footed_Albatross)
    bounding_boxes.txt       <image_id> <x> <y> <width> <height>   (optional here)
    images/<class name>/<file>.jpg

PATH may be that folder or the folder that contains it.
"""

from __future__ import annotations

import os
import re

from vitlens.data._layout import not_a_layout, parse_floats, parse_int, read_records
from vitlens.data.labelfiles import ClassIndex
from vitlens.data.listing import natural_key
from vitlens.data.samples import Box, Sample, make_key
from vitlens.errors import InputError

__all__ = ["SPLITS", "resolve_cub200"]

LAYOUT = "CUB-200-2011"
#: Accepted splits, the first being the default.
SPLITS = ("test", "train")
_REQUIRED = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def resolve_cub200(
    path: str, split: str | None, spec: str, class_index: ClassIndex | None
) -> list[Sample]:
    """Samples of one CUB-200-2011 split, with labels, class names and the bird's box.

    Parameters
    ----------
    path : str
        Absolute path of the ``CUB_200_2011`` folder or of its parent.
    split : {"test", "train"} or None
        None means ``"test"``.
    spec : str
        The input spec, stored in each sample's ``source``.
    class_index : ClassIndex or None
        The model's class order, keyed by the class names of ``classes.txt``
        (``001.Black_footed_Albatross``). Without it, label = class_id - 1.

    Returns
    -------
    list of Sample
        In image-id order. ``label_name`` is the readable class name (``"Black footed Albatross"``).
        Boxes ``x y width height`` become ``(x, y, x + width, y + height)``.
    """
    split = split or SPLITS[0]
    root = _find_root(path)
    images, labels, splits, classes = (_Table(root, name) for name in _REQUIRED)
    boxes_file = os.path.join(root, "bounding_boxes.txt")
    boxes = _read_boxes(boxes_file) if os.path.isfile(boxes_file) else {}

    class_names = {classes.integer_key(cid): classes.text(cid) for cid in classes.ids()}
    samples = []
    for image_id in sorted(images.ids(), key=natural_key):
        if (splits.integer(image_id) == 1) != (split == "train"):
            continue
        class_id = labels.integer(image_id)
        class_name = class_names.get(class_id)
        if class_name is None:
            raise InputError(
                f"'{labels.path}': class {class_id} of image {image_id} is not in classes.txt"
            )
        if class_index is not None:
            label = class_index.label_of(class_name)
            name = class_index.names.get(class_name) or _readable(class_name)
        else:
            label, name = class_id - 1, _readable(class_name)
        relpath = images.text(image_id)
        samples.append(
            Sample(
                path=os.path.join(root, "images", relpath),
                key=make_key(relpath),
                label=label,
                label_name=name,
                boxes=boxes.get(image_id, ()),
                source=spec,
            )
        )
    return samples


def _find_root(path: str) -> str:
    for candidate in (path, os.path.join(path, "CUB_200_2011")):
        if os.path.isfile(os.path.join(candidate, "images.txt")):
            return candidate
    raise not_a_layout(path, LAYOUT, "images.txt")


class _Table:
    """A two-column CUB record file (``<id> <value>``), keeping line numbers for error messages."""

    def __init__(self, root: str, name: str) -> None:
        self.path = os.path.join(root, name)
        if not os.path.isfile(self.path):
            raise not_a_layout(root, LAYOUT, name)
        self.what = f"{LAYOUT} {name}"
        self.rows = {
            key: (value.strip(), n)
            for n, (key, value) in read_records(self.path, self.what, fields=2)
        }

    def ids(self) -> list[str]:
        return list(self.rows)

    def text(self, key: str) -> str:
        return self._row(key)[0]

    def integer(self, key: str) -> int:
        value, n = self._row(key)
        return parse_int(value, self.path, self.what, n)

    def integer_key(self, key: str) -> int:
        return parse_int(key, self.path, self.what, self.rows[key][1])

    def _row(self, key: str) -> tuple[str, int]:
        try:
            return self.rows[key]
        except KeyError:
            raise InputError(f"'{self.path}' has no line for id {key}") from None


def _read_boxes(path: str) -> dict[str, tuple[Box, ...]]:
    what = f"{LAYOUT} bounding_boxes.txt"
    boxes = {}
    for n, (image_id, *numbers) in read_records(path, what, fields=5):
        x, y, width, height = parse_floats(numbers, path, what, n)
        boxes[image_id] = ((x, y, x + width, y + height),)
    return boxes


def _readable(class_name: str) -> str:
    """``001.Black_footed_Albatross`` -> ``Black footed Albatross``."""
    return re.sub(r"^\d+\.", "", class_name).replace("_", " ")
