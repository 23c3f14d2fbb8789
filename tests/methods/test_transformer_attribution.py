"""transformer-attribution (Chefer et al., CVPR 2021): the paper's relevance propagation restated in float64.

The reference below is a straightforward hand-written ``relprop`` of a timm ViT, written from the rules of
docs/methods.md (and hila-chefer/Transformer-Explainability, ``modules/layers_ours.py``): per image, an
explicit forward that keeps every intermediate, then relevance from the target's one-hot backwards, module
by module, with each rule as its formula (no autograd in the relevance pass, no vitlens code):

* Linear: alpha 1 / beta 0, bias ignored: R_i = sum_j (x+_i W+_ji + x-_i W-_ji) R_j / z_j,
  z_j = sum_i x+_i W+_ji + x-_i W-_ji; every division a / (b + 1e-9), 0 where b = 0 (``safe_divide``);
* class-token selection: z-rule; LayerNorm, GELU, softmax: identity;
* A V and Q K^T: z-rule over both operands, then halved; R^A is the halved relevance at A;
* residual add a + b: z-rule, then R_a <- R_a |S_a| / (|S_a| + |S_b|) S_R / S_a (S: totals; same for b);
* the stream feeding the skip and the branch (clone): R = X (R_1 / X + R_2 / X).

The ordinary gradient d y_c / dA comes from plain autograd on that forward. Then
A_bar^l = mean_h max(G^l_h R^{A,l}_h, 0), R = (I + A_bar^L) ... (I + A_bar^s), map = R[0, 1:].
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

import vitlens
from tests.conftest import same_vit_three_layouts, tiny_timm_vit
from vitlens import cli
from vitlens.errors import MethodError
from vitlens.methods import CNN_METHODS, DEFAULT_METHODS, REGISTRY, parse_methods

EPS = 1e-9
NAME = "transformer-attribution"


def sdiv(a, b):
    return a / (b + EPS) * (b != 0)


def lin_relprop(x, weight, relevance):
    """alpha-1 beta-0 relevance of a linear layer, x (n, in), weight (out, in), relevance (n, out)."""
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    z = xp @ wp.T + xn @ wn.T
    s = sdiv(relevance, z)
    return xp * (s @ wp) + xn * (s @ wn)


def add_relprop(a, b, relevance):
    s = sdiv(relevance, a + b)
    ra, rb = a * s, b * s
    sa, sb, total = ra.sum(), rb.sum(), relevance.sum()
    fa = sdiv(sa.abs(), sa.abs() + sb.abs()) * total
    fb = sdiv(sb.abs(), sa.abs() + sb.abs()) * total
    return ra * sdiv(fa, sa), rb * sdiv(fb, sb)


def layer_norm(x, module):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias


def reference(module, x, targets, start_layer):
    """Raw transformer-attribution patch maps (B, P) of a timm ViT (class token pooling), float64."""
    maps = []
    heads = module.blocks[0].attn.num_heads
    for b in range(x.shape[0]):
        # ---- forward with every intermediate kept (attention probabilities as graph leaves for d y_c / dA)
        with torch.no_grad():
            stream = module.norm_pre(module._pos_embed(module.patch_embed(x[b:b + 1])))[0]
        saved, probs = [], []
        for block in module.blocks:
            n, dim = stream.shape
            d = dim // heads
            h1 = layer_norm(stream, block.norm1)
            qkv = h1 @ block.attn.qkv.weight.T + block.attn.qkv.bias
            q, k, v = qkv.reshape(n, 3, heads, d).permute(1, 2, 0, 3)
            dots = q @ k.transpose(-1, -2)
            a = torch.softmax(dots * block.attn.scale, dim=-1)
            probs.append(a)
            o = a @ v
            merged = o.transpose(0, 1).reshape(n, dim)
            p = merged @ block.attn.proj.weight.T + block.attn.proj.bias
            mid = stream + p
            h2 = layer_norm(mid, block.norm2)
            f1 = h2 @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
            g = torch.nn.functional.gelu(f1)
            f2 = g @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
            out = mid + f2
            saved.append(dict(x=stream, h1=h1, q=q, k=k, v=v, dots=dots, a=a, o=o, merged=merged, p=p, mid=mid,
                              h2=h2, f1=f1, g=g, f2=f2))
            stream = out
        final = layer_norm(stream, module.norm)
        cls = final[0]
        logits = cls @ module.head.weight.T + module.head.bias
        grads = torch.autograd.grad(logits[targets[b]], probs)
        # ---- relevance pass (plain tensors, formulas only)
        one_hot = torch.zeros_like(logits).detach()
        one_hot[targets[b]] = 1.0
        r_cls = lin_relprop(cls.detach()[None], module.head.weight.detach(), one_hot[None])[0]
        relevance = torch.zeros_like(final).detach()
        relevance[0] = cls.detach() * sdiv(r_cls, cls.detach())  # index-select z-rule; final norm: identity
        attention_relevance = [None] * len(saved)
        for index in reversed(range(len(saved))):
            s = {key: value.detach() for key, value in saved[index].items()}
            block = module.blocks[index]
            r_mid, r_f2 = add_relprop(s["mid"], s["f2"], relevance)
            r_g = lin_relprop(s["g"], block.mlp.fc2.weight.detach(), r_f2)
            r_h2 = lin_relprop(s["h2"], block.mlp.fc1.weight.detach(), r_g)  # GELU: identity
            r_mid = s["mid"] * (sdiv(r_mid, s["mid"]) + sdiv(r_h2, s["mid"]))  # norm2 identity, clone
            r_x, r_p = add_relprop(s["x"], s["p"], r_mid)
            n, dim = s["x"].shape
            d = dim // heads
            r_merged = lin_relprop(s["merged"], block.attn.proj.weight.detach(), r_p)
            r_o = r_merged.reshape(n, heads, d).transpose(0, 1)
            s_o = sdiv(r_o, s["o"])
            r_a = s["a"] * (s_o @ s["v"].transpose(-1, -2)) / 2
            r_v = s["v"] * (s["a"].transpose(-1, -2) @ s_o) / 2
            attention_relevance[index] = r_a
            s_dots = sdiv(r_a, s["dots"])  # softmax: identity; z-rule on q k^T (the scale does not enter)
            r_q = s["q"] * (s_dots @ s["k"]) / 2
            r_k = s["k"] * (s_dots.transpose(-1, -2) @ s["q"]) / 2
            r_qkv = torch.stack([r_q, r_k, r_v]).permute(2, 0, 1, 3).reshape(n, 3 * dim)
            r_h1 = lin_relprop(s["h1"], block.attn.qkv.weight.detach(), r_qkv)
            relevance = s["x"] * (sdiv(r_x, s["x"]) + sdiv(r_h1, s["x"]))  # norm1 identity, clone
        # ---- the rule: clamp before the head mean, unnormalised rollout from start_layer, CLS row
        n = saved[0]["x"].shape[0]
        rollout = torch.eye(n, dtype=torch.float64)
        for layer in range(start_layer % len(saved), len(saved)):
            a_bar = (grads[layer] * attention_relevance[layer]).clamp(min=0).mean(dim=0)
            rollout = (torch.eye(n, dtype=torch.float64) + a_bar) @ rollout
        maps.append(rollout[0, module.num_prefix_tokens:].detach().numpy())
    return np.stack(maps)


def random_vit(seed):
    """A tiny timm ViT whose biases, LayerNorm affines, class token and head are all non-trivial."""
    module = tiny_timm_vit(seed=seed).double()
    with torch.no_grad():
        module.head.weight.normal_(std=0.5)
        module.cls_token.normal_(std=0.5)
        for name, param in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return module


@pytest.mark.parametrize("start_layer", [0, 1, -1])
def test_matches_float64_relprop(start_layer):
    targets = [3, 7, 1]
    for seed in range(2):
        module = random_vit(seed)
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 10)).double()
        expected = reference(copy.deepcopy(module), x, targets, start_layer)
        ours = vitlens.explain(vitlens.load_model(module), x, methods=[NAME], target=targets,
                               params={NAME: {"start_layer": start_layer}}).patch_maps[NAME][:, 0]
        assert ours.dtype == torch.float64
        ours = ours.flatten(1).numpy()
        scale = np.abs(expected).max(axis=1, keepdims=True)
        # relative to each map: the rollout's identity is not in the patch columns, so the map is the signal
        assert (np.abs(ours - expected) / scale).max() < 1e-6
        assert (expected.std(axis=1) > 1e-3 * scale[:, 0]).all()  # not a constant map


def test_not_the_same_as_chefer_or_a_plain_gradient_rollout():
    """The relevance pass matters: with A in place of R^A (ICCV 2021's rule) the maps differ."""
    module = random_vit(5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)).double()
    result = vitlens.explain(vitlens.load_model(module), x, methods=[NAME, "chefer"], target=[2, 4],
                             params={NAME: {"start_layer": 0}})
    ours, generic = result.patch_maps[NAME], result.patch_maps["chefer"]
    assert not torch.allclose(ours / ours.amax((-2, -1), keepdim=True),
                              generic / generic.amax((-2, -1), keepdim=True), atol=1e-3)


