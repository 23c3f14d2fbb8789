"""LRP from the command line: gamma options, signed overlays, conservation figures, the gamma sweep grid."""

from __future__ import annotations

import json

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
    assert manifest["methods"]["attnlrp"] == {"conv_gamma": 0.25, "lin_gamma": 0.1}
    for output in manifest["images"][0]["outputs"]:
        assert (out / output["signed_overlay"]).is_file()
        assert Image.open(out / output["overlay"]).size == Image.open(CATDOG).size
        assert abs(output["target_logit"]) > 0 and "relevance_sum" in output


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
