"""Shared fixtures: tiny random-init ViTs of every supported family, and the real data beside the repo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VIT_TINY_WEIGHTS = SHARED_DATA / "vit_tiny_in1k_augreg" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
VIT_TINY_SPEC = "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"

requires_shared = pytest.mark.skipif(not VIT_TINY_WEIGHTS.is_file(), reason="../shared/data is not beside the checkout")


def tiny_timm_vit(seed: int = 0, **kwargs) -> torch.nn.Module:
    """A small random timm ViT (32x32 input, 8x8 patches -> 4x4 grid) in eval mode."""
    import timm

    torch.manual_seed(seed)
    options = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=10)
    options.update(kwargs)
    name = options.pop("name", "vit_tiny_patch16_224")
    return timm.create_model(name, pretrained=False, **options).eval()


def unit_scale(module: torch.nn.Module) -> torch.nn.Module:
    """A timm ViT with unit-scale random weights (class token, position embeddings, biases, fan-in-scaled
    matrices) in float64: relevance and gradients of O(1), so that an absolute tolerance means something.
    Draws from the global generator, which the caller seeds (``tiny_timm_vit(seed=...)`` does)."""
    with torch.no_grad():
        module.cls_token.normal_()
        module.pos_embed.normal_(std=0.5)
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.1)
            elif param.dim() >= 2:
                param.normal_(std=param[0].numel() ** -0.5)
    return module.double()


def tiny_hf_vit(seed: int = 0, kind: str = "vit", **kwargs) -> torch.nn.Module:
    from transformers import (DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher,
                              ViTConfig, ViTForImageClassification)

    torch.manual_seed(seed)
    options = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                   image_size=32, patch_size=8, num_labels=10, layer_norm_eps=1e-6)
    options.update(kwargs)
    if kind == "vit":
        return ViTForImageClassification(ViTConfig(**options)).eval()
    config = DeiTConfig(**options)
    if kind == "deit":
        return DeiTForImageClassification(config).eval()
    return DeiTForImageClassificationWithTeacher(config).eval()


def tiny_torchvision_vit(seed: int = 0) -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=48, mlp_dim=96,
                              num_classes=10)
    # torchvision zero-initialises the head, which would make every logit and gradient zero
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.eval()


def same_vit_three_layouts(seed: int) -> list:
    """One tiny ViT's weights as timm, Hugging Face and torchvision modules (a non-trivial head and class token),
    for checks that a method gives the same maps whatever library holds the model."""
    from vitlens.models.convert import timm_to_hf_vit, timm_to_torchvision_vit

    timm_module = tiny_timm_vit(seed=seed)
    with torch.no_grad():
        timm_module.head.weight.normal_(std=0.5)
        timm_module.cls_token.normal_(std=0.5)
    state = timm_module.state_dict()
    hf_module = tiny_hf_vit(seed=1)
    hf_module.load_state_dict(timm_to_hf_vit(state), strict=True)
    tv_module = tiny_torchvision_vit(seed=2)
    tv_module.load_state_dict(timm_to_torchvision_vit(state), strict=True)
    return [timm_module, hf_module, tv_module]


@pytest.fixture
def timm_vit():
    return tiny_timm_vit()


@pytest.fixture(scope="session")
def real_vit():
    """The real ImageNet ViT-Tiny from ../shared/data (session-wide: loading takes a second)."""
    if not VIT_TINY_WEIGHTS.is_file():
        pytest.skip("../shared/data is not beside the checkout")
    import vitlens

    return vitlens.load_model(VIT_TINY_SPEC, weights=VIT_TINY_WEIGHTS)


# --- the CLI's tiny model (shared by the CLI, runner and error tests) --------------------------------
TINY_SPEC = "timm:test_vit"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """timm ``test_vit`` (random init, 1000 classes) as a plain state-dict checkpoint."""
    import timm

    torch.manual_seed(0)
    module = timm.create_model("test_vit", pretrained=False).eval()
    path = tmp_path_factory.mktemp("weights") / "test_vit.pth"
    torch.save(module.state_dict(), path)
    return path


@pytest.fixture
def tiny(tiny_weights) -> list[str]:
    """CLI model options of the tiny timm ViT."""
    return ["--model", TINY_SPEC, "--weights", str(tiny_weights)]


@pytest.fixture(scope="session")
def tiny_model(tiny_weights):
    import vitlens

    return vitlens.load_model(TINY_SPEC, weights=tiny_weights)
