"""Decode any common image file into an 8-bit RGB ``PIL.Image.Image``.

Models want three 8-bit channels, but real folders hold grayscale scans, palette GIFs, transparent
PNGs, 16-bit PNGs, CMYK JPEGs and phone photos whose pixels are stored sideways. ``load_image``
turns all of them into what the user sees in an image viewer, and turns every way a file can be
unreadable into one ``InputError`` line, so a batch run can report the file and move on.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from vitlens.errors import InputError

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "decode_image", "image_from_array", "image_from_pil", "is_image_file",
           "load_image", "to_rgb_image"]

#: File name endings (lower case, with the dot) that are treated as images when listing folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif",
        ".png", ".webp", ".bmp", ".gif",
        ".tif", ".tiff",
        ".ppm", ".pgm", ".pbm", ".pnm",
    }
)  # fmt: skip

#: Largest image accepted, in pixels (400 megapixels: about 1.2 GB once decoded to RGB).
MAX_PIXELS = 400_000_000

# PIL refuses images above 2 * MAX_IMAGE_PIXELS (about 179 MP by default) as decompression bombs,
# which rejects real panoramas and scans. Raise it so PIL only stops truly absurd files; our own,
# clearer check against MAX_PIXELS runs before any pixel is decoded. Never lower a user's setting.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# What PIL and its codecs raise on damaged data: there is no single base class for it.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


class _UnsupportedMode(Exception):
    """A decoded image whose colour mode has no conversion to RGB (e.g. LAB)."""


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_INTEGER_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Tell whether ``path`` is an existing regular file with an image extension.

    Parameters
    ----------
    path : str or os.PathLike
        The file to check. Its content is not opened: a corrupt ``.jpg`` still counts, so that
        the error surfaces later from :func:`load_image`, naming the file.

    Returns
    -------
    bool
        True when the (case-insensitive) extension is in :data:`IMAGE_EXTENSIONS` and the path is
        a file.
    """
    return has_image_extension(path) and os.path.isfile(path)


