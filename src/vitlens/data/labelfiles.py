"""Reading the small text files that say which class an image is: class indexes and label lists."""

from __future__ import annotations

import csv
import gzip
import os
import posixpath
import re
import zlib
from dataclasses import dataclass, field

from vitlens.errors import InputError

__all__ = ["ClassIndex", "LabelTable", "read_class_index", "read_labels_file", "read_text_lines"]

_GZIP_MAGIC = b"\x1f\x8b"
_INDEXED_LINE = re.compile(r"^\s*\d+[\t ]+\S")


def read_text_lines(path: str, what: str) -> list[str]:
    """Read a UTF-8 text file (gzip-compressed or not) as a list of lines without line endings.

    Parameters
    ----------
    path : str
        The file. Compression is recognised from the content, not the name.
    what : str
        What the file is, for error messages (``"labels file"``).

    Raises
    ------
    InputError
        ``cannot read <what> '<path>': <reason>`` when it is missing, a folder, unreadable, or not
        UTF-8 text.
    """

    def fail(reason: str) -> InputError:
        return InputError(f"cannot read {what} '{path}': {reason}")

    if not os.path.exists(path):
        raise fail("no such file")
    if os.path.isdir(path):
        raise fail("is a directory, not a file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw.startswith(_GZIP_MAGIC):
            raw = gzip.decompress(raw)
        # utf-8-sig: files saved by spreadsheet programs often start with a byte-order mark.
        text = raw.decode("utf-8-sig")
    except PermissionError as exc:
        raise fail("permission denied") from exc
    except (OSError, EOFError, zlib.error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise fail(f"corrupt or unreadable ({reason.splitlines()[0]})") from exc
    except UnicodeDecodeError as exc:
        raise fail("not a UTF-8 text file") from exc
    return text.splitlines()


@dataclass(frozen=True)
class ClassIndex:
    """The model's class order, read from a ``--class-index`` file.

    Attributes
    ----------
    path : str
        The file it was read from.
    indices : dict of str to int
        Class key (wnid, class-folder name, CUB class name) -> output index of the model.
    names : dict of str to str
        Class key -> human-readable words, for keys whose line gave them.
    """

    path: str
    indices: dict[str, int]
    names: dict[str, str] = field(default_factory=dict)

    def label_of(self, key: str) -> int | None:
        """Model output index for a class key, or None when the model has no such class."""
        return self.indices.get(key)


def read_class_index(path: str) -> ClassIndex:
    """Read a class-index file.

    Two formats are accepted, recognised from the first non-blank line:

    - indexed: ``index<TAB>key[<TAB>words]`` per line (spaces also separate index and key), as in
      ``vit_tiny_tinyimagenet_ft/class_index.txt``; lines may come in any order;
    - plain: one class key per line, the index being the line's position among non-blank lines.

    Blank lines and lines starting with ``#`` are ignored.

    Raises
    ------
    InputError
        When the file cannot be read, is empty, has a malformed line, or lists an index or a class
        twice. The message names the file and the line number.
    """
    numbered = [
        (n, line.strip()) for n, line in enumerate(read_text_lines(path, "class-index file"), 1)
    ]
    entries = [(n, line) for n, line in numbered if line and not line.startswith("#")]
    if not entries:
        raise InputError(f"class-index file '{path}' is empty")

    indexed = bool(_INDEXED_LINE.match(entries[0][1]))
    indices: dict[str, int] = {}
    names: dict[str, str] = {}
    seen_index: set[int] = set()
    for position, (n, line) in enumerate(entries):
        if indexed:
            fields = line.split("\t") if "\t" in line else line.split(None, 2)
            fields = [f.strip() for f in fields]
            if len(fields) < 2 or not fields[0].isdigit() or not fields[1]:
                raise InputError(
                    f"class-index file '{path}' line {n}: expected 'index<TAB>class[<TAB>words]', "
                    f"got {line[:60]!r}"
                )
            index, key = int(fields[0]), fields[1]
            words = " ".join(f for f in fields[2:] if f)
        else:
            index, key, words = position, line, ""
        if index in seen_index:
            raise InputError(f"class-index file '{path}' line {n}: index {index} is listed twice")
        if key in indices:
            raise InputError(f"class-index file '{path}' line {n}: class '{key}' is listed twice")
        seen_index.add(index)
        indices[key] = index
        if words:
            names[key] = words
    return ClassIndex(path=path, indices=indices, names=names)


def _normalise(relative_path: str) -> str:
    """Compare paths written with either slash, with or without a leading ``./``."""
    return posixpath.normpath(relative_path.strip().replace("\\", "/"))


@dataclass(frozen=True)
class LabelTable:
    """True labels of image files, read from a ``--labels`` file.

    Attributes
    ----------
    path : str
        The file it was read from.
    by_path : dict of str to (int, str or None)
        Normalised file path as written in the file -> (label, class name).
    by_basename : dict of str to (int, str or None) or None
        File name alone -> (label, class name); None when two entries share a file name with
        different labels, so a name-only match would be a guess.
    """

    path: str
    by_path: dict[str, tuple[int, str | None]]
    by_basename: dict[str, tuple[int, str | None] | None]

    def lookup(self, relative_path: str, absolute_path: str) -> tuple[int, str | None] | None:
        """Label of an image: matched by path relative to its input root, then absolute path,
        then file name alone. None when the file is not listed."""
        for candidate in (relative_path, absolute_path):
            hit = self.by_path.get(_normalise(candidate))
            if hit is not None:
                return hit
        return self.by_basename.get(os.path.basename(absolute_path))


def read_labels_file(path: str) -> LabelTable:
    """Read a labels file mapping image files to class indices (gzip-compressed or not).

    Two formats are accepted:

    - CSV with a header that has ``file`` and ``label`` columns (and optionally ``class_name``),
      as in ``imagenet_val_1300/labels.csv``;
    - whitespace-separated ``filename index`` lines, as in ``val_labels_caffe.txt.gz``.

    A CSV is recognised by a comma in its first non-blank line.

    Raises
    ------
    InputError
        When the file cannot be read, is empty, lacks the needed columns, has a label that is not
        a non-negative integer, or gives one file two different labels.
    """
    lines = read_text_lines(path, "labels file")
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise InputError(f"labels file '{path}' is empty")
    rows = _csv_rows(path, lines) if "," in first else _whitespace_rows(path, lines)

    by_path: dict[str, tuple[int, str | None]] = {}
    by_basename: dict[str, tuple[int, str | None] | None] = {}
    for n, file, label_text, name in rows:
        if not label_text.isdigit():
            raise InputError(
                f"labels file '{path}' line {n}: label {label_text!r} is not a non-negative integer"
            )
        entry = (int(label_text), name or None)
        key = _normalise(file)
        if key in by_path and by_path[key][0] != entry[0]:
            raise InputError(f"labels file '{path}' line {n}: '{file}' already has another label")
        by_path[key] = entry
        base = posixpath.basename(key)
        if base in by_basename and (by_basename[base] is None or by_basename[base][0] != entry[0]):
            by_basename[base] = None
        else:
            by_basename[base] = entry
    return LabelTable(path=path, by_path=by_path, by_basename=by_basename)


def _csv_rows(path: str, lines: list[str]) -> list[tuple[int, str, str, str]]:
    """(line number, file, label text, class name) for each data row of a CSV labels file."""
    reader = csv.reader(lines)
    header_row = next((row for row in reader if any(cell.strip() for cell in row)), [])
    header = [h.strip().lower() for h in header_row]
    if "file" not in header or "label" not in header:
        raise InputError(
            f"labels file '{path}' is a CSV without 'file' and 'label' columns "
            f"(its header is {','.join(header)[:80]!r})"
        )
    i_file, i_label = header.index("file"), header.index("label")
    i_name = header.index("class_name") if "class_name" in header else None
    rows = []
    for row in reader:
        n = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(i_file, i_label):
            raise InputError(f"labels file '{path}' line {n}: too few columns")
        name = row[i_name].strip() if i_name is not None and i_name < len(row) else ""
        rows.append((n, row[i_file].strip(), row[i_label].strip(), name))
    return rows


def _whitespace_rows(path: str, lines: list[str]) -> list[tuple[int, str, str, str]]:
    """(line number, file, label text, "") for each ``filename index`` line."""
    rows = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # The index is the last field, so file names with spaces still work.
        fields = line.rsplit(None, 1)
        if len(fields) != 2:
            raise InputError(
                f"labels file '{path}' line {n}: expected 'filename label', got {line[:60]!r}"
            )
        rows.append((n, fields[0], fields[1], ""))
    return rows
