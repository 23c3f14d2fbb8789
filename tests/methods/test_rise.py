"""rise: the masks against the paper's code path (skimage resize), the map against a per-mask loop.

The per-mask loop restates RISE from the paper (Petsiuk et al. 2018) and its code (eclique/RISE
``generate_masks`` / ``forward``) in float64 numpy: for each mask i, one forward of ``x * M_i + b (1 - M_i)``
alone, the target's softmax probability (or logit), and S = sum_i score_i M_i / (N p). It shares with
vitlens only the documented random draws (``torch.Generator(seed)``: grids, then row shifts, then
column shifts); the masks are made with ``skimage.transform.resize(order=1, mode='reflect',
anti_aliasing=False)`` as the paper's code makes them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.transform import resize

import vitlens
from tests.conftest import tiny_timm_vit
from vitlens.errors import MethodError
from vitlens.methods.rise import rise_draws, rise_masks


def tiny_cnn(seed: int = 0) -> torch.nn.Module:
    """A small random convolutional classifier (10 classes, any input size)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    ).eval()


def black(model) -> torch.Tensor:
    """(3,) float64: a 0 pixel after the model's normalisation."""
    mean = torch.tensor(model.preprocess.mean, dtype=torch.float64)
    return (0 - mean) / torch.tensor(model.preprocess.std, dtype=torch.float64)


def paper_masks(count, cells, keep, size, seed):
    """(N, H, W) masks as eclique/RISE's generate_masks makes them, from vitlens's documented draws."""
    generator = torch.Generator().manual_seed(seed)
    grids = (torch.rand(count, cells, cells, generator=generator, dtype=torch.float64) < keep).numpy().astype(float)
    cell = (math.ceil(size[0] / cells), math.ceil(size[1] / cells))
    shift_rows = torch.randint(cell[0], (count,), generator=generator).tolist()
    shift_cols = torch.randint(cell[1], (count,), generator=generator).tolist()
    up = ((cells + 1) * cell[0], (cells + 1) * cell[1])
    masks = []
    for i in range(count):
        big = resize(grids[i], up, order=1, mode="reflect", anti_aliasing=False)
        masks.append(big[shift_rows[i]:shift_rows[i] + size[0], shift_cols[i]:shift_cols[i] + size[1]])
    return np.stack(masks)


def loop_rise(module, x, targets, count, cells, keep, seed, fill, score="probability"):
    """Straightforward RISE: one forward per image and mask, float64."""
    masks = paper_masks(count, cells, keep, tuple(x.shape[-2:]), seed)
    out = []
    for b in range(x.shape[0]):
        saliency = np.zeros(x.shape[-2:])
        for i in range(count):
            m = torch.from_numpy(masks[i])
            masked = x[b] * m + fill.view(3, 1, 1) * (1 - m)
            with torch.no_grad():
                logits = module(masked[None].double())[0]
            value = logits.softmax(-1)[targets[b]] if score == "probability" else logits[targets[b]]
            saliency += float(value) * masks[i]
        out.append(saliency / (count * keep))
    return np.stack(out)


@pytest.mark.parametrize("cells, size", [(7, (32, 32)), (3, (20, 27)), (5, (16, 40)), (1, (8, 8))])
def test_masks_equal_the_papers_skimage_masks(cells, size):
    grids, rows, cols = rise_draws(12, cells, 0.5, size, seed=3)
    ours = rise_masks(grids, rows, cols, size).numpy()
    np.testing.assert_allclose(ours, paper_masks(12, cells, 0.5, size, seed=3), atol=1e-12, rtol=0)
    assert ours.min() >= 0 and ours.max() <= 1 and ours.std() > 0 or cells == 1


