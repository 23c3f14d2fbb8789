"""``vitlens download tinyimagenet|cub200 DIR``: fetch, verify, resume, extract safely, check the layout.

One call of :func:`download_dataset`:

1. **Already done?** ``DIR/<folder>/.vitlens-download.json`` (written last, inside the extracted folder)
   names the archive's checksum: the layout is checked again and nothing is downloaded.
2. **Download** ``<base>/<archive>`` into ``DIR/<archive>.part`` with ``urllib`` (standard library), a tqdm
   bar on stderr. A ``.part`` left by an interrupted run is resumed with an HTTP ``Range`` request; a server
   that ignores it (``200`` instead of ``206``) makes the download start again from byte 0. A dropped
   connection is retried ``retries`` times, each time from where it stopped; after that the ``.part`` stays
   for the next run.
3. **Verify** the MD5 published for the official archive; a mismatch removes the file (a corrupt download).
4. **Extract** into a temporary folder inside DIR, refusing any member with an absolute path, a ``..``
   component, a link or a device; **check** the extracted folder with the reader of ``tinyimagenet:`` /
   ``cub200:`` itself (:func:`~vitlens.data.resolve_inputs`, every split): every listed image exists and
   has its box. Only then is the dataset folder renamed into DIR, so a failure never leaves a half-extracted
   dataset; the verified archive is removed at the end.

The server is the official one unless ``base_url=`` or the ``VITLENS_DOWNLOAD_BASE`` environment variable
names another (a mirror, or a local test server): the archive is then ``<base>/<archive file name>``.
Every failure is a one-line :class:`~vitlens.errors.DownloadError` (exit code 2 on the command line).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path, PurePosixPath

from vitlens.errors import DownloadError, OutputError, UsageError

__all__ = ["ARCHIVES", "BASE_ENV", "DatasetArchive", "Downloaded", "download_dataset"]

#: Environment variable naming another server for the archives: ``<base>/<archive file name>``.
BASE_ENV = "VITLENS_DOWNLOAD_BASE"
MARKER = ".vitlens-download.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DatasetArchive:
    """One official dataset archive: where it is, its published checksum, what it unpacks to."""

    name: str  # the CLI word and the input kind (``tinyimagenet:`` / ``cub200:``)
    url: str  # the official location
    md5: str  # the checksum published for that file
    folder: str  # the top folder the archive unpacks to, given to the reader
    splits: tuple[str, ...]  # the splits whose layout is checked

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


#: The official archives and their MD5 checksums.
#:
#: - TinyImageNet-200: the cs231n (Stanford) archive. MD5 90528d7c... as recorded by libraries that download
#:   and verify it, e.g. ContinualAI/avalanche ``avalanche/benchmarks/datasets/tiny_imagenet/tiny_imagenet.py``
#:   (and many torchvision-style TinyImageNet loaders with the same value); 248,100,043 bytes.
#: - CUB-200-2011: the Caltech DATA record 65de6-vp158 (CaltechDATA, the dataset's home since
#:   www.vision.caltech.edu/visipedia-data moved; this URL is the one used by many public setup scripts).
#:   MD5 97eceeb1... as recorded by TDeVries/cub2011_dataset ``cub2011.py`` (torchvision-style ``tgz_md5``) and
#:   pytorch-metric-learning's CUB200 dataset, for the same ``CUB_200_2011.tgz``.
ARCHIVES: dict[str, DatasetArchive] = {
    "tinyimagenet": DatasetArchive(
        name="tinyimagenet",
        url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        md5="90528d7ca1a48142e341f4ef8d21d0de",
        folder="tiny-imagenet-200",
        splits=("val", "train"),
    ),
    "cub200": DatasetArchive(
        name="cub200",
        url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
        md5="97eceeb196236b17998738112f37df78",
        folder="CUB_200_2011",
        splits=("test", "train"),
    ),
}


@dataclass
class Downloaded:
    """What :func:`download_dataset` did and where the dataset is."""

    name: str
    archive: str  # the archive's file name
    root: str  # DIR/<folder>, as DIR was given
    spec: str  # the input to use: ``tinyimagenet:DIR/tiny-imagenet-200``
    images: dict[str, int] = field(default_factory=dict)  # split -> number of images (all with boxes)
    downloaded: bool = True  # False: it was already there, verified, and nothing was done
    bytes: int = 0  # size of the archive (0 when nothing was downloaded)


def download_dataset(
    name: str,
    dest: str | os.PathLike,
    *,
    base_url: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
) -> Downloaded:
    """Download, verify and extract an official dataset archive into ``dest``, and check its layout.

    Parameters
    ----------
    name : {"tinyimagenet", "cub200"}
        The dataset (see :data:`ARCHIVES`).
    dest : str or path
        The folder that receives ``<folder>`` (``tiny-imagenet-200`` / ``CUB_200_2011``); created if needed.
    base_url : str, optional
        Fetch ``<base_url>/<archive file name>`` instead of the official URL. Default: the
        ``VITLENS_DOWNLOAD_BASE`` environment variable, else the official URL.
    md5 : str, optional
        The expected MD5 of the archive; default the published one in :data:`ARCHIVES`.
    progress : bool
        tqdm bars (download, extraction) on stderr.
    retries : int
        How many times a dropped connection is resumed within this call; after that the ``.part`` file is
        kept and the next call resumes it.
    timeout : float
        Seconds without data before a connection counts as dropped.

    Returns
    -------
    Downloaded
        With ``spec`` (the input that reads the dataset) and the number of images per split.

    Raises
    ------
    UsageError
        An unknown dataset name.
    OutputError
        ``dest`` is a file, or ``dest/<folder>`` exists but was not written by this function.
    DownloadError
        Server unreachable, HTTP error, connection dropped (the ``.part`` is kept: call again to resume),
        a wrong checksum (the file is removed), an unreadable or unsafe archive, or an archive without the
        layout the reader expects. Nothing is left extracted in ``dest`` on any failure.
    """
    archive = _archive(name)
    expected_md5 = (md5 or archive.md5).lower()
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"output path '{dest}' exists and is not a directory")
    root = dest / archive.folder
    spec = f"{archive.name}:{root}"

    if root.exists():
        marker = _read_marker(root)
        if marker is None:
            raise OutputError(f"'{root}' exists and was not written by vitlens download: use it as it is "
                              f"({spec}) or remove it to download again")
        if marker.get("md5") != expected_md5:
            raise OutputError(f"'{root}' holds another download (md5 {marker.get('md5')}, expected {expected_md5}): "
                              f"remove it to download again")
        images = _check_layout(archive, root, f"'{root}'", hint="; remove it to download again")
        return Downloaded(archive.name, archive.filename, str(root), spec, images, downloaded=False)

    base = base_url if base_url is not None else os.environ.get(BASE_ENV) or None
    url = f"{base.rstrip('/')}/{archive.filename}" if base else archive.url
    created = not dest.exists()
    try:
        path = _fetch_verified(archive, url, dest, expected_md5, progress, retries, timeout)
        size = path.stat().st_size
        images = _extract_and_check(archive, path, dest, expected_md5, progress)
        path.unlink()
    finally:
        # a download that failed before anything worth keeping leaves no empty folder behind
        if created and dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
    return Downloaded(archive.name, archive.filename, str(root), spec, images, downloaded=True, bytes=size)


def _archive(name: str) -> DatasetArchive:
    archive = ARCHIVES.get(str(name).lower()) if isinstance(name, str) else None
    if archive is None:
        raise UsageError(f"unknown dataset '{name}': vitlens download takes {' or '.join(ARCHIVES)}")
    return archive


# ------------------------------------------------------------------------------------------ download
def _fetch_verified(archive: DatasetArchive, url: str, dest: Path, expected_md5: str, progress: bool,
                    retries: int, timeout: float) -> Path:
    """The archive in ``dest``, complete and with the expected MD5 (downloaded or resumed as needed)."""
    final = dest / archive.filename
    if final.is_file():  # a verified archive whose extraction did not finish last time
        if _md5(final) == expected_md5:
            return final
        final.unlink()
    part = dest / (archive.filename + ".part")
    for attempt in range(max(0, retries) + 1):
        try:
            _fetch(url, part, dest, progress, timeout)
            break
        except _Dropped as exc:
            if attempt == max(0, retries):
                raise DownloadError(f"the connection to {_host(url)} dropped after {exc.have:,} of "
                                    f"{_size_text(exc.total)} bytes of {archive.filename}: run the same command "
                                    f"again to resume") from None
    digest = _md5(part)
    if digest != expected_md5:
        part.unlink()
        raise DownloadError(f"{archive.filename} from {_host(url)} has md5 {digest}, expected {expected_md5}: "
                            f"a corrupt download, removed; run the command again")
    os.replace(part, final)
    return final


class _Dropped(Exception):
    """The transfer stopped before the end; ``have`` bytes are in the .part file."""

    def __init__(self, have: int, total: int | None) -> None:
        super().__init__(have, total)
        self.have, self.total = have, total


def _fetch(url: str, part: Path, dest: Path, progress: bool, timeout: float) -> None:
    """Download ``url`` into ``part``, resuming what is there; raise _Dropped when the transfer stops early."""
    from tqdm import tqdm

    have = part.stat().st_size if part.is_file() else 0
    response = _open(url, have, timeout)
    if response is None:  # 416: the .part already holds the whole file; the checksum decides
        return
    if response.status == 206 and _range_start(response.headers.get("Content-Range")) != have:
        response.close()  # a range other than the one asked for: start again from byte 0
        have, response = 0, _open(url, 0, timeout)
    with response:
        total = _int(response.headers.get("Content-Length"))
        if have and response.status == 206:
            mode = "ab"
        else:  # the server ignored Range (200: the whole file) or there was nothing to resume
            have, mode = 0, "wb"
        if total is not None:
            total += have
        dest.mkdir(parents=True, exist_ok=True)
        with open(part, mode) as out, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=part.name[: -len(".part")], disable=not progress,
                                           leave=False) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (HTTPException, OSError):  # IncompleteRead, reset, timeout
                    out.flush()
                    raise _Dropped(part.stat().st_size, total) from None
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
        size = part.stat().st_size
        if total is not None and size < total:
            raise _Dropped(size, total)


def _open(url: str, have: int, timeout: float):
    """The HTTP response for ``url`` from byte ``have`` on; None when the server says the range is past the end."""
    from vitlens import __version__

    headers = {"User-Agent": f"vitlens/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            return None
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, socket.timeout):
            reason = f"no answer in {timeout:g} s"
        raise DownloadError(f"cannot download {url}: {_host(url)} is unreachable ({reason}); check the network, "
                            f"or set {BASE_ENV} to a mirror") from None


def _range_start(content_range: str | None) -> int | None:
    found = re.match(r"\s*bytes\s+(\d+)-", content_range or "")
    return int(found.group(1)) if found else None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _host(url: str) -> str:
    return urllib.request.urlparse(url).netloc or url


def _size_text(total: int | None) -> str:
    return f"{total:,}" if total is not None else "an unknown number of"


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ extraction
def _extract_and_check(archive: DatasetArchive, path: Path, dest: Path, expected_md5: str,
                       progress: bool) -> dict[str, int]:
    """Extract into a temporary folder in ``dest``, check the layout there, then rename the dataset folder
    into ``dest``. The temporary folder is removed whatever happens."""
    for stale in dest.glob(".vitlens-extract-*"):  # left by a run that was killed while extracting
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=".vitlens-extract-", dir=dest))
    try:
        try:
            _extract(path, scratch, progress)
        except _BadArchive:
            path.unlink()
            raise
        root = scratch / archive.folder
        if not root.is_dir():
            path.unlink()
            raise DownloadError(f"{archive.filename} does not unpack to {archive.folder}/: not the {archive.name} "
                                f"archive (removed)")
        images = _check_layout(archive, root, archive.filename, hint=" (removed)", on_error=path.unlink)
        (root / MARKER).write_text(json.dumps({"dataset": archive.name, "archive": archive.filename,
                                               "md5": expected_md5, "images": images}, indent=1) + "\n")
        for entry in sorted(scratch.iterdir()):  # the dataset folder, and what else sits beside it (CUB's
            if not (dest / entry.name).exists():  # attributes.txt) unless that would replace something
                os.rename(entry, dest / entry.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return images


class _BadArchive(DownloadError):
    """An archive that cannot or must not be extracted: it is removed."""


def _extract(path: Path, into: Path, progress: bool) -> None:
    from tqdm import tqdm

    def bar(members):
        return tqdm(members, desc=f"extracting {path.name}", unit="file", disable=not progress, leave=False)

    try:
        if path.name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                members = zf.infolist()
                for info in members:
                    kind = (info.external_attr >> 16) & 0o170000
                    _check_member(info.filename, path.name, ok=kind in (0, 0o100000, 0o040000))
                for info in bar(members):
                    zf.extract(info, into)
        else:
            # the "data" filter (Python >= 3.10.12 / 3.11.4) refuses what _check_member refuses, a second time
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            with tarfile.open(path, "r:*") as tf:
                members = tf.getmembers()
                for member in members:
                    _check_member(member.name, path.name, ok=member.isfile() or member.isdir())
                for member in bar(members):
                    tf.extract(member, into, **safe)
    except DownloadError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise _BadArchive(f"{path.name} is not a readable archive ({exc}): removed") from None
    except OSError as exc:
        if exc.errno is None:  # gzip.BadGzipFile and the like
            raise _BadArchive(f"{path.name} is not a readable archive ({exc}): removed") from None
        raise DownloadError(f"cannot extract {path.name} into '{into.parent}': {exc.strerror}") from None


def _check_member(name: str, archive_name: str, ok: bool) -> None:
    """Refuse a member that would land outside the extraction folder, and links or devices (``ok`` False)."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) or ".." in PurePosixPath(posix).parts:
        raise _BadArchive(f"{archive_name}: member '{name}' has an absolute path or '..': refused (removed)")
    if not ok:
        raise _BadArchive(f"{archive_name}: member '{name}' is a link or a device: refused (removed)")


# ------------------------------------------------------------------------------------------ layout
def _check_layout(archive: DatasetArchive, root: Path, what: str, hint: str = "", on_error=None) -> dict[str, int]:
    """Read ``root`` with the ``tinyimagenet:`` / ``cub200:`` reader: split -> number of images, each present
    and with a box."""
    from vitlens.data.datasets import resolve_inputs
    from vitlens.errors import InputError

    images = {}
    for split in archive.splits:
        try:
            samples = resolve_inputs([f"{archive.name}:{root}:{split}"])
            missing = [s.path for s in samples if not os.path.isfile(s.path)]
            boxless = [s.path for s in samples if not s.boxes]
            if missing:
                first = os.path.relpath(missing[0], root)
                problem = f"{len(missing)} listed {split} images are missing (first: {first})"
            elif boxless:
                first = os.path.relpath(boxless[0], root)
                problem = f"{len(boxless)} {split} images have no box (first: {first})"
            else:
                images[split] = len(samples)
                continue
        except InputError as exc:
            problem = str(exc)
        if on_error is not None:
            on_error()
        raise DownloadError(f"{what} is not the layout {archive.name}: reads: {problem}{hint}")
    return images


def _read_marker(root: Path) -> dict | None:
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None
