"""Localisation metrics on hand-made maps, boxes and masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitlens.metrics import (average_precision, box_mask, boxes_to_input, energy_in_box, mask_to_input, pointing_game,
                             segmentation_scores)


def test_boxes_follow_the_crop_into_input_pixels():
    # the model saw the region (10, 10)-(110, 110) of the original, stretched to 224 x 224
    assert boxes_to_input([(10, 10, 60, 60)], (10, 10, 110, 110), (224, 224)) == [
        pytest.approx((0.0, 0.0, 112.0, 112.0))]
    # clipped to the input; a box outside the crop disappears
    assert boxes_to_input([(0, 50, 200, 60)], (10, 10, 110, 110), (224, 224)) == [
        pytest.approx((0.0, 89.6, 224.0, 112.0))]
    assert boxes_to_input([(120, 0, 130, 5)], (10, 10, 110, 110), (224, 224)) == []
    # a 64 px TinyImageNet image seen through a centre crop of 224/248
    (x0, y0, x1, y1), = boxes_to_input([(0, 0, 64, 64)], (3.0967, 3.0967, 60.9033, 60.9033), (224, 224))
    assert (x0, y0) == (0.0, 0.0) and (x1, y1) == (224.0, 224.0)


def test_box_mask_uses_pixel_centres():
    mask = box_mask([(1, 0, 3, 2)], (4, 4))
    assert mask.int().tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # a box edge at 1.4 includes pixel 1 (centre 1.5), one at 1.6 does not
    assert box_mask([(1.4, 0, 4, 1)], (1, 4)).int().tolist() == [[0, 1, 1, 1]]
    assert box_mask([(1.6, 0, 4, 1)], (1, 4)).int().tolist() == [[0, 0, 1, 1]]


def test_pointing_game_hit_miss_and_tolerance():
    maps = torch.zeros(1, 32, 32)
    maps[0, 5, 20] = 1.0  # peak at x = 20.5, y = 5.5
    box = [[(0, 0, 10, 10)]]  # peak is 10.5 px right of the box
    assert pointing_game(maps, box, tolerance=15).tolist() == [1.0]
    assert pointing_game(maps, box, tolerance=10).tolist() == [0.0]
    assert pointing_game(maps, box, tolerance=0).tolist() == [0.0]
    assert pointing_game(maps, [[(15, 0, 25, 10)]], tolerance=0).tolist() == [1.0]
    # diagonal distance: peak (20.5, 5.5) to corner (10, 20) of a box below-left: hypot(10.5, 14.5) = 17.9
    assert pointing_game(maps, [[(0, 20, 10, 30)]], tolerance=17.8).tolist() == [0.0]
    assert pointing_game(maps, [[(0, 20, 10, 30)]], tolerance=18.0).tolist() == [1.0]
    # any of several boxes; no box at all -> NaN
    assert pointing_game(maps, [[(0, 20, 1, 21), (20, 5, 21, 6)]], tolerance=0).tolist() == [1.0]
    assert math.isnan(pointing_game(maps, [[]])[0])


def test_pointing_game_batched_equals_per_image():
    maps = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(0))
    boxes = [[(0, 0, 8, 8)], [(8, 8, 16, 16)], [(4, 4, 12, 12)], [(0, 8, 16, 16)]]
    batched = pointing_game(maps, boxes, tolerance=2)
    single = torch.cat([pointing_game(maps[i:i + 1], boxes[i:i + 1], tolerance=2) for i in range(4)])
    assert torch.equal(batched, single)


def test_energy_in_box():
    maps = torch.ones(1, 4, 4)
    assert energy_in_box(maps, [[(0, 0, 2, 2)]]).tolist() == [0.25]
    concentrated = torch.zeros(1, 4, 4)
    concentrated[0, :2, :2] = 1.0
    concentrated[0, 3, 3] = 1.0  # 4 of 5 units of mass inside
    assert energy_in_box(concentrated, [[(0, 0, 2, 2)]]).tolist() == [pytest.approx(0.8)]
    # negative relevance is ignored; overlapping boxes count once
    signed = concentrated.clone()
    signed[0, 2, 2] = -5.0
    assert energy_in_box(signed, [[(0, 0, 2, 2), (0, 0, 1, 1)]]).tolist() == [pytest.approx(0.8)]
    assert energy_in_box(torch.zeros(1, 4, 4), [[(0, 0, 2, 2)]]).tolist() == [0.0]
    assert math.isnan(energy_in_box(maps, [[]])[0])


def test_segmentation_scores_on_a_tiny_mask():
    # map mean = 0.5 -> foreground prediction = the two 0.9 pixels; truth = left column
    maps = torch.tensor([[[0.9, 0.1], [0.9, 0.1]]])
    assert_scores(segmentation_scores(maps, torch.tensor([[[True, False], [True, False]]])),
                  pixel_accuracy=1.0, iou=1.0, miou=1.0, ap=1.0)
    # truth = top row: prediction hits 1 of 2, one false positive
    scores = segmentation_scores(torch.tensor([[[0.9, 0.2], [0.8, 0.1]]]),
                                 torch.tensor([[[True, True], [False, False]]]))
    # pred fg = {0.9, 0.8} (mean 0.5); gt fg = {0.9, 0.2}: inter 1, union 3; bg: pred {0.2, 0.1}, gt {0.8, 0.1}: 1/3
    # AP: ranking 0.9 (+), 0.8 (-), 0.2 (+), 0.1 (-): precision at the positives 1, 2/3 -> (1 + 2/3) / 2
    assert_scores(scores, pixel_accuracy=0.5, iou=1 / 3, miou=1 / 3, ap=(1 + 2 / 3) / 2)


def assert_scores(scores, **expected):
    for name, value in expected.items():
        assert float(scores[name][0]) == pytest.approx(value), name


def test_average_precision_with_ties_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = rng.integers(0, 6, size=60).astype(float)  # many ties
        labels = rng.random(60) < 0.3
        ours = average_precision(torch.tensor(scores), torch.tensor(labels))
        assert ours == pytest.approx(sklearn.average_precision_score(labels, scores), abs=1e-12)
    assert math.isnan(average_precision(torch.tensor([0.1, 0.2]), torch.tensor([False, False])))


def test_mask_to_input_crops_and_resizes():
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:5, :5] = True
    out = mask_to_input(mask, (0, 0, 10, 10), (4, 4))
    assert out.int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # only the top-left quarter was seen: all foreground
    assert mask_to_input(mask, (0, 0, 5, 5), (4, 4)).all()
