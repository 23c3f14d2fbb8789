"""Hugging Face DINOv2 (with and without registers) and BEiT classifiers, every method checked in float64.

Tiny random-init models from configs (hidden 32, 3 layers, 4 heads, 32x32 input, 8x8 patches, 10 labels)
with O(1) weights, biases, register tokens, layer-scale factors and relative position bias tables, so that
every part really shapes the attention and the logits. The references are computed without vitlens and
without the models' forwards: :func:`explicit_forward` restates each model from its parameters (patch
embedding, tokens, attention with the relative position biases, layer scale, GELU or SwiGLU MLP, the
classifier's own pooling) and must reproduce its logits to 1e-10; attention probabilities and their
gradients come from it with plain autograd. The method formulas are tests/methods/general_reference.py's
(test_methods_reference.py's for any readout and any number of prefix tokens: DINOv2 reads 0.5 CLS + 0.5
mean of the patch rows, registers excluded; BEiT the mean of the patch rows or the CLS row), checked equal
to test_methods_reference.py's own on a CLS readout. AttnLRP / CP-LRP are checked against an explicit
relevance propagation through one layer written with tests/lrp/test_lrp_reference.py's ``lrp_linear`` /
``lrp_layer_norm``, and CP-LRP's conservation on bias-free models.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from tests.lrp.test_lrp_reference import lrp_layer_norm, lrp_linear
from tests.methods.general_reference import (CASES, general_reference, readout_vector, reference_params)
from tests.methods.test_methods_reference import assert_scaled_close, reference
from tests.models.family_checks import (check_batched_equals_alone, check_bystander_untouched,
                                        check_capture_keeps_the_logits, check_gradcam_formula,
                                        check_lrp_against_reference, check_module_as_given, eager_copy,
                                        reference_gradients)
from tests.models.family_checks import layer_norm as _ln
from tests.models.family_checks import linear as _lin
from vitlens.engine import run_batch
from vitlens.errors import ModelError
from vitlens.methods import REGISTRY
from vitlens.models import AttentionRecorder
from vitlens.models.hf_image import HFBeit, HFDinov2, is_hf_beit, is_hf_dinov2
from vitlens.models.hf_vit import is_hf_vit
from vitlens.models.registry import find_family

TARGETS = [3, 7]
GRID = (4, 4)


def _unit_scale(module: torch.nn.Module) -> None:
    """O(1) parameters: HF initialises linear weights with std 0.02, zero tables and tokens, which would
    leave the attention almost uniform and the relative position bias without effect."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            last = name.split(".")[-1]
            if "relative_position_bias_table" in name:
                p.normal_(std=1.0)
            elif last in ("lambda1", "lambda_1", "lambda_2"):
                p.uniform_(0.5, 1.5)
            elif last == "bias":
                p.normal_(std=0.1)
            elif last in ("cls_token", "register_tokens", "mask_token"):
                p.normal_()
            elif last == "position_embeddings":
                p.normal_(std=0.5)
            elif p.dim() == 1:  # layernorm weights
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=p[0].numel() ** -0.5)


def tiny_hf_dinov2(seed=0, registers=0, dtype=torch.float64, **kwargs):
    """A small Hugging Face DINOv2 classifier (with ``registers`` register tokens when > 0), eval mode."""
    from transformers import (Dinov2Config, Dinov2ForImageClassification, Dinov2WithRegistersConfig,
                              Dinov2WithRegistersForImageClassification)

    torch.manual_seed(seed)
    options = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=32,
                   patch_size=8, num_labels=10)
    options.update(kwargs)
    if registers:
        module = Dinov2WithRegistersForImageClassification(
            Dinov2WithRegistersConfig(num_register_tokens=registers, **options))
    else:
        module = Dinov2ForImageClassification(Dinov2Config(**options))
    _unit_scale(module)
    return module.to(dtype).eval()


def tiny_hf_beit(seed=0, dtype=torch.float64, **kwargs):
    """A small Hugging Face BEiT classifier (relative position bias per layer, mean pooling), eval mode."""
    from transformers import BeitConfig, BeitForImageClassification

    torch.manual_seed(seed)
    options = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
                   patch_size=8, num_labels=10, use_relative_position_bias=True)
    options.update(kwargs)
    module = BeitForImageClassification(BeitConfig(**options))
    _unit_scale(module)
    return module.to(dtype).eval()


