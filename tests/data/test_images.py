"""load_image: every common kind of file becomes an upright 8-bit RGB image, or one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitlens.data import IMAGE_EXTENSIONS, is_image_file, load_image
from vitlens.data import images as images_module
from vitlens.errors import InputError

# The real images shipped next to the repository (skipped when absent).
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _rgb(path) -> np.ndarray:
    im = load_image(path)
    assert im.mode == "RGB"
    return np.asarray(im)


def _one_line_error(path, match: str) -> str:
    with pytest.raises(InputError, match=match) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot read image '{path}': ")
    return message


@pytest.mark.parametrize(
    "ext", [".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm"]
)
def test_common_formats_decode_to_rgb(tmp_path, write_image, ext):
    path = write_image(tmp_path / f"img{ext}", size=(9, 7), color=(200, 30, 30))
    pixels = _rgb(path)
    assert pixels.shape == (7, 9, 3)
    # JPEG/WebP are lossy: the solid colour only has to come back close.
    assert np.abs(pixels.astype(int) - [200, 30, 30]).max() <= 6


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    Image.fromarray(gray, mode="L").save(tmp_path / "g.pgm")
    for name in ("g.png", "g.pgm"):
        pixels = _rgb(tmp_path / name)
        for channel in range(3):
            np.testing.assert_array_equal(pixels[..., channel], gray)


def test_bilevel_image(tmp_path):
    Image.new("1", (3, 2), 1).save(tmp_path / "b.png")
    assert (_rgb(tmp_path / "b.png") == 255).all()


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really stored as 16-bit
    pixels = _rgb(tmp_path / "deep.png")[0, :, 0]
    # v * 255 / 65535 rounded: clipping would have turned 1000 and 32896 into 255.
    np.testing.assert_array_equal(pixels, [0, 1, 4, 128, 255])


def test_32bit_integer_and_float_images(tmp_path):
    Image.fromarray(np.array([[-10, 0, 10]], dtype=np.int32), mode="I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(_rgb(tmp_path / "i.tif")[0, :, 1], [0, 128, 255])
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(
        tmp_path / "f.tif"
    )
    np.testing.assert_array_equal(_rgb(tmp_path / "f.tif")[0, :, 2], [0, 128, 255])


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    pixels = _rgb(tmp_path / "a.png")[0]
    np.testing.assert_array_equal(pixels[0], [255, 255, 255])  # fully transparent -> white
    np.testing.assert_array_equal(pixels[1], [0, 0, 255])  # opaque -> unchanged
    assert np.abs(pixels[2].astype(int) - 127).max() <= 1  # half black over white -> mid gray


def test_la_is_composited_over_white(tmp_path):
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert (_rgb(tmp_path / "la.png") == 255).all()


@pytest.mark.parametrize("ext", [".png", ".gif"])
def test_palette_with_transparency(tmp_path, ext):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    im.save(tmp_path / f"p{ext}", transparency=0)
    pixels = _rgb(tmp_path / f"p{ext}")
    np.testing.assert_array_equal(pixels[0, 0], [255, 255, 255])  # transparent index -> white
    np.testing.assert_array_equal(pixels[1, 1], [0, 255, 0])


def test_palette_without_transparency(tmp_path):
    Image.new("RGB", (4, 4), (0, 0, 255)).convert("P").save(tmp_path / "p.png")
    np.testing.assert_array_equal(_rgb(tmp_path / "p.png")[2, 2], [0, 0, 255])


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (5, 5), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    pixels = _rgb(tmp_path / "anim.gif")
    assert pixels[2, 2, 0] > 200 and pixels[2, 2, 2] < 50


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert np.abs(_rgb(tmp_path / "cmyk.jpg")[4, 4].astype(int) - [255, 0, 0]).max() <= 6


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high, left half red, right half blue; orientation 6 = "rotate 90 CW to view".
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    im = load_image(tmp_path / "phone.jpg")
    assert im.size == (20, 40)
    pixels = np.asarray(im).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # left (red) is now on top
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60


def test_tiny_one_pixel_image(tmp_path, write_image):
    path = write_image(tmp_path / "dot.png", size=(1, 1), color=(1, 2, 3))
    assert load_image(path).size == (1, 1)
    np.testing.assert_array_equal(_rgb(path)[0, 0], [1, 2, 3])


def test_result_is_a_detached_copy(tmp_path, write_image):
    path = write_image(tmp_path / "x.png")
    im = load_image(path)
    path.unlink()
    assert im.getpixel((0, 0)) == (200, 30, 30)  # fully decoded before the file went away


def test_format_is_found_from_content_not_extension(tmp_path):
    Image.new("RGB", (3, 3), (0, 255, 0)).save(tmp_path / "really_png.jpg", format="PNG")
    np.testing.assert_array_equal(_rgb(tmp_path / "really_png.jpg")[1, 1], [0, 255, 0])


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.jpg", "no such file")


def test_directory(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    _one_line_error(tmp_path / "folder.jpg", "is a directory")


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    _one_line_error(tmp_path / "empty.png", "file is empty")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\nsecond line\n")
    _one_line_error(tmp_path / "notes.jpg", "not an image file")


def test_truncated_jpeg(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    _one_line_error(tmp_path / "cut.jpg", "truncated or corrupt")


def test_corrupt_png(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "ok.png")
    data = bytearray((tmp_path / "ok.png").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)  # damage compressed pixel data inside IDAT
    (tmp_path / "bad.png").write_bytes(bytes(data))
    _one_line_error(tmp_path / "bad.png", "truncated or corrupt")


def test_too_large_is_refused_before_decoding(tmp_path, write_image, monkeypatch):
    path = write_image(tmp_path / "big.png", size=(30, 20))
    monkeypatch.setattr(images_module, "MAX_PIXELS", 500)
    message = _one_line_error(path, "too large")
    assert "30x20" in message


def test_pil_bomb_limit_is_raised_to_400_megapixels():
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= 400_000_000
    assert images_module.MAX_PIXELS == 400_000_000


def test_image_extensions():
    required = {
        ".jpeg",
        ".jpg",
        ".png",
        ".webp",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".jfif",
        ".ppm",
        ".pgm",
    }
    assert required <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


def test_is_image_file(tmp_path, write_image):
    assert is_image_file(write_image(tmp_path / "UPPER.JPG"))
    assert is_image_file(str(tmp_path / "UPPER.JPG"))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "dir.png").mkdir()
    assert not is_image_file(tmp_path / "notes.txt")
    assert not is_image_file(tmp_path / "dir.png")
    assert not is_image_file(tmp_path / "missing.png")


@pytest.mark.real_data
@pytest.mark.skipif(not (SHARED_DATA / "demo_images").is_dir(), reason="shared data not present")
def test_real_jfif_demo_image():
    im = load_image(SHARED_DATA / "demo_images" / "gradcam_dog_cat.jfif")
    assert im.mode == "RGB" and im.size == (284, 177)


# --------------------------------------------------------------------------- decoding at reduced size
FULLRES = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet_val_fullres_11" / "images"


def _large_photo(path: Path, size=(4000, 3000), orientation: int | None = None) -> Path:
    """A real ImageNet photo enlarged to ``size`` and saved as a JPEG (optionally with an EXIF orientation)."""
    with Image.open(FULLRES / "ILSVRC2012_val_00000008.JPEG") as photo:
        big = photo.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    options = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    big.save(path, quality=90, **options)
    return path


@pytest.mark.skipif(not FULLRES.is_dir(), reason="../shared/data is not beside the checkout")
def test_a_large_jpeg_is_decoded_at_the_largest_reduction_that_keeps_the_size_asked_for(tmp_path):
    path = _large_photo(tmp_path / "big.jpg")
    asked = []

    def reduce(size):
        asked.append(size)
        return (900, 700)

    small = load_image(path, reduce=reduce)
    assert asked == [(4000, 3000)]
    assert small.size == (1000, 750)  # 1/4: 1/8 would be 500 x 375, below what was asked
    assert small.mode == "RGB" and small.info[images_module.ORIGINAL_SIZE] == (4000, 3000)
    full = load_image(path)
    assert full.size == (4000, 3000) and images_module.ORIGINAL_SIZE not in full.info
    # the reduced decode is the same picture: compare it with the full decode shrunk to the same size
    shrunk = np.asarray(full.resize(small.size, Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(small, dtype=np.float64) - shrunk).mean() < 3
    # nothing to gain (less than 2x) or not a JPEG: decoded whole
    assert load_image(path, reduce=lambda size: (2500, 1900)).size == (4000, 3000)
    png = tmp_path / "big.png"
    full.save(png)
    assert load_image(png, reduce=reduce).size == (4000, 3000)


@pytest.mark.skipif(not FULLRES.is_dir(), reason="../shared/data is not beside the checkout")
def test_a_reduced_decode_keeps_the_exif_orientation_and_says_the_upright_size(tmp_path):
    path = _large_photo(tmp_path / "rotated.jpg", size=(4000, 3000), orientation=6)
    small = load_image(path, reduce=lambda size: (900, 700))
    assert small.size == (750, 1000)
    assert small.info[images_module.ORIGINAL_SIZE] == (3000, 4000)
    assert load_image(path).size == (3000, 4000)
