import numpy as np
import pytest
from PIL import Image

from tests.conftest import SHARED_DATA
from vitlens.render import (
    RenderError,
    apply_colormap,
    heatmap_image,
    overlay,
    resize_map,
    signed_overlay,
    signed_to_unit,
)


@pytest.fixture
def photo():
    rng = np.random.default_rng(1)
    # 37 wide x 53 tall: odd, non-square, unrelated to the 14x14 map.
    return Image.fromarray(rng.integers(0, 256, (53, 37, 3), dtype=np.uint8))


def test_resize_map_uses_width_height_order_and_keeps_range(gradient_map):
    out = resize_map(gradient_map, (37, 53))
    assert out.shape == (53, 37) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # The left-to-right ramp survives resizing.
    assert (np.diff(out[0]) >= -1e-6).all() and out[0, -1] > out[0, 0]


def test_resize_map_downscale_stays_in_range():
    rng = np.random.default_rng(2)
    big = rng.random((100, 80)) * 4 - 2
    out = resize_map(big, (7, 9))
    assert out.shape == (9, 7)
    assert out.min() >= big.min() - 1e-6 and out.max() <= big.max() + 1e-6


def test_resize_map_same_size_is_identity(gradient_map):
    np.testing.assert_array_equal(resize_map(gradient_map, (14, 14)), gradient_map)


def test_overlay_keeps_original_resolution(photo, gradient_map):
    out = overlay(photo, gradient_map)
    assert out.size == (37, 53) and out.mode == "RGB"


def test_alpha_zero_returns_original_pixels(photo, gradient_map):
    out = overlay(photo, gradient_map, alpha=0.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(photo))


def test_alpha_one_returns_pure_colormap(photo, gradient_map):
    out = overlay(photo, gradient_map, cmap="jet", alpha=1.0)
    expected = apply_colormap(resize_map(gradient_map, photo.size), "jet")
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_half_alpha_is_the_average(photo):
    out = overlay(photo, np.zeros((14, 14)), cmap="gray", alpha=0.5)  # gray(0) is black
    expected = np.rint(np.asarray(photo, dtype=np.float32) * 0.5)
    np.testing.assert_allclose(np.asarray(out, dtype=np.float32), expected, atol=1)


def test_nan_counts_as_zero_and_out_of_range_is_clipped(photo):
    zeros = np.asarray(overlay(photo, np.zeros((4, 4)), alpha=1.0))
    ones = np.asarray(overlay(photo, np.ones((4, 4)), alpha=1.0))
    np.testing.assert_array_equal(np.asarray(overlay(photo, np.full((4, 4), np.nan), alpha=1.0)), zeros)
    np.testing.assert_array_equal(np.asarray(overlay(photo, np.full((4, 4), -5.0), alpha=1.0)), zeros)
    np.testing.assert_array_equal(np.asarray(overlay(photo, np.full((4, 4), 9.0), alpha=1.0)), ones)


def test_overlay_accepts_grayscale_and_rgba_images(gradient_map):
    for mode in ("L", "RGBA", "P"):
        img = Image.new(mode, (20, 10))
        out = overlay(img, gradient_map)
        assert out.size == (20, 10) and out.mode == "RGB"


def test_bad_alpha_is_a_user_error(photo, gradient_map):
    for alpha in (-0.1, 1.5):
        with pytest.raises(RenderError, match="alpha"):
            overlay(photo, gradient_map, alpha=alpha)


def test_signed_overlay_red_positive_blue_negative():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    relevance = np.zeros((2, 4))
    relevance[:, :2] = -3.0
    relevance[:, 2:] = 1.5
    out = np.asarray(signed_overlay(img, relevance, alpha=1.0)).astype(int)
    assert out.shape == (20, 40, 3)
    left, right = out[10, 2], out[10, 37]
    assert left[2] > 200 and left[0] < 50  # blue at the scale's bound: the colour itself
    # +1.5 against a bound of about 3: bwr's half-way red (255, 128, 128) at half opacity over black
    assert 110 < right[0] < 140 and right[0] > right[1] + 50 and abs(right[1] - right[2]) <= 1


