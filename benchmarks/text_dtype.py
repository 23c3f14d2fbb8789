"""Text models loaded in bf16 / fp16: how close their token attributions stay to float32.

    OMP_NUM_THREADS=1 python benchmarks/text_dtype.py [--init 0.5] [--families llama,gpt2]

Random 2-layer decoders of tests/text/conftest.py (hidden 32, 4 heads; Llama with 2 key/value heads and
rotary embeddings), weights drawn with ``initializer_range`` ``--init`` (0.5: peaked attention; at
Hugging Face's default 0.02 every attention row is nearly uniform), saved as a directory with the
byte-level BPE tokenizer the tests train, and loaded with ``load_text_model(DIR, dtype=...)``. The
three prompts and next tokens of tests/text/test_dtype.py are explained with every method; printed per
method: the Pearson correlation of each prompt's token scores against float32's, min / mean over the
prompts, as a markdown table (the numbers in docs/text.md). No GPU, no network.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.text.conftest import CORPUS, tiny_decoder  # noqa: E402
from tests.text.test_dtype import METHODS, PROMPTS, TARGETS  # noqa: E402
from vitlens.text import explain_text, load_text_model  # noqa: E402


def tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 3, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")


def correlations(directory: str, dtype: str) -> dict:
    runs = {name: explain_text(load_text_model(directory, dtype=name), PROMPTS, methods=METHODS,
                               target_token=TARGETS) for name in ("fp32", dtype)}
    return {m: [float(np.corrcoef(a.sequences[0].scores[m].ravel(), b.sequences[0].scores[m].ravel())[0, 1])
                for a, b in zip(runs["fp32"].items, runs[dtype].items)] for m in METHODS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", type=float, default=0.5)
    parser.add_argument("--families", default="llama,gpt2")
    args = parser.parse_args()
    tok = tokenizer()
    columns, table = [], {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as root:
        for family in args.families.split(","):
            directory = str(Path(root) / family)
            tiny_decoder(family, vocab_size=len(tok), initializer_range=args.init).save_pretrained(directory)
            tok.save_pretrained(directory)
            for dtype in ("bf16", "fp16"):
                columns.append(f"{family} {dtype}")
                for method, values in correlations(directory, dtype).items():
                    table[method].append(f"{min(values):.4f} / {np.mean(values):.4f}")
    print(f"initializer_range {args.init}; correlation with fp32, min / mean over {len(PROMPTS)} prompts")
    print("| method | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for method in METHODS:
        print(f"| `{method}` | " + " | ".join(table[method]) + " |")


if __name__ == "__main__":
    main()
