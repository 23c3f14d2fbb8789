"""Every form a user can hand an image in gives the model the same input as the image's file (issue: a PIL
``I;16`` image saturated to white, a PIL RGBA image lost its alpha, a 0..255 float array was clipped to white)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from tests.conftest import SHARED_DATA, VIT_TINY_SPEC, VIT_TINY_WEIGHTS, requires_shared, tiny_timm_vit
from vitlens.api import prepare_inputs
from vitlens.data import load_image
from vitlens.data.images import image_from_array, to_rgb_image
from vitlens.errors import InputError

PHOTO = SHARED_DATA / "imagenet_val_1300" / "images" / "ILSVRC2012_val_00000347.JPEG"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo (a synthetic one where ../shared is absent), 96 x 72, uint8 RGB."""
    if PHOTO.is_file():
        with Image.open(PHOTO) as im:
            return np.asarray(im.convert("RGB").resize((96, 72), Image.Resampling.BILINEAR))
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    return vitlens.load_model(tiny_timm_vit(img_size=64, patch_size=16))


def model_input(model, item) -> torch.Tensor:
    x, _ = prepare_inputs(model, item)
    return x[0] * torch.tensor(model.preprocess.std)[:, None, None]  # in units of the [0, 1] pixel scale


def saved(tmp_path, image: Image.Image, name: str) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def check_forms(model, reference_path: str, forms: dict) -> None:
    expected_pixels = np.asarray(load_image(reference_path), dtype=np.int64)
    expected_input = model_input(model, reference_path)
    for name, item in forms.items():
        pixels = np.asarray(to_rgb_image(item), dtype=np.int64)
        assert pixels.shape == expected_pixels.shape, name
        assert np.abs(pixels - expected_pixels).max() <= 1, name
        assert (model_input(model, item) - expected_input).abs().max() <= 1 / 255 + 1e-6, name


def test_colour_forms(tmp_path, model, photo):
    rgb = Image.fromarray(photo)
    path = saved(tmp_path, rgb, "photo.png")
    encoded = open(path, "rb").read()
    chw = np.moveaxis(photo, -1, 0)
    opaque = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    few_colours = np.asarray(rgb.quantize(64).convert("RGB"))  # exactly representable as a palette image
    check_forms(model, path, {
        "path": path, "bytes": encoded, "file object": io.BytesIO(encoded), "PIL RGB": rgb,
        "PIL RGBA, opaque": Image.fromarray(opaque), "PIL CMYK": rgb.convert("CMYK"),
        "CMYK TIFF": saved(tmp_path, rgb.convert("CMYK"), "photo_cmyk.tif"),
        "uint8 HWC": photo, "uint8 CHW": chw, "uint8 HWC4 opaque": opaque,
        "uint8 4HW opaque": np.moveaxis(opaque, -1, 0),
        "uint16 HWC": photo.astype(np.uint16) * 257, "uint16 CHW": chw.astype(np.uint16) * 257,
        "float32 HWC": photo.astype(np.float32) / 255, "float64 CHW": chw / 255.0,
        "float16 HWC": (photo / 255.0).astype(np.float16),
        "uint8 tensor CHW (torchvision.io.read_image)": torch.from_numpy(chw.copy()),
        "uint8 tensor HWC": torch.from_numpy(photo.copy()),
        "uint16 tensor CHW": torch.from_numpy(chw.astype(np.int32) * 257).to(torch.uint16),
    })
    palette_path = saved(tmp_path, Image.fromarray(few_colours).quantize(64), "palette.png")
    check_forms(model, palette_path, {"PIL P": Image.open(palette_path), "uint8": few_colours})


def test_grayscale_forms(tmp_path, model, photo):
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    path = saved(tmp_path, Image.fromarray(gray), "gray.png")
    sixteen = gray.astype(np.uint16) * 257
    sixteen_path = saved(tmp_path, Image.fromarray(sixteen), "gray16.png")
    assert Image.open(sixteen_path).mode.startswith("I")
    check_forms(model, path, {
        "16-bit PNG path": sixteen_path, "PIL L": Image.fromarray(gray),
        "PIL LA, opaque": Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1)),
        "PIL I;16": Image.fromarray(sixteen), "PIL I;16 from the file": Image.open(sixteen_path),
        "PIL I": Image.fromarray(sixteen.astype(np.int32)), "PIL F": Image.fromarray(gray.astype(np.float32) / 255),
        "uint8 HW": gray, "uint8 HW1": gray[..., None], "uint8 1HW": gray[None], "uint16 HW": sixteen,
        "float32 HW": gray.astype(np.float32) / 255, "uint8 tensor 1HW": torch.from_numpy(gray[None].copy()),
    })
    bilevel = gray > 127
    bilevel_path = saved(tmp_path, Image.fromarray(bilevel), "bilevel.png")
    assert Image.open(bilevel_path).mode == "1"
    check_forms(model, bilevel_path, {"PIL 1": Image.fromarray(bilevel), "bool HW": bilevel,
                                      "uint8 0/255": bilevel.astype(np.uint8) * 255})