def test_start_layer_default_and_skipped_layers():
    assert REGISTRY[NAME].defaults == {"start_layer": 1}
    module = random_vit(1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)).double()
    model = vitlens.load_model(module)
    default = vitlens.explain(model, x, methods=[NAME], target=[1, 2]).patch_maps[NAME]
    explicit = vitlens.explain(model, x, methods=[NAME], target=[1, 2], params={NAME: {"start_layer": 1}})
    assert torch.equal(default, explicit.patch_maps[NAME])
    np.testing.assert_allclose(default[:, 0].flatten(1).numpy(), reference(module, x, [1, 2], 1), rtol=0,
                               atol=1e-6 * float(default.abs().max()))
    last = vitlens.explain(model, x, methods=[NAME], target=[1, 2], params={NAME: {"start_layer": 2}})
    negative = vitlens.explain(model, x, methods=[NAME], target=[1, 2], params={NAME: {"start_layer": -1}})
    assert torch.equal(last.patch_maps[NAME], negative.patch_maps[NAME])
    assert not torch.allclose(last.patch_maps[NAME], default)


def test_batched_equals_alone_and_top2_slots():
    model = vitlens.load_model(tiny_timm_vit(seed=2))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    batch = vitlens.explain(model, x, methods=[NAME, "chefer"], target="top2")
    assert batch.patch_maps[NAME].shape == (3, 2, 4, 4)
    for i in range(3):
        for slot in range(2):
            target = int(batch.targets[i, slot])
            alone = vitlens.explain(model, x[i:i + 1], methods=[NAME], target=target)
            torch.testing.assert_close(batch.patch_maps[NAME][i, slot], alone.patch_maps[NAME][0, 0],
                                       atol=1e-6 * float(batch.patch_maps[NAME][i, slot].abs().max()), rtol=1e-5)


