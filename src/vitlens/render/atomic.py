"""Write files so that readers only ever see the old file or the complete new one.

A run can be killed at any moment (Ctrl-C, OOM killer, a cluster's time limit). Writing to a
temporary file in the target directory and then ``os.replace``-ing it means a report or PNG is
never left half-written: ``os.replace`` is atomic when source and target share a filesystem,
which a sibling temp file guarantees.

That holds for a killed process whatever else happens: the kernel still has the data. Surviving a
power cut or a kernel crash as well needs the data on the disk before the rename (``durable``, an
``fsync`` per file, the default). Files written by the thousand (a dataset run's per-image outputs)
skip it: a flush per file costs more than encoding the file, and the run's records say what a
complete file looks like instead (see :mod:`vitlens.outputs`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

from vitlens.errors import OutputError


def _reason(exc: OSError) -> str:
    # strerror is the short human part ("Not a directory"); str(exc) repeats the path.
    text = exc.strerror or str(exc) or type(exc).__name__
    return " ".join(text.split())


def ensure_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` (and parents) if needed.

    Raises
    ------
    OutputError
        One-line message if the directory cannot be created (e.g. a parent is a regular file).
    """
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output directory '{path}': {_reason(exc)}") from None
    if not path.is_dir():
        raise OutputError(f"output path '{path}' exists and is not a directory")
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None], durable: bool = True) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, then move it onto ``path``.

    Parameters
    ----------
    path : path-like
        Final location. Parent directories are created.
    write : callable
        Receives a binary file object opened for writing.
    durable : bool
        Flush the data to the disk (``fsync``) before the rename, so that after a power cut ``path`` is
        the old file or the whole new one. Without it a killed process still never leaves a partial file,
        but a power cut may leave the newest files empty.

    Returns
    -------
    Path
        ``path`` as a ``Path``.

    Raises
    ------
    OutputError
        The directory cannot be created or the file cannot be written/replaced.
        Exceptions raised by ``write`` itself (other than ``OSError``) propagate unchanged;
        the temp file is removed in every failure case.
    """
    target = Path(path)
    ensure_dir(target.parent)
    # Hidden, unique name in the same directory; O_EXCL avoids clobbering a concurrent writer's
    # temp file. Mode 0o666 lets the umask decide permissions, like a plain open() would
    # (tempfile's 0o600 would make the final PNG unreadable to a web server or colleague).
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise OutputError(f"cannot write '{target}': {_reason(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        _remove_quietly(tmp)
        raise OutputError(f"cannot write '{target}': {_reason(exc)}") from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    return target


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8", durable: bool = True) -> Path:
    """Atomically write ``text`` to ``path`` (see :func:`write_atomic`)."""
    data = text.encode(encoding)
    return write_atomic(path, lambda handle: handle.write(data), durable=durable)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
