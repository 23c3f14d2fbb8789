"""Reading images and resolving what the user asked to explain into a list of samples.

- :func:`load_image` decodes any common image file into an upright 8-bit RGB PIL image;
- :func:`load_sample` decodes one sample, a file or a row of a Hugging Face dataset, the same way;
- :func:`resolve_inputs` turns files, folders, globs and ``KIND:PATH`` datasets (ImageFolder,
  TinyImageNet-200, CUB-200-2011, ImageNet-val with a labels file, Hugging Face datasets) into
  :class:`Sample` objects carrying the true label (in the model's class order) and object boxes
  when known.
"""

from vitlens.data.datasets import resolve_inputs
from vitlens.data.images import IMAGE_EXTENSIONS, is_image_file, load_image
from vitlens.data.samples import Sample
from vitlens.data.sources import load_sample

__all__ = ["IMAGE_EXTENSIONS", "Sample", "is_image_file", "load_image", "load_sample", "resolve_inputs"]
