"""attention-gradcam: Transformer-Explainability's ``attn_gradcam`` baseline restated in float64.

The reference below is written from the baseline's definition (hila-chefer/Transformer-Explainability,
``Baselines.generate_cam_attn``, and docs/methods.md), with explicit loops over images and heads in
numpy float64. Attention and its gradient are captured without vitlens code: a deep copy of the timm
model runs with ``fused_attn = False`` and a forward hook on each block's ``attn.attn_drop`` (the tensor
that multiplies the values), and the gradient comes from a plain ``backward``.

Per image and head h of the chosen layer: a_h = (w @ A_h)[1:], g_h = (w @ G_h)[1:] with w the readout
row weights (one-hot CLS, or the mean of the patch rows for average pooling), c_h = mean(g_h),
map = max(0, mean_h c_h a_h) on the 4x4 grid.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import vitlens
from tests.conftest import same_vit_three_layouts, tiny_timm_vit
from vitlens.methods.attention_gradcam import attention_gradcam
from vitlens.methods.common import Captured

GRID = (4, 4)


def _capture(model, x, targets):
    """Every layer's attention and d(target logits)/dA with plain hooks on a deep copy."""
    m = copy.deepcopy(model).eval()
    attentions = []

    def hook(module, inputs, output):
        output.retain_grad()
        attentions.append(output)

    handles = []
    for block in m.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(hook))
    logits = m(x)
    logits.gather(1, torch.tensor(targets).view(-1, 1)).sum().backward()
    for handle in handles:
        handle.remove()
    return [a.detach().numpy() for a in attentions], [a.grad.numpy() for a in attentions]


def _readout(pool, n):
    w = np.zeros(n)
    if pool == "token":
        w[0] = 1.0
    else:  # average pooling: the mean of the patch rows
        w[1:] = 1.0 / (n - 1)
    return w


def reference(A, G, pool, layer=-1):
    a_all, g_all = A[layer], G[layer]
    B, K, N, _ = a_all.shape
    w = _readout(pool, N)
    maps = []
    for b in range(B):
        total = np.zeros(N - 1)
        for h in range(K):
            a = (w @ a_all[b, h])[1:]
            g = (w @ g_all[b, h])[1:]
            total += g.mean() * a / K
        maps.append(np.maximum(total, 0.0).reshape(GRID))
    return np.stack(maps)


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("layer", [-1, 0])
def test_matches_float64_reference(pool, layer):
    targets = [3, 7, 1]
    for seed in range(3):  # random heads give all-negative weights now and then: check that not every map is 0
        module = tiny_timm_vit(seed=seed, global_pool=pool).double()
        # float32 values: explain takes tensors as float32 before casting them to the model's dtype
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).double()
        A, G = _capture(module, x, targets)
        expected = reference(A, G, pool, layer)
        ours = vitlens.explain(vitlens.load_model(module), x, methods=["attention-gradcam"], target=targets,
                               params={"attention-gradcam": {"layer": layer}}).patch_maps["attention-gradcam"][:, 0]
        assert ours.dtype == torch.float64
        scale = np.abs(expected).max()
        np.testing.assert_allclose(ours.numpy(), expected, atol=1e-9 * max(scale, 1e-12), rtol=0)
        if scale > 0:
            return
    pytest.fail("every reference map was zero: the check would not see a wrong formula")


def test_hand_computed_clamp_after_head_mean():
    # one image, 2 heads, tokens [cls, p0, p1, p2, p3] on a 2x2 grid, CLS readout
    A = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    G = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    A[0, 0, 0] = torch.tensor([0.2, 0.4, 0.2, 0.1, 0.1])
    A[0, 1, 0] = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.4])
    G[0, 0, 0] = torch.tensor([9.0, 1.0, 1.0, 1.0, 1.0])  # c_0 = mean of the patch columns = 1 (CLS column ignored)
    G[0, 1, 0] = torch.tensor([0.0, -2.0, -1.0, -1.0, 0.0])  # c_1 = -1
    G[0, 0, 1:] = 100.0  # other query rows never enter the weights
    captured = Captured([A], [G], torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64), 1, (2, 2))
    # mean_h c_h a_h = ([0.4, 0.2, 0.1, 0.1] - [0.1, 0.1, 0.3, 0.4]) / 2 = [0.15, 0.05, -0.1, -0.15] -> clamp
    expected = torch.tensor([[0.15, 0.05], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(attention_gradcam(captured), expected[None], atol=1e-12)
    # a ReLU before the head mean would give [0.2, 0.1, 0.05, 0.05]: the placement is what the baseline does
    per_image_readout = Captured([A], [G], torch.tensor([[1.0, 0, 0, 0, 0]], dtype=torch.float64), 1, (2, 2))
    assert torch.allclose(attention_gradcam(per_image_readout), expected[None], atol=1e-12)


def test_batched_equals_alone_and_top2_slots():
    model = vitlens.load_model(tiny_timm_vit(seed=2))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    batch = vitlens.explain(model, x, methods=["attention-gradcam"], target="top2")
    assert batch.patch_maps["attention-gradcam"].shape == (3, 2, 4, 4)
    for i in range(3):
        for slot in range(2):
            target = int(batch.targets[i, slot])
            alone = vitlens.explain(model, x[i:i + 1], methods=["attention-gradcam"], target=target)
            torch.testing.assert_close(batch.patch_maps["attention-gradcam"][i, slot],
                                       alone.patch_maps["attention-gradcam"][0, 0], atol=1e-7, rtol=1e-5)


def test_same_map_on_timm_hugging_face_and_torchvision_copies():

    timm_module, hf, tv = same_vit_three_layouts(seed=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    maps = [vitlens.explain(m, x, methods=["attention-gradcam"], target=[1, 6]).patch_maps["attention-gradcam"]
            for m in (timm_module, hf, tv)]
    scale = float(maps[0].abs().max())
    assert scale > 0
    for other in maps[1:]:
        torch.testing.assert_close(other, maps[0], atol=1e-4 * scale, rtol=0)
