"""Hugging Face ``CLIPModel`` explained for text prompts, every method checked in float64.

A tiny random-init CLIP (vision: hidden 32, 3 layers, 4 heads, 32x32 input, 8x8 patches; text: 2 layers;
projection 16) with O(1) weights and a word-level tokenizer built here (no hub). The classes are prompts:
eight zero-shot classes filled into 'a photo of a {}.'. The reference is computed without vitlens and
without the model's vision forward: :func:`explicit_forward` restates the image tower from its parameters
(patch embedding, CLS and position embeddings, pre-layernorm, attention, quick-GELU MLP, CLS ->
post-layernorm -> visual projection) and the logits ``exp(logit_scale) * cos(image, prompt)`` must equal
the model's own ``logits_per_image`` to 1e-10 (the text embeddings are the model's own text tower: it is
not what is explained). Attention probabilities and their gradients come from the restatement with plain
autograd; the method formulas are tests/methods/general_reference.py's with the CLS readout. LeGrad is
also checked against the official LeGrad CLIP code stated here (token mean -> ln_post -> proj -> L2
normalise -> dot with the normalised prompt, per layer; no logit scale).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from tests.methods.general_reference import CASES, general_reference, readout_vector
from tests.methods.test_methods_reference import assert_scaled_close, reference
from tests.models.family_checks import (check_batched_equals_alone, check_bystander_untouched,
                                        check_capture_keeps_the_logits, check_gradcam_formula, check_module_as_given,
                                        eager_copy, explain_one, reference_gradients)
from tests.models.family_checks import layer_norm as _ln
from tests.models.prompted_checks import (ATTENTION_METHODS, check_logits_are_the_models, check_lrp_refused,
                                          check_two_prompts_differ, prompted_setup, restate_hf_encoder,
                                          unit_scale)
from vitlens.errors import ModelError, TargetError
from vitlens.models import AttentionRecorder
from vitlens.models.hf_clip import HFClip, is_hf_clip
from vitlens.models.registry import find_family

CLASSES = ["dog", "cat", "bird", "car", "tree", "house", "boat", "fish"]
TEMPLATE = "a photo of a {}."
PROMPTS = [TEMPLATE.format(c) for c in CLASSES]
TARGETS = [3, 5]
GRID = (4, 4)
N = 1 + GRID[0] * GRID[1]
# the towers' configs (shared with test_hf_siglip.py): the tokenizer's ids, 3 vision layers on 8x8 patches
TEXT_CONFIG = dict(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
VISION_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                     patch_size=8)


def tiny_tokenizer():
    """A word-level tokenizer: [BOS] words [EOS], padded with [PAD] (CLIP pools the [EOS] token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["a", "photo", "of", "the", ".", "an", "image", *CLASSES]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                       special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def tiny_hf_clip(seed=0, dtype=torch.float64):
    """A small Hugging Face CLIPModel with O(1) parameters (HF's 0.02-std init leaves attention uniform), eval."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=dict(TEXT_CONFIG), vision_config=dict(VISION_CONFIG), projection_dim=16,
                        logit_scale_init_value=1.5)
    module = CLIPModel(config)
    unit_scale(module, fan_in=lambda p: p[0].numel())
    return module.to(dtype).eval()


def load(module, **options):
    options = options or {"classes": CLASSES, "template": TEMPLATE}
    return vitlens.load_model(module, tokenizer=tiny_tokenizer(), **options)


# --------------------------------------------------------------------------------------------------
# the image tower restated from its parameters (no vitlens code, no vision forward)
# --------------------------------------------------------------------------------------------------

def prompt_embeddings(m, prompts=PROMPTS):
    """(K, D) normalised text embeddings from the model's own text tower."""
    with torch.no_grad():
        u = m.get_text_features(**tiny_tokenizer()(prompts, padding=True, return_tensors="pt")).pooler_output
    return u / u.norm(dim=-1, keepdim=True)


def explicit_forward(m, x, prompts=PROMPTS):
    """Logits, attention probabilities (graph leaves of the scores), block outputs, last pre-attention norm."""
    v = m.vision_model
    heads = v.config.num_attention_heads
    patches = F.conv2d(x, v.embeddings.patch_embedding.weight, stride=v.config.patch_size).flatten(2).transpose(1, 2)
    cls = v.embeddings.class_embedding.expand(x.shape[0], 1, -1)
    z = torch.cat([cls, patches], dim=1) + v.embeddings.position_embedding.weight
    z, attentions, outputs, normed = restate_hf_encoder(_ln(z, v.pre_layrnorm), v.encoder.layers, heads, quick_gelu_mlp)
    return cls_logits(m, z, prompts), attentions, outputs, normed


def quick_gelu_mlp(t, mlp):
    f = F.linear(t, mlp.fc1.weight, mlp.fc1.bias)
    return F.linear(f * torch.sigmoid(1.702 * f), mlp.fc2.weight, mlp.fc2.bias)


def similarity(m, pooled, prompts=PROMPTS):
    e = pooled @ m.visual_projection.weight.T
    return m.logit_scale.exp() * (e / e.norm(dim=-1, keepdim=True)) @ prompt_embeddings(m, prompts).T


def cls_logits(m, z, prompts=PROMPTS):
    return similarity(m, _ln(z[:, 0], m.vision_model.post_layernorm), prompts)


def mean_logits(m, z):
    return similarity(m, _ln(z.mean(dim=1), m.vision_model.post_layernorm))


def reference_capture(m, x, targets):
    logits, attentions, outputs, normed = explicit_forward(m, x)
    cap = reference_gradients(m, targets, logits, attentions, outputs, normed, cls_logits, mean_logits)
    return {**cap, "outputs": outputs, "attentions": attentions}


@pytest.fixture(scope="module")
def setup():
    module = tiny_hf_clip(seed=1)
    return prompted_setup(module, load(copy.deepcopy(module)), reference_capture, TARGETS)


# --------------------------------------------------------------------------------------------------
# 1. the family, prompts, logits, capture
# --------------------------------------------------------------------------------------------------

def test_family_and_facts(setup):
    model, module = setup["model"], setup["module"]
    assert isinstance(model, HFClip) and model.family == "hf-clip" and is_hf_clip(module)
    assert find_family(module, "image").name == "hf-clip"
    assert model.num_layers == 3 and model.num_classes == 8 and model.num_prefix_tokens == 1
    assert model.prompts == PROMPTS and model.class_names == CLASSES
    assert model.patch_size == (8, 8) and model.grid((32, 32)) == GRID and model.fixed_input_size() is None
    layers = "vision_model.encoder.layers"
    assert model.block_norm_names() == [f"{layers}.{i}.layer_norm1" for i in range(3)]
    assert model.default_cam_layers() == [f"{layers}.2.layer_norm1"]
    np.testing.assert_array_equal(model.readout_weights(N, dtype=torch.float64).numpy(), readout_vector("cls", 1, N))
    assert set(model.unsupported_methods()) == {"attnlrp", "cp-lrp"}
    assert model.preprocess.input_size == (32, 32)


def test_logits_are_the_models_own_logits_per_image(setup):
    module, model, x = setup["module"], setup["model"], setup["x"]
    ids = tiny_tokenizer()(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = module(pixel_values=x, **ids).logits_per_image
    check_logits_are_the_models(model, x, setup["cap"]["logits"], expected)
    # prompts given directly: the class names are the prompts
    direct = load(copy.deepcopy(module), prompts=PROMPTS[:2])
    assert direct.class_names == PROMPTS[:2]
    with torch.no_grad():
        torch.testing.assert_close(direct.logits(x), expected[:, :2], rtol=0, atol=1e-12)


def test_logits_in_float32_and_the_prediction(setup):
    module = tiny_hf_clip(seed=1, dtype=torch.float32)
    model = load(module)
    x = setup["x"].float()
    ids = tiny_tokenizer()(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = module(pixel_values=x, **ids).logits_per_image
    result = vitlens.explain(model, x, methods=["rollout"])
    assert [p.index for p in result.predictions] == expected.argmax(1).tolist()
    assert result.predictions[0].name == CLASSES[int(expected[0].argmax())]


@pytest.mark.parametrize("grad", [True, False])
def test_capture_keeps_the_logits_and_records_only_the_image_tower(setup, grad):
    assert len(setup["cap"]["A"]) == 3
    check_capture_keeps_the_logits(setup["model"], setup["x"], setup["cap"]["A"], grad)


@pytest.mark.parametrize("size", [(32, 32), (32, 48)], ids=["native", "non-square"])
def test_captured_attention_equals_eager_output_attentions(setup, size):
    module, model = setup["module"], setup["model"]
    eager = eager_copy(module)
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ids = tiny_tokenizer()(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = eager(pixel_values=x, output_attentions=True, interpolate_pos_encoding=size != (32, 32), **ids)
        recorder = AttentionRecorder()
        with model.capture(recorder):
            logits = model.logits(x)
    attentions = expected.vision_model_output.attentions
    assert len(attentions) == len(recorder.attentions) == 3
    n = 1 + model.grid(size)[0] * model.grid(size)[1]
    # Hugging Face's eager CLIP takes its softmax in float32 (then casts back): 1e-6, not 1e-12
    for mine, theirs in zip(recorder.attentions, attentions):
        assert mine.shape == theirs.shape == (2, 4, n, n)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, expected.logits_per_image, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# 2. every attention method == the independent float64 computation
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}".replace(" ", "") for m, p in CASES])
def test_matches_independent_float64_reference(setup, method, params):
    cap = setup["cap"]
    actual, full = explain_one(setup["model"], setup["x"], method, params, TARGETS, GRID)
    expected = general_reference(method, full, cap, readout_vector("cls", 1, N), 1)
    assert_scaled_close(actual.numpy(), expected)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3 * np.abs(expected).max()  # two images, two maps
    assert_scaled_close(expected, reference(method, full, cap), rel=1e-12)


def test_legrad_is_the_official_clip_legrad(setup):
    """The official LeGrad CLIP code, stated independently: per layer l, s^l = <normalise(proj(ln_post(mean_n
    z^l_n))), normalise(u_target)> (no logit scale); E^l = mean over heads and queries of relu(ds^l/dA^l) on
    the patch key columns; sum over l; min-max. vitlens's legrad(pool='mean') after min-max is that map."""
    module, x = setup["module"], setup["x"]
    _, attentions, outputs, _ = explicit_forward(module, x)
    v, u = module.vision_model, prompt_embeddings(module)
    result = vitlens.explain(setup["model"], x, methods=["legrad"], target=TARGETS,
                             params={"legrad": {"pool": "mean", "layers": 2}})
    for b, target in enumerate(TARGETS):
        total = torch.zeros(GRID[0] * GRID[1], dtype=torch.float64)
        for layer in (1, 2):
            pooled = _ln(outputs[layer][b].mean(dim=0), v.post_layernorm) @ module.visual_projection.weight.T
            score = (pooled / pooled.norm()) @ u[target]
            gradient = torch.autograd.grad(score, attentions[layer], retain_graph=True)[0][b]
            total += gradient.clamp_min(0).mean(dim=(0, 1))[1:]
        expected = (total - total.min()) / (total.max() - total.min())
        actual = result.patch_maps["legrad"][b, 0].flatten()
        actual = (actual - actual.min()) / (actual.max() - actual.min())
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


def test_gradcam_default_layer_matches_the_formula(setup):
    check_gradcam_formula(setup["model"], setup["x"], TARGETS, setup["cap"]["cam"], GRID)


def test_two_prompts_give_two_different_maps(setup):
    check_two_prompts_differ(setup["model"], setup["x"][:1],
                             torch.tensor([[CLASSES.index("dog"), CLASSES.index("house")]]),
                             ["legrad", "chefer", "gmar-l2", "gradcam"], GRID)


def test_zero_shot_targets_by_class_name(setup):
    by_name = vitlens.explain(setup["model"], setup["x"], methods=["chefer"], target=["car", "house"])
    by_index = vitlens.explain(setup["model"], setup["x"], methods=["chefer"], target=TARGETS)
    torch.testing.assert_close(by_name.patch_maps["chefer"], by_index.patch_maps["chefer"], rtol=0, atol=0)
    with pytest.raises(TargetError, match="unknown target class name 'zebra'"):
        vitlens.explain(setup["model"], setup["x"], methods=["chefer"], target="zebra")


def test_set_prompts_changes_the_classes():
    module = tiny_hf_clip(seed=2)
    model = load(module)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    before = vitlens.explain(model, x, methods=["legrad"], target="dog").patch_maps["legrad"]
    assert model.set_prompts(["an image of the dog .", "a photo of a cat ."]) is model
    assert model.num_classes == 2 and model.class_names == ["an image of the dog .", "a photo of a cat ."]
    after = vitlens.explain(model, x, methods=["legrad"], target="an image of the dog .").patch_maps["legrad"]
    assert (after - before).abs().max() > 1e-6
    model.set_prompts(classes="dog, cat", template="an image of the {} .")
    assert model.class_names == ["dog", "cat"] and model.prompts == ["an image of the dog .", "an image of the cat ."]


# --------------------------------------------------------------------------------------------------
# 3. batches, the model as given, refusals, loading
# --------------------------------------------------------------------------------------------------

def test_batched_equals_one_at_a_time(setup):
    check_batched_equals_alone(setup["model"], setup["x"], ATTENTION_METHODS)


def test_model_returned_exactly_as_given():
    module = tiny_hf_clip(seed=3)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    model = load(module)
    assert model.module is module
    module.vision_model.encoder.layers[1].train()  # a mixed mode of the user's own: restored after every call
    check_module_as_given(model, module, state,
                          lambda m: getattr(getattr(m, "config", None), "_attn_implementation", None))
    assert all(p.requires_grad for p in module.parameters())


def test_another_model_inside_the_capture_is_untouched():
    check_bystander_untouched(load(tiny_hf_clip(seed=0)), tiny_hf_clip(seed=1),
                              call=lambda module, x: module.get_image_features(pixel_values=x).pooler_output)


def test_refusals_are_one_line(setup):
    check_lrp_refused(setup["model"], setup["x"], "attnlrp")
    no_prompts = vitlens.load_model(tiny_hf_clip(seed=4))
    with pytest.raises(TargetError, match="has none: load_model") as info:
        vitlens.explain(no_prompts, setup["x"], methods=["rollout"])
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="prompts are for CLIP-style models.*ViTForImageClassification is not one"):
        from tests.conftest import tiny_hf_vit

        vitlens.load_model(tiny_hf_vit(), prompts=["a dog"])
    with pytest.raises(ModelError, match="no tokenizer saved with it"):
        vitlens.load_model(tiny_hf_clip(seed=4), prompts=["a dog"])
    with pytest.raises(ModelError, match="not both"):
        load(tiny_hf_clip(seed=4), prompts=["a dog"], classes=["dog"])


def test_hf_directory_loads_the_clip_model_and_its_tokenizer(tmp_path):
    """``hf:DIR`` of a CLIP checkpoint loads the image-text model (not a classifier) and its saved tokenizer."""
    module = tiny_hf_clip(seed=5, dtype=torch.float32)
    module.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model = vitlens.load_model(f"hf:{tmp_path}", classes=CLASSES[:3])
    assert isinstance(model, HFClip) and model.class_names == CLASSES[:3]
    x = torch.randn(2, 3, 32, 32)
    ids = tiny_tokenizer()(PROMPTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), module(pixel_values=x, **ids).logits_per_image, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# 4. the command line: --prompt, --classes, --template
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP model with its tokenizer saved as a Hugging Face directory, and a photo."""
    import contextlib
    import io

    from PIL import Image

    where = tmp_path_factory.mktemp("clip")
    with contextlib.redirect_stderr(io.StringIO()):
        tiny_hf_clip(seed=6, dtype=torch.float32).save_pretrained(where / "model")
        tiny_tokenizer().save_pretrained(where / "model")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(where / "cat.png")
    return where


def test_cli_explain_with_prompts_and_a_prompt_target(clip_dir, tmp_path):
    import json

    from vitlens import cli

    out = tmp_path / "run"
    argv = ["explain", str(clip_dir / "cat.png"), "--model", str(clip_dir / "model"), "--prompt", PROMPTS[0],
            "--prompt", PROMPTS[1], "--target", PROMPTS[1], "--methods", "rollout,legrad", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    record = json.loads(next((out / "records").iterdir()).read_text())
    assert PROMPTS[1] in json.dumps(record)
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["legrad", "rollout"]


def test_cli_zero_shot_classes_from_a_file_in_compare_and_evaluate(clip_dir, tmp_path, capsys):
    from vitlens import cli

    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ncat\n\nbird\n")
    model = ["--model", str(clip_dir / "model"), "--classes", str(classes), "--template", "a photo of the {} ."]
    grid = tmp_path / "grid.png"
    assert cli.main(["compare", str(clip_dir / "cat.png"), *model, "--methods", "chefer,legrad", "--target", "cat",
                     "--out", str(grid)]) == 0
    assert grid.is_file()
    assert cli.main(["evaluate", str(clip_dir / "cat.png"), "--model", str(clip_dir / "model"), "--classes", "dog,cat",
                     "--methods", "rollout", "--metrics", "deletion", "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    assert "error" not in capsys.readouterr().err
