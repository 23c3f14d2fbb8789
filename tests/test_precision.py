"""Reduced precision: the model computes under autocast, the methods combine float32, fp32 is unchanged.

Thresholds. bf16 keeps an 8-bit significand (relative rounding error 2^-9 ~ 0.002 per rounding), so
after three blocks the attention and gradients of the tiny random ViT differ from fp32 by about 1 %;
a map perturbed by 1 % of its spread keeps a Pearson correlation above 0.999 when the perturbation is
random, and the attention-only maps (whose patch entries are small differences of near-uniform
attention, the least favourable case) measured 0.989 at worst over 48 images of 6 random models. 0.98
is below every measured value with room, and well above what combining in bf16 gives: with the
captured tensors left in bf16, rollout's product drops to 0.70 and GMAR to 0.77 on these images.
XGrad-CAM divides by the spatial sum of each channel's activation, which for a ViT's LayerNorm output
can be close to 0 (0.007 on one image of seed 4): there even an fp32 input perturbation of 1e-3 drops
its correlation to 0.84, so only its median over the images is held to the threshold.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

import vitlens
from tests.conftest import tiny_timm_vit
from vitlens.engine import check_precision, precision_name, run_batch
from vitlens.errors import UsageError
from vitlens.methods import REGISTRY

ATTENTION_METHODS = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer"]
CAM_METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam"]
THRESHOLD = 0.98


@pytest.fixture
def model():
    return vitlens.load_model(tiny_timm_vit())


@pytest.fixture
def images():
    torch.manual_seed(7)
    return torch.randn(8, 3, 32, 32)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson correlation of two (B, ...) map batches, in float64."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def state(model) -> dict:
    """Everything a call could leave behind on the module: parameters, buffers, hooks, instance attributes."""
    out = {"params": {k: (v.dtype, v.clone()) for k, v in model.module.state_dict().items()}}
    for name, module in model.module.named_modules():
        out[name] = (module.training, sorted(module.__dict__), dict(module._forward_hooks),
                     dict(module._forward_pre_hooks), dict(module._backward_hooks))
    return out


def same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        if key == "params":
            if a[key].keys() != b[key].keys():
                return False
            if any(a[key][k][0] != b[key][k][0] or not torch.equal(a[key][k][1], b[key][k][1]) for k in a[key]):
                return False
        elif a[key] != b[key]:
            return False
    return True


# ------------------------------------------------------------------------------------ fp32 unchanged
def test_default_fp32_is_bit_identical_to_no_argument(model, images):
    methods = "all"
    plain = vitlens.explain(model, images, methods=methods, target="top2")
    for precision in ("fp32", "float32", torch.float32, None):
        result = vitlens.explain(model, images, methods=methods, target="top2", precision=precision)
        assert result.precision == "fp32"
        assert torch.equal(result.probabilities, plain.probabilities)
        assert torch.equal(result.targets, plain.targets)
        for name in plain.methods:
            assert torch.equal(result.patch_maps[name], plain.patch_maps[name]), name
            assert torch.equal(result.maps[name], plain.maps[name]), name


def test_fp32_keeps_a_float64_model_in_float64(images):
    model = vitlens.load_model(tiny_timm_vit().double())
    result = run_batch(model, images.double(), {"chefer": {}, "gradcam": {}}, precision="fp32")
    assert result.logits.dtype == torch.float64
    assert all(m.dtype == torch.float64 for m in result.patch_maps.values())


# ------------------------------------------------------------------------------------ bf16 / fp16
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_maps_follow_fp32(model, images, precision):
    methods = ATTENTION_METHODS + CAM_METHODS
    reference = vitlens.explain(model, images, methods=methods)
    result = vitlens.explain(model, images, methods=methods, precision=precision, target=reference.targets)
    assert result.precision == precision
    assert result.probabilities.dtype == torch.float32
    for name in methods:
        raw = result.patch_maps[name]
        assert raw.dtype == torch.float32 and result.maps[name].dtype == torch.float32, name
        assert torch.isfinite(raw).all() and torch.isfinite(result.maps[name]).all(), name
        assert not torch.equal(raw, reference.patch_maps[name]), f"{name}: the model did not run in {precision}"
        r = pearson(raw, reference.patch_maps[name])
        if name == "xgradcam":  # ill-conditioned denominator, see the module docstring
            assert r.median() > THRESHOLD, (name, r)
        else:
            assert r.min() > THRESHOLD, (name, r)
    # the predictions agree with fp32 (the random model's logits are far apart at the top)
    assert (result.probabilities - reference.probabilities).abs().max() < 0.02


def test_lrp_runs_in_fp32_under_reduced_precision(model, images):
    methods = ["attnlrp", "cp-lrp"]
    reference = vitlens.explain(model, images, methods=methods)
    result = vitlens.explain(model, images, methods=methods, precision="bf16")
    for name in methods:
        assert torch.equal(result.patch_maps[name], reference.patch_maps[name]), name
        for key, value in reference.extras[name].items():
            assert torch.equal(result.extras[name][key], value), (name, key)
    # mixed with shared-pass methods: the shared pass in bf16, the LRP passes still the fp32 ones
    mixed = vitlens.explain(model, images, methods=["rollout", "attnlrp"], precision="bf16",
                            target=reference.targets)
    assert torch.equal(mixed.patch_maps["attnlrp"], reference.patch_maps["attnlrp"])


def test_the_model_runs_in_bf16_and_the_methods_combine_float32(model, images, monkeypatch):
    linear_outputs, seen = [], {}
    handle = model.module.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: linear_outputs.append(o.dtype))

    def spy(name, function):
        def wrapped(captured, **params):
            tensors = list(captured.attentions) + list(captured.gradients or [])
            tensors += list(captured.layer_gradients.values())
            tensors += [t for pair in captured.cam.values() for t in pair]
            seen[name] = {t.dtype for t in tensors} | {captured.readout.dtype if captured.readout is not None
                                                        else torch.float32}
            out = function(captured, **params)
            seen[name].add(out.dtype)
            return out
        return wrapped

    names = ("rollout", "gmar-l2", "legrad", "chefer", "gradcam")
    for name in names:
        monkeypatch.setitem(REGISTRY, name, replace(REGISTRY[name], function=spy(name, REGISTRY[name].function)))
    result = run_batch(model, images, {n: REGISTRY[n].params() for n in names}, precision="bf16")
    handle.remove()
    assert linear_outputs == [torch.bfloat16]  # one forward, and the Linear computed in bf16
    assert seen == {n: {torch.float32} for n in names}
    assert result.logits.dtype == torch.float32
    assert all(m.dtype == torch.float32 for m in result.patch_maps.values())


def test_the_model_is_returned_unchanged(model, images):
    before = state(model)
    model.module.train()  # the user's mode is restored too
    train_before = state(model)
    for precision in ("bf16", "fp16"):
        vitlens.explain(model, images, methods="all", precision=precision)
        assert same_state(state(model), train_before)
    model.module.eval()
    assert same_state(state(model), before)
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.module.parameters())
    assert not torch.is_autocast_enabled("cpu")
    # and it computes exactly as before
    with torch.no_grad():
        assert model.logits(images).dtype == torch.float32


# ------------------------------------------------------------------------------------ the checker
@pytest.mark.parametrize("text, name, dtype", [
    ("fp32", "fp32", None), ("FP32", "fp32", None), (" float32 ", "fp32", None), (None, "fp32", None),
    (torch.float32, "fp32", None),
    ("bf16", "bf16", torch.bfloat16), ("bfloat16", "bf16", torch.bfloat16), (torch.bfloat16, "bf16", torch.bfloat16),
    ("fp16", "fp16", torch.float16), ("Float16", "fp16", torch.float16), (torch.float16, "fp16", torch.float16),
])
def test_accepted_spellings(text, name, dtype):
    assert precision_name(text) == name
    assert check_precision(text) == dtype
    assert check_precision(text, "cpu") == dtype  # this torch's CPU autocast supports bf16 and fp16


@pytest.mark.parametrize("bad, shown", [("x", "'x'"), ("fp8", "'fp8'"), ("half", "'half'"), ("", "''"),
                                        (16, "16"), (torch.float64, "torch.float64")])
def test_unknown_precision_is_one_line(bad, shown):
    with pytest.raises(UsageError) as info:
        check_precision(bad)
    assert str(info.value) == f"precision must be fp32, bf16 or fp16, got {shown}"
    with pytest.raises(UsageError, match=r"^--precision must be fp32, bf16 or fp16, got 'x'$"):
        check_precision("x", option="--precision")


def test_unknown_precision_is_refused_before_any_work(tmp_path):
    # not even the model is loaded (this spec would be a ModelError), nor the missing image read
    with pytest.raises(UsageError, match=r"^precision must be fp32, bf16 or fp16, got 'x'$"):
        vitlens.explain("timm:no_such_model", str(tmp_path / "missing.png"), precision="x")
    with pytest.raises(UsageError):
        run_batch(vitlens.load_model(tiny_timm_vit()), torch.randn(1, 3, 32, 32), {"rollout": {}}, precision="x")


def test_a_dtype_autocast_does_not_support_on_the_device_is_one_line(monkeypatch):
    real = torch.autocast

    def cpu_without_fp16(device_type, dtype=None, **kwargs):
        if device_type == "cpu" and dtype == torch.float16:
            warnings.warn("In CPU autocast, but the target dtype is not supported. Disabling autocast.\n"
                          "CPU Autocast only supports dtype of torch.bfloat16 currently.", stacklevel=2)
        return real(device_type, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, "autocast", cpu_without_fp16)
    with pytest.raises(UsageError) as info:
        check_precision("fp16", "cpu")
    assert str(info.value) == ("precision fp16 on cpu: In CPU autocast, but the target dtype is not supported. "
                               "Disabling autocast.")
    assert check_precision("fp16") == torch.float16  # without a device only the name is checked
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(UsageError, match=r"^precision bf16: torch has no autocast on cpu$"):
        check_precision("bf16", torch.device("cpu"))
