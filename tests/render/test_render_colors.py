import numpy as np
import pytest

from vitlens.errors import VitlensError
from vitlens.render import ColormapError, apply_colormap, signed_to_unit
from vitlens.render.colors import SIGNED_PERCENTILE, colormap_image, signed_bound


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


def test_signed_to_unit_maps_zero_to_half_and_scales_by_max_abs_at_percentile_100():
    out = signed_to_unit(np.array([[-2.0, 0.0, 1.0, 2.0]]), percentile=100)
    np.testing.assert_allclose(out, [[0.0, 0.5, 0.75, 1.0]])
    assert out.dtype == np.float32


def test_signed_to_unit_is_symmetric_when_only_one_sign_present():
    # A purely negative map must stay in the lower half (blue), not be stretched to [0, 1].
    out = signed_to_unit(np.array([-1.0, -0.5]), percentile=100)
    np.testing.assert_allclose(out, [0.0, 0.25])
    out = signed_to_unit(np.array([0.25, 0.5]), percentile=100)
    np.testing.assert_allclose(out, [0.75, 1.0])


def test_heavy_tailed_relevance_is_scaled_by_a_high_percentile_not_the_maximum():
    # 999 pixels of relevance 1 (half of them negative) and one of 1000: scaled by the maximum, every
    # ordinary pixel would sit 0.0005 from the neutral colour; scaled by the 99th percentile of |R| they
    # get the full colour and the outlier saturates.
    relevance = np.ones(1000)
    relevance[::2] = -1.0
    relevance[7] = 1000.0
    assert signed_bound(relevance) == pytest.approx(np.percentile(np.abs(relevance), SIGNED_PERCENTILE))
    out = signed_to_unit(relevance)
    assert out[7] == 1.0 and out[1] == 1.0 and out[0] == 0.0
    assert abs(signed_to_unit(relevance, percentile=100)[1] - 0.5) < 1e-3


def test_sparse_relevance_falls_back_to_the_maximum():
    # more than 1 % of non-zero pixels is needed for the percentile to be positive: a map with a
    # few non-zero pixels is scaled by its maximum instead of drawing nothing
    relevance = np.zeros(1000)
    relevance[3], relevance[4] = 2.0, -1.0
    assert signed_bound(relevance) == 2.0
    np.testing.assert_allclose(signed_to_unit(relevance)[[3, 4, 5]], [1.0, 0.25, 0.5])


def test_signed_to_unit_all_zero_and_nan():
    np.testing.assert_array_equal(signed_to_unit(np.zeros((3, 4))), np.full((3, 4), 0.5))
    np.testing.assert_array_equal(signed_to_unit(np.full((2, 2), np.nan)), np.full((2, 2), 0.5))
    out = signed_to_unit(np.array([np.nan, 4.0, -np.inf]), percentile=100)
    np.testing.assert_allclose(out, [0.5, 1.0, 0.0])


def test_bwr_shows_positive_red_and_negative_blue():
    rgb = apply_colormap(signed_to_unit(np.array([[-1.0, 0.0, 1.0]])), "bwr")
    neg, zero, pos = (tuple(int(v) for v in c) for c in rgb[0])
    assert neg[2] > 200 and neg[0] < 50
    assert pos[0] > 200 and pos[2] < 50
    assert min(zero) > 240


def test_signed_colour_map_puts_zero_relevance_at_the_neutral_colour():
    # the diverging colormap of signed overlays is white (neutral) at zero relevance and symmetric
    from vitlens.cliargs import SIGNED_CMAP

    colours = apply_colormap(signed_to_unit(np.array([[-1.0, 0.0, 1.0]])), SIGNED_CMAP).astype(int)
    assert colours[0, 1].min() >= 250
    assert colours[0, 0][2] > 200 and colours[0, 2][0] > 200
    np.testing.assert_array_equal(colours[0, 0][::-1], colours[0, 2])



@pytest.mark.parametrize("cmap", ["jet", "bwr", "viridis", "gray", "RdBu_r", "tab10", "vitlens_test_1000"])
def test_apply_colormap_is_matplotlibs_own_quantisation(cmap, many_entry_colormap):
    """The cached byte table gives exactly what ``colormap(values, bytes=True)`` gives, edges included."""
    from matplotlib import colormaps

    rng = np.random.default_rng(7)
    values = np.concatenate([rng.random(5000), [0.0, 1.0, 0.5, 1 - 1e-7, 1 / 256, 255 / 256, np.nextafter(1, 0)]])
    values = values.astype(np.float32).reshape(1, -1)
    expected = colormaps[cmap](values, bytes=True)[..., :3]
    np.testing.assert_array_equal(apply_colormap(values, cmap), expected)
    # what overlays draw with: the same colours as a picture (a palette lookup for N <= 256 entries)
    np.testing.assert_array_equal(np.asarray(colormap_image(values, cmap)), expected)


@pytest.fixture(scope="module")
def many_entry_colormap():
    """A colormap of 1000 entries (more than a palette image holds), registered for this module only."""
    from matplotlib import colormaps
    from matplotlib.colors import LinearSegmentedColormap

    colormaps.register(LinearSegmentedColormap.from_list("vitlens_test_1000", ["navy", "gold", "crimson"], N=1000))
    assert colormaps["vitlens_test_1000"].N == 1000
    yield
    colormaps.unregister("vitlens_test_1000")
