"""Small helpers shared by the dataset layouts: checking folders and reading record files."""

from __future__ import annotations

import os

from vitlens.data.labelfiles import read_text_lines
from vitlens.errors import InputError

__all__ = ["dataset_folder", "not_a_layout", "parse_floats", "parse_int", "read_records"]


def dataset_folder(path: str, spec: str) -> str:
    """Check that a dataset PATH is an existing folder and return it absolute."""
    if not path:
        raise InputError(f"'{spec}' names no folder: expected KIND:PATH")
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded):
        raise InputError(f"'{path}' does not exist (in '{spec}')")
    if not os.path.isdir(expanded):
        raise InputError(f"'{path}' is not a folder (in '{spec}')")
    return os.path.abspath(expanded)


def not_a_layout(path: str, layout: str, missing: str) -> InputError:
    """The error for a folder that lacks a file its dataset layout needs."""
    return InputError(f"'{path}' is not a {layout} folder: missing {missing}")


def read_records(path: str, what: str, fields: int) -> list[tuple[int, list[str]]]:
    """Split each non-blank line of a whitespace-separated record file into ``fields`` fields.

    The last field takes the rest of the line, so it may contain spaces (file paths, names).

    Returns
    -------
    list of (line number, fields)

    Raises
    ------
    InputError
        When the file cannot be read or a line has too few fields.
    """
    records = []
    for n, line in enumerate(read_text_lines(path, what), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(None, fields - 1)
        if len(parts) != fields:
            raise InputError(
                f"{what} '{path}' line {n}: expected {fields} fields, got {line[:60]!r}"
            )
        records.append((n, parts))
    return records


def parse_int(text: str, path: str, what: str, n: int) -> int:
    """An integer field of a record file, or an InputError naming the file and line."""
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{what} '{path}' line {n}: {text!r} is not an integer") from None


def parse_floats(texts: list[str], path: str, what: str, n: int) -> list[float]:
    """Number fields of a record file, or an InputError naming the file and line."""
    try:
        return [float(t) for t in texts]
    except ValueError:
        raise InputError(
            f"{what} '{path}' line {n}: expected numbers, got {' '.join(texts)!r}"
        ) from None
