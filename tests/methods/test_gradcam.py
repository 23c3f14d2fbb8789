"""Grad-CAM family: equal to pytorch-grad-cam, hand-computed cases, CNN/ViT layers, the real CNN."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from tests.conftest import SHARED_DATA, tiny_hf_vit, tiny_timm_vit
from vitlens.errors import MethodError
from vitlens.methods.common import Captured
from vitlens.methods.gradcam import gradcam, gradcam_pp, layercam, xgradcam

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform  # noqa: E402

OURS_TO_THEIRS = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
}


@pytest.fixture(scope="module")
def resnet50():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


@pytest.mark.parametrize("method", list(OURS_TO_THEIRS))
def test_equals_pytorch_grad_cam_on_resnet50(resnet50, method):
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    targets = [1, 5, 900]
    with OURS_TO_THEIRS[method](model=resnet50, target_layers=[resnet50.layer4[-1]]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    model = vitlens.load_model(resnet50)
    ours = vitlens.explain(model, x, methods=[method], target=targets, params={method: {"layers": ["layer4.2"]}})
    assert ours.patch_maps[method].shape == (3, 1, 7, 7)
    # pytorch-grad-cam min-maxes, resizes (cv2 bilinear) and min-maxes again; vitlens upsamples
    # (bilinear, align_corners=False) then min-maxes once: the same map, since resizing is affine.
    np.testing.assert_allclose(ours.maps[method][:, 0].numpy(), theirs, atol=1e-5)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_equals_pytorch_grad_cam_on_timm_vit(method):
    module = tiny_timm_vit(seed=3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = [0, 3, 3, 9]
    reshape = functools.partial(vit_reshape_transform, height=4, width=4)
    cam_class = OURS_TO_THEIRS[method]
    with cam_class(model=module, target_layers=[module.blocks[-1].norm1], reshape_transform=reshape) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    model = vitlens.load_model(module)
    assert model.default_cam_layers() == ["blocks.2.norm1"]
    ours = vitlens.explain(model, x, methods=[method], target=targets)  # default layer = blocks[-1].norm1
    np.testing.assert_allclose(ours.maps[method][:, 0].numpy(), theirs, atol=1e-5)


def _captured(a, g):
    return Captured([], None, None, 0, (2, 2), cam={"x": (a, g)}, cam_layers=["x"])


def test_hand_computed_cams():
    # two channels on a 2x2 map, one image
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]], dtype=torch.float64)
    g = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]], [[-1.0, 2.0], [0.0, 1.0]]]], dtype=torch.float64)
    # Grad-CAM: w = mean g = [0.5, 0.5]; cam = relu(0.5 a0 + 0.5 a1) = [[0.5, 1.5], [1.5, 2.5]]
    assert torch.allclose(gradcam(_captured(a, g))[0], torch.tensor([[0.5, 1.5], [1.5, 2.5]], dtype=torch.float64))
    # LayerCAM: relu(g) * a summed over channels: [[0.5, 1+2], [1.5, 2+1]]
    assert torch.allclose(layercam(_captured(a, g))[0], torch.tensor([[0.5, 3.0], [1.5, 3.0]], dtype=torch.float64))
    # XGrad-CAM: w0 = sum(0.5 a0)/sum(a0) = 0.5; w1 = (2*1 + 1*1)/2 = 1.5 -> 0.5 a0 + 1.5 a1
    assert torch.allclose(xgradcam(_captured(a, g))[0],
                          torch.tensor([[0.5, 2.5], [1.5, 3.5]], dtype=torch.float64), atol=1e-6)
    # Grad-CAM++: channel 0: g=0.5, sum a = 10: alpha = .25 / (.5 + 10 * .125 + 1e-6) = 1/7 per cell,
    # w0 = 4 * 0.5 * 1/7 = 2/7. Channel 1 (sum a = 2): cells g=-1 (relu 0), g=2: alpha = 4/(8+16+1e-6),
    # w = 2 * 4/24 = 1/3; g=0: alpha := 0; g=1: alpha = 1/(2+2+1e-6), w = 1/4. w1 = 1/3 + 1/4 = 7/12.
    w0, w1 = 2 / 7, 7 / 12
    expected = (w0 * a[0, 0] + w1 * a[0, 1]).clamp_min(0)
    assert torch.allclose(gradcam_pp(_captured(a, g))[0], expected, atol=1e-6)


def test_several_target_layers_are_fused(resnet50):
    model = vitlens.load_model(resnet50)
    x = torch.randn(2, 3, 224, 224)
    single = vitlens.explain(model, x, methods=["gradcam"], params={"gradcam": {"layers": ["layer4"]}})
    fused = vitlens.explain(model, x, methods=["gradcam"], params={"gradcam": {"layers": ["layer3", "layer4"]}})
    assert single.patch_maps["gradcam"].shape[-2:] == (7, 7)
    assert fused.patch_maps["gradcam"].shape[-2:] == (14, 14)  # the finer grid of the two
    assert not torch.allclose(F.interpolate(single.patch_maps["gradcam"][:, 0:1], size=(14, 14)),
                              fused.patch_maps["gradcam"][:, 0:1])


def test_automatic_layer_is_the_last_spatial_block(resnet50):
    assert vitlens.load_model(resnet50).default_cam_layers() == ["layer4"]


def test_layer_errors_are_one_line_with_choices(resnet50):
    model = vitlens.load_model(resnet50)
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(MethodError, match="unknown target layer 'layer9': valid choices include .*layer4") as info:
        vitlens.explain(model, x, methods=["gradcam"], params={"gradcam": {"layers": ["layer9"]}})
    assert "\n" not in str(info.value)
    with pytest.raises(MethodError, match=r"target layer 'fc' has no spatial output \(shape \(1, 1000\)\)"):
        vitlens.explain(model, x, methods=["gradcam"], params={"gradcam": {"layers": ["fc"]}})


@pytest.mark.parametrize("build, prefix", [
    (lambda: tiny_timm_vit(reg_tokens=4), 5),
    (lambda: tiny_timm_vit(name="deit_tiny_distilled_patch16_224"), 2),
    (lambda: tiny_hf_vit(kind="deit-teacher"), 2),
    (lambda: tiny_timm_vit(img_size=(32, 48)), 1),
])
def test_vit_cam_uses_the_real_grid(build, prefix):
    model = vitlens.load_model(build())
    h, w = model.preprocess.input_size
    result = vitlens.explain(model, torch.randn(2, 3, h, w), methods=["gradcam", "gradcam++", "layercam"])
    for name in result.methods:
        assert result.patch_maps[name].shape == (2, 1, h // 8, w // 8)
        assert result.patch_maps[name].abs().sum() > 0


def test_hugging_face_cnn_outputs_are_unwrapped():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    module = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                       num_labels=5)).eval()
    model = vitlens.load_model(module)
    x = torch.randn(2, 3, 64, 64)
    result = vitlens.explain(model, x, methods="all")
    assert result.methods == ["gradcam", "gradcam++", "xgradcam", "layercam"]
    with torch.no_grad():
        assert result.predictions[1].index == int(module(pixel_values=x).logits[1].argmax())


@pytest.mark.skipif(not (SHARED_DATA / "demo_images").is_dir(), reason="../shared/data is not beside the checkout")
def test_real_efficientnet_lite0_localises_dog_and_cat():
    """chefer_catdog.png: the bulldog fills the upper half of the 224x224 input, the cat the lower half.

    Measured (share of map mass in rows 0-111): Grad-CAM dog 0.86 / cat 0.25, Grad-CAM++ 0.77 / 0.46.
    """
    from vitlens.data import load_image

    model = vitlens.load_model("vitlens:efficientnet_lite0")
    image = load_image(SHARED_DATA / "demo_images" / "chefer_catdog.png")
    result = vitlens.explain(model, [image], methods="all", target=torch.tensor([[243, 282]]))
    assert result.predictions[0].name == "bull mastiff"
    for name in result.methods:
        dog, cat = result.maps[name][0]
        upper = [(m[:112].sum() / m.sum()).item() for m in (dog, cat)]
        assert upper[0] > 0.6 and upper[1] < 0.5, (name, upper)


def test_packaged_efficientnet_classifies_real_photos():
    from PIL import Image
    from skimage import data

    model = vitlens.load_model("vitlens:efficientnet_lite0")
    result = vitlens.explain(model, [Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())],
                             methods="gradcam")
    assert [p.index for p in result.predictions] == [967, 285]  # espresso, Egyptian cat
