"""``vitlens evaluate`` end to end on tiny data: tables, plots, report, resume, and one-line errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

import vitlens
from vitlens import cli
from vitlens.data import resolve_inputs
from vitlens.evaluate import aggregate, run_evaluate, wide_table
from tests.conftest import TINY_SPEC

def picture(path: Path, seed: int, size=(64, 64)) -> None:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    array[16:48, 16:48] = 255 - array[16:48, 16:48] // 4
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG")


@pytest.fixture(scope="module")
def tin(tmp_path_factory) -> Path:
    """A TinyImageNet-layout folder: 3 images, 2 classes, one box each."""
    root = tmp_path_factory.mktemp("tin") / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("n01443537\nn01629819\n")
    (root / "words.txt").write_text("n01443537\tgoldfish\nn01629819\tsalamander\n")
    rows = [("val_0.JPEG", "n01629819", 10, 12, 40, 50), ("val_1.JPEG", "n01443537", 0, 0, 63, 63),
            ("val_2.JPEG", "n01443537", 20, 20, 30, 30)]
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "val_annotations.txt").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    for i, row in enumerate(rows):
        picture(root / "val" / "images" / row[0], i)
    return root


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str, *fragments) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


EVAL = ["--methods", "rollout,gmar-l2,random", "--steps", "2", "--batch-size", "2", "--quiet"]


def test_evaluate_end_to_end_tables_plots_report_and_resume(tmp_path, capsys, tiny, tin):
    out = tmp_path / "run"
    args = ["evaluate", f"tinyimagenet:{tin}", *tiny, *EVAL, "--metrics", "faithfulness,localisation,sanity",
            "--metric-param", "sanity.images=1", "--metric-param", "sanity.max_stages=2", "--out", out]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "explained 3 image(s)" in stdout and "metrics.md" in stdout
    rows = read_csv(out / "metrics.csv")
    table = {(r["method"], r["metric"]): r for r in rows}
    for method in ("rollout", "gmar-l2", "random"):
        for metric in ("deletion_auc", "insertion_auc_norm", "pos_perturbation_auc", "neg_perturbation_auc",
                       "average_drop", "increase_confidence", "average_gain", "pointing_game", "energy_in_box"):
            row = table[(method, metric)]
            assert int(row["n"]) == 3
            assert float(row["ci_low"]) <= float(row["mean"]) <= float(row["ci_high"])
        assert int(table[(method, "sanity_spearman_all")]["n"]) == 1  # only the first image gets the sanity check
    assert float(table[("random", "sanity_spearman_head")]["mean"]) == pytest.approx(1.0)
    assert table[("rollout", "deletion_auc")]["better"] == "lower"
    assert table[("rollout", "insertion_auc")]["better"] == "higher"
    # the per-image values in the records give the table's means
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    values = [r["metrics"]["gmar-l2"]["energy_in_box"] for r in records]
    assert float(table[("gmar-l2", "energy_in_box")]["mean"]) == pytest.approx(np.mean(values), abs=1e-5)
    assert len(records[0]["curves"]["rollout"]["deletion"]) == 3  # steps + 1 points
    assert len(records[0]["curves"]["rollout"]["pos_perturbation"]) == 10
    # JSON, Markdown, plots, manifest and report
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["settings"]["evaluate"]["metrics"]["deletion"]["steps"] == 2
    assert set(payload["curves"]["deletion"]) == {"rollout", "gmar-l2", "random"}
    md = (out / "metrics.md").read_text()
    assert md.startswith("| method |") and "| gmar-l2 |" in md and "±" in md
    for name in ("deletion", "insertion", "pos_perturbation", "neg_perturbation", "sanity_spearman"):
        with Image.open(out / "plots" / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 300
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["columns"][0] == "method"
    assert [r[0] for r in manifest["metrics"]["rows"]] == ["rollout", "gmar-l2", "random"]
    html = (out / "report.html").read_text()
    assert 'id="metrics"' in html and 'id="metric-curves"' in html and "plots/deletion.png" in html
    before = (out / "metrics.csv").read_text()
    # the same command again: nothing recomputed, same tables
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "explained 0 image(s), 3 already done" in stdout
    assert (out / "metrics.csv").read_text() == before


def test_interrupted_run_resumes_to_the_same_tables(tmp_path, capsys, tiny, tin):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = ["evaluate", f"tinyimagenet:{tin}", *tiny, *EVAL, "--metrics", "deletion,pointing_game"]
    assert run_cli(capsys, *base, "--out", straight)[0] == 0
    assert run_cli(capsys, *base, "--limit", "2", "--out", resumed)[0] == 0  # stops after the first batch
    code, stdout, _ = run_cli(capsys, *base, "--out", resumed)
    assert code == 0 and "explained 1 image(s), 2 already done" in stdout
    assert (straight / "metrics.csv").read_text() == (resumed / "metrics.csv").read_text()


def test_batch_size_does_not_change_the_metrics(tmp_path, tiny_weights, tin):
    model = vitlens.load_model(TINY_SPEC, weights=tiny_weights)
    samples = resolve_inputs(f"tinyimagenet:{tin}")
    kwargs = dict(metrics="deletion,energy_in_box", metric_params={"deletion": {"steps": 3}},
                  progress=False, html=False)
    one = run_evaluate(samples, model, ["gmar-l1", "center"], out_dir=tmp_path / "a", batch_size=1, **kwargs)
    three = run_evaluate(samples, model, ["gmar-l1", "center"], out_dir=tmp_path / "b", batch_size=3,
                         perturb_batch_size=5, **kwargs)
    assert [(r["method"], r["metric"]) for r in one.rows] == [(r["method"], r["metric"]) for r in three.rows]
    for a, b in zip(one.rows, three.rows):
        assert a["mean"] == pytest.approx(b["mean"], abs=1e-5)


def test_aggregate_and_wide_table_on_known_records():
    images = [{"status": "ok", "metrics": {"m": {"deletion_auc": v, "deletion_auc_norm": None}}}
              for v in (1, 2, 3, 4, 5)]
    images.append({"status": "failed", "metrics": None})
    rows, _ = aggregate(images, ["m"], ["deletion"])
    (row,) = rows  # the all-None value has no row
    assert row["n"] == 5 and row["mean"] == 3.0 and row["ci_high"] == pytest.approx(3 + 1.963243, abs=1e-5)
    table = wide_table(rows, ["m"], ["deletion"])
    assert table["columns"] == ["method", "deletion_auc (l)"]
    assert table["rows"] == [["m", "3 ± 2"]]


def test_errors_are_one_line(tmp_path, capsys, tiny, tin):
    folder = tmp_path / "photos"
    picture(folder / "a.jpg", 0)
    cases = [
        (["evaluate", str(tmp_path / "missing"), *tiny], ["does not exist"]),
        (["evaluate", f"tinyimagenet:{folder}", *tiny], ["wnids.txt"]),
        (["evaluate", str(folder), *tiny, "--metrics", "pointing_game"], ["pointing_game", "boxes"]),
        (["evaluate", str(folder), *tiny, "--metrics", "localisation"], ["needs object boxes"]),
        (["evaluate", str(folder), *tiny, "--metrics", "segmentation"], ["--masks"]),
        (["evaluate", str(folder), *tiny, "--metrics", "ssim"], ["unknown metric", "deletion"]),
        (["evaluate", str(folder), *tiny, "--metrics", "deletion", "--metric-param", "insertion.steps=3"],
         ["insertion"]),
        (["evaluate", str(folder), *tiny, "--metrics", "deletion", "--metric-param", "deletion.size=3"],
         ["no parameter 'size'"]),
        (["evaluate", str(folder), *tiny, "--metrics", "deletion", "--steps", "0"], ["steps=0", ">= 1"]),
        (["evaluate", str(folder), *tiny, "--metrics", "insertion", "--metric-param", "insertion.score=rank"],
         ["score", "prob or logit"]),
        (["evaluate", str(folder), *tiny, "--target", "top3"], ["one class per image"]),
        (["evaluate", str(folder), *tiny, "--methods", "nope"], ["unknown method"]),
    ]
    for args, fragments in cases:
        code, _, err = run_cli(capsys, *args, "--out", tmp_path / "out", "--quiet")
        assert code == 2, (args, err)
        one_line(err, *fragments)


def test_segmentation_with_masks(tmp_path, capsys, tiny, tin):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        array = np.zeros((64, 64), np.uint8)
        array[16:48, 16:48] = 255
        Image.fromarray(array).save(masks / f"val_{i}.png")
    out = tmp_path / "seg"
    code, _, err = run_cli(capsys, "evaluate", f"tinyimagenet:{tin}", *tiny, *EVAL, "--metrics", "segmentation",
                           "--masks", masks, "--out", out)
    assert code == 0, err
    table = {(r["method"], r["metric"]): r for r in read_csv(out / "metrics.csv")}
    for metric in ("seg_pixel_accuracy", "seg_iou", "seg_miou", "seg_ap"):
        value = float(table[("rollout", metric)]["mean"])
        assert 0.0 <= value <= 1.0 and not math.isnan(value)


def test_evaluate_ranks_lrp_pixels_by_their_signed_relevance(tmp_path, capsys, tiny, tiny_model, tin):
    """The insertion curve `vitlens evaluate` records for AttnLRP is that of the signed relevance map, not of
    its displayed positive part (whose negative half would be revealed in random order)."""
    from vitlens.metrics import perturbation_metrics

    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "evaluate", f"tinyimagenet:{tin}", *tiny, "--methods", "attnlrp", "--steps", "4",
                           "--metrics", "insertion,neg_perturbation", "--quiet", "--out", out, "--baseline", "zero")
    assert code == 0, err
    samples = resolve_inputs([f"tinyimagenet:{tin}"])
    model = tiny_model
    result = vitlens.explain(model, [s.path for s in samples], methods="attnlrp")
    assert (result.patch_maps["attnlrp"] < 0).any()
    metrics = {"insertion": {"steps": 4, "baseline": "zero"}, "neg_perturbation": {"baseline": "zero"}}
    expected = {}
    for kind, maps in (("signed", result.patch_maps), ("positive", result.maps)):
        expected[kind] = perturbation_metrics(model, result.input_tensors, {"attnlrp": maps["attnlrp"][:, 0]},
                                              result.targets[:, 0], metrics=metrics)["attnlrp"]
    records = {r["path"]: r for r in (json.loads(p.read_text()) for p in (out / "records").glob("*.json"))}
    for i, sample in enumerate(samples):
        curve = records[sample.path]["curves"]["attnlrp"]["insertion"]
        assert np.allclose(curve, expected["signed"]["insertion"]["curve"][i].numpy(), atol=1e-4)
    assert not torch.equal(expected["signed"]["insertion"]["curve"], expected["positive"]["insertion"]["curve"])


def test_patch_granularity_on_a_cnn_is_one_line_before_anything_is_written(tmp_path, tin):
    """A CNN has no patches: `--granularity patch` is refused in one line (it used to raise NotImplementedError
    from deep inside the perturbation metrics, after the run directory was written)."""
    import torchvision

    from vitlens.metrics import MetricError

    torch.manual_seed(0)
    model = vitlens.load_model(torchvision.models.resnet18(num_classes=2).eval())
    out = tmp_path / "run"
    with pytest.raises(MetricError) as info:
        run_evaluate(resolve_inputs([f"tinyimagenet:{tin}"]), model, ["gradcam"], metrics="deletion",
                     granularity="patch", out_dir=out, progress=False)
    assert "--granularity patch needs a model with patches" in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()
    summary = run_evaluate(resolve_inputs([f"tinyimagenet:{tin}"]), model, ["gradcam"], metrics="deletion",
                           metric_params={"deletion": {"steps": 2}}, out_dir=out, progress=False, html=False)
    assert summary.run.explained == 3
