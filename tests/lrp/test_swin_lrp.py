"""AttnLRP / CP-LRP through Swin and Swin-V2 (timm ``SwinTransformer`` / ``SwinTransformerV2``, Hugging Face
``SwinForImageClassification`` / ``Swinv2ForImageClassification``): window attention, shifted windows, patch merging.

Random-init tiny models from configs (no hub): 32x32 input, 4x4 patches, 4x4 windows, two stages of two blocks (the
second block of each stage shifts its windows, so the shift mask is in play; the second stage follows a patch
merging), O(1) weights in float64. Checked:

* the family and which methods it runs ('all' = the CAM methods and AttnLRP; the rollout family and LeGrad refused
  in one line naming the methods that work);
* inside vitlens' capture the logits are the model's and the recorded probabilities are the model's own (timm's
  unfused softmax, Hugging Face's eager ``output_attentions``);
* relevance conservation: without biases CP-LRP with gamma 0 gives input relevance summing to the target logit;
* AttnLRP / CP-LRP with gamma 0 equal an independent statement on timm's own forward: each window attention
  restated here with the rules written as detaches (uniform rule: half the gradient to each operand of Q K^T and
  A V; CP-LRP: the probabilities constant; Swin-V2: the query and key norms constant), LayerNorm with its standard
  deviation constant, GELU with the identity rule, everything else (linear maps, shifts, windows, merging, the
  mean pooling) plain autograd; relevance = input x gradient.

Agreement with HiLRP (PyPI ``hilrp``) is a separate, throw-away check: benchmarks/hilrp_swin.py, figures in
docs/methods.md.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vitlens
from tests.models.family_checks import eager_copy
from vitlens.engine import run_batch
from vitlens.errors import MethodError
from vitlens.methods import parse_methods
from vitlens.models import AttentionRecorder
from vitlens.models.swin import SwinModel

KINDS = ["timm-swin", "timm-swinv2", "hf-swin", "hf-swinv2"]
BLOCKS = 4  # two stages of two blocks


def _unit_scale(module, bias_std=0.1):
    """O(1) weights (timm's and Hugging Face's inits give near-uniform attention and tiny logits)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "bias_table" in name:
                p.normal_(std=bias_std)
            elif "logit_scale" in name:
                p.fill_(math.log(10.0))
            elif p.dim() >= 2:
                p.normal_(std=p[0].numel() ** -0.5)
            else:  # norm weights
                p.normal_(mean=1.0, std=0.1)
    return module


def tiny_swin(kind, seed=0, biases=True):
    torch.manual_seed(seed)
    if kind.startswith("timm"):
        import timm

        name = "swin_tiny_patch4_window7_224" if kind == "timm-swin" else "swinv2_tiny_window8_256"
        module = timm.create_model(name, pretrained=False, img_size=32, patch_size=4, window_size=4, embed_dim=16,
                                   depths=(2, 2), num_heads=(2, 4), num_classes=10)
    else:
        from transformers import SwinConfig, SwinForImageClassification, Swinv2Config, Swinv2ForImageClassification

        config, cls = ((SwinConfig, SwinForImageClassification) if kind == "hf-swin"
                       else (Swinv2Config, Swinv2ForImageClassification))
        module = cls(config(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                            num_labels=10))
    _unit_scale(module)
    if not biases:
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("bias"):  # Linear, Conv2d, LayerNorm biases; Swin-V2's q/v bias
                    p.zero_()
    return module.double().eval()


