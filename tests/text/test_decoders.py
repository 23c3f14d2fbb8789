"""Causal decoders (GPT-2, Llama, Mistral, Qwen2, Qwen3) on random tiny configs: capture equals the eager
model's output_attentions under left padding, maps are causal, a padded batch equals one-at-a-time, CP-LRP
conserves the next-token logit, the target token and errors, and the CLI with a GPT-2 directory."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.text.conftest import DECODERS, left_padded_batch, tiny_decoder
from vitlens.cli import main
from vitlens.errors import ModelError, TargetError
from vitlens.models import AttentionRecorder
from vitlens.text import DecoderModel, TextBatch, explain_text, load_text_model, run_text_batch
from vitlens.text.task import TEXT_METHODS, text_params


@pytest.mark.parametrize("family", DECODERS)
def test_capture_equals_eager_output_attentions_with_left_padding(family):
    module = tiny_decoder(family)
    assert module.config._attn_implementation == "sdpa"
    eager = copy.deepcopy(module)
    eager.config._attn_implementation = "eager"
    model = load_text_model(module)
    assert isinstance(model, DecoderModel) and model.num_layers == 2 and model.num_heads == 4
    ids, mask = left_padded_batch()
    positions = model.position_ids(mask)
    with torch.no_grad():
        reference = eager(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True,
                          use_cache=False)
    recorder = AttentionRecorder()
    with torch.no_grad(), model.capture(recorder):
        scores = model.forward(TextBatch.from_ids(ids, mask))
    assert module.config._attn_implementation == "sdpa" and not any("forward" in m.__dict__ for m in module.modules())
    # the next-token logits at the last position (left padding: the last column for every prompt)
    assert torch.allclose(scores, reference.logits[:, -1], atol=1e-5)
    real = mask.bool()
    pairs = (real[:, None, :, None] & real[:, None, None, :]).expand(-1, 4, -1, -1)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    for mine, ref in zip(recorder.attentions, reference.attentions):
        assert mine.shape == ref.shape == (3, 4, 7, 7)  # grouped-query heads repeated to 4 per layer
        assert torch.allclose(mine[pairs], ref[pairs], atol=1e-6, rtol=0)
        # real query rows: nothing above the diagonal, nothing on padding, rows sum to one
        rows = real[:, None, :, None].expand_as(mine)
        assert torch.all(mine[rows & ~causal] == 0)
        assert torch.all(mine[rows & ~real[:, None, None, :].expand_as(mine)] == 0)
        assert torch.allclose(mine.sum(-1)[real[:, None, :].expand(-1, 4, -1)], torch.ones(()), atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_batch_equals_one_at_a_time(family):
    """Values, causal attention of the real tokens and every method's token scores (LRP included)."""
    model = load_text_model(tiny_decoder(family))
    ids, mask = left_padded_batch(lengths=(7, 3, 5))
    methods = {name: text_params(name) for name in TEXT_METHODS + ("cp-lrp",)}
    batched = run_text_batch(model, TextBatch.from_ids(ids, mask), methods, "top2")
    assert batched.targets.shape == (3, 2)
    for s, length in enumerate((7, 3, 5)):
        alone = run_text_batch(model, TextBatch.from_ids(ids[s:s + 1, 7 - length:], mask[s:s + 1, 7 - length:]),
                               methods, batched.targets[s:s + 1])
        assert torch.allclose(batched.values[s], alone.values[0], atol=1e-5)
        attention = batched.attentions[s]
        assert attention.shape == (2, 4, length, length)
        assert torch.all(attention.triu(1) == 0)  # maps are zero above the diagonal
        assert torch.allclose(attention, alone.attentions[0], atol=1e-6)
        for name in methods:
            mine, ref = batched.token_maps[name][s], alone.token_maps[name][0]
            assert mine.shape == ref.shape == (2, length)
            scale = ref.abs().max().clamp_min(1e-12)
            assert torch.allclose(mine / scale, ref / scale, atol=1e-4), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cp_lrp_conserves_the_next_token_logit(family):
    """Gamma 0 and no additive constants (biases, GPT-2's position embeddings; rotary embeddings only rotate):
    the token relevances sum to the explained logit."""
    module = tiny_decoder(family)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias") or "wpe" in name:
                param.zero_()
    model = load_text_model(module)
    ids, mask = left_padded_batch()
    result = run_text_batch(model, TextBatch.from_ids(ids, mask), {"cp-lrp": text_params("cp-lrp")}, "top2")
    sums = torch.stack([scores.sum(-1) for scores in result.token_maps["cp-lrp"]])
    assert ((sums - result.values) / result.values).abs().max() <= 1e-4


