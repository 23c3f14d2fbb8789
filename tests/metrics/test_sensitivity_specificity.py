"""Sensitivity (max/avg-sensitivity, Lipschitz) and specificity (class contrast, two-object share):
hand-checked tiny cases, determinism, batched == per image, and the real ViT-Tiny on the cat-and-dog image."""

from __future__ import annotations

import math

import pytest
import torch

import vitlens
from vitlens.metrics.sensitivity import Explainer, perturb, sensitivity
from vitlens.metrics.specificity import (CATDOG, LabelledBox, class_contrast, contrast_targets, l1_distance,
                                         object_share, pick_two, rank_distance, two_object_share)

from ..conftest import requires_shared, tiny_timm_vit

H = W = 32


def images(n=3, seed=0):
    # pixel values 0.2..0.8 with mean 0 / std 1: no clamping for radius <= 0.2
    return 0.2 + 0.6 * torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(seed))


class Fake:
    """An explain callable with a fixed rule; ``calls`` records the batch sizes it was given."""

    def __init__(self, rule):
        self.rule = rule
        self.calls = []
        self.pixel_stats = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def __call__(self, x, targets):
        self.calls.append(x.shape[0])
        out = self.rule(x, targets)
        return {"m": out}


@pytest.fixture(scope="module")
def tiny():
    return vitlens.load_model(tiny_timm_vit())


# ------------------------------------------------------------------------------------ sensitivity
def test_constant_map_has_sensitivity_zero():
    x = images()
    fake = Fake(lambda x, t: torch.full((x.shape[0], H, W), 0.7))
    out = sensitivity(x, torch.zeros(3, dtype=torch.long), fake, samples=5, radius=0.1)["m"]
    for name in ("max_sensitivity", "avg_sensitivity", "lipschitz"):
        assert out[name].tolist() == [0.0, 0.0, 0.0]


def test_sensitivity_of_an_identity_map_is_the_noise():
    """map(x) = channel 0 of x: the map change is the channel-0 noise, checked against perturb()."""
    x = images(2)
    r = 0.05
    fake = Fake(lambda x, t: x[:, 0].clone())
    out = sensitivity(x, torch.zeros(2, dtype=torch.long), fake, samples=3, radius=r, seed=4)["m"]
    for b in range(2):
        d, lip = [], []
        for s in range(3):
            xp, step = perturb(x, b, s, r, (0.0,) * 3, (1.0,) * 3, seed=4)
            delta = xp - x[b]
            assert delta.abs().max() <= r + 1e-6 and delta.abs().max() > 0.9 * r
            assert step == pytest.approx(float(delta.double().norm()), rel=1e-5)
            d.append(float(delta[0].double().norm()) / math.sqrt(H * W))
            lip.append(float(delta[0].double().norm()) / step)
        assert float(out["max_sensitivity"][b]) == pytest.approx(max(d), rel=1e-5)
        assert float(out["avg_sensitivity"][b]) == pytest.approx(sum(d) / 3, rel=1e-5)
        assert float(out["lipschitz"][b]) == pytest.approx(max(lip), rel=1e-5)
        # uniform noise in [-r, r]: rms r / sqrt(3); one channel of three: Lipschitz about 1 / sqrt(3)
        assert float(out["avg_sensitivity"][b]) == pytest.approx(r / math.sqrt(3), rel=0.05)
        assert float(out["lipschitz"][b]) == pytest.approx(1 / math.sqrt(3), rel=0.05)


def test_relative_norm_and_clamping():
    x = images(1)
    fake = Fake(lambda x, t: x[:, 0].clone())
    rel = sensitivity(x, torch.zeros(1, dtype=torch.long), fake, samples=2, radius=0.05, norm="relative")["m"]
    rms = sensitivity(x, torch.zeros(1, dtype=torch.long), fake, samples=2, radius=0.05, norm="rms")["m"]
    scale = math.sqrt(H * W) / float(x[0, 0].double().norm())
    assert float(rel["max_sensitivity"][0]) == pytest.approx(float(rms["max_sensitivity"][0]) * scale, rel=1e-6)
    zero = Fake(lambda x, t: torch.zeros(x.shape[0], H, W))
    assert math.isnan(float(sensitivity(x, torch.zeros(1, dtype=torch.long), zero, samples=1,
                                        norm="relative")["m"]["max_sensitivity"][0]))
    # a white image cannot get brighter: the perturbation is clamped in pixel space and measured as clamped
    white = torch.ones(1, 3, H, W)
    xp, step = perturb(white, 0, 0, 0.1, (0.0,) * 3, (1.0,) * 3)
    assert float(xp.max()) <= 1.0 and step == pytest.approx(float((xp - white).double().norm()), rel=1e-5)


