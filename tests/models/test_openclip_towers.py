"""OpenCLIP models with timm, convolutional and CoCa image towers, explained for text prompts.

Tiny random-init OpenCLIP models built from configs (no hub), with tests/models/test_openclip.py's text tower and
prompts:

- **timm towers** (OpenCLIP's SigLIP and EVA-CLIP models): a ``CLIP`` whose ``visual`` is OpenCLIP's
  ``TimmModel`` over a tiny timm trunk: a SigLIP-style ViT (no class token, ``global_pool='map'``, the trunk's head
  as the projection, a logit bias) or an EVA-02 (rotary embeddings, SwiGLU, class token) followed by OpenCLIP's
  linear projection. The reference reads nothing of vitlens: the trunk's attention comes from timm's own unfused
  path (``fused_attn = False`` on a deep copy, a hook on ``attn_drop``), the readout of a stream is restated from
  parameters (the SigLIP pooling head as tests/models/test_timm_map_pool.py restates it; the EVA class token through
  its final LayerNorm and the projection), the cosine with the prompts and the logit bias are checked against
  OpenCLIP's own ``encode_image`` / ``encode_text``, and gradients come from plain autograd.
- **CoCa**: OpenCLIP's ``VisionTransformer`` with an attentional pooler (learnt queries over all tokens). The blocks
  are restated as in test_openclip.py, the pooler from its parameters (layernormed queries and keys, separate
  q / k / v projections, softmax, out_proj, ``ln_post``, the first query, ``proj``); the readout row of each image is
  the first query's attention, averaged over heads.
- **Convolutional towers**: OpenAI's ``ModifiedResNet`` (RN50-style, attention pooling at the end) and a
  ``TimmModel`` over ConvNeXt: the Grad-CAM family equals pytorch-grad-cam run on a module returning the same
  prompt logits, the attention methods are refused in one line.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from tests.methods.general_reference import CASES, readout_vector
from tests.methods.test_methods_reference import assert_scaled_close
from tests.models.family_checks import (check_batched_equals_alone, check_capture_keeps_the_logits,
                                        check_gradcam_formula, check_module_as_given, check_per_image_reference,
                                        reference_gradients)
from tests.models.family_checks import layer_norm as _ln
from tests.models.family_checks import linear as _lin
from tests.models.prompted_checks import check_logits_are_the_models, check_lrp_refused, check_two_prompts_differ
from tests.models.test_openclip import PROMPTS, TEXT, explicit_forward, tokens, unit_init
from tests.models.test_timm_map_pool import pooled as map_pooled
from vitlens.errors import MethodError, ModelError
from vitlens.models import AttentionRecorder

open_clip = pytest.importorskip("open_clip", reason="pip install open-clip-torch")

TARGETS = [3, 5]
GRID = (4, 4)
ATTENTION_METHODS = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "gradcam"]
CAM_METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam"]


def prompt_embeddings(m, prompts=PROMPTS):
    with torch.no_grad():
        return m.encode_text(tokens(prompts), normalize=True)


def similarity(m, e, u):
    """OpenCLIP's logits from an image embedding: exp(logit_scale) cos(e, u) (+ logit_bias)."""
    logits = m.logit_scale.exp() * (e / e.norm(dim=-1, keepdim=True)) @ u.T
    return logits if getattr(m, "logit_bias", None) is None else logits + m.logit_bias


def own_logits(m, x, prompts=PROMPTS):
    """OpenCLIP's own: exp(logit_scale) encode_image(x, normalize) . encode_text(t, normalize) (+ logit_bias)."""
    logits = m.logit_scale.exp() * m.encode_image(x, normalize=True) @ prompt_embeddings(m, prompts).T
    return logits if getattr(m, "logit_bias", None) is None else logits + m.logit_bias


# --------------------------------------------------------------------------------------------------
# timm towers
# --------------------------------------------------------------------------------------------------

