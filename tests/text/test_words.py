"""Word-level and span scores: subword scores aggregated with the tokenizer's words and offsets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vitlens.cli import main
from vitlens.errors import InputError, UsageError
from vitlens.text import explain_text
from vitlens.text.api import token_rows
from vitlens.text.words import aggregate_scores, parse_spans, word_groups

TEXT = "The model embeds sentences."
PAIR = "A sentence encoder."


def test_minilm_word_scores_sum_the_subwords_of_each_word(minilm):
    result = explain_text(minilm, TEXT, pairs=PAIR, methods=["chefer", "attnlrp"])
    seq = result.items[0].sequences[0]
    assert seq.tokens == ["[CLS]", "the", "model", "em", "##bed", "##s", "sentences", ".", "[SEP]"]
    words = seq.words
    assert words.text == ["The", "model", "embeds", "sentences", "."]  # "embeds" (em ##bed ##s) is one word
    assert words.tokens == [[1], [2], [3, 4, 5], [6], [7]]  # [CLS] and [SEP] belong to no word
    assert words.ranges[2] == (10, 16) and TEXT[10:16] == "embeds"
    for method in ("chefer", "attnlrp"):
        tokens = seq.scores[method][0]
        expected = [tokens[1], tokens[2], tokens[3] + tokens[4] + tokens[5], tokens[6], tokens[7]]
        np.testing.assert_allclose(words.scores[method][0], expected, rtol=1e-12, err_msg=method)
    # the pair's sentence has its own words, from its own text
    assert result.items[0].sequences[1].words.text == ["A", "sentence", "encoder", "."]
    # max instead of sum
    result_max = explain_text(minilm, TEXT, pairs=PAIR, methods=["chefer"], word_aggregate="max")
    seq_max = result_max.items[0].sequences[0]
    assert seq_max.words.aggregate == "max"
    assert seq_max.words.scores["chefer"][0, 2] == pytest.approx(seq_max.scores["chefer"][0, 3:6].max())


def test_spans_aggregate_the_tokens_they_overlap(minilm):
    result = explain_text(minilm, TEXT, pairs=PAIR, methods=["attnlrp"], spans="4:9,12:16")
    seq = result.items[0].sequences[0]
    spans = seq.spans
    assert spans.text == ["[4:9] model", "[12:16] beds"] and spans.tokens == [[2], [4, 5]]  # ##bed, ##s
    np.testing.assert_allclose(spans.scores["attnlrp"][0], [seq.scores["attnlrp"][0, 2],
                                                            seq.scores["attnlrp"][0, 4:6].sum()])
    assert result.items[0].sequences[1].spans is None  # spans are ranges of the (first) text
    with pytest.raises(InputError, match="span 20:40 goes beyond the text \\(27 characters\\)"):
        explain_text(minilm, TEXT, pairs=PAIR, methods=["attnlrp"], spans=[(20, 40)])


def test_word_rows_reach_json_html_and_png(minilm, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["text", TEXT, "--pair", PAIR, "--methods", "chefer", "--views", "tokens", "--format", "png",
                 "--word-aggregate", "max", "--spans", "0:9", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "attributions.json").read_text())
    first = record["sequences"][0]
    assert first["words"]["text"] == ["The", "model", "embeds", "sentences", "."]
    assert first["words"]["aggregate"] == "max"
    assert first["words"]["scores"]["chefer"][0][2] == pytest.approx(max(first["scores"]["chefer"][0][3:6]), abs=1e-8)
    assert first["spans"]["text"] == ["[0:9] The model"] and first["spans"]["tokens"] == [[1, 2]]
    page = (out / "tokens.html").read_text()
    assert "chefer (text), words (max)" in page and ">embeds<" in page and "chefer (text), spans (max)" in page
    assert (out / "tokens.png").stat().st_size > 0
    rows = token_rows(explain_text(minilm, TEXT, pairs=PAIR, methods=["chefer"]).items[0], ["chefer"])
    assert [r["label"] for r in rows] == ["chefer (text)", "chefer (text), words (sum)", "chefer (pair)",
                                          "chefer (pair), words (sum)"]


def test_classifier_pair_words_keep_the_two_texts_apart(tiny_classifier):
    item = explain_text(tiny_classifier, "great film", pairs="great fun", methods=["rollout"]).items[0]
    words = item.sequences[0].words
    assert words.text == ["great", "film", "great", "fun"] and words.segments == [0, 0, 1, 1]
    assert words.ranges == [(0, 5), (6, 10), (0, 5), (6, 9)]  # each in its own text


def test_decoder_words_are_space_led_and_named_from_the_text(tiny_gpt2_dir):
    from vitlens.text import load_text_model

    model = load_text_model(str(tiny_gpt2_dir))
    text = "When Mary went to Parisian stores"
    seq = explain_text(model, text, target_token=" Paris", methods=["attention", "attnlrp"]).items[0].sequences[0]
    assert seq.words.text == text.split()
    for method in ("attention", "attnlrp"):
        sums = [seq.scores[method][0, g].sum() for g in seq.words.tokens]
        np.testing.assert_allclose(seq.words.scores[method][0], sums, rtol=1e-12)
    assert any(len(g) > 1 for g in seq.words.tokens)  # some word of this text is several tokens


def test_aggregation_helpers_and_span_errors():
    groups = word_groups([None, 0, 0, 1, None, 0, 0], [0, 0, 0, 0, 0, 1, 1], [True, False, False, False, True,
                                                                               False, False])
    assert groups == [[1, 2], [3], [5, 6]]  # word 0 of the pair is not word 0 of the text
    scores = np.array([[9.0, 1.0, -3.0, 2.0, 9.0, 0.5, 0.25]])
    np.testing.assert_allclose(aggregate_scores(scores, groups), [[-2.0, 2.0, 0.75]])
    np.testing.assert_allclose(aggregate_scores(scores, groups, "max"), [[1.0, 2.0, 0.5]])
    with pytest.raises(UsageError, match="must be sum or max, got 'mean'"):
        aggregate_scores(scores, groups, "mean")
    assert parse_spans("0:5, 10:22") == [(0, 5), (10, 22)]
    for bad in ("0-5", "a:b", "5", ""):
        with pytest.raises(InputError, match="give START:END character ranges"):
            parse_spans(bad)
    with pytest.raises(InputError, match="span 5:5 is empty"):
        parse_spans("5:5")


def test_malformed_spans_on_the_command_line_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["text", TEXT, "--pair", PAIR, "--spans", "0-5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vitlens: error: --spans '0-5': give START:END character ranges, e.g. 0:5,10:22"
    assert not out.exists()