def test_perturbation_goes_through_the_model_normalisation():
    x = images(1)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    xp, _ = perturb(x, 0, 0, 0.05, mean, std)
    pixel_delta = (xp - x[0]) * torch.tensor(std).view(3, 1, 1)
    assert pixel_delta.abs().max() <= 0.05 + 1e-6
    assert (xp - x[0])[2].abs().max() < (xp - x[0])[0].abs().max()  # bigger std -> smaller step in input space


def test_sensitivity_is_seeded_and_batched_like_per_image(tiny):
    x = torch.randn(3, 3, H, W, generator=torch.Generator().manual_seed(1))
    ex = Explainer(tiny, ["rollout", "chefer", "random", "center"], batch_size=64)
    targets = ex.logits(x).argmax(1)
    a = sensitivity(x, targets, ex, samples=3, radius=0.05, seed=7, batch_size=64)
    b = sensitivity(x, targets, ex, samples=3, radius=0.05, seed=7, batch_size=64)
    c = sensitivity(x, targets, ex, samples=3, radius=0.05, seed=8, batch_size=64)
    for m in ("rollout", "chefer", "random"):
        assert torch.equal(a[m]["distances"], b[m]["distances"])
        assert not torch.allclose(a[m]["distances"], c[m]["distances"])
    assert a["center"]["max_sensitivity"].tolist() == [0.0, 0.0, 0.0]
    assert (a["random"]["max_sensitivity"] > a["rollout"]["max_sensitivity"]).all()
    # per image, with perturbed batches of a different size: the same values
    for i in range(3):
        one = sensitivity(x[i:i + 1], targets[i:i + 1], ex, samples=3, radius=0.05, seed=7, batch_size=2)
        for m in ("rollout", "chefer", "random", "center"):
            assert torch.allclose(one[m]["distances"][0], a[m]["distances"][i], atol=1e-5)
    # every image and sample in one explain call
    fake = Fake(lambda x, t: x[:, 0].clone())
    sensitivity(images(4), torch.zeros(4, dtype=torch.long), fake, samples=10, batch_size=64)
    assert fake.calls == [4, 40]


# ------------------------------------------------------------------------------------ specificity
def test_rank_and_l1_distances_known_values():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert float(rank_distance(a, a)[0]) == 0.0
    assert float(rank_distance(a, a.flip(-1))[0]) == pytest.approx(2.0)
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): rho = 4.5 / sqrt(22.5)
    tied = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    assert float(rank_distance(tied, a)[0]) == pytest.approx(1 - 4.5 / math.sqrt(22.5))
    # identical constant maps: 0 (Spearman itself is undefined); constant vs varying: NaN
    zero = torch.zeros(1, 4)
    assert float(rank_distance(zero, zero)[0]) == 0.0
    assert math.isnan(float(rank_distance(zero, a)[0]))
    p = torch.tensor([[0.0, 0.5, 1.0, 1.0]])
    q = torch.tensor([[1.0, 0.5, 0.0, 0.5]])
    assert float(l1_distance(p, q)[0]) == pytest.approx((1 + 0 + 1 + 0.5) / 4)


def test_target_independent_map_has_specificity_zero(tiny):
    x = torch.randn(4, 3, H, W, generator=torch.Generator().manual_seed(2))
    fake = Fake(lambda x, t: x[:, :1].expand(-1, t.shape[1], -1, -1).clone())  # ignores the target
    out = class_contrast(x, None, fake, logits=torch.randn(4, 10, generator=torch.Generator().manual_seed(0)))
    assert all(v.tolist() == [0.0] * 4 for v in out["m"].values())
    ex = Explainer(tiny, ["attention", "rollout", "random", "center", "chefer", "gradcam"])
    out = class_contrast(x, None, ex, seed=3)
    for m in ("attention", "rollout", "random", "center"):  # none of these looks at the target
        for name, v in out[m].items():
            assert v.tolist() == [0.0] * 4, (m, name)
    # class-specific methods do move
    assert float(out["chefer"]["contrast_l1_random"].mean()) > 0.01
    assert float(out["gradcam"]["contrast_rank_2nd"].mean()) > 0.05
    targets = out["_targets"]
    assert (targets[:, 1] != targets[:, 0]).all() and (targets[:, 2] != targets[:, 0]).all()


def test_contrast_targets_second_random_seeded_per_image():
    logits = torch.tensor([[0.0, 5.0, 3.0, 1.0], [9.0, 1.0, 2.0, 8.0]])
    x = images(2)
    second, other = contrast_targets(logits, torch.tensor([1, 3]), x, seed=0)
    assert second.tolist() == [2, 0]  # the best class other than the target (target 3 is not the top-1)
    assert other[0] != 1 and other[1] != 3
    again = contrast_targets(logits[1:], torch.tensor([3]), x[1:], seed=0)[1]
    assert int(again[0]) == int(other[1])  # the same image draws the same class in any batch
    draws = [int(contrast_targets(torch.zeros(1, 4), torch.tensor([2]), torch.full((1, 3, 2, 2), float(i)))[1][0])
             for i in range(200)]
    assert 2 not in draws and set(draws) == {0, 1, 3}


