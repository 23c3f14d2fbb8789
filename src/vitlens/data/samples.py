"""One image to explain, with what is known about it, and the keys that name its output files."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

__all__ = ["Box", "Sample", "make_key", "with_unique_keys"]

#: An object box ``(x0, y0, x1, y1)``.
Box = tuple[float, float, float, float]

# Longest key kept verbatim; longer ones are cut and made unique with a hash, because output
# files are named ``<key>_<method>.png`` and most file systems stop at 255 bytes per name.
_MAX_KEY_LENGTH = 120

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Names Windows refuses for files whatever the extension.
_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)


@dataclass(frozen=True)
class Sample:
    """An image to explain.

    Attributes
    ----------
    path : str
        Absolute path of the image file, or for a row of a Hugging Face dataset
        ``hf-dataset:<source>:<split>#<row>`` (not opened yet: see :func:`vitlens.data.load_sample`).
    key : str
        Unique id within one run, used to name output files: the path relative to its input root,
        without extension, folders joined by ``__``, only ``[A-Za-z0-9._-]`` characters.
    label : int or None
        True class as an index into the MODEL's outputs, or None when unknown.
    label_name : str or None
        Human-readable name of the true class, when the input says it.
    boxes : tuple of (x0, y0, x1, y1)
        Object boxes in pixel coordinates of the ORIGINAL image (before any resize or crop),
        as edges: ``(0, 0, width, height)`` covers the whole image, and the box covers pixel
        columns ``x0 <= x < x1``. Empty when the input has no boxes.
    source : str
        The input spec this sample came from, as the user wrote it.
    """

    path: str
    key: str
    label: int | None = None
    label_name: str | None = None
    boxes: tuple[Box, ...] = field(default=())
    source: str = ""

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples of floats, so samples stay hashable and
        # compare equal whatever container the boxes came in.
        boxes = tuple(_as_box(b) for b in self.boxes)
        object.__setattr__(self, "boxes", boxes)


def _as_box(values: Sequence[float]) -> Box:
    if len(values) != 4:
        raise ValueError(f"a box needs 4 numbers (x0, y0, x1, y1), got {len(values)}")
    x0, y0, x1, y1 = (float(v) for v in values)
    return (x0, y0, x1, y1)


def make_key(relative_path: str) -> str:
    """Turn a path relative to an input root into a file-name-safe key.

    Parameters
    ----------
    relative_path : str
        For example ``"cats/img 01.JPEG"``.

    Returns
    -------
    str
        For example ``"cats__img_01"``: extension dropped, folders joined by ``__``, each run of
        other characters than letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``. Never empty,
        never starting with a dot (hidden file), never a reserved Windows device name.
    """
    stem, _ = os.path.splitext(relative_path.replace("\\", "/"))
    parts = [p for p in stem.split("/") if p not in ("", ".")]
    key = "__".join(_UNSAFE.sub("_", p) for p in parts)
    key = re.sub(r"^\.+", lambda m: "_" * len(m.group()), key)
    if not key:
        key = "image"
    if key.split(".")[0].upper() in _RESERVED:
        key = f"{key}_"
    if len(key) > _MAX_KEY_LENGTH:
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
        key = f"{key[: _MAX_KEY_LENGTH - 9]}-{digest}"
    return key


def with_unique_keys(samples: Iterable[Sample]) -> list[Sample]:
    """Make every key unique, keeping the first of each clash and numbering the others.

    The second sample whose key is ``"a"`` becomes ``"a-2"``, the third ``"a-3"``, skipping any
    suffix that another sample already has as its own key. Keys are compared case-insensitively
    because output folders may live on a case-insensitive file system. The same list always gets
    the same keys; call this on the full list before applying a ``limit`` so that keys do not
    depend on it.
    """
    samples = list(samples)
    taken_by_someone = {s.key.lower() for s in samples}
    used: set[str] = set()
    result = []
    for sample in samples:
        key = sample.key
        if key.lower() in used:
            n = 2
            while f"{key}-{n}".lower() in used or f"{key}-{n}".lower() in taken_by_someone:
                n += 1
            key = f"{key}-{n}"
            sample = replace(sample, key=key)
        used.add(key.lower())
        result.append(sample)
    return result