MODELS = {
    # DINOv2: GELU MLP, layer scale, head on cat(CLS, mean of patches)
    "dinov2": (tiny_hf_dinov2, {}),
    # with 2 register tokens (in neither half of the head) and the SwiGLU MLP
    "dinov2-registers-swiglu": (tiny_hf_dinov2, dict(registers=2, use_swiglu_ffn=True)),
    # BEiT: relative position bias per layer, layer scale, mean of the patch tokens -> pooler layernorm
    "beit-mean": (tiny_hf_beit, {}),
    # both relative biases and an absolute position embedding, no layer scale, CLS token after the layernorm
    "beit-cls-shared": (tiny_hf_beit, dict(use_shared_relative_position_bias=True, use_mean_pooling=False,
                                           use_absolute_position_embeddings=True, layer_scale_init_value=0.0)),
}


# --------------------------------------------------------------------------------------------------
# the models restated from their parameters (no vitlens code, no model forward)
# --------------------------------------------------------------------------------------------------

def _is_dinov2(m):
    return type(m).__name__.startswith("Dinov2")


def _backbone(m):
    if not _is_dinov2(m):
        return m.beit
    return m.dinov2_with_registers if hasattr(m, "dinov2_with_registers") else m.dinov2


def _prefix(m):
    return 1 + getattr(m.config, "num_register_tokens", 0)


def _layers(m):
    return _backbone(m).encoder.layer if _is_dinov2(m) else _backbone(m).layers


def relative_position_index(h, w):
    """BEiT's (h*w + 1, h*w + 1) index into a relative position table: patch offsets, then CLS rows."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    patch = (ys[:, None] - ys[None, :] + h - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
    distances = (2 * h - 1) * (2 * w - 1)
    index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = patch
    index[0, :] = distances  # CLS to token
    index[:, 0] = distances + 1  # token to CLS
    index[0, 0] = distances + 2
    return index


def _table_bias(table, grid):
    """(heads, N, N) additive bias read from a relative position table."""
    index = relative_position_index(*grid)
    return table[index.reshape(-1)].reshape(*index.shape, -1).permute(2, 0, 1)


def explicit_forward(m, x):
    """(logits, attentions, layer outputs, pre-attention norm outputs) of the model on x, restated."""
    dino, bb = _is_dinov2(m), _backbone(m)
    emb = bb.embeddings
    proj = emb.patch_embeddings.projection
    B, C = x.shape[0], proj.out_channels
    t0 = F.conv2d(x, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)
    grid = (x.shape[-2] // proj.stride[0], x.shape[-1] // proj.stride[1])
    z = torch.cat([emb.cls_token.expand(B, -1, -1), t0], dim=1)
    if emb.position_embeddings is not None:
        z = z + emb.position_embeddings
    if dino and hasattr(emb, "register_tokens"):  # registers go in after the position embedding
        z = torch.cat([z[:, :1], emb.register_tokens.expand(B, -1, -1), z[:, 1:]], dim=1)
    N, K = z.shape[1], m.config.num_attention_heads
    d = C // K
    shared = 0.0
    if not dino and bb.shared_position_bias is not None:
        shared = _table_bias(bb.shared_position_bias.relative_position_bias_table, grid)
    attentions, outputs, normed = [], [], []
    for layer in _layers(m):
        att = layer.attention
        h = _ln(z, layer.norm1 if dino else layer.layernorm_before)
        normed.append(h)
        q, k, v = (_lin(h, p).reshape(B, N, K, d).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
        s = q @ k.transpose(-1, -2) * d ** -0.5
        if not dino:
            own = 0.0 if layer.relative_position_bias is None else \
                _table_bias(layer.relative_position_bias.relative_position_bias_table, grid)
            s = s + own + shared
        a = s.softmax(dim=-1)
        attentions.append(a)
        o = _lin((a @ v).transpose(1, 2).reshape(B, N, C), att.o_proj)
        scale1, scale2 = (layer.layer_scale1.lambda1, layer.layer_scale2.lambda1) if dino else \
            (layer.lambda_1, layer.lambda_2)
        z = z + scale1 * o
        h2 = _ln(z, layer.norm2 if dino else layer.layernorm_after)
        mlp = layer.mlp
        if hasattr(mlp, "gate_proj"):  # SwiGLU
            f = _lin(F.silu(_lin(h2, mlp.gate_proj)) * _lin(h2, mlp.up_proj), mlp.down_proj)
        else:
            f = _lin(F.gelu(_lin(h2, mlp.fc1)), mlp.fc2)
        z = z + scale2 * f
        outputs.append(z)
    return pooled_logits(m, z), attentions, outputs, normed


def pooled_logits(m, z):
    """The classifier on a (B, N, C) stream, written out."""
    bb, W = _backbone(m), m.classifier
    if _is_dinov2(m):
        n = _ln(z, bb.layernorm)
        return _lin(torch.cat([n[:, 0], n[:, _prefix(m):].mean(dim=1)], dim=-1), W)
    if m.config.use_mean_pooling:  # the encoder's layernorm is an identity then
        return _lin(_ln(z[:, 1:].mean(dim=1), bb.pooler.layernorm), W)
    return _lin(_ln(z, bb.layernorm)[:, 0], W)


def mean_logits(m, z):
    """LeGrad's 'mean' score: the mean of ALL tokens read by the classifier as each of its tokens."""
    bb, W, mz = _backbone(m), m.classifier, z.mean(dim=1)
    if _is_dinov2(m):
        n = _ln(mz, bb.layernorm)
        return _lin(torch.cat([n, n], dim=-1), W)
    if m.config.use_mean_pooling:
        return _lin(_ln(mz, bb.pooler.layernorm), W)
    return _lin(_ln(mz, bb.layernorm), W)


