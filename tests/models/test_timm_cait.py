"""timm CaiT read by its own adapter, every method checked in float64 against computations without vitlens.

Tiny random-init ``cait_*`` models (32x32 input, 8x8 patches: P = 16, N = 1 + 16; two talking-heads
patch blocks, two class-attention blocks) with O(1) weights, layer-scale gammas and a ``proj_w``
near the identity with real mixing, so that the talking heads and the class attention shape the
logits. The reference reads the model's own modules with plain forward hooks on a deep copy: each
``TalkingHeadAttn.attn_drop`` output (the post-softmax, post-``proj_w`` tensor that multiplies the
values, (B, K, P, P)) and each ``ClassAttn.attn_drop`` output (unfused: the class row, (B, K, 1, N)),
gradients by plain autograd. The documented reading (docs/methods.md, "timm CaiT") is restated here in
numpy: the patch-stage layers embedded as ``[[1, 0], [0, A]]``, the class-attention layers as the
identity with the class row replaced, gradients zero outside; the method formulas are
tests/methods/general_reference.py's (test_methods_reference.py's with a general readout), and rollout
and Chefer are also stated in block form (``rho[1:] R_P``) without any (N, N) embedding.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import vitlens
from tests.methods.general_reference import (general_reference, readout_vector,
                                             rownorm)
from tests.methods.test_methods_reference import assert_scaled_close
from tests.models.family_checks import (check_batched_equals_alone, check_bystander_untouched,
                                        check_gradient_checkpointing_restored, check_module_as_given, explain_one)
from vitlens.errors import MethodError, ModelError
from vitlens.models import AttentionRecorder
from vitlens.models.cnn import is_cnn
from vitlens.models.registry import find_family
from vitlens.models.timm_cait import TimmCait, is_timm_cait

TARGETS = [3, 7]
GRID = (4, 4)
P = 16
N = 1 + P
HEADS = 4
DEPTH, DEPTH_TOKEN_ONLY = 2, 2
LAYERS = DEPTH + DEPTH_TOKEN_ONLY


def tiny_cait(seed=0, unit_scale=True, **kwargs):
    """A small timm CaiT in float64, eval mode; ``unit_scale``: O(1) weights, biases and gammas."""
    import timm

    torch.manual_seed(seed)
    options = dict(img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=HEADS,
                   depth_token_only=DEPTH_TOKEN_ONLY, mlp_ratio=2.0, mlp_ratio_token_only=2.0, num_classes=10)
    options.update(kwargs)
    module = timm.create_model("cait_xxs24_224", pretrained=False, **options)
    if unit_scale:  # timm's layer scale starts at 1e-5: the blocks would barely touch the stream
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("proj_w.weight"):
                    # near the identity, so that the mixed rows sum to about 1, but really mixing
                    p.copy_(torch.eye(p.shape[0]) + 0.3 * torch.randn(p.shape))
                elif name.endswith("proj_w.bias"):
                    p.normal_(std=0.01)
                elif name.split(".")[-1] in ("gamma_1", "gamma_2"):
                    p.uniform_(0.5, 1.5)
                elif name.endswith("bias"):
                    p.normal_(std=0.1)
                elif name == "cls_token":
                    p.normal_()
                elif name == "pos_embed":
                    p.normal_(std=0.5)
                elif p.dim() >= 2:
                    p.normal_(std=p[0].numel() ** -0.5)
    return module.double().eval()


MODELS = {"token": {}, "avg": {"global_pool": "avg"}}


# --------------------------------------------------------------------------------------------------
# independent capture (no vitlens code)
# --------------------------------------------------------------------------------------------------

def class_stage(m, z):
    """Cait.forward_cls written out: the class token through every class-attention block, prepended."""
    cls = m.cls_token.expand(z.shape[0], -1, -1)
    for blk in m.blocks_token_only:
        cls = blk(z, cls)
    return torch.cat((cls, z), dim=1)


def pooled_logits(m, tokens):
    """norm, then the class token or the patch mean, then the head: the model's classifier on [cls, patches]."""
    n = m.norm(tokens)
    return m.head(n[:, 1:].mean(dim=1) if m.global_pool == "avg" else n[:, 0])


def embed_patch(a, corner):
    """(B, K, P, P) -> (B, K, N, N) with ``a`` on the patch block and ``corner`` at the class entry."""
    e = np.zeros(a.shape[:2] + (N, N))
    e[:, :, 0, 0] = corner
    e[:, :, 1:, 1:] = a
    return e