def logits_of(module, x):
    out = module(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


def test_family_and_methods(kind):
    model = vitlens.load_model(tiny_swin(kind))
    assert isinstance(model, SwinModel) and model.family == "swin" and model.lrp_supported
    assert parse_methods("all", model) == ["gradcam", "gradcam++", "xgradcam", "layercam", "attnlrp"]
    assert parse_methods(["cp-lrp"], model) == ["cp-lrp"]
    for method in ("rollout", "chefer", "legrad", "transformer-attribution"):
        with pytest.raises(MethodError, match="needs attention maps") as info:
            parse_methods([method], model)
        message = str(info.value)
        assert "\n" not in message and "gradcam" in message and "attnlrp, cp-lrp" in message


def test_capture_records_the_models_own_window_attention(kind):
    module = tiny_swin(kind, seed=1)
    model = vitlens.load_model(copy.deepcopy(module))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if kind.startswith("timm"):
        reference, theirs = copy.deepcopy(module), []
        for blk in (b for stage in reference.layers for b in stage.blocks):
            blk.attn.fused_attn = False
            blk.attn.softmax.register_forward_hook(lambda mod, inputs, output: theirs.append(output))
        with torch.no_grad():
            expected = reference(x)
        atol = 1e-10
    else:  # the eager attention (its softmax in float32 for Swin) through hooks on each attention module
        eager, theirs = eager_copy(module), []
        for sub in eager.modules():
            if type(sub).__name__ in ("SwinAttention", "Swinv2SelfAttention"):
                sub.register_forward_hook(lambda mod, inputs, output: theirs.append(output[1]))
        with torch.no_grad():
            eager(x, output_attentions=True)
            expected = module(x).logits  # the model's own default attention
        atol = 1e-6
    recorder = AttentionRecorder()
    with torch.no_grad(), model.capture(recorder):
        captured = model.logits(x)
    torch.testing.assert_close(captured, expected, rtol=0, atol=1e-10)
    with torch.no_grad():
        assert (model.logits(x) - captured).abs().max() <= 1e-10  # and the model is back
    assert len(recorder.attentions) == len(theirs) == BLOCKS
    # (B * windows, heads, n, n): 4 windows of 16 tokens in stage 1, 1 window in stage 2
    assert [tuple(a.shape) for a in recorder.attentions] == [(8, 2, 16, 16)] * 2 + [(2, 4, 16, 16)] * 2
    for mine, ref in zip(recorder.attentions, theirs):
        torch.testing.assert_close(mine, ref.to(mine.dtype), rtol=0, atol=atol)
    # the shifted block masks pairs of tokens that came from different image regions
    assert (recorder.attentions[1] < 1e-30).any() and not (recorder.attentions[0] < 1e-30).any()


def test_cp_lrp_conserves_the_target_logit(kind):
    """Without biases every rule on the way (LRP-0 linear maps and convolution, detached norms, identity rule on
    GELU, relevance through V only, the mean pooling, permutations) is conservative."""
    module = tiny_swin(kind, seed=2, biases=False)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = run_batch(vitlens.load_model(module), x, {"cp-lrp": {"conv_gamma": 0.0, "lin_gamma": 0.0}},
                       target="top2")
    sums, logits = result.extras["cp-lrp"]["relevance_sum"], result.extras["cp-lrp"]["target_logit"]
    with torch.no_grad():
        assert torch.allclose(logits, logits_of(module, x).gather(1, result.targets), rtol=0, atol=1e-12)
    assert torch.allclose(result.patch_maps["cp-lrp"].flatten(2).sum(-1), sums, rtol=1e-12, atol=0)
    assert logits.abs().min() > 1e-3
    assert ((sums - logits).abs() / logits.abs()).max() <= 1e-4  # the bound; in fact ~1e-12
    assert ((sums - logits).abs() / logits.abs()).max() <= 1e-9


def test_biases_break_conservation_so_the_check_can_fail():
    module = tiny_swin("timm-swin", seed=2, biases=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = run_batch(vitlens.load_model(module), x, {"cp-lrp": {"conv_gamma": 0.0, "lin_gamma": 0.0}}, target=1)
    sums, logits = result.extras["cp-lrp"]["relevance_sum"], result.extras["cp-lrp"]["target_logit"]
    assert ((sums - logits).abs() / logits.abs()).max() > 1e-3


# --------------------------------------------------------------------------------------------------
# the independent statement: timm's forward with the rules written as detaches
# --------------------------------------------------------------------------------------------------

def _half_half(a, b):
    """a @ b with half of each operand's gradient (the uniform rule)."""
    return 0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)


def _rule_attention(attn, variant, v2):
    def forward(x, mask=None):
        B_, N, C = x.shape
        if v2:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = F.linear(x, attn.qkv.weight, bias)
        else:
            qkv = attn.qkv(x)
        q, k, v = qkv.reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if v2:
            q = q / q.norm(dim=-1, keepdim=True).detach()
            k = k / k.norm(dim=-1, keepdim=True).detach()
            scale = torch.clamp(attn.logit_scale, max=math.log(100.0)).exp()
            table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
            n = attn.window_size[0] * attn.window_size[1]
            position = 16 * torch.sigmoid(table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1))
        else:
            scale, position = attn.scale, attn._get_rel_pos_bias()[0]
        if variant == "cp-lrp":
            scores = (q * scale).detach() @ k.detach().transpose(-2, -1)
        else:
            scores = _half_half(q * scale, k.transpose(-2, -1))
        scores = scores + position.detach()
        if mask is not None:
            windows = mask.shape[0]
            scores = (scores.view(-1, windows, attn.num_heads, N, N) + mask[None, :, None]).view(-1, attn.num_heads,
                                                                                                 N, N)
        probs = scores.softmax(-1)
        out = probs.detach() @ v if variant == "cp-lrp" else _half_half(probs, v)
        return attn.proj(out.transpose(1, 2).reshape(B_, N, -1))

    return forward


