"""Text through the reduced one pass: each sequence's layer terms computed from its own tokens in the backward, and
the attention kept as head means only, give the token scores of the pass that keeps every attention and gradient
(padded batches of different lengths, a classifier and a causal decoder's continuation)."""

from __future__ import annotations

import numpy as np
import pytest

import vitlens.engine as engine
from vitlens.models.capture import HeadMeanRecorder
from vitlens.text import explain_text

METHODS = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer"]
TEXTS = ["The movie was surprisingly good, and the actors were great!", "Bad.", "A long and rather dull evening."]


def recorders(monkeypatch):
    used = []
    original = HeadMeanRecorder.__init__

    def init(self, *args, **kwargs):
        used.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(HeadMeanRecorder, "__init__", init)
    return used


def scores_of(result):
    return [{name: np.asarray(seq.scores[name]) for name in METHODS} for item in result.items for seq in item.sequences]


def test_padded_texts_give_the_scores_of_the_pass_that_keeps_everything(monkeypatch, tiny_classifier):
    used = recorders(monkeypatch)
    reduced = scores_of(explain_text(tiny_classifier, TEXTS, methods=METHODS, target=1, keep_attentions=False))
    assert "HeadMeanRecorder" in used
    monkeypatch.setattr(engine, "_layer_terms", lambda task, methods: None)
    monkeypatch.setattr(engine, "_head_means_suffice", lambda *args: False)
    used.clear()
    kept = scores_of(explain_text(tiny_classifier, TEXTS, methods=METHODS, target=1, keep_attentions=False))
    assert not used
    assert [len(s["chefer"][0]) for s in kept] != [len(kept[0]["chefer"][0])] * 3  # different lengths
    for mine, theirs in zip(reduced, kept):
        for name in METHODS:
            scale = np.abs(theirs[name]).max()
            assert scale > 0, name
            np.testing.assert_allclose(mine[name], theirs[name], rtol=0, atol=2e-5 * scale, err_msg=name)


def test_a_continuation_gives_the_scores_of_the_pass_that_keeps_everything(monkeypatch, tiny_gpt2_dir):
    from vitlens.text import load_text_model

    model = load_text_model(str(tiny_gpt2_dir))
    methods = ["rollout", "gmar-l2", "chefer", "legrad"]
    reduced = explain_text(model, "the cat sat on", continuation=" the mat", methods=methods)
    monkeypatch.setattr(engine, "_layer_terms", lambda task, methods: None)
    monkeypatch.setattr(engine, "_head_means_suffice", lambda *args: False)
    kept = explain_text(model, "the cat sat on", continuation=" the mat", methods=methods)
    assert len(reduced.steps) == len(kept.steps) > 1  # several steps: a view per step, each its own prefix
    for name in methods:
        x, y = np.asarray(reduced.matrices[name]), np.asarray(kept.matrices[name])
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
        scale = np.nanmax(np.abs(y))
        assert scale > 0, name
        np.testing.assert_allclose(np.nan_to_num(x), np.nan_to_num(y), rtol=0, atol=2e-5 * scale, err_msg=name)


@pytest.mark.parametrize("keep", [True, False])
def test_head_means_only_where_the_caller_does_not_keep_the_attention(monkeypatch, tiny_classifier, keep):
    used = recorders(monkeypatch)
    explain_text(tiny_classifier, TEXTS[:2], methods=["rollout", "chefer"], keep_attentions=keep)
    assert ("HeadMeanRecorder" in used) == (not keep)