def embed_class(a, identity):
    """(B, K, 1, N) -> (B, K, N, N): row 0 = the class row, patch rows the identity's (or zero)."""
    e = np.zeros(a.shape[:2] + (N, N))
    e[:, :, 0, :] = a[:, :, 0]
    if identity:
        for i in range(1, N):
            e[:, :, i, i] = 1.0
    return e


def embed(layer, a, grad=False):
    if layer < DEPTH:
        return embed_patch(a, 0.0 if grad else 1.0)
    return embed_class(a, identity=not grad)


def reference_capture(module, x, targets, cam_layers=("blocks.1.norm1", "blocks_token_only.1.norm1")):
    m = copy.deepcopy(module).eval()
    attentions, softmaxed, patch_states, class_states, cams, handles = [], [], [], [], {}, []

    def keep(mod, inputs, output):
        output.retain_grad()
        attentions.append(output)

    for blk in m.blocks:
        handles.append(blk.attn.attn_drop.register_forward_hook(keep))  # after proj_w: multiplies v
        handles.append(blk.attn.proj_w.register_forward_hook(lambda mod, i, o: softmaxed.append(i[0])))
        handles.append(blk.register_forward_hook(lambda mod, i, o: patch_states.append(o)))
    for blk in m.blocks_token_only:
        blk.attn.fused_attn = False  # the unfused path materialises the class row
        handles.append(blk.attn.attn_drop.register_forward_hook(keep))
        handles.append(blk.register_forward_hook(lambda mod, i, o: class_states.append(o)))
    for name in cam_layers:
        handles.append(m.get_submodule(name).register_forward_hook(lambda mod, i, o, name=name: cams.update({name: o})))
    logits = m(x)
    for h in handles:  # the LeGrad scores below run the class-attention blocks again
        h.remove()
    assert len(attentions) == LAYERS and len(patch_states) == DEPTH and len(class_states) == DEPTH_TOKEN_ONLY
    t = torch.tensor(targets).view(-1, 1)
    # the plain backward first: a retain_grad() tensor also accumulates into .grad during the
    # autograd.grad calls below that pass through it
    score = logits.gather(1, t).sum()
    score.backward(retain_graph=True)
    # with average pooling the class token, and so class attention, never reaches the logit: zero gradient
    grads = [np.zeros(a.shape) if a.grad is None else a.grad.detach().numpy().copy() for a in attentions]
    names = list(cam_layers)
    cam_grads = _grads(score, [cams[n] for n in names])
    final = patch_states[-1]
    # a layer's token states: a patch layer's P patches; a class-attention layer's [cls^l, final patches]
    states = patch_states + [torch.cat((c, final), dim=1) for c in class_states]
    layer_grads = {}
    for layer, (z, a) in enumerate(zip(states, attentions)):
        # 'model': a patch layer is read through the class-attention stage (no class token yet)
        model_score = pooled_logits(m, class_stage(m, z) if layer < DEPTH else z)
        mean_score = m.head(m.norm(z.mean(dim=1)))
        for pool, s in (("model", model_score), ("mean", mean_score)):
            g = _grads(s.gather(1, t).sum(), [a])[0].numpy()
            layer_grads[(pool, layer)] = embed(layer, g, grad=True)
    # the written-out classifier is the model's own, from either stage's last layer
    for z in (class_stage(m, final), states[-1]):
        assert torch.allclose(pooled_logits(m, z), logits, atol=1e-12, rtol=0)
    raw = [a.detach().numpy().copy() for a in attentions]
    return {"raw": raw, "raw_grads": grads,
            "A": [embed(layer, a) for layer, a in enumerate(raw)],
            "G": [embed(layer, g, grad=True) for layer, g in enumerate(grads)],
            "LG": layer_grads, "logits": logits.detach(),
            "softmax": [q.detach().permute(0, 3, 1, 2).numpy() for q in softmaxed],
            "cam": {n: (cams[n].detach(), g.detach()) for n, g in zip(names, cam_grads)}}


