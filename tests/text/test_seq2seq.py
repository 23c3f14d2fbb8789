"""Encoder-decoder models (T5, BART, Marian) and T5's encoder as a plain encoder, on tiny random configs.

Captures are checked against the eager model's own ``output_attentions`` (encoder, decoder and cross-attention),
a padded batch against each sequence alone, and the gradient attributions of a target token to the source tokens
against captum on the same model and the same input embeddings.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitlens.errors import InputError, MethodError, ModelError, TargetError
from vitlens.text import load_text_model
from vitlens.text.seq2seq import (SEQ2SEQ_METHODS, Seq2SeqModel, capture_attentions, cross_statistics,
                                  explain_seq2seq, greedy_target, make_batch, parse_seq2seq_methods)
from tests.text.conftest import SEQ2SEQ, SEQ2SEQ_CORPUS as CORPUS
from tests.text.conftest import save_tiny_t5, tiny_seq2seq, tiny_seq2seq_tokenizer, tiny_t5_encoder


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_seq2seq_tokenizer()


@pytest.fixture(scope="module", params=SEQ2SEQ)
def model(request, tokenizer):
    return load_text_model(tiny_seq2seq(request.param, vocab_size=len(tokenizer)), tokenizer=tokenizer)


def _eager(module):
    for cfg in {id(m.config): m.config for m in module.modules() if hasattr(m, "config")}.values():
        cfg._attn_implementation = "eager"
    return module


def _padded_batch(model, sources, targets):
    return make_batch(model, model.encode(sources), targets)


# ------------------------------------------------------------------------------------------ captures
def test_the_family_wraps_every_seq2seq_class(model):
    assert isinstance(model, Seq2SeqModel)
    assert (model.encoder_layers, model.decoder_layers, model.num_layers) == (3, 2, 7)
    assert model.describe()["kind"] == "encoder-decoder"


def test_captured_attentions_equal_the_eager_ones_and_a_padded_batch_equals_each_alone(model, tokenizer):
    import copy

    sources = [CORPUS[0], "The cat.", CORPUS[4]]
    targets = [tokenizer(CORPUS[1], add_special_tokens=False)["input_ids"], [40, 41],
               tokenizer(CORPUS[3], add_special_tokens=False)["input_ids"][:5]]
    batch = _padded_batch(model, sources, targets)
    assert batch.source.attention_mask.eq(0).any() and batch.decoder_mask.eq(0).any()  # both sides padded
    captured = capture_attentions(model, batch)
    eager = _eager(copy.deepcopy(model.module))
    with torch.no_grad():
        ref = eager(input_ids=batch.source.input_ids, attention_mask=batch.source.attention_mask,
                    decoder_input_ids=batch.decoder_ids, decoder_attention_mask=batch.decoder_mask,
                    output_attentions=True)
    kinds = {"encoder": ref.encoder_attentions, "decoder": ref.decoder_attentions, "cross": ref.cross_attentions}
    for s in range(len(sources)):
        src, tgt = batch.source.real_index(s), batch.target.real_index(s)
        cut = {"encoder": (src, src), "decoder": (tgt, tgt), "cross": (tgt, src)}
        alone = capture_attentions(model, _padded_batch(model, sources[s:s + 1], targets[s:s + 1]))[0]
        for kind, maps in kinds.items():
            rows, cols = cut[kind]
            expected = torch.stack([a[s] for a in maps]).index_select(-2, rows).index_select(-1, cols).numpy()
            assert captured[s][kind].shape == expected.shape
            np.testing.assert_allclose(captured[s][kind], expected, atol=1e-6, rtol=0)
            np.testing.assert_allclose(alone[kind], captured[s][kind], atol=1e-6, rtol=0)
        shape = captured[s]["cross"].shape
        assert shape == (2, 4, len(targets[s]), int(src.numel()))  # (L_dec, H, target, source)
        np.testing.assert_allclose(captured[s]["cross"].sum(-1), 1.0, atol=1e-5)


def test_the_capture_leaves_the_logits_unchanged(model, tokenizer):
    batch = _padded_batch(model, [CORPUS[0]], [tokenizer(CORPUS[1], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        plain = model.forward(batch)
        # the leaf is what the encoder makes of the ids (Marian's embed_scale, BART's scaled embedding)
        from_ids = model.module(input_ids=batch.source.input_ids, attention_mask=batch.source.attention_mask,
                                decoder_input_ids=batch.decoder_ids).logits
    np.testing.assert_allclose(plain.numpy(), from_ids.numpy(), atol=1e-5)
    explained = explain_seq2seq(model, CORPUS[0], continuation=CORPUS[1], methods=[])
    values = plain[0].gather(1, batch.steps[0][:, None])[:, 0]
    np.testing.assert_allclose([s["value"] for s in explained.steps], values.numpy(), atol=1e-5)
    assert explained.methods == [] and explained.matrices == {}


# ------------------------------------------------------------------------------------------ attributions
def _captum_reference(model, batch, steps, name, **kwargs):
    """captum on the same model: d(score of step t) / d(encoder input embeddings), per step (S, E) -> (T, S, E)."""
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    embeds = model.embed(batch.source.input_ids)

    def forward(x):  # integrated gradients scores copies of the one row
        copies = batch.rows(torch.zeros(x.shape[0], dtype=torch.long))
        return model.forward(copies, x)[:, torch.arange(len(steps)), torch.tensor(steps)]

    algorithm = {"saliency": Saliency, "input-x-gradient": InputXGradient,
                 "integrated-gradients": IntegratedGradients}[name](forward)
    out = []
    for t in range(len(steps)):
        extra = {"abs": True} if name == "saliency" else {}
        attribution = algorithm.attribute(embeds.clone(), target=t, **extra, **kwargs)
        out.append(attribution[0].detach())
    return torch.stack(out)


def test_gradient_attributions_equal_captum(model, tokenizer):
    pytest.importorskip("captum")
    target = tokenizer(CORPUS[1], add_special_tokens=False)["input_ids"][:4]
    result = explain_seq2seq(model, CORPUS[0], continuation=tokenizer.decode(target),
                             methods="saliency,input-x-gradient,integrated-gradients",
                             params={"integrated-gradients": {"steps": 16}}, keep_attentions=False)
    batch = _padded_batch(model, [CORPUS[0]], [target])
    assert [s["id"] for s in result.steps] == target
    saliency = _captum_reference(model, batch, target, "saliency")  # (T, S, E)
    np.testing.assert_allclose(result.matrices["saliency"], saliency.norm(dim=-1).T.numpy(), atol=1e-5, rtol=1e-4)
    ixg = _captum_reference(model, batch, target, "input-x-gradient")
    np.testing.assert_allclose(result.matrices["input-x-gradient"], ixg.sum(-1).T.numpy(), atol=1e-5, rtol=1e-4)
    ig = _captum_reference(model, batch, target, "integrated-gradients", n_steps=16, method="gausslegendre",
                           baselines=0.0)
    np.testing.assert_allclose(result.matrices["integrated-gradients"], ig.sum(-1).T.numpy(), atol=1e-5, rtol=1e-4)
    assert result.matrices["saliency"].shape == (int(batch.source.attention_mask.sum()), len(target))


def test_integrated_gradients_is_complete(model, tokenizer):
    """From the unknown-token baseline (end-of-sequence kept) its attributions sum to score(x) - score(baseline) up
    to the integration error. (Not from zero embeddings here: T5's RMS norm of a nearly zero input jumps, which no
    quadrature of 64 points follows.)"""
    result = explain_seq2seq(model, CORPUS[2], continuation=CORPUS[3], methods="integrated-gradients",
                             params={"integrated-gradients": {"steps": 64, "baseline": "unk"}},
                             keep_attentions=False)
    batch = _padded_batch(model, [CORPUS[2]], [[s["id"] for s in result.steps]])
    ids = batch.source.input_ids
    unk = torch.where(ids == tokenizer.eos_token_id, ids, torch.full_like(ids, tokenizer.unk_token_id))
    with torch.no_grad():
        reference = model.forward(batch, model.embed(unk))[0]
    base = reference.gather(1, batch.steps[0][:, None])[:, 0].numpy()
    values = np.array([s["value"] for s in result.steps])
    np.testing.assert_allclose(result.matrices["integrated-gradients"].sum(0), values - base, atol=0.05)


def test_attention_is_the_last_decoder_layers_cross_attention(model):
    result = explain_seq2seq(model, CORPUS[0], continuation=CORPUS[1], methods="attention")
    cross = result.attentions["cross"]  # (L, H, T, S)
    np.testing.assert_allclose(result.matrices["attention"], cross[-1].mean(0).T, atol=1e-6)
    # layer counts the attention calls: encoder 0-2, then decoder 0 self, decoder 0 cross (-3), ...
    first = explain_seq2seq(model, CORPUS[0], continuation=CORPUS[1], methods="attention",
                            params={"attention": {"layer": -3}})
    np.testing.assert_allclose(first.matrices["attention"], cross[0].mean(0).T, atol=1e-6)
    encoder = explain_seq2seq(model, CORPUS[0], continuation=CORPUS[1], methods="attention",
                              params={"attention": {"layer": 0}})
    assert not encoder.matrices["attention"].any()  # a target position has no row in the encoder's attention


def test_chefer_applies_the_self_attention_rule_to_every_block(model, tokenizer):
    """An independent float64 statement: R^kk = prod (I + A_enc) over the encoder, then per decoder layer
    R^qq += A_self R^qq, R^qk += A_self R^qk and R^qk += A_cross R^kk; step t's map is row t of R^qk, with
    A = mean_h max(G * A, 0) and G = d y_t / dA from an explicit capture."""
    from vitlens.models.capture import AttentionRecorder
    from vitlens.models.hf_capture import hf_capture

    target = tokenizer(CORPUS[1], add_special_tokens=False)["input_ids"][:4]
    result = explain_seq2seq(model, CORPUS[0], continuation=tokenizer.decode(target), methods="chefer",
                             keep_attentions=False)
    batch = _padded_batch(model, [CORPUS[0]], [target])
    recorder = AttentionRecorder()
    with torch.enable_grad(), hf_capture(model.module, recorder, []):
        scores = model.forward(batch, model.embed(batch.source.input_ids).requires_grad_(True))
    values = scores[0, torch.arange(len(target)), torch.tensor(target)]
    le, n = model.encoder_layers, batch.source.input_ids.shape[1]
    for t in range(len(target)):
        grads = torch.autograd.grad(values[t], recorder.attentions, retain_graph=True)
        bars = [(g * a.detach()).clamp_min(0).mean(1)[0].double() for a, g in zip(recorder.attentions, grads)]
        r_kk = torch.eye(n, dtype=torch.float64)
        for bar in bars[:le]:
            r_kk = r_kk + bar @ r_kk
        m = t + 1
        r_qq, r_qk = torch.eye(m, dtype=torch.float64), torch.zeros(m, n, dtype=torch.float64)
        for self_bar, cross_bar in zip(bars[le::2], bars[le + 1::2]):
            self_bar = self_bar[:m, :m]
            r_qq, r_qk = r_qq + self_bar @ r_qq, r_qk + self_bar @ r_qk
            r_qk = r_qk + cross_bar[:m] @ r_kk
        np.testing.assert_allclose(result.matrices["chefer"][:, t], r_qk[t].numpy(), rtol=1e-4, atol=1e-9)
    assert result.matrices["chefer"].any()


def test_contrast_and_logprob(model, tokenizer):
    target = tokenizer(CORPUS[1], add_special_tokens=False)["input_ids"][:3]
    other = tokenizer(CORPUS[3], add_special_tokens=False)["input_ids"][:3]
    plain = explain_seq2seq(model, CORPUS[0], continuation=tokenizer.decode(target), methods="input-x-gradient")
    versus = explain_seq2seq(model, CORPUS[0], continuation=tokenizer.decode(target), contrast=tokenizer.decode(other),
                             methods="input-x-gradient")
    batch = _padded_batch(model, [CORPUS[0]], [target])
    with torch.no_grad():
        logits = model.forward(batch)[0]
    expected = (logits[torch.arange(3), target] - logits[torch.arange(3), other]).numpy()
    np.testing.assert_allclose([s["value"] for s in versus.steps], expected, atol=1e-5)
    assert "contrast" in versus.value_name and versus.steps[0]["contrast_id"] == other[0]
    assert not np.allclose(plain.matrices["input-x-gradient"], versus.matrices["input-x-gradient"])
    logprob = torch.log_softmax(logits, -1)[torch.arange(3), target]
    np.testing.assert_allclose(plain.sequence_logprob, float(logprob.sum()), atol=1e-5)
    with pytest.raises(TargetError, match="give one contrast token per target token"):
        explain_seq2seq(model, CORPUS[0], continuation=tokenizer.decode(target), contrast=tokenizer.decode(other[:1]))


def test_generate_explains_the_greedy_target(model):
    source = model.encode([CORPUS[2]])
    with torch.no_grad():
        expected = model.module.generate(input_ids=source.input_ids, attention_mask=source.attention_mask,
                                          do_sample=False, num_beams=1, max_new_tokens=4)[0, 1:].tolist()
    assert greedy_target(model, source, 4) == expected
    from vitlens.text import explain_text

    result = explain_text(model, CORPUS[2], generate=4, methods="saliency")
    assert result.generated and [s["id"] for s in result.steps] == expected
    assert result.matrices["saliency"].shape[1] == len(expected)


# ------------------------------------------------------------------------------------------ methods
def test_all_is_the_methods_defined_for_encoder_decoders_and_the_rest_is_refused_in_one_line(model):
    assert parse_seq2seq_methods("all", model) == list(SEQ2SEQ_METHODS)
    assert "rollout" in model.unsupported_methods()
    for name in ("rollout", "legrad", "gmar-l1", "attnlrp"):
        with pytest.raises(MethodError, match=f"^method '{name}': ") as info:
            explain_seq2seq(model, CORPUS[0], continuation=CORPUS[1], methods=name)
        assert "\n" not in str(info.value)
    with pytest.raises(MethodError, match="beyond the model's 7 layers"):  # 3 encoder + 2 x 2 decoder calls
        explain_seq2seq(model, CORPUS[0], continuation=CORPUS[1], methods="attention",
                        params={"attention": {"layer": 7}})
    with pytest.raises(InputError, match="not both"):
        explain_seq2seq(model, CORPUS[0], continuation=CORPUS[1], generate=2)


# ------------------------------------------------------------------------------------------ statistics
def test_cross_statistics_of_known_patterns():
    t, s = 3, 5
    one = np.zeros((1, 1, t, s))
    one[..., 2] = 1.0  # every step reads source token 2
    stats = cross_statistics(one, [False, False, False, False, True])
    assert stats["entropy"][0, 0] == 0 and stats["global"][0, 0] == 1 and stats["peak"][0, 0] == 1
    assert stats["special"][0, 0] == 0
    uniform = np.full((2, t, s), 1 / s)
    stats = cross_statistics(uniform, [False, False, False, False, True])
    np.testing.assert_allclose(stats["entropy_norm"], 1.0)
    np.testing.assert_allclose(stats["special"], 0.2)
    np.testing.assert_allclose(stats["global"], 0.2)


# ------------------------------------------------------------------------------------------ loading and the CLI
@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return save_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


def test_a_directory_loads_as_an_encoder_decoder(t5_dir):
    model = load_text_model(str(t5_dir), score="logprob")
    assert isinstance(model, Seq2SeqModel) and model.score == "logprob"
    result = explain_seq2seq(model, CORPUS[0], continuation=CORPUS[1], methods="saliency", keep_attentions=False)
    assert all(step["value"] <= 0 for step in result.steps)  # log-probabilities
    np.testing.assert_allclose(result.sequence_logprob, sum(step["value"] for step in result.steps), atol=1e-5)


def test_cli_writes_the_attributions_and_every_kind_of_view(t5_dir, tmp_path, capsys):
    from vitlens import cli

    out = tmp_path / "run"
    code = cli.main(["text", CORPUS[0], "--model", str(t5_dir), "--continuation", CORPUS[1], "--out", str(out),
                     "--format", "png", "--methods", "attention,input-x-gradient"])
    assert code == 0
    record = json.loads((out / "seq2seq.json").read_text())
    assert record["methods"] == ["attention", "input-x-gradient"] and len(record["steps"]) == len(
        record["matrices"]["attention"][0])
    for name in ("attributions.png", "encoder/heads-layer2.png", "encoder/overview.png", "encoder/head_view.html",
                 "encoder/stats.csv", "decoder/heads-layer1.png", "decoder/stats.json", "cross/heads-layer1.png",
                 "cross/overview.png", "cross/stats.csv", "cross/stats.png"):
        assert (out / name).is_file(), name
    assert not (out / "cross" / "head_view.html").exists()
    rows = (out / "cross" / "stats.csv").read_text().splitlines()
    assert rows[0] == "layer,head,entropy,entropy_norm,special,global,peak" and len(rows) == 1 + 2 * 4
    decoder = json.loads((out / "decoder" / "stats.json").read_text())
    assert all(abs(row["causal"] - 1) < 1e-6 for row in decoder["rows"])  # the decoder's mask is causal
    assert "explained:" in capsys.readouterr().out


def test_cli_generates_by_default_and_refuses_what_an_encoder_decoder_does_not_take(t5_dir, tmp_path, capsys):
    from vitlens import cli

    out = tmp_path / "gen"
    assert cli.main(["text", CORPUS[2], "--model", str(t5_dir), "--out", str(out), "--views", "tokens",
                     "--format", "png", "--quiet"]) == 0
    record = json.loads((out / "seq2seq.json").read_text())
    assert record["generated"] and 1 <= len(record["steps"]) <= 20 and record["methods"] == list(SEQ2SEQ_METHODS)
    for argv, message in ((["--views", "query"], "view 'query' is not written for encoder-decoder models"),
                          (["--target", "3"], "give --continuation or --generate, not --target"),
                          (["--methods", "rollout"], "method 'rollout': it combines the self-attention"),
                          (["--head", "1.0"], "--head does not apply to encoder-decoder models"),
                          (["--spans", "0:3"], "--spans does not apply to encoder-decoder models")):
        assert cli.main(["text", CORPUS[2], "--model", str(t5_dir), "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
        assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ T5's encoder
def test_t5_encoder_is_a_plain_encoder_with_mean_pooling(tokenizer):
    import copy

    from vitlens.text import EncoderModel, explain_text

    module = tiny_t5_encoder(len(tokenizer))
    model = load_text_model(module, tokenizer=tokenizer)
    assert isinstance(model, EncoderModel) and model.pooling == "mean" and model.num_layers == 2
    with pytest.raises(ModelError, match="T5EncoderModel has no CLS token: use mean pooling"):
        load_text_model(module, tokenizer=tokenizer, pooling="cls")
    result = explain_text(model, [CORPUS[0], "The cat."], pairs=[CORPUS[2], CORPUS[4]],
                          methods="attention,legrad,cp-lrp,saliency")
    eager = _eager(copy.deepcopy(module))
    texts = [CORPUS[0], "The cat.", CORPUS[2], CORPUS[4]]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = eager(**enc, output_attentions=True)
    hidden = ref.last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    cosine = torch.nn.functional.cosine_similarity(pooled[:2], pooled[2:], dim=-1)
    for i, item in enumerate(result.items):
        assert item.values[0] == pytest.approx(float(cosine[i]), abs=1e-5)
        for j, seq in enumerate(item.sequences):
            s = i + 2 * j
            real = enc["attention_mask"][s].bool()
            expected = torch.stack([a[s] for a in ref.attentions])[:, :, real][:, :, :, real].numpy()
            np.testing.assert_allclose(seq.attention, expected, atol=1e-6)
        # T5 has no biases and its RMS norm gets the LRP rule: CP-LRP's relevance sums to the cosine
        total = sum(float(seq.scores["cp-lrp"].sum()) for seq in item.sequences)
        assert total == pytest.approx(item.values[0], abs=1e-4)


def test_t5_encoder_legrad_reads_each_block_through_the_final_norm(tokenizer):
    module = tiny_t5_encoder(len(tokenizer))
    model = load_text_model(module, tokenizer=tokenizer)
    hidden = torch.randn(1, 4, 32)
    np.testing.assert_allclose(model.layer_states(hidden).detach().numpy(),
                               module.encoder.final_layer_norm(hidden).detach().numpy())


def test_a_t5_encoder_directory_loads_as_the_encoder(tmp_path, tokenizer):
    tiny_t5_encoder(len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_text_model(str(tmp_path))
    assert model.kind_name == "T5EncoderModel" and model.describe()["kind"] == "encoder"


def test_attention_views_of_an_encoder_decoder_write_every_kind(t5_dir, tmp_path):
    from vitlens.text import attention_views

    written = attention_views(load_text_model(str(t5_dir)), CORPUS[2], out=tmp_path, views="heads,stats",
                              formats=("png",))
    assert sorted(written) == ["heads", "stats", "tokens"]  # tokens: seq2seq.json, always written
    assert (tmp_path / "cross" / "heads-layer1.png").is_file() and (tmp_path / "encoder" / "stats.csv").is_file()
    assert not (tmp_path / "attributions.png").exists()
    assert json.loads((tmp_path / "seq2seq.json").read_text())["methods"] == []

