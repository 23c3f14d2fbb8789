"""Sanity check: rank correlation and SSIM on known cases; cascading randomisation on a tiny ViT."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vitlens
from vitlens.metrics import cascading_randomization, randomization_stages, spearman, ssim
from vitlens.metrics.sanity import average_ranks, randomized_copies

from ..conftest import tiny_timm_vit


def test_spearman_known_values():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert float(spearman(a, a)[0]) == pytest.approx(1.0)
    assert float(spearman(a, a.flip(-1))[0]) == pytest.approx(-1.0)
    assert float(spearman(a, a ** 3 + 7)[0]) == pytest.approx(1.0)  # monotone: ranks only
    # ties share their mean rank: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4) -> 4.5 / sqrt(4.5 * 5)
    tied = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    assert average_ranks(tied).tolist() == [[1.0, 2.5, 2.5, 4.0]]
    assert float(spearman(tied, a)[0]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(float(spearman(torch.zeros(1, 4), a)[0]))


def test_spearman_matches_scipy_on_maps():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = np.round(rng.random((3, 8, 8)), 1)  # with ties
    b = np.round(rng.random((3, 8, 8)), 1)
    ours = spearman(torch.tensor(a), torch.tensor(b))
    for i in range(3):
        assert float(ours[i]) == pytest.approx(stats.spearmanr(a[i].ravel(), b[i].ravel())[0], abs=1e-12)


def test_ssim_known_values_and_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    a = rng.random((2, 32, 32))
    b = np.clip(a + 0.2 * rng.standard_normal((2, 32, 32)), 0, 1)
    ours = ssim(torch.tensor(a), torch.tensor(b))
    assert ssim(torch.tensor(a), torch.tensor(a)).tolist() == pytest.approx([1.0, 1.0])
    for i in range(2):
        ref = metrics.structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                            data_range=1.0)
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)
    # a constant shift lowers only the luminance term: c = (2 * 0.3 * 0.5 + c1) / (0.3^2 + 0.5^2 + c1)
    flat = ssim(torch.full((1, 16, 16), 0.3), torch.full((1, 16, 16), 0.5))
    c1 = 0.01 ** 2
    assert float(flat[0]) == pytest.approx((2 * 0.3 * 0.5 + c1) / (0.09 + 0.25 + c1))


@pytest.fixture(scope="module")
def tiny():
    model = vitlens.load_model(tiny_timm_vit())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, x


def test_stages_top_down(tiny):
    model, _ = tiny
    stages = randomization_stages(model)
    assert [s.name for s in stages] == ["head", "block2", "block1", "block0", "embedding"]
    names = {id(m): n for n, m in model.module.named_modules()}
    assert sorted(names[id(m)] for m in stages[0].modules) == ["head", "norm"]
    assert sorted(names[id(m)] for m in stages[-1].modules) == ["", "patch_embed.proj"]  # tokens + patch embedding
    assert all(names[id(m)].startswith("blocks.1.") for m in stages[2].modules)


def test_randomisation_is_cumulative_seeded_and_leaves_the_model_alone(tiny):
    model, x = tiny
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    def snapshots(seed):
        return [{k: v.clone() for k, v in clone.module.state_dict().items()}
                for _, clone in randomized_copies(model, seed=seed)]

    first = snapshots(3)
    again = snapshots(3)
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    # stage 0 changes the head only; the last stage has changed everything that has weights
    assert not torch.equal(first[0]["head.weight"], before["head.weight"])
    assert torch.equal(first[0]["blocks.2.attn.qkv.weight"], before["blocks.2.attn.qkv.weight"])
    assert not torch.equal(first[-1]["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    assert not torch.equal(first[-1]["pos_embed"], before["pos_embed"])


def test_cascading_randomisation_separates_model_dependent_maps(tiny):
    model, x = tiny
    result = cascading_randomization(model, x, ["rollout", "gmar-l2", "random", "center"], seed=0)
    assert result.stages == ["head", "block2", "block1", "block0", "embedding"]
    # the baselines ignore the model: identical maps at every stage
    assert torch.allclose(result.spearman["random"], torch.ones(5, 2, dtype=torch.float64))
    assert torch.allclose(result.ssim["center"], torch.ones(5, 2, dtype=torch.float64))
    # rollout does not read the head: unchanged after the head stage, changed once blocks are random
    assert torch.allclose(result.spearman["rollout"][0], torch.ones(2, dtype=torch.float64))
    assert (result.spearman["rollout"][-1] < 0.9).all()
    assert (result.spearman["gmar-l2"][-1] < 0.9).all()