def clip_with_timm_trunk(kind, seed=0):
    """A CLIP whose image tower is OpenCLIP's TimmModel; the trunk is swapped for a tiny one of the same kind."""
    import timm
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    if kind == "siglip":  # OpenCLIP's SigLIP configs: 'map' pooling, the trunk's own head as the projection
        vision = CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", timm_pool="map", timm_proj=None, image_size=32)
        module = CLIP(16, vision, CLIPTextCfg(**TEXT), init_logit_bias=-1.0)
        module.visual.trunk = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                                                depth=3, num_heads=4, num_classes=16, global_pool="map",
                                                class_token=False)
    else:  # EVA-02 with token pooling, then OpenCLIP's linear projection
        vision = CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", timm_pool="token", timm_proj="linear",
                               image_size=32)
        module = CLIP(16, vision, CLIPTextCfg(**TEXT))
        module.visual.trunk = timm.create_model("eva02_tiny_patch14_224", img_size=32, patch_size=8, embed_dim=32,
                                                depth=3, num_heads=4, num_classes=0, global_pool="token")
        module.visual.head.proj = torch.nn.Linear(32, 16, bias=False)
    unit_init(module)
    with torch.no_grad():
        if kind == "siglip":
            module.visual.trunk.attn_pool.latent.normal_()  # a probe far from uniform attention
            module.logit_bias.fill_(-1.0)
        for name, p in module.visual.trunk.named_parameters():
            if name in ("cls_token", "pos_embed"):
                p.normal_(std=0.5)
    return module.double().eval()


def timm_tower_score(m, z, u):
    """(B, prompts) logits and (B, N) readout row of a trunk stream z (before the trunk's final norm), restated."""
    trunk = m.visual.trunk
    if trunk.global_pool == "map":
        embedding, readout = map_pooled(trunk, z)  # the pooling head restated, then the trunk's head
    else:
        embedding = _ln(z[:, 0], trunk.norm) @ m.visual.head.proj.weight.T
        readout = F.one_hot(torch.zeros(z.shape[0], dtype=torch.long), z.shape[1]).double()
    return similarity(m, embedding, u), readout


def timm_tower_capture(module, x, targets):
    m = copy.deepcopy(module)
    u = prompt_embeddings(m)
    attentions, outputs, normed = [], [], []
    for blk in m.visual.trunk.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda mod, inputs, output: attentions.append(output))
        blk.norm1.register_forward_hook(lambda mod, inputs, output: normed.append(output))
        blk.register_forward_hook(lambda mod, inputs, output: outputs.append(output))
    logits = own_logits(m, x)
    restated, readout = timm_tower_score(m, outputs[-1], u)
    torch.testing.assert_close(restated, logits, rtol=0, atol=1e-10)  # the restatement is the model

    def score(m, z):
        return timm_tower_score(m, z, u)[0]

    def mean_score(m, z):
        return score(m, z.mean(dim=1, keepdim=True).expand_as(z))

    cap = reference_gradients(m, targets, logits, attentions, outputs, normed, score, mean_score)
    return {**cap, "readout": readout.detach().numpy(), "own": logits.detach()}


@pytest.fixture(scope="module", params=["siglip", "eva"])
def timm_setup(request):
    module = clip_with_timm_trunk(request.param, seed=2)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)).double()
    return {"kind": request.param, "module": module, "x": x, "cap": timm_tower_capture(module, x, TARGETS),
            "model": vitlens.load_model(copy.deepcopy(module), prompts=PROMPTS),
            "prefix": int(module.visual.trunk.num_prefix_tokens)}


