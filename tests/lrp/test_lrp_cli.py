"""LRP from the command line: gamma options, signed overlays, conservation figures, the gamma sweep grid."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from tests.conftest import SHARED_DATA, VIT_TINY_SPEC, VIT_TINY_WEIGHTS, requires_shared
from vitlens.cli import main, parse_gamma_sweep

pytestmark = requires_shared
CATDOG = str(SHARED_DATA / "demo_images" / "chefer_catdog.png")


def test_explain_with_gamma_options_writes_signed_overlays(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["explain", CATDOG, "--model", VIT_TINY_SPEC, "--weights", str(VIT_TINY_WEIGHTS),
                 "--methods", "attnlrp,cp-lrp", "--conv-gamma", "0.25", "--lin-gamma", "0.1", "--out", str(out),
                 "--quiet"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["methods"]["attnlrp"] == {"conv_gamma": 0.25, "lin_gamma": 0.1, "attention_gamma": True}
    for output in manifest["images"][0]["outputs"]:
        assert Image.open(out / output["overlay"]).size == Image.open(CATDOG).size
        assert abs(output["target_logit"]) > 0 and "relevance_sum" in output
    assert not list(out.rglob("*__signed.png"))  # one overlay per method and target: the signed one


def test_lrp_overlays_show_signed_relevance_or_on_request_its_positive_part(tmp_path, capsys):
    """The real ViT-Tiny: AttnLRP's overlay tints a visible share of the photo red or blue and leaves the
    pixels of near-zero relevance as they are; --signed-display positive draws the positive part with
    --cmap like every other map; the .npy map is the same signed relevance either way."""
    from vitlens.outputs import crop_box_pixels
    from vitlens.render import resize_map

    runs = {}
    for display in ("signed", "positive"):
        runs[display] = out = tmp_path / display
        assert main(["explain", CATDOG, "--model", VIT_TINY_SPEC, "--weights", str(VIT_TINY_WEIGHTS),
                     "--methods", "attnlrp", "--signed-display", display, "--out", str(out), "--quiet"]) == 0
        assert json.loads((out / "run.json").read_text())["overlay"]["signed"] == display
    record = json.loads((runs["signed"] / "manifest.json").read_text())["images"][0]
    entry = record["outputs"][0]
    relevance = np.load(runs["signed"] / entry["map"])
    np.testing.assert_array_equal(relevance, np.load(runs["positive"] / entry["map"]))
    assert (relevance < 0).any() and (relevance > 0).any()

    photo = np.asarray(Image.open(CATDOG).convert("RGB"), dtype=np.int64)
    x0, y0, x1, y1 = crop_box_pixels(record["crop_box"], (photo.shape[1], photo.shape[0]))
    signed = np.asarray(Image.open(runs["signed"] / entry["overlay"]), dtype=np.int64)
    positive = np.asarray(Image.open(runs["positive"] / entry["overlay"]), dtype=np.int64)
    change = np.abs(signed - photo).max(axis=2)[y0:y1, x0:x1]
    magnitude = resize_map(np.abs(relevance), (x1 - x0, y1 - y0))
    bound = np.percentile(np.abs(relevance), 99)
    assert change[magnitude < 0.005 * bound].max() <= 2  # nothing to show: the photo itself
    assert (change > 60).mean() > 0.01  # strongly relevant pixels are plainly coloured
    red_minus_blue = (signed - photo)[..., 0] - (signed - photo)[..., 2]
    strong = resize_map(relevance, (x1 - x0, y1 - y0)) / bound
    assert red_minus_blue[y0:y1, x0:x1][strong > 0.5].mean() > 40  # positive: red
    assert red_minus_blue[y0:y1, x0:x1][strong < -0.5].mean() < -40  # negative: blue
    # the positive display is the jet overlay of the positive part: every pixel of the crop is tinted
    assert (np.abs(positive - photo).max(axis=2)[y0:y1, x0:x1] > 0).mean() > 0.95


def test_gamma_sweep_grid(tmp_path, capsys):
    assert parse_gamma_sweep("0.1:0, 1:0.5") == [(0.1, 0.0), (1.0, 0.5)]
    one = tmp_path / "one.png"
    four = tmp_path / "four.png"
    for path, sweep in ((one, "1:0.5"), (four, "0.1:0,0.25:0.05,1:0.5,100:1")):
        code = main(["compare", CATDOG, "--model", VIT_TINY_SPEC, "--weights", str(VIT_TINY_WEIGHTS),
                     "--gamma-sweep", sweep, "--target", "243,282", "--out", str(path)])
        assert code == 0
    assert Image.open(four).width > 2 * Image.open(one).width
    assert Image.open(four).height == Image.open(one).height  # two rows (two classes) in both
    assert main(["compare", CATDOG, "--gamma-sweep", "1-0.5", "--out", str(tmp_path / "x.png")]) == 2
    assert "must look like CONV:LIN" in capsys.readouterr().err
