"""The engine's perturbation step (rise, occlusion) and the three new methods on the command line.

The maps themselves are checked in test_rise.py, test_occlusion.py and test_attention_gradcam.py; here:
the step runs with any mix of other methods and explains the targets of the first pass, it is refused
for text in one line, the CLI's ``explain`` (with the HTML report), ``evaluate`` and ``methods`` take the
new methods, and parameter mistakes are one line with exit code 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from tests.conftest import tiny_timm_vit
from tests.methods.test_rise import tiny_cnn
from vitlens import cli
from vitlens.errors import MethodError
from vitlens.methods import CNN_METHODS, DEFAULT_METHODS, REGISTRY, parse_methods

NEW = ("attention-gradcam", "rise", "occlusion")
SMALL = {"rise": {"masks": 12, "cells": 3}, "occlusion": {"window": 16, "stride": 16}}


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def picture(path, seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_registered_with_their_needs_and_not_in_all():
    assert REGISTRY["attention-gradcam"].needs == {"attentions", "gradients"}
    assert REGISTRY["rise"].needs == REGISTRY["occlusion"].needs == {"perturbation"}
    assert all(name in REGISTRY and REGISTRY[name].class_specific for name in NEW)
    # the model-agnostic methods are opt-in (hundreds of forwards per image), not part of 'all'
    assert not set(NEW) & set(DEFAULT_METHODS) and not set(NEW) & set(CNN_METHODS)


def test_cnn_takes_rise_and_occlusion_but_not_attention_gradcam():
    model = vitlens.load_model(tiny_cnn())
    assert parse_methods("rise,occlusion,gradcam", model) == ["rise", "occlusion", "gradcam"]
    assert parse_methods("all", model) == list(CNN_METHODS)
    with pytest.raises(MethodError, match="'attention-gradcam' needs attention maps"):
        parse_methods("attention-gradcam", model)


def test_text_models_refuse_them_in_one_line():
    from vitlens.text.task import parse_text_methods

    assert parse_text_methods("attention-gradcam") == ["attention-gradcam"]  # attention + gradients: text has both
    for name in ("rise", "occlusion"):
        with pytest.raises(MethodError) as info:
            parse_text_methods(name)
        message = str(info.value)
        assert "\n" not in message and f"method '{name}' is not available for text models" in message
        assert "perturbation" in message


@pytest.mark.parametrize("others", [["chefer", "gradcam"], ["attnlrp"], []])
def test_with_other_methods_same_maps_and_targets(others):
    model = vitlens.load_model(tiny_timm_vit(seed=5))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    together = vitlens.explain(model, x, methods=[*others, "rise", "occlusion"], target="top2", params=SMALL)
    targets = together.targets
    for name in ("rise", "occlusion"):
        alone = vitlens.explain(model, x, methods=[name], target=targets, params={name: SMALL[name]})
        torch.testing.assert_close(together.patch_maps[name], alone.patch_maps[name], atol=1e-7, rtol=1e-6)
        assert together.maps[name].shape == (2, 2, 32, 32)
        assert together.maps[name].min() >= 0 and together.maps[name].max() <= 1
    for name in others:
        alone = vitlens.explain(model, x, methods=[name], target=targets)
        torch.testing.assert_close(together.patch_maps[name], alone.patch_maps[name])
    # the default target is the prediction of the first pass, also when no other method asks for one
    predicted = vitlens.explain(model, x, methods=["rise"], params={"rise": SMALL["rise"]})
    assert predicted.targets[:, 0].tolist() == together.targets[:, 0].tolist()


def test_bf16_scores_in_float32_and_close_to_fp32():
    model = vitlens.load_model(tiny_timm_vit(seed=1))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    params = {"occlusion": SMALL["occlusion"]}
    fp32 = vitlens.explain(model, x, methods=["occlusion"], target=[1, 2], params=params)
    bf16 = vitlens.explain(model, x, methods=["occlusion"], target=[1, 2], params=params, precision="bf16")
    assert bf16.patch_maps["occlusion"].dtype == torch.float32
    a, b = fp32.patch_maps["occlusion"].flatten(), bf16.patch_maps["occlusion"].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9


def test_cli_explain_with_params_and_report(tmp_path, capsys, tiny):
    folder = tmp_path / "in"
    picture(folder / "a.png", 1)
    picture(folder / "b.png", 2)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "explain", folder, *tiny, "--methods", ",".join(NEW),
                                "--param", "rise.masks=6", "--param", "rise.cells=4", "--param", "rise.keep=0.3",
                                "--param", "occlusion.window=64", "--param", "occlusion.stride=48",
                                "--param", "occlusion.baseline=black", "--format", "html", "--out", out, "--quiet")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["methods"]) == list(NEW)
    assert manifest["methods"]["rise"] == {**REGISTRY["rise"].defaults, "masks": 6, "cells": 4, "keep": 0.3}
    assert manifest["methods"]["occlusion"]["baseline"] == "black"
    for image in manifest["images"]:
        assert image["status"] == "ok"
        shapes = {o["method"]: np.load(out / o["map"]).shape for o in image["outputs"]}
        assert shapes == {"attention-gradcam": (10, 10), "rise": (160, 160), "occlusion": (160, 160)}
    page = (out / "report.html").read_text()
    for name in NEW:
        assert f"overlays/{name}/" in page


@pytest.mark.parametrize("param, fragments", [("rise.keep=2", ["method 'rise'", "keep must be a number in (0, 1]"]),
                                              ("occlusion.window=0", ["window must be an integer >= 1"]),
                                              ("rise.cells=seven", ["cells must be an integer"]),
                                              ("occlusion.size=3", ["no parameter 'size'"])])
def test_cli_parameter_errors_are_one_line_exit_2(tmp_path, capsys, tiny, param, fragments):
    image = picture(tmp_path / "a.png", 0)
    code, _, err = run_cli(capsys, "explain", image, *tiny, "--methods", "rise,occlusion", "--param", param,
                           "--out", tmp_path / "out", "--quiet")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_methods_lists_them_with_their_parameters(capsys):
    code, stdout, _ = run_cli(capsys, "methods")
    assert code == 0
    lines = stdout.splitlines()
    for name in NEW:
        line = next(i for i, text in enumerate(lines) if text.split()[:1] == [name])
        assert REGISTRY[name].summary in lines[line]
        for key, value in REGISTRY[name].defaults.items():
            assert f"{key}={value}" in lines[line + 1]
    assert any("keep" in line and "a number in (0, 1]" in line for line in lines)


def test_cli_evaluate_with_rise_and_occlusion(tmp_path, capsys, tiny):
    folder = tmp_path / "photos"
    for i in range(2):
        picture(folder / f"p{i}.png", i)
    out = tmp_path / "eval"
    code, stdout, err = run_cli(capsys, "evaluate", folder, *tiny, "--methods", "rise,occlusion,attention-gradcam",
                                "--param", "rise.masks=6", "--param", "occlusion.window=80",
                                "--param", "occlusion.stride=80", "--metrics", "deletion,insertion", "--steps", "2",
                                "--out", out, "--quiet")
    assert code == 0, err
    import csv

    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    table = {(r["method"], r["metric"]): r for r in rows}
    for method in ("rise", "occlusion", "attention-gradcam"):
        for metric in ("deletion_auc", "insertion_auc"):
            assert int(table[(method, metric)]["n"]) == 2
            assert 0 <= float(table[(method, metric)]["mean"]) <= 1