def test_timm_tower_facts_logits_and_capture(timm_setup):
    from vitlens.models.openclip import OpenClipTimmTower

    model, x, cap, prefix = timm_setup["model"], timm_setup["x"], timm_setup["cap"], timm_setup["prefix"]
    assert isinstance(model, OpenClipTimmTower) and model.family == "open-clip"
    assert model.num_layers == 3 and model.num_prefix_tokens == prefix == (0 if timm_setup["kind"] == "siglip" else 1)
    assert model.num_classes == len(PROMPTS) and model.fixed_input_size() == (32, 32) and model.grid((32, 32)) == GRID
    assert model.default_cam_layers() == ["visual.trunk.blocks.2.norm1"]
    assert set(model.unsupported_methods()) == {"attnlrp", "cp-lrp"}
    check_logits_are_the_models(model, x, cap["logits"], cap["own"])
    check_capture_keeps_the_logits(model, x, cap["A"], grad=True)
    recorder = AttentionRecorder()
    with torch.no_grad(), model.capture(recorder):
        model.logits(x)
    if timm_setup["kind"] == "siglip":  # the pooling attention of each image is its readout row
        np.testing.assert_allclose(recorder.readout.numpy(), cap["readout"], rtol=0, atol=1e-12)
        assert np.abs(cap["readout"][0] - cap["readout"][1]).max() > 1e-2
    else:
        assert recorder.readout is None
        np.testing.assert_array_equal(model.readout_weights(17, dtype=torch.float64).numpy(),
                                      readout_vector("cls", 1, 17))


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}".replace(" ", "") for m, p in CASES])
def test_timm_tower_matches_independent_float64_reference(timm_setup, method, params):
    check_per_image_reference(timm_setup["model"], timm_setup["x"], method, params, TARGETS, timm_setup["cap"],
                              timm_setup["prefix"], GRID)


def test_timm_tower_gradcam_prompts_and_batches(timm_setup):
    model, x = timm_setup["model"], timm_setup["x"]
    check_gradcam_formula(model, x, TARGETS, timm_setup["cap"]["cam"], GRID, prefix=timm_setup["prefix"])
    check_two_prompts_differ(model, x[:1], torch.tensor([[0, 5]]), ["legrad", "chefer", "gmar-l2"], grid=GRID)
    check_batched_equals_alone(model, x, ATTENTION_METHODS)


def test_timm_tower_model_returned_exactly_as_given_and_lrp_refused():
    module = clip_with_timm_trunk("siglip", seed=3)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    model = vitlens.load_model(module, classes=["dog", "cat"])
    assert model.module is module and model.prompts == ["a photo of a dog.", "a photo of a cat."]
    x = check_module_as_given(model, module, state, lambda m: getattr(m, "fused_attn", None))
    check_lrp_refused(model, x, "attnlrp")


# --------------------------------------------------------------------------------------------------
# CoCa
# --------------------------------------------------------------------------------------------------

def tiny_coca(seed=0, pool="tok"):
    from open_clip.coca_model import CoCa

    torch.manual_seed(seed)
    vision = dict(layers=3, width=32, head_width=8, patch_size=8, image_size=32, mlp_ratio=2, attentional_pool=True,
                  attn_pooler_heads=4, attn_pooler_queries=6, output_tokens=True, pool_type=pool)
    decoder = dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=1, attn_pooler_heads=4)
    module = unit_init(CoCa(16, decoder, {**TEXT, "embed_cls": True, "output_tokens": True}, vision))
    with torch.no_grad():
        module.visual.attn_pool.query.normal_()
    return module.double().eval()


