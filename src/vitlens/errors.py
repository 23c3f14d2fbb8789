"""Errors a user can cause. Each carries a one-line message that names the problem.

The command line prints ``str(error)`` on one line and exits non-zero; the Python API simply raises.
Anything that is not a ``VitlensError`` is a bug in vitlens and keeps its traceback.
"""


class VitlensError(Exception):
    """Base class: a problem with what the user asked for, not a bug."""

    exit_code = 2


class InputError(VitlensError):
    """A missing, unreadable or unsupported input (image file, folder, dataset layout)."""


class ModelError(VitlensError):
    """A model that cannot be loaded or is not a supported kind of model."""


class TargetError(VitlensError):
    """A target class that does not exist for the model (index out of range, unknown name)."""


class MethodError(VitlensError):
    """An unknown explanation method or an invalid method parameter."""


class OutputError(VitlensError):
    """An output location that cannot be written."""


class DownloadError(VitlensError):
    """A dataset download that failed: server unreachable, connection dropped, wrong checksum, unsafe archive."""


class ResourceError(VitlensError):
    """Not enough memory for even one image (a batch is split and retried before this is raised)."""


class UsageError(VitlensError, ValueError):
    """An option or argument with a value that cannot work: a device this machine does not have, a batch
    size below 1, an overlay opacity outside [0, 1], an unknown colormap...

    Also a ``ValueError``, so code that treats bad arguments generically still catches it.
    """


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can span many lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
