"""AttnLRP / CP-LRP token attributions for text encoders: conservation, padding, no side effects, the real MiniLM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.text.conftest import random_batch, tiny_text_model
from vitlens.cli import main
from vitlens.text import TextBatch, explain_text, load_text_model, run_text_batch
from vitlens.text.api import token_rows
from vitlens.text.views import token_colours
from vitlens.text.task import lrp_cosine, resolve_objective, text_params

LRP = ("attnlrp", "cp-lrp")


def _without_additive_constants(module):
    """Zero every bias (LayerNorm's too) and the position and token-type embeddings."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias") or "position_embeddings" in name or "token_type_embeddings" in name:
                param.zero_()
    return module


def test_cp_lrp_conserves_the_explained_logit_of_a_bert_classifier():
    model = load_text_model(_without_additive_constants(tiny_text_model("bert", True)))
    ids, mask = random_batch(lengths=(9, 4, 6))
    params = {"cp-lrp": text_params("cp-lrp", {"lin_gamma": 0.0, "conv_gamma": 0.0})}
    result = run_text_batch(model, TextBatch.from_ids(ids, mask), params, "top2")
    sums = torch.stack([scores.sum(-1) for scores in result.token_maps["cp-lrp"]])  # (texts, targets)
    assert sums.shape == result.values.shape == (3, 2)
    assert ((sums - result.values) / result.values).abs().max() <= 1e-4
    # with the additive constants back, relevance is absorbed: the sum is no longer the logit
    biased = run_text_batch(load_text_model(tiny_text_model("bert", True)), TextBatch.from_ids(ids, mask), params, 0)
    biased_sums = torch.stack([scores.sum(-1) for scores in biased.token_maps["cp-lrp"]])
    assert not torch.allclose(biased_sums, biased.values, rtol=1e-3)


def test_cp_lrp_of_an_encoder_similarity_sums_over_both_sentences_to_the_cosine():
    """Norms detached, the dot product's relevance split equally (uniform rule): conservative."""
    model = load_text_model(_without_additive_constants(tiny_text_model("bert", False)))
    ids, mask = random_batch(lengths=(9, 4, 6, 7))  # texts 0, 1 with pairs 2, 3
    result = run_text_batch(model, TextBatch.from_ids(ids, mask), {"cp-lrp": text_params("cp-lrp")}, None,
                            resolve_objective(None, True))
    per_sequence = torch.stack([scores.sum(-1) for scores in result.token_maps["cp-lrp"]])[:, 0]
    both = per_sequence[:2] + per_sequence[2:]
    assert torch.allclose(both, result.values[:, 0], rtol=1e-4, atol=1e-6)
    a, b = torch.randn(2, 5), torch.randn(2, 5)
    assert torch.allclose(lrp_cosine(a, b), torch.nn.functional.cosine_similarity(a, b), atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_batch_with_padding_equals_one_at_a_time(family):
    model = load_text_model(tiny_text_model(family, True))
    ids, mask = random_batch(lengths=(9, 4, 6))
    methods = {"attnlrp": text_params("attnlrp"), "cp-lrp": text_params("cp-lrp", {"lin_gamma": 0.5})}
    targets = [0, 2, 1]
    batched = run_text_batch(model, TextBatch.from_ids(ids, mask), methods, targets)
    for s in range(3):
        n = int(mask[s].sum())
        alone = run_text_batch(model, TextBatch.from_ids(ids[s:s + 1, :n], mask[s:s + 1, :n]), methods, targets[s])
        for name in LRP:
            mine, ref = batched.token_maps[name][s], alone.token_maps[name][0]
            assert mine.shape == ref.shape == (1, n)
            scale = ref.abs().max()
            assert torch.allclose(mine, ref, atol=1e-5 * scale), name


def test_lrp_leaves_the_model_and_other_methods_unchanged():
    module = tiny_text_model("bert", True)
    model = load_text_model(module)
    ids, mask = random_batch()
    batch = TextBatch.from_ids(ids, mask)
    others = {name: text_params(name) for name in ("rollout", "gmar-l2", "legrad", "chefer")}
    with torch.no_grad():
        logits = model.forward(batch)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    before = run_text_batch(model, batch, others, 1)
    together = run_text_batch(model, batch, {**others, **{m: text_params(m) for m in LRP}}, 1)
    after = run_text_batch(model, batch, others, 1)
    with torch.no_grad():
        assert torch.equal(model.forward(batch), logits)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())
    assert not any("forward" in m.__dict__ for m in module.modules())
    assert all(p.grad is None for p in module.parameters())
    for name in others:
        for s in range(len(batch)):
            assert torch.equal(before.token_maps[name][s], after.token_maps[name][s]), name
            assert torch.allclose(before.token_maps[name][s], together.token_maps[name][s], atol=1e-6), name
    assert all(torch.isfinite(m).all() for name in LRP for m in together.token_maps[name])


def test_text_lrp_defaults_use_the_plain_gradient_on_linear_layers():
    assert text_params("attnlrp") == {"conv_gamma": 1.0, "lin_gamma": 0.0, "attention_gamma": True}
    assert text_params("cp-lrp", {"lin_gamma": 0.25}) == {"conv_gamma": 1.0, "lin_gamma": 0.25, "attention_gamma": True}


def test_minilm_cli_attnlrp_gives_signed_token_scores(capsys, tmp_path, minilm):
    """The real MiniLM: `vitlens text --methods attnlrp` explains the cosine similarity with signed scores."""
    out = tmp_path / "minilm-lrp"
    assert main(["text", "A man is playing a guitar.", "--pair", "Someone plays an instrument.", "--methods",
                 "attnlrp", "--views", "tokens", "--format", "png", "--out", str(out)]) == 0
    assert "explained: cosine similarity = 0.6674" in capsys.readouterr().out
    record = json.loads((out / "attributions.json").read_text())
    scores = [np.array(seq["scores"]["attnlrp"][0]) for seq in record["sequences"]]
    assert [len(s) for s in scores] == [len(seq["tokens"]) for seq in record["sequences"]]
    everything = np.concatenate(scores)
    assert (everything > 0).any() and (everything < 0).any()  # signed
    # the API agrees with the CLI, and the cosine is (mostly) explained by the tokens of both sentences
    result = explain_text(minilm, "A man is playing a guitar.", pairs="Someone plays an instrument.",
                          methods=["attnlrp", "cp-lrp"])
    item = result.items[0]
    assert np.allclose(item.sequences[0].scores["attnlrp"][0], scores[0], atol=1e-6)
    # with all biases in place CP-LRP still passes about 99 % of the cosine to the tokens (docs/text.md)
    total = sum(seq.scores["cp-lrp"][0].sum() for seq in item.sequences)
    assert 0.9 < total / item.values[0] < 1.1
    # the content-words-over-punctuation criterion of docs/text.md holds for both variants
    for seq, content in zip(item.sequences, ({"man", "playing", "guitar"}, {"someone", "plays", "instrument"})):
        tokens = np.array(seq.tokens)
        for method in LRP:
            values = seq.scores[method][0]
            assert values[np.isin(tokens, list(content))].mean() > values[tokens == "."].mean(), (method, seq.title)
    # rendered with the diverging map: scaled by max |score| to [-1, 1], negative tokens blue, positive red
    rows = token_rows(item, ["attnlrp"])
    assert all(row["signed"] for row in rows)
    values = np.concatenate([row["values"] for row in rows])
    assert values.min() < 0 < values.max() and np.abs(values).max() <= 1 + 1e-9
    blue, red = token_colours([-1.0, 1.0], signed=True)
    assert blue[2] > blue[0] and red[0] > red[2]


def test_lrp_only_without_attention_views_runs_one_forward():
    """Without attention views to draw, an LRP-only request needs only its rule-modified pass, and gives
    the same relevance and targets as with the views."""
    model = load_text_model(tiny_text_model("bert"))
    ids, mask = random_batch()
    calls = []
    handle = model.module.register_forward_hook(lambda *args: calls.append(1))
    methods = {"attnlrp": text_params("attnlrp")}
    lean = run_text_batch(model, TextBatch.from_ids(ids, mask), methods, "top2", keep_attentions=False)
    assert len(calls) == 1 and lean.attentions is None
    full = run_text_batch(model, TextBatch.from_ids(ids, mask), methods, "top2")
    assert len(calls) == 3  # the views' capture pass + the LRP pass
    handle.remove()
    assert torch.equal(lean.targets, full.targets)
    assert torch.allclose(lean.values, full.values, atol=1e-6)
    for a, b in zip(lean.token_maps["attnlrp"], full.token_maps["attnlrp"]):
        assert torch.allclose(a, b, atol=1e-6)
