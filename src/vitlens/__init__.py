"""vitlens: see why a vision transformer (or a CNN, or a text transformer) made a prediction."""

from vitlens.version import __version__  # noqa: E402
from vitlens.api import ExplainResult, Prediction, explain  # noqa: E402
from vitlens.errors import VitlensError  # noqa: E402
from vitlens.methods import DEFAULT_METHODS, REGISTRY as METHODS  # noqa: E402
from vitlens.models import load_model  # noqa: E402

__all__ = ["DEFAULT_METHODS", "METHODS", "ExplainResult", "Prediction", "VitlensError", "__version__", "explain",
           "load_model"]
