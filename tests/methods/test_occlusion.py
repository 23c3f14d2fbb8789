"""occlusion: captum's ``Occlusion`` restated as a float64 loop over windows, on a ViT and a CNN.

captum is not a dependency of vitlens, so the comparison with captum itself is a recorded figure
(CHANGELOG / docs/methods.md: equal to float32 rounding on a tiny timm ViT and a ResNet-18); this test
restates what captum computes, from its definition: windows whose top-left corners step by ``stride``
from 0 until one reaches or passes the far border (that one cut by the border), each hiding every
channel of its pixels with the fill, the drop of the target score per window, and per pixel the mean
of the drops of the windows that cover it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitlens
from tests.conftest import tiny_timm_vit
from tests.methods.test_rise import black, tiny_cnn
from vitlens.errors import MethodError


def starts(length, window, stride):
    out = [0]
    while out[-1] + window < length:  # the last window reaches the border (or is cut by it)
        out.append(out[-1] + stride)
    return out


def loop_occlusion(module, x, targets, window, stride, fill, score="probability"):
    def value(image, b):
        with torch.no_grad():
            logits = module(image[None])[0]
        return float(logits.softmax(-1)[targets[b]] if score == "probability" else logits[targets[b]])

    H, W = x.shape[-2:]
    maps = []
    for b in range(x.shape[0]):
        base = value(x[b], b)
        total, count = np.zeros((H, W)), np.zeros((H, W))
        for top in starts(H, window, stride):
            for left in starts(W, window, stride):
                occluded = x[b].clone()
                occluded[:, top:top + window, left:left + window] = fill.view(3, 1, 1)
                total[top:top + window, left:left + window] += base - value(occluded, b)
                count[top:top + window, left:left + window] += 1
        assert count.min() >= 1
        maps.append(total / count)
    return np.stack(maps)


@pytest.mark.parametrize("window, stride, baseline, score",
                         [(8, 4, "mean", "probability"), (12, 5, "black", "logit"), (32, 8, "mean", "logit")])
def test_equals_the_loop_on_a_vit(window, stride, baseline, score):
    module = tiny_timm_vit(seed=3).double()
    model = vitlens.load_model(module)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    fill = black(model) if baseline == "black" else torch.zeros(3, dtype=torch.float64)
    params = {"window": window, "stride": stride, "baseline": baseline, "score": score, "mask_batch": 5}
    ours = vitlens.explain(model, x, methods=["occlusion"], target=[2, 6], params={"occlusion": params})
    assert ours.patch_maps["occlusion"].shape == (2, 1, 32, 32)
    expected = loop_occlusion(module, x, [2, 6], window, stride, fill, score)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(ours.patch_maps["occlusion"][:, 0].numpy(), expected, atol=1e-12, rtol=1e-9)


def test_equals_the_loop_on_a_cnn_with_a_non_square_input():
    module = tiny_cnn(seed=1).double()
    model = vitlens.load_model(module)
    x = torch.randn(2, 3, 20, 28, generator=torch.Generator().manual_seed(3)).double()
    params = {"window": 6, "stride": 4, "baseline": "black", "score": "logit"}
    ours = vitlens.explain(model, x, methods=["occlusion"], target=[0, 7], params={"occlusion": params})
    expected = loop_occlusion(module, x, [0, 7], 6, 4, black(model), "logit")
    np.testing.assert_allclose(ours.patch_maps["occlusion"][:, 0].numpy(), expected, atol=1e-12, rtol=1e-9)


def test_batched_equals_alone_and_top2_slots():
    model = vitlens.load_model(tiny_timm_vit(seed=4))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    params = {"occlusion": {"window": 8, "stride": 8}}
    batch = vitlens.explain(model, x, methods=["occlusion"], target="top2", params=params)
    assert batch.patch_maps["occlusion"].shape == (3, 2, 32, 32)
    for i in range(3):
        for slot in range(2):
            alone = vitlens.explain(model, x[i:i + 1], methods=["occlusion"], target=int(batch.targets[i, slot]),
                                    params=params).patch_maps["occlusion"][0, 0]
            torch.testing.assert_close(alone, batch.patch_maps["occlusion"][i, slot], atol=1e-7, rtol=1e-5)


def test_window_larger_than_the_input_is_one_line():
    with pytest.raises(MethodError, match=r"^method 'occlusion': window=40 is larger than the 32x32 input$"):
        vitlens.explain(tiny_timm_vit(), torch.randn(1, 3, 32, 32), methods=["occlusion"],
                        params={"occlusion": {"window": 40}})


@pytest.mark.parametrize("params, fragment", [({"window": 0}, "window must be an integer >= 1"),
                                              ({"stride": -2}, "stride must be"), ({"baseline": 0}, "baseline must be"),
                                              ({"score": "softmax"}, "score must be")])
def test_parameter_errors_are_one_line(params, fragment):
    with pytest.raises(MethodError) as info:
        vitlens.explain(tiny_cnn(), torch.randn(1, 3, 8, 8), methods=["occlusion"], params={"occlusion": params})
    assert fragment in str(info.value) and "\n" not in str(info.value)
