"""Decoding one sample, whatever it comes from: the single entry point the runner loads images with.

A sample is an image file, or a row of a Hugging Face dataset (``Sample.path`` starting with
``hf-dataset:``, see :mod:`vitlens.data.hf`); both are decoded by the same code.
"""

from __future__ import annotations

from PIL import Image

from vitlens.data.hf import PATH_PREFIX, load_hf_sample
from vitlens.data.images import load_image
from vitlens.data.samples import Sample

__all__ = ["load_sample"]


def load_sample(sample: Sample, reduce=None) -> Image.Image:
    """The sample's image, upright 8-bit RGB (see :func:`vitlens.data.load_image`, also for ``reduce``).

    Safe to call from several threads at once (the runner decodes in background threads).

    Raises
    ------
    InputError
        One line naming the sample when it cannot be decoded.
    """
    if sample.path.startswith(PATH_PREFIX):
        return load_hf_sample(sample.path, reduce=reduce)
    return load_image(sample.path, reduce=reduce)