def _layer_norm_rule(ln):
    def forward(t):
        centred = t - t.mean(-1, keepdim=True)
        std = (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt().detach()
        return centred / std * ln.weight + ln.bias

    return forward


def _gelu_rule(t):
    """The identity rule: gradient GELU(t) / t, the denominator stabilised as zennit's 1e-10 * sign (sign(0) = 1)."""
    y = F.gelu(t)
    return t * (y / (t + 1e-10 * torch.where(t >= 0, 1.0, -1.0))).detach()


def reference_relevance(module, x, targets, variant):
    """(B, H, W) input x gradient of the rule-modified copy, and its logits."""
    m = copy.deepcopy(module)
    v2 = "v2" in type(m).__module__
    for sub in m.modules():
        if type(sub).__name__ == "WindowAttention":
            sub.forward = _rule_attention(sub, variant, v2)
        elif isinstance(sub, torch.nn.LayerNorm):
            sub.forward = _layer_norm_rule(sub)
        elif isinstance(sub, torch.nn.GELU) or type(sub).__name__ == "GELU":  # timm's own GELU in Swin-V2
            sub.forward = _gelu_rule
    x = x.clone().requires_grad_(True)
    logits = m(x)
    (grad,) = torch.autograd.grad(logits.gather(1, targets).sum(), x)
    return (x * grad).sum(1).detach(), logits.detach()


@pytest.mark.parametrize("variant", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("name", ["timm-swin", "timm-swinv2"])
def test_lrp_equals_the_rules_written_out(name, variant):
    module = tiny_swin(name, seed=4)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[3], [8]])
    expected, logits = reference_relevance(module, x, targets, variant)
    with torch.no_grad():
        torch.testing.assert_close(logits, module(x), rtol=0, atol=1e-10)  # the restatement is the model
    result = run_batch(vitlens.load_model(copy.deepcopy(module)), x, {variant: {"conv_gamma": 0.0, "lin_gamma": 0.0}},
                       targets)
    actual = result.patch_maps[variant][:, 0]
    scale = float(expected.abs().max())
    assert scale > 1e-3
    assert float((actual - expected).abs().max()) <= 1e-9 * scale
    # the two variants differ (the rule on Q K^T matters), so the comparison is not vacuous
    other = reference_relevance(module, x, targets, "cp-lrp" if variant == "attnlrp" else "attnlrp")[0]
    assert float((other - expected).abs().max()) > 1e-3 * scale


@pytest.mark.parametrize("name", ["timm-swin", "hf-swinv2"])
def test_batched_equals_one_at_a_time(name):
    model = vitlens.load_model(tiny_swin(name, seed=5))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    methods = ["attnlrp", "cp-lrp"]
    batched = vitlens.explain(model, x, methods=methods, target=[1, 4, 7])
    for i, t in enumerate([1, 4, 7]):
        alone = vitlens.explain(model, x[i:i + 1], methods=methods, target=t)
        for method in methods:
            a, b = batched.patch_maps[method][i], alone.patch_maps[method][0]
            assert float((a - b).abs().max()) <= 1e-9 * float(b.abs().max()), method


def test_model_returned_as_given(kind):
    module = tiny_swin(kind, seed=6)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    forwards = {name: "forward" in m.__dict__ for name, m in module.named_modules()}
    model = vitlens.load_model(module)
    vitlens.explain(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), methods=["attnlrp", "cp-lrp", "gradcam"])
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert {name: "forward" in m.__dict__ for name, m in module.named_modules()} == forwards
    assert all(p.grad is None for p in module.parameters())
