"""Mean and 95 % confidence interval of per-image metric values.

The default interval is Student's t: ``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)`` with the sample
standard deviation ``s`` (ddof 1). For 0/1 metrics (pointing-game hits, increase in confidence,
top-1 accuracy) this is the usual Wald-type interval. ``method='bootstrap'`` gives a seeded
percentile bootstrap instead. NaN values (a metric undefined for an image, e.g. an image whose box
fell outside the crop) are left out and ``n`` counts the values used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom (scipy when present)."""
    try:
        from scipy.stats import t

        return float(t.ppf(p, df))
    except ImportError:  # pragma: no cover - scipy comes with scikit-image
        # Cornish-Fisher expansion around the normal quantile (error < 1e-3 for df >= 3)
        z = NormalDist().inv_cdf(p)
        g1 = (z ** 3 + z) / 4
        g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
        g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
        return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def mean_ci(values, confidence: float = 0.95, method: str = "t", seed: int = 0, resamples: int = 10000) -> Interval:
    """Mean and confidence interval of ``values`` (NaNs dropped).

    Parameters
    ----------
    values : array-like of float
    confidence : float
        Coverage, 0.95 by default.
    method : {'t', 'bootstrap'}
        Student-t interval (default) or a percentile bootstrap with ``resamples`` draws seeded by
        ``seed``.

    Returns
    -------
    Interval
        ``low == high == mean`` for a single value; all NaN when there is none.
    """
    data = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    data = data[~np.isnan(data)]
    n = int(data.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(data.mean())
    if n == 1:
        return Interval(mean, mean, mean, 1)
    if method == "t":
        half = t_quantile((1 + confidence) / 2, n - 1) * float(data.std(ddof=1)) / math.sqrt(n)
        return Interval(mean, mean - half, mean + half, n)
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = data[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
        alpha = (1 - confidence) / 2
        low, high = np.quantile(means, [alpha, 1 - alpha])
        return Interval(mean, float(low), float(high), n)
    raise ValueError(f"unknown interval method {method!r}: expected 't' or 'bootstrap'")


__all__ = ["Interval", "mean_ci", "t_quantile"]
