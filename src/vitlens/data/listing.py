"""Listing image files in folders and glob patterns, in a stable, human-friendly order."""

from __future__ import annotations

import glob
import os
import re

from vitlens.data.images import has_image_extension

__all__ = ["glob_root", "is_hidden", "list_images", "match_glob", "natural_key", "path_sort_key"]

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[list[str | int], str]:
    """Sort key that orders ``img2`` before ``img10`` and ignores case; ties break on the raw text.

    ``re.split`` with a capturing group alternates text and digit runs starting with text, so
    two keys always compare str with str and int with int.
    """
    parts: list[str | int] = [int(t) if t.isdigit() else t.lower() for t in _DIGITS.split(text)]
    return parts, text


def path_sort_key(relative_path: str) -> tuple[tuple[list[str | int], str], ...]:
    """Natural sort key for a relative path, comparing folder by folder (so folders stay together).

    The file's extension is compared last, so that ``plane.png`` comes before ``plane2.png``.
    """
    *folders, name = re.split(r"[\\/]", relative_path)
    stem, ext = os.path.splitext(name)
    return (*(natural_key(f) for f in folders), natural_key(stem), natural_key(ext))


def is_hidden(name: str) -> bool:
    """Hidden files and folders (``.DS_Store``, ``.git``, macOS ``._photo.jpg`` copies) are skipped."""
    return name.startswith(".")


def list_images(folder: str) -> list[str]:
    """All image files under ``folder``, recursively, as absolute paths in natural path order.

    Hidden files and folders are skipped. Symbolic links to folders are followed (datasets are
    often linked in), each real folder at most once so that a link loop cannot hang the listing.
    """
    folder = os.path.abspath(folder)
    found: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        for name in filenames:
            if not is_hidden(name) and has_image_extension(name):
                found.append(os.path.join(dirpath, name))
    found.sort(key=lambda p: path_sort_key(os.path.relpath(p, folder)))
    return found


def match_glob(pattern: str) -> list[str]:
    """Image files matching a glob pattern (``**`` crosses folders), as absolute paths, sorted.

    Like the shell, wildcards do not match hidden names.
    """
    root = glob_root(pattern)
    matches = {
        os.path.abspath(p)
        for p in glob.glob(pattern, recursive=True)
        if has_image_extension(p) and os.path.isfile(p)
    }
    return sorted(matches, key=lambda p: path_sort_key(os.path.relpath(p, root)))


def glob_root(pattern: str) -> str:
    """The folder a glob pattern starts from: its leading components that have no wildcard."""
    head = pattern
    while glob.has_magic(head):
        head = os.path.dirname(head)
    return os.path.abspath(head or ".")
