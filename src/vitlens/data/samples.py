"""One image to explain, with what is known about it, and the keys that name its output files."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

__all__ = ["Box", "Sample", "make_key", "with_unique_keys"]

#: An object box ``(x0, y0, x1, y1)``.
Box = tuple[float, float, float, float]

# Longest key kept verbatim, in UTF-8 bytes; longer ones are cut and made unique with a hash, because
# output files are named ``<key>__<class>.png`` and most file systems stop at 255 bytes per name.
_MAX_KEY_BYTES = 120

# Letters and digits of every script are kept (``\w`` is Unicode-aware): only characters that file
# systems or shells treat specially become ``_``.
_UNSAFE = re.compile(r"[^\w.-]+")
# Names Windows refuses for files whatever the extension.
_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


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
        without extension, folders joined by ``__``, letters and digits of any script, ``.``, ``_``
        and ``-`` (see :func:`make_key`).
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
    """Turn a path relative to an input root into a file-name-safe key that depends on nothing else.

    Parameters
    ----------
    relative_path : str
        For example ``"cats/img_01.JPEG"``.

    Returns
    -------
    str
        For example ``"cats__img_01"``: extension dropped, folders joined by ``__``, letters and digits
        of any script kept (Unicode NFC), every run of other characters than letters, digits, ``.``,
        ``_`` and ``-`` replaced by ``_``. Where that loses information (``"café 猫.jpg"`` ->
        ``"café_猫-<hash>"``), or the name starts with a dot, is a reserved Windows device name or is
        longer than 120 UTF-8 bytes, an 8-digit hash of the whole relative path is appended, so that
        two names never share a key because of what was replaced. Never empty, never hidden.
    """
    relative_path = unicodedata.normalize("NFC", relative_path.replace("\\", "/"))
    stem, _ = os.path.splitext(relative_path)
    parts = [p for p in stem.split("/") if p not in ("", ".")]
    verbatim = "__".join(parts)
    key = "__".join(_UNSAFE.sub("_", p) for p in parts)
    key = re.sub(r"^\.+", lambda m: "_" * len(m.group()), key)
    if not key:
        key = "image"
    if key.split(".")[0].upper() in _RESERVED:
        key = f"{key}_"
    encoded = key.encode("utf-8")
    if len(encoded) > _MAX_KEY_BYTES:
        # cut at a character boundary: a key is a file name, it must stay valid UTF-8
        key = encoded[: _MAX_KEY_BYTES - 9].decode("utf-8", errors="ignore")
        return f"{key}-{_digest(relative_path)}"
    return key if key == verbatim else f"{key}-{_digest(relative_path)}"


def with_unique_keys(samples: Iterable[Sample]) -> list[Sample]:
    """Make every key unique without numbering: keys that clash get a hash of their own file.

    Keys are compared case-insensitively because output folders may live on a case-insensitive file
    system. :func:`make_key` already gives names that lost characters a hash of their path, so only
    inputs with the same name up to the extension or the case (``a.jpg`` and ``a.png``, ``A.jpg`` and
    ``a.jpg``) or the same relative path under two roots clash. Each of them gets ``-<hash>`` of its
    file name, or of its whole path where another sample of the clash has the same file name (compared
    case-insensitively): which other files are listed never changes the suffix of one that clashes. The
    same list always gets the same keys; call this on the full list before applying a ``limit`` so that
    keys do not depend on it.
    """
    samples = list(samples)
    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(sample.key.lower(), []).append(index)
    keys = [s.key for s in samples]
    for members in groups.values():
        if len(members) < 2:
            continue
        names = [os.path.basename(samples[i].path) for i in members]
        folded = [n.lower() for n in names]
        for i, name, low in zip(members, names, folded):
            keys[i] = f"{samples[i].key}-{_digest(name if folded.count(low) == 1 else samples[i].path)}"
    taken: set[str] = set()
    result = []
    for sample, key in zip(samples, keys):
        # a hash that meets another sample's own key (vanishingly rare): the full path decides
        if key.lower() in taken:
            key = f"{key}-{_digest(sample.path)}"
        taken.add(key.lower())
        result.append(sample if key == sample.key else replace(sample, key=key))
    return result
