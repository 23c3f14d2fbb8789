"""Hugging Face datasets as input: ``hf-dataset:PATH_OR_NAME[:split]``.

PATH_OR_NAME is, in this order:

- a folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``: ``state.json`` or
  ``dataset_dict.json`` inside), read with ``datasets.load_from_disk``;
- a local folder or file of ``.parquet`` (else ``.arrow``) files, read with
  ``load_dataset("parquet" | "arrow", data_files=...)``; the splits are found from the file and
  folder names as ``datasets`` itself does (``data/validation-00000-of-00001.parquet``, ...), and
  only the chosen split's files are read;
- otherwise a dataset on the Hugging Face Hub, ``load_dataset(NAME, split=...)``.

The split defaults to ``validation``, else ``test``, else ``train``, else the only one.

Resolving reads the features and the label column, never an image: each :class:`Sample` gets a
``path`` that names its row, ``hf-dataset:<absolute path or hub name>:<split>#<row>`` (plus
``@<column>`` when the image column was named and is not the one found by itself), stable across
runs, and :func:`load_hf_sample` decodes that row's image when the run needs it, through
:func:`vitlens.data.images.decode_image` like any image file. The ``datasets`` library is imported
only here, and only when such an input is used (``pip install datasets``, or ``vitlens[hf]``).
"""

from __future__ import annotations

import io
import os
import re
import threading

from PIL import Image

from vitlens.data.images import decode_image
from vitlens.data.labelfiles import ClassIndex
from vitlens.data.samples import Sample, make_key
from vitlens.errors import InputError, one_line

__all__ = ["KIND", "PATH_PREFIX", "load_hf_sample", "resolve_hf_dataset"]

KIND = "hf-dataset"
#: How every hf-dataset sample's ``path`` starts (file samples have absolute paths).
PATH_PREFIX = f"{KIND}:"

#: Default splits, in order of preference.
DEFAULT_SPLITS = ("validation", "test", "train")
#: Column names taken as labels when no column is a ``ClassLabel``.
LABEL_NAMES = ("label", "labels")

# A split name (``datasets`` asks for ``\w+(\.\w+)*``; saved folders may hold others), and a Hub
# dataset id (``NAME`` or ``ORG/NAME``).
_SPLIT = re.compile(r"[\w.-]+")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?")
_SAMPLE_PATH = re.compile(
    rf"{re.escape(PATH_PREFIX)}(?P<where>.+):(?P<split>{_SPLIT.pattern})#(?P<row>\d+)(?:@(?P<column>[^#]*))?",
    re.DOTALL,
)

# (where, split, named image column or None) -> (that split with only its image column, undecoded;
# the column's name). Filled by resolution and by the first decoding in a process.
_OPENED: dict = {}
_LOCK = threading.Lock()