def test_class_contrast_batched_equals_per_image(tiny):
    x = torch.randn(3, 3, H, W, generator=torch.Generator().manual_seed(5))
    ex = Explainer(tiny, ["chefer", "legrad", "gmar-l2"])
    full = class_contrast(x, None, ex, seed=1)
    for i in range(3):
        one = class_contrast(x[i:i + 1], None, ex, seed=1)
        assert torch.equal(one["_targets"][0], full["_targets"][i])
        for m in ("chefer", "legrad", "gmar-l2"):
            for name in full[m]:
                assert float(one[m][name][0]) == pytest.approx(float(full[m][name][i]), abs=1e-4)


# ------------------------------------------------------------------------------------ two objects
def test_object_share_hand_checked():
    a, o = (0.0, 0.0, 8.0, 8.0), (16.0, 16.0, 32.0, 32.0)
    inside = torch.zeros(1, H, W)
    inside[0, 2:6, 2:6] = 1.0
    assert float(object_share(inside, [a], [o])[0]) == 1.0  # a map fully inside the target box
    assert float(object_share(inside, [o], [a])[0]) == 0.0
    flat = torch.ones(1, H, W)  # equal relevance per pixel: share = area ratio 64 / (64 + 256)
    assert float(object_share(flat, [a], [o])[0]) == pytest.approx(64 / 320)
    # the overlap counts for neither object
    overlap = torch.zeros(1, H, W)
    overlap[0, 6:8, 6:8] = 1.0
    assert math.isnan(float(object_share(overlap, [(0.0, 0.0, 8.0, 8.0)], [(6.0, 6.0, 12.0, 12.0)])[0]))
    assert math.isnan(float(object_share(torch.zeros(1, H, W), [a], [o])[0]))


def test_two_object_share_and_contrast():
    x = images(2)
    objects = [[LabelledBox(3, (0.0, 0.0, 8.0, 8.0)), LabelledBox(3, (8.0, 8.0, 9.0, 9.0)),
                LabelledBox(5, (16.0, 16.0, 32.0, 32.0))],  # the first two of DIFFERENT classes: 0 and 2
               [LabelledBox(1, (0.0, 0.0, 8.0, 8.0))]]  # one object: NaN
    assert pick_two(objects[0]) == (objects[0][0], objects[0][2])

    def perfect(x, t):  # all relevance on the explained object's box
        out = torch.zeros(x.shape[0], t.shape[1], H, W)
        for n in range(x.shape[0]):
            for k in range(t.shape[1]):
                if int(t[n, k]) == 3:
                    out[n, k, 0:8, 0:8] = 1
                else:
                    out[n, k, 16:32, 16:32] = 1
        return out

    got = two_object_share(x, objects, Fake(perfect))["m"]
    assert float(got["object_share"][0]) == 1.0 and float(got["object_contrast"][0]) == 1.0
    assert math.isnan(float(got["object_share"][1]))
    same = torch.rand(2, 1, H, W, generator=torch.Generator().manual_seed(0))
    blind = two_object_share(x, objects, Fake(lambda x, t: same[:x.shape[0]].expand(-1, t.shape[1], -1, -1)))
    assert float(blind["m"]["object_contrast"][0]) == pytest.approx(0.0, abs=1e-12)  # target-independent
    assert float(blind["m"]["object_share"][0]) == pytest.approx(0.5)


def test_catdog_boxes_are_data():
    assert [o.label for o in CATDOG] == [243, 282]
    for o in CATDOG:
        x0, y0, x1, y1 = o.box
        assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
    dog, cat = CATDOG
    assert dog.box[1] < cat.box[1] and dog.box[3] < cat.box[3]  # dog above, cat below


@requires_shared
def test_real_vit_catdog(real_vit):
    from vitlens.api import prepare_inputs
    from vitlens.metrics.localisation import boxes_to_input

    from ..conftest import SHARED_DATA

    x, records = prepare_inputs(real_vit, [str(SHARED_DATA / "demo_images" / "chefer_catdog.png")])
    objects = [[LabelledBox(o.label, boxes_to_input([o.box], records[0].crop_box, (224, 224))[0]) for o in CATDOG]]
    got = two_object_share(x, objects, Explainer(real_vit, ["rollout", "chefer", "center"]))
    assert float(got["rollout"]["object_contrast"][0]) == pytest.approx(0.0, abs=1e-9)
    assert float(got["center"]["object_contrast"][0]) == 0.0
    assert float(got["chefer"]["object_share"][0]) > 0.6  # class-specific: relevance moves to the asked object
    assert float(got["chefer"]["object_contrast"][0]) > 0.2
