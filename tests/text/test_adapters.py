"""Text adapters: captured attention equals the eager model's output_attentions, padding is respected,
and the model is exactly as before after the capture."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.text.conftest import FAMILIES, random_batch, tiny_text_model
from vitlens.errors import ModelError
from vitlens.methods import get_method
from vitlens.models import AttentionRecorder
from vitlens.text import TextBatch, load_text_model, run_text_batch
from vitlens.text.task import TEXT_METHODS, resolve_objective

CASES = [(family, classifier) for family in FAMILIES for classifier in (False, True)]


def _ids(case):
    family, classifier = case
    return f"{family}-{'cls' if classifier else 'base'}"


def _snapshot(module: torch.nn.Module) -> list:
    """What a capture could leave behind: instance attributes and forwards, hooks, modes, configs."""
    state = []
    for name, m in module.named_modules():
        hooks = (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        attrs = sorted(k for k, v in m.__dict__.items() if not k.startswith("_") and not isinstance(v, torch.Tensor))
        state.append((name, attrs, "forward" in m.__dict__, hooks, m.training))
        config = getattr(m, "config", None)
        if config is not None:
            state.append((name, "attn", config._attn_implementation, "_attn_implementation" in vars(config)))
    return state


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_capture_equals_eager_output_attentions_with_padding(case):
    family, classifier = case
    module = tiny_text_model(family, classifier)
    assert module.config._attn_implementation == "sdpa"  # the capture below runs against the fused default
    eager = copy.deepcopy(module)
    eager.config._attn_implementation = "eager"
    ids, mask = random_batch()
    with torch.no_grad():
        reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
        plain = module(input_ids=ids, attention_mask=mask)
    model = load_text_model(module)
    batch = TextBatch.from_ids(ids, mask)
    before = _snapshot(module)
    recorder = AttentionRecorder()
    with torch.no_grad(), model.capture(recorder):
        output = model.forward(batch)
    assert _snapshot(module) == before
    assert len(recorder.attentions) == len(reference.attentions) == model.num_layers
    for mine, ref in zip(recorder.attentions, reference.attentions):
        assert mine.shape == ref.shape == (3, 4, 9, 9)
        assert torch.allclose(mine, ref, atol=1e-6, rtol=0)
        # padded keys get exactly zero attention, every row sums to one
        assert torch.all(mine.masked_select(mask[:, None, None, :].expand_as(mine) == 0) == 0)
        assert torch.allclose(mine.sum(-1), torch.ones(()), atol=1e-6)
    expected = plain.logits if classifier else plain.last_hidden_state
    real = mask.bool()
    if classifier:
        assert torch.allclose(output, expected, atol=1e-5)
    else:
        assert torch.allclose(output[real], expected[real], atol=1e-5)


def test_albert_shared_layers_are_captured_once_per_use():
    module = tiny_text_model("albert", True, num_hidden_layers=3, inner_group_num=2)
    eager = copy.deepcopy(module)
    eager.config._attn_implementation = "eager"
    ids, mask = random_batch()
    model = load_text_model(module)
    assert model.num_layers == 6
    recorder = AttentionRecorder(keep_block_outputs=True)
    with torch.no_grad():
        reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        with model.capture(recorder):
            model.forward(TextBatch.from_ids(ids, mask))
    assert len(recorder.attentions) == 6 and len(recorder.block_outputs) == 6
    # transformers reports one attention per layer-group use (the last inner layer's); ours are in order
    assert torch.allclose(recorder.attentions[-1], reference.attentions[-1], atol=1e-6)
    assert torch.allclose(recorder.block_outputs[-1], reference.hidden_states[-1], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_scores_of_the_last_layer_are_the_logits(family):
    module = tiny_text_model(family, True)
    model = load_text_model(module)
    ids, mask = random_batch()
    recorder = AttentionRecorder(keep_block_outputs=True)
    with torch.no_grad(), model.capture(recorder):
        logits = model.forward(TextBatch.from_ids(ids, mask))
    assert len(recorder.block_outputs) == model.num_layers
    assert torch.allclose(model.layer_scores(recorder.block_outputs[-1], mask), logits, atol=1e-5)


@pytest.mark.parametrize("family,classifier", [("bert", True), ("roberta", True), ("distilbert", False),
                                                ("albert", True), ("electra", False)])
def test_batch_with_padding_equals_one_at_a_time(family, classifier):
    """Attention blocks, explained values and every method's token scores, batched vs alone."""
    model = load_text_model(tiny_text_model(family, classifier))
    ids, mask = random_batch(lengths=(9, 4, 6, 7))  # encoder: texts 0, 1 paired with 2, 3
    methods = {name: get_method(name).params() for name in TEXT_METHODS}
    objective = None if classifier else resolve_objective(None, True)
    target = [0, 2, 1, 2] if classifier else None
    batched = run_text_batch(model, TextBatch.from_ids(ids, mask), methods, target, objective)
    groups = [[0], [1], [2], [3]] if classifier else [[0, 2], [1, 3]]
    for group in groups:
        n = int(mask[group].sum(1).max())
        alone = run_text_batch(model, TextBatch.from_ids(ids[group, :n], mask[group, :n]), methods,
                               [target[g] for g in group] if classifier else None, objective)
        item = group[0] if classifier else groups.index(group)
        assert torch.allclose(batched.values[item], alone.values[0], atol=1e-5)
        for position, s in enumerate(group):
            assert torch.allclose(batched.attentions[s], alone.attentions[position], atol=1e-6)
            for name in methods:
                mine, ref = batched.token_maps[name][s], alone.token_maps[name][position]
                assert mine.shape == ref.shape == (1, int(mask[s].sum()))
                scale = ref.abs().max().clamp_min(1e-12)
                assert torch.allclose(mine / scale, ref / scale, atol=1e-4), name


