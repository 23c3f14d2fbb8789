"""Large decoders (issue 19 item 4): weights loaded in bf16 / fp16 (dtype=, --dtype), device_map='auto'
through accelerate, and attributions of a reduced-precision model that agree with float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitlens.cli import main
from vitlens.errors import ModelError, UsageError
from vitlens.text import explain_text, load_text_model
from vitlens.text import loading as text_loading
from tests.text.conftest import tiny_decoder

#: the attributions compared (every text method with a backward or a capture; one pass each)
METHODS = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "attnlrp", "cp-lrp"]
PROMPTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to",
           "Paris is in France and Rome is in"]
TARGETS = [" Paris", " Mary", " Italy"]
#: the least correlation of a method's reduced-precision token scores with float32's, per prompt
#: (measured minima in docs/text.md: 0.997 for bf16, 0.9999 for fp16)
MIN_CORRELATION = {"bf16": 0.99, "fp16": 0.999}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def decoder_dir(request, tmp_path_factory, tiny_gpt2_dir):
    """A random 2-layer decoder with the trained byte-level BPE tokenizer, initializer_range 0.5 so that its
    attention is peaked (at 0.02 every row is nearly uniform and bf16 rounding is all the attention map shows)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))
    module = tiny_decoder(request.param, vocab_size=len(tokenizer), initializer_range=0.5)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}-init05")
    module.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _correlations(decoder_dir, dtype) -> dict:
    runs = {}
    for name in ("fp32", dtype):
        model = load_text_model(str(decoder_dir), dtype=name)
        runs[name] = explain_text(model, PROMPTS, methods=METHODS, target_token=TARGETS)
    return {m: [float(np.corrcoef(a.sequences[0].scores[m].ravel(), b.sequences[0].scores[m].ravel())[0, 1])
                for a, b in zip(runs["fp32"].items, runs[dtype].items)] for m in METHODS}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_attributions_correlate_with_float32(decoder_dir, dtype):
    for method, values in _correlations(decoder_dir, dtype).items():
        assert min(values) >= MIN_CORRELATION[dtype], (method, values)


def test_the_model_is_loaded_and_run_in_the_dtype(decoder_dir):
    model = load_text_model(str(decoder_dir), dtype="bf16")
    assert {p.dtype for p in model.module.parameters()} == {torch.bfloat16}
    assert load_text_model(str(decoder_dir)).dtype == torch.float32  # stored as float32: unchanged by default
    result = explain_text(model, PROMPTS[:1], methods=["chefer"], target_token=TARGETS[:1])
    assert result.items[0].sequences[0].attention.dtype == np.float32
    # a module is cast in place
    module = tiny_decoder("gpt2")
    assert load_text_model(module, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(UsageError, match="dtype must be fp32, bf16 or fp16, got 'fp8'"):
        load_text_model(module, dtype="fp8")


def test_device_map_goes_to_from_pretrained_with_accelerate(decoder_dir, monkeypatch):
    """device_map='auto' is passed to from_pretrained (accelerate places the model: here all on the CPU), and the
    placed model explains the same as one loaded plainly."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    placed = load_text_model(str(decoder_dir), dtype="bf16", device_map="auto")
    assert seen["device_map"] == "auto" and seen["dtype"] == torch.bfloat16
    assert placed.dtype == torch.bfloat16
    plain = load_text_model(str(decoder_dir), dtype="bf16")
    a, b = (explain_text(m, PROMPTS[:1], methods=["chefer", "attnlrp"], target_token=TARGETS[:1]).items[0]
            for m in (placed, plain))
    for method in ("chefer", "attnlrp"):
        np.testing.assert_array_equal(a.sequences[0].scores[method], b.sequences[0].scores[method])


def test_device_map_mistakes_are_one_line(decoder_dir, monkeypatch):
    monkeypatch.setattr(text_loading, "accelerate_available", lambda: False)
    needs = r"^device_map='auto' needs the accelerate package \(pip install accelerate\)$"
    with pytest.raises(ModelError, match=needs):
        load_text_model(str(decoder_dir), device_map="auto")
    with pytest.raises(UsageError, match="give device= or device_map=, not both"):
        load_text_model(str(decoder_dir), device_map="auto", device="cpu")
    with pytest.raises(UsageError, match="device_map must be 'auto', got 'balanced'"):
        load_text_model(str(decoder_dir), device_map="balanced")
    with pytest.raises(UsageError, match="device_map= is for a model loaded from a directory"):
        load_text_model(tiny_decoder("gpt2"), device_map="auto")


def test_dtype_and_device_map_on_the_command_line(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bf16"
    assert main(["text", "The capital of France is", "--model", str(tiny_gpt2_dir), "--dtype", "bf16",
                 "--target-token", " Paris", "--methods", "chefer,attnlrp", "--views", "tokens", "--format", "png",
                 "--out", str(out), "--quiet"]) == 0
    assert (out / "attributions.json").is_file()
    monkeypatch.setattr(text_loading, "accelerate_available", lambda: False)
    for extra, message in ((["--device-map", "auto"], "device_map='auto' needs the accelerate package"),
                           (["--device-map", "auto", "--device", "cpu"], "give --device or --device-map, not both")):
        assert main(["text", "The capital", "--model", str(tiny_gpt2_dir), *extra, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vitlens: error: ") and message in err and "\n" not in err
        assert not (tmp_path / "x").exists()


def test_captures_of_a_bf16_model_are_combined_in_float32(decoder_dir):
    """The model runs (and is captured) in bf16; every method, LRP included, combines float32 copies, so what
    comes back -- scores, explained values, attention -- is float32 (bf16 maps would mean bf16 arithmetic)."""
    from vitlens.text.task import run_text_batch, text_params

    model = load_text_model(str(decoder_dir), dtype="bf16")
    batch = model.encode(PROMPTS)
    result = run_text_batch(model, batch, {m: text_params(m) for m in METHODS},
                            target=[model.token_id(t) for t in TARGETS])
    assert result.values.dtype == torch.float32 and result.logits.dtype == torch.float32
    for method in METHODS:
        assert {m.dtype for m in result.token_maps[method]} == {torch.float32}, method
    assert {a.dtype for a in result.attentions} == {torch.float32}
