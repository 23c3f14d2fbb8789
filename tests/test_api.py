"""vitlens.explain: inputs of every kind, results, saving, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from tests.conftest import tiny_timm_vit
from vitlens.errors import InputError, MethodError, ModelError


@pytest.fixture
def model():
    return vitlens.load_model(tiny_timm_vit())


def _photo(width=40, height=30, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_paths_pil_arrays_and_tensors_agree(model, tmp_path):
    image = _photo()
    image.save(tmp_path / "a.png")
    array = np.asarray(image)
    tensor, _ = model.preprocess(image)
    results = [
        vitlens.explain(model, tmp_path / "a.png", methods="rollout,gmar-l2"),
        vitlens.explain(model, image, methods="rollout,gmar-l2"),
        vitlens.explain(model, array, methods="rollout,gmar-l2"),
        vitlens.explain(model, array.astype(np.float32) / 255.0, methods="rollout,gmar-l2"),
        vitlens.explain(model, tensor, methods="rollout,gmar-l2"),
    ]
    for r in results[1:]:
        for name in ("rollout", "gmar-l2"):
            assert torch.allclose(r.patch_maps[name], results[0].patch_maps[name], atol=1e-5)
    assert results[0].inputs[0].source.endswith("a.png")
    assert results[0]["rollout"].shape == (1, 32, 32)


def test_maps_are_normalised_and_predictions_named(model):
    model.class_names = [f"c{i}" for i in range(10)]
    result = vitlens.explain(model, [_photo(seed=1), _photo(seed=2)], methods="all", target="top3")
    assert result.targets.shape == (2, 3)
    for name in result.methods:
        maps = result.maps[name]
        assert maps.shape == (2, 3, 32, 32)
        assert maps.min() >= 0 and maps.max() <= 1
        assert torch.allclose(maps.flatten(2).amax(-1), torch.ones(2, 3), atol=1e-5) or name == "rollout"
    probs = result.probabilities
    assert result.predictions[0].index == int(probs[0].argmax())
    assert result.predictions[0].name == f"c{result.predictions[0].index}"
    assert result.targets[0, 0] == result.predictions[0].index


def test_batch_size_does_not_change_results(model):
    images = [_photo(seed=s) for s in range(5)]
    one = vitlens.explain(model, images, methods="all", batch_size=5, target=[1, 2, 3, 4, 5])
    small = vitlens.explain(model, images, methods="all", batch_size=2, target=[1, 2, 3, 4, 5])
    for name in one.methods:
        assert torch.allclose(one.patch_maps[name], small.patch_maps[name], atol=1e-5)


def test_save_writes_overlays_maps_and_manifest(model, tmp_path):
    image = _photo(width=57, height=31)
    result = vitlens.explain(model, [image], methods="rollout,legrad", params={"rollout": {"discard_ratio": 0.5}})
    out = result.save(tmp_path / "run")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["methods"]["rollout"]["discard_ratio"] == 0.5
    entry = manifest["images"][0]
    assert entry["status"] == "ok" and len(entry["outputs"]) == 2
    for output in entry["outputs"]:
        assert Image.open(out / output["overlay"]).size == (57, 31)
        assert np.load(out / output["map"]).shape == (4, 4)


def test_one_line_errors(model, tmp_path):
    with pytest.raises(InputError, match="missing.jpg") as info:
        vitlens.explain(model, tmp_path / "missing.jpg")
    assert "\n" not in str(info.value)
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(InputError, match="bad.jpg"):
        vitlens.explain(model, tmp_path / "bad.jpg")
    with pytest.raises(MethodError, match="unknown method 'nope'"):
        vitlens.explain(model, _photo(), methods="nope")
    with pytest.raises(MethodError, match=r"params for 'gmar-l1', which is not among the methods \(rollout\)"):
        vitlens.explain(model, _photo(), methods="rollout", params={"gmar-l1": {"norm": "l1"}})
    with pytest.raises(ModelError, match="does not fit the model, which takes 32x32"):
        vitlens.explain(model, torch.randn(1, 3, 48, 48))


def test_unsupported_models_are_refused_in_one_line():
    import torchvision

    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(ModelError, match="Sequential is not a supported model") as info:
        vitlens.load_model(mlp)
    assert "\n" not in str(info.value)
    cnn = vitlens.load_model(torchvision.models.resnet18(weights=None))
    with pytest.raises(MethodError, match="method 'rollout' needs attention maps, which this ResNet does not have"):
        vitlens.explain(cnn, torch.randn(1, 3, 224, 224), methods="rollout")
    with pytest.raises(ModelError, match="unknown model spec 'nonsense'"):
        vitlens.load_model("nonsense")
    with pytest.raises(ModelError, match="unknown timm model 'vit_does_not_exist'"):
        vitlens.load_model("timm:vit_does_not_exist")


def test_weights_files_are_read_safely_and_checked(tmp_path):
    module = tiny_timm_vit()
    state = module.state_dict()
    good = tmp_path / "good.pth"
    torch.save(state, good)
    loaded = vitlens.load_model(tiny_timm_vit(seed=9), weights=good)
    assert torch.equal(loaded.module.head.weight, module.head.weight)
    assert len(loaded.info.weights_sha256) == 64

    partial = dict(state)
    partial.pop("head.bias")
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ModelError, match=r"1 missing \(head.bias\); 1 unexpected \(extra.weight\)") as info:
        vitlens.load_model(tiny_timm_vit(), weights=tmp_path / "partial.pth")
    assert "\n" not in str(info.value)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(ModelError, match="weights_only=True"):
        vitlens.load_model(tiny_timm_vit(), weights=tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="does not exist"):
        vitlens.load_model(tiny_timm_vit(), weights=tmp_path / "nope.pth")


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    module = tiny_timm_vit()
    save_file(module.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = vitlens.load_model(tiny_timm_vit(seed=4), weights=tmp_path / "w.safetensors")
    assert torch.equal(loaded.module.pos_embed, module.pos_embed)


def test_explain_and_load_model_give_the_module_back_in_its_own_training_mode():
    """A module in training mode (one submodule deliberately in eval) comes back exactly so; the explanation is
    that of the model in eval mode (dropout off), the same as for the module put in eval mode first."""
    from tests.conftest import tiny_timm_vit

    module = tiny_timm_vit(drop_rate=0.3, attn_drop_rate=0.3).train()
    module.blocks[1].eval()
    flags = {name: m.training for name, m in module.named_modules()}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    adapter = vitlens.load_model(module)
    assert {name: m.training for name, m in module.named_modules()} == flags
    trained = vitlens.explain(module, x, methods="rollout,gradcam")
    assert {name: m.training for name, m in module.named_modules()} == flags
    again = vitlens.explain(adapter, x, methods="rollout,gradcam")
    assert {name: m.training for name, m in module.named_modules()} == flags
    evaluated = vitlens.explain(tiny_timm_vit(drop_rate=0.3, attn_drop_rate=0.3).eval(), x, methods="rollout,gradcam")
    for name in ("rollout", "gradcam"):
        assert torch.equal(trained.maps[name], evaluated.maps[name])
        assert torch.equal(again.maps[name], evaluated.maps[name])
    assert not module.blocks[1].training and module.training


def test_a_model_loaded_from_a_spec_is_in_eval_mode(tiny_model):
    assert not any(m.training for m in tiny_model.module.modules())
