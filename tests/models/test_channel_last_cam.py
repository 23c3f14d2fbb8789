"""Grad-CAM on layers whose output is not (B, C, h, w): channel-last maps and token sequences.

timm Swin / Swin-V2 stages and norms give (B, h, w, C), Swin's ``norm2`` (B, h*w, C), ConvNeXt and
MaxViT block internals (B, h, w, C). The CNN adapter's dry run decides each layer's layout; these
tests check the maps against pytorch-grad-cam run with the Swin ``reshape_transform`` of its
tutorial on the same model, layer and targets, the real grid of the maps, and the one-line errors
for layers that cannot be placed on the input grid (never a silently transposed map).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlens
from vitlens import cli
from vitlens.errors import MethodError
from vitlens.models.cnn import wrap
from vitlens.models.layers import find_module
from vitlens.models.preprocess import Preprocess

pgc = pytest.importorskip("pytorch_grad_cam")
timm = pytest.importorskip("timm")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

OURS_TO_THEIRS = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
}
SWINS = {"swin": "swin_tiny_patch4_window7_224", "swinv2": "swinv2_tiny_window8_256"}


def tiny_swin(kind: str = "swin", seed: int = 0, **kwargs) -> nn.Module:
    """64 px input, 4 px patches, windows of 4: a 16x16 grid in stage 0, 8x8 in stage 1.

    The LayerNorm gains and biases are drawn at random: Swin-V2 zero-initialises its post-norms
    (``norm1``, ``norm2``), whose outputs, and so every Grad-CAM map read there, would be exactly 0.
    """
    torch.manual_seed(seed)
    options = dict(img_size=64, patch_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4,
                   num_classes=10)
    options.update(kwargs)
    module = timm.create_model(SWINS[kind], pretrained=False, **options).eval()
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.LayerNorm):
                sub.weight.normal_(1.0, 0.3)
                sub.bias.normal_(0.0, 0.1)
    return module


def nhwc_reshape(tensor):
    """pytorch-grad-cam's transform for a (B, H, W, C) layer: channels first, like a CNN."""
    return tensor.permute(0, 3, 1, 2)


def tokens_reshape(tensor, height=8, width=8):
    """pytorch-grad-cam's Swin tutorial transform, for (B, H*W, C) tokens."""
    result = tensor.reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def pytorch_grad_cam(method, module, layer, x, targets, reshape):
    with OURS_TO_THEIRS[method](model=module, target_layers=[find_module(module, layer)],
                                reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])


def compare(method, module, x, targets, their_layer, reshape, our_layer=None, dtype=torch.float64,
            load=vitlens.load_model):
    """Run pytorch-grad-cam and vitlens on the same model, layer and targets; return our raw maps.

    In float64 by default: XGrad-CAM divides by each channel's sum over the map, and the sums of
    LayerNorm outputs (Swin's norms) are near zero, which amplifies float32 rounding to 1e-4 in both
    libraries alike (measured against float64); in float64 the two agree to pytorch-grad-cam's own
    epsilons (1e-7 in its min-max).
    """
    module = copy.deepcopy(module).to(dtype)
    x = x.to(dtype)
    theirs = pytorch_grad_cam(method, module, their_layer, x, targets, reshape)
    model = load(module)
    params = {} if our_layer is None else {method: {"layers": [our_layer]}}
    ours = vitlens.explain(model, x, methods=[method], target=targets, params=params).patch_maps[method]
    assert_informative(ours)
    assert_same_pixels(ours, theirs, atol=1e-6 if dtype == torch.float64 else 1e-5)
    return ours


def assert_same_pixels(patch_maps, theirs, atol=1e-5):
    """Our raw (B, 1, h, w) maps, in pixels, equal pytorch-grad-cam's maps to float32 rounding.

    As in tests/methods/test_gradcam.py, the raw map is upsampled bilinearly (align_corners=False)
    and min-maxed once, which equals pytorch-grad-cam's min-max, cv2 resize, min-max since resizing
    is affine. The min-max here has no epsilon: random-init Swins give raw maps of about 1e-4, where
    vitlens's pixel-map epsilon (1e-8 in ``max - min + 1e-8``) alone would move values by 3e-5.
    (pytorch-grad-cam's own 1e-7 is divided away by its second min-max.)
    """
    size = theirs.shape[-2:]
    up = F.interpolate(patch_maps.double(), size=size, mode="bilinear", align_corners=False)[:, 0]
    low, high = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    np.testing.assert_allclose(((up - low) / (high - low)).numpy(), theirs, atol=atol)