def reference_capture(m, x, targets):
    logits, attentions, outputs, normed = explicit_forward(m, x)
    with torch.no_grad():
        assert torch.allclose(logits, m(pixel_values=x).logits, rtol=0, atol=1e-10)  # the restatement is the model
    return reference_gradients(m, targets, logits, attentions, outputs, normed, pooled_logits, mean_logits)


def model_readout(m, n):
    """The token weights the classifier's pooling is read with (the documented choice for DINOv2)."""
    pool = "cls+mean" if _is_dinov2(m) else ("mean" if m.config.use_mean_pooling else "cls")
    return readout_vector(pool, _prefix(m), n)


# --------------------------------------------------------------------------------------------------
# 1. the families, their facts, capture
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def setup(request):
    build, options = MODELS[request.param]
    module = build(seed=len(request.param), **options)
    x = torch.randn(len(TARGETS), 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return {"name": request.param, "module": module, "model": vitlens.load_model(copy.deepcopy(module)), "x": x,
            "cap": reference_capture(module, x, TARGETS), "prefix": _prefix(module),
            "n": _prefix(module) + GRID[0] * GRID[1]}


def test_family_and_facts(setup):
    model, module, prefix = setup["model"], setup["module"], setup["prefix"]
    dino = _is_dinov2(module)
    assert isinstance(model, HFDinov2 if dino else HFBeit) and model.family == ("hf-dinov2" if dino else "hf-beit")
    assert is_hf_dinov2(module) is dino and is_hf_beit(module) is not dino and not is_hf_vit(module)
    assert find_family(module, "image").name == model.family
    assert model.num_layers == 3 and model.num_classes == 10 and model.num_prefix_tokens == prefix
    assert model.patch_size == (8, 8) and model.grid((32, 32)) == GRID and model.grid((32, 48)) == (4, 6)
    assert model.fixed_input_size() is None
    norm = "norm1" if dino else "layernorm_before"
    layers = ("dinov2_with_registers.encoder.layer" if prefix > 1 else "dinov2.encoder.layer") if dino \
        else "beit.layers"
    assert model.block_norm_names() == [f"{layers}.{i}.{norm}" for i in range(3)]
    assert model.default_cam_layers() == [f"{layers}.2.{norm}"]
    w = model.readout_weights(setup["n"], dtype=torch.float64).numpy()
    np.testing.assert_array_equal(w, model_readout(module, setup["n"]))
    assert w.sum() == pytest.approx(1.0, abs=1e-15)
    if prefix > 1:
        assert (w[1:prefix] == 0).all()  # the registers are read by neither half of the head
    # no processor config: the model config's size, the Hugging Face fallback statistics
    assert model.preprocess.input_size == (32, 32) and model.preprocess.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("grad", [True, False])
def test_capture_keeps_the_logits_and_records_the_models_own_probabilities(setup, grad):
    model, x, cap = setup["model"], setup["x"], setup["cap"]
    assert model.module.config._attn_implementation == "sdpa"  # fused: no probabilities without the capture
    assert len(cap["A"]) == 3
    # LeGrad's per-layer score at the last layer is the model's logit; the 'mean' score is another one
    plain = check_capture_keeps_the_logits(model, x, cap["A"], grad, shape=(2, 4, setup["n"], setup["n"]))
    torch.testing.assert_close(plain, cap["logits"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (48, 48)], ids=["native", "non-square", "larger"])
def test_captured_attention_equals_eager_output_attentions(setup, size):
    """Also at other input sizes, where the models resample their position embeddings and bias tables."""
    module, model = setup["module"], setup["model"]
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    kwargs = {} if _is_dinov2(module) else {"interpolate_pos_encoding": size != (32, 32)}
    with torch.no_grad():
        expected = eager_copy(module)(pixel_values=x, output_attentions=True, **kwargs)
        recorder = AttentionRecorder()
        with model.capture(recorder):
            logits = model.logits(x)
    h, w = model.grid(size)
    n = setup["prefix"] + h * w
    # Hugging Face's eager BEiT takes its softmax in float32 (then casts back): 1e-7, not 1e-12, there
    atol = 1e-12 if _is_dinov2(module) else 1e-6
    assert len(expected.attentions) == len(recorder.attentions) == 3
    for mine, theirs in zip(recorder.attentions, expected.attentions):
        assert mine.shape == theirs.shape == (2, 4, n, n)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=atol)
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=atol)
    if not _is_dinov2(module) and setup["name"] == "beit-mean":
        # not vacuous: without its tables the same model attends differently
        flat = copy.deepcopy(module)
        with torch.no_grad():
            for pname, p in flat.named_parameters():
                if "relative_position_bias_table" in pname:
                    p.zero_()
            flat_model, other = vitlens.load_model(flat), AttentionRecorder()
            with flat_model.capture(other):
                flat_model.logits(x)
        assert (other.attentions[0] - recorder.attentions[0]).abs().max() > 0.05


