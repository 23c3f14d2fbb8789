"""Perturbation metrics: hand-computed curves and AUCs on toy models, batching, sharing, references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vitlens
from vitlens.metrics import (PerturbationBatch, baseline_inputs, deletion, drop_increase, insertion,
                             negative_perturbation, perturbation_metrics, positive_perturbation, trapezoid, unit_ranks)
from vitlens.metrics.perturbation import per_image_reference

from ..conftest import tiny_timm_vit

W4 = torch.tensor([[4.0, 3.0], [2.0, 1.0]])


class Weighted:
    """Toy 'model': class 0 logit = sign * sum(weights * channel 0), class 1 logit = const."""

    def __init__(self, weights: torch.Tensor, sign: float = 1.0, const: float = 0.0):
        self.weights, self.sign, self.const = weights, sign, const

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.sign * (x[:, 0] * self.weights).flatten(1).sum(1)
        return torch.stack([s, torch.full_like(s, self.const)], dim=1)


def ones(h, w, n=1):
    return torch.ones(n, 3, h, w)


def test_trapezoid_of_a_known_curve():
    x = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert float(trapezoid(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), x)) == pytest.approx(0.5)
    assert float(trapezoid(torch.ones(5, dtype=torch.float64), torch.linspace(0, 1, 5, dtype=torch.float64))) == 1.0


def test_unit_ranks_descending_and_seeded_ties():
    ranks = unit_ranks(torch.tensor([[[3.0, 1.0], [2.0, 0.0]]]))
    assert ranks.tolist() == [[0, 2, 1, 3]]
    flat = torch.zeros(1, 4, 4)
    a, b, c = unit_ranks(flat, seed=0), unit_ranks(flat, seed=0), unit_ranks(flat, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.tolist() != [list(range(16))]  # ties are not broken in raster order
    assert sorted(a[0].tolist()) == list(range(16))


def test_deletion_and_insertion_hand_computed():
    # weights 4, 3, 2, 1 on a ones image; map = weights -> removal order 4, 3, 2, 1
    model, x, maps, t = Weighted(W4), ones(2, 2), W4[None], torch.tensor([0])
    d = deletion(model, x, maps, t, steps=4, score="logit")
    assert d["curve"][0].tolist() == [10.0, 6.0, 3.0, 1.0, 0.0]
    assert float(d["auc"][0]) == pytest.approx(0.25 * (8 + 4.5 + 2 + 0.5))  # 3.75
    assert float(d["auc_norm"][0]) == pytest.approx(0.375)
    i = insertion(model, x, maps, t, steps=4, score="logit", baseline="zero")
    assert i["curve"][0].tolist() == [0.0, 4.0, 7.0, 9.0, 10.0]
    assert float(i["auc"][0]) == pytest.approx(6.25)
    assert float(i["auc_norm"][0]) == pytest.approx(0.625)
    # the reversed map is the worst explanation: deletion removes the least important first
    worst = deletion(model, x, -maps, t, steps=4, score="logit")
    assert worst["curve"][0].tolist() == [10.0, 9.0, 7.0, 4.0, 0.0]
    # probabilities: softmax of (s, 0) = sigmoid(s)
    p = deletion(model, x, maps, t, steps=4, score="prob")
    expected = [1 / (1 + math.exp(-v)) for v in (10.0, 6.0, 3.0, 1.0, 0.0)]
    assert p["curve"][0].tolist() == pytest.approx(expected)
    x_axis = np.linspace(0, 1, 5)
    assert float(p["auc"][0]) == pytest.approx(np.trapezoid(expected, x_axis) if hasattr(np, "trapezoid")
                                               else np.trapz(expected, x_axis))
    # normalised: (y - y_base) / (y_orig - y_base), y_base = sigmoid(0) = 0.5
    assert p["curve_norm"][0].tolist() == pytest.approx([(e - 0.5) / (expected[0] - 0.5) for e in expected])


def test_patch_granularity_removes_whole_patches():
    # a 4x4 image, 2x2 patch map: each step removes one 2x2 patch
    weights = torch.arange(16, dtype=torch.float32).view(4, 4)
    patch_map = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    d = deletion(Weighted(weights), ones(4, 4), patch_map, torch.tensor([0]), steps=4, score="logit",
                 granularity="patch")
    quadrant = [float(weights[r:r + 2, c:c + 2].sum()) for r, c in ((2, 2), (2, 0), (0, 2), (0, 0))]
    total = float(weights.sum())
    assert d["curve"][0].tolist() == pytest.approx([total - sum(quadrant[:k]) for k in range(5)])


def _ten_pixels():
    weights = torch.arange(9, -1, -1, dtype=torch.float32).view(1, 10)  # 9 ... 0
    return Weighted(weights, const=5.0), ones(1, 10), weights[None]


def test_positive_and_negative_perturbation_hand_computed():
    model, x, maps = _ten_pixels()
    t, label = torch.tensor([0]), torch.tensor([0])
    # remaining sums after removing the top k = 45, 36, 28, 21, 15, 10, 6, 3, 1, 0 -> correct while > 5
    pos = positive_perturbation(model, x, maps, t, labels=label)
    assert pos["curve"][0].tolist() == [100.0] * 7 + [0.0] * 3
    assert float(pos["auc"][0]) == pytest.approx(65.0)
    # least relevant first: 45, 45, 44, 42, 39, 35, 30, 24, 17, 9 -> always correct; area over [0, 0.9] = 90
    neg = negative_perturbation(model, x, maps, t, labels=label)
    assert neg["curve"][0].tolist() == [100.0] * 10
    assert float(neg["auc"][0]) == pytest.approx(90.0)
    # against another label the same images are always wrong
    wrong = positive_perturbation(model, x, maps, t, labels=torch.tensor([1]))
    assert wrong["curve"][0].tolist()[:7] == [0.0] * 7 and wrong["curve"][0].tolist()[7:] == [100.0] * 3
    # without a label, the original prediction (class 0) is the reference
    assert positive_perturbation(model, x, maps, t)["curve"].tolist() == pos["curve"].tolist()


def test_average_drop_increase_gain_hand_computed():
    x, t = ones(2, 2), torch.tensor([0])
    explanation = (W4 / 4)[None]  # weights in [0, 1]: O = sum(w * w / 4) = 7.5, Y = 10
    logit = drop_increase(Weighted(W4), x, explanation, t, score="logit")
    assert float(logit["average_drop"][0]) == pytest.approx(25.0)
    assert float(logit["increase_confidence"][0]) == 0.0
    prob = drop_increase(Weighted(W4), x, explanation, t)
    y, o = 1 / (1 + math.exp(-10)), 1 / (1 + math.exp(-7.5))
    assert float(prob["average_drop"][0]) == pytest.approx(100 * (y - o) / y)
    assert float(prob["average_gain"][0]) == 0.0
    # a model whose class-0 logit falls with brightness: darkening raises it -> increase and gain
    falling = drop_increase(Weighted(W4, sign=-1.0), x, explanation, t)
    y, o = 1 / (1 + math.exp(10)), 1 / (1 + math.exp(7.5))
    assert float(falling["average_drop"][0]) == 0.0
    assert float(falling["increase_confidence"][0]) == 100.0
    assert float(falling["average_gain"][0]) == pytest.approx(100 * (o - y) / (1 - y))
    # GMAR++ mode: keep the top 25 % (one of four pixels, weight 4) on the zero baseline: O = 4
    top = drop_increase(Weighted(W4), x, explanation, t, score="logit", mode="top", keep=0.25)
    assert float(top["average_drop"][0]) == pytest.approx(60.0)


def test_baselines():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    zero = baseline_inputs(x, "zero", mean, std)
    assert torch.allclose(zero * 0.5 + 0.5, torch.zeros_like(x))  # black pixels
    assert torch.allclose(baseline_inputs(x, "mean", mean, std), x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    flat = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(baseline_inputs(flat, "blur"), flat, atol=1e-6)
    noise = baseline_inputs(x, "noise", mean, std, seed=3)
    assert torch.equal(noise[1], baseline_inputs(x[1:], "noise", mean, std, seed=3)[0])  # per image, any batch
    assert not torch.equal(noise, baseline_inputs(x, "noise", mean, std, seed=4))
    pixels = noise * 0.5 + 0.5
    assert pixels.min() >= 0 and pixels.max() <= 1


@pytest.fixture(scope="module")
def tiny():
    model = vitlens.load_model(tiny_timm_vit())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = vitlens.explain(model, x, methods="rollout,gmar-l2,random")
    return model, x, result


ALL = {"deletion": {"steps": 8}, "insertion": {"steps": 8}, "pos_perturbation": {}, "neg_perturbation": {},
       "drop_increase": {}}


def test_batched_equals_per_image(tiny):
    model, x, result = tiny
    maps = {m: result.maps[m][:, 0] for m in result.methods}
    targets = result.targets[:, 0]
    labels = torch.tensor([1, -1, 3])
    batched = perturbation_metrics(model, x, maps, targets, labels=labels, metrics=ALL, batch_size=7)
    for i in range(3):
        single = perturbation_metrics(model, x[i:i + 1], {m: v[i:i + 1] for m, v in maps.items()}, targets[i:i + 1],
                                      labels=labels[i:i + 1], metrics=ALL, batch_size=64)
        for method in maps:
            for metric, values in single[method].items():
                for name, tensor in values.items():
                    if name == "fractions":
                        continue
                    got = batched[method][metric][name][i]
                    assert torch.allclose(got, tensor[0], atol=1e-5), (method, metric, name)


def test_matches_a_straightforward_per_step_loop(tiny):
    model, x, result = tiny
    # the reference sorts without tie-breaking: give the map distinct values
    maps = result.maps["gmar-l2"][:, 0] + 1e-4 * torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = result.targets[:, 0]
    base = baseline_inputs(x, "blur")
    batched = deletion(model, x, maps, targets, steps=6, baseline="blur")
    inserted = insertion(model, x, maps, targets, steps=6, baseline="blur")
    for i in range(3):
        ref = per_image_reference(model.module, x[i], maps[i], int(targets[i]), 6, base[i], "deletion")
        assert np.allclose(batched["curve"][i].numpy(), ref, atol=1e-5)
        ref = per_image_reference(model.module, x[i], maps[i], int(targets[i]), 6, base[i], "insertion")
        assert np.allclose(inserted["curve"][i].numpy(), ref, atol=1e-5)


def test_zero_baseline_shares_the_perturbed_images(tiny):
    model, x, result = tiny
    maps = {"rollout": result.maps["rollout"][:, 0]}
    targets = result.targets[:, 0]
    alone, shared = {}, {}
    perturbation_metrics(model, x, maps, targets, metrics={"deletion": {"steps": 10}, "insertion":
                         {"steps": 10, "baseline": "zero"}}, stats=alone)
    perturbation_metrics(model, x, maps, targets, metrics={"deletion": {"steps": 10}, "insertion":
                         {"steps": 10, "baseline": "zero"}, "pos_perturbation": {}, "neg_perturbation": {}},
                         stats=shared)
    # per image: original + black + 9 deletion + 9 insertion steps; the Chefer curves cost nothing more
    assert alone["forwards"] == shared["forwards"] == 3 * 20


def test_a_faithful_map_beats_its_reverse_on_a_real_tiny_vit(tiny):
    model, x, result = tiny
    maps = result.maps["gmar-l2"][:, 0]
    targets = result.targets[:, 0]
    good = deletion(model, x, maps, targets, steps=8, score="logit")["auc"].mean()
    bad = deletion(model, x, 1 - maps, targets, steps=8, score="logit")["auc"].mean()
    assert good != bad


def test_requests_after_run_are_refused():
    pb = PerturbationBatch(Weighted(W4), ones(2, 2))
    pb.add_ranking("k", W4[None])
    pb.keep_range(0, 0, "k", 1, 4, "zero")
    pb.run()
    with pytest.raises(RuntimeError):
        pb.keep_range(0, 0, "k", 2, 4, "zero")


def test_bad_options_raise():
    with pytest.raises(ValueError, match="baseline"):
        deletion(Weighted(W4), ones(2, 2), W4[None], torch.tensor([0]), baseline="grey")
    with pytest.raises(ValueError, match="score"):
        deletion(Weighted(W4), ones(2, 2), W4[None], torch.tensor([0]), score="rank")
    with pytest.raises(ValueError, match="input size"):
        deletion(Weighted(W4), ones(4, 4), W4[None], torch.tensor([0]))


def test_signed_relevance_is_ranked_by_its_signed_values(tiny):
    """A signed map gives exactly the curves of any increasing map of it into [0, 1]: its most negative pixel is
    the least relevant. Its positive part ties every negative pixel at zero and ranks them at random."""
    model, x, _ = tiny
    relevance = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    relevance = relevance * (relevance.abs() > 0.3)  # exact zeros too, as LRP maps have
    low = relevance.flatten(1).amin(1)[:, None, None]
    high = relevance.flatten(1).amax(1)[:, None, None]
    increasing = (relevance - low) / (high - low)
    positive = relevance.clamp_min(0) / high
    targets = torch.tensor([0, 1, 2])
    metrics = {"deletion": {"steps": 8}, "insertion": {"steps": 8}, "pos_perturbation": {}, "neg_perturbation": {}}
    out = perturbation_metrics(model, x, {"signed": relevance, "increasing": increasing, "positive": positive},
                               targets, metrics=metrics)
    for metric in metrics:
        assert torch.equal(out["signed"][metric]["curve"], out["increasing"][metric]["curve"]), metric
    assert not torch.equal(out["signed"]["insertion"]["curve"], out["positive"]["insertion"]["curve"])


def test_average_drop_of_a_signed_map_multiplies_by_its_positive_part(tiny):
    model, x, _ = tiny
    relevance = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    positive = relevance.clamp_min(0) / relevance.flatten(1).amax(1)[:, None, None]
    targets = torch.tensor([2, 0, 1])
    out = perturbation_metrics(model, x, {"signed": relevance, "positive": positive}, targets,
                               metrics={"drop_increase": {}})
    for name, values in out["signed"]["drop_increase"].items():
        assert torch.allclose(values, out["positive"]["drop_increase"][name], atol=1e-9), name