def test_zero_relevance_leaves_the_photo_untouched():
    photo = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    img = Image.fromarray(photo)
    for relevance in (np.zeros((2, 2)), np.array([[0.0, 0.0], [0.0, 5.0]])):
        out = np.asarray(signed_overlay(img, relevance, alpha=1.0))
        # the top-left quarter is far from the non-zero patch (bilinear resizing reaches one patch)
        np.testing.assert_array_equal(out[:4, :4], photo[:4, :4])
    assert (np.asarray(signed_overlay(img, np.array([[0.0, 0.0], [0.0, 5.0]]), alpha=1.0))[-1, -1]
            != photo[-1, -1]).any()


@pytest.mark.parametrize("alpha", [0.7, 1.0, 0.3])
def test_signed_overlay_is_the_per_pixel_blend_within_one_grey_level(alpha):
    """(1 - w) photo + w colour with w = alpha |2u - 1|, stated in float64: Pillow's masked blend is at most one
    grey level away from it (its mask holds w in steps of 1/255)."""
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8))
    relevance = rng.standard_normal((7, 9))
    unit = resize_map(signed_to_unit(relevance), img.size).astype(np.float64)
    weight = (alpha * np.abs(2.0 * unit - 1.0))[..., None]
    exact = (1.0 - weight) * np.asarray(img, dtype=np.float64) + weight * apply_colormap(unit, "bwr")
    got = np.asarray(signed_overlay(img, relevance, cmap="bwr", alpha=alpha), dtype=np.float64)
    assert np.abs(got - exact).max() <= 1.0
    assert np.abs(got - np.rint(exact)).max() <= 1.0


def test_heatmap_image_has_map_resolution(gradient_map):
    img = heatmap_image(gradient_map[:, :10], cmap="jet")
    assert img.size == (10, 14) and img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), apply_colormap(gradient_map[:, :10], "jet"))


@pytest.fixture(params=["isal", "zlib"])
def deflate(request, monkeypatch):
    """photo_png with each of its compressors: ISA-L where the isal package is installed, zlib where it is not."""
    import importlib

    overlay_module = importlib.import_module("vitlens.render.overlay")  # the package exports a function of that name

    if request.param == "isal" and overlay_module._isal_zlib is None:
        pytest.skip("isal is not installed")
    if request.param == "zlib":
        monkeypatch.setattr(overlay_module, "_isal_zlib", None)
    return request.param


@pytest.mark.parametrize("size", [(1, 1), (2, 1), (227, 227), (517, 300), (40, 600)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_photo_png_is_a_lossless_png_any_reader_decodes(tmp_path, size, mode, deflate):
    """Overlays are written by vitlens's own encoder (Sub filter, ISA-L or zlib deflate): Pillow decodes the file
    back to exactly the pixels, across the encoder's 256-row blocks and for inputs of other modes (converted to
    RGB)."""
    import io

    from vitlens.render.overlay import photo_png

    rng = np.random.default_rng(sum(size))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    buffer = io.BytesIO()
    photo_png(image, buffer)
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    decoded.load()
    assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == size
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image.convert("RGB")))


def test_a_real_photo_overlay_is_about_as_small_as_pillows(tmp_path, deflate):
    """The speed comes from the filter choice and the deflate implementation, not from giving up compression: a
    real ImageNet overlay's file is within 15 % of Pillow's Huffman-only PNG of the same image (5 % with ISA-L)."""
    import io
    import zlib

    from vitlens.render.overlay import photo_png, save_png_atomic

    photo = Image.open(sorted((SHARED_DATA / "imagenet_val_1300" / "images").glob("*.JPEG"))[0]).convert("RGB")
    drawn = overlay(photo, np.linspace(0, 1, 14 * 14).reshape(14, 14))
    ours, pillows = io.BytesIO(), io.BytesIO()
    photo_png(drawn, ours)
    drawn.save(pillows, format="PNG", compress_type=zlib.Z_HUFFMAN_ONLY)
    assert len(ours.getvalue()) <= (1.05 if deflate == "isal" else 1.15) * len(pillows.getvalue())
    path = save_png_atomic(drawn, tmp_path / "overlay.png", photo=True)
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(drawn))
