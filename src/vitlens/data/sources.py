"""Decoding one sample, whatever it comes from: the single entry point the runner loads images with."""

from __future__ import annotations

from PIL import Image

from vitlens.data.images import load_image
from vitlens.data.samples import Sample

__all__ = ["load_sample"]


def load_sample(sample: Sample, reduce=None) -> Image.Image:
    """The sample's image, upright 8-bit RGB (see :func:`vitlens.data.load_image`, also for ``reduce``).

    Raises
    ------
    InputError
        One line naming the sample when it cannot be decoded.
    """
    return load_image(sample.path, reduce=reduce)
