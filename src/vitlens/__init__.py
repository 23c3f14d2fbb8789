"""vitlens: see why a vision transformer (or a CNN, or a text transformer) made a prediction."""

__version__ = "0.1.0"

from vitlens.errors import VitlensError  # noqa: E402
from vitlens.models import load_model  # noqa: E402

__all__ = ["VitlensError", "__version__", "load_model"]
