"""saliency, input-x-gradient, integrated-gradients on text: equal to captum's Saliency, InputXGradient and
IntegratedGradients on the word embeddings of the same model (decoders and a BERT classifier), a left-padded
batch equal to each prompt alone, inseq's baseline (the unknown token) and the one-line refusals."""

from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency

from tests.text.conftest import left_padded_batch, random_batch, tiny_decoder, tiny_text_model
from vitlens.errors import MethodError
from vitlens.text import explain_text, load_text_model
from vitlens.text.batch import TextBatch
from vitlens.text.task import run_text_batch, text_params

METHODS = ["saliency", "input-x-gradient", "integrated-gradients"]


def resolved(steps=10, **ig):
    return {n: text_params(n, {"steps": steps, **ig} if n == "integrated-gradients" else None) for n in METHODS}


def close(ours, ref, tol=1e-5):
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    scale = ref.abs().max().item()
    assert scale > 0
    assert (ours - ref).abs().max().item() <= tol * scale, (ours - ref).abs().max().item() / scale


def references(forward, embeds, target, steps, baseline=None):
    """captum on the embeddings of one sequence: saliency (L2 over the embedding), x * grad and IG summed."""
    sal = Saliency(forward).attribute(embeds.clone().requires_grad_(), target=target).norm(dim=-1)
    ixg = InputXGradient(forward).attribute(embeds.clone().requires_grad_(), target=target).sum(dim=-1)
    ig = IntegratedGradients(forward).attribute(embeds, baselines=baseline, target=target, n_steps=steps).sum(dim=-1)
    return {"saliency": sal[0], "input-x-gradient": ixg[0], "integrated-gradients": ig[0]}


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_decoder_padded_batch_equals_captum_per_prompt(family):
    module = tiny_decoder(family)
    model = load_text_model(module)
    ids, mask = left_padded_batch((7, 3, 5))
    targets = torch.tensor([[11], [42], [7]])
    result = run_text_batch(model, TextBatch.from_ids(ids, mask), resolved(steps=8, batch=9), target=targets)
    for s in range(3):
        real = ids[s][mask[s] == 1][None]
        embeds = module.get_input_embeddings()(real).detach()

        def forward(e):
            return module(inputs_embeds=e).logits[:, -1]

        for name, ref in references(forward, embeds, int(targets[s]), 8).items():
            close(result.token_maps[name][s][0], ref)


def test_logprob_score_equals_captum_on_log_softmax():
    module = tiny_decoder("gpt2", seed=2)
    model = load_text_model(module, score="logprob")
    ids = torch.tensor([[4, 9, 23, 61, 5]])
    result = run_text_batch(model, TextBatch.from_ids(ids), resolved(steps=6), target=17)
    embeds = module.get_input_embeddings()(ids).detach()
    for name, ref in references(lambda e: module(inputs_embeds=e).logits[:, -1].log_softmax(-1), embeds, 17,
                                6).items():
        close(result.token_maps[name][0][0], ref)


def test_bert_classifier_equals_captum():
    module = tiny_text_model("bert", True, seed=3)
    model = load_text_model(module)
    ids, mask = random_batch((9, 5))
    result = run_text_batch(model, TextBatch.from_ids(ids, mask), resolved(steps=7), target=[1, 2])
    for s, target in enumerate((1, 2)):
        real = ids[s][mask[s] == 1][None]
        embeds = module.get_input_embeddings()(real).detach()
        for name, ref in references(lambda e: module(inputs_embeds=e).logits, embeds, target, 7).items():
            close(result.token_maps[name][s][0], ref)


def test_unk_baseline_is_inseqs(tiny_gpt2_dir):
    """baseline='unk': every token's embedding replaced by the unknown token's, end-of-sequence tokens kept."""
    model = load_text_model(str(tiny_gpt2_dir))
    module, tok = model.module, model.tokenizer
    result = explain_text(model, "The capital of France is", target_token=" Paris", methods=["integrated-gradients"],
                          params={"integrated-gradients": {"steps": 9, "baseline": "unk"}}, keep_attentions=False)
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    emb = module.get_input_embeddings()
    embeds = emb(ids).detach()
    baseline = emb(torch.full_like(ids, tok.unk_token_id)).detach()
    target = model.token_id(" Paris")
    ref = IntegratedGradients(lambda e: module(inputs_embeds=e).logits[:, -1]).attribute(
        embeds, baselines=baseline, target=target, n_steps=9).sum(-1)[0]
    close(result.items[0].sequences[0].scores["integrated-gradients"][0], ref)


def test_saliency_reduce_default_and_override():
    module = tiny_decoder("gpt2", seed=1)
    model = load_text_model(module)
    ids = torch.tensor([[4, 9, 23, 61]])
    embeds = module.get_input_embeddings()(ids).detach()
    grad = Saliency(lambda e: module(inputs_embeds=e).logits[:, -1]).attribute(embeds.clone(), target=3)[0]
    for reduce, ref in (("l2", grad.norm(dim=-1)), ("max", grad.amax(dim=-1)), ("sum", grad.sum(dim=-1))):
        methods = {"saliency": text_params("saliency", None if reduce == "l2" else {"reduce": reduce})}
        out = run_text_batch(model, TextBatch.from_ids(ids), methods, target=3, keep_attentions=False)
        close(out.token_maps["saliency"][0][0], ref)


def test_refusals_are_one_line():
    module = tiny_decoder("gpt2")
    model = load_text_model(module)
    batch = TextBatch.from_ids(torch.tensor([[4, 9, 23]]))
    with pytest.raises(MethodError, match="baseline='black' is not available for this input: use zero$"):
        run_text_batch(model, batch, {"integrated-gradients": text_params("integrated-gradients",
                                                                          {"baseline": "black", "steps": 2})})
    encoder = load_text_model(tiny_text_model("bert", False))
    ids, mask = random_batch((5, 4))
    with pytest.raises(MethodError, match="method 'integrated-gradients' explains a target score of a classifier"):
        run_text_batch(encoder, TextBatch.from_ids(ids, mask), {"integrated-gradients": text_params(
            "integrated-gradients", {"steps": 2})}, objective=__import__("vitlens.text.task", fromlist=["x"])
            .resolve_objective("similarity", True))