def test_logprob_score_and_target_tokens(tiny_gpt2_dir):
    model = load_text_model(str(tiny_gpt2_dir), score="logprob")
    assert model.value_name == "next-token log-probability"
    paris = model.token_id(" Paris")
    assert model.tokenizer.decode([paris]) == " Paris" and model.class_name(paris) == "' Paris'"
    result = explain_text(model, "The capital of France is", methods=["chefer", "attnlrp"], target_token=" Paris")
    item = result.items[0]
    assert item.targets[0].index == paris and item.value_name == "next-token log-probability"
    logits = load_text_model(str(tiny_gpt2_dir)).forward(model.encode(["The capital of France is"]))
    assert item.values[0] == pytest.approx(torch.log_softmax(logits, -1)[0, paris].item(), abs=1e-5)
    assert item.values[0] < 0
    seq = item.sequences[0]
    assert [t for t in seq.display] == ["The", "capital", "of", "France", "is"] and seq.space[1:] == [True] * 4
    with pytest.raises(TargetError, match="is 3 tokens"):
        model.token_id(" Parisian")
    with pytest.raises(ModelError, match="unknown score 'nope'"):
        load_text_model(str(tiny_gpt2_dir), score="nope")


def test_unsupported_family_is_a_one_line_error_listing_the_supported_ones(tmp_path):
    import transformers as tr

    module = tr.OPTForCausalLM(tr.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                            num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    for spec in (module, str(tmp_path)):
        if isinstance(spec, str):
            module.config.architectures = ["OPTForCausalLM"]
            module.config.save_pretrained(tmp_path)  # refused from its config, before any weights are read
        with pytest.raises(ModelError) as info:
            load_text_model(spec)
        message = str(info.value)
        assert "\n" not in message and "OPTForCausalLM" in message
        for name in ("BERT", "GPT-2", "Llama", "Mistral", "Qwen2", "Qwen3"):
            assert name in message


def test_cli_explains_a_target_token(capsys, tmp_path, tiny_gpt2_dir):
    out = tmp_path / "gpt2"
    assert main(["text", "The capital of France is", "--model", str(tiny_gpt2_dir), "--target-token", " Paris",
                 "--methods", "rollout,gmar++,legrad,chefer,attnlrp", "--views", "tokens,query,stats",
                 "--format", "png", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "GPT2LMHeadModel, 2 layers x 4 heads" in stdout and "explained: ' Paris' (logit" in stdout
    record = json.loads((out / "attributions.json").read_text())
    assert record["explained"] == "next-token logit" and record["model"]["kind"] == "causal decoder"
    scores = record["sequences"][0]["scores"]
    assert set(scores) == {"rollout", "gmar++", "legrad", "chefer", "attnlrp"}
    assert all(len(v[0]) == 5 for v in scores.values())
    assert (out / "query-4.png").is_file()  # the flow from the last token, the one the prediction is read at
    stats = json.loads((out / "stats.json").read_text())["rows"]
    assert all(row["causal"] == pytest.approx(1.0) for row in stats)
    # one-line errors: a pair, a multi-token target, an encoder option mix
    for argv, expected in ((["--pair", "x"], "reads one text"), (["--target-token", " Parisian"], "is 3 tokens"),
                           (["--target", "pred", "--target-token", " Paris"], "not both")):
        assert main(["text", "The capital of France is", "--model", str(tiny_gpt2_dir), "--out", str(tmp_path / "e"),
                     *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and expected in err, err