def coca_score(m, z, u):
    """(B, prompts) logits and (B, N) readout of a block stream z: CoCa's pooler, ln_post, pooling, proj, cosine."""
    v = m.visual
    pool, mha = v.attn_pool, v.attn_pool.attn
    B, n, _ = z.shape
    d, heads = mha.embed_dim, mha.num_heads
    q_in, kv_in = _ln(pool.query, pool.ln_q), _ln(z, pool.ln_k)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q = F.linear(q_in, mha.q_proj_weight, bq).view(1, -1, heads, d // heads).transpose(1, 2)
    k = F.linear(kv_in, mha.k_proj_weight, bk).view(B, n, heads, d // heads).transpose(1, 2)
    val = F.linear(kv_in, mha.v_proj_weight, bv).view(B, n, heads, d // heads).transpose(1, 2)
    probs = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)  # (B, heads, queries, N)
    out = _lin((probs @ val).transpose(1, 2).reshape(B, -1, d), mha.out_proj)
    out = _ln(out, v.ln_post)
    pooled, read = (out[:, 0], probs[:, :, :1]) if v.pool_type == "tok" else (out[:, 1:].mean(1), probs[:, :, 1:])
    return similarity(m, pooled @ v.proj, u), read.mean(dim=(1, 2))


def coca_capture(module, x, targets):
    u = prompt_embeddings(module)
    (logits, readout), attentions, outputs, normed = explicit_forward(module, x, lambda m, z: coca_score(m, z, u))
    torch.testing.assert_close(logits, own_logits(module, x), rtol=0, atol=1e-10)

    def score(m, z):
        return coca_score(m, z, u)[0]

    def mean_score(m, z):
        return score(m, z.mean(dim=1, keepdim=True).expand_as(z))

    cap = reference_gradients(module, targets, logits, attentions, outputs, normed, score, mean_score)
    return {**cap, "readout": readout.detach().numpy()}


@pytest.fixture(scope="module", params=["tok", "avg"])
def coca_setup(request):
    module = tiny_coca(seed=4, pool=request.param)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6)).double()
    return {"module": module, "x": x, "cap": coca_capture(module, x, TARGETS),
            "model": vitlens.load_model(copy.deepcopy(module), prompts=PROMPTS)}


def test_coca_facts_logits_and_pooler_readout(coca_setup):
    model, x, cap = coca_setup["model"], coca_setup["x"], coca_setup["cap"]
    assert model.family == "open-clip" and model.attention_pooled and model.num_layers == 3
    assert model.num_prefix_tokens == 1 and model.default_cam_layers() == ["visual.transformer.resblocks.2.ln_1"]
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), own_logits(coca_setup["module"], x), rtol=0, atol=1e-12)
    check_capture_keeps_the_logits(model, x, cap["A"], grad=False)
    recorder = AttentionRecorder()
    with torch.no_grad(), model.capture(recorder):
        model.logits(x)
    np.testing.assert_allclose(recorder.readout.numpy(), cap["readout"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(cap["readout"].sum(-1), 1.0, atol=1e-12)
    assert np.abs(cap["readout"] - 1.0 / 17).max() > 1e-2  # a real probe, not the uniform outside a capture
    np.testing.assert_allclose(model.readout_weights(17, dtype=torch.float64).numpy(), np.full(17, 1.0 / 17))


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}".replace(" ", "") for m, p in CASES])
def test_coca_matches_independent_float64_reference(coca_setup, method, params):
    check_per_image_reference(coca_setup["model"], coca_setup["x"], method, params, TARGETS, coca_setup["cap"], 1, GRID)


def test_coca_gradcam_prompts_and_batches(coca_setup):
    model, x = coca_setup["model"], coca_setup["x"]
    check_gradcam_formula(model, x, TARGETS, coca_setup["cap"]["cam"], GRID)
    check_two_prompts_differ(model, x[:1], torch.tensor([[0, 5]]), ["legrad", "chefer"], grid=GRID)
    check_batched_equals_alone(model, x, ATTENTION_METHODS)


def test_coca_untested_poolers_are_refused_in_one_line():
    from open_clip.coca_model import CoCa

    vision = dict(layers=1, width=32, head_width=8, patch_size=8, image_size=32, attentional_pool="parallel",
                  attn_pooler_heads=4, attn_pooler_queries=4, output_tokens=True)
    decoder = dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=1, attn_pooler_heads=4)
    module = CoCa(16, decoder, {**TEXT, "embed_cls": True, "output_tokens": True}, vision).eval()
    with pytest.raises(ModelError, match="attentional pooling 'parallel'") as info:
        vitlens.load_model(module, prompts=PROMPTS[:2])
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# convolutional towers: the Grad-CAM family, against pytorch-grad-cam
# --------------------------------------------------------------------------------------------------