def resolve_hf_dataset(
    rest: str,
    spec: str,
    class_map: ClassIndex | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> list[Sample]:
    """The samples of one split of a Hugging Face dataset, without decoding any image.

    Parameters
    ----------
    rest : str
        What follows ``hf-dataset:`` in the spec: ``PATH_OR_NAME[:split]``.
    spec : str
        The input spec, stored in each sample's ``source`` and named by errors.
    class_map : ClassIndex, optional
        The model's class order, keyed by the dataset's ``ClassLabel`` names; a name the model does
        not have gives label None. Without it, labels are the dataset's own integers.
    image_column, label_column : str, optional
        The columns to read. By default the one ``datasets.Image`` column, and the one
        ``ClassLabel`` column (else a column ``label`` or ``labels`` of integers; else no labels).

    Returns
    -------
    list of Sample
        In the dataset's row order; keys ``<split>_<row>`` (row zero-padded to the split's length),
        labels from the label column (``-1``, the Hub's "no label", gives None), ``label_name``
        from the ``ClassLabel`` names, no boxes.

    Raises
    ------
    InputError
        One line: ``datasets`` not installed, a path that does not exist or is not a dataset, an
        unknown split, a named column the split does not have, no or several image (label)
        columns where none is named, or what ``datasets`` says when the dataset cannot be loaded.
    """
    where, split, local = _split_spec(rest, spec)
    _import_datasets()
    dataset, split = _open_split(where, split, local, spec)
    features = dataset.features
    auto = _find_image_column(features, None, spec, quiet=True)
    column = _find_image_column(features, image_column, spec)
    named = column if column != auto else None
    label = _find_label_column(features, label_column, spec)
    with _LOCK:
        _OPENED[(where, split, named)] = _undecoded(dataset, column)

    labels: list = [None] * len(dataset)
    names = None
    if label is not None:
        labels = dataset.select_columns([label]).to_dict()[label]
        names = getattr(features[label], "names", None)

    width = len(str(max(len(dataset) - 1, 0)))
    suffix = f"@{named}" if named is not None else ""
    prefix = make_key(split)
    samples = []
    for row, value in enumerate(labels):
        value = None if value is None or value < 0 else int(value)
        name = names[value] if names is not None and value is not None and value < len(names) else None
        if class_map is not None and name is not None:
            value, name = class_map.label_of(name), class_map.names.get(name) or name
        samples.append(
            Sample(
                path=f"{PATH_PREFIX}{where}:{split}#{row}{suffix}",
                key=f"{prefix}_{row:0{width}d}",
                label=value,
                label_name=name,
                source=spec,
            )
        )
    return samples


def load_hf_sample(path: str, reduce=None) -> Image.Image:
    """Decode the image of the dataset row a sample's ``path`` names (see the module docstring).

    The split is opened once per process (thread-safe) and kept; the row's encoded image is
    decoded by :func:`vitlens.data.images.decode_image`, so EXIF orientation, transparency,
    16-bit data and ``reduce`` are handled exactly as for an image file.

    Raises
    ------
    InputError
        One line naming the sample (``cannot read image '<path>': <reason>``) when the row has no
        image or its image cannot be decoded; the errors of :func:`resolve_hf_dataset` when the
        dataset can no longer be opened.
    """
    match = _SAMPLE_PATH.fullmatch(path)
    if match is None:
        raise InputError(f"'{path}' is not an hf-dataset sample (expected {PATH_PREFIX}WHERE:SPLIT#ROW)")
    where, split, named = match.group("where"), match.group("split"), match.group("column")
    row = int(match.group("row"))

    def fail(reason: str) -> InputError:
        return InputError(f"cannot read image '{path}': {reason}")

    key = (where, split, named)
    with _LOCK:
        if key not in _OPENED:
            _import_datasets()
            dataset, _ = _open_split(where, split, not _is_hub_name(where) or os.path.exists(where), path)
            _OPENED[key] = _undecoded(dataset, _find_image_column(dataset.features, named, path))
        dataset, column = _OPENED[key]
    if row >= len(dataset):
        raise fail(f"the split has no row {row} (it has {len(dataset)})")
    image = dataset[row][column]
    data = image.get("bytes") if image else None
    if data:
        return decode_image(io.BytesIO(data), path, reduce=reduce)
    file = image.get("path") if image else None
    if file and os.path.isabs(file) and os.path.isfile(file):  # an image stored as a local file's path
        return decode_image(file, path, reduce=reduce)
    raise fail("the row has no image")


# ---------------------------------------------------------------------------------------- opening
def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise InputError("hf-dataset inputs need the Hugging Face datasets library: pip install datasets") from None
    return datasets


def _is_hub_name(text: str) -> bool:
    return _HUB_NAME.fullmatch(text) is not None


def _split_spec(rest: str, spec: str) -> tuple[str, str | None, bool]:
    """``PATH_OR_NAME[:split]`` -> (absolute path or hub name, split or None, whether it is local)."""
    if not rest:
        raise InputError(f"'{spec}' names no dataset: expected {KIND}:PATH_OR_NAME[:split]")
    expanded = os.path.expanduser(rest)
    if os.path.exists(expanded):
        return os.path.abspath(expanded), None, True
    head, colon, tail = rest.rpartition(":")
    if colon and head and _SPLIT.fullmatch(tail):
        if os.path.exists(os.path.expanduser(head)):
            return os.path.abspath(os.path.expanduser(head)), tail, True
        if _is_hub_name(head):
            return head, tail, False
        rest = head
    elif _is_hub_name(rest):
        return rest, None, False
    raise InputError(f"'{rest}' does not exist (in '{spec}')")


def _open_split(where: str, split: str | None, local: bool, spec: str):
    """Open one split of the dataset (memory-mapped, nothing decoded) -> (Dataset, split name)."""
    import datasets

    if local and not os.path.exists(where):
        raise InputError(f"'{where}' does not exist (in '{spec}')")
    try:
        if not local:
            if split is None:  # a named split is checked by load_dataset itself, which lists the splits
                split = _choose_split(list(datasets.get_dataset_split_names(where)), split, spec)
            return datasets.load_dataset(where, split=split), split
        if os.path.isdir(where) and any(
            os.path.isfile(os.path.join(where, name)) for name in ("dataset_dict.json", "state.json")
        ):
            loaded = datasets.load_from_disk(where)
            if isinstance(loaded, datasets.DatasetDict):
                split = _choose_split(list(loaded), split, spec)
                return loaded[split], split
            own = _saved_split_name(where, loaded)
            return loaded, _choose_split([own], split, spec)
        builder, files = _data_files(where)
        if not files:
            raise InputError(
                f"'{spec}' is not a Hugging Face dataset: no save_to_disk folder (dataset_dict.json, "
                f"state.json) and no .parquet or .arrow files"
            )
        split = _choose_split(list(files), split, spec)
        return datasets.load_dataset(builder, data_files={split: files[split]}, split=split), split
    except InputError:
        raise
    except Exception as exc:  # what datasets raises for a broken folder, an unknown or unreachable hub name
        raise InputError(f"cannot load '{spec}': {one_line(exc)}") from exc


def _saved_split_name(where: str, dataset) -> str:
    """The split a single saved Dataset is: its own, the folder's name inside a saved DatasetDict, else train."""
    if dataset.split:
        return str(dataset.split)
    parent = os.path.dirname(where)
    if os.path.isfile(os.path.join(parent, "dataset_dict.json")) and _SPLIT.fullmatch(os.path.basename(where)):
        return os.path.basename(where)
    return "train"


def _data_files(where: str) -> tuple[str, dict[str, list[str]]]:
    """The parquet (else arrow) files of a folder or one file, by split as ``datasets`` names them."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    folder = where if os.path.isdir(where) else os.path.dirname(where)
    try:
        found = DataFilesDict.from_patterns(get_data_patterns(folder), base_path=folder)
    except EmptyDatasetError:
        found = {}
    by_split = {str(split): [os.path.abspath(f) for f in files] for split, files in found.items()}
    if not os.path.isdir(where):
        by_split = {split: [f for f in files if f == where] for split, files in by_split.items()}
        if not any(by_split.values()):
            by_split = {"train": [where]}
    for builder in ("parquet", "arrow"):
        files = {split: [f for f in fs if f.lower().endswith(f".{builder}")] for split, fs in by_split.items()}
        files = {split: fs for split, fs in files.items() if fs}
        if files:
            return builder, files
    return "parquet", {}


def _choose_split(splits: list[str], split: str | None, spec: str) -> str:
    if not splits:
        raise InputError(f"no images found in '{spec}': the dataset has no splits")
    if split is not None:
        if split in splits:
            return split
        raise InputError(f"unknown split '{split}' in '{spec}' (splits: {', '.join(splits)})")
    for default in DEFAULT_SPLITS:
        if default in splits:
            return default
    if len(splits) == 1:
        return splits[0]
    raise InputError(
        f"'{spec}' has no validation, test or train split: name one of {', '.join(splits)} "
        f"({KIND}:PATH_OR_NAME:SPLIT)"
    )


def _undecoded(dataset, column: str):
    """The split with only its image column, read as the stored ``{"bytes", "path"}`` (nothing decoded)."""
    import datasets

    return dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False)), column


# ---------------------------------------------------------------------------------------- columns
def _columns(features) -> str:
    return ", ".join(features)


def _kind(feature) -> str:
    """A feature in a few words: ``Value('string')``, ``ClassLabel``, ``Image``, ``List``."""
    import datasets

    return repr(feature) if isinstance(feature, datasets.Value) else type(feature).__name__


def _find_image_column(features, named: str | None, spec: str, quiet: bool = False) -> str | None:
    """The named image column, checked, or the one ``datasets.Image`` column (None when ``quiet``)."""
    import datasets

    if named is not None:
        if named not in features:
            raise InputError(f"'{spec}' has no column '{named}' (columns: {_columns(features)})")
        if not isinstance(features[named], datasets.Image):
            raise InputError(
                f"column '{named}' of '{spec}' holds {_kind(features[named])}, not images (datasets.Image)"
            )
        return named
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if len(images) == 1:
        return images[0]
    if quiet:
        return None
    if not images:
        raise InputError(f"'{spec}' has no image column (columns: {_columns(features)})")
    raise InputError(
        f"'{spec}' has several image columns ({', '.join(images)}): name one with image_column= (--image-column)"
    )


def _is_integer(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    )


def _find_label_column(features, named: str | None, spec: str) -> str | None:
    """The named label column, checked, or the one ``ClassLabel`` column, else ``label``/``labels``."""
    import datasets

    if named is not None:
        if named not in features:
            raise InputError(f"'{spec}' has no column '{named}' (columns: {_columns(features)})")
        if not _is_integer(features[named]):
            raise InputError(
                f"column '{named}' of '{spec}' holds {_kind(features[named])}, "
                "not class labels (ClassLabel or integers)"
            )
        return named
    classes = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    if len(classes) > 1:
        preferred = [name for name in classes if name in LABEL_NAMES]
        if len(preferred) == 1:
            return preferred[0]
        raise InputError(
            f"'{spec}' has several label columns ({', '.join(classes)}): name one with label_column= (--label-column)"
        )
    if classes:
        return classes[0]
    plain = [name for name in LABEL_NAMES if name in features and _is_integer(features[name])]
    return plain[0] if plain else None
