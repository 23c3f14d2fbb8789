"""Every adapter captures attention (under fused attention too) without changing the model."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny_hf_vit, tiny_timm_vit, tiny_torchvision_vit
from tests.models.test_hf_image import tiny_hf_beit, tiny_hf_dinov2
from vitlens.errors import ModelError
from vitlens.models import AttentionRecorder, load_model

CASES = {
    "timm": (lambda: tiny_timm_vit(), (32, 32), 1),
    "timm-deit-distilled": (lambda: tiny_timm_vit(name="deit_tiny_distilled_patch16_224"), (32, 32), 2),
    "timm-registers": (lambda: tiny_timm_vit(reg_tokens=4), (32, 32), 5),
    "timm-avg-pool": (lambda: tiny_timm_vit(global_pool="avg"), (32, 32), 1),
    "timm-avg-no-cls": (lambda: tiny_timm_vit(global_pool="avg", class_token=False), (32, 32), 0),
    "timm-non-square": (lambda: tiny_timm_vit(img_size=(32, 48)), (32, 48), 1),
    "timm-dynamic-size": (lambda: tiny_timm_vit(dynamic_img_size=True), (32, 48), 1),
    "hf-vit": (lambda: tiny_hf_vit(), (32, 32), 1),
    "hf-vit-interpolated": (lambda: tiny_hf_vit(), (32, 48), 1),
    "hf-deit": (lambda: tiny_hf_vit(kind="deit"), (32, 32), 2),
    "hf-deit-teacher": (lambda: tiny_hf_vit(kind="deit-teacher"), (32, 32), 2),
    "torchvision": (lambda: tiny_torchvision_vit(), (32, 32), 1),
    "timm-eva02": (lambda: tiny_timm_vit(name="eva02_base_patch14_224", embed_dim=32, num_heads=4), (32, 32), 1),
    "timm-beit": (lambda: tiny_timm_vit(name="beit_base_patch16_224"), (32, 32), 1),
    "hf-dinov2": (lambda: tiny_hf_dinov2(dtype=torch.float32), (32, 32), 1),
    "hf-dinov2-registers-swiglu-non-square": (
        lambda: tiny_hf_dinov2(dtype=torch.float32, registers=4, use_swiglu_ffn=True), (32, 48), 5),
    "hf-beit": (lambda: tiny_hf_beit(dtype=torch.float32, use_shared_relative_position_bias=True), (32, 32), 1),
    "hf-beit-interpolated": (
        lambda: tiny_hf_beit(dtype=torch.float32, use_absolute_position_embeddings=True), (32, 48), 1),
}


def _snapshot(module: torch.nn.Module) -> list:
    """Everything a capture could leave behind: instance attributes, hooks, modes, configs."""
    state = []
    for name, m in module.named_modules():
        hooks = (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        attrs = {k: v for k, v in m.__dict__.items() if not k.startswith("_") and not isinstance(v, torch.Tensor)}
        state.append((name, sorted(attrs), "forward" in m.__dict__, hooks, m.training,
                      getattr(m, "fused_attn", None)))
        config = getattr(m, "config", None)
        if config is not None:
            state.append((name, "attn", getattr(config, "_attn_implementation", None)))
    return state


@pytest.mark.parametrize("case", list(CASES))
def test_capture_keeps_logits_and_restores_model(case):
    build, (height, width), prefix = CASES[case]
    module = build()
    model = load_model(module)
    torch.manual_seed(1)
    x = torch.randn(3, 3, height, width)
    before = _snapshot(module)
    weights_before = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        reference = model.logits(x)

    recorder = AttentionRecorder()
    with model.capture(recorder):
        captured_logits = model.logits(x)

    assert torch.allclose(captured_logits, reference, atol=1e-5, rtol=0)
    assert len(recorder.attentions) == model.num_layers == 3
    h, w = model.grid((height, width))
    assert model.num_prefix_tokens == prefix
    for attention in recorder.attentions:
        assert attention.shape == (3, 4, prefix + h * w, prefix + h * w)
        assert torch.allclose(attention.sum(-1), torch.ones(()), atol=1e-5)
    assert _snapshot(module) == before
    assert all(torch.equal(v, weights_before[k]) for k, v in module.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model.logits(x), reference)


def test_models_use_fused_attention_by_default():
    """The capture above ran against fused kernels: timm uses SDPA and HF selects 'sdpa'."""
    assert tiny_timm_vit().blocks[0].attn.fused_attn is True
    assert tiny_hf_vit().config._attn_implementation == "sdpa"


def _hooked_timm_reference(module, x, target):
    """Attention and d(logit)/dA read the way vit-explain does it: unfused attention + attn_drop hooks."""
    module = copy.deepcopy(module)
    attentions = []

    def keep(module, inputs, output):
        output.retain_grad()
        attentions.append(output)

    for block in module.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(keep)
    logits = module(x)
    logits.gather(1, target[:, None]).sum().backward()
    return logits.detach(), [a.detach() for a in attentions], [a.grad for a in attentions]


def test_timm_capture_matches_hooked_unfused_attention_and_gradients():
    module = tiny_timm_vit()
    model = load_model(module)
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([3, 7])
    ref_logits, ref_attn, ref_grad = _hooked_timm_reference(module, x, target)

    recorder = AttentionRecorder()
    with model.capture(recorder):
        logits = model.logits(x)
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), recorder.attentions)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    for mine, ref in zip(recorder.attentions, ref_attn):
        assert torch.allclose(mine, ref, atol=1e-6)
    for mine, ref in zip(grads, ref_grad):
        assert torch.allclose(mine, ref, atol=1e-6)


def test_hf_capture_matches_eager_output_attentions():
    module = tiny_hf_vit()
    eager = copy.deepcopy(module)
    eager.config._attn_implementation = "eager"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = eager(pixel_values=x, output_attentions=True).attentions
    recorder = AttentionRecorder()
    model = load_model(module)
    with torch.no_grad(), model.capture(recorder):
        model.logits(x)
    assert len(expected) == len(recorder.attentions)
    for mine, ref in zip(recorder.attentions, expected):
        assert torch.allclose(mine, ref, atol=1e-6)


@pytest.mark.parametrize("case", ["timm", "timm-deit-distilled", "timm-avg-pool", "hf-vit", "hf-deit-teacher",
                                  "torchvision", "hf-dinov2", "hf-beit"])
def test_last_layer_readout_is_the_model_logit(case):
    build, (height, width), _ = CASES[case]
    model = load_model(build())
    x = torch.randn(2, 3, height, width)
    recorder = AttentionRecorder(keep_block_outputs=True)
    with torch.no_grad(), model.capture(recorder):
        logits = model.logits(x)
    assert len(recorder.block_outputs) == model.num_layers
    assert torch.allclose(model.layer_logits(recorder.block_outputs[-1]), logits, atol=1e-5)
    # 'mean' pooling reads the token mean and so differs from the model's own pooling
    assert not torch.allclose(model.layer_logits(recorder.block_outputs[-1], pool="mean"), logits, atol=1e-3)


def test_readout_weights_follow_the_model_pooling():
    assert load_model(tiny_timm_vit()).readout_weights(5).tolist() == [1, 0, 0, 0, 0]
    distilled = load_model(tiny_timm_vit(name="deit_tiny_distilled_patch16_224"))
    assert distilled.readout_weights(4).tolist() == [0.5, 0.5, 0, 0]
    avg = load_model(tiny_timm_vit(global_pool="avg"))
    assert avg.readout_weights(5).tolist() == [0, 0.25, 0.25, 0.25, 0.25]
    teacher = load_model(tiny_hf_vit(kind="deit-teacher"))
    assert teacher.readout_weights(4).tolist() == [0.5, 0.5, 0, 0]


def test_capture_leaves_other_instances_of_the_class_alone():
    first, second = load_model(tiny_timm_vit()), tiny_timm_vit(seed=3)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = second(x)
    recorder = AttentionRecorder()
    with torch.no_grad(), first.capture(recorder):
        first.logits(x)
        during = second(x)  # must not be recorded nor changed
    assert len(recorder.attentions) == 3
    assert torch.equal(during, expected)


def test_unsupported_timm_attention_is_a_one_line_error():
    module = tiny_timm_vit()

    class OddAttention(type(module.blocks[0].attn)):
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x)

    module.blocks[1].attn.__class__ = OddAttention
    with pytest.raises(ModelError, match="unsupported attention implementation .*OddAttention.* in block 1") as info:
        load_model(module)
    assert "\n" not in str(info.value)


def test_training_mode_is_restored_after_capture():
    model = load_model(tiny_timm_vit())
    model.module.train()
    model.module.blocks[0].eval()
    with model.eval_mode():
        assert not model.module.training
    assert model.module.training and not model.module.blocks[0].training