def _grads(score, tensors):
    grads = torch.autograd.grad(score, tensors, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


def assert_close_or_zero(actual, expected):
    """assert_scaled_close, or both exactly zero where the reference is (class attention, average pooling)."""
    if np.abs(expected).max() == 0:
        assert np.abs(np.asarray(actual)).max() == 0
    else:
        assert_scaled_close(actual, expected)


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def setup(request):
    module = tiny_cait(seed=len(request.param), **MODELS[request.param])
    x = torch.randn(len(TARGETS), 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return {"module": module, "model": vitlens.load_model(copy.deepcopy(module)), "x": x,
            "cap": reference_capture(module, x, TARGETS), "pool": module.global_pool}


# --------------------------------------------------------------------------------------------------
# 1. the family, its facts, capture
# --------------------------------------------------------------------------------------------------

def test_family_and_facts(setup):
    model, module = setup["model"], setup["module"]
    assert isinstance(model, TimmCait) and model.family == "timm-cait"
    assert is_timm_cait(module) and is_cnn(module)  # the Conv2d patch embedding: why CaiT fell to the CNN adapter
    assert find_family(module, "image").name == "timm-cait"
    assert model.num_layers == LAYERS and model.num_classes == 10 and model.num_prefix_tokens == 1
    assert model.patch_size == (8, 8) and model.grid((32, 32)) == GRID and model.fixed_input_size() == (32, 32)
    assert model.block_norm_names() == ["blocks.0.norm1", "blocks.1.norm1"]
    assert model.default_cam_layers() == ["blocks.1.norm1"]
    assert model.spatial_layer_names()[-2:] == ["blocks_token_only.0.norm1", "blocks_token_only.1.norm1"]
    np.testing.assert_array_equal(model.readout_weights(N, dtype=torch.float64).numpy(),
                                  readout_vector(setup["pool"], 1, N))
    assert model.preprocess.input_size == (32, 32) and model.preprocess.crop_pct == 1.0


@pytest.mark.parametrize("grad", [True, False])
def test_capture_keeps_the_logits_and_records_the_models_own_attention(setup, grad):
    model, x, cap = setup["model"], setup["x"], setup["cap"]
    assert all(block.attn.fused_attn for block in model.module.blocks_token_only)  # timm's default: SDPA
    with torch.no_grad():
        plain = model.logits(x)
    torch.testing.assert_close(plain, cap["logits"], rtol=0, atol=1e-10)
    recorder = AttentionRecorder()
    with torch.set_grad_enabled(grad), model.capture(recorder):
        captured = model.logits(x)
    assert (captured - plain).abs().max() <= 1e-10
    assert len(recorder.attentions) == LAYERS
    for layer, (mine, theirs) in enumerate(zip(recorder.attentions, cap["raw"])):
        assert mine.shape == (2, HEADS, N, N)
        mine = mine.detach().numpy()
        if layer < DEPTH:  # the hooked talking-heads tensor on the patch block, identity at the class entry
            np.testing.assert_allclose(mine[:, :, 1:, 1:], theirs, rtol=0, atol=1e-12)
            assert (mine[:, :, 0, 0] == 1).all() and (mine[:, :, 0, 1:] == 0).all() and (mine[:, :, 1:, 0] == 0).all()
        else:  # the hooked class row; the patch rows the identity's
            np.testing.assert_allclose(mine[:, :, :1], theirs, rtol=0, atol=1e-12)
            np.testing.assert_array_equal(mine[:, :, 1:], np.broadcast_to(np.eye(N)[1:], mine[:, :, 1:].shape))
        np.testing.assert_allclose(mine, cap["A"][layer], rtol=0, atol=1e-12)


def test_the_recorded_talking_heads_tensor_is_the_mixture_after_the_softmax(setup):
    """What is recorded is proj_w(softmax(...)): not the softmax, and its rows sum to sum_g W_w + P b_w."""
    cap, module = setup["cap"], setup["module"]
    for layer in range(DEPTH):
        mixed, softmax = cap["raw"][layer], cap["softmax"][layer]
        np.testing.assert_allclose(softmax.sum(-1), 1.0, atol=1e-12)
        assert np.abs(mixed - softmax).max() > 0.05  # the talking heads really mix
        w = module.blocks[layer].attn.proj_w.weight.detach().numpy()
        b = module.blocks[layer].attn.proj_w.bias.detach().numpy()
        np.testing.assert_allclose(mixed, np.einsum("hg,bgij->bhij", w, softmax) + b[None, :, None, None],
                                   rtol=0, atol=1e-12)
        expected_sums = w.sum(1) + P * b
        np.testing.assert_allclose(mixed.sum(-1), np.broadcast_to(expected_sums[None, :, None], (2, HEADS, P)),
                                   rtol=0, atol=1e-12)
        assert np.abs(expected_sums - 1).max() > 0.05  # not a probability distribution
    # the class rows are softmax rows
    for a in cap["raw"][DEPTH:]:
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-12)


def test_gradients_with_respect_to_the_recorded_tensors(setup):
    """d(score)/d(recorded) is the hooked attention's gradient on its block, and zero elsewhere."""
    model, x, cap = setup["model"], setup["x"], setup["cap"]
    recorder = AttentionRecorder()
    with model.capture(recorder):
        logits = model.logits(x)
    grads = torch.autograd.grad(logits.gather(1, torch.tensor(TARGETS).view(-1, 1)).sum(), recorder.attentions)
    for layer, (mine, theirs) in enumerate(zip(grads, cap["G"])):
        if setup["pool"] == "avg" and layer >= DEPTH:
            assert mine.abs().max() == 0 and np.abs(theirs).max() == 0
        else:
            assert_scaled_close(mine.numpy(), theirs, rel=1e-9)
        if setup["pool"] == "token" or layer < DEPTH:
            assert (theirs > 0).any() and (theirs < 0).any()


# --------------------------------------------------------------------------------------------------
# 2. every supported method == the independent float64 computation
# --------------------------------------------------------------------------------------------------

CASES = [("attention", {}), ("attention", {"layer": 2})]
CASES += [("rollout", {"head_fusion": f, "discard_ratio": d}) for f in ("mean", "max", "min") for d in (0.0, 0.5)]
CASES += [("rollout", {"start_layer": 1, "residual": 0.5})]
CASES += [("gmar-l1", {}), ("gmar-l2", {}), ("gmar-l2", {"residual": 0.5, "start_layer": 1})]
CASES += [("gmar++", {"norm": n, "normalize": z}) for n in ("l1", "l2") for z in ("none", "layer")]
CASES += [("legrad", {"layers": la, "pool": p}) for la in ("all", 1, [0, 1], [1, 3]) for p in ("model", "mean")]
CASES += [("chefer", {}), ("chefer", {"start_layer": 1})]


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}".replace(" ", "") for m, p in CASES])
def test_matches_independent_float64_reference(setup, method, params):
    cap = setup["cap"]
    actual, full = explain_one(setup["model"], setup["x"], method, params, TARGETS, GRID)
    expected = general_reference(method, full, cap, readout_vector(setup["pool"], 1, N))
    assert_close_or_zero(actual.numpy(), expected)
    # with average pooling a read of the class-attention layers alone is constant: the patch rows of class
    # attention are the identity's, and the logit does not depend on the class token (zero gradients)
    constant = setup["pool"] == "avg" and (method == "attention" or (method == "legrad" and params["layers"] == 1
                                                                     and params["pool"] == "model"))
    if not constant:
        assert np.abs(expected[0] - expected[1]).max() > 1e-3 * np.abs(expected).max()


