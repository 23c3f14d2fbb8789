"""load_model: Hugging Face directories and caches, timm caches, preprocessing from each config."""

from __future__ import annotations

import pytest
import torch

import vitlens
from tests.conftest import tiny_hf_vit, tiny_timm_vit
from vitlens.errors import ModelError
from vitlens.models import hub


def test_local_hugging_face_directory_with_processor_config(tmp_path):
    from transformers import ViTImageProcessor

    module = tiny_hf_vit()
    module.config.id2label = {i: f"label-{i}" for i in range(10)}
    module.config.label2id = {v: k for k, v in module.config.id2label.items()}
    module.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6],
                      resample=3).save_pretrained(tmp_path)
    model = vitlens.load_model(str(tmp_path))
    assert model.family == "hf"
    assert model.preprocess.input_size == (32, 32)
    assert model.preprocess.mean == (0.1, 0.2, 0.3) and model.preprocess.interpolation == "bicubic"
    assert model.preprocess.resize_mode == "exact"
    assert model.class_name(3) == "label-3"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.logits(x), module(pixel_values=x).logits, atol=1e-6)


def test_hf_spec_loads_from_a_prepopulated_cache_offline(tmp_path, monkeypatch):
    """The `hf:` hub path itself, with the standard cache layout filled locally (no network)."""
    from huggingface_hub import constants

    module = tiny_hf_vit()
    snapshot = tmp_path / "hub" / "models--someone--tiny-vit" / "snapshots" / hub.LOCAL_REVISION
    module.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--someone--tiny-vit" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-vit" / "refs" / "main").write_text(hub.LOCAL_REVISION)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = vitlens.load_model("hf:someone/tiny-vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.logits(x), module(pixel_values=x).logits, atol=1e-6)
    assert model.info.spec == "hf:someone/tiny-vit"


def test_timm_spec_reads_a_populated_cache_without_network(tmp_path, monkeypatch):
    import timm
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    hub.populate_hf_cache("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", reference.state_dict())
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("no network call expected"))
    model = vitlens.load_model("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    assert torch.equal(model.module.head.weight, reference.head.weight)
    assert model.preprocess.mean == (0.5, 0.5, 0.5) and model.preprocess.crop_pct == 0.9


def test_unreachable_hub_is_one_line(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: False)
    for spec in ("timm:vit_tiny_patch16_224.augreg_in21k", "hf:google/vit-base-patch16-224"):
        with pytest.raises(ModelError, match="unreachable") as info:
            vitlens.load_model(spec)
        assert "\n" not in str(info.value) and "--weights FILE" in str(info.value)


@pytest.mark.parametrize("kwargs, prefix", [
    ({"name": "deit_tiny_distilled_patch16_224"}, 2),
    ({"reg_tokens": 4}, 5),
    ({"reg_tokens": 2, "global_pool": "avg"}, 3),
])
def test_prefix_tokens_never_reach_the_maps(kwargs, prefix):
    model = vitlens.load_model(tiny_timm_vit(**kwargs))
    assert model.num_prefix_tokens == prefix
    result = vitlens.explain(model, torch.randn(2, 3, 32, 32), methods="all")
    for name in result.methods:
        expected = (2, 1, 32, 32) if vitlens.METHODS[name].signed else (2, 1, 4, 4)  # LRP: pixel relevance
        assert result.patch_maps[name].shape == expected, name


@pytest.mark.parametrize("spec, extra", [("timm:vit_small_patch14_reg4_dinov2", []),
                                         ("hf:microsoft/swin-tiny-patch4-window7-224", []),
                                         ("open_clip:ViT-B-32:openai", ["--classes", "dog,cat"])])
def test_the_readme_checkpoints_offline_are_one_line(spec, extra, tmp_path, capsys, monkeypatch):
    """The README's real-checkpoint examples, with the hub unreachable and nothing cached: one line, exit 2."""
    from PIL import Image

    from vitlens.cli import main
    from vitlens.models import hub

    monkeypatch.setattr(hub, "reachable", lambda *args, **kwargs: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    Image.new("RGB", (32, 32)).save(tmp_path / "cat.png")
    code = main(["explain", str(tmp_path / "cat.png"), "--model", spec, *extra, "--out", str(tmp_path / "run"),
                 "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "the model hub is unreachable" in lines[0] and "--weights FILE" in lines[0]
    assert not (tmp_path / "run").exists()
