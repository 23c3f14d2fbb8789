"""Mean and 95 % confidence intervals on known numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vitlens.metrics.stats import mean_ci, t_quantile


def test_t_interval_of_one_to_five():
    # mean 3, s = sqrt(2.5), t_{0.975, 4} = 2.776445 -> half-width 2.776445 * 1.581139 / sqrt(5) = 1.963243
    interval = mean_ci([1, 2, 3, 4, 5])
    assert interval.n == 5 and interval.mean == 3.0
    assert interval.low == pytest.approx(3 - 1.963243, abs=1e-5)
    assert interval.high == pytest.approx(3 + 1.963243, abs=1e-5)
    assert interval.half_width == pytest.approx(1.963243, abs=1e-5)


def test_t_quantile_table_values():
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-5)
    assert t_quantile(0.975, 30) == pytest.approx(2.042272, abs=1e-5)


def test_nan_values_are_left_out_and_counted():
    interval = mean_ci([1.0, math.nan, 3.0])
    assert interval.n == 2 and interval.mean == 2.0
    # two values: t_{0.975,1} = 12.7062, s = sqrt(2) -> half = 12.7062 * sqrt(2)/sqrt(2)
    assert interval.half_width == pytest.approx(12.706205, abs=1e-4)


def test_single_and_no_value():
    one = mean_ci([0.7])
    assert (one.mean, one.low, one.high, one.n) == (0.7, 0.7, 0.7, 1)
    none = mean_ci([math.nan])
    assert none.n == 0 and math.isnan(none.mean)


def test_constant_values_have_a_zero_width_interval():
    interval = mean_ci([1.0] * 10)
    assert interval.low == interval.high == 1.0


def test_bootstrap_is_seeded_and_close_to_t_for_normal_data():
    data = np.random.default_rng(0).normal(10.0, 2.0, size=400)
    a = mean_ci(data, method="bootstrap", seed=1)
    b = mean_ci(data, method="bootstrap", seed=1)
    t = mean_ci(data)
    assert (a.low, a.high) == (b.low, b.high)
    assert a.low < a.mean < a.high
    assert a.half_width == pytest.approx(t.half_width, rel=0.1)
    with pytest.raises(ValueError):
        mean_ci(data, method="jackknife")