def assert_informative(maps):
    """Every image's raw map has cells well above pytorch-grad-cam's epsilon (1e-7), so the comparison is
    not between two blank (or epsilon-dominated) maps."""
    assert (maps.flatten(2).amax(dim=2) > 1e-5).all(), maps.flatten(2).amax(dim=2)


# ------------------------------------------------------------------------------ Swin, Swin-V2
@pytest.fixture(scope="module", params=list(SWINS))
def swin(request):
    return request.param, tiny_swin(request.param, seed=3)


def test_layouts_and_default_layer(swin):
    _, module = swin
    model = vitlens.load_model(module)
    assert model.preprocess.input_size == (64, 64)  # the model's img_size, not its pretrained config's 224
    assert model.default_cam_layers() == ["norm"]
    layouts = model.layer_layouts
    assert layouts["patch_embed.proj"] == "NCHW"
    assert layouts["norm"] == layouts["layers.1.blocks.1.norm1"] == layouts["layers.0"] == "NHWC"
    assert layouts["layers.1.blocks.1.norm2"] == "NLC"
    assert model.layer_scan.layouts["norm"].grid == (8, 8)
    assert model.layer_scan.layouts["layers.0"].grid == (16, 16)
    # window attention works on (B * windows, tokens, C): not a batch of maps
    assert "layers.0.blocks.0.attn" not in layouts


# layer (None = the default, ``norm``), pytorch-grad-cam's reshape_transform for it
SWIN_LAYERS = {
    "default": (None, "norm", nhwc_reshape),
    "alias-nhwc": ("layers.-1.blocks.-1.norm1", "layers.-1.blocks.-1.norm1", nhwc_reshape),
    "tokens": ("layers.1.blocks.1.norm2", "layers.1.blocks.1.norm2", tokens_reshape),
}


@pytest.mark.parametrize("layer_key", list(SWIN_LAYERS))
@pytest.mark.parametrize("method", list(OURS_TO_THEIRS))
def test_equals_pytorch_grad_cam_on_swin(swin, method, layer_key):
    _, module = swin
    our_layer, their_layer, reshape = SWIN_LAYERS[layer_key]
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours = compare(method, module, x, [1, 5, 9], their_layer, reshape, our_layer)
    assert ours.shape == (3, 1, 8, 8)  # the last stage's grid, not (..., 8, C)


@pytest.mark.parametrize("method", list(OURS_TO_THEIRS))
def test_equals_pytorch_grad_cam_on_swin_in_float32(swin, method):
    """The default layer in the model's own float32, to float32 rounding (as tests/methods/test_gradcam.py)."""
    _, module = swin
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours = compare(method, module, x, [1, 5, 9], "norm", nhwc_reshape, dtype=torch.float32)
    assert ours.dtype == torch.float32


def test_raw_map_is_grad_cam_of_the_permuted_activation():
    """The raw 8x8 map equals Grad-CAM computed by hand from the (B, h, w, C) output of ``norm``."""
    module = tiny_swin(seed=5)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    saved = {}
    handle = module.norm.register_forward_hook(lambda mod, inputs, output: saved.setdefault("a", output))
    try:
        logits = module(x)
    finally:
        handle.remove()
    a = saved["a"]  # (B, h, w, C)
    g = torch.autograd.grad(logits[:, 7].sum(), a)[0]
    weights = g.mean(dim=(1, 2))  # channels are the last dimension here
    expected = torch.einsum("bc,bhwc->bhw", weights, a).clamp_min(0).detach()
    ours = vitlens.explain(vitlens.load_model(module), x, methods=["gradcam"], target=7)
    assert expected.amax() > 0
    torch.testing.assert_close(ours.patch_maps["gradcam"][:, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer, grid", [("layers.0", (16, 16)), ("layers.0.blocks.1.norm2", (16, 16)),
                                         ("layers.1.downsample", (8, 8)), ("patch_embed.proj", (16, 16))])
def test_maps_lie_on_the_layer_grid(layer, grid):
    model = vitlens.load_model(tiny_swin(seed=2))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = vitlens.explain(model, x, methods=["gradcam", "layercam"], target=[0, 4],
                             params={m: {"layers": [layer]} for m in ("gradcam", "layercam")})
    for name in result.methods:
        assert result.patch_maps[name].shape == (2, 1, *grid)
        assert_informative(result.patch_maps[name])


