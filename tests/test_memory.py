"""The memory budget of explain: sizes, the per-image estimate, chunks within the budget, and halving on
out-of-memory (CUDA's error, raised here by a stand-in for the engine)."""

from __future__ import annotations

import pytest
import torch

import vitlens
import vitlens.api as api
from vitlens.errors import ResourceError, UsageError
from vitlens.engine import keeps_attention_gradients, keeps_head_means_only
from vitlens.memory import (ACTIVATION_FACTOR, HEAD_MEAN_COPIES, LAYER_TRANSIENTS, bytes_per_image, images_per_pass,
                            model_sizes, parse_size)

from .conftest import tiny_timm_vit

METHODS = "rollout,gmar-l2,legrad,chefer"


@pytest.mark.parametrize("text, size", [("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", int(1.5 * 2**30)),
                                        (" 2 kb ", 2000), (4096, 4096), ("100", 100)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["lots", "8 parsecs", "-1GB", 0, True, "0MB"])
def test_bad_sizes_are_one_line(bad):
    with pytest.raises(UsageError, match="memory_budget must be a size such as 8GB or 512MiB") as info:
        parse_size(bad)
    assert "\n" not in str(info.value)


def test_the_estimate_follows_the_attention_and_stream_sizes():
    model = vitlens.load_model(tiny_timm_vit())  # 3 layers, 4 heads, 1 + 16 tokens, width 48
    sizes = model_sizes(model, (32, 32))
    attention, stream = sizes[:2]
    assert attention == 3 * 4 * 17 * 17 * 4 and stream == 3 * 17 * 48 * 4 and (sizes.heads, sizes.layers) == (4, 3)
    assert bytes_per_image(model, False, (32, 32)) == 2 * attention + ACTIVATION_FACTOR * stream
    assert bytes_per_image(model, True, (32, 32)) == 3 * attention + ACTIVATION_FACTOR * stream
    # head means only: (B, 1, N, N) copies per layer and the transients of one layer
    assert bytes_per_image(model, False, (32, 32), head_means=True) == \
        int((HEAD_MEAN_COPIES / 4 + LAYER_TRANSIENTS / 3) * attention) + ACTIVATION_FACTOR * stream
    six = {"rollout": {"head_fusion": "mean"}, "chefer": {}, "gmar-l2": {"norm": "l2"}, "legrad": {}}
    assert not keeps_attention_gradients(six) and keeps_head_means_only(six)
    assert not keeps_head_means_only({**six, "rollout": {"head_fusion": "max"}})  # the max of each layer's heads
    assert keeps_attention_gradients({"chefer": {}, "attention-gradcam": {}})
    assert not keeps_head_means_only({"chefer": {}, "attention-gradcam": {}})
    assert keeps_attention_gradients({"chefer": {"libragrad": True}})
    assert not keeps_head_means_only({"chefer": {"libragrad": True}})
    wide = vitlens.load_model(tiny_timm_vit(dynamic_img_size=True))
    assert model_sizes(wide, (48, 32))[0] == 3 * 4 * 25 * 25 * 4  # a larger input, more tokens: its own size
    assert images_per_pass(16, 100, 250) == 2 and images_per_pass(16, 100, 50) == 1
    assert images_per_pass(16, 100, None) == 16 and images_per_pass(4, 100, 10**9) == 4


def counting(monkeypatch, fail_above=None):
    """Wrap the engine's batch call: record chunk sizes; raise CUDA's out-of-memory error above a size."""
    sizes = []
    real = api.run_batch

    def run_batch(model, x, *args, **kwargs):
        sizes.append(x.shape[0])
        if fail_above is not None and x.shape[0] > fail_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, x, *args, **kwargs)

    monkeypatch.setattr(api, "run_batch", run_batch)
    return sizes


def test_a_batch_over_the_budget_is_explained_in_chunks_with_the_same_maps(monkeypatch):
    model = vitlens.load_model(tiny_timm_vit())
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    whole = vitlens.explain(model, x, methods=METHODS, batch_size=8, memory_budget="100GB")
    per_image = bytes_per_image(model, False, (32, 32), head_means=True)
    sizes = counting(monkeypatch)
    split = vitlens.explain(model, x, methods=METHODS, batch_size=8, memory_budget=2 * per_image + 1)
    assert sizes == [2, 2, 1]
    for name in whole.methods:
        torch.testing.assert_close(split.patch_maps[name], whole.patch_maps[name], atol=1e-6, rtol=1e-5)
    assert torch.equal(split.targets, whole.targets)


def test_out_of_memory_halves_the_chunk_and_tries_again(monkeypatch):
    model = vitlens.load_model(tiny_timm_vit())
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    whole = vitlens.explain(model, x, methods=METHODS, batch_size=8, memory_budget="100GB")
    sizes = counting(monkeypatch, fail_above=2)
    halved = vitlens.explain(model, x, methods=METHODS, batch_size=8, memory_budget="100GB")
    assert sizes == [5, 2, 2, 1]  # 5 fails, halved to 2: 2 + 2 + the last image
    for name in whole.methods:
        torch.testing.assert_close(halved.patch_maps[name], whole.patch_maps[name], atol=1e-6, rtol=1e-5)


def test_out_of_memory_for_one_image_is_one_line(monkeypatch):
    model = vitlens.load_model(tiny_timm_vit())
    counting(monkeypatch, fail_above=0)
    with pytest.raises(ResourceError, match="out of memory explaining one image on cpu with rollout") as info:
        vitlens.explain(model, torch.randn(3, 3, 32, 32), methods="rollout", batch_size=4)
    assert "\n" not in str(info.value)


def test_the_command_line_budget_gives_the_same_outputs(tmp_path, capsys, tiny):
    """`vitlens explain --memory-budget 1` explains one image per pass: the same maps as without a budget."""
    import numpy as np
    from PIL import Image

    from vitlens.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.effect_noise((40, 40), 20 + 10 * i).convert("RGB").save(folder / f"n{i}.png")
    outs = {}
    for name, option in (("whole", []), ("split", ["--memory-budget", "1"])):
        outs[name] = tmp_path / name
        assert main(["explain", str(folder), *tiny, "--methods", "rollout,chefer", "--out", str(outs[name]),
                     "--quiet", *option]) == 0, capsys.readouterr().err
    for path in sorted((outs["whole"] / "maps").rglob("*.npy")):
        other = outs["split"] / path.relative_to(outs["whole"])
        np.testing.assert_allclose(np.load(other), np.load(path), atol=1e-6, rtol=1e-5)
