"""Turning what the user typed (files, folders, globs, ``KIND:PATH`` datasets) into samples.

Resolving only lists files and reads the small annotation files: no image is opened here, so
that a corrupt image is reported (and skipped) by the run that tries to load it, not up front.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Sequence

from vitlens.data import cub200, hf, tinyimagenet
from vitlens.data._layout import dataset_folder
from vitlens.data.labelfiles import ClassIndex, LabelTable, read_class_index, read_labels_file
from vitlens.data.listing import glob_root, is_hidden, list_images, match_glob
from vitlens.data.samples import Sample, make_key, with_unique_keys
from vitlens.errors import InputError

__all__ = ["DATASET_KINDS", "resolve_inputs"]

# A dataset prefix is at least two characters, so that Windows drive letters ("C:\\x") are paths.
_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_-]+):(.*)$", re.DOTALL)


def resolve_inputs(
    specs: Sequence[str] | str,
    labels: str | None = None,
    class_index: str | None = None,
    limit: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> list[Sample]:
    """List the images named by the input specs, with whatever labels and boxes they come with.

    Parameters
    ----------
    specs : list of str
        Each one of:

        - an image file (any extension: the content decides when it is loaded);
        - a folder: its image files (by extension), recursively, hidden names skipped;
        - a glob pattern (``photos/*.jpg``, ``data/**/*.png``);
        - ``imagefolder:PATH``: one sub-folder per class (torchvision ImageFolder); labels are
          positions in the sorted folder names, or come from ``class_index``; ``label_name`` is
          the class words from ``class_index`` when it has them, else the folder name;
        - ``tinyimagenet:PATH[:val|train]``: TinyImageNet-200 (default ``val``), with boxes;
        - ``cub200:PATH[:test|train]``: CUB-200-2011 (default ``test``), with boxes;
        - ``imagenet-val:PATH``: the image files under PATH, labelled from ``labels``;
        - ``hf-dataset:PATH_OR_NAME[:split]``: one split of a Hugging Face dataset (a
          ``save_to_disk`` folder, a folder or file of parquet / arrow files, or a Hub name; default
          split ``validation``, else ``test``, else ``train``, else the only one), labelled from
          its ``ClassLabel`` column; needs ``pip install datasets`` (see :mod:`vitlens.data.hf`).

        A spec that exists on disk is always a file or folder, even if it contains ``:``.
    labels : str, optional
        Labels file for ``imagenet-val`` (required there): a CSV with ``file`` and ``label``
        columns (optional ``class_name``), or ``filename index`` lines; may be gzip-compressed.
        Files are matched by path relative to the input, then by file name. Also applied to plain
        files, folders and globs when given.
    class_index : str, optional
        The model's class order: ``index<TAB>class[<TAB>words]`` lines, or one class per line.
        Used by ``imagefolder`` (folder names), ``tinyimagenet`` (wnids), ``cub200`` (class
        names) and ``hf-dataset`` (``ClassLabel`` names). A class the model does not have gives
        label None.
    limit : int, optional
        Keep only the first ``limit`` samples.
    image_column, label_column : str, optional
        For ``hf-dataset`` inputs (ignored by the others): the column holding the images (default:
        the one ``datasets.Image`` column) and the labels (default: the one ``ClassLabel`` column,
        else an integer column ``label`` or ``labels``).

    Returns
    -------
    list of Sample
        In spec order, each spec's samples in natural path order (``img2`` before ``img10``) or
        the dataset's own order; an image listed twice is kept once; keys are unique.

    Raises
    ------
    InputError
        One line naming the spec, folder or file: a path that does not exist, a folder or glob
        without images, an unknown ``KIND:``, a dataset folder missing a file of its layout, an
        unreadable or malformed labels or class-index file, ``imagenet-val`` without ``labels``;
        for ``hf-dataset``, see :func:`vitlens.data.hf.resolve_hf_dataset`.
    """
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise InputError("no input given: name at least one image, folder, glob or dataset")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive whole number, got {limit!r}")

    class_map = read_class_index(class_index) if class_index else None
    label_table = read_labels_file(labels) if labels else None

    samples: list[Sample] = []
    seen_paths: set[str] = set()
    columns = {"image_column": image_column, "label_column": label_column}
    for spec in specs:
        for sample in _resolve_spec(str(spec), label_table, class_map, columns):
            if sample.path not in seen_paths:
                seen_paths.add(sample.path)
                samples.append(sample)

    # Keys are made unique over the full list so that ``limit`` never changes a sample's key.
    samples = with_unique_keys(samples)
    return samples[:limit] if limit is not None else samples


def _resolve_spec(
    spec: str, label_table: LabelTable | None, class_map: ClassIndex | None, columns: dict | None = None
) -> list[Sample]:
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        return _resolve_path(spec, path, label_table)

    match = _PREFIX.match(spec)
    kind = match.group(1).lower() if match else None
    if kind in DATASET_KINDS:
        resolver, splits = DATASET_KINDS[kind]
        if splits is None:  # the resolver reads PATH_OR_NAME[:split] itself
            samples = resolver(match.group(2), None, spec, label_table, class_map, **(columns or {}))
        else:
            rest, split = _split_off(match.group(2), kind, splits, spec)
            samples = resolver(dataset_folder(rest, spec), split, spec, label_table, class_map)
        if not samples:
            raise InputError(f"no images found in '{spec}'")
        return samples

    if glob.has_magic(spec):
        files = match_glob(path)
        if not files:
            raise InputError(f"no images match '{spec}'")
        root = glob_root(path)
        return [_plain_sample(f, root, spec, label_table) for f in files]

    if kind is not None:
        known = ", ".join(DATASET_KINDS)
        raise InputError(
            f"'{spec}' does not exist, and '{match.group(1)}' is not a dataset kind (known: {known})"
        )
    raise InputError(f"'{spec}' does not exist")


def _resolve_path(spec: str, path: str, label_table: LabelTable | None) -> list[Sample]:
    """A plain file or folder."""
    if os.path.isdir(path):
        files = list_images(path)
        if not files:
            raise InputError(f"no images found in '{spec}'")
        root = os.path.abspath(path)
    else:
        # An explicitly named file is taken whatever its extension; loading decides if it is an image.
        files = [os.path.abspath(path)]
        root = os.path.dirname(files[0])
    return [_plain_sample(f, root, spec, label_table) for f in files]


def _plain_sample(path: str, root: str, spec: str, label_table: LabelTable | None) -> Sample:
    relative = os.path.relpath(path, root)
    hit = label_table.lookup(relative, path) if label_table is not None else None
    return Sample(
        path=path,
        key=make_key(relative),
        label=hit[0] if hit else None,
        label_name=hit[1] if hit else None,
        source=spec,
    )


def _split_off(rest: str, kind: str, splits: tuple[str, ...], spec: str) -> tuple[str, str | None]:
    """Separate an optional ``:split`` suffix from a dataset PATH (which may itself contain ``:``)."""
    if not splits or os.path.exists(os.path.expanduser(rest)) or ":" not in rest:
        return rest, None
    head, tail = rest.rsplit(":", 1)
    if tail.lower() in splits:
        return head, tail.lower()
    if os.path.exists(os.path.expanduser(head)):
        raise InputError(
            f"unknown {kind} split '{tail}' in '{spec}' (expected {' or '.join(splits)})"
        )
    return rest, None


def _resolve_imagefolder(
    root: str,
    split: str | None,
    spec: str,
    label_table: LabelTable | None,
    class_map: ClassIndex | None,
) -> list[Sample]:
    """One sub-folder per class, like ``torchvision.datasets.ImageFolder``."""
    classes = sorted(
        name for name in os.listdir(root)
        if not is_hidden(name) and os.path.isdir(os.path.join(root, name))
    )  # fmt: skip
    if not classes:
        raise InputError(f"'{root}' is not an image folder dataset: it has no class sub-folders")
    if class_map is not None:
        label_of: Callable[[str], int | None] = class_map.label_of
    else:
        order = {name: i for i, name in enumerate(classes)}
        label_of = order.get

    samples = []
    for name in classes:
        label_name = (class_map.names.get(name) if class_map is not None else None) or name
        for path in list_images(os.path.join(root, name)):
            samples.append(
                Sample(
                    path=path,
                    key=make_key(os.path.relpath(path, root)),
                    label=label_of(name),
                    label_name=label_name,
                    source=spec,
                )
            )
    if not samples:
        raise InputError(f"no images found in '{root}'")
    return samples


def _resolve_imagenet_val(
    root: str,
    split: str | None,
    spec: str,
    label_table: LabelTable | None,
    class_map: ClassIndex | None,
) -> list[Sample]:
    """The image files under a folder, labelled from a labels file (ImageNet validation style)."""
    if label_table is None:
        raise InputError(f"'{spec}' needs a labels file (labels=FILE, --labels FILE)")
    files = list_images(root)
    if not files:
        raise InputError(f"no images found in '{root}'")
    # Keys relative to the deepest common folder: "ILSVRC2012_val_00000347", not "images__...".
    key_root = os.path.commonpath([os.path.dirname(f) for f in files])
    samples = []
    for path in files:
        hit = label_table.lookup(os.path.relpath(path, root), path)
        samples.append(
            Sample(
                path=path,
                key=make_key(os.path.relpath(path, key_root)),
                label=hit[0] if hit else None,
                label_name=hit[1] if hit else None,
                source=spec,
            )
        )
    if all(s.label is None for s in samples):
        raise InputError(
            f"labels file '{label_table.path}' names none of the {len(files)} images in '{root}'"
        )
    return samples


def _resolve_tinyimagenet(
    root: str,
    split: str | None,
    spec: str,
    label_table: LabelTable | None,
    class_map: ClassIndex | None,
) -> list[Sample]:
    return tinyimagenet.resolve_tinyimagenet(root, split, spec, class_map)


def _resolve_cub200(
    root: str,
    split: str | None,
    spec: str,
    label_table: LabelTable | None,
    class_map: ClassIndex | None,
) -> list[Sample]:
    return cub200.resolve_cub200(root, split, spec, class_map)


def _resolve_hf_dataset(
    rest: str,
    split: str | None,
    spec: str,
    label_table: LabelTable | None,
    class_map: ClassIndex | None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> list[Sample]:
    return hf.resolve_hf_dataset(rest, spec, class_map, image_column=image_column, label_column=label_column)


#: ``KIND`` -> (resolver, accepted splits with the default first). Splits None: the dataset's splits
#: are only known once it is opened, so the resolver gets ``PATH[:split]`` as written (no folder
#: check) and the ``image_column`` / ``label_column`` options.
DATASET_KINDS: dict[str, tuple[Callable[..., list[Sample]], tuple[str, ...] | None]] = {
    "imagefolder": (_resolve_imagefolder, ()),
    "tinyimagenet": (_resolve_tinyimagenet, tinyimagenet.SPLITS),
    "cub200": (_resolve_cub200, cub200.SPLITS),
    "imagenet-val": (_resolve_imagenet_val, ()),
    hf.KIND: (_resolve_hf_dataset, None),
}
