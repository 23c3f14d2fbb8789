"""``vitlens evaluate --metrics sensitivity,specificity,two_object`` end to end on tiny data."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from .test_evaluate import EVAL, one_line, picture, read_csv, run_cli, tin  # noqa: F401  (tin: a fixture)


def test_evaluate_sensitivity_specificity_tables_plots_report(tmp_path, capsys, tiny, tin):  # noqa: F811
    out = tmp_path / "run"
    args = ["evaluate", f"tinyimagenet:{tin}", *tiny, "--methods", "rollout,chefer,random,center", "--batch-size", "2",
            "--quiet", "--metrics", "sensitivity,specificity", "--metric-param", "sensitivity.samples=3",
            "--metric-param", "sensitivity.limit=2", "--out", out]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    table = {(r["method"], r["metric"]): r for r in read_csv(out / "metrics.csv")}
    for method in ("rollout", "chefer", "random", "center"):
        for metric in ("max_sensitivity", "avg_sensitivity", "lipschitz"):
            assert int(table[(method, metric)]["n"]) == 2  # sensitivity.limit=2
            assert table[(method, metric)]["better"] == "lower"
        for metric in ("contrast_rank_2nd", "contrast_l1_2nd", "contrast_rank_random", "contrast_l1_random"):
            assert int(table[(method, metric)]["n"]) == 3
            assert table[(method, metric)]["better"] == "higher"
    # hand-checked ends: center ignores the input, rollout/random/center ignore the target
    assert float(table[("center", "max_sensitivity")]["mean"]) == 0.0
    for method in ("rollout", "random", "center"):
        assert float(table[(method, "contrast_rank_random")]["mean"]) == 0.0
        assert float(table[(method, "contrast_l1_2nd")]["mean"]) == 0.0
    assert float(table[("random", "max_sensitivity")]["mean"]) > float(table[("rollout", "max_sensitivity")]["mean"])
    assert float(table[("chefer", "contrast_l1_random")]["mean"]) > 0
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    avg = [r["metrics"]["chefer"]["avg_sensitivity"] for r in records if "avg_sensitivity" in r["metrics"]["chefer"]]
    assert len(avg) == 2
    assert float(table[("chefer", "avg_sensitivity")]["mean"]) == pytest.approx(sum(avg) / 2, abs=1e-5)
    assert all(r["metrics"]["chefer"]["max_sensitivity"] >= r["metrics"]["chefer"]["avg_sensitivity"]
               for r in records if "max_sensitivity" in r["metrics"]["chefer"])
    md = (out / "metrics.md").read_text()
    assert "max_sensitivity (l)" in md and "contrast_rank_random (h)" in md
    for name in ("sensitivity", "lipschitz", "specificity"):
        with Image.open(out / "plots" / f"{name}.png") as im:
            assert im.format == "PNG"
    html = (out / "report.html").read_text()
    assert "plots/sensitivity.png" in html and "contrast_rank_random" in html
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["settings"]["evaluate"]["metrics"]["sensitivity"]["samples"] == 3
    # the same command again: nothing recomputed, same tables
    before = (out / "metrics.csv").read_text()
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0 and "explained 0 image(s), 3 already done" in stdout
    assert (out / "metrics.csv").read_text() == before


def test_evaluate_two_object_share(tmp_path, capsys, tiny):  # noqa: F811
    folder = tmp_path / "photos"
    picture(folder / "two.jpg", 0)
    picture(folder / "one.jpg", 1)
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps({"two.jpg": [[1, 0, 0, 32, 32], [2, 32, 32, 64, 64]], "one.jpg": [[1, 0, 0, 8, 8]]}))
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "evaluate", folder, *tiny, "--methods", "rollout,chefer,center", "--quiet",
                           "--metrics", "two_object", "--metric-param", f"two_object.objects={objects}", "--out", out)
    assert code == 0, err
    table = {(r["method"], r["metric"]): r for r in read_csv(out / "metrics.csv")}
    assert int(table[("rollout", "object_share")]["n"]) == 1  # one.jpg has a single object: NaN, left out
    assert float(table[("rollout", "object_share")]["mean"]) == pytest.approx(0.5)
    assert float(table[("rollout", "object_contrast")]["mean"]) == pytest.approx(0.0, abs=1e-9)
    assert float(table[("center", "object_contrast")]["mean"]) == 0.0
    with Image.open(out / "plots" / "two_object.png") as im:
        assert im.format == "PNG"


def test_two_object_errors_are_one_line(tmp_path, capsys, tiny):  # noqa: F811
    folder = tmp_path / "photos"
    picture(folder / "a.jpg", 0)
    for extra, fragments in ((["--metrics", "two_object"], ["two_object.objects=FILE"]),
                             (["--metrics", "two_object",
                               "--metric-param", f"two_object.objects={tmp_path / 'no.json'}"],
                              ["does not exist"]),
                             (["--metrics", "sensitivity", "--metric-param", "sensitivity.radius2=1"],
                              ["no parameter 'radius2'"]),
                             (["--metrics", "sensitivity", "--metric-param", "sensitivity.radius=2"], ["radius=2"]),
                             (["--metrics", "sensitivity", "--metric-param", "sensitivity.samples=0"], ["samples=0"])):
        code, _, err = run_cli(capsys, "evaluate", folder, *tiny, *extra, "--out", tmp_path / "out", "--quiet")
        assert code == 2, err
        one_line(err, *fragments)