def block_reading(cap, b, pool, patch_step, class_row):
    """The documented reading without any (N, N) matrix: ``R_P`` composed over the patch stage, ``rho``
    the class row composed over the class-attention stage, map = rho[1:] R_P (class readout) or the
    mean of R_P's rows (average pooling: the class token is never read)."""
    R_P = np.eye(P)
    for layer in range(DEPTH):
        R_P = patch_step(cap["raw"][layer][b], cap["raw_grads"][layer][b]) @ R_P  # left multiplication
    rho = np.eye(N)[0]
    for layer in range(DEPTH, LAYERS):
        c = class_row(cap["raw"][layer][b, :, 0], cap["raw_grads"][layer][b, :, 0])  # (N,) step's class row
        rho = c[0] * rho + np.concatenate(([0.0], c[1:]))  # patch rows of the step are the identity's
    row = rho[1:] @ R_P if pool == "token" else R_P.mean(axis=0)
    return row.reshape(GRID)


def test_rollout_and_chefer_equal_the_block_reading(setup):
    """rollout: R_P = prod rownorm(mean_h A + I), class row (mean_h a + e_0) / 2 per class-attention layer;
    chefer: R_P = prod (I + mean_h relu(G * A)), class row e_0 + mean_h relu(g * a)."""
    cap, pool = setup["cap"], setup["pool"]
    readings = {
        "rollout": (lambda a, g: rownorm(a.mean(0) + np.eye(P)),
                    lambda a, g: (a.mean(0) + np.eye(N)[0]) / 2.0),
        "chefer": (lambda a, g: np.eye(P) + np.maximum(g * a, 0.0).mean(0),
                   lambda a, g: np.eye(N)[0] + np.maximum(g * a, 0.0).mean(0)),
    }
    result = vitlens.explain(setup["model"], setup["x"], methods=list(readings), target=TARGETS)
    for name, (patch_step, class_row) in readings.items():
        expected = np.stack([block_reading(cap, b, pool, patch_step, class_row) for b in range(2)])
        assert_scaled_close(result.patch_maps[name][:, 0].numpy(), expected)