def test_fused_layers_of_different_layouts():
    """A channel-first, a channel-last and a token layer fused: each mapped, brought to the finest grid."""
    model = vitlens.load_model(tiny_swin(seed=2))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    layers = ["patch_embed.proj", "layers.0.blocks.1.norm2", "norm"]
    result = vitlens.explain(model, x, methods=["gradcam"], params={"gradcam": {"layers": layers}})
    assert result.patch_maps["gradcam"].shape == (1, 1, 16, 16)
    assert_informative(result.patch_maps["gradcam"])


# ------------------------------------------------------------------------------ ConvNeXt, MaxViT
@pytest.mark.parametrize("name, options, layer, method, dtype", [
    # ConvNeXt blocks run their LayerNorm and MLP on a permuted (B, h, w, C) map; a layer scale of 1
    # instead of timm's 1e-6 keeps the gradients there above pytorch-grad-cam's epsilons
    ("test_convnext", {"ls_init_value": 1.0}, "stages.3.blocks.1.norm", "gradcam", torch.float64),
    ("test_convnext", {"ls_init_value": 1.0}, "stages.3.blocks.1.mlp", "gradcam++", torch.float64),
    ("test_convnext", {"ls_init_value": 1.0}, "stages.2.blocks.3.mlp.act", "xgradcam", torch.float64),
    # MaxViT's grid attention works channel-last; float32 keeps this larger model fast
    ("test_maxvit", {}, "stages.3.blocks.0.attn_grid.norm2", "layercam", torch.float32),
])
def test_channel_last_block_internals_equal_pytorch_grad_cam(name, options, layer, method, dtype):
    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False, num_classes=10, **options).eval()
    model = vitlens.load_model(module)
    h, w = model.preprocess.input_size
    assert model.layer_layouts[layer] == "NHWC"
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    ours = compare(method, module, x, [1, 3], layer, nhwc_reshape, layer, dtype=dtype)
    assert ours.shape == (2, 1, *model.layer_scan.layouts[layer].grid)


# ------------------------------------------------------------------------------ deciding without a guess
def test_ambiguous_layer_is_refused_by_name():
    """(B, 16, 16, 16) from a 64x64 input reads both ways; timm Swin takes no other input size."""
    module = tiny_swin(seed=1, embed_dim=16, depths=(1,), num_heads=(2,))
    model = vitlens.load_model(module)
    x = torch.randn(1, 3, 64, 64)
    layer = "layers.0.blocks.0.norm1"
    assert layer not in model.layer_layouts
    with pytest.raises(MethodError) as info:
        vitlens.explain(model, x, methods=["gradcam"], params={"gradcam": {"layers": [layer]}})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"target layer '{layer}' gives shape (1, 16, 16, 16), which cannot be placed")
    assert "ambiguous: (B, C, h, w) and (B, h, w, C) both fit a 64x64 input" in message
    assert "choose one of" in message and "norm" in message.split("choose one of")[1]
    # the same error before anything runs (the dry run's batch of two images)
    with pytest.raises(MethodError, match=r"'layers\.0\.blocks\.0\.norm1' gives shape \(2, 16, 16, 16\).*ambiguous"):
        model.check_cam_layer(layer)
    with pytest.raises(MethodError, match=r"target layer 'head\.fc' has no spatial output \(shape \(2, 10\)\)"):
        model.check_cam_layer("head.fc")
    with pytest.raises(MethodError, match="unknown target layer 'layers.7'"):
        model.check_cam_layer("layers.7")
    model.check_cam_layer("layers.-1.downsample")  # mapped: layers.0.downsample, the PatchEmbed's output
    # the same shape at the final norm is settled by evidence: it is what the model hands its head,
    # and timm declares that as output_fmt = 'NHWC'
    assert model.layer_layouts["norm"] == "NHWC" and model.default_cam_layers() == ["norm"]
    assert model.layer_layouts["patch_embed"] == "NHWC"  # PatchEmbed.output_fmt
    assert compare("gradcam", module, x, [3], "norm", nhwc_reshape).shape == (1, 1, 16, 16)