def clip_with_conv_tower(kind, seed=0):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    if kind == "resnet":  # OpenAI's ModifiedResNet (RN50's design, one bottleneck per stage)
        vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, head_width=8, image_size=128)
    else:
        vision = CLIPVisionCfg(timm_model_name="convnext_atto", timm_pool="avg", timm_proj="linear", image_size=64)
    module = CLIP(16, vision, CLIPTextCfg(**TEXT))
    with torch.no_grad():  # OpenAI's init zeroes each bottleneck's last norm: give the residual branches a signal
        for m in module.visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    return module.eval()


class PromptLogits(torch.nn.Module):
    """What a pytorch-grad-cam user writes for CLIP: a module whose output is the prompt logits."""

    def __init__(self, clip, prompts):
        super().__init__()
        self.clip, self.u = clip, prompt_embeddings(clip, prompts)

    def forward(self, x):
        return similarity(self.clip, self.clip.encode_image(x), self.u)


CONV_TOWERS = {"resnet": ("visual.layer4", (4, 4)), "convnext": ("visual.trunk.stages.2", (4, 4))}


def pgc_cam(method, module, layer, x, targets):
    """pytorch-grad-cam's map of ``method`` on the prompt logits (a module, as its CLIP users write it)."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from vitlens.models.layers import find_module

    cam_class = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
                 "layercam": pgc.LayerCAM}[method]
    with cam_class(model=PromptLogits(module, PROMPTS), target_layers=[find_module(module, layer)]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])


@pytest.fixture(scope="module", params=list(CONV_TOWERS))
def conv_case(request):
    """A conv-tower CLIP, three images and for each the first prompt whose Grad-CAM is not empty (a random tower's
    class-weighted sum is often negative everywhere, which the ReLU of every CAM leaves as nothing to compare)."""
    pytest.importorskip("pytorch_grad_cam")
    module = clip_with_conv_tower(request.param, seed=1)
    model = vitlens.load_model(module, prompts=PROMPTS)
    x = torch.randn(3, 3, *model.preprocess.input_size, generator=torch.Generator().manual_seed(2))
    layer, grid = CONV_TOWERS[request.param]
    targets = []
    for image in x:
        maps = pgc_cam("gradcam", module, layer, image[None].expand(len(PROMPTS), -1, -1, -1), range(len(PROMPTS)))
        targets.append(int(np.flatnonzero(np.ptp(maps, axis=(1, 2)) > 0.5)[0]))
    return {"kind": request.param, "module": module, "model": model, "x": x, "targets": targets, "layer": layer,
            "grid": grid}


@pytest.mark.parametrize("method", CAM_METHODS)
def test_conv_tower_cams_equal_pytorch_grad_cam(conv_case, method):
    from vitlens.models.openclip import OpenClipConvTower

    model, x, targets, layer = conv_case["model"], conv_case["x"], conv_case["targets"], conv_case["layer"]
    assert isinstance(model, OpenClipConvTower) and not model.has_attention and model.num_classes == len(PROMPTS)
    theirs = pgc_cam(method, conv_case["module"], layer, x, targets)
    ours = vitlens.explain(model, x, methods=[method], target=targets, params={method: {"layers": [layer]}})
    assert ours.patch_maps[method].shape == (3, 1, *conv_case["grid"])
    assert np.ptp(theirs, axis=(1, 2)).min() > 0.5  # maps with content
    np.testing.assert_allclose(ours.maps[method][:, 0].numpy(), theirs, atol=5e-5)  # float32 rounding, min-maxed


def test_conv_tower_batched_equals_one_at_a_time(conv_case):
    model = vitlens.load_model(copy.deepcopy(conv_case["module"]).double(), prompts=PROMPTS)
    x, targets = conv_case["x"].double(), conv_case["targets"]
    batch = vitlens.explain(model, x, methods=CAM_METHODS, target=targets)
    for i, target in enumerate(targets):
        alone = vitlens.explain(model, x[i:i + 1], methods=CAM_METHODS, target=target)
        for name in CAM_METHODS:
            assert_scaled_close(batch.patch_maps[name][i].numpy(), alone.patch_maps[name][0].numpy(), rel=1e-9)


@pytest.mark.parametrize("kind", ["resnet", "convnext"])
def test_conv_tower_defaults_and_refusals(kind):
    module = clip_with_conv_tower(kind, seed=5).double()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    model = vitlens.load_model(module, prompts=PROMPTS)
    assert model.module is module and model.num_layers == 0
    size = model.preprocess.input_size
    if kind == "resnet":  # attnpool's position embedding is one grid's
        assert size == model.fixed_input_size() == (128, 128) and model.default_cam_layers() == ["visual.layer4"]
    else:
        assert model.fixed_input_size() is None and model.default_cam_layers()[0].startswith("visual.trunk.")
    with torch.no_grad():
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        torch.testing.assert_close(model.logits(x), own_logits(module, x), rtol=0, atol=1e-12)
    with pytest.raises(MethodError, match="method 'rollout' needs attention maps") as info:
        vitlens.explain(model, x, methods=["rollout"])
    assert "\n" not in str(info.value)
    assert set(vitlens.explain(model, x, methods="all").maps) == set(CAM_METHODS)
    for name, value in module.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_convnext_tower_takes_a_non_square_input():
    module = clip_with_conv_tower("convnext", seed=6)
    model = vitlens.load_model(module, prompts=PROMPTS[:2])
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    layer = "visual.trunk.stages.2"
    result = vitlens.explain(model, x, methods=["gradcam"], target=[0, 1], params={"gradcam": {"layers": [layer]}})
    assert result.patch_maps["gradcam"].shape == (2, 1, 4, 6)
    # the formula on the activation and gradient of that layer, taken with a hook on the model's own forward
    from vitlens.models.layers import find_module

    saved = {}
    handle = find_module(module, layer).register_forward_hook(lambda m, i, o: saved.setdefault("a", o))
    try:
        logits = PromptLogits(module, PROMPTS[:2])(x)
    finally:
        handle.remove()
    g = torch.autograd.grad(logits[:, :2].diagonal().sum(), saved["a"])[0]
    expected = (g.mean(dim=(2, 3), keepdim=True) * saved["a"]).sum(1).clamp_min(0)
    assert_scaled_close(result.patch_maps["gradcam"][:, 0].numpy(), expected.detach().numpy(), rel=1e-5)


def test_unsupported_tower_is_one_line():
    module = clip_with_conv_tower("resnet")
    module.visual = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ModelError, match="unsupported OpenCLIP image tower Sequential") as info:
        vitlens.load_model(module, prompts=PROMPTS[:2])
    assert "\n" not in str(info.value)


def test_a_tokenizer_the_hub_must_give_fails_in_one_line_before_the_model_is_built(monkeypatch, tmp_path):
    """OpenCLIP's SigLIP models tokenize with a Hugging Face tokenizer fetched from the hub, even with local weights."""
    built = []

    def offline(arch):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files,\nand couldn't find them")

    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: built.append(a))
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    with pytest.raises(ModelError, match="cannot fetch the tokenizer of 'open_clip:ViT-B-16-SigLIP'") as info:
        vitlens.load_model("open_clip:ViT-B-16-SigLIP", weights=weights, prompts=["a dog"])
    assert "\n" not in str(info.value) and "tokenizer=" in str(info.value) and not built