def test_attention_of_a_patch_layer_is_an_empty_class_row(setup):
    """The class token does not attend in the patch stage: its row there is the identity's, no patch."""
    result = vitlens.explain(setup["model"], setup["x"], methods=["attention"], params={"attention": {"layer": 0}})
    if setup["pool"] == "token":
        assert (result.patch_maps["attention"] == 0).all()
    else:  # average pooling reads the patch rows: the talking-heads attention itself
        expected = cap_mean_rows(setup["cap"]["raw"][0])
        assert_scaled_close(result.patch_maps["attention"][:, 0].numpy(), expected)


def cap_mean_rows(a):
    return a.mean(axis=1).mean(axis=1).reshape(-1, *GRID)


def test_reference_capture_is_not_degenerate(setup):
    cap = setup["cap"]
    # LeGrad's 'model' score is the logit at the last layer of either stage; earlier layers and 'mean' differ
    for last in (DEPTH - 1, LAYERS - 1):
        np.testing.assert_allclose(cap["LG"][("model", last)], cap["G"][last], atol=1e-12)
        assert np.abs(cap["LG"][("mean", last)] - cap["G"][last]).max() > 1e-6
    assert np.abs(cap["LG"][("model", 0)] - cap["G"][0]).max() > 1e-6
    if setup["pool"] == "token":
        assert np.abs(cap["LG"][("model", DEPTH)] - cap["G"][DEPTH]).max() > 1e-6
    # rollout's row normalisation divides by positive sums for every head fusion (proj_w near the identity)
    for a in cap["A"][:DEPTH]:
        for fuse in (np.mean, np.max, np.min):
            assert (fuse(a, axis=1).sum(-1) + 1 > 0.1).all()


def test_layer_logits_read_each_stage(setup):
    """The adapter's LeGrad scores: the logit from the last layer of either stage; 'mean' is head(norm(mean))."""
    model, x = setup["model"], setup["x"]
    recorder = AttentionRecorder(keep_block_outputs=True)
    with torch.no_grad(), model.capture(recorder):
        logits = model.logits(x)
    outputs = recorder.block_outputs
    assert [tuple(o.shape) for o in outputs] == [(2, P, 32)] * DEPTH + [(2, N, 32)] * DEPTH_TOKEN_ONLY
    m = setup["module"]
    with torch.no_grad():
        for last in (DEPTH - 1, LAYERS - 1):
            torch.testing.assert_close(model.layer_logits(outputs[last]), logits, rtol=0, atol=1e-12)
        for z in outputs:
            torch.testing.assert_close(model.layer_logits(z, pool="mean"), m.head(m.norm(z.mean(dim=1))),
                                       rtol=0, atol=1e-12)
        assert not torch.allclose(model.layer_logits(outputs[0]), logits, atol=1e-3)
    with pytest.raises(MethodError, match="unknown pool"):
        model.layer_logits(outputs[0], pool="max")


def test_gradcam_layers_match_hooks(setup):
    """Grad-CAM on the last patch block's norm1 (P tokens, no prefix: the default) and on a class-attention
    block's norm1 ([cls, patches], class token dropped) == the formula on hooked tensors."""
    for layer, prefix in (("blocks.1.norm1", 0), ("blocks_token_only.1.norm1", 1)):
        params = None if prefix == 0 else {"gradcam": {"layers": layer}}
        result = vitlens.explain(setup["model"], setup["x"], methods=["gradcam"], target=TARGETS, params=params)
        activation, gradient = setup["cap"]["cam"][layer]
        assert activation.shape[1] == prefix + P
        a = activation[:, prefix:].reshape(2, *GRID, -1).permute(0, 3, 1, 2)
        g = gradient[:, prefix:].reshape(2, *GRID, -1).permute(0, 3, 1, 2)
        expected = (g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1).clamp_min(0)
        if setup["pool"] == "avg" and prefix == 1:
            assert expected.abs().max() == 0  # class attention is not read by an average-pooled head
        assert_close_or_zero(result.patch_maps["gradcam"][:, 0].numpy(), expected.numpy())