# --------------------------------------------------------------------------------------------------
# 2. every attention method == the independent float64 computation
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}".replace(" ", "") for m, p in CASES])
def test_matches_independent_float64_reference(setup, method, params):
    cap, module, prefix, n = setup["cap"], setup["module"], setup["prefix"], setup["n"]
    result = vitlens.explain(setup["model"], setup["x"], methods=[method], target=TARGETS,
                             params={method: params} if params else None)
    actual = result.patch_maps[method][:, 0]
    assert actual.dtype == torch.float64 and actual.shape == (2, *GRID)
    full = reference_params(method, REGISTRY[method].params(params))
    expected = general_reference(method, full, cap, model_readout(module, n), prefix)
    assert_scaled_close(actual.numpy(), expected)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3 * np.abs(expected).max()  # two images, two maps
    if prefix == 1:
        # the restatement is test_methods_reference.py's own formula on a CLS readout (same captures)
        assert_scaled_close(general_reference(method, full, cap, readout_vector("cls", prefix, n), prefix),
                            reference(method, full, cap), rel=1e-12)
    if method != "legrad" and model_readout(module, n)[0] != 1.0:
        # and the readout matters: the CLS row alone would give another map
        other = general_reference(method, full, cap, readout_vector("cls", prefix, n), prefix)
        assert np.abs(other - expected).max() > 1e-3 * np.abs(expected).max()


