"""Issue 19's view bugs: --query in either text of a pair, one head's view, titles that name what is shown,
and long inputs that stay readable (thinned labels, a contrast scale)."""

from __future__ import annotations

import numpy as np
import pytest

from vitlens.cli import main
from vitlens.errors import InputError, UsageError
from vitlens.text import attention_views, explain_text
from vitlens.text import views as text_views
from vitlens.text.api import parse_head, write_item

PAIR = ("A man is playing a guitar.", "Someone plays an instrument.")


def _titles(monkeypatch, name):
    """Record the title= every call of views.<name> gets."""
    seen = []
    original = getattr(text_views, name)

    def spy(*args, **kwargs):
        seen.append(kwargs.get("title", ""))
        return original(*args, **kwargs)

    monkeypatch.setattr(text_views, name, spy)
    return seen


# ------------------------------------------------------------------------------------------ --query
def test_query_is_looked_for_in_both_texts_of_a_pair(minilm, tmp_path):
    result = explain_text(minilm, PAIR[0], pairs=PAIR[1], methods=["attention"])
    item = result.items[0]
    first = write_item(item, tmp_path / "a", ["query"], result.methods, minilm, ("png",), query="guitar")
    assert [p.name for p in first["query"]] == ["query-6-s1.png"]  # only the first text has it
    second = write_item(item, tmp_path / "b", ["query"], result.methods, minilm, ("png",), query="instrument")
    assert [p.name for p in second["query"]] == ["query-4-s2.png"]
    both = write_item(item, tmp_path / "c", ["query"], result.methods, minilm, ("png",), query=".")
    assert [p.name for p in both["query"]] == ["query-7-s1.png", "query-5-s2.png"]


def test_query_in_neither_text_is_one_line_before_anything_is_written(minilm, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["text", *PAIR[:1], "--pair", PAIR[1], "--query", "banjo", "--methods", "attention",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitlens: error: query token 'banjo' is in neither text (tokens: [CLS] a man") and \
        "| [CLS] someone plays" in err and "\n" not in err
    assert not out.exists()
    # the CLI form the issue reported: a query in one text of the pair is fine
    assert main(["text", PAIR[0], "--pair", PAIR[1], "--query", "guitar", "--methods", "attention",
                 "--views", "tokens,query", "--format", "png", "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.glob("query-*")) == ["query-6-s1.png"]


def test_batch_rows_without_the_query_skip_only_that_view(tiny_classifier_dir, tmp_path, capsys):
    rows = tmp_path / "rows.txt"
    rows.write_text("the movie was great\nwhat a dull film\n")
    out = tmp_path / "run"
    assert main(["text", "--file", str(rows), "--model", str(tiny_classifier_dir), "--views", "tokens,query",
                 "--query", "movie", "--methods", "rollout", "--format", "png", "--out", str(out), "--quiet"]) == 0
    assert [p.name for p in (out / "0001").glob("query-*")] == ["query-2.png"]
    assert not list((out / "0002").glob("query-*")) and (out / "0002" / "tokens.png").is_file()


# ------------------------------------------------------------------------------------------ --head
def test_one_head_view(minilm, tmp_path, monkeypatch):
    titles = _titles(monkeypatch, "head_figure")
    written = attention_views(minilm, PAIR[0], out=tmp_path, views="stats", head="0.2", formats=("png",))
    assert [p.name for p in written["head"]] == ["head-L0-H2.png"]
    assert titles == ["layer 0, head 2: 'A man is playing a guitar.'"]
    fig = text_views.head_figure(np.eye(5), list("abcde"), 0, 2, stats={"previous": 1.0, "dilation": 3.0})
    assert fig.texts[0].get_text().endswith("previous 1.00, dilation 3")
    assert parse_head("-1.-1", 6, 12) == (5, 11) and parse_head((1, 3), 6, 12) == (1, 3)
    for bad, message in (("6.0", "head 6.0 is out of range: the model has 6 layers x 12 heads (0.0 to 5.11)"),
                         ("2", "--head '2': give LAYER.HEAD"), ("a.b", "--head 'a.b': give LAYER.HEAD")):
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            parse_head(bad, 6, 12)


def test_head_out_of_range_on_the_command_line_writes_nothing(minilm, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["text", PAIR[0], "--head", "0.12", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vitlens: error: head 0.12 is out of range: the model has 6 layers x 12 heads (0.0 to 5.11)"
    assert not out.exists()


# ------------------------------------------------------------------------------------------ titles
def test_a_classifier_pairs_head_grid_names_both_sentences(tiny_classifier, tmp_path, monkeypatch):
    titles = _titles(monkeypatch, "heads_figure")
    attention_views(tiny_classifier, "what a wonderful film", pair="I loved it", out=tmp_path, views="heads",
                    formats=("png",))
    assert titles == ["layer 1, every head: 'what a wonderful film' | 'I loved it'"]


def test_a_decoders_tokens_figure_names_the_explained_token(tiny_gpt2_dir, tmp_path, monkeypatch):
    from vitlens.text import load_text_model

    model = load_text_model(str(tiny_gpt2_dir))
    titles = _titles(monkeypatch, "tokens_figure")
    result = explain_text(model, "The capital of France is", target_token=" Paris", methods=["attention"])
    write_item(result.items[0], tmp_path, ["tokens"], result.methods, model, ("png",))
    assert titles == ["The capital of France is \u2192 next token ' Paris'"]


# ------------------------------------------------------------------------------------------ long inputs
def _sink_attention(n: int, seed: int = 0) -> np.ndarray:
    """A 512-token head as real ones look: 0.6 of every row on token 0 (a sink), the rest spread thinly."""
    rng = np.random.default_rng(seed)
    rest = rng.random((n, n))
    rest = 0.4 * rest / rest.sum(-1, keepdims=True)
    rest[:, 0] += 0.6
    return rest


def test_long_maps_are_readable_on_the_default_scale():
    a = _sink_attention(512)
    linear = text_views.scale_attention(a, "linear")
    default = text_views.scale_attention(a)
    assert np.median(linear) < 0.01  # what the linear scale draws: black
    assert np.median(default) > 0.3  # the default (percentile above 64 tokens) shows the spread
    assert text_views.resolve_scale("auto", 64) == "linear" and text_views.resolve_scale("auto", 65) == "percentile"
    assert np.median(text_views.scale_attention(a, "log")) > 5 * np.median(linear)
    for scale in text_views.SCALES:
        out = text_views.scale_attention(a, scale)
        assert out.min() >= 0 and out.max() == pytest.approx(1.0), scale
    np.testing.assert_allclose(text_views.scale_attention(a, "sqrt"), np.sqrt(linear))
    with pytest.raises(UsageError, match="unknown attention scale 'gamma'"):
        text_views.scale_attention(a, "gamma")


def test_512_token_head_grid_labels_every_8th_token():
    n = 512
    a = np.stack([_sink_attention(n, seed) for seed in range(2)])
    labels = [f"t{j}" for j in range(n)]
    fig = text_views.heads_figure(a, labels, 0)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks == [f"t{j}" for j in range(0, n, 8)]  # 64 labels, legible
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()][:2] == ["t0", "t8"]
    assert "99th percentile" in fig._suptitle.get_text()
    image = np.asarray(ax.get_images()[0].get_array())
    assert float(np.median(image)) > 0.3