# --------------------------------------------------------------------------------------------------
# 3. refusals, batches, the model as given
# --------------------------------------------------------------------------------------------------

def test_lrp_is_refused_in_one_line_and_left_out_of_all(setup):
    for name in ("attnlrp", "cp-lrp"):
        with pytest.raises(MethodError, match=f"method '{name}': timm CaiT's talking-heads attention") as info:
            vitlens.explain(setup["model"], setup["x"], methods=[name])
        assert "\n" not in str(info.value)
    result = vitlens.explain(setup["model"], setup["x"], methods="all", target=TARGETS)
    assert "attnlrp" not in result.methods and "cp-lrp" not in result.methods
    assert {"rollout", "legrad", "chefer", "gradcam"} <= set(result.methods)


ALL = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "gradcam", "layercam"]


def test_batched_equals_one_at_a_time(setup):
    check_batched_equals_alone(setup["model"], setup["x"], ALL)


# what timm's blocks may carry besides parameters and modes: restored after every call
TIMM_FLAGS = (lambda m: getattr(m, "fused_attn", None), lambda m: getattr(m, "grad_checkpointing", None))


def test_model_returned_exactly_as_given():
    module = tiny_cait(seed=3)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    model = vitlens.load_model(module)
    assert model.module is module
    module.blocks_token_only[1].train()  # a mixed mode of the user's own: restored after every call
    check_module_as_given(model, module, state, *TIMM_FLAGS)


def test_gradient_checkpointing_is_off_only_during_the_call():
    check_gradient_checkpointing_restored(tiny_cait(seed=4), ["rollout", "chefer", "legrad"])


def test_another_cait_inside_the_capture_is_untouched():
    check_bystander_untouched(vitlens.load_model(tiny_cait(seed=0)), tiny_cait(seed=1))


def test_float32_model_matches_its_float64_copy():
    """The default dtype: the same maps as the float64 computation, to float32 precision."""
    module = tiny_cait(seed=6)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    methods = ["rollout", "gmar-l2", "legrad", "chefer", "gradcam"]
    wide = vitlens.explain(vitlens.load_model(copy.deepcopy(module)), x, methods=methods, target=TARGETS)
    narrow = vitlens.explain(vitlens.load_model(module.float()), x.float(), methods=methods, target=TARGETS)
    for name in methods:
        assert_scaled_close(narrow.patch_maps[name].double().numpy(), wide.patch_maps[name].numpy(), rel=1e-3)


def _one_line_error(module, match):
    with pytest.raises(ModelError, match=match) as info:
        vitlens.load_model(module)
    assert "\n" not in str(info.value)


def test_unsupported_variants_are_one_line_errors():
    _one_line_error(tiny_cait(global_pool=""), "timm CaiT global_pool='' is not supported: vitlens supports token, avg")

    module = tiny_cait()

    class OddAttention(type(module.blocks[1].attn)):
        def forward(self, x):
            return super().forward(x)

    module.blocks[1].attn.__class__ = OddAttention
    _one_line_error(module, "unsupported attention implementation .*OddAttention in block 1: vitlens reads timm's "
                            "CaiT TalkingHeadAttn")

    module = tiny_cait()

    class OddClassAttention(type(module.blocks_token_only[0].attn)):
        def forward(self, x):
            return super().forward(x)

    module.blocks_token_only[0].attn.__class__ = OddClassAttention
    _one_line_error(module, "unsupported attention implementation .*OddClassAttention in blocks_token_only.0")

    class OwnCls(type(tiny_cait(depth=1))):
        def forward_cls(self, x):
            return super().forward_cls(x)

    own = tiny_cait(depth=1)
    own.__class__ = OwnCls
    _one_line_error(own, "unsupported CaiT variant OwnCls: it overrides Cait.forward_cls")

    pruned = tiny_cait()
    pruned.prune_intermediate_layers(1)
    _one_line_error(pruned, "timm CaiT global_pool='' is not supported")