def test_reference_capture_is_not_degenerate(setup):
    cap = setup["cap"]
    for a, g in zip(cap["A"], cap["G"]):
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-12)
        # far from uniform attention, signed gradients
        assert a.max() > 4.0 / a.shape[-1] and (g > 0).any() and (g < 0).any()
    # LeGrad's last-layer 'model' score is the logit itself; earlier layers and 'mean' differ
    np.testing.assert_allclose(cap["LG"][("model", 2)], cap["G"][2], atol=1e-12)
    assert np.abs(cap["LG"][("model", 0)] - cap["G"][0]).max() > 1e-6
    assert np.abs(cap["LG"][("mean", 2)] - cap["G"][2]).max() > 1e-6


def test_gradcam_default_layer_matches_the_formula(setup):
    """Grad-CAM on the last layer's pre-attention norm (patch tokens on the grid, prefix dropped)."""
    check_gradcam_formula(setup["model"], setup["x"], TARGETS, setup["cap"]["cam"], GRID, prefix=setup["prefix"])


# --------------------------------------------------------------------------------------------------
# 3. batches, the model as given, loading
# --------------------------------------------------------------------------------------------------

ALL = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "gradcam", "attnlrp", "cp-lrp"]


def test_batched_equals_one_at_a_time(setup):
    check_batched_equals_alone(setup["model"], setup["x"], ALL)


# what Hugging Face modules may carry besides parameters and modes: restored after every call
HF_FLAGS = (lambda m: getattr(getattr(m, "config", None), "_attn_implementation", None),
            lambda m: getattr(m, "gradient_checkpointing", None))


@pytest.mark.parametrize("name", ["dinov2-registers-swiglu", "beit-cls-shared"])
def test_model_returned_exactly_as_given(name):
    build, options = MODELS[name]
    module = build(seed=3, **options)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    model = vitlens.load_model(module)
    assert model.module is module
    _layers(module)[1].train()  # a mixed mode of the user's own: restored after every call
    check_module_as_given(model, module, state, *HF_FLAGS, also=[["cp-lrp", "gradcam"]])


def test_another_model_inside_the_capture_is_untouched():
    check_bystander_untouched(vitlens.load_model(tiny_hf_dinov2(seed=0)), tiny_hf_dinov2(seed=1),
                              call=lambda module, x: module(pixel_values=x).logits)


def test_gradient_checkpointing_is_a_one_line_error():
    module = tiny_hf_beit()
    module.activation_checkpointing_enable()  # would re-run layers in the backward and record them twice
    with pytest.raises(ModelError, match="disable gradient checkpointing") as info:
        vitlens.explain(vitlens.load_model(module), torch.randn(1, 3, 32, 32, dtype=torch.float64),
                        methods=["rollout"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["dinov2-registers-swiglu", "beit-mean"])
def test_hf_directory_loads_with_its_processor(tmp_path, name):
    """``load_model(DIR)`` (the ``hf:`` loader's path for local directories) picks the family and reads
    the saved image-processor config."""
    from transformers import BitImageProcessor

    build, options = MODELS[name]
    module = build(seed=4, dtype=torch.float32, **options)
    module.save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      resample=3).save_pretrained(tmp_path)
    model = vitlens.load_model(str(tmp_path))
    assert model.family == ("hf-dinov2" if name.startswith("dinov2") else "hf-beit")
    assert model.info.spec == str(tmp_path) and model.dtype == torch.float32
    assert vitlens.load_model(f"hf:{tmp_path}").family == model.family  # the same loader, by its prefix
    p = model.preprocess
    assert p.input_size == (32, 32) and p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)
    assert p.interpolation == "bicubic" and p.crop_pct == pytest.approx(0.8) and p.resize_mode == "shorter"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), module(pixel_values=x).logits, rtol=0, atol=1e-5)
    result = vitlens.explain(model, x, methods=["rollout", "legrad", "attnlrp"])
    assert result["rollout"].shape == (2, 32, 32) and all(torch.isfinite(m).all() for m in result.maps.values())


