"""Continuations of causal decoders: teacher-forced per-step attributions equal the single-next-token explanation
of each prefix, greedy generation equals ``generate(do_sample=False)``, the continuation's score is the sum of its
log-probabilities, contrastive targets are differences of single targets for the linear methods, a position inside
the text, the whole-continuation attributions, the files and the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.text.conftest import tiny_decoder
from vitlens.errors import InputError, MethodError, TargetError
from vitlens.text import explain_text, load_text_model
from vitlens.text.batch import TextBatch
from vitlens.text.continuation import explain_continuation
from vitlens.text.task import TEXT_METHODS, run_text_batch, text_params

METHODS = list(TEXT_METHODS) + ["cp-lrp", "saliency", "input-x-gradient", "integrated-gradients"]
PARAMS = {"integrated-gradients": {"steps": 6}}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_text_model(str(tiny_gpt2_dir))


@pytest.fixture(scope="module")
def llama(gpt2):
    """A random Llama (grouped-query attention, rotary embeddings) reading the GPT-2 test tokenizer."""
    return load_text_model(tiny_decoder("llama", seed=4, vocab_size=len(gpt2.tokenizer)), tokenizer=gpt2.tokenizer)


def prefix_explanation(model, ids, target, methods=METHODS, params=PARAMS, contrast=None):
    resolved = {n: text_params(n, params.get(n)) for n in methods}
    return run_text_batch(model, TextBatch.from_ids(torch.tensor([ids])), resolved, target=target,
                          keep_attentions=False, contrast=contrast)


def assert_close(ours, ref, tol=1e-5):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    scale = max(np.abs(ref).max(), 1e-12)
    assert np.abs(ours - ref).max() <= tol * scale, np.abs(ours - ref).max() / scale


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_each_step_equals_the_prefix_explained_alone(which, request):
    model = request.getfixturevalue(which)
    result = explain_continuation(model, PROMPT, continuation=" Paris and Rome", methods=METHODS, params=PARAMS)
    P, T = result.prompt_length, len(result.steps)
    assert T == 3 and result.continuation == " Paris and Rome"
    for t in range(T):
        alone = prefix_explanation(model, result.ids[:P + t], result.ids[P + t])
        assert abs(result.steps[t]["value"] - alone.values[0, 0].item()) < 1e-6  # float32 logits
        for name in METHODS:
            column = result.matrices[name][:, t]
            assert_close(column[:P + t], alone.token_maps[name][0][0].numpy())
            assert np.isnan(column[P + t:]).all()  # tokens after the step's position


def test_generate_is_greedy_decoding(gpt2, llama):
    for model in (gpt2, llama):
        ids = model.tokenizer(PROMPT)["input_ids"]
        result = explain_continuation(model, PROMPT, generate=4, methods=["input-x-gradient"])
        assert result.generated
        with torch.no_grad():
            mask = torch.ones(1, len(ids), dtype=torch.long)
            reference = model.module.generate(torch.tensor([ids]), attention_mask=mask, do_sample=False,
                                              max_new_tokens=4,
                                              pad_token_id=model.tokenizer.eos_token_id)[0, len(ids):].tolist()
            # and by hand: the argmax of the next-token logits, four times
            manual = list(ids)
            for _ in range(4):
                manual.append(int(model.module(torch.tensor([manual])).logits[0, -1].argmax()))
        assert [s["id"] for s in result.steps] == reference == manual[len(ids):]


def test_continuation_score_is_the_sum_of_log_probabilities(gpt2):
    result = explain_text(gpt2, PROMPT, continuation=" Paris and Rome", methods=["saliency"])
    ids = torch.tensor([result.ids])
    with torch.no_grad():
        logprobs = gpt2.module(ids).logits[0].log_softmax(-1)
    P = result.prompt_length
    direct = [logprobs[P - 1 + t, result.ids[P + t]].item() for t in range(3)]
    assert_close([s["logprob"] for s in result.steps], direct)
    assert abs(result.sequence_logprob - sum(direct)) < 1e-5
    # the default score is the logit
    with torch.no_grad():
        logits = gpt2.module(ids).logits[0]
    assert_close([s["value"] for s in result.steps], [logits[P - 1 + t, result.ids[P + t]].item() for t in range(3)])


def test_whole_continuation_attributions_are_the_sum_of_the_log_probability_steps(tiny_gpt2_dir):
    """Linear in the explained score: with log-probabilities per step, the whole continuation's input x gradient,
    LRP and integrated gradients are the sums of the step columns (saliency is not linear and is not summed)."""
    model = load_text_model(str(tiny_gpt2_dir), score="logprob")
    linear = ["input-x-gradient", "attnlrp", "cp-lrp", "integrated-gradients"]
    result = explain_continuation(model, PROMPT, continuation=" Paris and Rome", methods=linear + ["chefer"],
                                  params=PARAMS)
    assert set(result.sequence) == set(linear)  # chefer reads one token: not for the sum
    for name in linear:
        assert_close(result.sequence[name], np.nansum(result.matrices[name], axis=1), tol=1e-4)
    assert_close(sum(s["value"] for s in result.steps), result.sequence_logprob)


def test_contrast_is_the_difference_of_the_two_targets(gpt2):
    linear = ["input-x-gradient", "attnlrp", "cp-lrp", "integrated-gradients"]
    paris, london = gpt2.token_id(" Paris"), gpt2.token_id(" Rome")
    both = explain_text(gpt2, PROMPT, target_token=" Paris", contrast=" Rome", methods=linear, params=PARAMS,
                        keep_attentions=False).items[0]
    first = explain_text(gpt2, PROMPT, target=paris, methods=linear, params=PARAMS, keep_attentions=False).items[0]
    second = explain_text(gpt2, PROMPT, target=london, methods=linear, params=PARAMS, keep_attentions=False).items[0]
    assert abs(both.values[0] - (first.values[0] - second.values[0])) < 1e-5
    assert "minus that of ' Rome' (contrast)" in both.value_name
    for name in linear:
        assert_close(both.sequences[0].scores[name], first.sequences[0].scores[name] - second.sequences[0].scores[name])


def test_contrastive_continuation_per_step(gpt2):
    result = explain_continuation(gpt2, PROMPT, continuation=" Paris and", contrast=" Rome is",
                                  methods=["input-x-gradient", "chefer"])
    assert [s["contrast"] for s in result.steps] == [" Rome", " is"]
    P = result.prompt_length
    for t in range(2):
        alone = prefix_explanation(gpt2, result.ids[:P + t], result.ids[P + t], ["input-x-gradient", "chefer"], {},
                                   contrast=torch.tensor([result.steps[t]["contrast_id"]]))
        assert abs(result.steps[t]["value"] - alone.values[0, 0].item()) < 1e-6
        for name in ("input-x-gradient", "chefer"):
            assert_close(result.matrices[name][:P + t, t], alone.token_maps[name][0][0].numpy())


def test_position_inside_the_text(gpt2):
    text = "The capital of France is Paris."
    ids = gpt2.tokenizer(text)["input_ids"]
    result = explain_text(gpt2, text, position=-2, methods=["chefer", "saliency"])
    assert result.prompt_length == len(ids) - 2 and result.steps[0]["id"] == ids[-2]
    alone = prefix_explanation(gpt2, ids[:-2], ids[-2], ["chefer", "saliency"], {})
    for name in ("chefer", "saliency"):
        assert_close(result.matrices[name][:, 0], alone.token_maps[name][0][0].numpy())


def test_files(gpt2, tmp_path):
    result = explain_continuation(gpt2, PROMPT, continuation=" Paris and Rome", methods=["chefer", "attnlrp"])
    paths = result.save(tmp_path)
    assert {p.name for p in paths} == {"continuation.json", "continuation.png"}
    data = json.loads((tmp_path / "continuation.json").read_text())
    assert data["continuation"] == " Paris and Rome" and data["prompt_length"] == result.prompt_length
    assert len(data["matrices"]["chefer"]) == result.prompt_length + 2
    assert data["matrices"]["chefer"][-1][:2] == [None, None]  # the last row is seen only by the last step
    assert [s["token"] for s in data["steps"]] == [" Paris", " and", " Rome"]
    assert abs(data["sequence_logprob"] - result.sequence_logprob) < 1e-6
    assert set(data["sequence"]) == {"attnlrp"}


@pytest.mark.parametrize("kwargs, error, message", [
    ({}, InputError, "give one of continuation=, generate= or position="),
    ({"continuation": " Paris", "generate": 2}, InputError, "not continuation and generate"),
    ({"generate": 0}, InputError, "generate must be a number of tokens >= 1, got 0"),
    ({"position": 0}, InputError, "position 0 has no token before it"),
    ({"continuation": " Paris and", "contrast": " Rome"}, TargetError,
     "the contrast ' Rome' is 1 token\\(s\\) but the continuation is 2"),
    ({"continuation": ""}, InputError, "empty continuation"),
])
def test_one_line_errors(gpt2, kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        explain_continuation(gpt2, PROMPT, methods=["chefer"], **kwargs)
    assert "\n" not in str(info.value)


def test_encoders_are_refused():
    from tests.text.conftest import tiny_text_model

    with pytest.raises(MethodError, match="continuations are explained for causal decoders"):
        explain_continuation(load_text_model(tiny_text_model("bert")), "a b", continuation="c", methods=["chefer"])


# ------------------------------------------------------------------------------------------ command line
def test_cli_continuation_generate_and_contrast(tiny_gpt2_dir, tmp_path, capsys):
    from vitlens.cli import main

    out = tmp_path / "run"
    assert main(["text", PROMPT, "--model", str(tiny_gpt2_dir), "--continuation", " Paris and Rome",
                 "--methods", "chefer,attnlrp,saliency", "--format", "png", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "explained: ' Paris' (" in printed and "continuation log-probability: " in printed
    data = json.loads((out / "continuation.json").read_text())
    assert [s["token"] for s in data["steps"]] == [" Paris", " and", " Rome"] and (out / "continuation.png").is_file()
    assert main(["text", PROMPT, "--model", str(tiny_gpt2_dir), "--generate", "2", "--methods", "chefer",
                 "--format", "png", "--out", str(tmp_path / "gen")]) == 0
    assert json.loads((tmp_path / "gen" / "continuation.json").read_text())["generated"] is True
    assert main(["text", PROMPT, "--model", str(tiny_gpt2_dir), "--target-token", " Paris", "--contrast", " Rome",
                 "--views", "tokens", "--methods", "input-x-gradient", "--out", str(tmp_path / "c")]) == 0
    assert "explained: ' Paris' minus ' Rome' (logit difference " in capsys.readouterr().out
    data = json.loads((tmp_path / "c" / "attributions.json").read_text())
    assert data["contrast"]["name"] == "' Rome'"


@pytest.mark.parametrize("argv, message", [
    (["--continuation", " Paris", "--generate", "2"], "give one of --continuation, --generate, --position, not "
                                                     "--continuation and --generate"),
    (["--generate", "2", "--target-token", " Paris"], "--generate: the explained targets are the continuation's own "
                                                       "tokens: no --target"),
    (["--continuation", " Paris and", "--contrast", " Rome"], "the contrast ' Rome' is 1 token"),
    (["--position", "0"], "position 0 has no token before it"),
])
def test_cli_one_line_errors(tiny_gpt2_dir, tmp_path, capsys, argv, message):
    from vitlens.cli import main

    out = tmp_path / "run"
    assert main(["text", PROMPT, "--model", str(tiny_gpt2_dir), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists()