@pytest.mark.parametrize("baseline, score", [("black", "probability"), ("mean", "logit")])
def test_equals_a_per_mask_loop_on_a_vit(baseline, score):
    module = tiny_timm_vit(seed=1).double()
    model = vitlens.load_model(module)
    # float32 values: explain takes tensors as float32 before casting them to the model's dtype
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)).double()
    targets = [3, 8]
    fill = black(model) if baseline == "black" else torch.zeros(3, dtype=torch.float64)
    params = {"masks": 20, "cells": 4, "keep": 0.4, "seed": 11, "mask_batch": 7, "baseline": baseline, "score": score}
    ours = vitlens.explain(model, x, methods=["rise"], target=targets, params={"rise": params})
    expected = loop_rise(module, x, targets, 20, 4, 0.4, 11, fill, score)
    assert ours.patch_maps["rise"].shape == (2, 1, 32, 32)
    np.testing.assert_allclose(ours.patch_maps["rise"][:, 0].numpy(), expected, atol=1e-12, rtol=1e-10)


def test_equals_a_per_mask_loop_on_a_cnn():
    module = tiny_cnn().double()
    model = vitlens.load_model(module)
    assert not model.has_attention
    x = torch.randn(2, 3, 24, 30, generator=torch.Generator().manual_seed(2)).double()
    ours = vitlens.explain(model, x, methods=["rise"], target=[0, 9], params={"rise": {"masks": 16, "seed": 5}})
    expected = loop_rise(module, x, [0, 9], 16, 7, 0.5, 5, black(model))
    np.testing.assert_allclose(ours.patch_maps["rise"][:, 0].numpy(), expected, atol=1e-12, rtol=1e-10)


def test_seeded_and_independent_of_the_batch_and_of_mask_batch():
    model = vitlens.load_model(tiny_timm_vit(seed=2))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    params = {"masks": 24, "cells": 5}
    batch = vitlens.explain(model, x, methods=["rise"], target="top2", params={"rise": params}).patch_maps["rise"]
    assert batch.shape == (3, 2, 32, 32)
    one_mask_per_forward = vitlens.explain(model, x, methods=["rise"], target="top2",
                                           params={"rise": {**params, "mask_batch": 1}}).patch_maps["rise"]
    torch.testing.assert_close(one_mask_per_forward, batch, atol=1e-6, rtol=1e-5)
    in_batches_of_two = vitlens.explain(model, x, methods=["rise"], target="top2", batch_size=2,
                                        params={"rise": params}).patch_maps["rise"]
    torch.testing.assert_close(in_batches_of_two, batch, atol=1e-6, rtol=1e-5)
    targets = vitlens.explain(model, x, methods=["attention"], target="top2").targets
    for i in range(3):
        for slot in range(2):
            alone = vitlens.explain(model, x[i:i + 1], methods=["rise"], target=int(targets[i, slot]),
                                    params={"rise": params}).patch_maps["rise"][0, 0]
            torch.testing.assert_close(alone, batch[i, slot], atol=1e-6, rtol=1e-5)
    other_seed = vitlens.explain(model, x, methods=["rise"], target="top2",
                                 params={"rise": {**params, "seed": 1}}).patch_maps["rise"]
    assert (other_seed - batch).abs().max() > 1e-3 * batch.abs().max()


def test_keep_one_gives_the_score_everywhere():
    # every cell kept: each mask is all ones, every copy is the image, S = N * f(x) / N
    model = vitlens.load_model(tiny_cnn(seed=3))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    result = vitlens.explain(model, x, methods=["rise"], params={"rise": {"masks": 5, "keep": 1.0}})
    probability = result.probabilities.gather(1, result.targets)[:, 0]
    expected = probability[:, None, None].expand(2, 16, 16)
    torch.testing.assert_close(result.patch_maps["rise"][:, 0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("params, fragment", [({"keep": 0}, "keep must be a number in (0, 1]"),
                                              ({"keep": 1.5}, "keep must be"), ({"masks": 0}, "masks must be"),
                                              ({"cells": 2.5}, "cells must be"), ({"score": "prob"}, "score must be"),
                                              ({"baseline": "grey"}, "baseline must be"),
                                              ({"mask_batch": 0}, "mask_batch must be"), ({"nope": 1}, "no parameter")])
def test_parameter_errors_are_one_line(params, fragment):
    with pytest.raises(MethodError) as info:
        vitlens.explain(tiny_cnn(), torch.randn(1, 3, 8, 8), methods=["rise"], params={"rise": params})
    assert fragment in str(info.value) and "\n" not in str(info.value)