def test_explain_from_a_pil_image_with_the_models_preprocessing():
    from PIL import Image

    module = tiny_hf_dinov2(seed=2, registers=1, dtype=torch.float32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    result = vitlens.explain(module, [image], methods=["rollout", "legrad", "gradcam", "attnlrp"])
    assert result.patch_maps["rollout"].shape == (1, 1, *GRID) and result.maps["attnlrp"].shape == (1, 1, 32, 32)
    assert all(torch.isfinite(m).all() for m in result.patch_maps.values())


def test_an_attention_of_ones_own_is_refused_in_one_line():
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Attention

    class LoggingAttention(Dinov2Attention):
        pass

    module = tiny_hf_dinov2()
    module.dinov2.encoder.layer[1].attention.__class__ = LoggingAttention
    with pytest.raises(ModelError, match="unsupported attention LoggingAttention in layer 1") as info:
        vitlens.load_model(module)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# 4. AttnLRP / CP-LRP
# --------------------------------------------------------------------------------------------------

def reference_relevance(m, x, target, variant, conv_gamma, lin_gamma):
    """Pixel relevance (H, W) of one image for a one-layer model, every rule written out (no autograd)."""
    dino, bb = _is_dinov2(m), _backbone(m)
    emb = bb.embeddings
    p = emb.patch_embeddings.projection
    C, k = p.out_channels, p.kernel_size[0]
    grid = (x.shape[-2] // k, x.shape[-1] // k)
    prefix = _prefix(m)
    layer = _layers(m)[0]
    att = layer.attention
    K = m.config.num_attention_heads
    d = C // K
    scale = d ** -0.5
    # --- forward ---------------------------------------------------------------------------------
    patches = F.unfold(x[None], kernel_size=k, stride=k)[0].T
    Wc = p.weight.reshape(C, -1)
    t0 = patches @ Wc.T + p.bias
    tokens = torch.cat([emb.cls_token[0], t0])
    if emb.position_embeddings is not None:
        tokens = tokens + emb.position_embeddings[0]
    if prefix > 1:
        tokens = torch.cat([tokens[:1], emb.register_tokens[0], tokens[1:]])
    n_tok = tokens.shape[0]
    h1 = _ln(tokens, layer.norm1 if dino else layer.layernorm_before)
    q, kk, v = (_lin(h1, proj).reshape(n_tok, K, d).transpose(0, 1) for proj in (att.q_proj, att.k_proj, att.v_proj))
    s = (q * scale) @ kk.transpose(-1, -2)
    bias = torch.zeros_like(s)
    if not dino:
        for owner in (layer.relative_position_bias, bb.shared_position_bias):
            if owner is not None:
                bias = bias + _table_bias(owner.relative_position_bias_table, grid)
    z = s + bias
    A = z.softmax(-1)
    o = A @ v
    merged = o.transpose(0, 1).reshape(n_tok, C)
    proj_out = _lin(merged, att.o_proj)
    ones = torch.ones(C, dtype=x.dtype)
    g1, g2 = (layer.layer_scale1.lambda1, layer.layer_scale2.lambda1) if dino else (layer.lambda_1, layer.lambda_2)
    g1, g2 = g1 * ones, g2 * ones  # BEiT without layer scale keeps a float 1.0
    scaled_proj = g1 * proj_out
    r1 = tokens + scaled_proj
    norm2 = layer.norm2 if dino else layer.layernorm_after
    h2 = _ln(r1, norm2)
    mlp = layer.mlp
    swiglu = hasattr(mlp, "gate_proj")
    if swiglu:
        gate = _lin(h2, mlp.gate_proj)
        up = _lin(h2, mlp.up_proj)
        hidden = F.silu(gate) * up
        f = _lin(hidden, mlp.down_proj)
    else:
        f1 = _lin(h2, mlp.fc1)
        a = F.gelu(f1)
        f = _lin(a, mlp.fc2)
    scaled_mlp = g2 * f
    r2 = r1 + scaled_mlp
    if dino:
        nrm = _ln(r2, bb.layernorm)
        pooled = nrm[prefix:].mean(0)
        u = torch.cat([nrm[0], pooled])
    elif m.config.use_mean_pooling:
        pooled = r2[1:].mean(0)
        u = _ln(pooled, bb.pooler.layernorm)
    else:
        nrm = _ln(r2, bb.layernorm)
        u = nrm[0]
    logits = _lin(u, m.classifier)
    # --- relevance ---------------------------------------------------------------------------------
    R_logits = torch.zeros_like(logits)
    R_logits[target] = logits[target]
    R_u = lrp_linear(u[None], m.classifier.weight, m.classifier.bias, R_logits[None], lin_gamma)[0]
    P = n_tok - prefix
    if dino:  # the concatenation splits the head's input relevance; z-rule through the patch mean
        R_nrm = torch.zeros_like(nrm)
        R_nrm[0] = R_u[:C]
        R_nrm[prefix:] = nrm[prefix:] / P / pooled * R_u[C:]
        R_r2 = lrp_layer_norm(r2, bb.layernorm, R_nrm)
    elif m.config.use_mean_pooling:
        R_pooled = lrp_layer_norm(pooled[None], bb.pooler.layernorm, R_u[None])[0]
        R_r2 = torch.zeros_like(r2)
        R_r2[1:] = r2[1:] / P / pooled * R_pooled
    else:
        R_nrm = torch.zeros_like(nrm)
        R_nrm[0] = R_u
        R_r2 = lrp_layer_norm(r2, bb.layernorm, R_nrm)
    R_r1 = r1 / r2 * R_r2  # z-rule at the residual sum
    R_f = scaled_mlp / r2 * R_r2  # the layer scale (a constant factor) passes relevance unchanged
    if swiglu:
        R_hidden = lrp_linear(hidden, mlp.down_proj.weight, mlp.down_proj.bias, R_f, lin_gamma)
        # uniform rule on the gate product (half each), identity rule through SiLU
        R_h2 = (lrp_linear(h2, mlp.gate_proj.weight, mlp.gate_proj.bias, 0.5 * R_hidden, lin_gamma)
                + lrp_linear(h2, mlp.up_proj.weight, mlp.up_proj.bias, 0.5 * R_hidden, lin_gamma))
    else:
        R_a = lrp_linear(a, mlp.fc2.weight, mlp.fc2.bias, R_f, lin_gamma)
        R_h2 = lrp_linear(h2, mlp.fc1.weight, mlp.fc1.bias, R_a, lin_gamma)  # identity rule on GELU
    R_r1 = R_r1 + lrp_layer_norm(r1, norm2, R_h2)
    R_tokens, R_proj = tokens / r1 * R_r1, scaled_proj / r1 * R_r1
    R_merged = lrp_linear(merged, att.o_proj.weight, att.o_proj.bias, R_proj, lin_gamma)
    R_o = R_merged.reshape(n_tok, K, d).transpose(0, 1)
    contrib = A[..., None] * v[:, None, :, :] * (R_o / o)[:, :, None, :]  # o = A v: (K, N_i, N_j, d)
    if variant == "cp-lrp":
        R_q, R_k, R_v = torch.zeros_like(q), torch.zeros_like(kk), contrib.sum(dim=1)
    else:
        R_v = 0.5 * contrib.sum(dim=1)  # uniform rule on A V
        R_A = 0.5 * contrib.sum(dim=-1)
        R_z = z * (R_A - A * R_A.sum(-1, keepdim=True))  # softmax rule on the (biased) scores
        R_s = s / z * R_z  # z-rule at s + bias: the bias (a constant) absorbs its share
        c2 = (q * scale)[:, :, None, :] * kk[:, None, :, :] * (R_s / s)[..., None]
        R_q, R_k = 0.5 * c2.sum(dim=2), 0.5 * c2.sum(dim=1)  # uniform rule on Q K^T
    R_h1 = sum(lrp_linear(h1, proj.weight, proj.bias, R.transpose(0, 1).reshape(n_tok, C), lin_gamma)
               for proj, R in ((att.q_proj, R_q), (att.k_proj, R_k), (att.v_proj, R_v)))
    R_tokens = R_tokens + lrp_layer_norm(tokens, layer.norm1 if dino else layer.layernorm_before, R_h1)
    # the CLS and register tokens and the position embedding (constants) absorb their shares
    R_t0 = t0 / tokens[prefix:] * R_tokens[prefix:]
    R_patches = lrp_linear(patches, Wc, p.bias, R_t0, conv_gamma)
    folded = F.fold(R_patches.T[None], output_size=x.shape[-2:], kernel_size=k, stride=k)[0]
    return folded.sum(0), logits


ONE_LAYER = {
    "dinov2": (tiny_hf_dinov2, {}),
    "dinov2-registers-swiglu": (tiny_hf_dinov2, dict(registers=2, use_swiglu_ffn=True)),
    "beit-mean-both-biases": (tiny_hf_beit, dict(use_shared_relative_position_bias=True,
                                                 use_absolute_position_embeddings=True)),
    "beit-cls-no-layer-scale": (tiny_hf_beit, dict(use_mean_pooling=False, layer_scale_init_value=0.0)),
}


@pytest.fixture(scope="module", params=list(ONE_LAYER), ids=list(ONE_LAYER))
def one_layer(request):
    build, options = ONE_LAYER[request.param]
    return build(seed=7, image_size=16, num_hidden_layers=1, **options)


@pytest.mark.parametrize("variant", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("conv_gamma, lin_gamma", [(0.0, 0.0), (1.0, 0.5)])
def test_lrp_matches_explicit_relevance_propagation(one_layer, variant, conv_gamma, lin_gamma):
    check_lrp_against_reference(one_layer, reference_relevance, variant, conv_gamma, lin_gamma, min_scale=1e-4)


def _without_additive_constants(module):
    """Zero every bias, the CLS / register / mask tokens and the position embedding: what absorbs relevance.

    The relative position bias tables stay: CP-LRP holds the attention weights constant, so a bias on
    the scores has nothing to absorb.
    """
    with torch.no_grad():
        for pname, p in module.named_parameters():
            last = pname.split(".")[-1]
            if last in ("bias", "cls_token", "register_tokens", "mask_token", "position_embeddings"):
                p.zero_()
    return module


CONSERVING = {
    "dinov2": (tiny_hf_dinov2, {}),
    "dinov2-registers-swiglu": (tiny_hf_dinov2, dict(registers=2, use_swiglu_ffn=True)),
    "beit-mean": (tiny_hf_beit, dict(use_shared_relative_position_bias=True)),
    "beit-cls": (tiny_hf_beit, dict(use_mean_pooling=False)),
}


def _cp_lrp_sums(module, x):
    result = run_batch(vitlens.load_model(module), x, {"cp-lrp": {"conv_gamma": 0.0, "lin_gamma": 0.0}},
                       target="top2")
    sums, logits = result.extras["cp-lrp"]["relevance_sum"], result.extras["cp-lrp"]["target_logit"]
    assert torch.allclose(result.patch_maps["cp-lrp"].flatten(2).sum(-1), sums, rtol=1e-12, atol=0)
    return sums, logits


@pytest.mark.parametrize("name", list(CONSERVING))
def test_cp_lrp_conserves_the_target_logit(name):
    build, options = CONSERVING[name]
    module = _without_additive_constants(build(seed=6, **options))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sums, logits = _cp_lrp_sums(module, x)
    assert logits.abs().min() > 1e-2
    assert ((sums - logits).abs() / logits.abs()).max() <= 1e-6


def test_the_swiglu_rule_is_what_conserves(monkeypatch):
    """Without the uniform rule on DINOv2's SwiGLU gate product both factors would take all of its relevance."""
    import vitlens.lrp.composite as composite

    module = _without_additive_constants(tiny_hf_dinov2(seed=6, registers=2, use_swiglu_ffn=True))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(composite, "_is_hf_gated_ffn", lambda module: False)
    sums, logits = _cp_lrp_sums(module, x)
    assert ((sums - logits).abs() / logits.abs()).max() > 1e-2


def test_attnlrp_absorbs_a_share_by_design():
    """AttnLRP's softmax rule is not conservative (tests/lrp/test_lrp.py): the sum is reported beside the logit;
    its exact values are checked by the explicit propagation above."""
    module = _without_additive_constants(tiny_hf_dinov2(seed=6))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = run_batch(vitlens.load_model(module), x, {"attnlrp": {"conv_gamma": 0.0, "lin_gamma": 0.0}}, target=0)
    share = result.extras["attnlrp"]["relevance_sum"] / result.extras["attnlrp"]["target_logit"]
    assert torch.isfinite(share).all() and not torch.allclose(share, torch.ones_like(share), atol=1e-3)