def test_capture_leaves_another_model_of_the_same_class_alone():
    first, second = tiny_text_model("bert", True), tiny_text_model("bert", True, seed=3)
    model = load_text_model(first)
    ids, mask = random_batch()
    with torch.no_grad():
        expected = second(input_ids=ids, attention_mask=mask).logits
    recorder = AttentionRecorder()
    with torch.no_grad(), model.capture(recorder):
        inside = second(input_ids=ids, attention_mask=mask).logits
        model.forward(TextBatch.from_ids(ids, mask))
    assert len(recorder.attentions) == 2  # only the captured model reported
    assert torch.allclose(inside, expected, atol=1e-6)
    assert second.config._attn_implementation == "sdpa"


def test_training_mode_and_frozen_parameters():
    module = tiny_text_model("bert", True).train()
    for p in module.parameters():
        p.requires_grad_(False)
    model = load_text_model(module)
    ids, mask = random_batch()
    result = run_text_batch(model, TextBatch.from_ids(ids, mask), {"chefer": {"start_layer": 0}})
    assert module.training and all(m.training for m in module.modules())
    assert all(p.grad is None for p in module.parameters())
    assert all(m.abs().sum() > 0 for m in result.token_maps["chefer"])  # gradients existed despite frozen weights


def test_unsupported_module_is_a_one_line_error():
    with pytest.raises(ModelError) as info:
        load_text_model(torch.nn.Linear(3, 3))
    assert "\n" not in str(info.value) and "BERT" in str(info.value)



def test_load_text_model_and_explanations_give_the_module_back_in_its_own_training_mode():
    """A module in training mode (one layer deliberately in eval) comes back exactly so from load_text_model
    and from an explanation, which is that of the model in eval mode (dropout 0.1 off)."""
    module = tiny_text_model("bert", True).train()
    module.bert.encoder.layer[0].eval()
    flags = {name: m.training for name, m in module.named_modules()}
    model = load_text_model(module)
    assert {name: m.training for name, m in module.named_modules()} == flags
    ids, mask = random_batch()
    methods = {"rollout": {}, "chefer": {"start_layer": 0}}
    explained = run_text_batch(model, TextBatch.from_ids(ids, mask), methods)
    assert {name: m.training for name, m in module.named_modules()} == flags
    reference = run_text_batch(load_text_model(tiny_text_model("bert", True).eval()), TextBatch.from_ids(ids, mask),
                               methods)
    for name in methods:
        for mine, ref in zip(explained.token_maps[name], reference.token_maps[name]):
            assert torch.equal(mine, ref), name
