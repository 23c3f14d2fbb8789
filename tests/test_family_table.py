"""The README's family x method table is what the code does: every cell is run on a small model.

"yes" cells: every method of the column explains a batch. "no" cells: every method of the column is
refused with a one-line MethodError before anything runs. A row without a model here, or a model
without a row, fails the test, so the table cannot drift from the families vitlens registers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import vitlens
from tests.conftest import tiny_hf_vit, tiny_timm_vit, tiny_torchvision_vit
from tests.models.test_hf_image import tiny_hf_beit, tiny_hf_dinov2
from vitlens.errors import MethodError

README = Path(__file__).resolve().parents[1] / "README.md"
TITLE = "### Which model family gets which methods"

COLUMNS = {
    "rollout family": ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "chefer"],
    "`legrad`": ["legrad"],
    "Grad-CAM family": ["gradcam", "gradcam++", "xgradcam", "layercam"],
    "`attnlrp`, `cp-lrp`": ["attnlrp", "cp-lrp"],
    "`random`, `center`": ["random", "center"],
}


def _own_vit():
    from tests.models.test_torch_attention import user_vit

    return vitlens.load_model(user_vit())


def _clip():
    from tests.models.test_hf_clip import CLASSES, tiny_hf_clip, tiny_tokenizer

    return vitlens.load_model(tiny_hf_clip(dtype=torch.float32), classes=CLASSES, tokenizer=tiny_tokenizer())


def _siglip():
    from tests.models.test_hf_clip import CLASSES
    from tests.models.test_hf_siglip import siglip_tokenizer, tiny_hf_siglip

    return vitlens.load_model(tiny_hf_siglip(dtype=torch.float32), classes=CLASSES, tokenizer=siglip_tokenizer())


def _open_clip():
    pytest.importorskip("open_clip", reason="pip install open-clip-torch")
    from tests.models.test_openclip import CLASSES, tiny_open_clip

    return vitlens.load_model(tiny_open_clip(dtype=torch.float32), classes=CLASSES)


def _open_clip_timm_tower():
    pytest.importorskip("open_clip", reason="pip install open-clip-torch")
    from tests.models.test_openclip import CLASSES
    from tests.models.test_openclip_towers import clip_with_timm_trunk

    return vitlens.load_model(clip_with_timm_trunk("siglip").float(), classes=CLASSES)


def _open_clip_conv_tower():
    pytest.importorskip("open_clip", reason="pip install open-clip-torch")
    from tests.models.test_openclip import CLASSES
    from tests.models.test_openclip_towers import clip_with_conv_tower

    return vitlens.load_model(clip_with_conv_tower("resnet"), classes=CLASSES)


def _swin():
    import timm

    torch.manual_seed(0)
    return vitlens.load_model(timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, window_size=4, embed_dim=16,
        depths=(1, 1), num_heads=(1, 2), num_classes=10).eval())


def _convnext():
    import timm

    torch.manual_seed(0)
    return vitlens.load_model(timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval(),
                              input_size=32)


def _map_pool_vit():
    from tests.models.test_timm_map_pool import tiny_map_vit

    return vitlens.load_model(tiny_map_vit("siglip").float())


MODELS = {
    "timm `VisionTransformer`": lambda: vitlens.load_model(tiny_timm_vit()),
    "timm `VisionTransformer` with `global_pool='map'`": _map_pool_vit,
    "timm EVA / EVA-02": lambda: vitlens.load_model(
        tiny_timm_vit(name="eva02_base_patch14_224", embed_dim=32, num_heads=4)),
    "timm BEiT": lambda: vitlens.load_model(tiny_timm_vit(name="beit_base_patch16_224")),
    "timm CaiT": lambda: vitlens.load_model(tiny_timm_vit(name="cait_xxs24_224", depth=2, depth_token_only=1)),
    "Hugging Face ViT / DeiT": lambda: vitlens.load_model(tiny_hf_vit()),
    "Hugging Face DINOv2": lambda: vitlens.load_model(
        tiny_hf_dinov2(dtype=torch.float32, registers=2, use_swiglu_ffn=True)),
    "Hugging Face BEiT": lambda: vitlens.load_model(tiny_hf_beit(dtype=torch.float32)),
    "torchvision `VisionTransformer`": lambda: vitlens.load_model(tiny_torchvision_vit()),
    "Hugging Face CLIP": _clip,
    "Hugging Face SigLIP": _siglip,
    "OpenCLIP ViT": _open_clip,
    "OpenCLIP timm towers": _open_clip_timm_tower,
    "OpenCLIP ResNet and ConvNeXt towers": _open_clip_conv_tower,
    "your own ViT with `nn.MultiheadAttention`": _own_vit,
    "Swin, Swin-V2": _swin,
    "ConvNeXt, MaxViT, CNNs": _convnext,
}


def read_table() -> tuple[list, dict]:
    """(column titles, {family: [cell, ...]}) of the README table under TITLE."""
    lines = README.read_text().split(TITLE, 1)[1].strip().splitlines()
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines
            if line.startswith("|")]
    header, body = rows[0], rows[2:]
    return header[1:], {re.sub(r"\s*\(.*\)$", "", row[0]): row[1:] for row in body}


def column_methods(title: str) -> list:
    for key, methods in COLUMNS.items():
        if title.startswith(key):
            return methods
    raise AssertionError(f"no methods known for column {title!r}")


def test_every_row_has_a_model_and_every_model_a_row():
    _, rows = read_table()
    assert set(rows) == set(MODELS)


@pytest.mark.parametrize("family", list(MODELS))
def test_the_row_is_what_the_code_does(family):
    titles, rows = read_table()
    model = MODELS[family]()
    h, w = model.preprocess.input_size
    torch.manual_seed(0)
    x = torch.randn(2, 3, h, w, dtype=model.dtype)
    for title, cell in zip(titles, rows[family]):
        for method in column_methods(title):
            if cell.startswith("yes"):
                result = vitlens.explain(model, x, methods=[method])
                assert result[method].shape == (2, h, w), (family, method)
            else:
                assert cell.startswith("no"), cell
                with pytest.raises(MethodError) as info:
                    vitlens.explain(model, x, methods=[method])
                assert "\n" not in str(info.value), (family, method)