def at_64(module):
    """The CNN adapter with a 64x64 input (a plain module would get torchvision's 224)."""
    return wrap(module, preprocess=Preprocess((64, 64), (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0))


class Square(nn.Module):
    """A stride-4 convolution with as many channels as grid cells per side at 64 px, then GELU (not in
    place, so its output is a new tensor with no declared layout); ``channels_last`` permutes first."""

    def __init__(self, channels_last: bool):
        super().__init__()
        self.channels_last = channels_last
        self.conv = nn.Conv2d(3, 16, 4, 4)
        self.act = nn.GELU()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.conv(x)
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        x = self.act(x)
        return self.fc(x.mean(dim=(1, 2)) if self.channels_last else x.mean(dim=(2, 3)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_second_dry_run_settles_a_square_map(channels_last):
    """(B, 16, 16, 16) is ambiguous at 64x64; at 128x64 only the true layout fits with fixed channels."""
    torch.manual_seed(0)
    module = Square(channels_last).eval()
    model = at_64(module)
    assert model.layer_layouts["act"] == ("NHWC" if channels_last else "NCHW")
    assert model.layer_scan.layouts["act"].grid == (16, 16)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ours = compare("gradcam", module, x, [0, 4], "act", nhwc_reshape if channels_last else None, "act", load=at_64)
    assert ours.shape == (2, 1, 16, 16)


class Tokens(nn.Module):
    def forward(self, x):
        cls = x.new_zeros(x.shape[0], 1, x.shape[1])
        return torch.cat([cls, x.flatten(2).transpose(1, 2)], dim=1)


class Hybrid(nn.Module):
    """A convolutional stem whose 8x8 map becomes a class token plus 64 patch tokens: 65, no grid."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 8, 8)
        self.tokens = Tokens()
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.tokens(self.stem(x)).mean(dim=1))


def test_token_count_without_a_grid_is_refused_by_name():
    torch.manual_seed(0)
    model = at_64(Hybrid().eval())
    assert model.spatial_layer_names() == ["stem"]
    with pytest.raises(MethodError) as info:
        vitlens.explain(model, torch.randn(2, 3, 64, 64), methods=["layercam"],
                        params={"layercam": {"layers": ["tokens"]}})
    assert str(info.value) == ("target layer 'tokens' gives shape (2, 65, 24), which cannot be placed on the "
                               "input's grid (65 tokens fit no grid of a 64x64 input): choose one of stem")


def test_existing_cnn_layers_are_unchanged():
    import torchvision

    torch.manual_seed(0)
    model = vitlens.load_model(torchvision.models.resnet18(weights=None).eval())
    assert model.default_cam_layers() == ["layer4"]
    assert set(model.layer_layouts.values()) == {"NCHW"}


# ------------------------------------------------------------------------------ command line
@pytest.fixture
def hf_swin_dir(tmp_path):
    """A tiny random Hugging Face Swin saved as a local model directory (its stages give (B, h*w, C))."""
    from transformers import SwinConfig, SwinForImageClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)
    config = SwinConfig(image_size=64, patch_size=4, embed_dim=24, depths=[1, 1], num_heads=[2, 4], window_size=4,
                        num_labels=10)
    SwinForImageClassification(config).eval().save_pretrained(tmp_path / "swin")
    # transformers draws a "Loading weights" progress bar on stderr, which is not vitlens's output
    hf_logging.disable_progress_bar()
    yield tmp_path / "swin"
    hf_logging.enable_progress_bar()


def test_cli_unmappable_target_layer_is_one_line_exit_2(tmp_path, capsys, hf_swin_dir):
    from PIL import Image

    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(image)
    common = ["explain", str(image), "--model", str(hf_swin_dir), "--methods", "gradcam", "--quiet"]
    assert cli.main(common + ["--out", str(tmp_path / "ok")]) == 0  # default layer: swin.layernorm, tokens
    maps = list((tmp_path / "ok").rglob("*.npy"))
    assert maps and all(np.load(p).shape == (8, 8) for p in maps)
    capsys.readouterr()
    layer = "swin.encoder.layers.0.blocks.0.attention.q_proj"  # works on (B * 16 windows, 16, 24)
    code = cli.main(common + ["--target-layer", layer, "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    # refused after loading, before anything is written: the adapter's dry run (2 images, 32 windows)
    assert f"method 'gradcam': target layer '{layer}' gives shape (32, 16, 24)" in lines[0]
    assert not (tmp_path / "bad").exists()
    assert "its first dimension is not the batch" in lines[0]
    assert "choose one of swin.layernorm" in lines[0]
