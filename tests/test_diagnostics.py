"""Maps that show nothing: the checks, the likely causes, and the warning once per run (API, CLI, manifest,
report), on torchvision's vit_b_16() whose classification head is initialised to zero."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import vitlens
from vitlens.api import DegenerateMapWarning
from vitlens.cli import main
from vitlens.diagnostics import CONSTANT, NON_FINITE, ZERO, degenerate_kind, flat_scores, likely_cause, summarise

from .conftest import TINY_SPEC


def test_degenerate_kinds():
    assert degenerate_kind(torch.zeros(4, 4)) == ZERO
    assert degenerate_kind(torch.full((4, 4), 0.37)) == CONSTANT
    assert degenerate_kind(torch.full((4, 4), -2.0)) == CONSTANT
    rounded = torch.full((4, 4), 0.1, dtype=torch.float32)
    rounded[0, 0] = torch.nextafter(torch.tensor(0.1), torch.tensor(1.0))  # one float32 step apart
    assert degenerate_kind(rounded) == CONSTANT
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = torch.rand(4, 4)
        values[2, 1] = bad
        assert degenerate_kind(values) == NON_FINITE
    assert degenerate_kind(torch.rand(4, 4, generator=torch.Generator().manual_seed(0))) is None
    tiny_but_real = torch.zeros(4, 4)
    tiny_but_real[1, 1] = 1e-30  # relevance far below 1 is still relevance
    assert degenerate_kind(tiny_but_real) is None


def test_causes_and_summary():
    assert flat_scores(torch.zeros(1000)) and flat_scores(torch.full((10,), 0.1))
    assert not flat_scores(torch.tensor([0.1, 0.2, 0.7]))
    assert "zero-initialised head" in likely_cause(ZERO, flat_logits=True)
    assert "gradient is zero" in likely_cause(CONSTANT, flat_logits=False)
    assert "try fp32" in likely_cause(NON_FINITE, False, "bf16") and "fp32" not in likely_cause(NON_FINITE, False)
    lines = summarise([("gradcam", ZERO, "cause A", "a.jpg"), ("gradcam", ZERO, "cause A", "b.jpg"),
                       ("legrad", CONSTANT, "cause B", "b.jpg")])
    assert lines == ["gradcam: 2 all-zero maps (first: 'a.jpg'): cause A",
                     "legrad: 1 constant map (first: 'b.jpg'): cause B"]


@pytest.fixture(scope="module")
def zero_head_vit():
    """torchvision's vit_b_16() as a user builds it without weights: its head is initialised to zero."""
    import torchvision

    torch.manual_seed(0)
    module = torchvision.models.vit_b_16().eval()
    assert float(module.heads.head.weight.detach().abs().max()) == 0.0
    return vitlens.load_model(module)


def test_torchvision_vit_b_16_with_its_zero_head_warns_once_naming_the_cause(zero_head_vit):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with pytest.warns(DegenerateMapWarning) as caught:
        result = vitlens.explain(zero_head_vit, x, methods="rollout,gradcam,chefer,legrad")
    assert len(caught) == 1  # once per call, for every method and image together
    message = str(caught[0].message)
    assert "zero-initialised head" in message and "gradcam: 2 all-zero maps (first: 'input 0')" in message
    flagged = {(d["method"], d["index"]) for d in result.degenerate_maps()}
    # the gradient methods see a zero gradient everywhere; attention rollout does not use the head at all
    assert flagged == {(m, i) for m in ("gradcam", "chefer", "legrad") for i in (0, 1)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vitlens.explain(zero_head_vit, x, methods="rollout,gradcam", warn=False)


def test_a_run_names_degenerate_maps_in_the_records_manifest_report_and_console(tmp_path, capsys, zero_head_vit):
    from PIL import Image

    from vitlens.data import resolve_inputs
    from vitlens.runner import run_explain

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.effect_noise((256, 256), 40 + i).convert("RGB").save(folder / f"noise{i}.png")
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateMapWarning)  # a run says it once, at its end, not per batch
        summary = run_explain(resolve_inputs([str(folder)]), zero_head_vit, ["rollout", "gradcam"], out_dir=out,
                              batch_size=2, progress=False, html=True)
    assert len(summary.warnings) == 1 and summary.warnings[0].startswith("gradcam: 3 all-zero maps (first: '")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["warnings"] == summary.warnings
    for image in manifest["images"]:
        by_method = {o["method"]: o for o in image["outputs"]}
        assert by_method["gradcam"]["warning"]["kind"] == ZERO and "warning" not in by_method["rollout"]
    html = (out / "report.html").read_text()
    assert 'id="warnings"' in html and "gradcam: 3 all-zero maps" in html


def test_the_cli_prints_the_warning_once_on_stderr(tmp_path, capsys):
    """A tiny timm ViT whose head was zeroed, through `vitlens explain`: one warning line, exit 0."""
    import timm

    torch.manual_seed(0)
    module = timm.create_model("test_vit", pretrained=False)
    torch.nn.init.zeros_(module.head.weight)
    torch.nn.init.zeros_(module.head.bias)
    weights = tmp_path / "zero_head.pth"
    torch.save(module.state_dict(), weights)
    folder = tmp_path / "in"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.effect_noise((64, 64), 30 + i).convert("RGB").save(folder / f"n{i}.png")
    code = main(["explain", str(folder), "--model", TINY_SPEC, "--weights", str(weights), "--methods",
                 "rollout,gradcam,attnlrp", "--out", str(tmp_path / "run"), "--quiet", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("vitlens: warning: ") for line in lines), err
    assert "gradcam: 3 all-zero maps" in err and "attnlrp: 3 all-zero maps" in err and "rollout" not in err
