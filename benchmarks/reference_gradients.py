"""vitlens' gradient baselines against captum (images, text) and inseq (a continuation of a random GPT-2).

    OMP_NUM_THREADS=1 python benchmarks/reference_gradients.py [--steps 50]        # captum only
    pip install --target /tmp/inseqpkgs inseq          # a throw-away directory: inseq is no dependency of vitlens
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/inseqpkgs python benchmarks/reference_gradients.py [--steps 50]

Images: the tests' tiny random timm ViT (32 px, 8 px patches, 3 blocks, seed 3) on 4 random inputs and 2 targets
each, vitlens' ``saliency`` (max over channels), ``input-x-gradient`` and ``integrated-gradients`` (zero baseline,
``--steps`` Gauss-Legendre points) against captum's ``Saliency`` (``abs=True``, max over channels),
``InputXGradient`` and ``IntegratedGradients`` summed over channels.

Text:
The model is the tests' tiny random GPT-2 (2 layers, 4 heads, hidden 32, seed 0) with a byte-level BPE tokenizer
trained on the tests' five sentences (tests/text/conftest.py), so that the prompt "The capital of France is" and the
continuation " Paris and Rome" are 5 + 3 tokens. Per method, vitlens' ``explain_continuation`` (teacher forcing:
one forward, one backward per generated token) against inseq's ``attribute(prompt, prompt + continuation,
attributed_fn="logit")`` on a decoder-only model, whose granular ``target_attributions`` (tokens x steps x hidden)
are reduced over the hidden dimension as vitlens reduces them: saliency by the L2 norm (inseq's default ``vnorm``
aggregation), input x gradient and integrated gradients by the sum. Integrated gradients with inseq's defaults:
captum's Gauss-Legendre rule with ``--steps`` points, the baseline = the unknown token's embedding at every
position (inseq's; vitlens ``baseline='unk'``). Then captum itself on the same embeddings (IntegratedGradients with a
zero baseline, per step on the prefix). Prints the largest absolute difference over the matrix relative to its
largest absolute value.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "src"))

PROMPT, CONTINUATION = "The capital of France is", " Paris and Rome"


def tiny_gpt2():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    from tests.text.conftest import CORPUS, tiny_decoder

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 3, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return tiny_decoder("gpt2", vocab_size=len(tokenizer)), tokenizer


def images(steps: int) -> None:
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    import vitlens
    from tests.conftest import tiny_timm_vit

    module = tiny_timm_vit(seed=3)
    model = vitlens.load_model(module)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[2, 6], [0, 1], [9, 3], [4, 4]])
    result = vitlens.explain(model, x, methods=["saliency", "input-x-gradient", "integrated-gradients"],
                             target=targets, params={"integrated-gradients": {"steps": steps}})
    for k in range(2):
        t = targets[:, k]
        refs = {"saliency": Saliency(module).attribute(x.clone().requires_grad_(), target=t).amax(dim=1),
                "input-x-gradient": InputXGradient(module).attribute(x.clone().requires_grad_(), target=t).sum(1),
                "integrated-gradients": IntegratedGradients(module).attribute(x, target=t, n_steps=steps).sum(1)}
        for name, ref in refs.items():
            ours = result.patch_maps[name][:, k].double().numpy()
            print(f"image {name:22s} target slot {k} vs captum: max |difference| / max |value| = "
                  f"{relative(ours, ref.detach().double().numpy()):.1e}")


def relative(ours: np.ndarray, ref: np.ndarray) -> float:
    seen = ~np.isnan(ref)
    assert (seen == ~np.isnan(ours)).all(), "the matrices see different tokens"
    return float(np.abs(ours[seen] - ref[seen]).max() / np.abs(ref[seen]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="integration points of integrated gradients")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images(args.steps)
    from captum.attr import IntegratedGradients
    try:
        import inseq
    except ImportError:
        inseq = None
        print("inseq is not importable here: text compared with captum only")

    from vitlens.text import explain_continuation, load_text_model

    module, tokenizer = tiny_gpt2()
    model = load_text_model(module, tokenizer=tokenizer)
    methods = {"saliency": ("saliency", lambda a: a.norm(dim=-1)),
               "input-x-gradient": ("input_x_gradient", lambda a: a.sum(dim=-1)),
               "integrated-gradients": ("integrated_gradients", lambda a: a.sum(dim=-1))}
    ours = explain_continuation(model, PROMPT, continuation=CONTINUATION, methods=list(methods),
                                params={"integrated-gradients": {"steps": args.steps, "baseline": "unk"}})
    rows = len(ours.ids) - 1
    print(f"prompt {PROMPT!r} + continuation {CONTINUATION!r}: {ours.prompt_length} + {len(ours.steps)} tokens; "
          f"logits {[round(s['value'], 4) for s in ours.steps]}")
    for name, (inseq_name, reduce) in methods.items() if inseq is not None else ():
        attributor = inseq.load_model(module, inseq_name, tokenizer=tokenizer)
        kwargs = {"n_steps": args.steps} if inseq_name == "integrated_gradients" else {}
        out = attributor.attribute(PROMPT, PROMPT + CONTINUATION, attributed_fn="logit", show_progress=False,
                                   **kwargs)
        granular = out.sequence_attributions[0].target_attributions  # (tokens, steps, hidden)
        reference = reduce(granular.double())[:rows].numpy()
        print(f"{name:22s} vs inseq {inseq_name:22s}: max |difference| / max |value| = "
              f"{relative(ours.matrices[name], reference):.1e}")
    # captum's IntegratedGradients on the same embeddings, zero baseline, each step on its prefix alone
    zero = explain_continuation(model, PROMPT, continuation=CONTINUATION, methods=["integrated-gradients"],
                                params={"integrated-gradients": {"steps": args.steps}})
    embedding = module.get_input_embeddings()
    reference = np.full((rows, len(zero.steps)), np.nan)
    for t, step in enumerate(zero.steps):
        prefix = torch.tensor([zero.ids[:zero.prompt_length + t]])
        embeds = embedding(prefix).detach()
        attribution = IntegratedGradients(lambda e: module(inputs_embeds=e).logits[:, -1]).attribute(
            embeds, target=step["id"], n_steps=args.steps)
        reference[:prefix.shape[1], t] = attribution.sum(-1)[0].double().numpy()
    print(f"{'integrated-gradients':22s} vs captum IntegratedGradients (zero baseline): max |difference| / "
          f"max |value| = {relative(zero.matrices['integrated-gradients'], reference):.1e}")


if __name__ == "__main__":
    main()
