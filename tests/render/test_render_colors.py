import numpy as np
import pytest

from vitlens.errors import VitlensError
from vitlens.render import ColormapError, apply_colormap, signed_to_unit


def test_jet_endpoints_are_dark_blue_and_dark_red():
    rgb = apply_colormap(np.array([[0.0, 1.0]]), "jet")
    assert rgb.shape == (1, 2, 3) and rgb.dtype == np.uint8
    low, high = rgb[0, 0], rgb[0, 1]
    assert low[0] == 0 and low[1] == 0 and 120 <= low[2] <= 135
    assert 120 <= high[0] <= 135 and high[1] == 0 and high[2] == 0


def test_out_of_range_is_clipped_and_nan_is_zero():
    rgb = apply_colormap(np.array([[-3.0, 0.0, np.nan, 7.0, 1.0, np.inf]]), "viridis")
    assert (rgb[0, 0] == rgb[0, 1]).all()
    assert (rgb[0, 2] == rgb[0, 1]).all()
    assert (rgb[0, 3] == rgb[0, 4]).all()
    assert (rgb[0, 5] == rgb[0, 4]).all()


def test_shape_is_kept():
    rgb = apply_colormap(np.random.default_rng(0).random((5, 7)))
    assert rgb.shape == (5, 7, 3)


def test_unknown_colormap_is_a_one_line_user_error():
    with pytest.raises(ColormapError) as info:
        apply_colormap(np.zeros((2, 2)), "jett")
    err = info.value
    assert isinstance(err, VitlensError) and isinstance(err, ValueError)
    msg = str(err)
    assert "\n" not in msg and "'jett'" in msg and "viridis" in msg


def test_non_2d_map_rejected():
    with pytest.raises(ValueError):
        apply_colormap(np.zeros((2, 2, 2)))


def test_signed_to_unit_maps_zero_to_half_and_scales_by_max_abs():
    out = signed_to_unit(np.array([[-2.0, 0.0, 1.0, 2.0]]))
    np.testing.assert_allclose(out, [[0.0, 0.5, 0.75, 1.0]])
    assert out.dtype == np.float32


def test_signed_to_unit_is_symmetric_when_only_one_sign_present():
    # A purely negative map must stay in the lower half (blue), not be stretched to [0, 1].
    out = signed_to_unit(np.array([-1.0, -0.5]))
    np.testing.assert_allclose(out, [0.0, 0.25])
    out = signed_to_unit(np.array([0.25, 0.5]))
    np.testing.assert_allclose(out, [0.75, 1.0])


def test_signed_to_unit_all_zero_and_nan():
    np.testing.assert_array_equal(signed_to_unit(np.zeros((3, 4))), np.full((3, 4), 0.5))
    np.testing.assert_array_equal(signed_to_unit(np.full((2, 2), np.nan)), np.full((2, 2), 0.5))
    out = signed_to_unit(np.array([np.nan, 4.0, -np.inf]))
    np.testing.assert_allclose(out, [0.5, 1.0, 0.0])


def test_bwr_shows_positive_red_and_negative_blue():
    rgb = apply_colormap(signed_to_unit(np.array([[-1.0, 0.0, 1.0]])), "bwr")
    neg, zero, pos = (tuple(int(v) for v in c) for c in rgb[0])
    assert neg[2] > 200 and neg[0] < 50
    assert pos[0] > 200 and pos[2] < 50
    assert min(zero) > 240