def has_image_extension(path: str | os.PathLike[str]) -> bool:
    """Tell whether the name of ``path`` ends in one of :data:`IMAGE_EXTENSIONS` (no disk access)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


#: ``image.info`` key of the file's own (upright) size when :func:`load_image` decoded it smaller
ORIGINAL_SIZE = "vitlens_original_size"


def load_image(path: str | os.PathLike[str], reduce=None) -> Image.Image:
    """Read an image file and return it fully decoded, upright, in 8-bit RGB mode.

    Parameters
    ----------
    path : str or os.PathLike
        Any format PIL can decode (JPEG/JFIF, PNG, WebP, BMP, GIF, TIFF, PPM/PGM, ...). The
        format is found from the content, not the extension.
    reduce : callable, optional
        ``reduce((width, height)) -> (width, height) or None``: the smallest size the caller
        needs. A JPEG at least twice that size is decoded at 1/2, 1/4 or 1/8 scale by the JPEG
        decoder itself (never below the size asked for), so a 12000 x 9000 photo never takes
        324 MB; the file's own size is then ``image.info[ORIGINAL_SIZE]``. Other formats
        are always decoded whole.

    Returns
    -------
    PIL.Image.Image
        A new image in mode ``"RGB"``, not tied to the file. In detail:

        - the EXIF (or XMP) orientation is applied, so the size is what a viewer shows;
        - animated GIF/WebP/PNG and multi-page TIFF give their first frame;
        - transparency (alpha channel or palette/colour-key transparency) is composited over white;
        - 16-bit grayscale is scaled to 8 bit (``v * 255 / 65535``, rounded), not clipped;
          32-bit integer and float images are stretched from their own min..max (float images
          already in 0..1 are scaled by 255);
        - grayscale, palette, bilevel and CMYK images are converted to RGB (colour profiles
          are ignored).

    Raises
    ------
    InputError
        One line, ``cannot read image '<path>': <reason>``, when the path is missing, a folder,
        empty, not an image, truncated or corrupt, larger than :data:`MAX_PIXELS`, or in a colour
        mode that has no RGB conversion.
    """
    name = os.fspath(path)

    def fail(reason: str) -> InputError:
        return InputError(f"cannot read image '{name}': {reason}")

    # Check the common mistakes first: PIL's own messages for them are long or misleading.
    if not os.path.exists(name):
        raise fail("no such file")
    if os.path.isdir(name):
        raise fail("is a directory, not an image file")
    try:
        if os.path.getsize(name) == 0:
            raise fail("file is empty")
    except OSError as exc:
        raise fail(_short_reason(exc)) from exc

    return decode_image(name, name, reduce=reduce)


def decode_image(source: str | os.PathLike[str] | IO[bytes], name: str, reduce=None) -> Image.Image:
    """Decode an image file, or a binary file object holding one, exactly as :func:`load_image` does.

    The one decoding path of vitlens: :func:`load_image` calls it with the checked file path, and
    samples that are not files (a row of a Hugging Face dataset) with their encoded bytes in a
    ``BytesIO``, so the same photo gives the same pixels wherever it is stored.

    Parameters
    ----------
    source : str, os.PathLike or binary file object
        The encoded image (PIL finds the format from the content).
    name : str
        What error messages call the image: ``cannot read image '<name>': <reason>``.
    reduce : callable, optional
        As for :func:`load_image`.

    Raises
    ------
    InputError
        One line naming ``name`` for an image PIL cannot decode (see :func:`load_image`).
    """

    def fail(reason: str) -> InputError:
        return InputError(f"cannot read image '{name}': {reason}")

    try:
        with warnings.catch_warnings():
            # Size is checked below with a clearer message; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise fail(
                        f"image is too large ({width}x{height} = {width * height / 1e6:.0f} "
                        f"megapixels; the limit is {MAX_PIXELS / 1e6:.0f})"
                    )
                wanted = reduce(im.size) if reduce is not None and im.format == "JPEG" else None
                if wanted is not None and 2 * wanted[0] <= width and 2 * wanted[1] <= height:
                    im.draft(None, (int(wanted[0]), int(wanted[1])))
                # Decode every pixel now so that a truncated file fails here, naming the file,
                # rather than somewhere deep inside preprocessing.
                im.load()
                decoded = im.size
                upright = _apply_orientation(im)
                rgb = _to_rgb(upright)
                if decoded != (width, height):
                    rgb.info[ORIGINAL_SIZE] = (width, height) if upright.size == decoded else (height, width)
                return rgb
    except InputError:
        raise
    except _UnsupportedMode as exc:
        raise fail(str(exc)) from exc
    except Image.DecompressionBombError as exc:
        raise fail(f"image is too large ({_short_reason(exc)})") from exc
    except Image.UnidentifiedImageError as exc:
        raise fail("not an image file, or a format that cannot be decoded") from exc
    except PermissionError as exc:
        raise fail("permission denied") from exc
    except _DECODE_ERRORS as exc:
        raise fail(f"truncated or corrupt image data ({_short_reason(exc)})") from exc


def to_rgb_image(item, name: str | None = None) -> Image.Image:
    """Any image a user holds in memory or on disk -> the 8-bit RGB image :func:`load_image` gives for its file.

    The one entry point of the API's inputs: a path (:func:`load_image`), encoded bytes or a binary
    file object (:func:`decode_image`), a PIL image in any mode (:func:`image_from_pil`), a numpy
    array or an integer torch tensor (:func:`image_from_array`). The same picture reaches the model
    with the same pixels whichever form it comes in.

    Raises
    ------
    InputError
        One line, for an input of another type or one that cannot be read as an image.
    """
    if isinstance(item, (str, os.PathLike)):
        return load_image(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        import io

        return decode_image(io.BytesIO(bytes(item)), name or "the image bytes")
    if isinstance(item, Image.Image):
        return image_from_pil(item, name or "the PIL image")
    if isinstance(item, np.ndarray) or _is_tensor(item):
        return image_from_array(item, name or "the image array")
    if hasattr(item, "read"):
        return decode_image(item, name or getattr(item, "name", None) or "the image file object")
    raise InputError(f"cannot explain an input of type {type(item).__name__}: give paths, bytes, PIL images, "
                     "arrays or tensors")


def image_from_pil(im: Image.Image, name: str = "the PIL image") -> Image.Image:
    """A PIL image of any mode -> a new 8-bit RGB image, exactly as :func:`load_image` treats its file.

    The EXIF orientation is applied (``Image.open`` leaves it to the caller; :func:`ImageOps.exif_transpose`
    removes the tag, so an image already turned upright is not turned again); 16-bit and 32-bit
    grayscale is scaled, float images mapped, transparency composited over white, palette, bilevel
    and CMYK converted (see :func:`load_image`). The user's image is not changed.
    """
    try:
        im.load()
        return _to_rgb(_apply_orientation(im))
    except _UnsupportedMode as exc:
        raise InputError(f"cannot read image '{name}': {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise InputError(f"cannot read image '{name}': {_short_reason(exc)}") from exc


#: how far float pixel values may stray outside [0, 1] (arithmetic rounding) before they are refused
_FLOAT_SLACK = 1e-3


def image_from_array(array, name: str = "the image array") -> Image.Image:
    """An image held as numbers -> a new 8-bit RGB image.

    Parameters
    ----------
    array : numpy.ndarray or torch.Tensor
        (H, W), (H, W, C) or (C, H, W) with C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA); a
        (C, H, W) array is recognised by a first axis of 1, 3 or 4 and a last axis that is not
        (``torchvision.io.read_image`` gives (3, H, W) uint8 tensors). Values by dtype:

        - ``uint8``: as they are; ``bool``: 0 and 255;
        - ``uint16``: 16-bit data, ``v * 255 / 65535`` rounded, as for a 16-bit PNG;
        - floats: values in [0, 1], times 255 rounded (NaN, infinity and values outside [0, 1] are
          refused: a 0..255 float array is not clipped to white);
        - other integer dtypes (int32, int64...) are refused: whether 255 or 65535 is white cannot be told.

        Alpha is composited over white, as for an RGBA file.

    Raises
    ------
    InputError
        One line naming the problem: shape, dtype, or range.
    """
    if _is_tensor(array):
        if array.is_floating_point():
            raise InputError(f"'{name}': a float tensor is taken as preprocessed model input, not as an image")
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 2, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)) or 0 in array.shape:
        raise InputError(f"cannot read image '{name}': an image array must be (H, W), (H, W, C) or (C, H, W) with "
                         f"C = 1, 2, 3 or 4, got shape {tuple(array.shape)}")
    # uint8 (H, W) / (H, W, 2) / (H, W, 3) / (H, W, 4) are PIL's L / LA / RGB / RGBA
    return _to_rgb(Image.fromarray(np.ascontiguousarray(_to_uint8(array, name))))


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """Pixel values of any supported dtype -> uint8 (see :func:`image_from_array`)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return ((array.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise InputError(f"cannot read image '{name}': the array holds NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low < -_FLOAT_SLACK or high > 1.0 + _FLOAT_SLACK:
            hint = " (divide by 255)" if high <= 255.0 + _FLOAT_SLACK and low >= -_FLOAT_SLACK else ""
            raise InputError(f"cannot read image '{name}': float pixel values must lie in [0, 1], got "
                             f"{low:g}..{high:g}{hint}")
        return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise InputError(f"cannot read image '{name}': {array.dtype} pixel values are ambiguous (is white 255 or "
                     "65535?): give uint8 (0..255), uint16 (0..65535) or floats in [0, 1]")


def _is_tensor(value) -> bool:
    # torch is imported by the package anyway, but this module must not need it to decode files
    return type(value).__module__.startswith("torch") and hasattr(value, "is_floating_point")


def _apply_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip ``im`` as its EXIF/XMP orientation tag says; leave it alone if the tag is broken."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        # Damaged metadata is common in camera files and does not make the pixels unreadable:
        # showing the image unrotated is better than refusing it.
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode into a new 8-bit RGB image."""
    if im.mode in _INTEGER_MODES:
        im = _integer_to_l(im)
    elif im.mode == "F":
        im = _float_to_l(im)

    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        # PIL's convert understands every form of transparency (alpha band, palette index,
        # colour key); dropping it instead would show whatever colour hides under the alpha.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode == "RGB":
        return im.copy()
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise _UnsupportedMode(f"colour mode {im.mode!r} cannot be converted to RGB") from exc


def _integer_to_l(im: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer grayscale image to 8 bit without clipping."""
    values = np.asarray(im).astype(np.int64)
    if values.size and values.min() >= 0 and values.max() <= 65535:
        # 16-bit data (PIL opens 16-bit PNG/TIFF/PGM as I;16 or I): use the full 16-bit range,
        # so a dark image stays dark instead of being stretched.
        scaled = (values * 255 + 32767) // 65535
    else:
        scaled = _stretch(values.astype(np.float64))
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _float_to_l(im: Image.Image) -> Image.Image:
    """Map a 32-bit float grayscale image to 8 bit: 0..1 data times 255, anything else stretched."""
    values = np.nan_to_num(np.asarray(im, dtype=np.float64))
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = np.rint(values * 255.0)
    else:
        scaled = _stretch(values)
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _stretch(values: np.ndarray) -> np.ndarray:
    """Linearly map min..max of ``values`` onto 0..255 (a constant image becomes 0)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape)
    return np.rint((values - low) * (255.0 / (high - low)))


def _short_reason(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text.splitlines()[0] if text else type(exc).__name__