def test_same_map_on_timm_hugging_face_and_torchvision_copies():

    timm_module, hf, tv = same_vit_three_layouts(seed=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    maps = [vitlens.explain(m, x, methods=[NAME], target=[1, 6], params={NAME: {"start_layer": 0}}).patch_maps[NAME]
            for m in (timm_module, hf, tv)]
    scale = float(maps[0].abs().max())
    assert scale > 0
    for other in maps[1:]:
        torch.testing.assert_close(other, maps[0], atol=1e-4 * scale, rtol=0)


def test_explain_leaves_the_model_as_it_was():
    module = tiny_timm_vit(seed=3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = module(x)
    forwards = {name: "forward" in sub.__dict__ for name, sub in module.named_modules()}
    vitlens.explain(module, x, methods=[NAME])
    assert {name: "forward" in sub.__dict__ for name, sub in module.named_modules()} == forwards
    assert torch.equal(module(x), before)
    assert torch.overrides._get_current_function_mode_stack() == []  # the residual-add mode is gone


def test_refused_like_attnlrp():
    from tests.methods.test_rise import tiny_cnn

    with pytest.raises(MethodError, match=f"'{NAME}' needs attention maps"):
        parse_methods(NAME, vitlens.load_model(tiny_cnn()))
    cait = vitlens.load_model(tiny_timm_vit(name="cait_xxs24_224", depth=2))
    with pytest.raises(MethodError, match=f"method '{NAME}': its LRP relevance pass is refused as AttnLRP is: "):
        parse_methods(NAME, cait)
    assert NAME not in parse_methods("all", vitlens.load_model(tiny_timm_vit()))
    assert NAME not in DEFAULT_METHODS and NAME not in CNN_METHODS
    from vitlens.text.task import parse_text_methods

    with pytest.raises(MethodError, match="not available for text models"):
        parse_text_methods(NAME)


def test_post_norm_blocks_are_a_one_line_error():
    from tests.models.test_torch_attention import user_vit

    model = vitlens.load_model(user_vit(seed=3, norm_first=False, final_norm=None))
    with pytest.raises(MethodError, match="found 0 residual connections .* not pre-norm residual blocks") as info:
        vitlens.explain(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), methods=[NAME])
    assert "\n" not in str(info.value)


def test_sequence_first_layout_gives_the_same_maps():
    from tests.models.test_torch_attention import user_vit

    first = user_vit(seed=3, batch_first=True)
    second = user_vit(seed=3, batch_first=False)
    second.load_state_dict(first.state_dict())
    for batch in (2, 17):  # 17 images of 17 tokens: the layout cannot be read from the shape
        x = torch.randn(batch, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        a = vitlens.explain(vitlens.load_model(first), x, methods=[NAME], target=3).patch_maps[NAME]
        b = vitlens.explain(vitlens.load_model(second), x, methods=[NAME], target=3).patch_maps[NAME]
        assert float(a.abs().max()) > 0
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------ CLI
def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_explain_and_methods(tmp_path, capsys, tiny):
    from tests.methods.test_perturbation_engine import picture

    folder = tmp_path / "in"
    picture(folder / "a.png", 1)
    picture(folder / "b.png", 2)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "explain", folder, *tiny, "--methods", f"{NAME},chefer",
                           "--param", f"{NAME}.start_layer=0", "--out", out, "--quiet")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["methods"][NAME] == {"start_layer": 0}
    for image in manifest["images"]:
        assert image["status"] == "ok"
        maps = {o["method"]: np.load(out / o["map"]) for o in image["outputs"]}
        assert maps[NAME].shape == maps["chefer"].shape and math.isfinite(float(maps[NAME].sum()))
    code, stdout, _ = run_cli(capsys, "methods")
    assert code == 0
    lines = stdout.splitlines()
    line = next(i for i, text in enumerate(lines) if text.split()[:1] == [NAME])
    assert REGISTRY[NAME].summary in lines[line] and "start_layer=1" in lines[line + 1]


@pytest.mark.parametrize("value, fragment", [("12", "start_layer=12 is beyond the model's"),
                                             ("1.5", "start_layer must be a layer index")])
def test_cli_bad_start_layer_is_one_line_exit_2(tmp_path, capsys, tiny, value, fragment):
    from tests.methods.test_perturbation_engine import picture

    image = picture(tmp_path / "a.png", 0)
    code, _, err = run_cli(capsys, "explain", image, *tiny, "--methods", NAME, "--param", f"{NAME}.start_layer={value}",
                           "--out", tmp_path / "out", "--quiet")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0] and f"method '{NAME}'" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["timm-deit-distilled", "timm-registers", "timm-avg-pool", "timm-eva02", "timm-beit",
                                  "hf-deit-teacher", "hf-dinov2", "hf-dinov2-registers-swiglu-non-square", "hf-beit"])
def test_every_lrp_family_batched_equals_alone(case):
    """Every family AttnLRP runs on finds its residual stream (two adds per block) and gives per-image maps."""
    from tests.models.test_adapters import CASES

    build, size, _ = CASES[case]
    model = vitlens.load_model(build())
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(7))
    batch = vitlens.explain(model, x, methods=[NAME], target=[1, 4], params={NAME: {"start_layer": 0}})
    maps = batch.patch_maps[NAME]
    assert torch.isfinite(maps).all() and float(maps.abs().max()) > 0
    for i, target in enumerate([1, 4]):
        alone = vitlens.explain(model, x[i:i + 1], methods=[NAME], target=target, params={NAME: {"start_layer": 0}})
        torch.testing.assert_close(maps[i], alone.patch_maps[NAME][0], atol=1e-5 * float(maps[i].abs().max()),
                                   rtol=1e-4)
