"""Time per generated token of explaining a continuation, per method, against a plain forward + backward.

    OMP_NUM_THREADS=1 python benchmarks/continuation.py [--layers 6] [--hidden 256] [--prompt 32] [--tokens 16]
        [--repeats 3] [--threads 1] [--device cpu]

A random GPT-2 (``--layers`` blocks, ``--hidden`` width, 8 heads, vocabulary 8000, seed 0) explains a continuation
of ``--tokens`` tokens after a random ``--prompt``-token prompt with ``vitlens.text.explain_continuation`` (teacher
forcing: one forward of prompt + continuation, one backward per generated token), each method on its own (the
gradient baselines' integrated gradients with 16 steps), then all of them in one call, and for comparison chefer
without teacher forcing (each prefix explained alone by the single-next-token path). Reference: a plain forward
of the same sequence plus one backward of one token's logit to the input embeddings (what one step of the
cheapest gradient method needs). Prints seconds per generated token (median of ``--repeats`` after one warm-up)
and the ratio to the reference. The numbers depend on the machine and its load; the ratios less so.
"""

from __future__ import annotations

import argparse

import torch

from _timing import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers as tr

    from vitlens.text import load_text_model
    from vitlens.text.continuation import explain_continuation

    torch.manual_seed(0)
    config = tr.GPT2Config(vocab_size=8000, n_positions=256, n_embd=args.hidden, n_layer=args.layers, n_head=8)
    module = tr.GPT2LMHeadModel(config).eval().to(args.device)

    class Tokenizer:  # ids as text: "17 4 99" (explain_continuation tokenizes the prompt and the continuation)
        all_special_ids, unk_token_id, eos_token_id, pad_token_id, model_max_length = [], 0, None, None, 256

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [int(t) for t in text.split()]}

        def convert_ids_to_tokens(self, ids):
            return [str(i) for i in ids]

        def decode(self, ids):
            return " " + " ".join(str(i) for i in ids)

    model = load_text_model(module, tokenizer=Tokenizer())
    g = torch.Generator().manual_seed(1)
    prompt = " ".join(str(int(t)) for t in torch.randint(1, 8000, (args.prompt,), generator=g))
    continuation = " " + " ".join(str(int(t)) for t in torch.randint(1, 8000, (args.tokens,), generator=g))
    ids = torch.tensor([[int(t) for t in (prompt + continuation).split()]], device=args.device)

    def reference():
        embeds = module.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = module(inputs_embeds=embeds).logits
        torch.autograd.grad(logits[0, -2, int(ids[0, -1])], embeds)

    base = timed(reference, args.repeats, args.device)
    print(f"random GPT-2 {args.layers} layers x {args.hidden}, prompt {args.prompt} + {args.tokens} generated tokens, "
          f"{args.threads} thread(s), {args.device}")
    print(f"{'plain forward + one backward (the whole sequence)':52s} {base * 1000:9.1f} ms")
    methods = ["attention", "rollout", "gmar-l1", "gmar-l2", "gmar++", "legrad", "chefer", "attnlrp", "cp-lrp",
               "saliency", "input-x-gradient", "integrated-gradients"]
    params = {"integrated-gradients": {"steps": 16}}
    for name in methods + ["all of them in one call"]:
        asked = methods if name.startswith("all") else [name]
        seconds = timed(lambda asked=asked: explain_continuation(
            model, prompt, continuation=continuation, methods=asked,
            params={k: v for k, v in params.items() if k in asked}), args.repeats, args.device)
        per_token = seconds / args.tokens
        print(f"{name:52s} {per_token * 1000:9.1f} ms per token  ({per_token / base:5.2f}x the reference)")
    # without teacher forcing: every prefix explained on its own (one forward and one backward per prefix)
    from vitlens.text.batch import TextBatch
    from vitlens.text.task import run_text_batch, text_params

    P = args.prompt

    def per_prefix():
        for t in range(args.tokens):
            run_text_batch(model, TextBatch.from_ids(ids[:, :P + t]), {"chefer": text_params("chefer")},
                           target=int(ids[0, P + t]), keep_attentions=False)

    per_token = timed(per_prefix, args.repeats, args.device) / args.tokens
    print(f"{'chefer, each prefix explained alone (no teacher forcing)':52s} {per_token * 1000:9.1f} ms per token  "
          f"({per_token / base:5.2f}x the reference)")


if __name__ == "__main__":
    main()
