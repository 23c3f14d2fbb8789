"""Word-level and span-level scores: a sequence's token scores aggregated over groups of tokens.

A *word* is what the tokenizer says it is: the tokens sharing one ``word_ids()`` entry of a fast
tokenizer (BERT's WordPiece: ``em ##bed ##s`` is one word, punctuation its own word), and for causal
decoders the tokens from one space-led token to the next (GPT-2's ``ĠParis``, SentencePiece's
``▁Paris``). Special tokens ([CLS], [SEP], BOS) belong to no word, and the two texts of a classifier's
pair never share one. A word's text is its characters in the input (the tokenizer's
``offset_mapping``, first start to last end), or its tokens joined when the tokenizer gives no offsets.

A *span* is a character range [START, END) of the (first) text; its tokens are the non-special tokens
of that text whose character ranges overlap it (so a span cutting a word in half takes the whole
token). Spans need a fast tokenizer (offsets).

Aggregation, per method and target, over a group's tokens: ``sum`` (default; for LRP the relevance of
the group, conservation kept) or ``max`` (the strongest token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vitlens.errors import InputError, UsageError

AGGREGATES = ("sum", "max")


@dataclass
class WordScores:
    """Scores of groups of one sequence's tokens: its words, or character spans asked for.

    Attributes
    ----------
    kind : str
        ``'words'`` or ``'spans'``.
    aggregate : str
        ``'sum'`` or ``'max'``.
    text : list of str
        Each group's characters in its text.
    tokens : list of list of int
        Each group's token positions (indices into the sequence's real tokens).
    ranges : list
        Each group's (start, end) character range in its text, or None without offsets.
    segments : list of int
        0 for the first text, 1 for the pair's text (a classifier's sentence pair).
    space : list of bool
        Whether a space precedes the group (for drawing).
    scores : dict
        method -> (K, W) float array.
    """

    kind: str
    aggregate: str
    text: list
    tokens: list
    ranges: list
    segments: list
    space: list
    scores: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.text)

    def to_dict(self) -> dict:
        return {"aggregate": self.aggregate, "text": self.text, "tokens": self.tokens,
                "ranges": [list(r) if r is not None else None for r in self.ranges], "segments": self.segments,
                "scores": {m: np.round(v.astype(np.float64), 8).tolist() for m, v in self.scores.items()}}


def check_aggregate(aggregate: str, option: str = "word_aggregate") -> str:
    if aggregate not in AGGREGATES:
        raise UsageError(f"{option} must be sum or max, got {aggregate!r}")
    return aggregate


def aggregate_scores(scores, groups: list, aggregate: str = "sum") -> np.ndarray:
    """(K, n) token scores -> (K, W): per group of token positions, the sum or the max of its tokens."""
    check_aggregate(aggregate)
    values = np.asarray(scores, dtype=np.float64)
    values = values[None] if values.ndim == 1 else values
    out = np.zeros((values.shape[0], len(groups)))
    for w, tokens in enumerate(groups):
        part = values[:, tokens]
        out[:, w] = part.sum(-1) if aggregate == "sum" else part.max(-1)
    return out


def word_groups(word_ids: list, segments: list, special: list) -> list:
    """Token positions of each word, in order: consecutive non-special tokens with the same (segment, word id)."""
    groups, key = [], None
    for j, (word, segment, is_special) in enumerate(zip(word_ids, segments, special)):
        if is_special or word is None:
            key = None
            continue
        if (segment, word) != key:
            groups.append([])
            key = (segment, word)
        groups[-1].append(j)
    return groups


def _group_text(seq, tokens: list, texts: tuple) -> tuple:
    """(text, (start, end) or None) of a group of tokens."""
    offsets = seq.offsets
    segment = seq.segments[tokens[0]] if seq.segments else 0
    source = texts[segment] if segment < len(texts) else None
    if offsets and source is not None and all(offsets[j] is not None for j in tokens):
        start = min(offsets[j][0] for j in tokens)
        end = max(offsets[j][1] for j in tokens)
        shown = source[start:end].strip()
        if shown:
            return shown, (start, end)
    return "".join(seq.display[j] for j in tokens), None


def words_view(seq, texts: tuple, aggregate: str = "sum") -> WordScores:
    """The words of a :class:`~vitlens.text.api.SequenceResult` and every method's aggregated scores.

    ``texts``: the texts the sequence was read from, indexed by segment (``(text,)``, or ``(text, pair)``
    for a classifier's sentence pair)."""
    groups = word_groups(seq.word_ids or [None] * len(seq.tokens), seq.segments or [0] * len(seq.tokens),
                         seq.special)
    shown = [_group_text(seq, g, texts) for g in groups]
    view = WordScores("words", check_aggregate(aggregate), [t for t, _ in shown], groups, [r for _, r in shown],
                      [seq.segments[g[0]] if seq.segments else 0 for g in groups],
                      [bool(i) and bool(seq.space[g[0]]) for i, g in enumerate(groups)])
    view.scores = {m: aggregate_scores(v, groups, aggregate) for m, v in seq.scores.items()}
    return view


def parse_spans(spans) -> list:
    """``'START:END,...'`` (character ranges, END exclusive) or pairs -> [(start, end)]; one-line errors."""
    if isinstance(spans, str):
        out = []
        for part in spans.split(","):
            start, colon, end = part.strip().partition(":")
            if not colon or not start.strip().isdigit() or not end.strip().isdigit():
                raise InputError(f"--spans {spans!r}: give START:END character ranges, e.g. 0:5,10:22")
            out.append((int(start), int(end)))
        spans = out
    try:
        spans = [(int(a), int(b)) for a, b in spans]
    except (TypeError, ValueError):
        raise InputError(f"spans {spans!r}: give (start, end) character ranges") from None
    if not spans:
        raise InputError("no spans given")
    for a, b in spans:
        if not 0 <= a < b:
            raise InputError(f"span {a}:{b} is empty or negative: START must be below END (END is exclusive)")
    return spans


def spans_view(seq, text: str, spans: list, aggregate: str = "sum") -> WordScores:
    """Character ranges of ``text`` (the first text of ``seq``) and every method's aggregated scores.

    A span's tokens are the non-special tokens of the first text whose character ranges overlap it.
    """
    if not seq.offsets:
        raise InputError("spans need character offsets, which this tokenizer does not give (use a fast tokenizer)")
    groups, ranges, shown, space = [], [], [], []
    for a, b in spans:
        if b > len(text):
            raise InputError(f"span {a}:{b} goes beyond the text ({len(text)} characters)")
        tokens = [j for j, o in enumerate(seq.offsets)
                  if o is not None and not seq.special[j] and (not seq.segments or seq.segments[j] == 0)
                  and o[0] < b and o[1] > a]
        if not tokens:
            raise InputError(f"span {a}:{b} ({text[a:b]!r}) covers no token of the text")
        groups.append(tokens)
        ranges.append((a, b))
        shown.append(f"[{a}:{b}] {text[a:b].strip()}")
        space.append(bool(groups[:-1]))
    view = WordScores("spans", check_aggregate(aggregate), shown, groups, ranges, [0] * len(groups), space)
    view.scores = {m: aggregate_scores(v, groups, aggregate) for m, v in seq.scores.items()}
    return view


__all__ = ["AGGREGATES", "WordScores", "aggregate_scores", "check_aggregate", "parse_spans", "spans_view",
           "word_groups", "words_view"]