def test_transparent_forms_are_composited_over_white_like_their_file(tmp_path, model, photo):
    alpha = np.tile(np.linspace(0, 255, photo.shape[1]).astype(np.uint8), (photo.shape[0], 1))
    rgba = np.concatenate([photo, alpha[..., None]], axis=-1)
    path = saved(tmp_path, Image.fromarray(rgba), "rgba.png")
    check_forms(model, path, {"PIL RGBA": Image.fromarray(rgba), "uint8 HWC4": rgba,
                              "uint8 4HW": np.moveaxis(rgba, -1, 0), "float32 HWC4": rgba.astype(np.float32) / 255})
    gray_alpha = np.stack([rgba[..., 1], alpha], axis=-1)
    la_path = saved(tmp_path, Image.fromarray(gray_alpha), "la.png")
    check_forms(model, la_path, {"PIL LA": Image.fromarray(gray_alpha), "uint8 HW2": gray_alpha})
    # the composite really happened: the transparent left edge is white, not the photo
    assert (np.asarray(to_rgb_image(Image.fromarray(rgba)))[:, 0] == 255).all()


@pytest.mark.parametrize("item, fragment", [
    (np.full((8, 8, 3), 200.0, np.float32), "must lie in [0, 1], got 200..200 (divide by 255)"),
    (np.full((8, 8), -0.5), "must lie in [0, 1]"),
    (np.array([[0.5, np.nan]]), "NaN or infinite"),
    (np.zeros((8, 8, 3), np.int64), "int64 pixel values are ambiguous"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), "int32 pixel values are ambiguous"),
    (np.zeros((8, 8, 5), np.uint8), "got shape (8, 8, 5)"),
    (np.zeros((2, 8, 8, 3), np.uint8), "got shape (2, 8, 8, 3)"),
    (b"not an image", "cannot read image 'input 0': not an image file"),
    (12, "cannot explain an input of type int"),
])
def test_what_cannot_be_an_image_is_one_line(model, item, fragment):
    with pytest.raises(InputError) as info:
        prepare_inputs(model, item)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_a_float_tensor_is_still_preprocessed_input(model):
    x = torch.randn(2, 3, 64, 64)
    batch, records = prepare_inputs(model, x)
    assert torch.equal(batch, x) and records[0].image is None
    with pytest.raises(InputError, match="preprocessed model input"):
        image_from_array(torch.rand(3, 8, 8))


def test_the_users_pil_image_is_left_as_it_was(photo):
    im = Image.fromarray(np.concatenate([photo, np.full(photo.shape[:2] + (1,), 128, np.uint8)], -1))
    before = np.asarray(im).copy()
    to_rgb_image(im)
    assert im.mode == "RGBA" and np.array_equal(np.asarray(im), before)


@requires_shared
def test_a_16_bit_photo_is_predicted_alike_as_a_path_and_as_a_pil_image(tmp_path):
    """The real ViT-Tiny on a 16-bit grayscale PNG: the path and the PIL ``I;16`` image give the same logits
    (the PIL image used to be converted with ``.convert('RGB')``, which saturated it to white)."""
    with Image.open(PHOTO) as im:
        gray = np.asarray(im.convert("L"), dtype=np.uint16) * 257
    path = saved(tmp_path, Image.fromarray(gray), "photo16.png")
    model = vitlens.load_model(VIT_TINY_SPEC, weights=VIT_TINY_WEIGHTS)
    result = vitlens.explain(model, [path, Image.open(path), gray], methods="attention")
    assert torch.allclose(result.probabilities[1], result.probabilities[0], atol=1e-6)
    assert torch.allclose(result.probabilities[2], result.probabilities[0], atol=1e-6)
